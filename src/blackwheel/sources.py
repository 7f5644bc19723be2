"""Fetch: pinned sources into a content-addressed cache, verified before use.

Three kinds of source, each pinned:
- ``pypi``: an sdist by distribution name and version, found through pip's configured index
  (the simple API, PEP 691 JSON or PEP 503 HTML); pinned by the archive's sha256.
- ``git``: a repository URL and a full commit id; pinned by the commit *and* by ``tree_sha256``
  of the checked-out tree (submodules included), so a rewritten history cannot slip in.
- ``url``: an archive URL; pinned by the archive's sha256.

Cache (``BLACKWHEEL_CACHE``, default ``~/.cache/blackwheel``)::

    sources/sha256/<hex>/<filename>          archives, by their hash
    sources/git/<commit>-<tree_sha256[:16]>/  git trees, checked out and verified

Mirror (``--mirror DIR`` / ``BLACKWHEEL_MIRROR``) for air-gapped hosts, same names as upstream::

    DIR/pypi/<sdist filename>
    DIR/url/<archive filename>
    DIR/git/<host>/<owner>/<repo>.git        bare repositories (``git clone --mirror``)

Offline mode reads only the cache and the mirror, and names exactly what is missing.
"""

from __future__ import annotations

import hashlib
from html.parser import HTMLParser
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name
from .errors import HashMismatch, MissingOffline, SourceError, UnsafeArchive, UsageError
from .fsutil import sha256_file

GIT_COMMIT_LEN = 40


@dataclass(frozen=True)
class Source:
    """One pinned input of a build: an sdist, a git tree or an archive."""

    name: str
    kind: str                      # "pypi" | "git" | "url"
    sha256: str                    # archive hash (pypi, url) or tree_sha256 (git)
    pypi: str | None = None        # distribution name (pypi)
    version: str | None = None     # version (pypi)
    url: str | None = None         # repository URL (git) or archive URL (url)
    commit: str | None = None      # full commit id (git)
    submodules: bool = False       # git: check out submodules at their recorded commits
    submodule_paths: tuple[str, ...] = ()  # git: only these submodules (empty: all, when submodules)
    role: str = "sdist"            # "sdist" | "resource"
    env: str | None = None         # resource: the variable that points the build at it
    dest: str | None = None        # resource: a path inside the main tree to place it at instead
    defined_in: str | None = None  # resource: where upstream defines this pin
    when: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        if self.kind == "pypi":
            return f"{self.pypi}=={self.version} (sdist)"
        if self.kind == "git":
            return f"{self.name} {self.url}@{self.commit}"
        return f"{self.name} {self.url}"

    def to_dict(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "sha256": self.sha256, "role": self.role}
        for key in ("pypi", "version", "url", "commit", "env", "dest"):
            if getattr(self, key):
                d[key] = getattr(self, key)
        return d


def tree_sha256(root: str | os.PathLike) -> str:
    """Content hash of a source tree, independent of git and of file times.

    sha256 over sorted lines ``<kind> <path>\\0<digest>\\n`` where kind is ``f`` (file), ``x``
    (executable file) or ``l`` (symlink, digest = link target); ``.git`` entries are skipped, empty
    folders do not count.
    """
    root = Path(root)
    entries: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                entries.append(f"l {rel}\0{os.readlink(path)}\n".encode())
            elif stat.S_ISREG(st.st_mode) and name != ".git":
                kind = "x" if st.st_mode & 0o111 else "f"
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries.append(f"{kind} {rel}\0{digest}\n".encode())
    h = hashlib.sha256()
    for line in sorted(entries):
        h.update(line)
    return h.hexdigest()


# ---- the cache and the mirror ----------------------------------------------------------------------
def default_cache_dir() -> Path:
    return Path(os.environ.get("BLACKWHEEL_CACHE", Path.home() / ".cache" / "blackwheel"))


@dataclass(frozen=True)
class Fetcher:
    """Brings sources into the cache: from the cache itself, the mirror, or (online) upstream."""

    cache: Path
    mirror: Path | None = None
    offline: bool = False

    @classmethod
    def from_env(cls, offline: bool | None = None, mirror: str | None = None) -> "Fetcher":
        mirror = mirror or os.environ.get("BLACKWHEEL_MIRROR")
        if offline is None:
            offline = os.environ.get("BLACKWHEEL_OFFLINE", "") not in ("", "0")
        return cls(default_cache_dir(), Path(mirror) if mirror else None, offline)

    def fetch(self, src: Source) -> Path:
        """A verified archive file (pypi, url) or tree folder (git) for ``src``."""
        if src.sha256.startswith("unavailable"):
            raise SourceError(f"{src.label}: no pin in the recipe ({src.sha256})")
        if src.kind == "git":
            return self._fetch_git(src)
        cached = self._cached_archive(src.sha256)
        if cached:
            return cached
        if self.mirror:
            found = self._mirror_archive(src)
            if found:
                return self._store_archive(found, src, Path(found).name)
        if self.offline:
            raise MissingOffline(f"offline and {src.label} (sha256 {src.sha256[:12]}) is in neither the "
                                 f"cache nor the mirror {self._mirror_hint(src)}")
        url, filename = (self._pypi_url(src) if src.kind == "pypi"
                         else (src.url, Path(urllib.parse.urlparse(src.url).path).name))
        with tempfile.TemporaryDirectory(dir=self._tmp_root()) as tmp:
            part = Path(tmp) / filename
            _download(url, part)
            return self._store_archive(part, src, filename)

    def missing(self, sources) -> list[str]:
        """What ``fetch`` would have to download: offline-readiness check, no network used."""
        out = []
        for src in sources:
            if src.kind == "git":
                if not self._git_cache_dir(src).is_dir() and not self._mirror_git(src):
                    out.append(f"{src.label} -> {self._mirror_hint(src)}")
            elif not self._cached_archive(src.sha256) and not (self.mirror and self._mirror_archive(src)):
                out.append(f"{src.label} -> {self._mirror_hint(src)}")
        return out

    # -- archives
    def _tmp_root(self) -> Path:
        root = self.cache / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        return root

    def _cached_archive(self, sha: str) -> Path | None:
        folder = self.cache / "sources" / "sha256" / sha
        # dot files are copies in progress (or left by an interrupted one), never the archive
        files = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
        return files[0] if files else None

    def _store_archive(self, path: Path, src: Source, filename: str) -> Path:
        actual = sha256_file(path)
        if actual != src.sha256:
            raise HashMismatch(f"{src.label}: sha256 {actual} differs from the pin {src.sha256}")
        dest = self.cache / "sources" / "sha256" / actual / filename
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=dest.parent)
        os.close(fd)  # unique name: two builds may fill the cache at once
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
        return dest

    def _mirror_archive(self, src: Source) -> Path | None:
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
        where = self.mirror or Path("$BLACKWHEEL_MIRROR")
        if src.kind == "git":
            return f"expected a bare repo at {where / 'git' / _git_mirror_path(src.url)}"
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

    # -- git trees
    def _git_cache_dir(self, src: Source) -> Path:
        return self.cache / "sources" / "git" / f"{src.commit}-{src.sha256[:16]}"

    def _mirror_git(self, src: Source) -> Path | None:
        if not self.mirror:
            return None
        cand = self.mirror / "git" / _git_mirror_path(src.url)
        return cand if cand.is_dir() else None

    def _fetch_git(self, src: Source) -> Path:
        final = self._git_cache_dir(src)
        if final.is_dir():
            return final
        mirrored = self._mirror_git(src)
        if mirrored is None and self.offline:
            raise MissingOffline(f"offline and {src.label} is not cached; {self._mirror_hint(src)}")
        with tempfile.TemporaryDirectory(dir=self._tmp_root()) as tmp:
            tree = Path(tmp) / "tree"
            _git_checkout(src, tree, self.mirror if mirrored else None)
            actual = tree_sha256(tree)
            if actual != src.sha256:
                raise HashMismatch(f"{src.label}: tree sha256 {actual} differs from the pin {src.sha256}")
            shutil.rmtree(tree / ".git", ignore_errors=True)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tree, final)
            except OSError:
                if not final.is_dir():
                    raise
        return final


def _git_mirror_path(url: str) -> str:
    """``https://github.com/NVIDIA/cutlass(.git)`` -> ``github.com/NVIDIA/cutlass.git``."""
    parsed = urllib.parse.urlparse(url)
    path = parsed.path.strip("/")
    if not path.endswith(".git"):
        path += ".git"
    return f"{parsed.netloc}/{path}"


def _run_git(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SourceError(f"git {' '.join(args[:3])} failed: {last}")


def _git_checkout(src: Source, tree: Path, mirror: Path | None) -> None:
    """Check out exactly ``src.commit`` (and its submodules) into ``tree``."""
    tree.mkdir(parents=True)
    cfg: list[str] = ["-c", "advice.detachedHead=false", "-c", "protocol.file.allow=always"]
    if mirror is not None:
        # every github/gitlab URL, the superproject's and its submodules', resolves into the mirror
        for host in sorted(p.name for p in (mirror / "git").iterdir() if p.is_dir()):
            cfg += ["-c", f"url.{(mirror / 'git' / host).as_uri()}/.insteadOf=https://{host}/"]
    _run_git([*cfg, "init", "-q"], tree)
    _run_git([*cfg, "fetch", "-q", "--depth", "1", src.url, src.commit], tree)
    _run_git([*cfg, "checkout", "-q", "FETCH_HEAD"], tree)
    if src.submodules:
        only = ["--", *src.submodule_paths] if src.submodule_paths else []
        _run_git([*cfg, "submodule", "update", "-q", "--init", "--recursive", "--depth", "1", *only], tree)


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
        from pip._internal.models.index import PyPI  # pip's default index, not ours
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

    Returns the single top-level folder if there is one (sdists have ``name-version/``), else dest.
    """
    dest.mkdir(parents=True, exist_ok=True)
    name = archive.name
    try:
        if name.endswith((".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")):
            with tarfile.open(archive) as tar:
                for member in tar.getmembers():  # the data filter would strip a leading '/': refuse it
                    _check_member_path(member.name, archive)
                tar.extractall(dest, filter="data")  # rejects absolute, '..', outside links, devices
        elif name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                for member in zf.namelist():
                    _check_member_path(member, archive)
                zf.extractall(dest)
        else:
            raise SourceError(f"{archive}: unknown archive type")
    except tarfile.FilterError as exc:
        raise UnsafeArchive(f"{archive.name}: refused unsafe member: {exc}") from None
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
        raise SourceError(f"{archive.name}: corrupt archive: {exc}") from None
    tops = [p for p in dest.iterdir()]
    return tops[0] if len(tops) == 1 and tops[0].is_dir() else dest


def _check_member_path(member: str, archive: Path) -> None:
    if member.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", member) or ".." in Path(member).parts:
        raise UnsafeArchive(f"{archive.name}: refused unsafe member {member!r}")


# ---- CLI -------------------------------------------------------------------------------------------
def register(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and verify every source of a stack (or one package)")
    p.add_argument("package", nargs="?", help="one recipe (default: all of the stack)")
    p.add_argument("--stack", help="stack name (default: the default stack)")
    p.add_argument("--target", default="blackwell")
    p.add_argument("--offline", action="store_true", default=None, help="read only the cache and mirror")
    p.add_argument("--mirror", help="local mirror folder for air-gapped hosts")
    p.add_argument("--check", action="store_true", help="only list what is missing; fetch nothing")
    p.set_defaults(func=_cmd_fetch)


def _cmd_fetch(args) -> int:
    from .recipe import load_recipe, load_stack
    from .targets import resolve_target

    stack = load_stack(args.stack)
    target = resolve_target(args.target)
    fetcher = Fetcher.from_env(args.offline, args.mirror)
    names = [args.package] if args.package else list(stack.pins)
    sources = []
    for name in names:
        if not stack.pins.get(name):
            raise UsageError(f"stack {stack.name} pins no version of {name}")
        rv = load_recipe(name).version(stack.pins[name])
        sources += [rv.sdist, *rv.resources_for(target, stack.torch)]
    if args.check:
        missing = fetcher.missing(sources)
        for line in missing:
            print(f"missing: {line}")
        print(f"{len(sources) - len(missing)} of {len(sources)} sources present")
        return 1 if missing else 0
    for src in sources:
        path = fetcher.fetch(src)
        print(f"ok  {src.label}  {path}")
    return 0
