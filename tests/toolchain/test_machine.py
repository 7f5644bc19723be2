"""toolchain/machine.py: the one machine probe that toolchain checks and doctor both read."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from blackwheel.reports import doctor
from blackwheel.toolchain import machine, toolchain
from blackwheel.toolchain.machine import gcc_version, parse_compiler_version, parse_nvcc_version, resolve_nvcc

FIXTURES = Path(__file__).parents[1] / "fixtures" / "doctor"


@pytest.mark.parametrize("text, expected", [
    ("c++ (Debian 12.2.0-14+deb12u1) 12.2.0", ("gcc", (12, 2, 0))),
    ("g++ (GCC) 11.3.1 20221121 (Red Hat 11.3.1-4)", ("gcc", (11, 3, 1))),
    ("Ubuntu clang version 18.1.3 (1ubuntu1)", ("clang", (18, 1, 3))),
    ("", None),
])
def test_parse_compiler_version(text, expected):
    assert parse_compiler_version(text) == expected


def test_parse_nvcc_version():
    h100 = json.loads((FIXTURES / "h100.json").read_text())   # recorded by doctor on the H100
    assert parse_nvcc_version(h100["nvcc_version"]) == (12, 8, 93)
    assert parse_nvcc_version("bash: nvcc: command not found") is None


def test_resolve_nvcc_follows_scripts_and_links(tmp_path):
    real = tmp_path / "cuda-13.0" / "bin" / "nvcc"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF fake binary")
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    link = tmp_path / "nvcc-link"
    link.symlink_to(wrapper)
    assert str(resolve_nvcc(link)) == str(real)
    assert str(resolve_nvcc(real)) == str(real)


def test_gcc_version_is_the_parsed_banner():
    found = gcc_version()
    parsed = parse_compiler_version(machine.compiler_banner("c++"))
    assert found is None or (parsed[0] == "gcc" and tuple(found.release) == parsed[1])


def test_one_torch_script_for_the_build_and_for_doctor():
    assert toolchain._TORCH_PROBE is machine.TORCH_SCRIPT
    facts = machine.torch_facts(sys.executable)
    if "error" in facts:
        pytest.skip(f"no torch here: {facts['error']}")
    assert {"torch", "torch_cuda", "cxx11_abi", "arch_list", "purelib", "available"} <= set(facts)
    seen = doctor.probe_torch()
    assert (seen["version"], seen["cuda"], seen["arch_list"]) == (facts["torch"], facts["torch_cuda"],
                                                                   facts["arch_list"])
