"""The build manifest: ``<wheel>.manifest.json`` beside each wheel, written and read here only.

Schema ``blackwheel.manifest/1``: what was built (package, version, stack, target), from what (every
source and patch with its hash, the build key's inputs), with what (toolchain, arch knob, env), how
(wall, memory, jobs, compiler cache, unit profile), the verify verdict, the builder's own section
(FlashInfer: ``aot``), then the wheel's name, sha256 and size, and a seal over all of it
(``manifest_sha256``: an edit after writing is caught). ``Manifest`` types its fields; JSON carries it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TypedDict

from ..core.errors import PublishError
from ..core.fsutil import atomic_write_json


class Manifest(TypedDict, total=False):
    schema: str                  # SCHEMA: a reader refuses any other
    package: str
    dist_name: str
    version: str                 # the wheel's, with its local part (``2.8.3+cu130.sm121``)
    stack: str
    target: str
    target_devices: list[str]
    build_key: str
    inputs: dict                 # everything the build key hashes
    variants: dict               # only when the version has variants
    sources: list[dict]          # each as fetched and verified
    patches: list[dict]
    toolchain: dict
    notes: list[str]             # optional resources left out
    arch: dict                   # knob, value, archs
    env: dict
    build: dict                  # wall_s, peak_mem_gib, jobs, units, log, cache, profile, ...
    verify: dict                 # check.verify's verdict; ``ok`` gates publishing
    aot: dict                    # the flashinfer-aot builder's section
    wheel: str
    wheel_sha256: str
    wheel_size: int
    manifest_sha256: str         # SEAL


SCHEMA = "blackwheel.manifest/1"
SUFFIX = ".manifest.json"
_REQUIRED = ("package", "version", "wheel", "wheel_sha256")
SEAL = "manifest_sha256"   # sha256 of the manifest's canonical JSON without this field


def manifest_digest(manifest: dict) -> str:
    """sha256 of ``manifest``'s canonical JSON (sorted keys, no spaces, UTF-8) without the seal field."""
    body = {key: val for key, val in manifest.items() if key != SEAL}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def sealed(manifest: dict) -> dict:
    """``manifest`` (as JSON would carry it) with its seal field set."""
    body = json.loads(json.dumps({key: val for key, val in manifest.items() if key != SEAL}))
    return {**body, SEAL: manifest_digest(body)}


def seal_state(manifest: dict) -> str:
    """``"sealed"``, or ``"unsealed"`` for a manifest written before manifests carried a seal."""
    return "sealed" if SEAL in manifest else "unsealed"


def load_manifest(path: Path, check_seal: bool = True) -> dict:
    """Read and sanity-check one manifest; a broken one is a one-line error naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PublishError(f"cannot read manifest {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise PublishError(f"{path} is not a blackwheel manifest (expected schema {SCHEMA!r})")
    missing = [key for key in _REQUIRED if not data.get(key)]
    if missing:
        raise PublishError(f"manifest {path} lacks {', '.join(missing)}")
    if check_seal:
        _check_seal(data, path)
    return data


def _check_seal(data: dict, path: Path, wheel_note: str = "") -> None:
    if SEAL in data and data[SEAL] != manifest_digest(data):
        raise PublishError(f"manifest {path} was edited after it was written: its {SEAL} is {data[SEAL]} but its "
                           f"content hashes to {manifest_digest(data)}{wheel_note}")


def find_manifest(wheel: Path, sha256: str, wheelhouse: Path | None) -> Path | None:
    """The manifest beside the wheel, else one in the wheelhouse whose ``wheel_sha256`` is ``sha256``."""
    beside = wheel.with_name(wheel.name + SUFFIX)
    if beside.is_file():
        return beside
    if wheelhouse is None or not wheelhouse.is_dir():
        return None
    for candidate in sorted(wheelhouse.rglob(f"*.whl{SUFFIX}")):
        try:
            if json.loads(candidate.read_text(encoding="utf-8")).get("wheel_sha256") == sha256:
                return candidate
        except (OSError, ValueError):
            continue  # a broken manifest elsewhere does not belong to this wheel
    return None


def checked_manifest(wheel: Path, sha256: str, manifest_path: Path) -> dict:
    """Load the manifest and refuse it unless it describes exactly these bytes."""
    manifest = load_manifest(manifest_path, check_seal=False)
    _check_seal(manifest, manifest_path, "" if manifest["wheel_sha256"] == sha256 else
                f" (it records wheel_sha256 {manifest['wheel_sha256']}, {wheel.name} has sha256 {sha256})")
    if manifest["wheel_sha256"] != sha256:
        raise PublishError(
            f"{wheel.name} has sha256 {sha256} but its manifest {manifest_path} records "
            f"{manifest['wheel_sha256']}: the wheel was changed after it was built"
        )
    return manifest


def verify_refusal(manifest: dict | None, wheel_name: str) -> str | None:
    """Why a wheel may not be published without ``--allow-unverified`` (None: it may)."""
    if manifest is None:
        return f"{wheel_name} has no manifest (no {wheel_name}{SUFFIX} beside it)"
    verdict = manifest.get("verify") or {}
    if verdict.get("ok") is not True:
        return f"{wheel_name} did not pass verify (manifest verify.ok = {verdict.get('ok')!r})"
    return None


def read_manifest(wheel: Path) -> Manifest:
    """The manifest beside a wheel of the wheelhouse (placed with it: no seal check needed)."""
    return json.loads((wheel.parent / (wheel.name + SUFFIX)).read_text())


def try_read(path: Path) -> Manifest | None:
    """A manifest file, or None when it is unreadable or not one (a wheelhouse scan skips it)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("wheel") else None


def write_beside(wheel_name: str, folder: Path, manifest: Manifest, sha256: str, size: int) -> Path:
    """Complete ``manifest`` with the wheel it describes and its schema, seal it, write it atomically."""
    whole: Manifest = {**manifest, "schema": SCHEMA, "wheel": wheel_name, "wheel_sha256": sha256, "wheel_size": size}
    return atomic_write_json(folder / (wheel_name + SUFFIX), sealed(whole))
