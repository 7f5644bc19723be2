"""Races: two processes fetching the same git pin into one empty cache at once; two publishes of the
same version with different bytes into one wheelhouse's static index at once."""

from __future__ import annotations

import random
import time

from blackwheel.fsutil import sha256_file
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
from blackwheel.errors import PublishError
from blackwheel.index import build_static_index
from blackwheel.wheelhouse import place
a = json.loads(sys.argv[1])
print("ready", flush=True)
place(Path(a["wheel"]), a["manifest"], Path(a["root"]), a["stack"], a["target"])
try:
    report = build_static_index(Path(a["root"]))
    print(json.dumps({"won": True, "indexed": [w.sha256 for w in report.wheels]}))
except PublishError as exc:
    print(json.dumps({"won": False, "message": str(exc)}))
"""


def test_two_publishes_of_one_version_with_different_bytes(fault_results, tmp_path):
    """Safety is asserted: never two winners, every refusal names both hashes, the index is whole and
    serves one of the two. Whether exactly one wins is recorded (``none_won``): the static index is
    rebuilt from the whole wheelhouse, so when both wheels are placed before either index is written,
    both are refused."""
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
        problems, results = [], []
        for k, (rc, out, err) in enumerate(outs):
            if rc != 0:
                problems.append(f"process {k} crashed: {err[-300:]}")
                continue
            import json
            results.append(json.loads(out.strip().splitlines()[-1]))
        winners = [r for r in results if r["won"]]
        if len(winners) > 1:
            problems.append("both won")
        for r in results:
            if not r["won"] and not all(s in r["message"] for s in shas):
                problems.append(f"a refusal that does not name both hashes: {r['message'][:200]}")
        problems += fk.check_index(root / "index")
        served = sorted(p.name for p in (root / "index" / "files").glob("*.whl")) if (root / "index").exists() else []
        if winners and (len(served) != 1 or sha256_file(root / "index" / "files" / served[0]) not in shas):
            problems.append(f"index serves {served}")
        trials.append({"stagger_s": stagger, "winners": len(winners), "problems": problems})
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, trials=len(trials), survived=len(trials) - len(lost), lost=len(lost),
                  one_won=sum(t["winners"] == 1 for t in trials), none_won=sum(t["winners"] == 0 for t in trials),
                  hashes=shas, detail=trials)
    assert not lost, lost[:3]
