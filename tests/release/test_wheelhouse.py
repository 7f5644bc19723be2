"""wheelhouse.py: retagging a real (hand-made, valid) wheel, atomic placing, and reuse by build key."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from blackwheel.release import wheelhouse
from blackwheel.core.errors import BuildFailed
from blackwheel.core.fsutil import sha256_file
from blackwheel.release import manifest as manifest_file
from blackwheel.release.manifest import read_manifest
from blackwheel.release.wheelhouse import find_reusable, local_version, place, retag_wheel, wheels

TAGS = "py3-none-any"  # installable by pip on any machine


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_wheel(where: Path, version: str = "1.0", info_stem: str | None = None) -> Path:
    """A small valid wheel: a package, a .data script, dist-info with METADATA, WHEEL and RECORD."""
    stem = info_stem or f"pkg_x-{version}"
    files = {
        "pkg_x/__init__.py": b"VALUE = 1\n",
        "pkg_x/_C.so": bytes(range(256)) * 4,
        "pkg_x/data,with,commas.txt": b"x\n",
        f"{stem}.data/scripts/pkg-x-tool": b"#!python\nprint('hi')\n",
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: pkg-x\nVersion: {version}\n"
                                      f"Requires-Dist: torch==2.14.1\n\nVersion: in the description\n".encode(),
        f"{stem}.dist-info/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {TAGS}\n".encode(),
        f"{stem}.dist-info/top_level.txt": b"pkg_x\n",
    }
    path = where / f"pkg_x-{version}-{TAGS}.whl"
    out = io.StringIO()
    rec = csv.writer(out, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
            info.external_attr = (0o755 if name.endswith((".so", "tool")) else 0o644) << 16
            zf.writestr(info, data)
            rec.writerow([name, record_hash(data), len(data)])
        rec.writerow([f"{stem}.dist-info/RECORD", "", ""])
        zf.writestr(f"{stem}.dist-info/RECORD", out.getvalue())
    return path


def check_record(wheel: Path) -> list[str]:
    """Every member hashed in RECORD with the right hash and size; RECORD lists every file."""
    with zipfile.ZipFile(wheel) as zf:
        (record_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
        rows = list(csv.reader(io.StringIO(zf.read(record_name).decode())))
        listed = {}
        for path, digest, size in rows:
            listed[path] = (digest, size)
        for name in zf.namelist():
            if name.endswith("/"):
                continue
            assert name in listed, f"{name} not in RECORD"
            if name != record_name:
                data = zf.read(name)
                assert listed[name] == (record_hash(data), str(len(data))), name
        assert set(listed) <= set(zf.namelist())
        return zf.namelist()


# ---- retagging ----------------------------------------------------------------------------------------
def test_local_version():
    assert local_version("13.0", "sm121") == "cu130.sm121"
    assert local_version("13.0", "sm120.sm121") == "cu130.sm120.sm121"
    assert local_version("13.0", "sm121", ("nofa3",), torch="2.11.0") == "cu130.torch2.11.sm121.nofa3"
    assert local_version("13.0", "sm90", torch="2.14.1") == "cu130.torch2.14.sm90"


def test_retag_adds_a_requirement_once_and_keeps_the_description(tmp_path):
    src = make_wheel(tmp_path)
    new = retag_wheel(src, "cu130.torch2.14.sm121", _dir(tmp_path / "out"),
                      [wheelhouse.torch_requirement("2.14.0"), "torch==2.14.1"])
    check_record(new)
    with zipfile.ZipFile(new) as zf:
        meta = zf.read("pkg_x-1.0+cu130.torch2.14.sm121.dist-info/METADATA").decode()
    head, _, body = meta.partition("\n\n")
    assert head.splitlines()[-2:] == ["Requires-Dist: torch==2.14.1", "Requires-Dist: torch==2.14.*"]
    assert body == "Version: in the description\n"
    target = tmp_path / "target"                      # what an installer reads of it
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--target", str(target), str(new)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import PathDistribution
    dist = PathDistribution(target / "pkg_x-1.0+cu130.torch2.14.sm121.dist-info")
    assert dist.requires == ["torch==2.14.1", "torch==2.14.*"]


def test_a_torch_requirement_is_the_minor_release():
    from packaging.specifiers import SpecifierSet
    spec = SpecifierSet(wheelhouse.torch_requirement("2.11.0").removeprefix("torch"))
    assert spec.contains("2.11.0") and spec.contains("2.11.1") and spec.contains("2.11.0+cu130")
    assert not spec.contains("2.12.0") and not spec.contains("2.10.0")


def test_retag_rewrites_name_metadata_dist_info_data_and_record(tmp_path):
    src = make_wheel(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    new = retag_wheel(src, "cu130.sm121", out)
    assert new == out / f"pkg_x-1.0+cu130.sm121-{TAGS}.whl"
    names = check_record(new)
    assert not [n for n in names if n.startswith("pkg_x-1.0.")]            # nothing of the old version left
    assert "pkg_x-1.0+cu130.sm121.data/scripts/pkg-x-tool" in names
    with zipfile.ZipFile(new) as zf:
        meta = zf.read("pkg_x-1.0+cu130.sm121.dist-info/METADATA").decode()
        assert "\nVersion: 1.0+cu130.sm121\n" in meta
        assert "\nVersion: in the description\n" in meta                  # only the header line changes
        assert zf.getinfo("pkg_x/_C.so").external_attr >> 16 == 0o755       # exec bits kept
        assert zf.read("pkg_x/_C.so") == bytes(range(256)) * 4
    assert [p.name for p in out.iterdir()] == [new.name]                    # no .part left


def test_retag_replaces_an_existing_local_version(tmp_path):
    src = make_wheel(tmp_path, "2.8.3.post2+cu130.sm120")
    new = retag_wheel(src, "cu130.sm121", tmp_path)
    assert new.name == f"pkg_x-2.8.3.post2+cu130.sm121-{TAGS}.whl"
    check_record(new)


def test_retag_finds_the_dist_info_as_spelled_inside(tmp_path):
    """An older tool wrote Pkg_X-1.0.dist-info while the file name says pkg_x: still one dist-info."""
    src = make_wheel(tmp_path, info_stem="Pkg_X-1.0")
    (tmp_path / "o").mkdir()
    names = check_record(retag_wheel(src, "cu130.sm121", tmp_path / "o"))
    assert {n.split("/")[0] for n in names if ".dist-info/" in n} == {"Pkg_X-1.0+cu130.sm121.dist-info"}


def test_retagged_wheel_installs_with_pip(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    new = retag_wheel(make_wheel(tmp_path), "cu130.sm121", out)
    target = tmp_path / "target"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                           "--disable-pip-version-check", "--target", str(target), str(new)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (target / "pkg_x-1.0+cu130.sm121.dist-info" / "METADATA").is_file()
    assert (target / "pkg_x" / "_C.so").is_file()


def test_retag_of_a_broken_wheel_leaves_nothing(tmp_path):
    bad = tmp_path / f"pkg_x-1.0-{TAGS}.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("pkg_x/__init__.py", "")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(BuildFailed, match="one .dist-info"):
        retag_wheel(bad, "cu130.sm121", out)
    assert list(out.iterdir()) == []


# ---- placing and reuse ------------------------------------------------------------------------------------
def test_place_writes_wheel_and_manifest(tmp_path):
    wheel = make_wheel(tmp_path)
    root = tmp_path / "wh"
    final = place(wheel, {"package": "pkg-x", "build_key": "k1"}, root, "s", "gb10")
    assert final == root / "s" / "gb10" / wheel.name
    assert final.read_bytes() == wheel.read_bytes()
    m = read_manifest(final)
    assert m["wheel"] == wheel.name and m["wheel_sha256"] == sha256_file(wheel)
    assert m["wheel_size"] == wheel.stat().st_size and m["schema"] == manifest_file.SCHEMA
    assert sorted(p.name for p in final.parent.iterdir()) == [wheel.name, wheel.name + ".manifest.json"]
    assert wheels(root) == [final] and wheels(root, "s", "gb10") == [final] and wheels(root, "t") == []


def test_failure_midway_leaves_nothing_visible(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path)
    root = tmp_path / "wh"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(manifest_file, "atomic_write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        place(wheel, {"package": "pkg-x", "build_key": "k1"}, root, "s", "gb10")
    assert [p for p in (root / "s" / "gb10").iterdir()] == []
    assert wheels(root) == []


def test_find_reusable(tmp_path):
    wheel = make_wheel(tmp_path)
    root = tmp_path / "wh"
    final = place(wheel, {"package": "pkg-x", "build_key": "k1"}, root, "s", "gb10")
    assert find_reusable(root, "s", "gb10", "pkg-x", "k1")["wheel_sha256"] == sha256_file(final)
    assert find_reusable(root, "s", "gb10", "pkg-x", "k2") is None
    assert find_reusable(root, "s", "gb10", "other", "k1") is None
    assert find_reusable(root, "s", "blackwell", "pkg-x", "k1") is None


def test_find_reusable_ignores_a_tampered_wheel(tmp_path):
    root = tmp_path / "wh"
    final = place(make_wheel(tmp_path), {"package": "pkg-x", "build_key": "k1"}, root, "s", "gb10")
    with zipfile.ZipFile(final, "a") as zf:
        zf.writestr("pkg_x/extra.py", "evil = 1\n")
    assert find_reusable(root, "s", "gb10", "pkg-x", "k1") is None
    final.unlink()
    assert find_reusable(root, "s", "gb10", "pkg-x", "k1") is None


def test_find_reusable_skips_broken_manifests(tmp_path):
    root = tmp_path / "wh"
    where = root / "s" / "gb10"
    where.mkdir(parents=True)
    (where / "a.whl.manifest.json").write_text("{not json")
    (where / "b.whl.manifest.json").write_text(json.dumps({"package": "pkg-x", "build_key": "k1"}))
    (where / "c.whl.manifest.json").write_text("[1, 2]")
    assert find_reusable(root, "s", "gb10", "pkg-x", "k1") is None
    final = place(make_wheel(tmp_path), {"package": "pkg-x", "build_key": "k1"}, root, "s", "gb10")
    assert find_reusable(root, "s", "gb10", "pkg-x", "k1")["wheel"] == final.name


def _clash_wheel(where: Path, value: int) -> Path:
    """The one wheel name, with bytes of its own (a zip comment)."""
    where.mkdir(parents=True)
    wheel = make_wheel(where)
    with zipfile.ZipFile(wheel, "a") as zf:
        zf.comment = f"build {value}".encode()
    return wheel


def _manifest() -> dict:
    return {"package": "pkg-x", "version": "1.0", "stack": "s", "target": "gb10", "build_key": "k1",
            "sources": [], "patches": [], "toolchain": {}, "verify": {"ok": True}}


def test_a_name_takes_one_set_of_bytes_in_the_whole_wheelhouse(tmp_path):
    """Two stacks that build one file name with different bytes: the first placement wins, the second
    is refused naming both hashes, and the wheelhouse stays indexable. Same bytes, or a rebuild that
    replaces its own file, pass."""
    from blackwheel.core.errors import PublishError
    from blackwheel.release.index import build_static_index
    first, second = (_clash_wheel(tmp_path / f"in{v}", v) for v in (1, 2))
    root = tmp_path / "wh"
    placed = place(first, _manifest(), root, "stack-a", "gb10")
    with pytest.raises(PublishError) as refused:
        place(second, _manifest(), root, "stack-b", "gb10")
    message = str(refused.value)
    assert sha256_file(first) in message and sha256_file(second) in message and "stack-a/gb10/" in message
    assert not (root / "stack-b" / "gb10" / second.name).exists()
    assert not [p for p in (root / "stack-b" / "gb10").iterdir()]          # nothing half-placed
    assert [w.sha256 for w in build_static_index(root, allow_unverified=True).wheels] == [sha256_file(placed)]
    place(first, _manifest(), root, "stack-b", "gb10")                      # the same bytes: fine
    # a rebuild replacing the file in its own folder is not a second body; the other stack still holds
    # the first bytes, so it is refused there too until that one goes
    with pytest.raises(PublishError):
        place(second, _manifest(), root, "stack-a", "gb10")
    (root / "stack-b" / "gb10" / first.name).unlink()
    place(second, _manifest(), root, "stack-a", "gb10")
    assert sha256_file(root / "stack-a" / "gb10" / first.name) == sha256_file(second)


def test_a_name_another_stack_holds_is_found_before_a_build(tmp_path):
    """build checks this before compiling: the name (dist, version, local version) is another stack's."""
    from blackwheel.pipeline.build import _refuse_a_name_another_stack_holds
    from blackwheel.core.errors import UsageError
    from types import SimpleNamespace
    root = tmp_path / "wh"
    wheel = retag_wheel(make_wheel(_dir(tmp_path / "in")), "cu130.sm121", tmp_path / "out")
    place(wheel, _manifest(), root, "stack-a", "gb10")
    find = wheelhouse.name_taken_elsewhere
    assert find(root, "stack-b", "pkg-x", "1.0", "cu130.sm121") == root / "stack-a" / "gb10" / wheel.name
    assert find(root, "stack-a", "pkg-x", "1.0", "cu130.sm121") is None        # its own stack: a rebuild
    assert find(root, "stack-b", "pkg-x", "1.0", "cu130.sm120") is None        # another local version
    assert find(root, "stack-b", "pkg-x", "1.1", "cu130.sm121") is None
    req = SimpleNamespace(wheelhouse=root, stack=SimpleNamespace(name="stack-b", cuda="13.0", torch="2.14.0"),
                          target=SimpleNamespace(tag="sm121"), variant_tags=(),
                          recipe=SimpleNamespace(dist_name="pkg-x", links_torch=False), version=SimpleNamespace(version="1.0"))
    with pytest.raises(UsageError, match="stack-a/gb10/pkg_x-1.0\\+cu130.sm121-.*remove it") as refused:
        _refuse_a_name_another_stack_holds(req)
    assert "\n" not in str(refused.value)
    req.stack.name = "stack-a"
    _refuse_a_name_another_stack_holds(req)


def test_two_stacks_torch_linked_wheels_have_two_names(tmp_path):
    """flash-attn links torch and both stacks pin the same version: each stack's wheel names its torch,
    so both live in one wheelhouse (and one index), and neither build is refused."""
    from blackwheel.pipeline.build import _refuse_a_name_another_stack_holds, wheel_local_version
    from types import SimpleNamespace
    root = tmp_path / "wh"
    req = SimpleNamespace(wheelhouse=root, stack=SimpleNamespace(name="stack-a", cuda="13.0", torch="2.11.0"),
                          target=SimpleNamespace(tag="sm121"), variant_tags=(),
                          recipe=SimpleNamespace(dist_name="pkg-x", links_torch=True), version=SimpleNamespace(version="1.0"))
    assert wheel_local_version(req) == "cu130.torch2.11.sm121"
    first = retag_wheel(make_wheel(_dir(tmp_path / "in")), wheel_local_version(req), _dir(tmp_path / "out"))
    place(first, _manifest(), root, "stack-a", "gb10")
    req.stack.name, req.stack.torch = "stack-b", "2.14.0"
    _refuse_a_name_another_stack_holds(req)                                    # not refused: another name
    second = retag_wheel(make_wheel(_dir(tmp_path / "in2"), version="1.0"), wheel_local_version(req),
                         _dir(tmp_path / "out2"))
    place(second, _manifest(), root, "stack-b", "gb10")
    assert [p.name for p in wheels(root)] == [first.name, second.name]
    assert first.name != second.name and "+cu130.torch2.14.sm121-" in second.name


def _dir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
