"""kill -9 at seeded points during fetch (mirror folder and source bundle: archive copy, bundle
unpack, git checkout), during patch application, during a real build's compile, and during wheel
placement plus static-index writing. After each kill nothing partial is visible, and a rerun
completes with the same verified bytes. (Upload: test_faults_services.py.)"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from blackwheel.sources.bundle import open_bundle
from blackwheel.core.fsutil import sha256_file, tree_sha256
from blackwheel.release.index import build_static_index
from blackwheel.release.provenance import provenance
from blackwheel.sources.fetch import Fetcher
from blackwheel.release.wheelhouse import place
from tests.conftest import needs_nvcc_and_torch, wait_until
from tests.faults import faultkit as fk

FETCH = """
import json, sys
from pathlib import Path
from blackwheel.core.fsutil import sha256_file, tree_sha256
from blackwheel.sources.fetch import Fetcher
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
from blackwheel.core.fsutil import sha256_file
from blackwheel.release.index import build_static_index
from blackwheel.release.wheelhouse import place
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
            more, after = fk.check_cache(cache)
            problems += more
            if after:   # the rerun's fetcher sweeps what the killed one left
                problems.append(f"temporaries left after the rerun: {after}")
            trials.append({"point": point, "delay_s": delay, "killed": killed, "problems": problems,
                           "leftovers": leftovers})
            shutil.rmtree(cache, ignore_errors=True)
    _record_kills(fault_results, case, pts, duration, trials, t0)


def _record_kills(fault_results, case: str, pts, duration: float, trials: list[dict], t0: float, **extra) -> None:
    """Record a kill case's trials; any trial with a problem is lost, and fails the test."""
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, unkilled_s=round(duration, 4), trials=len(trials),
                  killed=sum(t["killed"] for t in trials), survived=len(trials) - len(lost), lost=len(lost),
                  leftover_temporaries=sum(len(t["leftovers"]) for t in trials),
                  seconds=round(time.monotonic() - t0, 2), **extra, detail=trials)
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
            more, after = fk.check_wheelhouse(root)
            problems += more + fk.check_index(root / "index")
            if after:   # the rerun's placement and index sweep what the killed one left
                problems.append(f"temporaries left after the rerun: {after}")
            trials.append({"point": point, "delay_s": delay, "killed": killed, "visible_after_kill": visible,
                           "problems": problems, "leftovers": leftovers})
            shutil.rmtree(root, ignore_errors=True)
    _record_kills(fault_results, case, pts, duration, trials, t0)


def test_a_death_between_tree_and_record_leaves_no_tree_without_record(world, tmp_path, monkeypatch):
    """Found by the kill case above (mirror folder, point 0.7498): the tree was renamed into the cache
    before its record was written, so a kill between the two left a tree without record."""
    import blackwheel.sources.fetch as sources

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


# ---- patch application: prepare_tree of the generated extension (fetch, extract, patch) -------------
PREPARE = """
import json, sys, time
from pathlib import Path
import blackwheel.pipeline.build as b
from blackwheel.core.fsutil import tree_sha256
from blackwheel.core.recipe import load_recipe, load_stack
from blackwheel.sources.fetch import Fetcher
from blackwheel.core.targets import TARGETS
a = json.loads(sys.argv[1])
req = b.BuildRequest(load_recipe(a["package"]), load_stack("test"), TARGETS["gb10"],
                     fetcher=Fetcher(Path(a["cache"]), Path(a["mirror"]), offline=True))
real, took = b.apply_series, {}
def apply_series(*args, **kw):
    print("patching", flush=True)
    t = time.monotonic()
    out = real(*args, **kw)
    took["patch_s"] = time.monotonic() - t
    print("patched", flush=True)
    return out
b.apply_series = apply_series
print("ready", flush=True)
prepared = b.prepare_tree(req, Path(a["dest"]))
print(json.dumps({"tree": tree_sha256(prepared.tree), **took}))
"""


def _prepare_again(args: dict) -> str:
    """The tree a fresh prepare_tree gives (in this process: what the rerun of a build does first)."""
    from blackwheel.pipeline.build import BuildRequest, prepare_tree
    from blackwheel.core.recipe import load_recipe, load_stack
    from blackwheel.sources.fetch import Fetcher
    from blackwheel.core.targets import TARGETS

    req = BuildRequest(load_recipe(args["package"]), load_stack("test"), TARGETS["gb10"],
                       fetcher=Fetcher(Path(args["cache"]), Path(args["mirror"]), offline=True))
    return tree_sha256(prepare_tree(req, Path(args["dest"])).tree)


def test_kill_during_patch_leaves_nothing_partial_and_a_rerun_patches_once(light_project, fault_results, tmp_path,
                                                                         monkeypatch):
    """Points are fractions of the patch application (``apply_series``: git apply of the recipe's
    patch), timed from the driver's ``patching`` line: the tree a rerun prepares is the un-killed
    run's, so the patch is applied exactly once, to a fresh extraction."""
    from tests import cuda_ext

    case = "kill -9 during patch application"
    rng = random.Random(f"{fk.SEED}:{case}")
    monkeypatch.setenv("BLACKWHEEL_RECIPES", str(light_project.recipes))    # the drivers inherit it
    monkeypatch.setenv("BLACKWHEEL_PATCHES", str(light_project.patches))
    args = lambda where: {"package": cuda_ext.NAME, "cache": str(where / "cache"),  # noqa: E731
                          "mirror": str(light_project.mirror), "dest": str(where / "work" / "src")}
    reference = fk.finish(fk.start(PREPARE, args(tmp_path / "reference")))
    pts, trials, t0 = fk.points(rng), [], time.monotonic()
    for point in pts:
        for _ in range(fk.TRIALS):
            where = tmp_path / f"p{len(trials)}"
            proc = fk.start(PREPARE, args(where))
            seen = proc.stdout.readline().strip()       # "patching": git apply is about to start
            delay = round(point * reference["patch_s"], 4)
            try:
                proc.wait(timeout=delay)
                killed = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            out, _ = fk.rest_of_output(proc)
            during = killed and "patched" not in out
            problems, leftovers = fk.check_cache(where / "cache")
            if seen != "patching":
                problems.append(f"the driver said {seen!r} before patching")
            try:
                if _prepare_again(args(where)) != reference["tree"]:
                    problems.append("the rerun prepared another tree than the un-killed run")
            except Exception as exc:  # noqa: BLE001 - any failure of the rerun is a lost trial
                problems.append(f"rerun failed: {type(exc).__name__}: {exc}")
            problems += fk.check_cache(where / "cache")[0]
            trials.append({"point": point, "delay_s": delay, "killed": killed, "killed_while_patching": during,
                           "problems": problems, "leftovers": leftovers})
            shutil.rmtree(where, ignore_errors=True)
    _record_kills(fault_results, case, pts, reference["patch_s"], trials, t0,
                  killed_while_patching=sum(t["killed_while_patching"] for t in trials))


# ---- a real build's compile -------------------------------------------------------------------------
@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
def test_kill_during_compile_leaves_nothing_and_a_rerun_completes(light_project, fault_results, tmp_path):
    """``blackwheel build`` of the generated extension (cold local compile cache per trial), killed
    (its whole session) at a point of the compile window: from its ``building`` line to the end of
    an un-killed build. Then: nothing partial in the wheelhouse or the source cache; a rerun builds
    a wheel that verifies, from the cached sdist; and nothing the killed build left running (its
    sccache server and compiles live outside its session) outlives the rerun."""
    case = "kill -9 during compile (a real build)"
    rng = random.Random(f"{fk.SEED}:{case}")

    def build(where: Path, token: str) -> "fk.Build":
        return fk.Build(fk.build_env(light_project, where, token, f"file://{where / 'sccache'}"))

    ref = build(tmp_path / "reference", uuid.uuid4().hex)
    start = ref.wait_line("building ")
    assert ref.finish() == 0 and start is not None, ref.stderr
    window = ref.wall_s - start
    trials, t0 = [], time.monotonic()
    for k in range(fk.BUILD_TRIALS):
        point = round(rng.random(), 4)
        where, token, again_token = tmp_path / f"k{k}", uuid.uuid4().hex, uuid.uuid4().hex
        first = build(where, token)
        at = first.wait_line("building ")
        try:
            first.proc.wait(timeout=max(0.0, first.t0 + (at or 0) + point * window - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        killed = first.kill()
        first.finish()
        left_by_kill = sorted(set(fk.token_processes(token).values()))
        problems, leftovers = fk.check_wheelhouse(where / "wheelhouse")
        visible = sorted(p.name for p in (where / "wheelhouse").rglob("*.whl"))
        problems += fk.check_cache(where / "cache")[0]
        again = build(where, again_token)
        rc = again.finish()
        if rc != 0:
            problems.append(f"rerun failed ({rc}): {again.stderr.splitlines()[-1:]}")
        more, wheel = fk.check_built(where / "wheelhouse")
        problems += more + fk.check_cache(where / "cache")[0]
        manifest = json.loads(wheel.with_name(wheel.name + ".manifest.json").read_text()) if wheel else {}
        if wheel and manifest["sources"][0]["sha256"] != light_project.sha256:
            problems.append("the rerun built from other sdist bytes")
        for t, who in ((token, "the killed build"), (again_token, "the rerun")):
            if not wait_until(30, lambda: not fk.token_processes(t)):
                problems.append(f"{who} left running 30 s after the rerun: {fk.token_processes(t)}")
                fk.end_token_processes(t)
        trials.append({"point": point, "delay_s": round(point * window, 2), "killed": killed,
                       "visible_after_kill": visible, "left_running_by_kill": left_by_kill,
                       "rerun_wall_s": round(again.wall_s, 2),
                       "rerun_ended": next((l for l in again.stderr.splitlines() if l.startswith("ended ")), None),
                       "rerun_cache_hits": ((manifest.get("build") or {}).get("cache") or {}).get("hits"),
                       "problems": problems, "leftovers": leftovers})
        shutil.rmtree(where, ignore_errors=True)
    _record_kills(fault_results, case, [t["point"] for t in trials], ref.wall_s, trials, t0,
                  compile_window_s=round(window, 2),
                  left_running_by_kill=sum(bool(t["left_running_by_kill"]) for t in trials))
