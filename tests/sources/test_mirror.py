"""The git mirror: seeding from local snapshots, finding what it lacks, checking trees out of it.

Real git on tiny repositories made here (a library with a submodule); about 1-2 s in all.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from blackwheel.core.errors import MissingOffline, UsageError
from blackwheel.sources.mirror import (checkout, find_repo, lacking, missing_resources, repo_path,
                               seed_mirror, submodules_at)
from blackwheel.sources.fetch import Source, tree_sha256

LIB_URL = "https://github.com/acme/lib"
APP_URL = "https://github.com/acme/app.git"
GIT_ENV = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "protocol.file.allow=always"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *GIT_ENV, *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture()
def snapshots(tmp_path):
    """Two bare snapshots: ``lib`` and ``app``, whose ``third_party/lib`` is lib at its first commit."""
    lib = tmp_path / "work-lib"
    lib.mkdir()
    git(lib, "init", "-q")
    (lib / "lib.h").write_text("int v1;\n")
    git(lib, "add", ".")
    git(lib, "commit", "-qm", "one")
    lib_commit = git(lib, "rev-parse", "HEAD")
    (lib / "lib.h").write_text("int v2;\n")
    git(lib, "commit", "-qam", "two")
    app = tmp_path / "work-app"
    app.mkdir()
    git(app, "init", "-q")
    (app / "run.sh").write_text("#!/bin/sh\n")
    (app / "run.sh").chmod(0o755)
    (app / ".gitmodules").write_text(f'[submodule "lib"]\n\tpath = third_party/lib\n\turl = {LIB_URL}\n')
    git(app, "add", ".")
    git(app, "update-index", "--add", "--cacheinfo", f"160000,{lib_commit},third_party/lib")
    git(app, "commit", "-qm", "app")
    app_commit = git(app, "rev-parse", "HEAD")
    snaps = {}
    for name, work in (("lib", lib), ("app", app)):
        bare = tmp_path / f"snap-{name}.git"
        git(tmp_path, "clone", "-q", "--bare", str(work), str(bare))
        snaps[name] = bare
    return {"lib": snaps["lib"], "app": snaps["app"], "lib_commit": lib_commit, "app_commit": app_commit}


def test_repo_path_follows_upstream_names():
    assert repo_path("/m", APP_URL) == Path("/m/git/github.com/acme/app.git")
    assert repo_path("/m", LIB_URL) == Path("/m/git/github.com/acme/lib.git")
    with pytest.raises(UsageError):
        repo_path("/m", "https://github.com/only-owner")


def test_seed_then_lookup_is_case_insensitive(tmp_path, snapshots):
    mirror = tmp_path / "mirror"
    made = seed_mirror(mirror, {LIB_URL: snapshots["lib"]})
    assert made == [mirror / "git/github.com/acme/lib.git"]
    assert find_repo(mirror, "https://github.com/ACME/Lib.git") == made[0]
    assert seed_mirror(mirror, {LIB_URL: snapshots["lib"]}) == []          # already there
    assert not list((mirror / "git/github.com/acme").glob(".*"))            # no temporary left


def test_seed_refuses_a_missing_snapshot(tmp_path):
    with pytest.raises(UsageError, match="snapshot"):
        seed_mirror(tmp_path / "m", {LIB_URL: tmp_path / "nope"})


def test_lacking_names_repo_commit_and_submodule(tmp_path, snapshots):
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {APP_URL: snapshots["app"]})
    assert submodules_at(find_repo(mirror, APP_URL), snapshots["app_commit"]) == {
        "third_party/lib": (LIB_URL, snapshots["lib_commit"])}
    # without submodules the app alone is enough; with them the lib repo is missing
    assert lacking(mirror, APP_URL, snapshots["app_commit"]) == []
    assert "third_party/lib" in lacking(mirror, APP_URL, snapshots["app_commit"], True)[0]
    assert "commit" in lacking(mirror, APP_URL, "0" * 40)[0]
    assert "no repository" in lacking(mirror, "https://github.com/acme/other", "0" * 40)[0]
    seed_mirror(mirror, {LIB_URL: snapshots["lib"]})
    assert lacking(mirror, APP_URL, snapshots["app_commit"], ["third_party/lib"]) == []


def test_missing_resources_reads_sources(tmp_path, snapshots):
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {APP_URL: snapshots["app"]})
    srcs = [Source("app", "git", "x" * 64, url=APP_URL, commit=snapshots["app_commit"], submodules=True),
            Source("sdist", "pypi", "y" * 64, pypi="app", version="1")]
    out = missing_resources(mirror, srcs)
    assert len(out) == 1 and out[0].startswith("app: ") and "third_party/lib" in out[0]


def test_checkout_with_submodule_hashes_like_a_plain_tree(tmp_path, snapshots):
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {APP_URL: snapshots["app"], LIB_URL: snapshots["lib"]})
    tree = checkout(mirror, APP_URL, snapshots["app_commit"], tmp_path / "tree", submodules=True)
    assert (tree / "third_party/lib/lib.h").read_text() == "int v1;\n"     # the recorded commit
    # the same files laid out by hand give the same hash: .git folders and git itself don't count
    plain = tmp_path / "plain"
    (plain / "third_party/lib").mkdir(parents=True)
    (plain / "run.sh").write_text("#!/bin/sh\n")
    (plain / "run.sh").chmod(0o755)
    (plain / "third_party/lib/lib.h").write_text("int v1;\n")
    (plain / ".gitmodules").write_bytes((tree / ".gitmodules").read_bytes())
    assert tree_sha256(tree) == tree_sha256(plain)


def test_checkout_refuses_when_the_mirror_lacks_a_submodule(tmp_path, snapshots):
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {APP_URL: snapshots["app"]})
    with pytest.raises(MissingOffline, match="third_party/lib"):
        checkout(mirror, APP_URL, snapshots["app_commit"], tmp_path / "tree", submodules=True)


def test_pin_tree_sha256_matches_a_checkout(tmp_path, snapshots):
    from blackwheel.sources.mirror import pin_tree_sha256
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {APP_URL: snapshots["app"], LIB_URL: snapshots["lib"]})
    with_sub = pin_tree_sha256(mirror, APP_URL, snapshots["app_commit"], True)
    without = pin_tree_sha256(mirror, APP_URL, snapshots["app_commit"], False)
    tree = checkout(mirror, APP_URL, snapshots["app_commit"], tmp_path / "t", submodules=True)
    assert with_sub == tree_sha256(tree) != without


def test_snapshots_in_reads_owner_plus_name(tmp_path):
    from blackwheel.sources.mirror import snapshots_in
    (tmp_path / "NVIDIA+cutlass" / "repo").mkdir(parents=True)
    (tmp_path / "stray").mkdir()
    assert snapshots_in(tmp_path) == {"https://github.com/NVIDIA/cutlass": tmp_path / "NVIDIA+cutlass/repo"}


def test_a_snapshot_lacking_a_file_is_reported_not_checked_out(tmp_path, snapshots):
    """Snapshots may list big files without their contents; git would check out a tree without them."""
    from blackwheel.sources.mirror import missing_blobs
    mirror = tmp_path / "mirror"
    seed_mirror(mirror, {LIB_URL: snapshots["lib"]})
    repo = find_repo(mirror, LIB_URL)
    blob = git(tmp_path, "--git-dir", str(repo), "rev-parse", f"{snapshots['lib_commit']}:lib.h")
    assert missing_blobs(repo, snapshots["lib_commit"]) == []
    loose = repo / "objects" / blob[:2] / blob[2:]
    if not loose.exists():
        pytest.skip("the clone packed its objects")
    loose.unlink()
    assert missing_blobs(repo, snapshots["lib_commit"]) == ["lib.h"]
    assert "lacks the contents of 1 file(s): lib.h" in lacking(mirror, LIB_URL, snapshots["lib_commit"])[0]
    with pytest.raises(MissingOffline, match="lib.h"):
        checkout(mirror, LIB_URL, snapshots["lib_commit"], tmp_path / "tree")
