"""Manifests -> CycloneDX SBOM and the provenance report; a wheel whose bytes differ is refused."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from blackwheel.cli import release as cli_release
from blackwheel.release import index
from blackwheel.core.errors import PublishError
from blackwheel.release.manifest import load_manifest
from blackwheel.release.provenance import cyclonedx_sbom, provenance, sbom_bytes, source_purl


from tests import indexserver as h  # noqa: E402  (a real pypiserver on 127.0.0.1)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel in a wheelhouse with its manifest beside it."""
    work = tmp_path_factory.mktemp("prov")
    return h.place(h.build_wheel(work, "bw-idx", "1.0+cu130.sm121", 1), work / "wh")


def manifest_of(wheel: Path) -> dict:
    return load_manifest(wheel.with_name(wheel.name + ".manifest.json"))


def test_sbom_is_valid_cyclonedx_1_6(wheel):
    validation = pytest.importorskip("cyclonedx.validation.json")
    from cyclonedx.schema import SchemaVersion

    text = sbom_bytes(manifest_of(wheel)).decode()
    assert validation.JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None


def test_sbom_names_sources_patches_and_toolchain(wheel):
    manifest = manifest_of(wheel)
    bom = cyclonedx_sbom(manifest)
    main = bom["metadata"]["component"]
    assert main["hashes"] == [{"alg": "SHA-256", "content": hashlib.sha256(wheel.read_bytes()).hexdigest()}]
    assert main["purl"].startswith("pkg:pypi/bw-idx@1.0%2Bcu130.sm121?file_name=")
    purls = [c.get("purl") for c in bom["components"]]
    assert "pkg:pypi/bw-idx@1.0" in purls
    assert f"pkg:github/nvidia/cutlass@{manifest['sources'][1]['commit']}" in purls
    patch = next(c for c in bom["components"] if c["type"] == "file")
    assert patch["name"] == manifest["patches"][0]["file"] and patch["hashes"][0]["content"] == "cd" * 32
    assert main["pedigree"]["patches"][0]["resolves"][0]["references"] == [manifest["patches"][0]["upstream"]]
    assert {"type": "application", "name": "nvcc", "version": "13.0.88"} in bom["metadata"]["tools"]["components"]
    assert {"name": "blackwheel:target", "value": "gb10"} in main["properties"]
    assert sbom_bytes(manifest) == sbom_bytes(json.loads(json.dumps(manifest)))  # deterministic


@pytest.mark.parametrize("source, purl", [
    ({"name": "Flash_Attn", "kind": "pypi", "version": "2.8.3.post2"}, "pkg:pypi/flash-attn@2.8.3.post2"),
    ({"name": "cutlass", "kind": "git", "url": "https://github.com/NVIDIA/cutlass.git", "commit": "abc"},
     "pkg:github/nvidia/cutlass@abc"),
    ({"name": "x", "kind": "git", "url": "https://git.example/x.git", "commit": "abc"},
     "pkg:generic/x@abc?vcs_url=git%2Bhttps%3A%2F%2Fgit.example%2Fx.git%40abc"),
    ({"name": "spdlog", "kind": "url", "url": "https://dl.example/s.tgz", "version": "1.15", "sha256": "ff"},
     "pkg:generic/spdlog@1.15?checksum=sha256%3Aff&download_url=https%3A%2F%2Fdl.example%2Fs.tgz"),
])
def test_source_purls(source, purl):
    assert source_purl(source) == purl


def test_report_says_where_every_byte_came_from(wheel):
    text = provenance(wheel)
    manifest = manifest_of(wheel)
    for needle in (manifest["wheel_sha256"], "https://github.com/NVIDIA/cutlass.git", "ab" * 32,
                   manifest["patches"][0]["file"], "nvcc: 13.0.88", "FLASH_ATTN_CUDA_ARCHS=121",
                   "12.1: native code (sm_121)", "verify: PASSED"):
        assert needle in text


def test_manifest_is_found_by_sha256_in_the_wheelhouse(wheel, tmp_path):
    loose = shutil.copy(wheel, tmp_path / wheel.name)  # e.g. downloaded from the index, no manifest beside
    with pytest.raises(PublishError, match="no manifest"):
        provenance(Path(loose), tmp_path / "nowhere")
    assert str(wheel.with_name(wheel.name + ".manifest.json")) in provenance(Path(loose), wheel.parents[2])


def test_wheel_with_other_bytes_than_its_manifest_is_an_error(wheel, tmp_path):
    copy = Path(shutil.copy(wheel, tmp_path / wheel.name))
    shutil.copy(wheel.with_name(wheel.name + ".manifest.json"), tmp_path)
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(PublishError) as exc:
        provenance(copy)
    assert hashlib.sha256(copy.read_bytes()).hexdigest() in str(exc.value)
    assert manifest_of(wheel)["wheel_sha256"] in str(exc.value)


def test_cli_provenance(wheel, capsys):
    parser = argparse.ArgumentParser()
    cli_release.register(parser.add_subparsers())
    args = parser.parse_args(["provenance", str(wheel)])
    assert args.func(args) == 0
    assert "verify: PASSED" in capsys.readouterr().out
