"""A static package index of the wheelhouse (PEP 503 HTML + PEP 691 JSON), and the CLI of publishing.

Layout of the index (default ``wheelhouse/index/``)::

    simple/index.html, simple/index.json                 # every project
    simple/<project>/index.html, simple/<project>/index.json
    files/<wheel>                                         # hard link (or copy) of the built wheel
    files/<wheel>.metadata                                # its METADATA (PEP 658 / 714), hash in the pages
    files/<wheel>.manifest.json                           # the build manifest
    files/<wheel>.cdx.json                                # CycloneDX SBOM made from the manifest

pip and uv install from it with ``--index-url file://<wheelhouse>/index/simple/`` or from any static
HTTP server that serves the folder. The index is built in a temporary folder beside ``out`` and
swapped in whole, so a reader sees the old index or the new one, never a mix; when nothing changed
the old index is kept untouched (same bytes, same inodes).
"""

from __future__ import annotations

import ctypes
import hashlib
import html
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from pathlib import Path
from urllib.parse import quote

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from ..core.errors import PublishError
from ..core.fsutil import sha256_file, temp_dir_beside
from .manifest import SUFFIX as MANIFEST_SUFFIX
from .manifest import checked_manifest, verify_refusal
from .provenance import SBOM_SUFFIX, sbom_bytes

API_VERSION = "1.1"  # PEP 691 / PEP 700


@dataclass(frozen=True)
class Wheel:
    """One built wheel with what the index needs to say about it."""

    path: Path
    project: str            # PEP 503 normalised
    display_name: str       # Name: from METADATA
    version: str
    sha256: str
    size: int
    metadata: bytes         # the dist-info METADATA file (served as <wheel>.metadata)
    requires_python: str | None
    manifest: dict | None
    manifest_path: Path | None

    @property
    def filename(self) -> str:
        return self.path.name


def _read_metadata(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(names) != 1:
                raise PublishError(f"{path.name} has {len(names)} .dist-info/METADATA files; expected one")
            return zf.read(names[0])
    except (OSError, zipfile.BadZipFile) as exc:
        raise PublishError(f"cannot read wheel {path}: {exc}") from None


def read_wheel(path: Path) -> Wheel:
    """Inspect one wheel: name and version from the file name, METADATA, hash, manifest beside it."""
    try:
        name, version, _, _ = parse_wheel_filename(path.name)
    except InvalidWheelFilename as exc:
        raise PublishError(f"{path}: {exc}") from None
    metadata = _read_metadata(path)
    headers = BytesHeaderParser().parsebytes(metadata)
    sha = sha256_file(path)
    manifest_path = path.with_name(path.name + MANIFEST_SUFFIX)
    manifest = checked_manifest(path, sha, manifest_path) if manifest_path.is_file() else None
    return Wheel(
        path=path, project=canonicalize_name(name), display_name=headers.get("Name") or str(name),
        version=str(version), sha256=sha, size=path.stat().st_size, metadata=metadata,
        requires_python=headers.get("Requires-Python"), manifest=manifest,
        manifest_path=manifest_path if manifest else None,
    )


def find_wheels(wheelhouse: Path, stack: str | None = None, target: str | None = None,
                skip: Path | None = None) -> list[Path]:
    """``wheelhouse/<stack>/<target>/*.whl``, optionally of one stack / target, never inside ``skip``."""
    if not wheelhouse.is_dir():
        raise PublishError(f"wheelhouse {wheelhouse} does not exist; build something first")
    found = []
    for path in sorted(wheelhouse.glob("*/*/*.whl")):
        rel = path.relative_to(wheelhouse).parts
        inside_skip = skip is not None and path.resolve().is_relative_to(skip.resolve())
        if rel[0].startswith(".") or rel[0] == "index" or inside_skip:  # never index the index
            continue
        if (stack is None or rel[0] == stack) and (target is None or rel[1] == target):
            found.append(path)
    if not found:
        where = f" for stack {stack or '*'} target {target or '*'}"
        raise PublishError(f"no wheels in {wheelhouse}/<stack>/<target>/{where}")
    return found


def select_wheels(paths: list[Path], allow_unverified: bool = False) -> list[Wheel]:
    """Read the wheels, refuse unverified ones and name clashes, drop byte-identical duplicates."""
    wheels = [read_wheel(p) for p in paths]
    if not allow_unverified:
        refusals = [r for r in (verify_refusal(w.manifest, w.filename) for w in wheels) if r]
        if refusals:
            raise PublishError("; ".join(refusals) + " (pass --allow-unverified to publish anyway)")
    by_name: dict[str, Wheel] = {}
    for wheel in wheels:
        seen = by_name.setdefault(wheel.filename, wheel)
        if seen.sha256 != wheel.sha256:
            raise PublishError(
                f"two different wheels named {wheel.filename}: {seen.path} (sha256 {seen.sha256}) and "
                f"{wheel.path} (sha256 {wheel.sha256}); give them different local versions"
            )
    return sorted(by_name.values(), key=lambda w: (w.project, Version(w.version), w.filename))


# ---- rendering ---------------------------------------------------------------------------------
def _dumps(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _page(title: str, links: list[str]) -> bytes:
    body = "\n".join(f"    {link}<br>" for link in links)
    return (
        "<!DOCTYPE html>\n<html>\n  <head>\n"
        f'    <meta name="pypi:repository-version" content="{API_VERSION}">\n'
        f"    <title>{html.escape(title)}</title>\n  </head>\n  <body>\n"
        f"    <h1>{html.escape(title)}</h1>\n{body}\n  </body>\n</html>\n"
    ).encode("utf-8")


def _file_link(wheel: Wheel) -> str:
    meta_hash = f"sha256={_sha256_bytes(wheel.metadata)}"
    attrs = [f'href="../../files/{quote(wheel.filename)}#sha256={wheel.sha256}"']
    if wheel.requires_python:
        attrs.append(f'data-requires-python="{html.escape(wheel.requires_python)}"')
    attrs += [f'data-dist-info-metadata="{meta_hash}"', f'data-core-metadata="{meta_hash}"']
    return f"<a {' '.join(attrs)}>{html.escape(wheel.filename)}</a>"


def _file_json(wheel: Wheel) -> dict:
    meta = {"sha256": _sha256_bytes(wheel.metadata)}
    entry = {
        "filename": wheel.filename, "url": f"../../files/{quote(wheel.filename)}",
        "hashes": {"sha256": wheel.sha256}, "size": wheel.size, "yanked": False,
        "core-metadata": meta, "dist-info-metadata": meta,
    }
    if wheel.requires_python:
        entry["requires-python"] = wheel.requires_python
    return entry


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_index(wheels: list[Wheel]) -> dict[str, bytes]:
    """Every page of the index, by path relative to the index root."""
    pages: dict[str, bytes] = {}
    projects: dict[str, list[Wheel]] = {}
    for wheel in wheels:
        projects.setdefault(wheel.project, []).append(wheel)
    for project, files in sorted(projects.items()):
        versions = sorted({w.version for w in files}, key=Version)
        pages[f"simple/{project}/index.html"] = _page(f"Links for {project}", [_file_link(w) for w in files])
        pages[f"simple/{project}/index.json"] = _dumps({
            "meta": {"api-version": API_VERSION}, "name": project,
            "versions": versions, "files": [_file_json(w) for w in files],
        })
    pages["simple/index.html"] = _page("Simple index", [f'<a href="{p}/">{p}</a>' for p in sorted(projects)])
    pages["simple/index.json"] = _dumps({
        "meta": {"api-version": API_VERSION},
        "projects": [{"name": files[0].display_name} for _, files in sorted(projects.items())],
    })
    return pages


# ---- writing and swapping ----------------------------------------------------------------------
def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # no second copy of a 1.9 GB wheel when the index lives in the wheelhouse
    except OSError:
        shutil.copyfile(src, dst)


def _fill(root: Path, wheels: list[Wheel]) -> None:
    files = root / "files"
    files.mkdir(parents=True)
    for wheel in wheels:
        _link_or_copy(wheel.path, files / wheel.filename)
        (files / f"{wheel.filename}.metadata").write_bytes(wheel.metadata)
        if wheel.manifest_path is not None:
            shutil.copyfile(wheel.manifest_path, files / f"{wheel.filename}{MANIFEST_SUFFIX}")
            (files / f"{wheel.filename}{SBOM_SUFFIX}").write_bytes(sbom_bytes(wheel.manifest))
    for rel, data in render_index(wheels).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _tree(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def same_tree(a: Path, b: Path) -> bool:
    """Do two folders hold the same files with the same bytes?"""
    if not b.is_dir():
        return False
    ta, tb = _tree(a), _tree(b)
    if ta.keys() != tb.keys():
        return False
    for rel, pa in ta.items():
        pb = tb[rel]
        if os.path.samefile(pa, pb):
            continue
        if pa.stat().st_size != pb.stat().st_size or pa.read_bytes() != pb.read_bytes():
            return False
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_in(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new)  # it now holds the previous index
    else:  # two renames: a reader may briefly find no index, never half of one
        old = temp_dir_beside(out, ".old")
        os.rename(out, old / out.name)
        os.rename(new, out)
        shutil.rmtree(old)


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "simple" / "index.json").is_file():
        raise PublishError(f"{out} exists and is not a blackwheel index; choose an empty or new folder")


@dataclass(frozen=True)
class IndexReport:
    out: Path
    wheels: list[Wheel]
    changed: bool

    @property
    def simple_url(self) -> str:
        return self.out.resolve().joinpath("simple").as_uri() + "/"


def build_static_index(wheelhouse: Path, out: Path | None = None, *, stack: str | None = None,
                       target: str | None = None, allow_unverified: bool = False) -> IndexReport:
    """Write (or refresh) the static index of every wheel under ``wheelhouse``."""
    wheelhouse = Path(wheelhouse)
    out = Path(out) if out is not None else wheelhouse / "index"
    _check_out(out)
    wheels = select_wheels(find_wheels(wheelhouse, stack, target, skip=out), allow_unverified)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out, ".new")
    try:
        _fill(tmp, wheels)
        if same_tree(tmp, out):
            shutil.rmtree(tmp)
            return IndexReport(out, wheels, changed=False)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the index is meant to be served
        _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return IndexReport(out, wheels, changed=True)
