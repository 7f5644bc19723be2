"""Git pins and source bundles on real (small) git repositories made here: commit pins with the
tree hash computed, submodules, content deduplication, tampering, absent contents, optional
resources. About 2-3 s in all."""

from __future__ import annotations

import json
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from blackwheel.sources.bundle import open_bundle, write_bundle
from blackwheel.core.errors import HashMismatch, MissingOffline, SourceError
from blackwheel.core.fsutil import sha256_file, tree_sha256
from blackwheel.sources.fetch import Fetcher

from tests.gitworld import git, make_world


@pytest.fixture
def world(tmp_path):
    """A mirror with ``o/lib`` and ``o/app`` (lib as app's submodule), an sdist, and their pins."""
    return make_world(tmp_path)


def test_commit_pin_without_tree_hash_is_fetched_and_its_tree_hash_recorded(world):
    fetcher = Fetcher(world["tmp"] / "cache", world["mirror"], offline=True)
    tree = fetcher.fetch(world["app"])
    assert (tree / "third_party/lib/lib.h").read_text() == "int lib;\n"
    assert (tree / "src/app.c").read_text() == "int main(void){return 0;}\n"     # the pinned commit
    assert not list(tree.rglob(".git"))
    record = fetcher.record(world["app"])
    assert record["tree_sha256"] == tree_sha256(tree) and record["tree_sha256_from"] == "computed at fetch"
    assert record["commit"] == world["app_commit"] and record["submodules"] == ["third_party/lib"]
    # with the tree hash recorded in the recipe it is checked: right passes, wrong is refused
    assert fetcher.fetch(replace(world["app"], sha256=record["tree_sha256"])) == tree
    with pytest.raises(HashMismatch, match=record["tree_sha256"]):
        fetcher.fetch(replace(world["app"], sha256="7" * 64))


def test_a_commit_the_stores_lack_is_refused_naming_it(world):
    fetcher = Fetcher(world["tmp"] / "cache", world["mirror"], offline=True)
    with pytest.raises(MissingOffline, match="github.com/o/app"):
        fetcher.fetch(replace(world["app"], commit="e" * 40))
    missing, notes = fetcher.check([world["sdist"], replace(world["lib"], commit="e" * 40), world["extra"]])
    assert len(missing) == 1 and "e" * 40 in missing[0] and not notes[0].startswith("missing")
    assert notes == [f"optional extra: {world['extra'].label}: no pin in the recipe (unpinned: upstream pins a "
                     "tag); without it the wheel lacks extra"]


def test_check_looks_at_submodules_and_contents_not_only_folders(world):
    fetcher = Fetcher(world["tmp"] / "cache", world["mirror"], offline=True)
    assert fetcher.check([world["sdist"], world["app"], world["lib"]]) == ([], [])
    lib_repo = world["mirror"] / "git/github.com/o/lib.git"
    _drop_blob(lib_repo, world["lib_commit"], "lib.h")
    missing, _ = fetcher.check([world["app"]])
    assert len(missing) == 1 and "submodule third_party/lib" in missing[0] and "lib.h" in missing[0]
    with pytest.raises(SourceError, match="lacks the contents of 1 file"):
        fetcher.fetch(world["app"])
    # allowed, the tree is fetched without the file and the record names it
    allowing = replace(fetcher, allow_absent=True)
    assert allowing.check([world["app"]]) == ([], [])
    tree = allowing.fetch(world["app"])
    assert not (tree / "third_party/lib/lib.h").exists()
    assert allowing.record(world["app"])["absent"] == ["third_party/lib/lib.h"]


def _drop_blob(repo: Path, commit: str, path: str) -> None:
    """Rewrite ``repo`` without the contents of ``path`` at ``commit`` (as a snapshot that skips files)."""
    blob = git("--git-dir", str(repo), "rev-parse", f"{commit}:{path}", cwd=repo)
    git("--git-dir", str(repo), "repack", "-a", "-d", "-q", cwd=repo)
    keep = [o for o in git("--git-dir", str(repo), "cat-file", "--batch-all-objects", "--batch-check=%(objectname)",
                           cwd=repo).split() if o != blob]
    fresh = repo.parent / f"{repo.name}-pack"
    fresh.mkdir()
    subprocess.run(["git", "--git-dir", str(repo), "pack-objects", "-q", str(fresh / "pack")],
                   input="\n".join(keep) + "\n", text=True, check=True, capture_output=True)
    for f in (repo / "objects" / "pack").iterdir():
        f.unlink()
    for f in fresh.iterdir():
        f.rename(repo / "objects" / "pack" / f.name)
    fresh.rmdir()


def test_bundle_builds_offline_alone_and_verifies_every_pin(world):
    sources = [world["sdist"], world["app"], world["lib"], world["extra"]]
    online_like = Fetcher(world["tmp"] / "cache-a", world["mirror"], offline=True)
    out = world["tmp"] / "stack.bwb"
    summary = write_bundle(sources, online_like, out, {"stack": "s", "target": "gb10"})
    assert summary["sources"] == 3 and summary["notes"] and "extra" in summary["notes"][0]
    assert not list(out.parent.glob(".stack.bwb*"))                  # written atomically
    # a new cache, no mirror folder: the bundle alone
    offline = Fetcher(world["tmp"] / "cache-b", out, offline=True)
    assert offline.check(sources[:3]) == ([], [])
    a = offline.fetch(world["app"])
    assert tree_sha256(a) == tree_sha256(online_like.fetch(world["app"]))
    assert sha256_file(offline.fetch(world["sdist"])) == world["sdist"].sha256
    assert offline.fetch_optional(world["extra"])[0] is None
    meta = json.loads((open_bundle(out, world["tmp"] / "cache-b").root / "bundle.json").read_text())
    assert meta["stack"] == "s" and sorted(meta["commits"]) == sorted({world["app_commit"], world["lib_commit"]})


def test_bundle_stores_shared_contents_once(world):
    out = world["tmp"] / "b.bwb"
    write_bundle([world["app"], world["lib"]], Fetcher(world["tmp"] / "c", world["mirror"], offline=True), out, {})
    with tarfile.open(out) as tar:
        pack = tar.extractfile("git/objects.pack").read()
    store = world["tmp"] / "count.git"
    git("init", "-q", "--bare", str(store), cwd=world["tmp"])
    subprocess.run(["git", "--git-dir", str(store), "index-pack", "--stdin"], input=pack, check=True,
                   capture_output=True)
    blobs = git("--git-dir", str(store), "cat-file", "--batch-all-objects", "--batch-check=%(objecttype)",
                cwd=world["tmp"]).split().count("blob")
    # lib (big.h, lib.h) + app (app.c, big.h again, .gitmodules): the shared header once
    assert blobs == 4


@pytest.mark.parametrize("member", ["git/objects.pack", "archives"])
def test_a_tampered_bundle_is_refused(world, member):
    out = world["tmp"] / "t.bwb"
    write_bundle([world["sdist"], world["app"]], Fetcher(world["tmp"] / "c", world["mirror"], offline=True), out, {})
    with tarfile.open(out) as tar:
        names = {m.name: m for m in tar.getmembers()}
        victim = next(m for n, m in names.items() if n.startswith(member))
        offset = victim.offset_data + victim.size // 2
    data = bytearray(out.read_bytes())
    data[offset] ^= 0xFF
    out.write_bytes(bytes(data))
    with pytest.raises((HashMismatch, SourceError)):
        Fetcher(world["tmp"] / "fresh", out, offline=True).fetch(world["app"] if "git" in member else world["sdist"])
    assert not list((world["tmp"] / "fresh" / "bundles").glob("[!.]*"))    # nothing half-unpacked kept


def test_a_bundle_carries_declared_absences_and_nothing_else(world):
    _drop_blob(world["mirror"] / "git/github.com/o/lib.git", world["lib_commit"], "lib.h")
    writer = Fetcher(world["tmp"] / "c", world["mirror"], offline=True)
    with pytest.raises(SourceError, match="lib.h"):
        write_bundle([world["lib"]], writer, world["tmp"] / "x.bwb", {})
    out = world["tmp"] / "y.bwb"
    write_bundle([world["lib"]], replace(writer, allow_absent=True), out, {})
    reader = Fetcher(world["tmp"] / "r", out, offline=True)          # no --allow-absent needed
    tree = reader.fetch(world["lib"])
    assert (tree / "include/big.h").is_file() and not (tree / "lib.h").exists()
    assert reader.record(world["lib"])["absent"] == ["lib.h"]


def test_a_cached_archive_changed_after_download_is_fetched_again(world, capsys):
    fetcher = Fetcher(world["tmp"] / "cache", world["mirror"], offline=True)
    first = fetcher.fetch(world["sdist"])
    first.write_bytes(b"tampered")
    again = fetcher.fetch(world["sdist"])
    assert sha256_file(again) == world["sdist"].sha256
    assert "no longer matches" in capsys.readouterr().err
