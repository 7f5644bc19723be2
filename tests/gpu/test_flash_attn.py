"""flash-attn kernels against fp32 SDPA: dense fwd+bwd, GQA, varlen, KV cache (contiguous and paged),
and a first launch in a fresh process with the driver's PTX JIT disabled.

56 parametrized correctness cases + 1 first-launch case (about a minute on an H100).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

import attention_ref as ar  # noqa: E402  (beside this file; conftest puts it on the path)
import kernel_check as kc  # noqa: E402

DTYPES = ("bf16", "fp16")
PAGE = 256                     # flash-attn's paged KV needs a block size that is a multiple of 256


@pytest.fixture(scope="module")
def fa():
    return kc.import_or_fail("flash_attn")


def _dense_attend(causal):
    def attend(q, k, v, lowprec):
        return (ar.attention_lowprec if lowprec else ar.attention_fp32)(q, k, v, causal)
    return attend


def _check_fwd_bwd(fa_out, grads, ref, tol, record):
    checks = [kc.compare("out", fa_out, ref.out, ref.out_lowprec, tol)]
    checks += [kc.compare(n, g, r, rl, tol, backward=True)
               for n, g, r, rl in zip(("dq", "dk", "dv"), grads, ref.grads, ref.grads_lowprec)]
    kc.assert_checks(checks, record)


def _qkv_dout(rand, dtype, b, sq, sk, h, hk, d):
    q = rand((b, sq, h, d), dtype, requires_grad=True)
    k = rand((b, sk, hk, d), dtype, requires_grad=True)
    v = rand((b, sk, hk, d), dtype, requires_grad=True)
    return q, k, v, rand((b, sq, h, d), dtype)


@pytest.mark.parametrize("seqlens", [(512, 512), (113, 203)], ids=["s512", "sq113-sk203"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("headdim", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_fwd_bwd(fa, rand, record, device, dtype, headdim, causal, seqlens):
    tol = kc.TOLERANCES[dtype]
    q, k, v, dout = _qkv_dout(rand, tol.dtype, 2, *seqlens, 4, 4, headdim)
    kc.poison_allocator(q.numel() * q.element_size(), device)
    out = fa.flash_attn_func(q, k, v, causal=causal)
    kc.assert_written(out, q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_fwd_bwd(out, grads, ar.reference(_dense_attend(causal), q, k, v, dout), tol, record)


@pytest.mark.parametrize("heads", [(8, 2), (8, 1)], ids=["gqa8-2", "mqa8-1"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gqa_fwd_bwd(fa, rand, record, device, dtype, causal, heads):
    tol = kc.TOLERANCES[dtype]
    q, k, v, dout = _qkv_dout(rand, tol.dtype, 2, 384, 384, *heads, 128)
    kc.poison_allocator(q.numel() * q.element_size(), device)
    out = fa.flash_attn_func(q, k, v, causal=causal)
    kc.assert_written(out, q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert grads[1].shape == k.shape, "dk must keep the KV head count"
    _check_fwd_bwd(out, grads, ar.reference(_dense_attend(causal), q, k, v, dout), tol, record)


SEQ_Q = [37, 256, 1, 190]
SEQ_K = [37, 300, 17, 190]     # longer keys in some sequences: causal aligns bottom-right per sequence


def _cumulative(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_varlen_fwd_bwd(fa, rand, record, device, dtype, causal, headdim):
    tol = kc.TOLERANCES[dtype]
    cu_q, cu_k = _cumulative(SEQ_Q), _cumulative(SEQ_K)
    q = rand((cu_q[-1], 6, headdim), tol.dtype, requires_grad=True)
    k = rand((cu_k[-1], 2, headdim), tol.dtype, requires_grad=True)
    v = rand((cu_k[-1], 2, headdim), tol.dtype, requires_grad=True)
    dout = rand((cu_q[-1], 6, headdim), tol.dtype)
    as_tensor = lambda cu: torch.tensor(cu, dtype=torch.int32, device=device)  # noqa: E731
    kc.poison_allocator(q.numel() * q.element_size(), device)
    out = fa.flash_attn_varlen_func(q, k, v, as_tensor(cu_q), as_tensor(cu_k), max(SEQ_Q), max(SEQ_K),
                                    causal=causal)
    kc.assert_written(out, q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def attend(q_, k_, v_, lowprec):
        one = ar.attention_lowprec if lowprec else ar.attention_fp32
        return ar.attention_varlen(one, q_, k_, v_, cu_q, cu_k, causal)

    _check_fwd_bwd(out, grads, ar.reference(attend, q, k, v, dout), tol, record)


CACHE_LENS = [700, 1, 1020]    # tokens already in each sequence's cache (capacity 1024)
CAPACITY = 1024


def _expected_cache(cache, new, lens):
    expected = cache.clone()
    if new is not None:
        for i, n in enumerate(lens):
            expected[i, n:n + new.shape[1]] = new[i]
    return expected


@pytest.mark.parametrize("append", [False, True], ids=["decode", "append4-causal"])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)], ids=["mha", "gqa8-2"])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache(fa, rand, record, device, dtype, paged, heads, append):
    tol, (h, hk), d = kc.TOLERANCES[dtype], heads, 128
    b, new = len(CACHE_LENS), 4 if append else 0
    q = rand((b, max(new, 1), h, d), tol.dtype)
    k_cache, v_cache = rand((b, CAPACITY, hk, d), tol.dtype), rand((b, CAPACITY, hk, d), tol.dtype)
    k_new = rand((b, new, hk, d), tol.dtype) if append else None
    v_new = rand((b, new, hk, d), tol.dtype) if append else None
    k_exp, v_exp = _expected_cache(k_cache, k_new, CACHE_LENS), _expected_cache(v_cache, v_new, CACHE_LENS)
    table = None
    if paged:
        k_cache, table = ar.to_paged(k_cache, PAGE, rand.generator)
        v_cache = ar.scatter_blocks(v_cache, table, PAGE)
    lens = torch.tensor(CACHE_LENS, dtype=torch.int32, device=device)
    kc.poison_allocator(q.numel() * q.element_size(), device)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=lens,
                                     block_table=table, causal=append)
    kc.assert_written(out, q, k_cache, v_cache)
    _check_cache_updated(k_cache, v_cache, table, k_exp, v_exp, new)
    _check_kvcache_out(out, q, k_exp, v_exp, new, append, tol, record)


def _check_cache_updated(k_cache, v_cache, table, k_exp, v_exp, new):
    if table is not None:
        k_cache, v_cache = ar.from_paged(k_cache, table), ar.from_paged(v_cache, table)
    for i, n in enumerate(CACHE_LENS):
        end = n + new
        assert torch.equal(k_cache[i, :end], k_exp[i, :end]), f"sequence {i}: K cache not updated in place"
        assert torch.equal(v_cache[i, :end], v_exp[i, :end]), f"sequence {i}: V cache not updated in place"


def _check_kvcache_out(out, q, k_exp, v_exp, new, causal, tol, record):
    outs, outs_lp = [], []
    for i, n in enumerate(CACHE_LENS):
        keys, values = k_exp[i:i + 1, :n + new], v_exp[i:i + 1, :n + new]
        outs.append(ar.attention_fp32(q[i:i + 1], keys, values, causal))
        outs_lp.append(ar.attention_lowprec(q[i:i + 1], keys, values, causal))
    check = kc.compare("out", out, torch.cat(outs), torch.cat(outs_lp), tol)
    kc.assert_checks([check], record)


# The first launch, in a fresh process: every kernel family this file uses, PTX JIT off (unless
# BLACKWHEEL_ALLOW_JIT=1), JIT cache off. A wheel without native code for this GPU fails here with
# "no kernel image is available"; with JIT allowed, the time shows what the fallback costs.
FIRST_LAUNCH = textwrap.dedent("""
    import json, time
    t0 = time.perf_counter()
    import torch
    torch.ones(1, device="cuda").add_(1); torch.cuda.synchronize()
    t1 = time.perf_counter()
    import flash_attn as fa
    for dtype in (torch.bfloat16, torch.float16):
        for d in (64, 128, 256):
            for causal in (False, True):
                q, k, v = (torch.randn(1, 128, 2, d, device="cuda", dtype=dtype, requires_grad=True)
                           for _ in range(3))
                fa.flash_attn_func(q, k, v, causal=causal).sum().backward()
        x = torch.randn(64, 2, 128, device="cuda", dtype=dtype)
        cu = torch.tensor([0, 20, 64], dtype=torch.int32, device="cuda")
        fa.flash_attn_varlen_func(x, x, x, cu, cu, 44, 44, causal=True)
        cache = torch.randn(2, 256, 2, 128, device="cuda", dtype=dtype)
        table = torch.tensor([[1], [0]], dtype=torch.int32, device="cuda")
        lens = torch.tensor([100, 256], dtype=torch.int32, device="cuda")
        fa.flash_attn_with_kvcache(x[:2, None], cache, cache, cache_seqlens=lens)
        fa.flash_attn_with_kvcache(x[:2, None], cache, cache, cache_seqlens=lens, block_table=table)
    torch.cuda.synchronize()
    print(json.dumps({"torch_and_context_s": t1 - t0, "import_to_all_kernels_s": time.perf_counter() - t1}))
""")


FIRST_LAUNCH_TIMEOUT_S = 180


def test_first_launch_native(fa, record, device):
    if device.type != "cuda":
        pytest.skip("first launch needs a CUDA device")
    allow_jit = os.environ.get("BLACKWHEEL_ALLOW_JIT") == "1"
    env = dict(os.environ, CUDA_CACHE_DISABLE="1")
    if not allow_jit:
        env["CUDA_DISABLE_PTX_JIT"] = "1"
    try:
        proc = subprocess.run([sys.executable, "-c", FIRST_LAUNCH], env=env, capture_output=True,
                              text=True, timeout=FIRST_LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flash_attn kernels took over {FIRST_LAUNCH_TIMEOUT_S} s to first launch "
                    "(PTX JIT compiling on this GPU?)", pytrace=False)
    cc = "%d.%d" % torch.cuda.get_device_capability()
    tail = " ".join(proc.stderr.strip().splitlines()[-3:])
    assert proc.returncode == 0, (f"flash_attn kernels did not load on this GPU (cc {cc}) with PTX JIT "
                                  f"{'allowed' if allow_jit else 'disabled'}: {tail}")
    timings = json.loads(proc.stdout.strip().splitlines()[-1])
    record(ptx_jit_allowed=allow_jit, **timings)
