"""Services going down at seeded points: the index server (a real pypiserver) killed during a
publish of several wheels. publish.py promises (its docstring): one file per twine call, so a
failure midway says exactly which files of that package version are up and which are not, and a
rerun skips the ones already there. Checked: the error is one line and names exactly what the
server holds; the server holds no partial file; a rerun against the restarted server completes.
(Redis down mid-build: tests/test_ccache.py::test_a_down_redis_falls_back_to_local_without_leaking_a_server.)"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from blackwheel.errors import PublishError
from blackwheel.fsutil import sha256_file
from blackwheel.publish import publish
from blackwheel.wheelhouse import place
from tests import indexserver as h
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
            for name, digest in held.items():
                if want.get(name) != digest:
                    problems.append(f"the index holds {name} with other bytes (partial upload)")
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
                           "unacknowledged": unacknowledged})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, unfaulted_s=round(duration, 4), trials=len(trials),
                  failed=sum(t["failed"] for t in trials),
                  unacknowledged=sum(bool(t["unacknowledged"]) for t in trials), survived=len(trials) - len(lost), lost=len(lost),
                  seconds=round(time.monotonic() - t0, 2), detail=trials)
    assert not lost, lost[:3]
