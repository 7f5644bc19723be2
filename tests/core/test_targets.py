"""targets.py: arch spellings, the what-runs-where rules, package spellings and target resolution."""

from __future__ import annotations

import pytest

from blackwheel.core.errors import UsageError
from blackwheel.core.targets import (TARGETS, ComputeCapability, CudaArch, Target, covers, native_target,
                                parse_arch_list, resolve_target, spell)

CC = ComputeCapability.parse


@pytest.mark.parametrize("text, expected", [
    ("12.1a", CudaArch(12, 1, "a")),
    ("121a", CudaArch(12, 1, "a")),
    ("sm_121a", CudaArch(12, 1, "a")),
    ("compute_120f", CudaArch(12, 0, "f")),
    ("sm_120", CudaArch(12, 0)),
    ("120", CudaArch(12, 0)),
    ("12.0f", CudaArch(12, 0, "f")),
    ("9.0", CudaArch(9, 0)),
    ("90a", CudaArch(9, 0, "a")),
    ("sm_90a", CudaArch(9, 0, "a")),
    ("80", CudaArch(8, 0)),
    ("lto_100", CudaArch(10, 0)),
    (" 10.3 ", CudaArch(10, 3)),
])
def test_parse_every_spelling(text, expected):
    assert CudaArch.parse(text) == expected


@pytest.mark.parametrize("text", [
    "", "1", "12", "12.1x", "sm121", "sm_", "compute_", "12.10", "12.1+PTX", "sm_121b", "abc",
    "1200", "0.0", "4.0", "14.0", "sm_3",
])
def test_bad_spellings_are_usage_errors(text):
    with pytest.raises(UsageError, match="unknown CUDA arch"):
        CudaArch.parse(text)


def test_bad_suffix_in_constructor():
    with pytest.raises(UsageError):
        CudaArch(12, 0, "x")


@pytest.mark.parametrize("text", ["12", "12.1a", "sm_121", "4.0", "14.0", ""])
def test_bad_compute_capability(text):
    with pytest.raises(UsageError):
        CC(text)


@pytest.mark.parametrize("arch, cc, runs", [
    ("sm_120", "12.1", True),
    ("sm_120", "12.0", True),
    ("sm_121", "12.0", False),
    ("sm_120a", "12.1", False),
    ("sm_120a", "12.0", True),
    ("sm_121a", "12.0", False),
    ("sm_121a", "12.1", True),
    ("sm_120f", "12.1", True),
    ("sm_120f", "12.0", True),
    ("sm_121f", "12.0", False),
    ("sm_90", "12.0", False),
    ("sm_80", "12.1", False),
    ("sm_90a", "9.0", True),
    ("sm_100", "12.0", False),
    ("sm_120", "13.0", False),
])
def test_cubin_runs_on(arch, cc, runs):
    ok, why = CudaArch.parse(arch).cubin_runs_on(CC(cc))
    assert ok is runs, why
    assert why and "\n" not in why


@pytest.mark.parametrize("arch, cc, jits", [
    ("compute_80", "12.1", True),
    ("compute_80", "7.5", False),
    ("compute_90", "12.0", True),
    ("compute_90a", "12.0", False),
    ("compute_90a", "9.0", True),
    ("compute_120f", "12.1", True),
    ("compute_120f", "12.0", True),
    ("compute_120f", "13.0", False),
    ("compute_121f", "12.0", False),
    ("compute_120", "13.0", True),
    ("compute_121a", "12.1", True),
    ("compute_120a", "12.1", False),
])
def test_ptx_jits_on(arch, cc, jits):
    ok, why = CudaArch.parse(arch).ptx_jits_on(CC(cc))
    assert ok is jits, why


def test_spellings_of_one_arch():
    a = CudaArch.parse("sm_121a")
    assert (a.dotted, a.compact, a.sm, a.compute, str(a)) == ("12.1a", "121a", "sm_121a", "compute_121a",
                                                              "12.1a")
    assert a.gencode() == ["-gencode", "arch=compute_121a,code=sm_121a"]
    assert a.gencode(ptx=True) == ["-gencode", "arch=compute_121a,code=sm_121a,compute_121a"]
    assert a.cc == CC("12.1")


@pytest.mark.parametrize("style, sep, expected", [
    ("dotted", ";", "12.0f;12.1a;9.0"),
    ("dotted", " ", "12.0f 12.1a 9.0"),
    ("compact", ";", "120f;121a;90"),
    ("compact", ",", "120f,121a,90"),
    ("cmake", ";", "120f-real;121a-real;90-real"),
    ("gencode", ";", "-gencode arch=compute_120f,code=sm_120f -gencode arch=compute_121a,code=sm_121a "
                     "-gencode arch=compute_90,code=sm_90"),
])
def test_spell_each_style(style, sep, expected):
    assert spell(parse_arch_list("12.0f;121a sm_90"), style, sep) == expected


def test_spell_unknown_style():
    with pytest.raises(UsageError, match="unknown arch spelling"):
        spell([CudaArch(12, 0)], "nvcc")


def test_parse_arch_list_keeps_order_and_drops_duplicates():
    assert parse_arch_list("12.1a, 12.0f;121a  9.0") == (CudaArch(12, 1, "a"), CudaArch(12, 0, "f"),
                                                          CudaArch(9, 0))
    assert parse_arch_list(["sm_120", "120", "12.0"]) == (CudaArch(12, 0),)
    assert parse_arch_list("") == ()


def test_target_tags():
    assert TARGETS["gb10"].tag == "sm121"
    assert TARGETS["blackwell"].tag == "sm120.sm121"
    assert TARGETS["hopper"].tag == "sm90"
    assert Target("x", (CC("8.9"),), "").tag == "sm89"


@pytest.mark.parametrize("target, archs, uncovered", [
    ("blackwell", "12.0f", []),
    ("blackwell", "12.0", []),
    ("blackwell", "12.0a", ["12.1"]),          # the classic mistake: 120a on a GB10
    ("blackwell", "12.0a;12.1a", []),
    ("blackwell", "12.1a", ["12.0"]),
    ("blackwell", "12.1", ["12.0"]),
    ("blackwell", "9.0;8.0", ["12.0", "12.1"]),
    ("gb10", "12.1a", []),
    ("gb10", "12.0a", ["12.1"]),
    ("sm120", "12.1", ["12.0"]),
    ("hopper", "9.0a", []),
    ("hopper", "12.0f", ["9.0"]),
])
def test_uncovered(target, archs, uncovered):
    assert [str(cc) for cc in TARGETS[target].uncovered(parse_arch_list(archs))] == uncovered


def test_covers_returns_the_first_native_arch():
    assert covers(parse_arch_list("9.0;12.0a;12.0f"), CC("12.1")) == CudaArch(12, 0, "f")
    assert covers(parse_arch_list("9.0"), CC("12.1")) is None


@pytest.mark.parametrize("cc, name", [("12.1", "gb10"), ("9.0", "hopper"), ("12.0", "sm120"), ("8.9", "sm89")])
def test_resolve_native(cc, name):
    t = resolve_target("native", detect=lambda: CC(cc))
    assert t.name == name
    assert t.devices == (CC(cc),)
    assert not t.uncovered([CudaArch(*CC(cc).__dict__.values())])


def test_native_for_unnamed_device_is_a_plain_target():
    t = native_target(CC("8.9"))
    assert t not in TARGETS.values() and t.tag == "sm89"


def test_native_without_a_gpu():
    with pytest.raises(UsageError, match="needs a visible GPU"):
        resolve_target("native", detect=lambda: None)


def test_named_target_never_detects():
    def boom():
        raise AssertionError("detect called for a named target")
    assert resolve_target("gb10", detect=boom) is TARGETS["gb10"]


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(UsageError) as exc:
        resolve_target("gb100", detect=lambda: None)
    msg = str(exc.value)
    assert "gb100" in msg and all(n in msg for n in ("gb10", "sm120", "blackwell", "hopper", "native"))
