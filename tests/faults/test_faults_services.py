"""Services going down at seeded points.

- The index server (a real pypiserver) killed during a publish of several wheels. publish.py
  promises (its docstring): one file per twine call, so a failure midway says exactly which files
  of that package version are up and which are not, and a rerun skips the ones already there.
  Checked: the error is one line and names exactly what the server holds; the server holds no
  partial file; a rerun against the restarted server completes.
- The publishing client killed (kill -9) during an upload: the index keeps only whole files and a
  rerun completes.
- Redis, sccache's store, killed during a real build (down before the build starts:
  tests/test_ccache.py::test_a_down_redis_falls_back_to_local_without_leaking_a_server). Checked:
  the build completes, its wheel is whole and verifies, nothing it started is left running, and it
  is not held up by the dead store (sccache alone waits 30 s per lookup and per store).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from blackwheel.core.errors import PublishError
from blackwheel.core.fsutil import sha256_file
from blackwheel.release.publish import publish
from blackwheel.release.wheelhouse import place
from tests import indexserver as h
from tests.conftest import needs_nvcc_and_torch, wait_until
from tests.faults import faultkit as fk

pytest.importorskip("pypiserver")
pytest.importorskip("twine")
USER, PASSWORD = "bw", "fault-pw"
# two server starts and a twine call per file make a trial ~3 s: a third of the trials per point
PER_POINT = max(1, fk.TRIALS // 3)
ENV = {"TWINE_USERNAME": USER, "TWINE_PASSWORD": PASSWORD}


def _serve(root: Path, packages: Path) -> tuple[subprocess.Popen, str]:
    htpasswd = root / "htpasswd"
    if not htpasswd.is_file():
        h.write_htpasswd(htpasswd, {USER: PASSWORD})
    port = h.free_port()
    log = root / f"pypiserver-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port),
                                 "-P", str(htpasswd), "-a", "update", "--disable-fallback", "--backend",
                                 "simple-dir", "--server", "wsgiref", str(packages)],
                                cwd=root, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    h._wait_until_up(url, proc, log)
    return proc, url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def release_wheels(tmp_path_factory):
    work = tmp_path_factory.mktemp("pubwh")
    placed = []
    for tag in ("sm90", "sm120", "sm121"):
        wheel = fk.make_wheel(work / "in", "bw_pub", version=f"1.0+cu130.{tag}", bulk=1 << 20)
        placed.append(place(wheel, fk.manifest_for(wheel, "s", tag), work / "wh", "s", tag))
    return placed


def test_index_server_killed_mid_publish(release_wheels, fault_results, tmp_path):
    case = "index server (pypiserver) killed during a publish of 3 wheels"
    rng = random.Random(f"{fk.SEED}:{case}")
    want = {w.name: sha256_file(w) for w in release_wheels}
    ref_root = tmp_path / "ref"
    (ref_root / "packages").mkdir(parents=True)
    proc, url = _serve(ref_root, ref_root / "packages")
    t0 = time.monotonic()
    try:
        publish(release_wheels, url, environ=ENV, echo=lambda line: None)
    finally:
        duration = time.monotonic() - t0
        _stop(proc)
    pts, trials, t0 = fk.points(rng), [], time.monotonic()
    for point in pts:
        for _ in range(PER_POINT):
            root = tmp_path / f"s{len(trials)}"
            packages = root / "packages"
            packages.mkdir(parents=True)
            proc, url = _serve(root, packages)
            delay = round(point * duration, 4)
            timer = threading.Timer(delay, proc.kill)
            timer.start()
            problems, message, unacknowledged = [], None, []
            try:
                publish(release_wheels, url, environ=ENV, echo=lambda line: None)
            except PublishError as exc:
                message = str(exc)
            except Exception as exc:  # noqa: BLE001 - a traceback through the CLI is a lost trial
                message = f"{type(exc).__name__}: {exc}"
                problems.append(f"not a PublishError: {message}")
            finally:
                timer.cancel()
                _stop(proc)
            held = {p.name: sha256_file(p) for p in packages.iterdir()}
            # pypiserver writes an upload in place: killed while writing, it keeps the part it had
            cut_off = [name for name, digest in held.items() if want.get(name) != digest]
            problems += _not_cut_offs(packages, cut_off, release_wheels)
            if message is not None:
                if "\n" in message:
                    problems.append("a multi-line error")
                said = re.search(r"bw-pub (\S+) is incomplete: on the index: (.*?); not uploaded: (.*?); rerun", message)
                if said:   # what it says is up of that version is exactly what the server holds of it
                    up = set() if said.group(2) == "nothing" else set(said.group(2).split(", "))
                    of_version = {n for n in held if f"-{said.group(1)}-" in n}
                    # a server killed after storing a file but before answering keeps it unacknowledged:
                    # the account may miss it (its bytes are checked above, the rerun skips it), never invent one
                    if not up <= of_version:
                        problems.append(f"the error says {sorted(up)} are up, the index holds {sorted(held)}")
                    unacknowledged = sorted(of_version - up)
                elif "unreachable" not in message:
                    problems.append(f"the error does not say what is up: {message}")
            elif set(held) != set(want):
                problems.append(f"publish returned but the index holds only {sorted(held)}")
            proc, url = _serve(root, packages)          # the server is back: a rerun finishes
            try:
                if cut_off:   # the rerun must name it (one line), and once it is removed complete
                    try:
                        publish(release_wheels, url, environ=ENV, echo=lambda line: None)
                        problems.append(f"a rerun published over the cut-off {cut_off}")
                    except PublishError as exc:
                        if not all(f"{n} on the index is a partial upload" in str(exc) for n in cut_off):
                            problems.append(f"the rerun does not name the cut-off upload: {exc}")
                    for name in cut_off:
                        (packages / name).unlink()
                publish(release_wheels, url, environ=ENV, echo=lambda line: None)
                held = {p.name: sha256_file(p) for p in packages.iterdir()}
                if held != want:
                    problems.append(f"after the rerun the index holds {sorted(held)}")
            except Exception as exc:  # noqa: BLE001
                problems.append(f"rerun failed: {type(exc).__name__}: {exc}")
            finally:
                _stop(proc)
            trials.append({"point": point, "delay_s": delay, "failed": message is not None,
                           "message": (message or "completed")[:400], "problems": problems,
                           "unacknowledged": unacknowledged, "cut_off": cut_off})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, unfaulted_s=round(duration, 4), trials=len(trials),
                  failed=sum(t["failed"] for t in trials),
                  unacknowledged=sum(bool(t["unacknowledged"]) for t in trials),
                  cut_off=sum(bool(t["cut_off"]) for t in trials), survived=len(trials) - len(lost), lost=len(lost),
                  seconds=round(time.monotonic() - t0, 2), detail=trials)
    assert not lost, lost[:3]


# ---- the publishing client killed mid-upload --------------------------------------------------------
UPLOAD = """
import json, sys
from pathlib import Path
from blackwheel.release.publish import publish
a = json.loads(sys.argv[1])
print("ready", flush=True)
publish([Path(w) for w in a["wheels"]], a["url"], environ=a["env"], echo=lambda line: None)
print(json.dumps({"published": True}))
"""


def test_kill_during_upload_leaves_the_index_whole(release_wheels, fault_results, tmp_path):
    """``publish`` (and its twine calls: its whole process group) killed at seeded points of an
    un-killed publish of 3 wheels, the server staying up. pypiserver writes an upload in place, so
    a client killed mid-upload can leave the part the server had received (``cut_off``, recorded):
    the rerun must name each such file, in one line, as a partial upload of that very wheel; once
    they are removed (what the error says to do) a rerun completes with all three."""
    case = "kill -9 during upload (the publishing client)"
    rng = random.Random(f"{fk.SEED}:{case}")
    want = {w.name: sha256_file(w) for w in release_wheels}
    (tmp_path / "packages").mkdir()
    proc, url = _serve(tmp_path, tmp_path / "packages")
    args = {"wheels": [str(w) for w in release_wheels], "url": url, "env": ENV}
    try:
        _, duration = fk.timed_run(UPLOAD, args)
        pts, trials, t0 = fk.points(rng), [], time.monotonic()
        for point in pts:
            for _ in range(PER_POINT):
                for f in (tmp_path / "packages").iterdir():   # the server serves the folder as it is
                    f.unlink()
                delay = round(point * duration, 4)
                killed = fk.kill_after(UPLOAD, args, delay)
                held = sorted(p.name for p in (tmp_path / "packages").iterdir())
                problems, cut_off = [], []
                try:
                    try:
                        publish(release_wheels, url, environ=ENV, echo=lambda line: None)
                    except PublishError as exc:   # the server may still be writing what the client sent
                        cut_off = re.findall(r"(\S+\.whl) on the index is a partial upload", str(exc))
                        if not cut_off or "\n" in str(exc):
                            raise
                        problems += _not_cut_offs(tmp_path / "packages", cut_off, release_wheels)
                        for name in cut_off:           # as the error says: remove it, then rerun
                            (tmp_path / "packages" / name).unlink()
                        publish(release_wheels, url, environ=ENV, echo=lambda line: None)
                    again = {p.name: sha256_file(p) for p in (tmp_path / "packages").iterdir()}
                    if again != want:
                        problems.append(f"after the rerun the index holds {sorted(again)}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"rerun failed: {type(exc).__name__}: {exc}")
                trials.append({"point": point, "delay_s": delay, "killed": killed, "held_after_kill": held,
                               "cut_off": cut_off, "problems": problems})
    finally:
        _stop(proc)
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, unkilled_s=round(duration, 4), trials=len(trials),
                  killed=sum(t["killed"] for t in trials), cut_off=sum(bool(t["cut_off"]) for t in trials),
                  survived=len(trials) - len(lost), lost=len(lost), seconds=round(time.monotonic() - t0, 2),
                  detail=trials)
    assert not lost, lost[:3]


def _not_cut_offs(packages: Path, names: list[str], wheels: list[Path]) -> list[str]:
    """Problems: a file named as a partial upload that is not a proper start of its wheel."""
    problems = []
    for name in names:
        wheel = next((w for w in wheels if w.name == name), None)
        data = (packages / name).read_bytes()
        if wheel is None or len(data) >= wheel.stat().st_size or not wheel.read_bytes().startswith(data):
            problems.append(f"{name} was named a partial upload but is not the start of the wheel")
    return problems


# ---- Redis killed mid-build -----------------------------------------------------------------------
SLOWDOWN_ALLOWED_S = 60   # beyond twice the un-faulted build; sccache alone waits 60 s per nvcc stage


@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
def test_redis_killed_mid_build(light_project, fault_results, tmp_path):
    """Points are fractions of the compile window: from the moment the build reports its sccache
    server up on Redis (its start-up check passed) to the end of an un-faulted build."""
    case = "Redis (sccache's store) killed during a real build"
    rng = random.Random(f"{fk.SEED}:{case}")

    def run(where: Path, point: float | None, window: float = 0.0) -> dict:
        redis, url = fk.start_redis(where / "redis")
        token = uuid.uuid4().hex
        build = fk.Build(fk.build_env(light_project, where, token, url))
        killed_at = None
        try:
            up = build.wait_line("compiler cache: redis")
            if point is not None and up is not None:
                try:
                    build.proc.wait(timeout=max(0.0, build.t0 + up + point * window - time.monotonic()))
                except subprocess.TimeoutExpired:
                    redis.kill()
                    killed_at = round(time.monotonic() - build.t0, 2)
            rc = build.finish()
        finally:
            _stop(redis)
        problems = [] if rc == 0 else [f"build failed ({rc}): {build.stderr.splitlines()[-1:]}"]
        if "Traceback" in build.stderr:
            problems.append("a traceback on stderr")
        gone = wait_until(30, lambda: not fk.token_processes(token))
        if not gone:
            problems.append(f"left running 30 s after the build: {fk.token_processes(token)}")
            fk.end_token_processes(token)
        more, wheel = fk.check_built(where / "wheelhouse")
        manifest = json.loads(wheel.with_name(wheel.name + ".manifest.json").read_text()) if wheel else {}
        cache = manifest.get("build", {}).get("cache") or {}
        return {"rc": rc, "up_s": up, "wall_s": round(build.wall_s, 2), "redis_killed_s": killed_at,
                "fell_back": cache.get("fell_back"), "cache_errors": cache.get("errors"),
                "problems": problems + more}

    reference = run(tmp_path / "reference", None)
    assert not reference["problems"] and reference["up_s"] is not None, reference
    window = reference["wall_s"] - reference["up_s"]
    allowed = round(2 * reference["wall_s"] + SLOWDOWN_ALLOWED_S, 1)
    trials, t0 = [], time.monotonic()
    for k in range(fk.BUILD_TRIALS):
        point = round(rng.random(), 4)
        trial = {"point": point, "delay_s": round(point * window, 2), **run(tmp_path / f"t{k}", point, window)}
        if trial["wall_s"] > allowed:
            trial["problems"].append(f"took {trial['wall_s']} s, over {allowed} s: held up by the dead store")
        trials.append(trial)
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=[t["point"] for t in trials], unfaulted_s=reference["wall_s"],
                  compile_window_s=round(window, 2), allowed_s=allowed, trials=len(trials),
                  redis_killed=sum(t["redis_killed_s"] is not None for t in trials),
                  fell_back=sum(bool(t["fell_back"]) for t in trials), survived=len(trials) - len(lost),
                  lost=len(lost), seconds=round(time.monotonic() - t0, 2), detail=trials)
    assert not lost, lost[:3]
