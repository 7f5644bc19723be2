"""Tampering, at seeded places: a cached archive changed after download, a mirror whose pinned
commit was rewritten away, a patch that no longer applies, a manifest edited after the build.
A bundle whose pack or archive is altered: tests/test_bundle.py::test_a_tampered_bundle_is_refused."""

from __future__ import annotations

import json
import random
import shutil


from blackwheel.core.errors import MissingOffline, PatchError, PublishError, SourceError
from blackwheel.core.fsutil import sha256_file
from blackwheel.sources.patch import apply_series
from blackwheel.release.provenance import provenance
from blackwheel.core.recipe import Condition, PatchSpec
from blackwheel.sources.fetch import Fetcher
from blackwheel.release.wheelhouse import place
from tests import gitworld
from tests.faults import faultkit as fk

N = fk.TRIALS * fk.POINTS


def _record(fault_results, case, rng_seed, trials):
    lost = [t for t in trials if not t["caught"]]
    fault_results(case, seed=fk.SEED, rng=rng_seed, trials=len(trials), survived=len(trials) - len(lost),
                  lost=len(lost), detail=trials)
    assert not lost, lost[:3]


def test_cached_archive_changed_after_download_is_caught_on_reuse(world, fault_results, tmp_path, capsys):
    case = "tamper: cached archive changed after download"
    rng = random.Random(f"{fk.SEED}:{case}")
    fetcher = Fetcher(tmp_path / "cache", world["mirror"], offline=True)
    pin = world["sdist"].sha256
    trials = []
    for _ in range(N):
        cached = fetcher.fetch(world["sdist"])
        data = bytearray(cached.read_bytes())
        how = rng.choice(["flip", "truncate", "append"])
        at = rng.randrange(len(data))
        if how == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif how == "truncate":
            del data[at:]
        else:
            data += b"\0"
        cached.write_bytes(bytes(data))
        again = fetcher.fetch(world["sdist"])
        err = capsys.readouterr().err
        caught = sha256_file(again) == pin and "no longer matches" in err
        # without a mirror to fetch it from, the changed file is refused, never handed out
        cached.write_bytes(bytes(data))
        try:
            Fetcher(tmp_path / "cache", None, offline=True).fetch(world["sdist"])
            caught = False
        except MissingOffline:
            pass
        trials.append({"how": how, "offset": at, "caught": caught})
    _record(fault_results, case, f"{fk.SEED}:{case}", trials)


def test_mirror_whose_pinned_commit_was_rewritten_is_refused_naming_it(fault_results, tmp_path):
    case = "tamper: mirror repository rewritten (pinned commit gone)"
    rng = random.Random(f"{fk.SEED}:{case}")
    w = fk.make_world(tmp_path / "w")
    trials = []
    for i in range(N):
        which = rng.choice(["app", "lib"])        # lib: the pinned commit of app's submodule
        victim = w["mirror"] / "git" / "github.com" / "o" / f"{which}.git"
        saved = tmp_path / f"saved-{i}"
        shutil.move(victim, saved)
        other = gitworld.repo(tmp_path / f"other-{i}", which, {"README": f"another history {rng.random()}\n"})
        gitworld.git("clone", "-q", "--mirror", str(tmp_path / f"other-{i}" / f"work-{which}"), str(victim), cwd=tmp_path)
        commit = w["app_commit"] if which == "app" else w["lib_commit"]
        fetcher = Fetcher(tmp_path / f"cache-{i}", w["mirror"], offline=True)
        try:
            fetcher.fetch(w["app"])
            message, caught = "fetched", False
        except SourceError as exc:
            message, caught = str(exc), commit in str(exc)
        missing, _ = fetcher.check([w["app"]])
        caught = caught and any(commit in m for m in missing)
        caught = caught and not list((tmp_path / f"cache-{i}" / "sources" / "git").glob("[!.]*"))
        trials.append({"rewritten": which, "other_commit": other, "caught": caught, "message": message[:300]})
        shutil.rmtree(victim)
        shutil.move(saved, victim)
    _record(fault_results, case, f"{fk.SEED}:{case}", trials)


HEADER = """From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: blackwheel tests <tests@blackwheel.invalid>
Date: Wed, 25 Nov 2026 00:00:00 +0000
Subject: [PATCH] {subject}

Why: a reason.
Upstream: https://example.invalid/pr/1 (open)
Applies-when: always
---
"""


def _hunk(start: int) -> str:
    lines = [f" line {start + k}\n" for k in range(3)] + [f"-line {start + 3}\n", f"+line {start + 3} patched\n"] + \
        [f" line {start + 4 + k}\n" for k in range(3)]
    return f"@@ -{start},7 +{start},7 @@\n" + "".join(lines)


def test_patch_that_no_longer_applies_is_refused_naming_the_hunk(fault_results, tmp_path):
    case = "tamper: patch no longer applies (upstream moved)"
    rng = random.Random(f"{fk.SEED}:{case}")
    original = "".join(f"line {i}\n" for i in range(1, 61))
    starts = [5, 25, 45]
    folder = tmp_path / "patches" / "pkg" / "1.0"
    folder.mkdir(parents=True)
    patch = folder / "0001-three-hunks.patch"
    patch.write_text(HEADER.format(subject="three hunks") + "diff --git a/src/f.txt b/src/f.txt\n"
                     "--- a/src/f.txt\n+++ b/src/f.txt\n" + "".join(_hunk(s) for s in starts))
    specs = [PatchSpec(patch, Condition())]
    trials = []
    for i in range(N):
        tree = tmp_path / f"tree-{i}"
        (tree / "src").mkdir(parents=True)
        hunk_start = rng.choice(starts)
        line = hunk_start + rng.randrange(7)          # any line the hunk reads: context or removed
        (tree / "src" / "f.txt").write_text(original.replace(f"line {line}\n", f"line {line} moved upstream\n"))
        before = (tree / "src" / "f.txt").read_text()
        try:
            apply_series(specs, tree, check=True)
            message, caught = "applied", False
        except PatchError as exc:
            message = str(exc)
            caught = patch.name in message and f"@@ -{hunk_start},7 +{hunk_start},7 @@" in message \
                and "src/f.txt" in message
        caught = caught and (tree / "src" / "f.txt").read_text() == before
        trials.append({"hunk": hunk_start, "changed_line": line, "caught": caught, "message": message})
    _record(fault_results, case, f"{fk.SEED}:{case}", trials)


def test_manifest_edited_after_build_is_reported(fault_results, tmp_path):
    case = "tamper: manifest edited after build"
    rng = random.Random(f"{fk.SEED}:{case}")
    wheel = fk.make_wheel(tmp_path / "in", bulk=1 << 16)
    trials = []
    for i in range(N):
        root = tmp_path / f"wh-{i}"
        final = place(wheel, fk.manifest_for(wheel, "s", "t"), root, "s", "t")
        mpath = final.with_name(final.name + ".manifest.json")
        text = mpath.read_text()
        manifest = json.loads(text)
        how = rng.choice(["wheel_sha256", "truncate", "schema", "drop wheel_sha256"])
        if how == "wheel_sha256":
            manifest["wheel_sha256"] = "%064x" % rng.getrandbits(256)
            mpath.write_text(json.dumps(manifest))
        elif how == "truncate":
            mpath.write_text(text[: rng.randrange(1, len(text) - 1)])
        elif how == "schema":
            manifest["schema"] = "something/else"
            mpath.write_text(json.dumps(manifest))
        else:
            del manifest["wheel_sha256"]
            mpath.write_text(json.dumps(manifest))
        try:
            provenance(final)
            message, caught = "accepted", False
        except PublishError as exc:
            message, caught = str(exc), str(mpath) in str(exc) or mpath.name in str(exc)
            if how == "wheel_sha256":
                caught = caught and sha256_file(final) in message and manifest["wheel_sha256"] in message
        trials.append({"how": how, "caught": caught, "message": message[:300]})
    # A descriptive field edited consistently (a source's pin, the toolchain, the verify verdict...):
    # the seal (manifest_sha256, the hash of the manifest's canonical JSON without it) catches it.
    drng = random.Random(f"{fk.SEED}:{case} (descriptive fields)")
    desc = []
    for i in range(N):
        final = place(wheel, fk.manifest_for(wheel, "s", "t"), tmp_path / f"wh-desc-{i}", "s", "t")
        mpath = final.with_name(final.name + ".manifest.json")
        manifest = json.loads(mpath.read_text())
        how = drng.choice(["source sha256", "toolchain", "verify", "build_key", "re-indented"])
        if how == "source sha256":
            manifest["sources"][0]["sha256"] = "%064x" % drng.getrandbits(256)
        elif how == "toolchain":
            manifest["toolchain"]["nvcc"] = f"13.{drng.randrange(10)}.{drng.randrange(100)}x"
        elif how == "verify":
            manifest["verify"] = {"ok": True, "edited": drng.random()}
        elif how == "build_key":
            manifest["build_key"] = "%016x" % drng.getrandbits(64)
        mpath.write_text(json.dumps(manifest, indent=drng.choice([None, 1, 4])))   # layout alone is no edit
        try:
            report = provenance(final)
            message = "accepted"
            caught = how == "re-indented" and "manifest sealed" in report
        except PublishError as exc:
            message = str(exc)
            caught = how != "re-indented" and "edited after it was written" in message and str(mpath) in message \
                and "\n" not in message
        desc.append({"how": how, "caught": caught, "message": message[:300]})
    _record(fault_results, case + " (descriptive fields)", f"{fk.SEED}:{case} (descriptive fields)", desc)
    # a manifest written before the seal: reported as unsealed, not silently accepted
    final = place(wheel, fk.manifest_for(wheel, "s", "t"), tmp_path / "wh-old", "s", "t")
    mpath = final.with_name(final.name + ".manifest.json")
    manifest = json.loads(mpath.read_text())
    del manifest["manifest_sha256"]
    mpath.write_text(json.dumps(manifest))
    assert "manifest unsealed (written before manifests carried manifest_sha256" in provenance(final)
    _record(fault_results, case, f"{fk.SEED}:{case}", trials)
