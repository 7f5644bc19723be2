"""Recorded traces (recipes/traces/): every module FlashInfer's dispatcher asked for is in the set."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from blackwheel.builders import flashinfer_aot as fa
from blackwheel.reports.upstream_tests import trace_gaps
from blackwheel.core.recipe import recipes_dir

RECIPE = tomllib.loads((recipes_dir() / "flashinfer.toml").read_text())
TRACES = sorted((recipes_dir() / "traces").glob("flashinfer-*.json"))


def test_there_are_traces_for_hopper_and_gb10():
    assert {json.loads(p.read_text())["target"] for p in TRACES} >= {"hopper", "gb10"}


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.name)
def test_every_traced_module_is_in_the_default_set(path: Path):
    trace = json.loads(path.read_text())
    assert trace["version"] in [v["version"] for v in RECIPE["versions"]]
    assert trace_gaps(RECIPE, trace) == []


def test_a_module_the_set_lacks_is_a_gap_unless_its_tests_are_excluded():
    base = {"target": "hopper", "modules": {}}
    lacking = {"files": ["tests/attention/test_batch_prefill_kernels.py"], "asked_by": ["test_batch_prefill_x"]}
    gaps = trace_gaps(RECIPE, {**base, "modules": {"fp4_quantization_90": lacking}})
    assert len(gaps) == 1 and "fp4_quantization_90" in gaps[0] and "test_batch_prefill_x" in gaps[0]
    excluded = {**lacking, "asked_by": ["test_batch_prefill_with_paged_kv_cache_nvfp4"]}
    assert trace_gaps(RECIPE, {**base, "modules": {"fp4_quantization_90": excluded}}) == []
    # a hit the set lacks, with no test named: always a gap (an FA3 module is not in the gb10 set)
    sm90 = fa.module_names(RECIPE, "default", fa.target_archs(RECIPE, "hopper"))
    fa3 = next(n for n in sm90 if n.endswith("_sm90"))
    assert trace_gaps(RECIPE, {"target": "gb10", "modules": {fa3: {"files": ["tests/x.py"]}}})


def test_names_follow_flashinfer_spelling():
    names = fa.module_names(RECIPE, "default", fa.target_archs(RECIPE, "hopper"))
    assert {"norm", "silu_and_mul", "gelu_and_mul", "page", "cascade", "quantization"} <= set(names)
    assert ("batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_e4m3_dtype_o_bf16_dtype_idx_i32_head_dim_qk_64_"
            "head_dim_vo_64_posenc_0_use_swa_False_use_logits_cap_False") in names
    gb10 = fa.module_names(RECIPE, "default", fa.target_archs(RECIPE, "gb10"))
    assert not [n for n in gb10 if n.endswith("_sm90")] and len(set(names) - set(gb10)) == 8


def test_a_wrong_name_template_is_refused():
    req = fa.expand_kernel_set(RECIPE, "core")[0]
    made = [{"name": "not_" + fa.module_name(RECIPE, req), "request": req.label}]
    with pytest.raises(Exception, match="name template"):
        fa.check_module_names(RECIPE, [req], made)
    fa.check_module_names(RECIPE, [req], [{"name": fa.module_name(RECIPE, req), "request": req.label}])


def test_plan_prints_what_the_set_holds_and_its_coverage(capsys):
    from blackwheel import cli

    assert cli.main(["plan", "flashinfer", "--target", "hopper", "--kernels", "default"]) == 0
    hopper = capsys.readouterr().out
    assert "kernel set 'default' for hopper (9.0a): 50 modules" in hopper
    assert "batch_prefill_sm90" in hopper and "exclude-tests=['*_nvfp4']" in hopper
    gb10 = fa.kernel_set_table(RECIPE, "default", "gb10")
    assert "42 modules" in gb10 and "_sm90" not in gb10
