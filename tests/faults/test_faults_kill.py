"""kill -9 at seeded points during fetch (mirror folder and source bundle: archive copy, bundle
unpack, git checkout) and during wheel placement plus static-index writing. After each kill nothing
partial is visible, and a rerun completes with the same verified bytes."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import pytest

from blackwheel.bundle import open_bundle
from blackwheel.fsutil import sha256_file, tree_sha256
from blackwheel.index import build_static_index
from blackwheel.provenance import provenance
from blackwheel.sources import Fetcher
from blackwheel.wheelhouse import place
from tests.faults import faultkit as fk

FETCH = """
import json, sys
from pathlib import Path
from blackwheel.fsutil import sha256_file, tree_sha256
from blackwheel.sources import Fetcher
from tests.faults.faultkit import source_from_json
a = json.loads(sys.argv[1])
fetcher = Fetcher(Path(a["cache"]), Path(a["mirror"]), offline=True)
sources = [source_from_json(d) for d in a["sources"]]
print("ready", flush=True)
out = {}
for src in sources:
    path = fetcher.fetch(src)
    out[src.name] = sha256_file(path) if path.is_file() else tree_sha256(path)
print(json.dumps(out))
"""

PLACE = """
import json, sys
from pathlib import Path
from blackwheel.fsutil import sha256_file
from blackwheel.index import build_static_index
from blackwheel.wheelhouse import place
a = json.loads(sys.argv[1])
print("ready", flush=True)
final = place(Path(a["wheel"]), a["manifest"], Path(a["root"]), a["stack"], a["target"])
report = build_static_index(Path(a["root"]))
print(json.dumps({"sha256": sha256_file(final), "indexed": sorted(w.filename for w in report.wheels)}))
"""


def _fetch_again(cache: Path, mirror: Path, sources) -> dict:
    open_bundle.cache_clear()          # a fresh process would not remember the bundle either
    fetcher = Fetcher(cache, mirror, offline=True)
    out = {}
    for src in sources:
        path = fetcher.fetch(src)
        out[src.name] = sha256_file(path) if path.is_file() else tree_sha256(path)
    return out


@pytest.mark.parametrize("via", ["mirror", "bundle"])
def test_kill_during_fetch_leaves_nothing_partial_and_a_rerun_completes(world, via, fault_results, tmp_path):
    case = f"kill -9 during fetch ({'mirror folder' if via == 'mirror' else 'bundle unpack'})"
    rng = random.Random(f"{fk.SEED}:{case}")
    mirror = world["mirror"] if via == "mirror" else world["bundle"]
    sources = [world["sdist"], world["app"]]
    args = lambda cache: {"cache": str(cache), "mirror": str(mirror),  # noqa: E731
                          "sources": [fk.source_json(s) for s in sources]}
    reference, duration = fk.timed_run(FETCH, args(tmp_path / "reference"))
    pts, trials, t0 = fk.points(rng), [], time.monotonic()
    for point in pts:
        for _ in range(fk.TRIALS):
            cache = tmp_path / f"c{len(trials)}"
            delay = round(point * duration, 4)
            killed = fk.kill_after(FETCH, args(cache), delay)
            problems, leftovers = fk.check_cache(cache)
            try:
                again = _fetch_again(cache, mirror, sources)
                if again != reference:
                    problems.append(f"rerun gave {again}, the un-killed run {reference}")
            except Exception as exc:  # noqa: BLE001 - any failure of the rerun is a lost trial
                problems.append(f"rerun failed: {type(exc).__name__}: {exc}")
            problems += fk.check_cache(cache)[0]
            trials.append({"point": point, "delay_s": delay, "killed": killed, "problems": problems,
                           "leftovers": leftovers})
            shutil.rmtree(cache, ignore_errors=True)
    _record_kills(fault_results, case, pts, duration, trials, t0)


def _record_kills(fault_results, case: str, pts, duration: float, trials: list[dict], t0: float) -> None:
    """Record a kill case's trials; any trial with a problem is lost, and fails the test."""
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, unkilled_s=round(duration, 4), trials=len(trials),
                  killed=sum(t["killed"] for t in trials), survived=len(trials) - len(lost), lost=len(lost),
                  leftover_temporaries=sum(len(t["leftovers"]) for t in trials),
                  seconds=round(time.monotonic() - t0, 2), detail=trials)
    assert not lost, lost[:3]


@pytest.fixture(scope="module")
def wheelhouse_before(tmp_path_factory):
    """A wheelhouse already holding another wheel and its index; and the wheel to place next."""
    work = tmp_path_factory.mktemp("wh")
    other = fk.make_wheel(work / "in", "bw_other", bulk=1 << 20)
    root = work / "before"
    place(other, fk.manifest_for(other, "cu130-torch2.11", "gb10"), root, "cu130-torch2.11", "gb10")
    build_static_index(root)
    new = fk.make_wheel(work / "in", "bw_fault", value=7)
    return root, new


def test_kill_during_place_and_index_leaves_whole_or_nothing(wheelhouse_before, fault_results, tmp_path):
    case = "kill -9 during wheel placement and index writing"
    rng = random.Random(f"{fk.SEED}:{case}")
    before, wheel = wheelhouse_before
    stack, target = "cu130-torch2.11", "sm90"
    manifest = fk.manifest_for(wheel, stack, target)
    args = lambda root: {"wheel": str(wheel), "manifest": manifest, "root": str(root),  # noqa: E731
                         "stack": stack, "target": target}
    ref_root = tmp_path / "reference"
    shutil.copytree(before, ref_root)
    reference, duration = fk.timed_run(PLACE, args(ref_root))
    assert reference["sha256"] == sha256_file(wheel)
    pts, trials, t0 = fk.points(rng), [], time.monotonic()
    for point in pts:
        for _ in range(fk.TRIALS):
            root = tmp_path / f"w{len(trials)}"
            shutil.copytree(before, root)
            delay = round(point * duration, 4)
            killed = fk.kill_after(PLACE, args(root), delay)
            problems, leftovers = fk.check_wheelhouse(root)
            problems += fk.check_index(root / "index")
            visible = sorted(p.name for p in root.glob("*/*/*.whl") if p.parts[-3] != "index")
            try:
                final = place(wheel, manifest, root, stack, target)
                report = build_static_index(root)
                if sorted(w.filename for w in report.wheels) != reference["indexed"]:
                    problems.append(f"rerun indexed {[w.filename for w in report.wheels]}")
                if sha256_file(final) != reference["sha256"]:
                    problems.append("rerun placed other bytes")
                provenance(final)                 # refuses a manifest describing other bytes
            except Exception as exc:  # noqa: BLE001
                problems.append(f"rerun failed: {type(exc).__name__}: {exc}")
            more, _ = fk.check_wheelhouse(root)
            problems += more + fk.check_index(root / "index")
            trials.append({"point": point, "delay_s": delay, "killed": killed, "visible_after_kill": visible,
                           "problems": problems, "leftovers": leftovers})
            shutil.rmtree(root, ignore_errors=True)
    _record_kills(fault_results, case, pts, duration, trials, t0)


def test_a_death_between_tree_and_record_leaves_no_tree_without_record(world, tmp_path, monkeypatch):
    """Found by the kill case above (mirror folder, point 0.7498): the tree was renamed into the cache
    before its record was written, so a kill between the two left a tree without record."""
    import blackwheel.sources as sources

    def dies(path, obj):
        raise KeyboardInterrupt("killed while writing the record")
    monkeypatch.setattr(sources, "atomic_write_json", dies)
    fetcher = Fetcher(tmp_path / "cache", world["mirror"], offline=True)
    with pytest.raises(KeyboardInterrupt):
        fetcher.fetch(world["app"])
    assert fk.check_cache(tmp_path / "cache")[0] == []
    monkeypatch.undo()
    tree = fetcher.fetch(world["app"])
    assert fk.check_cache(tmp_path / "cache")[0] == [] and fetcher.record(world["app"])["tree_sha256"] == tree_sha256(tree)
