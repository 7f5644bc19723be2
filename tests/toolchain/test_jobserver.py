"""One job budget for builds at once: a real fifo jobserver, real ninja through our stand-in."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

from blackwheel.toolchain.jobserver import JOBSERVER_ENV, jobserver, ninja_jobs_args
from blackwheel.toolchain.ninja import write_ninja_shim
from blackwheel.pipeline.stack_build import build_stack

NINJA = shutil.which("ninja", path=str(Path(sys.executable).parent)) or shutil.which("ninja")
EDGES = 4


def _project(folder: Path, name: str, log: Path) -> Path:
    """A build.ninja of EDGES half-second steps that log when they start and end."""
    folder.mkdir(parents=True)
    step = f"echo start $$(date +%s.%N) >> {log}; sleep 0.5; echo end $$(date +%s.%N) >> {log}; touch $out"
    edges = "".join(f"build {name}{i}: step\n" for i in range(EDGES))
    (folder / "build.ninja").write_text(f"rule step\n  command = {step}\n{edges}")
    return folder


def _most_at_once(log: Path) -> int:
    events = sorted((float(t), +1 if kind == "start" else -1)
                    for kind, t in (line.split() for line in log.read_text().splitlines()))
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _two_builds_through_the_shim(tmp_path: Path, env_extra: dict) -> int:
    log = tmp_path / "steps.log"
    shim = write_ninja_shim(tmp_path / "shim", NINJA)
    env = {"PATH": "/usr/bin:/bin", **env_extra}
    procs = [subprocess.Popen([str(shim), "-j", "8"], cwd=_project(tmp_path / n, n, log), env=env,
                              stdout=subprocess.DEVNULL) for n in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    return _most_at_once(log)


@pytest.mark.skipif(NINJA is None, reason="ninja is a test requirement (pip install ninja)")
def test_two_builds_share_one_budget_although_each_asks_for_8_jobs(tmp_path):
    with jobserver(jobs=2, clients=2, folder=tmp_path) as env:
        assert env[JOBSERVER_ENV] and "--jobserver-auth=fifo:" in env["MAKEFLAGS"]
        assert _two_builds_through_the_shim(tmp_path / "shared", env) <= 2
    assert not list(tmp_path.glob("bw-jobserver-*"))          # the fifo is gone afterwards


@pytest.mark.skipif(NINJA is None, reason="ninja is a test requirement (pip install ninja)")
def test_without_the_jobserver_each_build_runs_its_own_jobs(tmp_path):
    assert _two_builds_through_the_shim(tmp_path, {}) > 2       # the control: the budget is what limits


def test_flashinfer_runner_leaves_out_its_own_jobs_under_the_budget():
    assert ninja_jobs_args(16, {}) == ["-j", "16"]
    assert ninja_jobs_args(16, {JOBSERVER_ENV: "/tmp/x"}) == []


@dataclass(frozen=True)
class _Req:
    recipe: object
    version: object
    target: object = None
    stack: object = field(default_factory=lambda: SimpleNamespace(torch="2.11.0"))
    fetcher: object = None
    extra_env: dict = field(default_factory=dict)
    live: bool | None = None


class _Everything:
    offline = False

    def check(self, sources):
        return [], []

    def fetch_optional(self, src):
        return Path("/x"), None


def _req(name: str) -> _Req:
    recipe = SimpleNamespace(name=name, expect={"unit-memory-gib": 1.0}, sources_for=lambda *a: (),
                             path=Path("/nowhere") / f"{name}.toml",
                             arch=SimpleNamespace(archs_for=lambda t: ()))
    return _Req(recipe=recipe, version=SimpleNamespace(version="1.0"), fetcher=_Everything())


def test_build_all_runs_the_packages_at_once_with_the_budget_in_their_environment(capsys):
    both_running = threading.Barrier(2, timeout=20)      # fails unless the two builds overlap
    seen = {}

    def build(req):
        seen[req.recipe.name] = (req.extra_env.get("MAKEFLAGS", ""), req.live)
        both_running.wait()
        return SimpleNamespace(wheel=Path(f"{req.recipe.name}.whl"), reused=False,
                               manifest={"build": {"wall_s": 1.0}, "verify": {"ok": True}})

    rows, rc = build_stack([_req("one"), _req("two")], build=build, resources=(4, 16 * 2**30))
    assert rc == 0 and [r["package"] for r in rows] == ["one", "two"]
    assert all("--jobserver-auth=fifo:" in flags and live is False for flags, live in seen.values())
    assert "at once on one budget of 4 jobs" in capsys.readouterr().err


def test_a_failure_at_once_is_raised_after_the_table_unless_keep_going(capsys):
    from blackwheel.core.errors import BuildFailed

    def build(req):
        if req.recipe.name == "one":
            raise BuildFailed("one build failed: boom (log: /l/one.log)")
        return SimpleNamespace(wheel=Path("two.whl"), reused=True, manifest={"build": {}, "verify": {"ok": True}})

    with pytest.raises(BuildFailed, match="boom"):
        build_stack([_req("one"), _req("two")], build=build, resources=(4, 16 * 2**30))
    assert "two.whl" in capsys.readouterr().out                 # the other one still ended and is in the table
    rows, rc = build_stack([_req("one"), _req("two")], build=build, keep_going=True, resources=(4, 16 * 2**30))
    assert rc == 1 and rows[0]["log"] == "/l/one.log" and rows[1]["result"] == "reused"
