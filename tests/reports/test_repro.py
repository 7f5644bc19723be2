"""The #1969 reproduction: the report from recorded results, and the small form for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blackwheel import cli

from blackwheel.reports import repro
from tests.conftest import needs_nvcc_and_torch

RECORDED = Path(__file__).resolve().parents[2] / "docs" / "reports" / "h100-2026-11-25" / "repro-1969-h100.json"


def test_report_from_the_gpu_machine_run_names_the_runtime_error():
    data = json.loads(RECORDED.read_text())
    md = repro.render_markdown(data["scenarios"], data["runtime"], 1, data["machine"])
    assert "cudaErrorNoKernelImageForDevice" in md
    assert "compat predicted `none`" in md and "compat predicted `native`" in md
    # upstream with 121 on that GPU host: torch's fallback gave sm_90 only
    assert "nothing for 12.x" in md


def test_report_marks_a_missing_build_file():
    results = [
        {"scenario": "upstream-121", "description": "up 121", "FLASH_ATTN_CUDA_ARCHS": "121",
         "build_file": False, "error": "IndexError: list index out of range", "objects": []},
        {"scenario": "blackwheel-gb10", "description": "ours", "FLASH_ATTN_CUDA_ARCHS": "121", "build_file": True,
         "gencode": ["-gencode arch=compute_121,code=sm_121"],
         "objects": [{"object": "a.o", "cubins": ["12.1"], "ptx": [], "compat_12_1": "native", "rule": "r"}]},
    ]
    md = repro.render_markdown(results, None, 1, "test")
    assert "the build died: `IndexError: list index out of range`" in md
    assert "every diagnostic object runs natively on 12.1" in md


@needs_nvcc_and_torch
@pytest.mark.nvcc
@pytest.mark.slow
@pytest.mark.network
def test_small_form_on_this_machine(flash_attn_recipes, bw_env, tmp_path, capsys):
    """Upstream drops 121; our patch gives an object whose only cubin is sm_121, native on 12.1."""
    out = tmp_path / "reports"
    assert cli.main(["repro-1969", "--stack", "local", "--units", "1", "--out", str(out)]) == 0
    data = json.loads((out / "repro-1969.json").read_text())
    by = {s["scenario"]: s for s in data["scenarios"]}
    assert not any("121" in f for f in by["upstream-121"].get("gencode", []))
    assert by["upstream-default"]["gencode"] and not any("121" in f for f in by["upstream-default"]["gencode"])
    ours = by["blackwheel-gb10"]
    assert ours["gencode"] == ["-gencode arch=compute_121,code=sm_121"]
    assert [o["cubins"] for o in ours["objects"]] == [["12.1"]]
    assert ours["objects"][0]["compat_12_1"] == "native"
    assert (out / "repro-1969.md").read_text().startswith("# flash-attention #1969")
