"""Recorded traces (recipes/traces/): every module FlashInfer's dispatcher asked for is in the set."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from blackwheel.builders import flashinfer_aot as fa
from blackwheel.reports.traces import add_runs, derive_for_target, trace_gaps, write_trace
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
    assert not [n for n in gb10 if n.endswith("_sm90")] and len(set(names) - set(gb10)) == 10


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
    assert "kernel set 'default' for hopper (9.0a): 52 modules" in hopper
    assert "batch_prefill_sm90" in hopper and "exclude-tests=['*_nvfp4']" in hopper
    # dtype pairs as held: FA3 has an FP8 query with an FP8 cache, never f16 q beside an e4m3 cache
    fa3 = next(line for line in hopper.splitlines() if line.strip().startswith("batch_prefill_sm90"))
    assert "e4m3/e4m3" in fa3 and "bf16/bf16" in fa3 and "bf16/e4m3" not in fa3
    gb10 = fa.kernel_set_table(RECIPE, "default", "gb10")
    assert "42 modules" in gb10 and "_sm90" not in gb10


DERIVED = [p for p in TRACES if json.loads(p.read_text())["how"].startswith("derived")]


def test_there_is_a_vllm_trace_for_each_target():
    vllm = {json.loads(p.read_text())["target"] for p in TRACES if p.stem.endswith("-vllm")}
    assert vllm >= {"hopper", "gb10"}


@pytest.mark.parametrize("path", DERIVED, ids=lambda p: p.name)
def test_a_derived_trace_is_what_the_rule_gives_from_its_measured_one(path: Path):
    """A derived trace is not edited by hand: it equals derive_for_target of the hopper trace it names."""
    derived = json.loads(path.read_text())
    measured = json.loads(path.with_name(path.name.replace(f"-{derived['target']}", "-hopper")).read_text())
    again = derive_for_target(measured, RECIPE, derived["target"], derived["how"])
    assert again == derived


def test_derive_carries_fa3_to_fa2_only_where_the_target_has_no_9_0a():
    fa2 = "batch_prefill_with_kv_cache_dtype_q_bf16_x"
    trace = {"package": "flashinfer", "version": "0.6.13", "target": "hopper", "files": ["t.py"],
             "modules": {fa2 + "_sm90": {"prebuilt": True, "files": ["t.py"]},
                         "fp4_quantization_90": {"prebuilt": False, "files": ["t.py"], "asked_by": ["test_nvfp4"]},
                         "quantization": {"prebuilt": False, "files": ["t.py"], "asked_by": ["test_mask"]}}}
    gb10 = derive_for_target(trace, RECIPE, "gb10", "derived")
    assert gb10["modules"] == {fa2: {"files": ["t.py"]},
                               "quantization": {"files": ["t.py"], "asked_by": ["test_mask"]}}
    assert gb10["archs"] == ["12.1a"] and gb10["target"] == "gb10"
    assert set(derive_for_target(trace, RECIPE, "hopper", "same")["modules"]) == {fa2 + "_sm90", "quantization"}


def test_derive_gives_an_fp8_query_the_output_dtype_where_only_fa2_exists():
    fp8 = ("batch_prefill_with_kv_cache_dtype_q_e4m3_dtype_kv_e4m3_dtype_o_bf16_dtype_idx_i32_head_dim_qk_128_"
           "head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False")
    trace = {"package": "flashinfer", "version": "0.6.13", "target": "hopper", "files": ["t.py"],
             "modules": {fp8 + "_sm90": {"prebuilt": False, "files": ["t.py"]}}}
    gb10 = derive_for_target(trace, RECIPE, "gb10", "derived")
    assert list(gb10["modules"]) == [fp8.replace("_dtype_q_e4m3_", "_dtype_q_bf16_")]
    assert list(derive_for_target(trace, RECIPE, "hopper", "same")["modules"]) == [fp8 + "_sm90"]
    # an FA2 module whose KV cache is FP8 keeps its query as it was
    fa2 = fp8.replace("_dtype_q_e4m3_", "_dtype_q_f16_").replace("_dtype_o_bf16_", "_dtype_o_f16_")
    assert list(derive_for_target({**trace, "modules": {fa2: {"files": ["t.py"]}}}, RECIPE, "gb10", "d")["modules"]) == [fa2]


def test_a_later_run_grows_the_trace_and_a_module_now_prebuilt_drops_its_askers():
    trace = {"files": ["a.py"], "not_traced": ["b.py (no time)"],
             "modules": {"quantization": {"prebuilt": False, "files": ["a.py"], "asked_by": ["test_mask"]}}}
    run = {"files": {"b.py": {"passed": 3}},
           "trace": {"modules": {"quantization": {"aot": True, "calls": 2}, "rope": {"aot": True, "calls": 1}}}}
    grown = add_runs(trace, [run])
    assert grown["modules"] == {"quantization": {"prebuilt": True, "files": ["a.py", "b.py"]},
                                "rope": {"prebuilt": True, "files": ["b.py"]}}
    assert grown["files"] == ["a.py", "b.py"] and grown["not_traced"] == []
    assert trace["modules"]["quantization"]["asked_by"] == ["test_mask"]     # the input is left alone
    with pytest.raises(Exception, match="without a trace"):
        add_runs(trace, [{"files": {"b.py": {}}}])


def test_write_trace_is_whole_and_sorted(tmp_path):
    path = tmp_path / "t.json"
    write_trace(path, {"modules": {"b": {}, "a": {}}, "target": "gb10"})
    assert path.read_text().index('"a"') < path.read_text().index('"b"') and path.read_text().endswith("\n")
    assert not [p for p in tmp_path.iterdir() if p.name != "t.json"]
