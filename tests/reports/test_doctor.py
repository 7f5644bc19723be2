"""doctor: the analysis on recorded machines (tests/fixtures/doctor), the parsers, and the real probes here.

Fixtures: nogpu.json was recorded on the CI machine (no GPU, torch cu130, nvcc behind a wrapper);
gb10, rtx5090 and h100 were written from those machines' known outputs (nvidia-smi csv, nvcc --version).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest

from blackwheel import cli

from blackwheel.reports import doctor
from blackwheel.reports.doctor import Finding, Probe, analyse, parse_gpus, probe_machine, report
from blackwheel.toolchain.machine import detect_compute_capability, parse_nvcc_version
from blackwheel.core.targets import ComputeCapability

FIXTURES = Path(__file__).parents[1] / "fixtures" / "doctor"


def machine(name: str, **changes) -> Probe:
    probe = Probe.from_dict(json.loads((FIXTURES / f"{name}.json").read_text()))
    return dataclasses.replace(probe, **changes)


def summary(findings: list[Finding]) -> list[tuple[str, str]]:
    """(severity, the message's first words) for compact comparisons."""
    return [(f.severity, " ".join(f.message.split()[:3])) for f in findings]


# ---- recorded machines --------------------------------------------------------------------------------
def test_gb10_findings():
    findings = analyse(machine("gb10"))
    assert summary(findings) == [
        ("blocking", "/usr/local/bin/nvcc leads to"),
        ("blocking", "triton 3.5.1 on"),
        ("blocking", "vllm 0.25.1: 1"),
        ("warning", "TORCH_CUDA_ARCH_LIST='12.0' does not"),
        ("warning", "vllm 0.25.1: 1"),
    ]
    fixes = {f.fix for f in findings}
    assert "export TRITON_PTXAS_PATH=/usr/local/cuda-13.0/bin/ptxas" in fixes
    assert "export CUDA_HOME=/usr/local/cuda-13.0" in fixes
    assert "GB10 is 12.1, not 12.0" in findings[3].message and "_qutlass_C" in findings[2].message


def test_gb10_with_fixes_applied_has_no_blocking_finding():
    probe = machine("gb10", packages=(), triton_ptxas_exists=True, env_home_real="/usr/local/cuda-13.0",
                    env={"CUDA_HOME": "/usr/local/cuda-13.0", "TRITON_PTXAS_PATH": "/usr/local/cuda-13.0/bin/ptxas",
                         "TORCH_CUDA_ARCH_LIST": "12.1a"})
    assert analyse(probe) == []
    assert report(probe, as_json=False)[1] == 0


def test_rtx5090_is_healthy():
    probe = machine("rtx5090")
    assert analyse(probe) == []
    text, status = report(probe, as_json=False)
    assert status == 0 and "flash-attn 2.8.3.post2: on 12.0: 1 native" in text


def test_h100_with_cuda_12_and_old_driver():
    assert summary(analyse(machine("h100"))) == [
        ("blocking", "driver 570.133.20 is"),
        ("blocking", "nvcc is CUDA"),
        ("blocking", "torch 2.7.0+cu128 is"),
    ]


def test_no_gpu_machine_recorded_here():
    probe = machine("nogpu")
    assert summary(analyse(probe)) == [("blocking", "/usr/local/bin/nvcc leads to"), ("info", "no GPU visible")]
    text, status = report(probe, as_json=True)
    d = json.loads(text)
    assert status == 1 and d["ok"] is False and Probe.from_dict(d["probe"]) == probe


# ---- single checks, by changing one fact -----------------------------------------------------------------
@pytest.mark.parametrize("knob, value, severity", [
    ("TORCH_CUDA_ARCH_LIST", "12.0a", "blocking"),  # arch-specific 12.0 code does not run on a GB10
    ("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX", "blocking"),
    ("TORCH_CUDA_ARCH_LIST", "12.0+PTX", "warning"),
    ("TORCH_CUDA_ARCH_LIST", "12.1+PTX", None),
    ("FLASHINFER_CUDA_ARCH_LIST", "12.0f 12.1a", None),
    ("FLASH_ATTN_CUDA_ARCHS", "80;90;120", "warning"),
    ("FLASH_ATTN_CUDA_ARCHS", "twelve", "warning"),
])
def test_arch_knobs_against_a_gb10(knob, value, severity):
    probe = machine("gb10", packages=(), triton_version=None, env_home_real="/usr/local/cuda-13.0",
                    env={"CUDA_HOME": "/usr/local/cuda-13.0", knob: value})
    assert [f.severity for f in analyse(probe)] == ([severity] if severity else [])


def test_torch_arch_list_without_the_gpu():
    torch = dict(machine("gb10").torch, arch_list=["sm_80", "sm_90"])
    (finding,) = [f for f in analyse(machine("gb10", torch=torch)) if f.message.startswith("torch")]
    assert finding.severity == "blocking" and "no kernel that runs on 12.1" in finding.message
    torch["arch_list"] = ["sm_80", "sm_90", "compute_90"]
    (finding,) = [f for f in analyse(machine("gb10", torch=torch)) if f.message.startswith("torch")]
    assert finding.severity == "warning" and "JIT-compile from PTX" in finding.message


def test_cpu_only_torch_and_missing_torch():
    cpu = {"version": "2.11.0+cpu", "cuda": None, "available": False, "cxx11_abi": True, "arch_list": []}
    assert ("blocking", "torch 2.11.0+cpu is") in summary(analyse(machine("nogpu", torch=cpu)))
    missing = analyse(machine("nogpu", torch={"error": "not installed"}))
    assert ("warning", "torch is not") in summary(missing)


def test_cuda_home_pointing_at_another_toolkit():
    probe = machine("rtx5090", env={"CUDA_HOME": "/usr/local/cuda-12.8"}, env_home_real="/usr/local/cuda-12.8")
    (finding,) = analyse(probe)
    assert finding.severity == "warning" and "two toolkits mix" in finding.message


def test_old_gcc_and_no_nvcc():
    probe = machine("rtx5090", host_compiler="g++ (Ubuntu 9.4.0-1ubuntu1~20.04.2) 9.4.0", nvcc_path=None)
    assert summary(analyse(probe)) == [("warning", "nvcc not found"), ("warning", "g++ 9.4.0 is")]


# ---- parsers of recorded outputs ------------------------------------------------------------------------
def test_parse_gpus_several_and_garbage():
    text = "NVIDIA GB10, 12.1, 580.95.05\nNVIDIA H100 80GB HBM3, 9.0, 575.51.03\nNo devices were found\n"
    assert [(g.name, str(g.cc), g.driver) for g in parse_gpus(text)] == [
        ("NVIDIA GB10", "12.1", "580.95.05"), ("NVIDIA H100 80GB HBM3", "9.0", "575.51.03")]
    assert parse_gpus(None) == []


# ---- the real probes on this machine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def here() -> Probe:
    return probe_machine()


def test_real_probe_matches_this_machine(here):
    assert here.machine and (here.nvidia_smi is None) == (shutil.which("nvidia-smi") is None)
    if here.nvcc_path:
        assert os.path.basename(here.nvcc_real) == "nvcc" and parse_nvcc_version(here.nvcc_version)
    if shutil.which("nvidia-smi") is None:
        assert here.nvidia_smi_error == "nvidia-smi not found"
        assert ("info", "no GPU visible") in summary(analyse(here))


def test_detect_compute_capability_here(here):
    cc = detect_compute_capability()
    gpus = parse_gpus(here.nvidia_smi)
    if gpus:
        assert cc == gpus[0].cc
    elif not any(os.path.exists(n) for n in ("/dev/nvidiactl", "/dev/dxg")):
        assert cc is None  # no GPU, no driver: None, and no exception
    else:
        assert cc is None or isinstance(cc, ComputeCapability)


def test_cli_doctor_runs_here(here, capsys, monkeypatch):
    monkeypatch.setattr(doctor, "probe_machine", lambda: here)  # probed once, by the fixture
    status = cli.main(["doctor", "--json"])
    d = json.loads(capsys.readouterr().out)
    blocking = [f for f in d["findings"] if f["severity"] == "blocking"]
    assert status == (1 if blocking else 0) and d["probe"]["machine"]


def test_recorded_h100_test_machine_is_healthy():
    """Probe recorded by `blackwheel doctor --json` on the GPU test machine (2026-11-25)."""
    probe = machine("h100-recorded")
    assert [str(cc) for cc in doctor.device_ccs(probe)] == ["9.0"]
    assert len(doctor.parse_gpus(probe.nvidia_smi)) == 2
    assert not [f for f in analyse(probe) if f.severity == "blocking"]
