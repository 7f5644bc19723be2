"""inspect: our fatbin reader, on synthetic containers (fast) and on objects nvcc 13 compiled (marked)."""

from __future__ import annotations

import json
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from blackwheel import cli
from blackwheel.core.errors import UsageError
from blackwheel.check.inspect import (CorruptObject, FatbinEntry, ObjectReport, inspect_path, parse_fatbin)
from blackwheel.core.targets import CudaArch
from tests.cuda_objects import build_all, cuobjdump_archs, find_cuobjdump, find_nvcc

A = CudaArch.parse


# ---- synthetic fatbin containers ----------------------------------------------------------------------
def entry(kind: int, number: int, flags: int = 0x11, payload: bytes = b"\0" * 16) -> bytes:
    header = bytearray(64)
    struct.pack_into("<HHIQ", header, 0, kind, 0x101, 64, len(payload))
    struct.pack_into("<I", header, 28, number)
    struct.pack_into("<Q", header, 40, flags)
    return bytes(header) + payload


def container(*entries: bytes) -> bytes:
    body = b"".join(entries)
    return struct.pack("<IHHQ", 0xBA55ED50, 1, 16, len(body)) + body


@pytest.mark.parametrize("kind, number, flags, expected", [
    (2, 120, 0x11, FatbinEntry("cubin", A("12.0"), None)),
    (2, 120, 0x100011, FatbinEntry("cubin", A("12.0a"), None)),
    (2, 120, 0x200011, FatbinEntry("cubin", A("12.0f"), None)),
    (2, 121, 0x1108011, FatbinEntry("cubin", A("12.1a"), "zstd")),  # compressed: arch from the header
    (1, 90, 0x2011, FatbinEntry("ptx", A("9.0"), "lz4")),
    (8, 120, 0x18011, FatbinEntry("lto", A("12.0"), "zstd")),
])
def test_entry_header_gives_kind_arch_and_compression(kind, number, flags, expected):
    assert parse_fatbin(container(entry(kind, number, flags))) == [expected]


def test_uncompressed_ptx_target_line_wins_over_header():
    ptx = b"//\n.version 9.0\n.target sm_121a\n.address_size 64\n"
    assert parse_fatbin(container(entry(1, 121, 0x11, ptx))) == [FatbinEntry("ptx", A("12.1a"), None)]


def test_several_containers_with_zero_padding():
    data = container(entry(2, 120)) + b"\0" * 8 + container(entry(2, 121, 0x100011), entry(1, 120))
    assert [e.arch for e in parse_fatbin(data)] == [A("12.0"), A("12.1a"), A("12.0")]


@pytest.mark.parametrize("data, message", [
    (container(entry(2, 120))[:-4], "truncated fatbin"),
    (container(entry(2, 120))[:40], "truncated fatbin"),
    (b"\x01" * 32, "bad magic"),
])
def test_corrupt_fatbin_is_named(data, message):
    with pytest.raises(CorruptObject, match=message):
        parse_fatbin(data)


def test_object_report_round_trips_through_dict():
    obj = ObjectReport("a/b.so", (A("12.0f"), A("12.1a")), (A("12.0"),), None, (), ("zstd",))
    assert ObjectReport.from_dict(json.loads(json.dumps(obj.to_dict()))) == obj


def test_missing_path_and_non_elf_file_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file, folder or installed package"):
        inspect_path(tmp_path / "nothing-here")
    text = tmp_path / "notes.txt"
    text.write_text("not a binary\n")
    with pytest.raises(UsageError, match="not an ELF file"):
        inspect_path(text)


def run_cli(argv: list[str]) -> int:
    """Through the real cli.main (it imports only the module of the chosen command)."""
    return cli.main(argv)


def test_cli_non_elf_gives_one_line_error(monkeypatch, capsys, tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    assert run_cli(["inspect", str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blackwheel: ") and "not an ELF file" in err
    assert "Traceback" not in err and err.count("\n") == 1


# ---- real objects from nvcc 13 ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def objects(tmp_path_factory) -> dict[str, Path]:
    if find_nvcc() is None:
        pytest.skip("nvcc not found")
    return build_all(tmp_path_factory.mktemp("cuda-objects"))


EXPECTED = {  # name -> (cubins, ptx) we must report
    "sm90a": ("9.0a", ""),
    "sm120": ("12.0", ""),
    "sm120a": ("12.0a", ""),
    "sm121": ("12.1", ""),
    "sm121a": ("12.1a", ""),
    "family120f": ("12.0f", "12.0f"),
    "ptx120": ("", "12.0"),
    "rdc121a": ("12.1a", ""),
    "lib_sm120": ("12.0", ""),
    "lib_sm121a": ("12.1a", ""),
    "lib_multi": ("9.0a 12.0 12.0a 12.1a", "12.0"),
    "lib_zstd": ("12.0a", "12.0a"),
    "lib_lz4": ("12.1", "12.1"),
    "unit90a": ("9.0a", ""),
    "mixed": ("9.0a 12.0", ""),
}


def archs(text: str) -> tuple[CudaArch, ...]:
    return tuple(A(a) for a in text.split())


@pytest.mark.nvcc
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_reads_what_nvcc_built(objects, name):
    (obj,) = inspect_path(objects[name]).objects
    cubins, ptx = EXPECTED[name]
    assert (obj.error, obj.cubins, obj.ptx) == (None, archs(cubins), archs(ptx))


@pytest.mark.nvcc
@pytest.mark.parametrize("name, codec", [("lib_zstd", "zstd"), ("lib_lz4", "lz4")])
def test_compressed_fatbins_are_recognised(objects, name, codec):
    (obj,) = inspect_path(objects[name]).objects
    assert codec in obj.compression


@pytest.mark.nvcc
def test_compilation_units_are_kept_apart(objects):
    (obj,) = inspect_path(objects["mixed"]).objects
    assert sorted(obj.units) == [(archs("9.0a"), 1), (archs("12.0"), 1)]
    assert ObjectReport.from_dict(obj.to_dict()) == obj
    (multi,) = inspect_path(objects["lib_multi"]).objects
    assert all(a == archs("9.0a 12.0 12.0a 12.1a") for a, _ in multi.units)


def cuobjdump_spelling(obj: ObjectReport) -> tuple[set[str], set[str]]:
    """cuobjdump drops the f of family cubins (sm_120) but keeps it on PTX (sm_120f)."""
    cubins = {f"sm_{a.major}{a.minor}{'a' if a.suffix == 'a' else ''}" for a in obj.cubins}
    return cubins, {a.sm for a in obj.ptx}


@pytest.mark.nvcc
def test_agrees_with_cuobjdump(objects):
    cuobjdump, why = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip(why)
    for name, path in objects.items():
        (obj,) = inspect_path(path).objects
        assert cuobjdump_spelling(obj) == cuobjdump_archs(cuobjdump, path), name


@pytest.mark.nvcc
def test_folder_is_walked_and_non_elf_files_skipped(objects, tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    shutil.copy(objects["lib_sm120"], tmp_path / "pkg" / "a.so")
    shutil.copy(objects["sm121a"], tmp_path / "pkg" / "sub" / "b.o")
    (tmp_path / "pkg" / "__init__.py").write_text("")
    report = inspect_path(tmp_path)
    assert {o.path: o.cubins for o in report.objects} == {"pkg/a.so": archs("12.0"), "pkg/sub/b.o": archs("12.1a")}


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


@pytest.mark.nvcc
def test_wheel_members_with_one_corrupt(objects, tmp_path):
    wheel = tmp_path / "demo-1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.write(objects["lib_multi"], "demo/_C.so")
        zf.writestr("demo/_broken.so", truncated(objects["lib_sm120"].read_bytes()))
        zf.writestr("demo/__init__.py", "")
    report = inspect_path(wheel)
    by_path = {o.path: o for o in report.objects}
    assert set(by_path) == {"demo/_C.so", "demo/_broken.so"}
    assert by_path["demo/_C.so"].cubins == archs("9.0a 12.0 12.0a 12.1a")
    assert "truncated or corrupt" in by_path["demo/_broken.so"].error
    assert "ERROR" in report.render_text()


@pytest.mark.nvcc
def test_truncated_fatbin_inside_valid_elf(objects, tmp_path):
    """Grow the container's size field past its section: the error names the fatbin, not the ELF."""
    data = bytearray(objects["sm120"].read_bytes())
    at = data.find(struct.pack("<I", 0xBA55ED50))
    struct.pack_into("<Q", data, at + 8, 1 << 20)
    bad = tmp_path / "bad.o"
    bad.write_bytes(bytes(data))
    (obj,) = inspect_path(bad).objects
    assert obj.error.startswith("truncated fatbin") and not obj.has_cuda


@pytest.mark.nvcc
def test_cli_truncated_so_reports_error_without_traceback(objects, monkeypatch, capsys, tmp_path):
    cut = tmp_path / "cut.so"
    cut.write_bytes(truncated(objects["lib_sm120"].read_bytes()))
    assert run_cli(["inspect", str(cut), "--json"]) == 1
    out = capsys.readouterr()
    (obj,) = json.loads(out.out)["objects"]
    assert obj["error"] and "Traceback" not in out.err


@pytest.mark.nvcc
def test_installed_distribution_by_name(objects, tmp_path, monkeypatch):
    site = tmp_path / "site"
    (site / "demo_kernels").mkdir(parents=True)
    shutil.copy(objects["lib_sm121a"], site / "demo_kernels" / "_k.so")
    info = site / "demo_kernels-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-kernels\nVersion: 0.1\n")
    (info / "RECORD").write_text("demo_kernels/_k.so,,\ndemo_kernels-0.1.dist-info/METADATA,,\n")
    monkeypatch.syspath_prepend(str(site))
    report = inspect_path("demo-kernels")
    assert report.source == "demo-kernels 0.1"
    assert [(o.path, o.cubins) for o in report.objects] == [("demo_kernels/_k.so", archs("12.1a"))]
