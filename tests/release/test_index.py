"""The static index: real wheels built by setuptools, installed by real pip from file:// URLs."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from blackwheel.cli import release as cli_release
from blackwheel.release import index
from blackwheel.core.errors import PublishError
from blackwheel.release.index import build_static_index, same_tree


from tests import indexserver as h  # noqa: E402  (a real pypiserver on 127.0.0.1)
VERSION = "1.0+cu130.sm121"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Two wheels with the same file name and different bytes (VALUE 1 and VALUE 2)."""
    work = tmp_path_factory.mktemp("wheels")
    return h.build_wheel(work, "bw-idx", VERSION, 1), h.build_wheel(work, "bw-idx", VERSION, 2)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_pip_installs_from_the_static_index(built, tmp_path):
    h.place(built[0], tmp_path / "wh")
    report = build_static_index(tmp_path / "wh")
    assert report.out == tmp_path / "wh" / "index" and report.changed
    proc = h.fresh_venv_install(tmp_path / "venv", report.simple_url, "bw-idx")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    value = subprocess.run([str(tmp_path / "venv/bin/python"), "-c", "import bw_idx; print(bw_idx.VALUE)"],
                           capture_output=True, text=True, check=True).stdout
    assert value.strip() == "1"


def test_pip_resolves_from_the_metadata_file_without_the_wheel(built, tmp_path):
    """PEP 658: over HTTP, ``pip install --dry-run`` reads <wheel>.metadata and never fetches the wheel."""
    h.place(built[0], tmp_path / "wh")
    out = build_static_index(tmp_path / "wh").out
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    log = tmp_path / "http.log"
    with h.serving_folder(out, log) as url:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "--python", str(tmp_path / "venv/bin/python"), "install", "--dry-run",
             "--no-cache-dir", "--index-url", url + "simple/", "bw-idx"],
            env={"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null"}, capture_output=True, text=True)
    assert proc.returncode == 0 and "Would install bw-idx-1.0+cu130.sm121" in proc.stdout, proc.stderr
    fetched = [line.split('"')[1].split()[1] for line in log.read_text().splitlines() if '"GET ' in line]
    assert fetched[1:] == ["/simple/bw-idx/", "/files/bw_idx-1.0%2Bcu130.sm121-py3-none-any.whl.metadata"]  # [0]: probe


def test_pages_carry_hashes_metadata_and_requires_python(built, tmp_path):
    wheel = h.place(built[0], tmp_path / "wh")
    out = build_static_index(tmp_path / "wh").out
    files = out / "files"
    page = json.loads((out / "simple/bw-idx/index.json").read_text())
    (entry,) = page["files"]
    assert page["meta"]["api-version"] == "1.1" and page["versions"] == [VERSION]
    assert entry["hashes"]["sha256"] == hashlib.sha256(wheel.read_bytes()).hexdigest()
    metadata = (files / f"{wheel.name}.metadata").read_bytes()
    with zipfile.ZipFile(wheel) as zf:
        assert metadata == zf.read("bw_idx-1.0+cu130.sm121.dist-info/METADATA")
    assert entry["core-metadata"] == {"sha256": hashlib.sha256(metadata).hexdigest()}
    assert entry["requires-python"] == ">=3.9"
    html = (out / "simple/bw-idx/index.html").read_text()
    assert f'data-core-metadata="sha256={hashlib.sha256(metadata).hexdigest()}"' in html
    assert 'data-requires-python="&gt;=3.9"' in html and f"#sha256={entry['hashes']['sha256']}" in html
    assert json.loads((out / "simple/index.json").read_text())["projects"] == [{"name": "bw-idx"}]
    beside = wheel.with_name(wheel.name + ".manifest.json")
    assert (files / f"{wheel.name}.manifest.json").read_bytes() == beside.read_bytes()
    assert json.loads((files / f"{wheel.name}.cdx.json").read_text())["bomFormat"] == "CycloneDX"


def test_regenerating_is_idempotent_and_swaps_whole(built, tmp_path):
    wh = tmp_path / "wh"
    h.place(built[0], wh)
    out = build_static_index(wh).out
    before, inode = snapshot(out), out.stat().st_ino
    h.place(built[0], wh, target="sm120")  # the same bytes from a second target: one file in the index
    again = build_static_index(wh)
    assert not again.changed and snapshot(out) == before and out.stat().st_ino == inode
    for manifest in wh.glob("*/*/*.manifest.json"):
        manifest.unlink()
    changed = build_static_index(wh, allow_unverified=True)
    assert changed.changed and out.stat().st_ino != inode
    assert not list((out / "files").glob("*.cdx.json")) and len(list((out / "files").glob("*.whl"))) == 1
    assert [p.name for p in tmp_path.joinpath("wh").iterdir() if p.name.startswith(".")] == []  # no temp left


def test_same_name_different_bytes_is_refused_naming_both_hashes(built, tmp_path):
    wh = tmp_path / "wh"
    h.place(built[0], wh, stack="cu130-torch2.11")
    out = build_static_index(wh).out
    before = snapshot(out)
    h.place(built[1], wh, stack="cu130-torch2.14")
    with pytest.raises(PublishError) as exc:
        build_static_index(wh)
    for wheel in built:
        assert hashlib.sha256(wheel.read_bytes()).hexdigest() in str(exc.value)
    assert snapshot(out) == before  # the old index is still served


@pytest.mark.parametrize("verify_ok", [False, None])
def test_unverified_wheels_need_allow_unverified(built, tmp_path, verify_ok):
    wheel = h.place(built[0], tmp_path / "wh", verify_ok=bool(verify_ok))
    if verify_ok is None:
        wheel.with_name(wheel.name + ".manifest.json").unlink()
    with pytest.raises(PublishError, match="--allow-unverified"):
        build_static_index(tmp_path / "wh")
    assert not (tmp_path / "wh" / "index").exists()
    assert build_static_index(tmp_path / "wh", allow_unverified=True).changed


def test_manifest_of_other_bytes_is_refused(built, tmp_path):
    wheel = h.place(built[0], tmp_path / "wh")
    wheel.write_bytes(built[1].read_bytes())  # the wheel was swapped after its manifest was written
    with pytest.raises(PublishError, match="changed after it was built"):
        build_static_index(tmp_path / "wh")


def test_out_folder_that_is_not_an_index_is_left_alone(built, tmp_path):
    h.place(built[0], tmp_path / "wh")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(PublishError, match="not a blackwheel index"):
        build_static_index(tmp_path / "wh", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_stack_filter_and_empty_wheelhouse(built, tmp_path):
    h.place(built[0], tmp_path / "wh", stack="cu130-torch2.11")
    with pytest.raises(PublishError, match="no wheels"):
        build_static_index(tmp_path / "wh", stack="cu130-torch2.14")
    assert len(build_static_index(tmp_path / "wh", stack="cu130-torch2.11").wheels) == 1


def test_same_tree_compares_bytes(tmp_path):
    for name, text in (("a", "x"), ("b", "x"), ("c", "y")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    assert same_tree(tmp_path / "a", tmp_path / "b") and not same_tree(tmp_path / "a", tmp_path / "c")


def test_cli_publish_writes_the_static_index(built, tmp_path, capsys):
    h.place(built[0], tmp_path / "wh")
    parser = argparse.ArgumentParser()
    cli_release.register(parser.add_subparsers())
    args = parser.parse_args(["publish", "--wheelhouse", str(tmp_path / "wh")])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "static index updated" in out and (tmp_path / "wh/index/simple/bw-idx/index.html").is_file()
    assert args.func(args) == 0 and "static index unchanged" in capsys.readouterr().out
