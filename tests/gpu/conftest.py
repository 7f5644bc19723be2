"""GPU kernel tests: the whole folder skips (with the reason) where no CUDA GPU is visible.

With a GPU, a kernel package that does not import is a failure, not a skip: the point of running
here is to prove the installed wheel works.

Environment:
- ``BLACKWHEEL_RESULTS=path``: append one JSON line per test (outcome, duration, measured errors
  and their allowed bounds) plus a session line; ``blackwheel report --tests path`` reads it.
- ``BLACKWHEEL_ALLOW_JIT=1``: the first-launch tests accept kernels the driver JIT-compiles from PTX
  (default: PTX JIT is disabled in their subprocess, so a wheel without native code for this GPU fails).
- ``BLACKWHEEL_GPU_TESTS_DEVICE=cpu``: run the harness on the CPU against a stand-in module, to check
  the harness itself; the numbers mean nothing about any kernel.

Helpers shared by every package's tests live beside this file: ``kernel_check.py`` (tolerances,
error checks, poisoning) and ``attention_ref.py`` (attention references). Add a package's tests as
``test_<package>.py``.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import zlib
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # importlib import mode: helper modules beside the tests need the path

try:
    import torch
except ImportError:
    torch = None

HARNESS_CPU = os.environ.get("BLACKWHEEL_GPU_TESTS_DEVICE") == "cpu"
RESULTS = os.environ.get("BLACKWHEEL_RESULTS")

# --doctest-modules imports every module here; without torch the helpers cannot be imported.
collect_ignore = [] if torch is not None else ["kernel_check.py", "attention_ref.py"]


def _why_no_gpu() -> str | None:
    if torch is None:
        return "no CUDA GPU: torch is not installed"
    if HARNESS_CPU:
        return None
    if not torch.cuda.is_available():
        return (f"no CUDA GPU: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    return None


_ROOT = Path.cwd()


def pytest_configure(config):
    global _ROOT
    _ROOT = Path(str(config.rootpath))     # report node ids are relative to it
    config.addinivalue_line("markers", "no_gpu_needed: a check of the test harness itself; runs on CPU")


def _here(item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config, items):
    reason = _why_no_gpu()
    if reason is None:
        return
    for item in items:
        if _here(item) and (torch is None or not item.get_closest_marker("no_gpu_needed")):
            item.add_marker(pytest.mark.skip(reason=reason))


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def device():
    return torch.device("cpu" if HARNESS_CPU else "cuda")


@pytest.fixture
def rand(request, device):
    """``rand(shape, dtype, requires_grad=False)``: standard normal inputs, seeded by the test's id.

    Every test gets its own reproducible stream; never zeros, never a reused buffer.
    """
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(request.node.nodeid.encode()))

    def make(shape, dtype, requires_grad=False):
        x = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return x.requires_grad_(requires_grad)

    make.generator = gen
    return make


@pytest.fixture
def record(request):
    """``record(name=value, ...)``: numbers that go into the test's result line."""

    def add(**values):
        for key, value in values.items():
            request.node.user_properties.append((key, value))

    return add


# ---- result lines --------------------------------------------------------------------------------
_session_written = False


def _append(line: dict) -> None:
    with open(RESULTS, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")


def _session_line() -> dict:
    line = {"kind": "session", "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "torch": getattr(torch, "__version__", None), "harness_cpu": HARNESS_CPU}
    if torch is not None and torch.cuda.is_available() and not HARNESS_CPU:
        props = torch.cuda.get_device_properties(0)
        line.update(device=props.name, cc=f"{props.major}.{props.minor}", torch_cuda=torch.version.cuda)
    return line


def _message(report) -> str | None:
    if report.passed:
        return None
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    text = (getattr(report, "longreprtext", "") or "").strip()
    if not text:
        return None
    errors = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("E ")]
    return " | ".join(errors)[:1000] if errors else text.splitlines()[-1][:1000]


def pytest_runtest_logreport(report):
    global _session_written
    if not RESULTS or HERE not in (_ROOT / report.nodeid.split("::")[0]).resolve().parents:
        return
    final = report.when == "call" or (report.when == "setup" and not report.passed)
    if not final:
        return
    if not _session_written:
        _append(_session_line())
        _session_written = True
    outcome = "error" if report.when == "setup" and report.failed else report.outcome
    _append({"kind": "test", "test": report.nodeid, "outcome": outcome,
             "duration_s": round(report.duration, 4), "properties": dict(report.user_properties),
             "message": _message(report)})
