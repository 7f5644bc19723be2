"""The build stage end to end, for real: a generated CUDA torch extension through fetch (from a
mirror, offline), hash check, patch, an nvcc build, retag, verify and the wheelhouse; and the
flash-attn recipe through fetch, patch and its generated build file (no 73-unit compile)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from blackwheel.pipeline import build

from blackwheel import cli
from blackwheel.core.errors import ToolchainError, VerifyFailed
from blackwheel.check.inspect import inspect_path
from blackwheel.core.recipe import load_recipe, load_stack
from blackwheel.sources.fetch import Fetcher
from blackwheel.core.targets import TARGETS
from tests import cuda_ext
from tests.conftest import needs_nvcc_and_torch

pytestmark = [needs_nvcc_and_torch, pytest.mark.nvcc, pytest.mark.slow]


@pytest.fixture
def project(bw_env, monkeypatch):
    proj = cuda_ext.make_project(bw_env / "proj", sys.executable)
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(proj.recipes))
    monkeypatch.setenv("BLACKWHEEL_PATCHES", str(proj.patches))
    monkeypatch.setenv("BLACKWHEEL_MIRROR", str(proj.mirror))
    monkeypatch.setenv("BLACKWHEEL_OFFLINE", "1")
    return proj


def _wheelhouse(bw_env: Path, target: str) -> list[Path]:
    return sorted((bw_env / "wheelhouse" / "test" / target).glob("*"))


def test_blackwell_build_end_to_end_then_reuse(project, bw_env, capsys):
    assert cli.main(["build", cuda_ext.NAME, "--target", "blackwell", "--stack", "test"]) == 0
    files = _wheelhouse(bw_env, "blackwell")
    wheels = [f for f in files if f.suffix == ".whl"]
    assert len(wheels) == 1 and not [f for f in files if f.name.endswith(".part")]
    wheel = wheels[0]
    local = _local("sm120.sm121")                      # the extension links torch: the name says which
    assert f"+{local}-" in wheel.name
    # the compiled .so holds native code for both devices of the target (read by our reader)
    cubins = {str(a) for o in inspect_path(wheel).cuda_objects for a in o.cubins}
    assert {"12.0", "12.1"} <= cubins
    manifest = json.loads((wheel.parent / (wheel.name + ".manifest.json")).read_text())
    assert manifest["verify"]["ok"] is True
    assert manifest["sources"][0]["sha256"] == project.sha256
    assert [p["subject"] for p in manifest["patches"]] == ["setup.py: scale by 3"]
    assert manifest["arch"]["value"] == "12.0;12.1"
    assert manifest["toolchain"]["nvcc"].startswith("13.")
    assert manifest["build"]["wall_s"] > 0
    with zipfile.ZipFile(wheel) as zf:
        (metadata,) = [zf.read(n).decode() for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
    assert f"\nVersion: 0.1.0+{local}\n" in metadata
    assert f"\nRequires-Dist: torch=={_torch_minor()}.*\n" in metadata
    # the patch reached the compiled code: the build log shows -DSCALE=3.0
    assert "-DSCALE=3.0" in Path(manifest["build"]["log"]).read_text()
    capsys.readouterr()
    # identical inputs: reused, not rebuilt
    assert cli.main(["build", cuda_ext.NAME, "--target", "blackwell", "--stack", "test"]) == 0
    assert "reused" in capsys.readouterr().err
    _publish_and_install(wheel, bw_env)


def test_split_compile_where_the_longest_unit_bounds_the_build(project, bw_env, monkeypatch):
    """The recipe's [split-compile] reaches the long unit's nvcc when the profile says the build is
    bound by it on this machine's CPUs, and the manifest and the build key say so."""
    with open(project.recipes / f"{cuda_ext.NAME}.toml", "a") as f:
        f.write("\n[split-compile]\nthreads = 2\n")
    (project.recipes / "profiles").mkdir()
    # 32 s of units, saxpy.o 30 of them: on 2 CPUs (16 s each) saxpy.o is the bound
    (project.recipes / "profiles" / f"{cuda_ext.NAME}-{cuda_ext.VERSION}.json").write_text(
        json.dumps({"units": {"saxpy.o": 30.0, "x.o": 1.0, "y.o": 1.0}}))
    monkeypatch.setattr(build, "machine_resources", lambda: (2, 8 << 30))
    assert cli.main(["build", cuda_ext.NAME, "--target", "hopper", "--stack", "test"]) == 0
    wheel = next(w for w in _wheelhouse(bw_env, "hopper") if w.suffix == ".whl")
    manifest = json.loads((wheel.parent / (wheel.name + ".manifest.json")).read_text())
    assert manifest["inputs"]["nvcc_flags"] == {"saxpy.o": ["-split-compile=2"]}
    assert manifest["build"]["nvcc_flags"] == {"saxpy.o": ["-split-compile=2"]}
    assert "-split-compile=2" in Path(manifest["build"]["log"]).read_text()   # the unit's nvcc had it
    assert manifest["verify"]["ok"] is True


def _torch_minor() -> str:
    return ".".join(cuda_ext.torch_version(sys.executable).split(".")[:2])


def _local(targets: str) -> str:
    return f"cu130.torch{_torch_minor()}.{targets}"


def _publish_and_install(wheel: Path, where: Path) -> None:
    """The pipeline's wheel through a real pypiserver into a fresh venv, and imported there."""
    import subprocess

    from blackwheel.release.publish import publish
    from tests import indexserver

    with indexserver.running_pypiserver(where / "srv", {"ci": "s3cret-ci"}) as srv:
        report = publish([wheel], srv.url, environ={"TWINE_USERNAME": "ci", "TWINE_PASSWORD": "s3cret-ci"})
        assert report.releases[0].uploaded
        venv = where / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        # the fresh venv sees this Python's torch through a .pth (a CUDA torch is gigabytes);
        # bw-saxpy itself must come from the server
        import sysconfig

        site = next((venv / "lib").glob("python*/site-packages"))
        (site / "outer_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        # with its dependencies: the torch it requires is the one beside it, so pip asks the index
        # (which has no torch) for nothing more
        pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
               "--no-input", "--index-url", srv.simple_url, f"{cuda_ext.NAME}==0.1.0+{_local('sm120.sm121')}"]
        proc = subprocess.run(pip, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin",
                              "PIP_CONFIG_FILE": "/dev/null", "HOME": str(venv)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        probe = subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import torch, bw_saxpy, os; print(os.path.dirname(bw_saxpy.__file__))"],
                               capture_output=True, text=True, cwd=where)
        assert probe.returncode == 0, probe.stderr
        assert str(venv) in probe.stdout   # imported from the fresh venv, not from elsewhere


def test_verify_fails_a_build_whose_flags_drop_an_arch(bw_env, monkeypatch):
    """``12.0a`` for blackwell: compiles fine, but sm_120a does not run on 12.1 -> no wheel."""
    proj = cuda_ext.make_project(bw_env / "proj", sys.executable, archs={"blackwell": ["12.0a"],
                                 "gb10": ["12.1"], "sm120": ["12.0"], "hopper": ["9.0"]})
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(proj.recipes))
    monkeypatch.setenv("BLACKWHEEL_PATCHES", str(proj.patches))
    monkeypatch.setenv("BLACKWHEEL_MIRROR", str(proj.mirror))
    stack = load_stack("test")
    req = build.BuildRequest(load_recipe(cuda_ext.NAME), stack, TARGETS["blackwell"],
                             workdir=bw_env / "work", fetcher=Fetcher.from_env(offline=True))
    with pytest.raises(VerifyFailed, match="12.1"):
        build.build_package(req)
    assert _wheelhouse(bw_env, "blackwell") == []   # nothing half-written is left


def test_torch_other_than_the_stack_is_refused_before_any_work(project, bw_env, capsys):
    stack = project.recipes / "stacks" / "test.toml"
    stack.write_text(stack.read_text().replace('torch = "', 'torch = "1.'))
    assert cli.main(["build", cuda_ext.NAME, "--stack", "test"]) == ToolchainError.exit_code
    err = capsys.readouterr().err
    assert "the stack pins 1." in err and len(err.strip().splitlines()) == 1
    assert not (bw_env / "cache" / "sources").exists()   # refused before any fetch


@pytest.mark.network
@pytest.mark.parametrize("target, flags", [
    ("gb10", ["-gencode arch=compute_121,code=sm_121"]),
    ("blackwell", ["-gencode arch=compute_120f,code=sm_120f"]),
    ("hopper", ["-gencode arch=compute_90,code=sm_90"]),
])
def test_flash_attn_generated_build_file(flash_attn_recipes, bw_env, target, flags, tmp_path):
    """The real sdist (fetched, hash-checked), our patches, setup.py's own build.ninja."""
    req = build.BuildRequest(load_recipe("flash-attn"), load_stack("local"), TARGETS[target],
                             workdir=tmp_path / "work", fetcher=Fetcher.from_env())
    plan = build.plan_package(req, tmp_path / f"{target}.ninja")
    assert plan["gencode"] == flags
    assert plan["units"] == 73
