"""Git stores: where a pinned commit's objects are found, what they lack, and checkouts from them.

A *store* is a bare repository that holds a pinned commit and the objects under it. A ``Resolver``
maps ``(url, commit)`` to the store that has that commit, or None; ``sources.fetch.Fetcher`` builds the
one resolver every fetch, check and bundle uses, from (in this order) its cache's own stores, a
source bundle's store and a mirror folder.

Mirror layout: ``DIR/git/<host>/<owner>/<repo>.git``, bare repositories made with
``git clone --mirror``, named as upstream names them (owner and name matched case-insensitively,
as GitHub's are). A resource pinned with submodules needs each submodule's commit in some store
too, at the commit its parent records.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Union
from urllib.parse import urlparse

from ..core.errors import MissingOffline, SourceError, UsageError
from ..core.fsutil import temp_dir_beside, tree_sha256

Resolver = Callable[[str, str], Union[Path, None]]   # (url, commit) -> a store holding the commit


def repo_path(mirror_dir: str | Path, url: str) -> Path:
    """Where ``url`` lives in the mirror.

    >>> repo_path("/m", "https://github.com/NVIDIA/cutlass.git").as_posix()
    '/m/git/github.com/NVIDIA/cutlass.git'
    """
    parsed = urlparse(url)
    parts = [p for p in parsed.path.split("/") if p]
    if not parsed.hostname or len(parts) != 2:
        raise UsageError(f"cannot place {url!r} in a mirror: expected https://<host>/<owner>/<repo>")
    owner, repo = parts
    repo = repo[:-4] if repo.endswith(".git") else repo
    return Path(mirror_dir) / "git" / parsed.hostname / owner / f"{repo}.git"


def find_repo(mirror_dir: str | Path, url: str) -> Path | None:
    """The mirror's repository for ``url``; owner and name match case-insensitively, as GitHub's do."""
    want = repo_path(mirror_dir, url)
    if want.is_dir():
        return want
    host_dir = want.parent.parent
    if not host_dir.is_dir():
        return None
    rel = want.relative_to(host_dir).as_posix().lower()
    for cand in host_dir.glob("*/*.git"):
        if cand.relative_to(host_dir).as_posix().lower() == rel:
            return cand
    return None


def run_git(*args: str, **how) -> subprocess.CompletedProcess:
    """The one place git is started (``how``: subprocess.run's options); the caller reads the result."""
    return subprocess.run(["git", *args], **how)


def git(*args: str, cwd: Path | None = None, input: str | None = None) -> str:
    """Run git; a failure is one line naming the command and git's last word."""
    proc = run_git(*args, cwd=cwd, capture_output=True, text=True, input=input)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SourceError(f"git {' '.join(a for a in args[:4] if not a.startswith('-c'))} failed: {last}")
    return proc.stdout




def mirror_resolver(mirror_dir: str | Path) -> Resolver:
    """The resolver of a mirror folder: ``find_repo``, when that repository has the commit."""
    def resolve(url: str, commit: str) -> Path | None:
        repo = find_repo(mirror_dir, url)
        return repo if repo is not None and has_commit(repo, commit) else None
    return resolve


def _resolver(where: str | Path | Resolver) -> Resolver:
    return where if callable(where) else mirror_resolver(where)


def has_commit(repo: Path, commit: str) -> bool:
    proc = run_git("--git-dir", str(repo), "cat-file", "-e", f"{commit}^{{commit}}", capture_output=True)
    return proc.returncode == 0


def seed_mirror(mirror_dir: str | Path, snapshots: dict[str, str | Path]) -> list[Path]:
    """Make ``DIR/git/...`` bare mirrors of local snapshots: ``{upstream url: local git dir}``.

    Each clone goes to a temporary name beside its place and is renamed in, so a reader never sees
    half a repository; one already there is left alone (a mirror is append-only).
    """
    made = []
    for url, snap in snapshots.items():
        dest = repo_path(mirror_dir, url)
        if dest.exists():
            continue
        if not Path(snap).is_dir():
            raise UsageError(f"snapshot for {url} not found: {snap}")
        tmp = temp_dir_beside(dest)
        try:
            git("clone", "--quiet", "--mirror", str(snap), str(tmp / "r"))
            (tmp / "r").rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        made.append(dest)
    return made


def missing_blobs(repo: Path, commit: str) -> list[str]:
    """Paths of the commit's tree whose file contents the repository lacks.

    A snapshot may list its largest files without holding them; git then checks the tree out
    without those files and says nothing, so a tree hash would silently describe another tree.
    """
    listing = git("--git-dir", str(repo), "ls-tree", "-r", "-z", commit)
    blobs = {}
    for entry in listing.split("\0"):
        meta, _, path = entry.partition("\t")
        if meta.split(" ")[1:2] == ["blob"]:
            blobs[meta.split(" ")[2]] = path
    proc = run_git("--git-dir", str(repo), "cat-file", "--batch-check",
                   input="\n".join(blobs) + "\n", capture_output=True, text=True)
    return sorted(blobs[line.split()[0]] for line in proc.stdout.splitlines() if line.endswith(" missing"))


def submodules_at(repo: Path, commit: str) -> dict[str, tuple[str, str]]:
    """``{path: (url, commit)}`` for the submodules a commit records (from .gitmodules + gitlinks)."""
    try:
        text = git("--git-dir", str(repo), "show", f"{commit}:.gitmodules")
    except SourceError:
        return {}
    with tempfile.NamedTemporaryFile("w", suffix=".gitmodules") as f:
        f.write(text)
        f.flush()
        cfg = git("config", "-f", f.name, "--list")
    paths, urls = {}, {}
    for line in cfg.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("submodule.") and key.endswith((".path", ".url")):
            name, kind = key[len("submodule."):].rsplit(".", 1)
            (paths if kind == "path" else urls)[name] = value
    out = {}
    for name, path in paths.items():
        tree = git("--git-dir", str(repo), "ls-tree", commit, "--", path).split()
        if len(tree) >= 3 and tree[1] == "commit":
            out[path] = (urls.get(name, ""), tree[2])
    return out


def wanted_submodules(spec, recorded: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """``submodules`` of a resource: false (none), true (all recorded) or a list of paths."""
    if not spec:
        return {}
    if spec is True:
        return recorded
    unknown = [p for p in spec if p not in recorded]
    if unknown:
        raise UsageError(f"submodules {unknown} are not recorded in the pinned commit")
    return {p: recorded[p] for p in spec}


def lacking(where: str | Path | Resolver, url: str, commit: str, submodules=False) -> list[str]:
    """What the stores lack for one git pin (submodules included); empty when they have it all.

    ``where`` is a mirror folder or a ``Resolver``. Commits are checked, and so are file contents:
    a store may list a file without holding it, and git would then check the tree out without it.
    """
    resolve = _resolver(where)
    repo = resolve(url, commit)
    if repo is None:
        if not callable(where) and find_repo(where, url) is None:
            return [f"{url}: no repository at {repo_path(where, url)}"]
        return [f"{url}: commit {commit} missing"]
    absent = missing_blobs(repo, commit)
    out = [f"{url}@{commit[:12]}: lacks the contents of {len(absent)} file(s): {', '.join(absent[:3])}"] \
        if absent else []
    for path, (sub_url, sub_commit) in wanted_submodules(submodules, submodules_at(repo, commit)).items():
        out += [f"{url} submodule {path}: {m}" for m in lacking(where, sub_url, sub_commit)]
    return out


def absent_files(where: str | Path | Resolver, url: str, commit: str, submodules=False) -> list[str]:
    """Paths (submodules' prefixed by their place) whose contents the stores lack."""
    resolve = _resolver(where)
    repo = resolve(url, commit)
    if repo is None:
        return []
    out = missing_blobs(repo, commit)
    for path, (sub_url, sub_commit) in wanted_submodules(submodules, submodules_at(repo, commit)).items():
        out += [f"{path}/{p}" for p in absent_files(where, sub_url, sub_commit)]
    return out


def missing_resources(where: str | Path | Resolver, sources) -> list[str]:
    """For a recipe version's git resources (``Source`` objects), what the stores lack."""
    out = []
    for src in sources:
        if src.kind == "git":
            out += [f"{src.name}: {m}" for m in lacking(where, src.url, src.commit, src.submodule_spec)]
    return out


def checkout(where: str | Path | Resolver, url: str, commit: str, dest: str | Path, submodules=False,
             allow_missing_files: bool = False) -> Path:
    """Check ``commit`` of ``url`` out of the stores into ``dest`` (new), submodules at their commits.

    ``allow_missing_files`` lets a tree whose store lacks some file contents be checked out
    without them (the caller names them); repositories and commits must still be there.
    """
    missing = lacking(where, url, commit, submodules)
    if allow_missing_files:
        missing = [m for m in missing if "lacks the contents of" not in m]
    if missing:
        raise MissingOffline("no store holds " + "; ".join(missing))
    resolve = _resolver(where)
    repo, dest = resolve(url, commit), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    git("init", "-q", cwd=dest)
    # borrow the store's objects instead of copying them (a store may have no refs at all)
    (dest / ".git" / "objects" / "info" / "alternates").write_text(str(Path(repo).resolve() / "objects") + "\n")
    git("-c", "advice.detachedHead=false", "checkout", "-q", commit, cwd=dest)
    for path, (sub_url, sub_commit) in wanted_submodules(submodules, submodules_at(repo, commit)).items():
        sub_dest = dest / path
        if sub_dest.is_dir():
            sub_dest.rmdir()  # git leaves an empty folder for a gitlink
        checkout(where, sub_url, sub_commit, sub_dest, False, allow_missing_files)
    return dest


def pin_tree_sha256(where: str | Path | Resolver, url: str, commit: str, submodules=False,
                    allow_missing_files: bool = False) -> str:
    """The ``tree_sha256`` of a git pin, computed from a checkout of the stores."""
    with tempfile.TemporaryDirectory(prefix="bw-pin-") as tmp:
        tree = checkout(where, url, commit, Path(tmp) / "tree", submodules, allow_missing_files)
        return tree_sha256(tree)


def object_ids(repo: Path, commit: str) -> tuple[list[str], list[str]]:
    """``(present, absent)`` object ids of one commit: the commit, its trees and blobs (no history)."""
    out = git("--git-dir", str(repo), "rev-list", "--objects", "--no-walk", "--missing=print", commit)
    present, absent = [], []
    for line in out.splitlines():
        oid = line.split(" ", 1)[0]
        (absent if oid.startswith("?") else present).append(oid.lstrip("?"))
    return present, absent


def snapshots_in(folder: str | Path, host: str = "github.com") -> dict[str, Path]:
    """``{url: git dir}`` for snapshots laid out as ``<owner>+<name>/repo`` (a fetch tool's layout)."""
    out = {}
    for repo in sorted(Path(folder).glob("*+*/repo")):
        owner, _, name = repo.parent.name.partition("+")
        out[f"https://{host}/{owner}/{name}"] = repo
    return out
