"""Fetch: pinned sources into a content-addressed cache, verified before use.

Three kinds of source, each pinned:
- ``pypi``: an sdist by distribution name and version, found through pip's configured index
  (the simple API, PEP 691 JSON or PEP 503 HTML); pinned by the archive's sha256.
- ``git``: a repository URL and a full commit id; pinned by the commit (git's object ids hash every
  byte under it). Where the recipe also records ``tree_sha256`` of the checked-out tree
  (submodules included) it is checked; otherwise it is computed and written into the manifest.
- ``url``: an archive URL; pinned by the archive's sha256.

Cache (``BLACKWHEEL_CACHE``, default ``~/.cache/blackwheel``)::

    sources/sha256/<hex>/<filename>          archives, by their hash
    sources/git/<commit>-<submodules>/        git trees, checked out and verified (+ ``.json`` beside:
                                              tree_sha256 and any file the store lacked)
    git/<host>/<owner>/<repo>.git             stores filled online (``git fetch --depth 1 URL COMMIT``)

Mirror (``--mirror DIR`` / ``BLACKWHEEL_MIRROR``) for air-gapped hosts, same names as upstream::

    DIR/pypi/<sdist filename>
    DIR/url/<archive filename>
    DIR/git/<host>/<owner>/<repo>.git        bare repositories (``git clone --mirror``)

or ``--mirror FILE``: a source bundle (``blackwheel bundle``, see ``bundle.py``).

Offline mode reads only the cache and the mirror, and names exactly what is missing. A resource the
recipe marks ``optional`` may be missing: the build goes on without it and says so.
"""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from . import mirror as stores
from .bundle import open_bundle
from ..core.recipe import load_recipe
from ..core.settings import Settings
from ..core.source import Source
from ..core.errors import HashMismatch, MissingOffline, SourceError, UnsafeArchive, UsageError
from ..core.fsutil import (atomic_write_json, disk_full, sha256_file, sweep_temporaries, temp_dir_beside,
                           temp_prefix, tree_sha256)

# ---- the cache and the mirror ----------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Settings.from_env().cache


@dataclass(frozen=True)
class Fetcher:
    """Brings sources into the cache: from the cache itself, the mirror, or (online) upstream.

    ``mirror`` is a mirror folder or a source bundle file. ``allow_absent`` accepts a git tree
    whose store lacks some file contents (a snapshot that skips large files); the files are
    named in the tree's record and so in the manifest, and a recorded tree hash is not checked.
    """

    cache: Path
    mirror: Path | None = None
    offline: bool = False
    allow_absent: bool = False

    def __post_init__(self) -> None:
        self.sweep()

    def sweep(self) -> list[str]:
        """Remove the temporaries that killed fetches left in the cache (their writers are gone);
        a live fetch's stay. Nothing reads them; this keeps them from piling up."""
        folders = [self.cache / "tmp", self.cache / "sources" / "git", self.cache / "bundles"]
        sha_root = self.cache / "sources" / "sha256"
        folders += sorted(p for p in sha_root.iterdir() if p.is_dir()) if sha_root.is_dir() else []
        return [name for folder in folders for name in sweep_temporaries(folder)]

    @classmethod
    def from_settings(cls, settings: Settings) -> "Fetcher":
        return cls(settings.cache, settings.mirror, settings.offline, settings.allow_absent)

    @classmethod
    def from_env(cls, offline: bool | None = None, mirror: str | None = None,
                 allow_absent: bool | None = None) -> "Fetcher":
        """The environment's settings, with these options over them (a library caller's default)."""
        return cls.from_settings(Settings.from_env().with_options(offline=offline, mirror=mirror or None,
                                                                   allow_absent=allow_absent))

    # -- the mirror: a folder, or a bundle file unpacked (verified) into the cache once
    def _bundle(self):
        if self.mirror is None or not self.mirror.is_file():
            return None
        return open_bundle(self.mirror, self.cache)

    def _mirror_dir(self) -> Path | None:
        return self.mirror if self.mirror is not None and self.mirror.is_dir() else None

    def fetch(self, src: Source) -> Path:
        """A verified archive file (pypi, url) or tree folder (git) for ``src``."""
        if not src.pinned:
            raise SourceError(f"{src.label}: no pin in the recipe ({src.sha256 or 'no sha256'})")
        if src.kind == "git":
            return self._fetch_git(src)
        cached = self._cached_archive(src.sha256)
        if cached:
            return cached
        found = self._mirror_archive(src)
        if found:
            return self._store_archive(found, src, _archive_name(src, found))
        if self.offline:
            raise MissingOffline(f"offline and {src.label} (sha256 {src.sha256[:12]}) is in neither the "
                                 f"cache nor the mirror {self._mirror_hint(src)}")
        url, filename = (self._pypi_url(src) if src.kind == "pypi"
                         else (src.url, Path(urllib.parse.urlparse(src.url).path).name))
        with tempfile.TemporaryDirectory(prefix=temp_prefix("tmp"), dir=self.tmp_root()) as tmp:
            part = Path(tmp) / filename
            _download(url, part)
            return self._store_archive(part, src, filename)

    def fetch_optional(self, src: Source) -> tuple[Path | None, str | None]:
        """``(path, None)``, or for an optional resource that cannot be had ``(None, one line why)``."""
        if not src.optional:
            return self.fetch(src), None
        try:
            return self.fetch(src), None
        except SourceError as exc:
            return None, f"optional {src.name} left out: {exc}; {src.optional}"

    def record(self, src: Source) -> dict:
        """What the manifest says of a fetched source: its pin, and for git the tree as verified."""
        d = src.to_dict()
        if src.kind == "git":
            info = self._tree_record(self._git_cache_dir(src))
            if info:
                d["tree_sha256"] = info["tree_sha256"]
                d["tree_sha256_from"] = "recipe" if src.sha256 else "computed at fetch"
                if info.get("absent"):
                    d["absent"] = info["absent"]
        return d

    def check(self, sources) -> tuple[list[str], list[str]]:
        """``(missing, notes)``: what fetch would have to download (offline-readiness), no network used.

        Commits and file contents are checked in the stores, archives by hash. An optional
        resource that is missing is a note, not a miss."""
        missing, notes = [], []
        for src in sources:
            if not src.pinned:
                problem = [f"{src.label}: no pin in the recipe ({src.sha256 or 'no sha256'})"]
            elif src.kind == "git":
                problem = [] if self._tree_record(self._git_cache_dir(src)) else \
                    [f"{src.name}: {m}" for m in stores.lacking(self.resolver(online=False), src.url,
                                                                 src.commit, src.submodule_spec)]
                if problem and self.allow_absent:
                    problem = [m for m in problem if "lacks the contents of" not in m]
                if problem and self._mirror_dir() is not None and "lacks the contents" not in problem[0]:
                    problem = [f"{problem[0]} -> {self._mirror_hint(src)}", *problem[1:]]
            elif self._cached_archive(src.sha256) or self._mirror_archive(src):
                problem = []
            else:
                problem = [f"{src.label} -> {self._mirror_hint(src)}"]
            if problem and src.optional:
                notes.append(f"optional {src.name}: {problem[0]}; without it {src.optional}")
            else:
                missing += problem
        return missing, notes

    def missing(self, sources) -> list[str]:
        return self.check(sources)[0]

    # -- archives
    def tmp_root(self) -> Path:
        root = self.cache / "tmp"      # swept of what killed fetches left there when the Fetcher starts
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _cached_archive(self, sha: str) -> Path | None:
        """The cached archive, re-hashed: a file changed after download is removed, not trusted."""
        folder = self.cache / "sources" / "sha256" / sha
        # dot files are copies in progress (or left by an interrupted one), never the archive
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        for f in files:
            if sha256_file(f) == sha:
                return f
            print(f"blackwheel: cached {f} no longer matches its sha256; removed, fetching again",
                  file=sys.stderr)
            f.unlink()
        return None

    def _store_archive(self, path: Path, src: Source, filename: str) -> Path:
        actual = sha256_file(path)
        if actual != src.sha256:
            raise HashMismatch(f"{src.label}: sha256 {actual} differs from the pin {src.sha256}")
        dest = self.cache / "sources" / "sha256" / actual / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(filename), suffix=".part", dir=dest.parent)
        os.close(fd)  # unique name: two builds may fill the cache at once
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return dest

    def _mirror_archive(self, src: Source) -> Path | None:
        bundle = self._bundle()
        if bundle is not None:
            return bundle.archive(src.sha256)
        if self._mirror_dir() is None:
            return None
        folder = self.mirror / ("pypi" if src.kind == "pypi" else "url")
        if not folder.is_dir():
            return None
        if src.kind == "url":
            cand = folder / Path(urllib.parse.urlparse(src.url).path).name
            return cand if cand.is_file() else None
        for cand in sorted(folder.iterdir()):  # exactly name-version: 1.0 must not pick 1.0.post1
            if cand.is_file() and _is_sdist_of(cand.name, src.pypi, src.version):
                return cand
        return None

    def _mirror_hint(self, src: Source) -> str:
        if self.mirror is not None and self.mirror.is_file():
            return f"not in the bundle {self.mirror}"
        where = self.mirror or Path("$BLACKWHEEL_MIRROR")
        if src.kind == "git":
            repo = stores.find_repo(where, src.url) if self.mirror else None
            if repo is not None:
                return f"the mirror's repository {repo} lacks commit {src.commit}"
            return f"expected a bare repo at {stores.repo_path(where, src.url)}"
        sub = "pypi" if src.kind == "pypi" else "url"
        return f"expected the file under {where / sub}"

    def _pypi_url(self, src: Source) -> tuple[str, str]:
        for index in pip_index_urls():
            try:
                files = list_index_files(index, src.pypi)
            except SourceError:
                continue
            for name, url, hashes in files:
                if _is_sdist_of(name, src.pypi, src.version):
                    if hashes.get("sha256") and hashes["sha256"] != src.sha256:
                        raise HashMismatch(f"{src.label}: the index lists sha256 {hashes['sha256']}, "
                                           f"the pin is {src.sha256}")
                    return url, name
        raise SourceError(f"{src.label}: no sdist on the configured indexes ({', '.join(pip_index_urls())})")

    # -- git: stores (cache, bundle, mirror), then a verified checkout in the cache
    def _store_dir(self, url: str) -> Path:
        return stores.repo_path(self.cache, url)

    def resolver(self, online: bool | None = None) -> stores.Resolver:
        """(url, commit) -> the store that holds the commit: the cache's, the bundle's, the mirror's;
        online (unless offline) a shallow fetch of that one commit into the cache's store."""
        online = (not self.offline) if online is None else online
        bundle = self._bundle()
        mirror_dir = self._mirror_dir()

        def resolve(url: str, commit: str) -> Path | None:
            own = self._store_dir(url)
            if own.is_dir() and stores.has_commit(own, commit):
                return own
            if bundle is not None and stores.has_commit(bundle.store, commit):
                return bundle.store
            if mirror_dir is not None:
                found = stores.mirror_resolver(mirror_dir)(url, commit)
                if found is not None:
                    return found
            if online:
                return self._fetch_commit(url, commit)
            return None
        return resolve

    def _fetch_commit(self, url: str, commit: str) -> Path:
        own = self._store_dir(url)
        if not own.is_dir():
            tmp = temp_dir_beside(own)
            stores.git("init", "-q", "--bare", str(tmp / "r"))
            try:
                os.rename(tmp / "r", own)
            except OSError:
                if not own.is_dir():
                    raise
            shutil.rmtree(tmp, ignore_errors=True)
        stores.git("--git-dir", str(own), "fetch", "-q", "--depth", "1", url, commit)
        return own

    def _git_cache_dir(self, src: Source) -> Path:
        spec = json.dumps(src.submodule_spec, sort_keys=True)
        return self.cache / "sources" / "git" / f"{src.commit}-{hashlib.sha256(spec.encode()).hexdigest()[:8]}"

    @staticmethod
    def _tree_record(final: Path) -> dict | None:
        record = final.with_name(final.name + ".json")
        if final.is_dir() and record.is_file():
            return json.loads(record.read_text())
        return None

    def _fetch_git(self, src: Source) -> Path:
        final = self._git_cache_dir(src)
        info = self._tree_record(final)
        if info is not None:
            self._check_tree(src, info)
            return final
        resolve = self.resolver()
        if resolve(src.url, src.commit) is None:
            raise MissingOffline(f"offline and {src.label} is in no store; {self._mirror_hint(src)}")
        absent = stores.absent_files(resolve, src.url, src.commit, src.submodule_spec)
        bundle = self._bundle()
        declared = bundle.absent(src.url, src.commit, src.submodule_spec) if bundle else None
        if absent and not self.allow_absent and sorted(absent) != declared:
            raise SourceError(f"{src.label}: the store lacks the contents of {len(absent)} file(s): "
                              f"{', '.join(absent[:3])} (a snapshot that skips large files? "
                              f"BLACKWHEEL_ALLOW_ABSENT=1 builds without them and records them)")
        with tempfile.TemporaryDirectory(prefix=temp_prefix("tmp"), dir=self.tmp_root()) as tmp:
            tree = Path(tmp) / "tree"
            stores.checkout(resolve, src.url, src.commit, tree, src.submodule_spec,
                            allow_missing_files=bool(absent))
            _drop_git_dirs(tree)
            info = {"url": src.url, "commit": src.commit, "submodules": src.submodule_spec,
                    "tree_sha256": tree_sha256(tree), "absent": absent}
            self._check_tree(src, info)          # before anything lands in the cache
            final.parent.mkdir(parents=True, exist_ok=True)
            # the record first: a tree is never visible without it (a kill between the two leaves a
            # record alone, which _tree_record does not read without its tree)
            atomic_write_json(final.with_name(final.name + ".json"), info)
            try:
                os.rename(tree, final)
            except OSError:
                if not final.is_dir():
                    raise
        return final

    def _check_tree(self, src: Source, info: dict) -> None:
        """The tree hash against the recipe's pin, else against what a bundle recorded for it."""
        bundle = self._bundle()
        expected = src.sha256 or (bundle.tree_sha256(src.url, src.commit, src.submodule_spec) if bundle else None)
        if not expected or info["tree_sha256"] == expected:
            return
        if info.get("absent") and src.sha256:
            print(f"blackwheel: {src.name}: tree sha256 not comparable with the pin: "
                  f"{len(info['absent'])} file(s) absent from the store", file=sys.stderr)
            return
        whose = "the pin" if src.sha256 else "the bundle's record"
        raise HashMismatch(f"{src.label}: tree sha256 {info['tree_sha256']} differs from {whose} {expected}")


def _drop_git_dirs(tree: Path) -> None:
    """Remove ``.git`` (folders, and the files submodules leave) so the tree is plain sources."""
    for dirpath, dirnames, filenames in os.walk(tree):
        if ".git" in dirnames:
            shutil.rmtree(Path(dirpath) / ".git")
            dirnames.remove(".git")
        if ".git" in filenames:
            (Path(dirpath) / ".git").unlink()


def _archive_name(src: Source, found: Path) -> str:
    """The upstream file name of an archive found in a mirror or bundle."""
    if src.kind == "url":
        return Path(urllib.parse.urlparse(src.url).path).name
    return found.name.split("-", 1)[1] if found.parent.name == "archives" else found.name


# ---- the package index (pip's own configuration; no host is written here) -------------------------
def pip_index_urls() -> list[str]:
    """The index URLs pip would use: PIP_INDEX_URL / pip config, then extra indexes."""
    proc = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    conf: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition("=")
        conf[key.split(".", 1)[-1]] = value.strip().strip("'\"")
    primary = os.environ.get("PIP_INDEX_URL") or conf.get("index-url")
    if not primary:
        from pip._internal.models.index import PyPI  # pip's default index, not ours; pip is imported only here
        primary = PyPI.simple_url
    extra = (os.environ.get("PIP_EXTRA_INDEX_URL") or conf.get("extra-index-url", "")).split()
    return [primary, *extra]


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def list_index_files(index_url: str, project: str) -> list[tuple[str, str, dict]]:
    """(filename, absolute url, hashes) of a project on a PEP 691 (JSON) or PEP 503 (HTML) index."""
    page = index_url.rstrip("/") + f"/{canonicalize_name(project)}/"
    if page.startswith("file:") and Path(urllib.request.url2pathname(urllib.parse.urlparse(page).path)).is_dir():
        page += "index.html"  # a PEP 503 tree on disk, as pip reads it (urllib cannot open a folder)
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            body = resp.read()
            ctype = resp.headers.get("Content-Type", "") if hasattr(resp, "headers") else ""
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"index {page} did not answer: {exc}") from None
    if "json" in ctype:
        data = json.loads(body)
        return [(f["filename"], urllib.parse.urljoin(page, f["url"]), f.get("hashes", {}))
                for f in data.get("files", [])]
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    out = []
    for text, href in parser.links:
        url, _, frag = urllib.parse.urljoin(page, href).partition("#")
        algo, _, digest = frag.partition("=")
        out.append((text or Path(urllib.parse.urlparse(url).path).name, url, {algo: digest} if digest else {}))
    return out


def _is_sdist_of(filename: str, project: str, version: str) -> bool:
    for ext in (".tar.gz", ".zip"):
        if filename.endswith(ext):
            stem = filename[: -len(ext)]
            name, _, ver = stem.rpartition("-")
            return canonicalize_name(name) == canonicalize_name(project) and ver == version
    return False


def _download(url: str, dest: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(dest, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"download of {url} failed: {exc}") from None


# ---- extraction ------------------------------------------------------------------------------------
def safe_extract(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest``, refusing absolute paths, ``..`` and links leaving the tree.

    The members land first in a dot-prefixed folder beside ``dest``, which is renamed into place
    once whole: a failure (a full disk, a corrupt archive) leaves no half-extracted tree.
    Returns the single top-level folder if there is one (sdists have ``name-version/``), else dest.
    """
    name = archive.name
    tmp = temp_dir_beside(dest, ".part")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)                  # the mode a plain mkdir gives, not mkdtemp's 0700
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():  # the data filter would strip a leading '/': refuse it
                    _check_member_path(member.name, archive)
                tar.extractall(tmp, filter="data")  # rejects absolute, '..', outside links, devices
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    _check_member_path(member, archive)
                zf.extractall(tmp)
        else:
            raise SourceError(f"{archive}: unknown archive type")
        if dest.is_dir() and any(dest.iterdir()):   # extracting over an existing tree: merge, as before
            shutil.copytree(tmp, dest, symlinks=True, dirs_exist_ok=True)
        else:
            os.replace(tmp, dest)                   # onto nothing, or onto an empty folder
    except tarfile.FilterError as exc:
        raise UnsafeArchive(f"{archive.name}: refused unsafe member: {exc}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise SourceError(f"{archive.name}: corrupt archive: {exc}") from None
    except OSError as exc:
        if disk_full(exc):
            raise SourceError(f"no space left on device extracting {archive.name} into {dest.parent}: "
                              "free some space and rerun (nothing half-extracted was left)") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    tops = [p for p in dest.iterdir()]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else dest


def _check_member_path(member: str, archive: Path) -> None:
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or ".." in Path(member).parts:
        raise UnsafeArchive(f"{archive.name}: refused unsafe member {member!r}")


def stack_sources(stack, target, packages=None) -> list[Source]:
    """Every source (sdists and the resources the target uses) of the stack's packages, deduplicated."""
    out: dict[tuple, Source] = {}
    for name in packages or list(stack.pins):
        if not stack.pins.get(name):
            raise UsageError(f"stack {stack.name} pins no version of {name}")
        recipe = load_recipe(name)
        for src in recipe.sources_for(stack.pins[name], target, stack.torch):
            out.setdefault((src.kind, src.sha256, src.url, src.commit, src.pypi, src.version, src.name), src)
    return list(out.values())


def stack_test_sources(stack, packages=None) -> list[Source]:
    """The pinned trees of upstream tests (``[versions.tests]`` with a source) of the stack's packages."""
    out = []
    for name in packages or list(stack.pins):
        tests = load_recipe(name).version(stack.pins[name]).tests
        if tests is not None and tests.source is not None:
            out.append(tests.source)
    return out
