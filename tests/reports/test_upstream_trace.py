"""The trace plugin records every module load that goes through the named method, per worker too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blackwheel.reports.upstream_trace import TRACE_ENV, TRACE_OUT_ENV, merge

SRC = Path(__file__).resolve().parents[2] / "src"


def _world(tmp_path: Path) -> Path:
    """A stand-in for flashinfer.jit.core: a spec class whose load raises when no prebuilt copy exists."""
    pkg = tmp_path / "fakejit"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core.py").write_text(
        "class Spec:\n"
        "    def __init__(self, name, aot):\n"
        "        self.name, self.is_aot = name, aot\n"
        "    def build_and_load(self):\n"
        "        if not self.is_aot:\n"
        "            raise RuntimeError('missing JIT cache for module: ' + self.name)\n"
        "        return self.name\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    (tests / "test_a.py").write_text(
        "import pytest\n"
        "from fakejit.core import Spec\n"
        "def test_norm():\n"
        "    assert Spec('norm', True).build_and_load() == 'norm'\n"
        "    assert Spec('norm', True).build_and_load() == 'norm'\n"
        "def test_prefill_sm90():\n"
        "    with pytest.raises(RuntimeError):\n"
        "        Spec('batch_prefill_sm90', False).build_and_load()\n")
    return tests


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    out = tmp_path / "trace.json"
    env = {**os.environ, TRACE_ENV: "fakejit.core:Spec.build_and_load", TRACE_OUT_ENV: str(out),
           "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "blackwheel.reports.upstream_trace",
                           "-p", "no:cacheprovider", str(tmp_path / "tests"), *extra],
                          env=env, capture_output=True, text=True, cwd=tmp_path)


def test_trace_names_hits_and_misses_with_their_counts(tmp_path):
    _world(tmp_path)
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trace = merge(tmp_path / "trace.json")
    assert trace["modules"] == {"norm": {"aot": True, "calls": 2},
                                "batch_prefill_sm90": {"aot": False, "calls": 1}}
    assert set(trace["first_result_s"]) == {"tests/test_a.py"}
    assert trace["first_result_s"]["tests/test_a.py"] >= 0


def test_without_the_variable_nothing_is_patched(tmp_path):
    _world(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    env.pop(TRACE_ENV, None)
    env[TRACE_OUT_ENV] = str(tmp_path / "trace.json")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "blackwheel.reports.upstream_trace",
                           "-p", "no:cacheprovider", str(tmp_path / "tests")],
                          env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "trace.json").read_text())["modules"] == {}


def test_worker_files_merge(tmp_path):
    out = tmp_path / "trace.json"
    (tmp_path / "trace.json.gw0").write_text(json.dumps(
        {"modules": {"norm": {"aot": True, "calls": 2}}, "first_result_s": {"tests/a.py": 3.0}}))
    (tmp_path / "trace.json.gw1").write_text(json.dumps(
        {"modules": {"norm": {"aot": True, "calls": 1}, "rope": {"aot": False, "calls": 1}},
         "first_result_s": {"tests/a.py": 1.5}}))
    assert merge(out) == {"modules": {"norm": {"aot": True, "calls": 3}, "rope": {"aot": False, "calls": 1}},
                          "first_result_s": {"tests/a.py": 1.5}}


def test_a_program_records_and_writes_without_pytest(tmp_path):
    _world(tmp_path)
    out = tmp_path / "program.json"
    code = ("from blackwheel.reports import upstream_trace as t\n"
            "t.install('fakejit.core:Spec.build_and_load')\n"
            "t.install('fakejit.core:Spec.build_and_load')\n"      # twice: still one wrapper
            "from fakejit.core import Spec\n"
            "Spec('page', True).build_and_load()\n"
            "try:\n    Spec('rope', False).build_and_load()\nexcept RuntimeError:\n    pass\n"
            f"t.write_recorded({str(out)!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert merge(out)["modules"] == {"page": {"aot": True, "calls": 1}, "rope": {"aot": False, "calls": 1}}


def test_the_vllm_worker_refuses_a_trace_its_engine_process_would_not_see(tmp_path):
    """A wrapper installed in the worker does not reach vLLM's spawned engine: tracing needs the engine
    in process, and the worker says so before it imports vLLM."""
    worker = SRC.parent / "tests" / "gpu" / "vllm_tiny_model.py"
    (tmp_path / "spec.json").write_text("{}")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update({TRACE_ENV: "fakejit.core:Spec.build_and_load", TRACE_OUT_ENV: str(tmp_path / "t.json"),
                "PYTHONPATH": str(SRC)})
    proc = subprocess.run([sys.executable, str(worker), "run-vllm", str(tmp_path / "spec.json"),
                           str(tmp_path / "out.json")], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "VLLM_ENABLE_V1_MULTIPROCESSING=0" in proc.stderr
    assert not (tmp_path / "t.json").exists()
