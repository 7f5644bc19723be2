"""Where every byte of a wheel came from: its build manifest, a CycloneDX SBOM made from it, and
the ``blackwheel provenance WHEEL`` report.

The build stage writes ``<wheel>.manifest.json`` beside each wheel (schema ``blackwheel.manifest/1``).
This module only reads manifests: it finds the one that belongs to a wheel (beside it, or anywhere
in the wheelhouse by the wheel's sha256), checks that the wheel's bytes are the ones the manifest
describes, and turns it into a CycloneDX 1.6 SBOM (``<wheel>.cdx.json``): one component per source
with its purl and hash, each patch as a file component and as a pedigree patch of the wheel, and
the toolchain as the BOM's tools.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from urllib.parse import quote, urlparse

from packaging.utils import canonicalize_name

from ..core.errors import PublishError, UsageError
from ..core.fsutil import sha256_file
from .manifest import checked_manifest, find_manifest, seal_state
from ..core.targets import TARGETS, CudaArch, covers

SBOM_SUFFIX = ".cdx.json"
CYCLONEDX_SPEC = "1.6"


# ---- CycloneDX ---------------------------------------------------------------------------------
def _purl(kind: str, name: str, version: str | None, namespace: str = "", **qualifiers: str) -> str:
    ns = f"{quote(namespace, safe='/')}/" if namespace else ""
    text = f"pkg:{kind}/{ns}{quote(name, safe='')}"
    if version:
        text += "@" + quote(str(version), safe="")
    pairs = [f"{key}={quote(str(val), safe='')}" for key, val in sorted(qualifiers.items()) if val]
    return text + ("?" + "&".join(pairs) if pairs else "")


def _github_repo(url: str) -> tuple[str, str] | None:
    parsed = urlparse(url or "")
    parts = [p for p in parsed.path.split("/") if p]
    if parsed.hostname != "github.com" or len(parts) < 2:
        return None
    return parts[0].lower(), parts[1].lower().removesuffix(".git")


def source_purl(source: dict) -> str:
    """pkg:pypi for registry sources, pkg:github for GitHub repos and archives, else pkg:generic."""
    name, kind, url = source.get("name", "unknown"), source.get("kind"), source.get("url") or ""
    version = source.get("commit") or source.get("version")
    sha = source.get("sha256")
    if kind == "pypi":
        return _purl("pypi", canonicalize_name(name), source.get("version"))
    repo = _github_repo(url)
    if repo:
        return _purl("github", repo[1], version, namespace=repo[0], download_url=url if kind == "url" else "")
    if kind == "git":
        commit = f"@{source['commit']}" if source.get("commit") else ""
        return _purl("generic", name, version, vcs_url=f"git+{url}{commit}")
    return _purl("generic", name, version, download_url=url, checksum=f"sha256:{sha}" if sha else "")


def _hashes(sha256: str | None) -> list[dict]:
    return [{"alg": "SHA-256", "content": sha256}] if sha256 else []


def _props(**values) -> list[dict]:
    return [{"name": f"blackwheel:{key}", "value": str(val)} for key, val in values.items() if val not in (None, "")]


def _source_component(index: int, source: dict) -> dict:
    url = source.get("url")
    component = {
        "type": "library",
        "bom-ref": f"source-{index}:{source.get('name', 'unknown')}",
        "name": source.get("name", "unknown"),
        "version": str(source.get("commit") or source.get("version") or ""),
        "purl": source_purl(source),
        "hashes": _hashes(source.get("sha256")),
        "externalReferences": [{"type": "vcs" if source.get("kind") == "git" else "distribution", "url": url}]
        if url else [],
        "properties": _props(role=source.get("role"), kind=source.get("kind"), commit=source.get("commit")),
    }
    return {key: val for key, val in component.items() if val not in ("", [])}


def _patch_component(patch: dict) -> dict:
    component = {
        "type": "file",
        "bom-ref": f"patch:{patch['file']}",
        "name": patch["file"],
        "hashes": _hashes(patch.get("sha256")),
        "properties": _props(upstream=patch.get("upstream")),
    }
    return {key: val for key, val in component.items() if val != []}


def _pedigree_patch(patch: dict) -> dict:
    entry: dict = {"type": "unofficial", "diff": {"url": patch["file"]}}
    upstream = patch.get("upstream")
    if upstream:  # the upstream issue / PR the patch answers
        issue = {"type": "enhancement", "name": str(upstream)}
        if "://" in str(upstream):
            issue["references"] = [str(upstream)]
        entry["resolves"] = [issue]
    return entry


def cyclonedx_sbom(manifest: dict) -> dict:
    """A CycloneDX 1.6 JSON SBOM for one wheel, made only from its manifest (deterministic bytes)."""
    sources = [_source_component(i, s) for i, s in enumerate(manifest.get("sources") or [])]
    patches = manifest.get("patches") or []
    arch = manifest.get("arch") or {}
    wheel_ref = f"wheel:{manifest['wheel']}"
    wheel = {
        "type": "library",
        "bom-ref": wheel_ref,
        "name": manifest["package"],
        "version": manifest["version"],
        "purl": _purl("pypi", canonicalize_name(manifest["package"]), manifest["version"], file_name=manifest["wheel"]),
        "hashes": _hashes(manifest["wheel_sha256"]),
        "properties": _props(
            stack=manifest.get("stack"), target=manifest.get("target"), arch_knob=arch.get("knob"),
            arch_value=arch.get("value"), archs=" ".join(arch.get("archs") or []),
            verify_ok=(manifest.get("verify") or {}).get("ok"),
        ),
    }
    if patches:
        wheel["pedigree"] = {"patches": [_pedigree_patch(p) for p in patches]}
    tools = [{"type": "application", "name": str(k), "version": str(v)}
             for k, v in sorted((manifest.get("toolchain") or {}).items()) if v is not None]
    components = sources + [_patch_component(p) for p in patches]
    return {
        "bomFormat": "CycloneDX",
        "specVersion": CYCLONEDX_SPEC,
        "serialNumber": uuid.uuid5(uuid.NAMESPACE_URL, f"blackwheel:{manifest['wheel_sha256']}").urn,
        "version": 1,
        "metadata": {"component": wheel, "tools": {"components": tools}},
        "components": components,
        "dependencies": [{"ref": wheel_ref, "dependsOn": [c["bom-ref"] for c in components]}]
        + [{"ref": c["bom-ref"]} for c in components],
    }


def sbom_bytes(manifest: dict) -> bytes:
    return (json.dumps(cyclonedx_sbom(manifest), indent=2, sort_keys=True) + "\n").encode("utf-8")


# ---- the report --------------------------------------------------------------------------------
def _arch_lines(manifest: dict) -> list[str]:
    arch = manifest.get("arch") or {}
    lines = [f"  {arch.get('knob', '?')}={arch.get('value', '?')}"]
    try:
        archs = [CudaArch.parse(a) for a in arch.get("archs") or []]
    except UsageError:  # a manifest from a newer vocabulary: show it raw rather than fail the report
        return lines + [f"  archs: {arch.get('archs')}"]
    lines.append("  cubins: " + (", ".join(a.sm for a in archs) or "none recorded"))
    target = TARGETS.get(manifest.get("target", ""))
    for cc in target.devices if target else ():
        hit = covers(archs, cc)
        lines.append(f"  {cc}: " + (f"native code ({hit.sm})" if hit else "NO native code"))
    return lines


def describe(wheel: Path, sha256: str, manifest: dict, manifest_path: Path) -> str:
    """The human report ``blackwheel provenance`` prints."""
    seal = ("sealed (content matches its manifest_sha256)" if seal_state(manifest) == "sealed" else
            "unsealed (written before manifests carried manifest_sha256: an edit of its fields cannot be detected)")
    out = [f"{wheel.name}", f"  sha256 {sha256} (matches {manifest_path})", f"  manifest {seal}",
           f"  {manifest['package']} {manifest['version']}  stack {manifest.get('stack', '?')}"
           f"  target {manifest.get('target', '?')}", "sources:"]
    for s in manifest.get("sources") or []:
        pin = s.get("commit") or s.get("version") or "?"
        out.append(f"  {s.get('name')} {pin} [{s.get('kind')}, {s.get('role')}] {s.get('url')}")
        out.append(f"    sha256 {s.get('sha256') or 'none recorded'}")
    out.append("patches:" + ("" if manifest.get("patches") else " none"))
    for p in manifest.get("patches") or []:
        out.append(f"  {p['file']} sha256 {p.get('sha256')} upstream {p.get('upstream') or '-'}")
    out.append("toolchain:")
    out += [f"  {k}: {v}" for k, v in sorted((manifest.get("toolchain") or {}).items())]
    out.append("arch:")
    out += _arch_lines(manifest)
    verdict = manifest.get("verify") or {}
    out.append("verify: " + ("PASSED" if verdict.get("ok") is True else f"NOT PASSED (ok = {verdict.get('ok')!r})"))
    return "\n".join(out)


def provenance(wheel: Path, wheelhouse: Path | None = None) -> str:
    """Find and check the wheel's manifest, then describe where every byte came from."""
    wheel = Path(wheel)
    if not wheel.is_file() or not wheel.name.endswith(".whl"):
        raise PublishError(f"{wheel} is not a wheel file")
    sha = sha256_file(wheel)
    manifest_path = find_manifest(wheel, sha, wheelhouse)
    if manifest_path is None:
        raise PublishError(
            f"no manifest for {wheel.name} (sha256 {sha}): none beside it and none in {wheelhouse} records that hash"
        )
    return describe(wheel, sha, checked_manifest(wheel, sha, manifest_path), manifest_path)
