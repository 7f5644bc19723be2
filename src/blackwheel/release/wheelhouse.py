"""Wheelhouse: finished wheels with their manifests, placed atomically; reuse by build key.

Layout: ``wheelhouse/<stack>/<target>/<wheel>`` and ``<wheel>.manifest.json`` beside it. The wheel
is written first under a temporary name, the manifest next, and the wheel renamed into place last:
a wheel that is visible always has its manifest, and an interrupted build leaves nothing visible.
Two placements into one folder take turns (a lock on the folder), so the manifest beside a wheel is
always the one written with it.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from ..core.errors import BuildFailed, PublishError
from ..core.settings import Settings
from .manifest import SUFFIX, Manifest, try_read, write_beside
from ..core.fsutil import _temp_beside, disk_full, flocked, record_hash, sha256_file

def default_root() -> Path:
    return Settings.from_env().wheelhouse


def folder(root: Path, stack: str, target: str) -> Path:
    return root / stack / target


def local_version(cuda: str, target_tag: str, variant_tags=(), torch: str | None = None) -> str:
    """``cu130.sm121`` (``cu130.sm90.nofa3`` with a variant off; ``cu130.torch2.11.sm121`` for a wheel
    that links torch 2.11): CUDA, torch, target and variants not at their default in the wheel's
    version, so builds never share a file name."""
    torch_part = [f"torch{_minor_release(torch)}"] if torch else []
    return ".".join([f"cu{cuda.replace('.', '')}", *torch_part, target_tag, *variant_tags])


def torch_requirement(torch: str) -> str:
    """What a wheel that links torch ``torch`` requires of it: the same minor release, whose
    libraries keep the ABI it was built against."""
    return f"torch=={_minor_release(torch)}.*"


def _minor_release(version: str) -> str:
    v = Version(version)
    return f"{v.major}.{v.minor}"


# ---- reuse ---------------------------------------------------------------------------------------
def find_reusable(root: Path, stack: str, target: str, package: str, build_key: str) -> Manifest | None:
    """The manifest of an intact wheel built from exactly these inputs, if there is one."""
    where = folder(root, stack, target)
    for manifest_path in sorted(where.glob(f"*{SUFFIX}")):
        manifest = try_read(manifest_path)
        if manifest is None or manifest.get("build_key") != build_key or manifest.get("package") != package:
            continue
        wheel = where / manifest["wheel"]
        if wheel.is_file() and sha256_file(wheel) == manifest.get("wheel_sha256"):
            return manifest
    return None


# ---- retagging -----------------------------------------------------------------------------------
def _dist_info_dir(zin: zipfile.ZipFile, wheel: Path) -> str:
    """The wheel's one ``*.dist-info`` folder, as spelled inside it (the file name may differ in case)."""
    dirs = {n.split("/", 1)[0] for n in zin.namelist() if n.split("/", 1)[0].endswith(".dist-info")
            and n.endswith("/METADATA") and n.count("/") == 1}
    if len(dirs) != 1:
        raise BuildFailed(f"{wheel.name}: expected one .dist-info folder with METADATA, found {sorted(dirs)}")
    return dirs.pop()


def retag_wheel(wheel: Path, local: str, out_dir: Path, requires: Sequence[str] = ()) -> Path:
    """Rewrite ``wheel`` with version ``<public>+<local>`` (dist-info, .data, METADATA, RECORD);
    ``requires``: ``Requires-Dist`` lines its METADATA gains (those it has already are not repeated)."""
    name, version, build, tags = parse_wheel_filename(wheel.name)
    new_version = f"{Version(str(version)).public}+{local}"
    dist = wheel.name.split("-")[0]
    new_name = wheel.name.replace(f"{dist}-{version}-", f"{dist}-{new_version}-", 1)
    dest = out_dir / new_name
    fd, tmp = _temp_beside(dest)
    os.close(fd)
    try:
        with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
            old_stem = _dist_info_dir(zin, wheel)[: -len(".dist-info")]
            new_stem = f"{old_stem.rsplit('-', 1)[0]}-{new_version}"
            _rewrite_members(zin, zout, old_stem, new_stem, new_version, tuple(requires))
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _rewrite_members(zin: zipfile.ZipFile, zout: zipfile.ZipFile, old_stem: str, new_stem: str,
                     new_version: str, requires: tuple[str, ...] = ()) -> None:
    """Copy every member, renaming ``<old_stem>.dist-info/`` and ``.data/``; write a fresh RECORD."""
    records = io.StringIO()
    writer = csv.writer(records, lineterminator="\n")   # csv: a path may hold a comma
    new_info = f"{new_stem}.dist-info"
    for info in zin.infolist():
        arc = info.filename
        for suffix in (".dist-info/", ".data/"):
            if arc.startswith(old_stem + suffix):
                arc = new_stem + arc[len(old_stem):]
        if arc in (f"{new_info}/RECORD", f"{new_info}/RECORD.jws", f"{new_info}/RECORD.p7s"):
            continue                                      # rewritten below; signatures no longer hold
        data = zin.read(info)
        if arc == f"{new_info}/METADATA":
            data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            data = _with_requirements(data, requires)
        zi = zipfile.ZipInfo(arc, date_time=info.date_time)
        zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
        zout.writestr(zi, data)
        if not arc.endswith("/"):                         # folders have no RECORD line
            writer.writerow([arc, record_hash(data), len(data)])
    writer.writerow([f"{new_info}/RECORD", "", ""])
    zout.writestr(zipfile.ZipInfo(f"{new_info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)), records.getvalue())


def _with_requirements(metadata: bytes, requires: tuple[str, ...]) -> bytes:
    """METADATA with a ``Requires-Dist`` line for each of ``requires`` it lacks, at the end of its
    headers (the description after the first blank line stays as it was)."""
    head, sep, body = metadata.partition(b"\n\n")
    have = set(re.findall(rb"(?m)^Requires-Dist: *(.*?) *$", head))
    lines = [f"Requires-Dist: {r}".encode() for r in requires if r.encode() not in have]
    if not lines:
        return metadata
    return head.rstrip(b"\n") + b"\n" + b"\n".join(lines) + (sep or b"\n") + body


# ---- placing -------------------------------------------------------------------------------------
def place(wheel: Path, manifest: Manifest, root: Path, stack: str, target: str) -> Path:
    """Move ``wheel`` into the wheelhouse with its manifest, atomically; returns the final path."""
    where = folder(root, stack, target)
    where.mkdir(parents=True, exist_ok=True)
    final = where / wheel.name
    fd, tmp = _temp_beside(final)
    os.close(fd)
    try:
        shutil.copyfile(wheel, tmp)   # streamed: a jit-cache wheel is ~2 GB
        sha, size = sha256_file(tmp), os.path.getsize(tmp)
        # One lock for the whole wheelhouse: another placement of this name between our manifest and
        # rename would mismatch them, and a name must not arrive twice with different bytes meanwhile.
        with flocked(root):
            _refuse_a_second_body(root, final, sha)
            write_beside(wheel.name, where, manifest, sha, size)
            os.replace(tmp, final)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if disk_full(exc):
            raise BuildFailed(f"no space left on device placing {wheel.name} into {where}: free some space "
                              "and rerun (nothing half-written was left in the wheelhouse)") from None
        raise
    return final


def _refuse_a_second_body(root: Path, final: Path, sha: str) -> None:
    """One file name, one set of bytes, in the whole wheelhouse: a static index serves one file per
    name, and an index refuses a wheelhouse that holds two. Refused here, under the wheelhouse lock,
    the first placement of a name wins and the second is told why (both hashes); the same bytes in
    another stack, or a rebuild replacing this very file, pass."""
    for other in _placed(root, final.name):
        if other == final:
            continue
        placed = try_read(other.parent / (other.name + SUFFIX))
        if placed is not None and placed.get("wheel_sha256") not in (None, sha):
            raise PublishError(
                f"{final.name} is already in the wheelhouse as {other.relative_to(root)} with sha256 "
                f"{placed['wheel_sha256']}; this one has sha256 {sha}: one name, one set of bytes (an index "
                "serves one file per name); give this build a different local version, or remove the other")


def name_taken_elsewhere(root: Path, stack: str, dist_name: str, version: str, local: str) -> Path | None:
    """A placed wheel of this project and version (``version+local``) in another stack's folder: a build
    here would make the same file name from another torch, and placement would refuse it (above), so
    a build checks this before it compiles."""
    want = (canonicalize_name(dist_name), Version(f"{version}+{local}"))
    for other in _placed(root):
        if other.parents[1].name == stack or not (other.parent / (other.name + SUFFIX)).is_file():
            continue
        try:
            if parse_wheel_filename(other.name)[:2] == want:
                return other
        except InvalidWheelFilename:
            continue
    return None


def _placed(root: Path, name: str = "*.whl"):
    """Wheels in the wheelhouse's ``<stack>/<target>/`` folders, a static index's ``files/`` left out."""
    for path in sorted(root.glob(f"*/*/{name}")):
        if not (path.parents[1] / "simple" / "index.json").is_file():
            yield path


def wheels(root: Path, stack: str | None = None, target: str | None = None) -> list[Path]:
    """Every wheel in the wheelhouse (optionally of one stack / target) that has a manifest."""
    pattern = f"{stack or '*'}/{target or '*'}/*.whl"
    return sorted(p for p in root.glob(pattern) if (p.parent / (p.name + SUFFIX)).is_file())
