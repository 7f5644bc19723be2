"""Wheelhouse: finished wheels with their manifests, placed atomically; reuse by build key.

Layout: ``wheelhouse/<stack>/<target>/<wheel>`` and ``<wheel>.manifest.json`` beside it. The wheel
is written first under a temporary name, the manifest next, and the wheel renamed into place last:
a wheel that is visible always has its manifest, and an interrupted build leaves nothing visible.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

from packaging.utils import parse_wheel_filename
from packaging.version import Version

from .fsutil import _temp_beside, atomic_write_json, sha256_file

MANIFEST_SCHEMA = "blackwheel.manifest/1"
MANIFEST_SUFFIX = ".manifest.json"


def default_root() -> Path:
    from .recipe import PROJECT_ROOT

    return Path(os.environ.get("BLACKWHEEL_WHEELHOUSE", PROJECT_ROOT / "wheelhouse"))


def folder(root: Path, stack: str, target: str) -> Path:
    return root / stack / target


def local_version(cuda: str, target_tag: str) -> str:
    """``cu130.sm121``: CUDA and target in the wheel's version, so builds never share a file name."""
    return f"cu{cuda.replace('.', '')}.{target_tag}"


# ---- reuse ---------------------------------------------------------------------------------------
def find_reusable(root: Path, stack: str, target: str, package: str, build_key: str) -> dict | None:
    """The manifest of an intact wheel built from exactly these inputs, if there is one."""
    where = folder(root, stack, target)
    for manifest_path in sorted(where.glob(f"*{MANIFEST_SUFFIX}")):
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if manifest.get("build_key") != build_key or manifest.get("package") != package:
            continue
        wheel = where / manifest["wheel"]
        if wheel.is_file() and sha256_file(wheel) == manifest.get("wheel_sha256"):
            return manifest
    return None


# ---- retagging -----------------------------------------------------------------------------------
def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def retag_wheel(wheel: Path, local: str, out_dir: Path) -> Path:
    """Rewrite ``wheel`` with version ``<public>+<local>`` (dist-info, METADATA, RECORD)."""
    name, version, build, tags = parse_wheel_filename(wheel.name)
    public = Version(str(version)).public
    new_version = f"{public}+{local}"
    dist = wheel.name.split("-")[0]
    old_info, new_info = f"{dist}-{version}.dist-info", f"{dist}-{new_version}.dist-info"
    new_name = wheel.name.replace(f"{dist}-{version}-", f"{dist}-{new_version}-", 1)
    dest = out_dir / new_name
    fd, tmp = _temp_beside(dest)
    os.close(fd)
    records: list[str] = []
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            arc = info.filename
            if arc.startswith(old_info + "/"):
                arc = new_info + arc[len(old_info):]
                if arc.endswith("/RECORD"):
                    continue
                if arc.endswith("/METADATA"):
                    data = re.sub(rb"(?m)^Version: .*$", f"Version: {new_version}".encode(), data, count=1)
            zi = zipfile.ZipInfo(arc, date_time=info.date_time)
            zi.external_attr, zi.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            zout.writestr(zi, data)
            records.append(f"{arc},{_record_hash(data)},{len(data)}")
        records.append(f"{new_info}/RECORD,,")
        zout.writestr(zipfile.ZipInfo(f"{new_info}/RECORD", date_time=(1980, 1, 1, 0, 0, 0)),
                      "\n".join(records) + "\n")
    os.replace(tmp, dest)
    return dest


# ---- placing -------------------------------------------------------------------------------------
def place(wheel: Path, manifest: dict, root: Path, stack: str, target: str) -> Path:
    """Move ``wheel`` into the wheelhouse with its manifest, atomically; returns the final path."""
    where = folder(root, stack, target)
    where.mkdir(parents=True, exist_ok=True)
    final = where / wheel.name
    fd, tmp = _temp_beside(final)
    os.close(fd)
    try:
        with open(wheel, "rb") as src, open(tmp, "wb") as dst:
            dst.write(src.read())
        manifest = {**manifest, "schema": MANIFEST_SCHEMA, "wheel": wheel.name,
                    "wheel_sha256": sha256_file(tmp), "wheel_size": os.path.getsize(tmp)}
        atomic_write_json(where / (wheel.name + MANIFEST_SUFFIX), manifest)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final


def wheels(root: Path, stack: str | None = None, target: str | None = None) -> list[Path]:
    """Every wheel in the wheelhouse (optionally of one stack / target) that has a manifest."""
    pattern = f"{stack or '*'}/{target or '*'}/*.whl"
    return sorted(p for p in root.glob(pattern) if (p.parent / (p.name + MANIFEST_SUFFIX)).is_file())


def read_manifest(wheel: Path) -> dict:
    return json.loads((wheel.parent / (wheel.name + MANIFEST_SUFFIX)).read_text())
