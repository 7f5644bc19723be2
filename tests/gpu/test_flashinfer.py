"""FlashInfer AOT wheel on a GPU, JIT disabled: every kernel must come from flashinfer/data/aot.

Install the built wheel first (``pip install dist/flashinfer_python-*+cu130.*.whl``). Each kernel is
checked against a float32 torch reference on random inputs. Tolerances (|out - ref| <= atol + rtol*|ref|):
fp16 atol=rtol=1e-2 (10 mantissa bits, sums over <= 512 keys); bf16 atol=rtol=3e-2 (7 bits); fp8 KV
is compared with the reference on the *dequantized* KV, so only the q/o rounding (fp16/bf16) remains.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from pathlib import Path

import pytest

# Before flashinfer is imported: no compiling, no downloads, the CUDA norm module (not CuTe DSL).
os.environ["FLASHINFER_DISABLE_JIT"] = "1"
os.environ["FLASHINFER_NO_DOWNLOAD"] = "1"
os.environ["FLASHINFER_USE_CUDA_NORM"] = "1"

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible", allow_module_level=True)
import kernel_check as kc  # noqa: E402  (beside this file; conftest puts it on the path)

# with a GPU, a missing or broken package is a failure, not a skip (install the built AOT wheel first)
flashinfer = kc.import_or_fail("flashinfer")

pytestmark = pytest.mark.gpu
TOL = {torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float16, torch.bfloat16]


def shipped() -> dict:
    listing = Path(flashinfer.__file__).parent / "data" / "aot" / "blackwheel-aot.json"
    if not listing.is_file():
        pytest.fail(f"{listing} missing: the installed flashinfer is not a blackwheel AOT build")
    return json.loads(listing.read_text())


def close(out, ref, dtype) -> None:
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


def attention_ref(q, k, v, causal: bool):
    """softmax(q k^T / sqrt(d)) v in fp32; q [n, Hq, d], k/v [m, Hkv, d]; GQA by repeating kv heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.float().repeat_interleave(group, dim=1), v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,mhd->hnm", q.float(), k) / math.sqrt(q.shape[-1])
    if causal:  # bottom-right aligned, as FlashInfer does when qo_len <= kv_len
        n, m = q.shape[0], k.shape[0]
        keep = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hnm,mhd->nhd", scores.softmax(-1), v)


def test_the_wheel_lists_its_modules_and_arches() -> None:
    info = shipped()
    assert "norm" in info["modules"] and info["archs"]
    cc = torch.cuda.get_device_capability()
    from blackwheel.core.targets import CudaArch, ComputeCapability

    runs = [a for a in map(CudaArch.parse, info["archs"]) if a.cubin_runs_on(ComputeCapability(*cc))[0]]
    assert runs, f"wheel built for {info['archs']}, none runs natively on this {cc[0]}.{cc[1]} GPU"


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm(dtype) -> None:
    x = torch.randn(97, 4096, device="cuda", dtype=dtype)
    w = torch.randn(4096, device="cuda", dtype=dtype)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    close(flashinfer.norm.rmsnorm(x, w, eps=1e-6), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype) -> None:
    x = torch.randn(61, 2 * 2048, device="cuda", dtype=dtype)
    a, b = x.float().chunk(2, dim=-1)
    close(flashinfer.activation.silu_and_mul(x), torch.nn.functional.silu(a) * b, dtype)


def offsets(lengths) -> "torch.Tensor":
    return torch.tensor([0, *itertools.accumulate(lengths)], device="cuda", dtype=torch.int32)


def paged_kv(seq_lens, page_size, heads, dim, dtype):
    """A shuffled page table over one cache tensor; returns cache, indptr, indices, last_len, per-seq k/v."""
    pages = [math.ceil(n / page_size) for n in seq_lens]
    total = sum(pages)
    cache = torch.randn(total, 2, page_size, heads, dim, device="cuda", dtype=torch.float16).to(dtype)
    order = torch.randperm(total, device="cuda").int()
    indptr = offsets(pages)
    last = torch.tensor([n - (p - 1) * page_size for n, p in zip(seq_lens, pages)], device="cuda", dtype=torch.int32)
    per_seq = []
    for i, n in enumerate(seq_lens):
        blocks = cache[order[int(indptr[i]):int(indptr[i + 1])].long()]   # [p, 2, page, H, d]
        k = blocks[:, 0].reshape(-1, heads, dim)[:n]
        v = blocks[:, 1].reshape(-1, heads, dim)[:n]
        per_seq.append((k, v))
    return cache, indptr, order, last, per_seq


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype, kv_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float8_e4m3fn)])
def test_batch_decode_paged_kv(head_dim, dtype, kv_dtype) -> None:
    seq_lens, page_size, hq, hkv = [1, 17, 300, 512], 16, 8, 2
    cache, indptr, indices, last, per_seq = paged_kv(seq_lens, page_size, hkv, head_dim, kv_dtype)
    q = torch.randn(len(seq_lens), hq, head_dim, device="cuda", dtype=dtype)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    wrapper.plan(indptr, indices, last, hq, hkv, head_dim, page_size, q_data_type=dtype, kv_data_type=kv_dtype)
    out = wrapper.run(q, cache)
    for i, (k, v) in enumerate(per_seq):
        close(out[i:i + 1], attention_ref(q[i:i + 1], k, v, causal=False), dtype)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_prefill_ragged_causal(head_dim, dtype) -> None:
    qo_lens, kv_lens, hq, hkv = [7, 64, 129], [7, 100, 129], 8, 4      # ragged: every request differs
    q = torch.randn(sum(qo_lens), hq, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(sum(kv_lens), hkv, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(sum(kv_lens), hkv, head_dim, device="cuda", dtype=dtype)
    qo_indptr, kv_indptr = offsets(qo_lens), offsets(kv_lens)
    ws = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    # backend fa2: what SM12x runs (auto would pick fa3 on a Hopper test GPU, which the set does not ship)
    wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa2")
    wrapper.plan(qo_indptr, kv_indptr, hq, hkv, head_dim, causal=True, q_data_type=dtype)
    out = wrapper.run(q, k, v)
    for i in range(len(qo_lens)):
        qs = slice(int(qo_indptr[i]), int(qo_indptr[i + 1]))
        ks = slice(int(kv_indptr[i]), int(kv_indptr[i + 1]))
        close(out[qs], attention_ref(q[qs], k[ks], v[ks], causal=True), dtype)


def test_a_kernel_outside_the_set_fails_clearly() -> None:
    """head dim 256 decode is not in the default set: a Python error naming the cause, not a crash."""
    if any("head_dim_qk_256" in m for m in shipped()["modules"]):
        pytest.skip("this wheel ships head dim 256")
    cache, indptr, indices, last, _ = paged_kv([5], 16, 1, 256, torch.float16)
    ws = torch.empty(16 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
    with pytest.raises(RuntimeError, match="JIT compilation is disabled"):
        wrapper.plan(indptr, indices, last, 1, 1, 256, 16, q_data_type=torch.float16)
        wrapper.run(torch.randn(1, 1, 256, device="cuda", dtype=torch.float16), cache)
