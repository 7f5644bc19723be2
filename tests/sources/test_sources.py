"""sources.py: tree hashes, safe extraction, and the Fetcher against a mirror, a cache, a local bare git
repository and a PEP 503 index on disk (file://). No network."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from blackwheel.core.errors import HashMismatch, MissingOffline, SourceError, UnsafeArchive
from blackwheel.core.fsutil import sha256_file
from blackwheel.sources.fetch import Fetcher, Source, _is_sdist_of, list_index_files, safe_extract, tree_sha256


# ---- tree_sha256 ----------------------------------------------------------------------------------------
def make_tree(root: Path) -> Path:
    (root / "src" / "sub").mkdir(parents=True)
    (root / "src" / "a.c").write_text("int a;\n")
    (root / "src" / "sub" / "b.h").write_text("#pragma once\n")
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.symlink("src/a.c", root / "link")
    return root


def test_tree_hash_is_stable_and_ignores_git_mtimes_and_empty_folders(tmp_path):
    root = make_tree(tmp_path / "t")
    first = tree_sha256(root)
    assert first == tree_sha256(root) and len(first) == 64
    os.utime(root / "src" / "a.c", (0, 0))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: x\n")
    (root / "src" / "sub" / ".git").write_text("gitdir: ../../.git/modules/sub\n")  # a submodule's gitfile
    (root / "empty").mkdir()
    assert tree_sha256(root) == first
    # the same content elsewhere hashes the same
    assert tree_sha256(make_tree(tmp_path / "u")) == first


@pytest.mark.parametrize("change", ["content", "exec-bit", "symlink-target", "rename", "new-file"])
def test_tree_hash_changes(tmp_path, change):
    root = make_tree(tmp_path / "t")
    before = tree_sha256(root)
    if change == "content":
        (root / "src" / "a.c").write_text("int b;\n")
    elif change == "exec-bit":
        (root / "run.sh").chmod(0o755)
    elif change == "symlink-target":
        (root / "link").unlink()
        os.symlink("src/sub/b.h", root / "link")
    elif change == "rename":
        (root / "src" / "a.c").rename(root / "src" / "c.c")
    else:
        (root / "src" / "sub" / "new.h").write_text("")
    assert tree_sha256(root) != before


# ---- safe_extract -------------------------------------------------------------------------------------
def tar_with(path: Path, members: list[tuple[str, str, str]]) -> Path:
    """members: (name, kind 'file'|'symlink'|'dir', data or link target)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            if kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, data
                tar.addfile(info)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data.encode()))
    return path


def zip_with(path: Path, members: list[tuple[str, str]], symlink: tuple[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, symlink[1])
    return path


def test_extract_returns_the_single_top_folder(tmp_path):
    arc = tar_with(tmp_path / "pkg-1.0.tar.gz", [("pkg-1.0/setup.py", "file", "x"),
                                                ("pkg-1.0/l", "symlink", "setup.py")])
    top = safe_extract(arc, tmp_path / "out")
    assert top == tmp_path / "out" / "pkg-1.0"
    assert (top / "setup.py").read_text() == "x" and os.readlink(top / "l") == "setup.py"
    z = zip_with(tmp_path / "a.zip", [("a.txt", "1"), ("b.txt", "2")])
    assert safe_extract(z, tmp_path / "zout") == tmp_path / "zout"


@pytest.mark.parametrize("members", [
    [("/abs/evil", "file", "x")],
    [("pkg/../../evil", "file", "x")],
    [("pkg/l", "symlink", "/etc/passwd")],
    [("pkg/l", "symlink", "../../evil")],
    [("pkg/d", "symlink", "../.."), ("pkg/d/evil", "file", "x")],
])
def test_tar_refuses_members_leaving_the_tree(tmp_path, members):
    arc = tar_with(tmp_path / "bad.tar.gz", members)
    dest = tmp_path / "deep" / "out"
    with pytest.raises(UnsafeArchive, match="bad.tar.gz"):
        safe_extract(arc, dest)
    assert not (tmp_path / "evil").exists() and not (tmp_path / "deep" / "evil").exists()
    assert not Path("/abs/evil").exists()


@pytest.mark.parametrize("name", ["/abs/evil", "../evil", "pkg/../../evil", "C:/evil"])
def test_zip_refuses_members_leaving_the_tree(tmp_path, name):
    arc = zip_with(tmp_path / "bad.zip", [("pkg/ok", "1"), (name, "x")])
    with pytest.raises(UnsafeArchive, match="bad.zip: refused unsafe member"):
        safe_extract(arc, tmp_path / "deep" / "out")
    assert not (tmp_path / "deep" / "out" / "pkg" / "ok").exists()   # checked before anything is written


def test_zip_symlink_member_stays_a_file_inside(tmp_path):
    arc = zip_with(tmp_path / "s.zip", [("pkg/ok", "1")], symlink=("pkg/l", "/etc/passwd"))
    top = safe_extract(arc, tmp_path / "out")
    assert not (top / "l").is_symlink() and (top / "l").read_text() == "/etc/passwd"


@pytest.mark.parametrize("name, data", [
    ("c.tar.gz", b"\x1f\x8b\x08\x00garbage garbage garbage"),
    ("e.tar.gz", b""),
    ("c.zip", b"PK\x03\x04 not really a zip"),
    ("t.tar.gz", None),                  # a real archive cut short
])
def test_corrupt_archive_is_one_line_source_error(tmp_path, name, data):
    if data is None:
        full = tar_with(tmp_path / "full.tar.gz", [("p/big", "file", os.urandom(200_000).hex())])
        data = full.read_bytes()[:50_000]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SourceError) as exc:
        safe_extract(tmp_path / name, tmp_path / "out")
    assert name in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_archive_type(tmp_path):
    (tmp_path / "x.rar").write_bytes(b"x")
    with pytest.raises(SourceError, match="unknown archive type"):
        safe_extract(tmp_path / "x.rar", tmp_path / "out")


# ---- Fetcher: archives ------------------------------------------------------------------------------------
@pytest.fixture
def mirror(tmp_path):
    """mirror/pypi with pkg_x 1.0 and 1.0.post1 (a near name that must not be picked)."""
    pypi = tmp_path / "mirror" / "pypi"
    pypi.mkdir(parents=True)
    tar_with(pypi / "pkg_x-1.0.post1.tar.gz", [("pkg_x-1.0.post1/PKG-INFO", "file", "post1")])
    tar_with(pypi / "pkg_x-1.0.tar.gz", [("pkg_x-1.0/PKG-INFO", "file", "Name: pkg-x")])
    (tmp_path / "mirror" / "url").mkdir()
    tar_with(tmp_path / "mirror" / "url" / "v1.tar.gz", [("r-1/x", "file", "x")])
    return tmp_path / "mirror"


def sdist_source(mirror: Path, sha: str | None = None) -> Source:
    return Source(name="pkg-x", kind="pypi", pypi="Pkg.X", version="1.0",
                  sha256=sha or sha256_file(mirror / "pypi" / "pkg_x-1.0.tar.gz"))


def test_sdist_from_the_mirror_by_name_and_version(tmp_path, mirror):
    src = sdist_source(mirror)
    got = Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert got.name == "pkg_x-1.0.tar.gz" and sha256_file(got) == src.sha256
    assert got.is_relative_to(tmp_path / "cache" / "sources" / "sha256" / src.sha256)
    assert [p.name for p in got.parent.iterdir()] == [got.name]        # no .part left behind
    # the cache alone serves it later: no mirror, offline
    assert Fetcher(tmp_path / "cache", None, offline=True).fetch(src) == got


def test_url_source_from_the_mirror(tmp_path, mirror):
    src = Source(name="r", kind="url", url="https://example.invalid/o/r/archive/v1.tar.gz",
                 sha256=sha256_file(mirror / "url" / "v1.tar.gz"), role="resource")
    assert Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src).name == "v1.tar.gz"


def test_hash_mismatch_names_both_hashes(tmp_path, mirror):
    wrong = "0" * 64
    actual = sha256_file(mirror / "pypi" / "pkg_x-1.0.tar.gz")
    with pytest.raises(HashMismatch) as exc:
        Fetcher(tmp_path / "cache", mirror, offline=True).fetch(sdist_source(mirror, wrong))
    assert wrong in str(exc.value) and actual in str(exc.value)
    assert not list((tmp_path / "cache").glob("sources/sha256/*/*"))   # nothing unverified is cached


def test_offline_and_missing_names_the_mirror_path(tmp_path, mirror):
    src = Source(name="other", kind="pypi", pypi="other", version="2.0", sha256="1" * 64)
    with pytest.raises(MissingOffline) as exc:
        Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert str(mirror / "pypi") in str(exc.value) and "other==2.0" in str(exc.value)


def test_a_partial_copy_in_the_cache_is_not_the_archive(tmp_path, mirror):
    src = sdist_source(mirror)
    folder = tmp_path / "cache" / "sources" / "sha256" / src.sha256
    folder.mkdir(parents=True)
    (folder / ".pkg_x-1.0.tar.gz.abc123.part").write_bytes(b"half")   # an interrupted copy
    fetcher = Fetcher(tmp_path / "cache", None, offline=True)
    assert fetcher.missing([src])
    with pytest.raises(MissingOffline):
        fetcher.fetch(src)
    got = Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert got.name == "pkg_x-1.0.tar.gz" and sha256_file(got) == src.sha256


def test_missing_lists_exactly_what_is_absent(tmp_path, mirror):
    present = sdist_source(mirror)
    absent = Source(name="other", kind="pypi", pypi="other", version="2.0", sha256="1" * 64)
    git = Source(name="r", kind="git", url="https://github.com/o/r", commit="a" * 40, sha256="2" * 64)
    fetcher = Fetcher(tmp_path / "cache", mirror, offline=True)
    missing = fetcher.missing([present, absent, git])
    assert len(missing) == 2
    assert missing[0].startswith("other==2.0") and str(mirror / "pypi") in missing[0]
    assert str(mirror / "git" / "github.com" / "o" / "r.git") in missing[1]
    assert Fetcher(tmp_path / "cache", None).missing([present]) != []     # not cached yet, no mirror


def test_unavailable_pin_is_refused(tmp_path):
    src = Source(name="r", kind="url", url="https://x.invalid/r.tgz", sha256="unavailable: no snapshot")
    with pytest.raises(SourceError, match="no pin in the recipe"):
        Fetcher(tmp_path / "cache", None, offline=True).fetch(src)


# ---- Fetcher: git ---------------------------------------------------------------------------------------
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "init.defaultBranch=main"]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_mirror(tmp_path):
    """mirror/git/github.com/o/r.git (bare, as `git clone --mirror` makes) and the commit's tree hash."""
    work = tmp_path / "work"
    work.mkdir()
    git("init", "-q", cwd=work)
    (work / "include").mkdir()
    (work / "include" / "r.h").write_text("#define R 1\n")
    (work / "tool.sh").write_text("#!/bin/sh\n")
    (work / "tool.sh").chmod(0o755)
    git("add", ".", cwd=work)
    git("commit", "-q", "-m", "one", cwd=work)
    commit = git("rev-parse", "HEAD", cwd=work)
    (work / "include" / "r.h").write_text("#define R 2\n")
    git("commit", "-q", "-am", "two", cwd=work)          # the pin is not the tip
    git("checkout", "-q", commit, cwd=work)
    sha = tree_sha256(work)
    bare = tmp_path / "mirror" / "git" / "github.com" / "o" / "r.git"
    bare.parent.mkdir(parents=True)
    git("clone", "-q", "--mirror", str(work), str(bare), cwd=tmp_path)
    return tmp_path / "mirror", commit, sha


def test_git_source_from_the_mirror_offline(tmp_path, git_mirror):
    mirror, commit, sha = git_mirror
    src = Source(name="r", kind="git", url="https://github.com/o/r", commit=commit, sha256=sha, role="resource")
    tree = Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert (tree / "include" / "r.h").read_text() == "#define R 1\n"
    assert not (tree / ".git").exists() and tree_sha256(tree) == sha
    assert os.access(tree / "tool.sh", os.X_OK)
    assert Fetcher(tmp_path / "cache", None, offline=True).fetch(src) == tree   # cached


def test_git_wrong_tree_hash(tmp_path, git_mirror):
    mirror, commit, sha = git_mirror
    src = Source(name="r", kind="git", url="https://github.com/o/r.git", commit=commit, sha256="3" * 64)
    with pytest.raises(HashMismatch) as exc:
        Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert sha in str(exc.value) and "3" * 64 in str(exc.value)
    assert not (tmp_path / "cache" / "sources" / "git").exists() or \
        not list((tmp_path / "cache" / "sources" / "git").iterdir())


def test_git_offline_without_mirror(tmp_path):
    src = Source(name="r", kind="git", url="https://github.com/o/r", commit="a" * 40, sha256="2" * 64)
    with pytest.raises(MissingOffline, match="github.com/o/r.git"):
        Fetcher(tmp_path / "cache", tmp_path / "none", offline=True).fetch(src)


def test_git_commit_not_in_the_mirror(tmp_path, git_mirror):
    mirror, _, sha = git_mirror
    src = Source(name="r", kind="git", url="https://github.com/o/r", commit="b" * 40, sha256=sha)
    with pytest.raises(SourceError) as exc:
        Fetcher(tmp_path / "cache", mirror, offline=True).fetch(src)
    assert "git" in str(exc.value) and "\n" not in str(exc.value)


# ---- the package index ---------------------------------------------------------------------------------
def write_index(root: Path, project: str, files: dict[str, bytes]) -> str:
    """A PEP 503 simple index on disk; returns its file:// URL."""
    page = root / project
    page.mkdir(parents=True)
    links = []
    for name, data in files.items():
        (root.parent / "files").mkdir(exist_ok=True)
        (root.parent / "files" / name).write_bytes(data)
        links.append(f'<a href="../../files/{name}#sha256={hashlib.sha256(data).hexdigest()}">{name}</a><br/>')
    links.append('<a href="../../files/nohash-1.0.tar.gz">nohash-1.0.tar.gz</a>')
    (page / "index.html").write_text("<!DOCTYPE html><html><body>\n" + "\n".join(links) + "\n</body></html>\n")
    return root.as_uri()


def test_list_index_files_on_a_file_index(tmp_path):
    index = write_index(tmp_path / "simple", "pkg-x", {"pkg_x-1.0.tar.gz": b"a", "pkg_x-1.0-py3-none-any.whl": b"b"})
    files = list_index_files(index, "Pkg_X")
    assert [(n, h) for n, _, h in files] == [
        ("pkg_x-1.0.tar.gz", {"sha256": hashlib.sha256(b"a").hexdigest()}),
        ("pkg_x-1.0-py3-none-any.whl", {"sha256": hashlib.sha256(b"b").hexdigest()}),
        ("nohash-1.0.tar.gz", {}),
    ]
    assert files[0][1] == (tmp_path / "files" / "pkg_x-1.0.tar.gz").as_uri()


def test_list_index_files_unknown_project(tmp_path):
    index = write_index(tmp_path / "simple", "pkg-x", {})
    with pytest.raises(SourceError, match="did not answer"):
        list_index_files(index, "nope")


def test_fetch_online_through_a_file_index(tmp_path, mirror, monkeypatch):
    data = (mirror / "pypi" / "pkg_x-1.0.tar.gz").read_bytes()
    index = write_index(tmp_path / "simple", "pkg-x", {"pkg_x-1.0.post1.tar.gz": b"no", "pkg_x-1.0.tar.gz": data})
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    src = sdist_source(mirror)
    got = Fetcher(tmp_path / "cache", None, offline=False).fetch(src)
    assert got.read_bytes() == data
    with pytest.raises(HashMismatch, match="the index lists sha256"):
        Fetcher(tmp_path / "cache2", None).fetch(sdist_source(mirror, "4" * 64))


@pytest.mark.parametrize("filename, project, version, ok", [
    ("flash_attn-2.8.3.post2.tar.gz", "flash-attn", "2.8.3.post2", True),
    ("flash-attn-2.8.3.post2.tar.gz", "flash_attn", "2.8.3.post2", True),
    ("flash_attn-2.8.3.tar.gz", "flash-attn", "2.8.3.post2", False),
    ("flash_attn-2.8.3.post2.tar.gz", "flash-attn", "2.8.3", False),
    ("flashinfer_python-0.6.13.tar.gz", "flashinfer-python", "0.6.13", True),
    ("flashinfer_python-0.6.13.tar.gz", "flashinfer", "0.6.13", False),
    ("vllm-0.25.1.zip", "vllm", "0.25.1", True),
    ("vllm-0.25.1-cp38-abi3-manylinux_2_31_x86_64.whl", "vllm", "0.25.1", False),
])
def test_is_sdist_of(filename, project, version, ok):
    assert _is_sdist_of(filename, project, version) is ok


def test_git_only_the_listed_submodules(tmp_path):
    """``submodules = ["a"]`` checks out a (from the mirror, at its recorded commit) and leaves b empty."""
    mirror = tmp_path / "mirror" / "git" / "github.com" / "o"
    mirror.mkdir(parents=True)
    commits = {}
    for sub in ("a", "b"):
        work = tmp_path / f"work-{sub}"
        work.mkdir()
        git("init", "-q", cwd=work)
        (work / f"{sub}.h").write_text(f"// {sub}\n")
        git("add", ".", cwd=work)
        git("commit", "-q", "-m", sub, cwd=work)
        commits[sub] = git("rev-parse", "HEAD", cwd=work)
        git("clone", "-q", "--mirror", str(work), str(mirror / f"{sub}.git"), cwd=tmp_path)
    top = tmp_path / "work-top"
    top.mkdir()
    git("init", "-q", cwd=top)
    (top / ".gitmodules").write_text("".join(
        f'[submodule "{s}"]\n\tpath = {s}\n\turl = https://github.com/o/{s}\n' for s in ("a", "b")))
    git("add", ".gitmodules", cwd=top)
    for sub in ("a", "b"):
        git("update-index", "--add", "--cacheinfo", f"160000,{commits[sub]},{sub}", cwd=top)
    git("commit", "-q", "-m", "top", cwd=top)
    commit = git("rev-parse", "HEAD", cwd=top)
    git("clone", "-q", "--mirror", str(top), str(mirror / "top.git"), cwd=tmp_path)

    src = Source(name="top", kind="git", url="https://github.com/o/top", commit=commit, sha256="5" * 64,
                 submodules=True, submodule_paths=("a",))
    with pytest.raises(HashMismatch) as exc:      # learn the tree hash, then fetch it for real
        Fetcher(tmp_path / "cache", tmp_path / "mirror", offline=True).fetch(src)
    actual = str(exc.value).split("tree sha256 ")[1].split()[0]
    tree = Fetcher(tmp_path / "cache", tmp_path / "mirror", offline=True).fetch(replace(src, sha256=actual))
    assert (tree / "a" / "a.h").read_text() == "// a\n"
    assert not (tree / "b" / "b.h").exists()
