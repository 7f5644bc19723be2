"""Races: two processes fetching the same git pin into one empty cache at once; two publishes of the
same version with different bytes into one wheelhouse's static index at once; two real builds of
one package, stack and target at once (one workdir, one wheelhouse, as two terminals would)."""

from __future__ import annotations

import random
import subprocess
import threading
import time
import uuid

import pytest

from blackwheel.core.fsutil import sha256_file
from blackwheel.release.wheelhouse import place
from tests.conftest import needs_nvcc_and_torch, wait_until
from tests.faults import faultkit as fk
from tests.faults.test_faults_kill import FETCH

N = fk.TRIALS * fk.POINTS


def _pair(code: str, args: list[dict], stagger: float):
    first = fk.start(code, args[0])
    time.sleep(stagger)
    second = fk.start(code, args[1])
    outs = []
    for proc in (first, second):
        out, err = fk.rest_of_output(proc)
        outs.append((proc.returncode, out, err))
    return outs


def test_two_fetches_of_one_pin_into_one_empty_cache(world, fault_results, tmp_path):
    case = "race: two fetches of one git pin into one empty cache"
    rng = random.Random(f"{fk.SEED}:{case}")
    trials = []
    for i in range(N):
        via = rng.choice(["mirror", "bundle"])
        stagger = round(rng.uniform(0, 0.05), 4)
        cache = tmp_path / f"c{i}"
        args = {"cache": str(cache), "mirror": str(world[via]), "sources": [fk.source_json(world["app"])]}
        outs = _pair(FETCH, [args, args], stagger)
        problems = [f"process {k} failed: {err[-300:]}" for k, (rc, _, err) in enumerate(outs) if rc != 0]
        hashes = {out.strip().splitlines()[-1] for rc, out, _ in outs if rc == 0}
        if len(hashes) > 1:
            problems.append(f"different trees: {hashes}")
        problems += fk.check_cache(cache)[0]
        trials.append({"via": via, "stagger_s": stagger, "problems": problems})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, trials=len(trials), survived=len(trials) - len(lost), lost=len(lost),
                  detail=trials)
    assert not lost, lost[:3]


PUBLISH = """
import json, sys
from pathlib import Path
from blackwheel.core.errors import PublishError
from blackwheel.release.index import build_static_index
from blackwheel.release.wheelhouse import place
a = json.loads(sys.argv[1])
print("ready", flush=True)
try:
    place(Path(a["wheel"]), a["manifest"], Path(a["root"]), a["stack"], a["target"])
    report = build_static_index(Path(a["root"]))
    print(json.dumps({"won": True, "indexed": [w.sha256 for w in report.wheels]}))
except PublishError as exc:
    print(json.dumps({"won": False, "message": str(exc)}))
"""


def test_two_publishes_of_one_version_with_different_bytes(fault_results, tmp_path):
    """Exactly one wins: the wheelhouse takes one set of bytes per file name (the second placement is
    refused under the wheelhouse lock, naming both hashes), so the index always has one to serve. The
    index is whole and serves the winner's bytes."""
    case = "race: two publishes of one version, different bytes, one static index"
    rng = random.Random(f"{fk.SEED}:{case}")
    wheels = [fk.make_wheel(tmp_path / f"in{v}", value=v, bulk=1 << 20) for v in (1, 2)]
    shas = [sha256_file(w) for w in wheels]
    trials = []
    for i in range(N):
        root = tmp_path / f"wh{i}"
        stagger = round(rng.uniform(0, 0.3), 4)
        args = [{"wheel": str(w), "manifest": fk.manifest_for(w, f"stack{k}", "gb10"), "root": str(root),
                 "stack": f"stack{k}", "target": "gb10"} for k, w in enumerate(wheels)]
        outs = _pair(PUBLISH, args, stagger)
        problems, results = [], {}
        for k, (rc, out, err) in enumerate(outs):
            if rc != 0:
                problems.append(f"process {k} crashed: {err[-300:]}")
                continue
            import json
            results[k] = json.loads(out.strip().splitlines()[-1])
        winners = [k for k, r in results.items() if r["won"]]
        if len(winners) != 1:
            problems.append(f"{len(winners)} won")
        for r in results.values():
            if not r["won"] and not all(s in r["message"] for s in shas):
                problems.append(f"a refusal that does not name both hashes: {r['message'][:200]}")
        problems += fk.check_index(root / "index")
        served = sorted(p.name for p in (root / "index" / "files").glob("*.whl")) if (root / "index").exists() else []
        if len(winners) == 1 and [sha256_file(root / "index" / "files" / n) for n in served] != [shas[winners[0]]]:
            problems.append(f"index serves {served}, not the winner's bytes")
        trials.append({"stagger_s": stagger, "winners": len(winners), "problems": problems})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, trials=len(trials), survived=len(trials) - len(lost), lost=len(lost),
                  one_won=sum(t["winners"] == 1 for t in trials), none_won=sum(t["winners"] == 0 for t in trials),
                  hashes=shas, detail=trials)
    assert not lost, lost[:3]


@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
def test_two_builds_of_one_package_stack_and_target_at_once(light_project, fault_results, tmp_path):
    """Expected: one builds, the other waits for it and reuses its wheel (the build key matches);
    both name the same wheel; the wheelhouse holds it once, with its manifest."""
    case = "race: two builds of one package, stack and target at once"
    rng = random.Random(f"{fk.SEED}:{case}")
    store = f"file://{tmp_path / 'sccache'}"    # one local compile cache for every trial, as on one machine
    trials, t0 = [], time.monotonic()
    for i in range(fk.BUILD_TRIALS):
        stagger = round(rng.uniform(0, 2.0), 4)
        token = uuid.uuid4().hex
        env = fk.build_env(light_project, tmp_path / f"r{i}", token, store)
        first = fk.Build(env)
        try:
            first.proc.wait(timeout=stagger)
        except subprocess.TimeoutExpired:   # still running: the usual case
            pass
        second = fk.Build(env)
        builds = [first, second]
        rcs = [b.finish() for b in builds]
        problems = [f"build {k} failed ({rc}): {b.stderr.splitlines()[-1:]}" for k, (rc, b) in
                    enumerate(zip(rcs, builds)) if rc != 0]
        built = [k for k, b in enumerate(builds) if "\nbuilt " in "\n" + b.stderr]
        reused = [k for k, b in enumerate(builds) if "\nreused " in "\n" + b.stderr]
        waited = [k for k, b in enumerate(builds) if "waiting for another build" in b.stderr]
        if (len(built), len(reused)) != (1, 1):
            problems.append(f"built by {built}, reused by {reused}: expected one each")
        if len({b.stdout.strip() for b in builds}) != 1:
            problems.append(f"they name different wheels: {[b.stdout.strip() for b in builds]}")
        more, _ = fk.check_built(tmp_path / f"r{i}" / "wheelhouse")
        problems += more
        if not wait_until(30, lambda: not fk.token_processes(token)):
            problems.append(f"left running: {fk.token_processes(token)}")
            fk.end_token_processes(token)
        trials.append({"stagger_s": stagger, "built_by": built, "reused_by": reused, "waited": waited,
                       "wall_s": [round(b.wall_s, 2) for b in builds], "problems": problems})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, trials=len(trials), survived=len(trials) - len(lost), lost=len(lost),
                  one_built_one_reused=sum(len(t["built_by"]) == 1 and len(t["reused_by"]) == 1 for t in trials),
                  waited=sum(bool(t["waited"]) for t in trials), seconds=round(time.monotonic() - t0, 2),
                  detail=trials)
    assert not lost, lost[:3]


def test_placements_into_one_folder_take_turns(tmp_path):
    """Two builds in different workdirs that share a wheelhouse both place: the manifest beside a wheel
    must be the one written with it, so a placement waits while another holds the wheelhouse."""
    from blackwheel.core.fsutil import flocked

    wheel = fk.make_wheel(tmp_path / "in", bulk=1 << 10)
    done = threading.Event()
    with flocked(tmp_path / "wh"):
        placing = threading.Thread(target=lambda: (place(wheel, fk.manifest_for(wheel, "s", "gb10"), tmp_path / "wh",
                                                         "s", "gb10"), done.set()))
        placing.start()
        assert not done.wait(1.0), "placed while another placement held the wheelhouse"
    placing.join(timeout=30)
    assert done.is_set() and fk.check_wheelhouse(tmp_path / "wh") == ([], [])
