"""Upload wheels to a package index with the upload API (pypiserver, Nexus, Artifactory, GitLab,
devpi, Warehouse), and the smoke install that proves an index serves an installable stack.

Rules:
- Credentials come only from the environment (``BLACKWHEEL_INDEX_USER`` / ``BLACKWHEEL_INDEX_PASSWORD``,
  else ``TWINE_USERNAME`` / ``TWINE_PASSWORD``) or from keyring (service = the upload URL, as twine
  does). They reach twine through its environment, never its command line, and are scrubbed from
  every line we print, log or raise.
- Before uploading anything, the index's simple API is asked what it holds (see ``simple_url_for``):
  a file with the same name and sha256 is skipped; the same name with other bytes stops the whole
  run, naming both hashes, before any upload. Other bytes that are the start of ours are named as
  what they are, a cut-off upload (pypiserver writes an upload in place: a server killed while
  writing keeps the part it had), to be removed from the index before a rerun.
- Files are uploaded one per twine call, so a failure midway can say exactly which files of that
  package version are up and which are not; a rerun skips the ones already there.
- Manifests and SBOMs are not dist files and upload servers reject them; they travel in the static
  index (``wheelhouse/index/files/``), which ``blackwheel publish --to`` refreshes before uploading.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urljoin, urlsplit, urlunsplit
from urllib.request import HTTPRedirectHandler, Request, build_opener

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from ..core.errors import PublishError
from .index import Wheel, select_wheels

CREDENTIAL_VARS = (("BLACKWHEEL_INDEX_USER", "BLACKWHEEL_INDEX_PASSWORD"), ("TWINE_USERNAME", "TWINE_PASSWORD"))
SIMPLE_ACCEPT = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"


def check_url(url: str, what: str = "index URL") -> str:
    """An http(s) URL with a host and no credentials in it, else a one-line error."""
    parts = urlsplit(url or "")
    if "@" in parts.netloc or (parts.scheme not in ("http", "https") and "@" in (url or "")):
        raise PublishError(f"{what} must not carry credentials; set TWINE_USERNAME / TWINE_PASSWORD instead")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PublishError(f"{what} {url!r} needs a scheme and a host, e.g. http://127.0.0.1:8080/")
    return url


def simple_url_for(upload_url: str) -> str:
    """The simple API beside an upload URL. The rule: an upload path ending in ``/legacy`` (Warehouse)
    is replaced by ``/simple/``; any other upload URL gets ``simple/`` appended (pypiserver, Nexus,
    Artifactory, GitLab). Other servers (devpi: ``+simple/``) need ``--simple-url``.

    >>> simple_url_for("http://127.0.0.1:8080")
    'http://127.0.0.1:8080/simple/'
    >>> simple_url_for("https://upload.example/legacy/")
    'https://upload.example/simple/'
    >>> simple_url_for("https://repo.example/repository/pypi-internal/")
    'https://repo.example/repository/pypi-internal/simple/'
    """
    parts = urlsplit(upload_url)
    path = parts.path.rstrip("/")
    path = path[: -len("legacy")] if path.endswith("/legacy") else path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path + "simple/", "", ""))


# ---- credentials -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @property
    def basic(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()

    def scrub(self, text: str) -> str:
        """``text`` with the password in every spelling we might have sent replaced by ``***``."""
        for secret in sorted({self.password, quote(self.password, safe=""), self.basic}, key=len, reverse=True):
            if secret:
                text = text.replace(secret, "***")
        return text


def _keyring_password(service: str, username: str) -> str | None:
    try:
        import keyring  # optional: only a publish without credentials in the environment asks it

        return keyring.get_password(service, username)
    except Exception:  # no keyring installed or no usable backend: same as no stored password
        return None


def credentials(upload_url: str, environ: Mapping[str, str] | None = None) -> Credentials:
    environ = os.environ if environ is None else environ
    for user_var, password_var in CREDENTIAL_VARS:
        user = environ.get(user_var)
        password = environ.get(password_var) or (user and _keyring_password(upload_url, user))
        if user and password:
            return Credentials(user, password)
    raise PublishError(
        "no credentials for the index: set TWINE_USERNAME and TWINE_PASSWORD (or BLACKWHEEL_INDEX_USER and "
        "BLACKWHEEL_INDEX_PASSWORD) in the environment, or keep the password in keyring under the upload URL"
    )


# ---- what the index already holds --------------------------------------------------------------
class _SameOrigin(HTTPRedirectHandler):
    """Follow redirects on the index's own host only: pypiserver sends unknown projects to its
    fallback index, and our Authorization header must never follow it there."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urlsplit(newurl)[:2] != urlsplit(req.full_url)[:2]:
            raise HTTPError(req.full_url, 404, "redirected off the index: not here", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag, attrs):
        href = dict(attrs).get("href")
        if tag == "a" and href:
            self.hrefs.append(href)


def _http_problem(code: int, url: str) -> str:
    if code == 401:
        return (f"the index at {url} rejected the credentials (HTTP 401 Unauthorized): "
                "check TWINE_USERNAME / TWINE_PASSWORD")
    if code == 403:
        return (f"the index at {url} refused access (HTTP 403 Forbidden): "
                "wrong credentials, or the user lacks the right to upload there")
    return f"the index at {url} answered HTTP {code}"


def _get(url: str, creds: Credentials, accept: str = "*/*") -> tuple[str, bytes]:
    request = Request(url, headers={"Accept": accept, "Authorization": f"Basic {creds.basic}"})
    try:
        with build_opener(_SameOrigin).open(request, timeout=60) as resp:
            return resp.headers.get("Content-Type", ""), resp.read()
    except HTTPError as exc:
        if exc.code in (404, 410):
            raise
        raise PublishError(_http_problem(exc.code, url)) from None
    except (URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PublishError(
            f"the index at {url} is unreachable ({creds.scrub(str(reason))}): is the server running?") from None


def remote_files(simple_url: str, project: str, creds: Credentials) -> dict[str, tuple[str, str]]:
    """``{filename: (sha256, url)}`` of one project on the index (empty if the project is not there)."""
    page = urljoin(simple_url, f"{project}/")
    try:
        ctype, body = _get(page, creds, SIMPLE_ACCEPT)
    except HTTPError:
        return {}
    try:
        if "json" in ctype:  # PEP 691
            links = {f["filename"]: (f.get("hashes", {}).get("sha256"), urljoin(page, f["url"]))
                     for f in json.loads(body)["files"]}
            return {name: (sha or _hash_remote(url, creds), url) for name, (sha, url) in links.items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise PublishError(f"the index's page {page} is not a PEP 691 project page ({exc})") from None
    parser = _Links()  # PEP 503 HTML
    parser.feed(body.decode("utf-8", "replace"))
    found = {}
    for href in parser.hrefs:
        path, _, fragment = href.partition("#")
        name = unquote(urlsplit(path).path.rsplit("/", 1)[-1])
        sha = fragment[len("sha256="):] if fragment.startswith("sha256=") else ""
        found[name] = (sha or _hash_remote(urljoin(page, path), creds), urljoin(page, path))
    return found


def _hash_remote(url: str, creds: Credentials) -> str:
    return hashlib.sha256(_get(url, creds)[1]).hexdigest()  # the page gave no hash: fetch the file


# ---- planning and uploading --------------------------------------------------------------------
@dataclass
class Release:
    """The files of one package version: what is already on the index and what is to upload."""

    project: str
    version: str
    present: list[Wheel] = field(default_factory=list)
    missing: list[Wheel] = field(default_factory=list)
    uploaded: list[Wheel] = field(default_factory=list)


def plan_releases(wheels: list[Wheel], simple_url: str, creds: Credentials) -> list[Release]:
    """Compare every wheel with the index; refuse (before any upload) if a name holds other bytes."""
    releases: dict[tuple[str, str], Release] = {}
    listings: dict[str, dict[str, str]] = {}
    clashes = []
    for wheel in wheels:
        release = releases.setdefault((wheel.project, wheel.version), Release(wheel.project, wheel.version))
        remote = listings.setdefault(wheel.project, remote_files(simple_url, wheel.project, creds))
        theirs, url = remote.get(wheel.filename, (None, None))
        if theirs is None:
            release.missing.append(wheel)
        elif theirs == wheel.sha256:
            release.present.append(wheel)
        else:
            clashes.append(_cut_off(wheel, url, creds) or f"{wheel.filename} is on the index with sha256 {theirs} "
                           f"but {wheel.path} has sha256 {wheel.sha256}")
    if clashes:
        other = [c for c in clashes if "partial upload" not in c]
        raise PublishError("; ".join(clashes) + ": nothing uploaded" + (
            " (a published file never changes; rebuild with a new local version)" if other else ""))
    return list(releases.values())


def _cut_off(wheel: Wheel, url: str, creds: Credentials) -> str | None:
    """The clash, if the index's file is a proper start of ours: an upload cut off midway."""
    remote = _get(url, creds)[1]
    size = wheel.path.stat().st_size
    with open(wheel.path, "rb") as f:
        if len(remote) < size and f.read(len(remote)) == remote:
            return (f"{wheel.filename} on the index is a partial upload ({len(remote)} of {size} bytes, cut off "
                    f"midway): remove it from the index, then rerun")
    return None


def _twine_env(creds: Credentials) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TWINE_", "BLACKWHEEL_INDEX_")) or k in ("TWINE_CERT", "TWINE_CLIENT_CERT")}
    env.update(TWINE_USERNAME=creds.username, TWINE_PASSWORD=creds.password, TWINE_NON_INTERACTIVE="1",
               NO_COLOR="1", COLUMNS="200")  # plain, unwrapped lines to read the HTTP status from
    return env


def _twine_problem(output: str, url: str) -> str:
    code = re.search(r"HTTPError: (\d{3})", output)
    if code and int(code.group(1)) in (401, 403):
        return _http_problem(int(code.group(1)), url)
    if re.search(r"Connection refused|Max retries exceeded|ConnectionError|Name or service not known", output):
        return f"the index at {url} is unreachable: is the server running?"
    if re.search(r"already exist", output, re.I):
        return f"the index at {url} says the file already exists although its simple page did not list it"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return f"twine upload failed: {lines[-1] if lines else 'no output'}"


def upload_one(wheel: Wheel, url: str, creds: Credentials, echo: Callable[[str], None]) -> str | None:
    """Upload one file with twine; None on success, else a one-line scrubbed reason."""
    cmd = [sys.executable, "-m", "twine", "upload", "--repository-url", url, "--non-interactive",
           "--disable-progress-bar", str(wheel.path)]
    echo("$ " + shlex.join(cmd))
    proc = subprocess.run(cmd, env=_twine_env(creds), capture_output=True, text=True)
    output = creds.scrub(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout + proc.stderr))
    return None if proc.returncode == 0 else _twine_problem(output, url)


@dataclass
class PublishReport:
    url: str
    releases: list[Release]

    def summary(self) -> str:
        lines = []
        for r in self.releases:
            for w in r.uploaded:
                lines.append(f"  uploaded  {w.filename}  sha256 {w.sha256}")
            for w in r.present:
                lines.append(f"  present   {w.filename}  (same sha256 already on the index)")
        return "\n".join(lines + [f"published to {self.url}: {sum(len(r.uploaded) for r in self.releases)} "
                                  f"uploaded, {sum(len(r.present) for r in self.releases)} already there"])


def _upload_release(release: Release, url: str, creds: Credentials, echo) -> None:
    for wheel in list(release.missing):
        problem = upload_one(wheel, url, creds, echo)
        if problem:
            done = ", ".join(w.filename for w in release.uploaded + release.present) or "nothing"
            left = ", ".join(w.filename for w in release.missing)
            raise PublishError(f"{problem}; {release.project} {release.version} is incomplete: on the index: "
                               f"{done}; not uploaded: {left}; rerun to finish (files already there are skipped)")
        release.missing.remove(wheel)
        release.uploaded.append(wheel)


def publish(wheels: Iterable[Path], url: str, *, simple_url: str | None = None, allow_unverified: bool = False,
            environ: Mapping[str, str] | None = None, echo: Callable[[str], None] = print) -> PublishReport:
    """Upload ``wheels`` to the index at ``url``; skip files already there with the same bytes."""
    url = check_url(url, "--to URL")
    simple_url = check_url(simple_url, "--simple-url").rstrip("/") + "/" if simple_url else simple_url_for(url)
    selected = select_wheels([Path(w) for w in wheels], allow_unverified)
    creds = credentials(url, environ)
    releases = plan_releases(selected, simple_url, creds)
    for release in releases:
        _upload_release(release, url, creds, lambda line: echo(creds.scrub(line)))
    return PublishReport(url, releases)


# ---- the install side --------------------------------------------------------------------------
IMPORT_NAMES = {"flash-attn": "flash_attn", "flashinfer-python": "flashinfer", "vllm": "vllm",
                "flashinfer-jit-cache": "flashinfer_jit_cache", "flashinfer-cubin": "flashinfer_cubin"}
_PIP_KEEP = ("PIP_CERT", "PIP_CLIENT_CERT", "PIP_DEFAULT_TIMEOUT", "PIP_PROXY", "PIP_CACHE_DIR")


@dataclass
class SmokeResult:
    venv: Path
    installed: dict[str, str]           # distribution -> version, for each import that worked
    failures: dict[str, str]            # "pip" or an import name -> the last lines of its output
    log: str = field(repr=False, default="")

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        good = ", ".join(f"{k} {v}" for k, v in self.installed.items())
        bad = "; ".join(f"{k}: {v}" for k, v in self.failures.items())
        return f"smoke install in {self.venv}: " + ("OK " + good if self.ok else "FAILED " + bad)


def _pip_env() -> dict[str, str]:
    """Only the index URLs we pass count: no pip config files, no PIP_* index settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k in _PIP_KEEP}
    env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(ln.strip() for ln in text.strip().splitlines()[-lines:])


def smoke_install(index_url: str, packages: Iterable[str], venv_dir: Path,
                  extra_index_urls: Iterable[str] = (), imports: Mapping[str, str] | None = None) -> SmokeResult:
    """Fresh venv, ``pip install --index-url`` the packages, import each one; never raises for a failed
    install (the result says what failed), only for bad arguments."""
    packages = list(packages)
    try:
        dists = [canonicalize_name(Requirement(p).name) for p in packages]
    except InvalidRequirement as exc:
        raise PublishError(f"not a package requirement: {exc}") from None
    venv_dir = Path(venv_dir)
    if venv_dir.exists() and any(venv_dir.iterdir()) and not (venv_dir / "pyvenv.cfg").is_file():
        raise PublishError(f"{venv_dir} exists and is not a venv; give an empty or new folder")
    # ensurepip costs ~15 s here; our own pip can install into the bare venv with --python instead
    own_pip = importlib.util.find_spec("pip") is not None
    venv.EnvBuilder(clear=True, with_pip=not own_pip).create(venv_dir)
    python = str(venv_dir / "bin" / "python")
    pip_cmd = [sys.executable, "-m", "pip", "--python", python] if own_pip else [python, "-m", "pip"]
    cmd = pip_cmd + ["install", "--no-input", "--disable-pip-version-check", "--index-url", index_url]
    for extra in extra_index_urls:
        cmd += ["--extra-index-url", extra]
    pip = subprocess.run(cmd + packages, env=_pip_env(), capture_output=True, text=True)
    log = "$ " + shlex.join(cmd + packages) + "\n" + pip.stdout + pip.stderr
    if pip.returncode != 0:
        return SmokeResult(venv_dir, {}, {"pip": _tail(pip.stdout + pip.stderr)}, log)
    installed, failures = {}, {}
    for dist in dists:
        module = (imports or {}).get(dist) or IMPORT_NAMES.get(dist) or dist.replace("-", "_")
        code = f"import importlib.metadata as m, {module}; print(m.version({dist!r}))"
        run = subprocess.run([python, "-c", code], capture_output=True, text=True)
        log += f"$ python -c {code!r}\n{run.stdout}{run.stderr}"
        if run.returncode == 0:
            installed[dist] = run.stdout.strip()
        else:
            failures[module] = _tail(run.stderr)
    return SmokeResult(venv_dir, installed, failures, log)
