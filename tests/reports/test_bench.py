"""bench's pure parts on CPU: work formulas, statistics, rotation, result schema, first-launch logic,
and one tiny CPU run of the whole pipeline against a stand-in module (numbers mean nothing)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from blackwheel import cli
from blackwheel.reports import bench
from blackwheel.core.errors import UsageError


def test_attention_flops_formula():
    # 4 * b * h * sq * sk * d: two matmuls (QK^T and PV) of 2 * sq * sk * d each
    assert bench.attention_flops(4, 32, 4096, 4096, 128) == 4 * 4 * 32 * 4096 * 4096 * 128
    full = bench.attention_flops(2, 3, 5, 7, 64)
    assert bench.attention_flops(2, 3, 5, 7, 64, causal=True) == full / 2
    assert bench.attention_flops(2, 3, 5, 7, 64, backward=True) == full * 2.5


def test_byte_formulas():
    assert bench.kv_cache_bytes(1, 32768, 8, 128, 2) == 2 * 32768 * 8 * 128 * 2  # K and V
    assert bench.copy_bytes(1 << 30) == 2 << 30                                 # read + write
    assert bench.matmul_flops(8192, 8192, 8192) == 2 * 8192 ** 3


def test_attn_case_work_and_metric():
    decode = bench.AttnCase("decode", 8, 32, 8, 1, 16384, 128, False)
    assert decode.metric == "gbps" and decode.work() == bench.kv_cache_bytes(8, 16384, 8, 128, 2)
    bwd = bench.AttnCase("bwd", 4, 32, 32, 4096, 4096, 128, True)
    assert bwd.metric == "tflops"
    assert bwd.work() == bench.attention_flops(4, 32, 4096, 4096, 128, causal=True, backward=True)
    assert "gqa32/8" in decode.name and "causal" in bwd.name


def test_full_cases_cover_the_brief():
    cases = bench.flash_attn_cases(bench.SIZES["full"])
    kinds = {(c.kernel, c.causal) for c in cases}
    assert {("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)} <= kinds
    decode = [c for c in cases if c.kernel == "decode"]
    assert {c.seqlen_k for c in decode} >= {8192, 32768} and all(c.heads_k == 8 for c in decode)
    assert all(c.headdim == 128 for c in cases)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "result names must be unique"


@pytest.mark.parametrize("values, want", [([5.0], 5.0), ([1.0, 9.0, 2.0], 2.0), ([4.0, 1.0, 3.0, 2.0], 2.5)])
def test_median(values, want):
    assert bench.median(values) == want


def test_rotation_exceeds_twice_l2():
    l2 = 50 << 20
    for per_set in (1 << 20, 7 << 20, 33 << 20, 400 << 20):
        n = bench.rotation_sets(per_set, l2)
        assert n >= 2
        assert n * per_set >= 2 * l2 or n == 32
    with pytest.raises(ValueError):
        bench.rotation_sets(0, l2)


class CountingTimer:
    """Stands in for CUDA events: each call 'takes' 0.25 ms."""

    def per_call_ms(self, block, calls):
        block(calls)
        return 0.25


def test_measure_rotates_through_every_set():
    calls = [0, 0, 0]
    fns = [lambda i=i: calls.__setitem__(i, calls[i] + 1) for i in range(3)]
    times = bench.measure(fns, CountingTimer(), warmup=2, reps=5, min_sample_ms=1.0)
    assert times == [0.25] * 5
    # warm-up 2 rounds + 1 estimate round + 5 samples of 3 * ceil(1.0 / 0.25 / 3) = 6 calls each
    assert sum(calls) == 2 * 3 + 3 + 5 * 6
    assert max(calls) - min(calls) <= 1, "sets are used evenly"


def test_make_result_derives_rates_and_ratios():
    r = bench.make_result(package="p", kernel="fwd", name="x", shape={}, metric="tflops", work=2e12,
                          times_ms=[2.0, 1.0, 3.0], ceiling=4000.0, reference={"median_ms": 3.0})
    assert r["median_ms"] == 2.0 and r["achieved"] == pytest.approx(1000.0)
    assert r["fraction_of_ceiling"] == pytest.approx(0.25)
    assert r["speedup_vs_reference"] == pytest.approx(1.5)
    assert r["error"] is None


def _doc(**overrides):
    doc = {"schema": bench.SCHEMA, "environment": {}, "ceilings": {}, "results": [], "first_launch": []}
    return {**doc, **overrides}


def test_validate_results_schema():
    bench.validate_results(_doc())
    with pytest.raises(UsageError, match="expected schema"):
        bench.validate_results({"schema": "other"})
    with pytest.raises(UsageError, match="lacks first_launch"):
        bench.validate_results({k: v for k, v in _doc().items() if k != "first_launch"})
    with pytest.raises(UsageError, match="lacks metric"):
        bench.validate_results(_doc(results=[{"name": "x", "error": None}]))
    err = bench.error_result(package="p", kernel="k", name="x", shape={}, exc=RuntimeError("boom\nmore"))
    assert err["error"] == "RuntimeError: boom"
    bench.validate_results(_doc(results=[err]))


def test_manifests_found_and_checked(tmp_path):
    good = tmp_path / "wh" / "default" / "a.whl.manifest.json"
    good.parent.mkdir(parents=True)
    good.write_text(json.dumps({"package": "flash-attn"}))
    found = bench.find_manifests([], str(tmp_path / "wh"))
    assert found == [good]
    assert bench.load_manifest(good)["content"] == {"package": "flash-attn"}
    with pytest.raises(UsageError, match="does not exist"):
        bench.find_manifests([str(tmp_path / "nope.json")], None)
    bad = tmp_path / "bad.manifest.json"
    bad.write_text("{")
    with pytest.raises(UsageError, match="not readable JSON"):
        bench.load_manifest(bad)


def test_first_launch_retries_with_jit_only_when_native_fails(monkeypatch):
    seen = []

    def fake_child(package, family, device, *, allow_jit, timeout_s):
        seen.append(allow_jit)
        if not allow_jit:
            return {"ok": False, "error": "no kernel image is available"}
        return {"ok": True, "timings": {"import_to_first_result_s": 42.0}}

    monkeypatch.setattr(bench, "_run_child", fake_child)
    r = bench.first_launch("flash_attn", "fwd", "cuda", 10)
    assert seen == [False, True]
    assert r["native_code"] is False and r["import_to_first_result_s"] == 42.0
    assert "no kernel image" in r["native_error"] and r["error"] is None


def test_unknown_package_is_refused_before_work(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--packages", "nope"]) == UsageError.exit_code
    assert "no benchmark for nope" in capsys.readouterr().err
    assert not (tmp_path / bench.RESULTS_NAME).exists()


def _standin_flash_attn(torch):
    """A torch-math stand-in with flash-attn's call shapes, to drive the pipeline on a CPU."""
    def attend(q, k, v, causal=False, **_):
        qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=causal, enable_gqa=True)
        return out.transpose(1, 2)

    def kvcache(q, k_cache, v_cache, cache_seqlens=None, **_):
        return attend(q, k_cache, v_cache)

    return types.SimpleNamespace(flash_attn_func=attend, flash_attn_with_kvcache=kvcache, __version__="stand-in")


def test_tiny_cpu_run_writes_a_valid_document(tmp_path, monkeypatch):
    import torch   # the test session always has it: a missing torch must fail, not skip
    monkeypatch.setitem(sys.modules, "flash_attn", _standin_flash_attn(torch))
    rc = cli.main(["bench", "--out", str(tmp_path), "--device", "cpu", "--skip-first-launch"])
    doc = bench.validate_results(json.loads((tmp_path / bench.RESULTS_NAME).read_text()))
    assert rc == 0, doc["errors"] + [r["error"] for r in doc["results"]]
    assert set(doc["ceilings"]) == {"gbps", "tflops"}
    assert [r["kernel"] for r in doc["results"]] == ["fwd", "bwd", "prefill", "decode"]
    assert all(r["reference"]["median_ms"] > 0 for r in doc["results"])
    assert doc["environment"]["packages"]["flash-attn"] == "stand-in" and doc["finished"]


# ---- flashinfer --------------------------------------------------------------------------------------
def test_flashinfer_registry_entry():
    fi = bench.BENCHMARKS["flashinfer"]
    assert (fi.import_name, fi.distribution, fi.run) == ("flashinfer", "flashinfer-python", bench.run_flashinfer)
    assert set(fi.families) == {"decode", "prefill", "norm", "activation"}
    assert fi.gpu_only and not bench.BENCHMARKS["flash_attn"].gpu_only
    assert fi.env == {"FLASHINFER_DISABLE_JIT": "1", "FLASHINFER_NO_DOWNLOAD": "1", "FLASHINFER_USE_CUDA_NORM": "1"}


def test_flashinfer_cases_cover_the_brief():
    full = bench.flashinfer_cases(bench.SIZES["full"])
    quick = bench.flashinfer_cases(bench.SIZES["quick"])
    decode = {(c.batch, c.seqlen, c.kv_dtype) for c in full if c.kernel == "decode"}
    assert decode == {(8, 16384, "bf16"), (64, 4096, "bf16"), (8, 16384, "fp8_e4m3"), (64, 4096, "fp8_e4m3")}
    assert {(c.batch, c.seqlen) for c in full if c.kernel == "prefill"} == {(4, 2048), (1, 8192)}
    assert all((c.heads, c.heads_k, c.headdim, c.page_size) == (32, 8, 128, 16) for c in full)
    assert {c.name for c in quick} < {c.name for c in full}, "quick is a smaller subset of full"
    assert {c.kernel for c in quick} == {"decode", "prefill"}
    names = [c.name for c in full]
    assert len(names) == len(set(names)), "result names must be unique"
    assert all(n.startswith("flashinfer ") for n in names), "told apart from flash_attn rows in one report"


def test_flashinfer_work_per_case():
    decode = bench.FlashInferCase("decode", 8, 16384)
    assert decode.metric == "gbps" and decode.work() == 2 * 8 * 16384 * 8 * 128 * 2   # K and V, bf16
    fp8 = bench.FlashInferCase("decode", 8, 16384, "fp8_e4m3")
    assert fp8.work() == decode.work() / 2 and "fp8_e4m3" in fp8.name
    assert decode.pages == 8 * 16384 // 16 and decode.shape()["seqlen_q"] == 1
    prefill = bench.FlashInferCase("prefill", 4, 2048)
    per_request = bench.attention_flops(1, 32, 2048, 2048, 128, causal=True)
    assert prefill.metric == "tflops" and prefill.work() == 4 * per_request
    ref = prefill.reference_case()
    assert ref.work() == prefill.work() and ref.causal, "the SDPA reference does the same total work"
    assert decode.reference_case() is None
    assert prefill.set_bytes() == 2 * 4 * 2048 * (32 + 8) * 128 * 2               # q, out, k, v


def test_flashinfer_refused_on_cpu(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--packages", "flashinfer", "--device", "cpu"]) == UsageError.exit_code
    err = capsys.readouterr().err
    assert err.strip() == "blackwheel bench: flashinfer runs only on a CUDA GPU, not on --device cpu"
    assert not (tmp_path / bench.RESULTS_NAME).exists()


def test_flashinfer_env_is_set_only_where_unset(monkeypatch):
    for key in bench.FLASHINFER_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("FLASHINFER_DISABLE_JIT", "0")
    bench.BENCHMARKS["flashinfer"].apply_env()
    import os
    assert os.environ["FLASHINFER_DISABLE_JIT"] == "0", "a value the user set is kept"
    assert os.environ["FLASHINFER_NO_DOWNLOAD"] == os.environ["FLASHINFER_USE_CUDA_NORM"] == "1"


def _standin_flashinfer(torch, log, broken_kv=None):
    """flashinfer's wrapper API recording every call; checks run() inputs against plan()."""
    class Decode:
        def __init__(self, ws, layout):
            log.append(("decode", layout))

        def plan(self, indptr, indices, last, hq, hkv, dim, page, q_data_type, kv_data_type):
            log.append(("plan",))
            assert int(indptr[-1]) == len(indices) and int(last.max()) <= page
            self.want = (len(indices), 2, page, hkv, dim), kv_data_type, (len(indptr) - 1, hq, dim)

        def run(self, q, cache):
            log.append(("run",))
            assert (tuple(cache.shape), cache.dtype, tuple(q.shape)) == self.want
            if cache.dtype == broken_kv:
                raise RuntimeError("JIT compilation is disabled\nmore")
            return torch.empty_like(q)

    class Prefill:
        def __init__(self, ws, layout, backend):
            log.append(("prefill", layout, backend))

        def plan(self, qo_indptr, kv_indptr, hq, hkv, dim, causal, q_data_type):
            log.append(("plan",))
            assert causal and torch.equal(qo_indptr, kv_indptr)
            self.want = int(qo_indptr[-1]), hq, hkv, dim

        def run(self, q, k, v):
            log.append(("run",))
            assert (q.shape[0], q.shape[1], k.shape[1], q.shape[2]) == self.want and k.shape == v.shape
            return torch.empty_like(q)

    return types.SimpleNamespace(BatchDecodeWithPagedKVCacheWrapper=Decode,
                                 BatchPrefillWithRaggedKVCacheWrapper=Prefill)


def test_run_flashinfer_plans_once_and_keeps_going_after_a_broken_case():
    import torch   # the test session always has it: a missing torch must fail, not skip
    device = torch.device("cpu")
    ctx = bench.BenchContext(torch, device, bench.Timer(torch, device), 8 << 20, bench.SIZES["tiny"])
    log, results = [], []
    fi = _standin_flashinfer(torch, log, broken_kv=torch.float8_e4m3fn)
    bench.run_flashinfer(ctx, fi, results.append)
    cases = bench.flashinfer_cases(bench.SIZES["tiny"])
    assert [r["name"] for r in results] == [c.name for c in cases]
    ok = {r["kernel"]: r for r in results if not r["error"]}
    broken = [r for r in results if r["error"]]
    assert len(broken) == 1 and broken[0]["shape"]["kv_dtype"] == "fp8_e4m3"
    assert broken[0]["error"] == "RuntimeError: JIT compilation is disabled"
    assert ok["decode"]["metric"] == "gbps" and ok["decode"]["work"] == cases[0].work()
    assert ok["decode"]["reference"] is None
    assert ok["prefill"]["metric"] == "tflops" and ok["prefill"]["reference"]["median_ms"] > 0
    assert ("prefill", "NHD", "fa2") in log
    plans = [i for i, e in enumerate(log) if e == ("plan",)]
    assert len(plans) == len(cases), "one plan per case, outside the timed calls"
    runs_after_plan = [sum(1 for e in log[p:] if e == ("run",)) for p in plans]
    assert all(n > bench.SIZES["tiny"].reps for n in runs_after_plan), "run() is what is timed"


def test_flashinfer_families_launch_once_with_small_shapes():
    import torch   # the test session always has it: a missing torch must fail, not skip
    log = []
    fi = _standin_flashinfer(torch, log)
    fi.norm = types.SimpleNamespace(rmsnorm=lambda x, w, eps: log.append(("rmsnorm", tuple(x.shape), w.shape[0])))
    fi.activation = types.SimpleNamespace(silu_and_mul=lambda x: log.append(("silu_and_mul", tuple(x.shape))))
    for family in bench.BENCHMARKS["flashinfer"].families.values():
        family(torch, fi, torch.device("cpu"))
    assert log.count(("run",)) == 2 and log.count(("plan",)) == 2
    assert ("prefill", "NHD", "fa2") in log and ("decode", "NHD") in log
    assert ("rmsnorm", (64, 4096), 4096) in log and ("silu_and_mul", (64, 4096)) in log
