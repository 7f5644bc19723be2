"""Kernel benchmark: this GPU's ceilings and each package's kernels, measured in one run.

    blackwheel bench --out DIR [--packages flash_attn] [--quick]
                     [--manifest M.manifest.json ...] [--wheelhouse DIR]

Writes ``DIR/bench.json`` (schema ``blackwheel.bench/1``), rewritten atomically after every case so a
crash or a timeout still leaves every finished number on disk. ``blackwheel report`` turns it into
Markdown and plots.

What is measured, and why that way:
- ceilings first, in the same run: a large device-to-device copy (GB/s, read + write counted) and a
  bf16 8192^3 matmul (TFLOP/s). Kernels are judged against what *this* GPU did today, not a datasheet.
- every kernel is timed with CUDA events after warm-up, as the median of many samples, rotating among
  enough input sets that their total exceeds twice the L2 cache (else a small shape is timed from L2).
- each kernel has the reference a user would call instead (torch SDPA, flash backend), timed in the
  same run on the same shapes: ``speedup`` is reference time / our time.
- first launch: a fresh subprocess per kernel family times import-to-first-result with the driver's
  PTX JIT disabled; if that fails, the wheel lacks native code for this GPU and a second run with
  JIT allowed shows what the fallback costs.

Packages are entries of ``BENCHMARKS`` (flash_attn, flashinfer); vLLM adds its own the same way.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_json, sha256_file

SCHEMA = "blackwheel.bench/1"
RESULTS_NAME = "bench.json"
METRICS = {"tflops": 1e12, "gbps": 1e9}     # achieved = work / seconds / scale
ROTATION_FACTOR = 2                         # input sets must total this many times the L2 size
SPIN_CYCLES_PER_CALL = 100_000              # ~50 us of GPU clock per queued call: covers a Python launch
SPIN_CYCLES_MAX = 200_000_000               # ~0.1 s at most


# ---- work formulas and statistics (pure) ---------------------------------------------------------
def attention_flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, headdim: int,
                    causal: bool = False, backward: bool = False) -> float:
    """FLOPs of attention: two matmuls of 2*sq*sk*d each per head; causal halves, backward is 2.5x.

    >>> attention_flops(1, 1, 2, 3, 4)
    96.0
    >>> attention_flops(1, 1, 2, 3, 4, causal=True, backward=True)
    120.0
    """
    flops = 4.0 * batch * heads * seqlen_q * seqlen_k * headdim
    if causal:
        flops /= 2
    return flops * 2.5 if backward else flops


def kv_cache_bytes(batch: int, seqlen_k: int, heads_k: int, headdim: int, itemsize: int) -> int:
    """Bytes of K and V a decode step reads (the query and output are negligible next to them)."""
    return 2 * batch * seqlen_k * heads_k * headdim * itemsize


def copy_bytes(nbytes: int) -> int:
    """A copy of ``nbytes`` moves them twice: read once, written once."""
    return 2 * nbytes


def matmul_flops(m: int, n: int, k: int) -> float:
    return 2.0 * m * n * k


def median(values: list[float]) -> float:
    """The middle value (mean of the two middle ones for an even count).

    >>> median([3.0, 1.0, 2.0]), median([4.0, 1.0, 2.0, 3.0])
    (2.0, 2.5)
    """
    if not values:
        raise ValueError("median of no values")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def rotation_sets(bytes_per_set: int, l2_bytes: int, min_sets: int = 2, max_sets: int = 32) -> int:
    """How many input sets to rotate among so that together they exceed ROTATION_FACTOR x L2.

    >>> rotation_sets(10 << 20, 50 << 20), rotation_sets(500 << 20, 50 << 20)
    (10, 2)
    """
    if bytes_per_set <= 0:
        raise ValueError("an input set has no bytes")
    needed = math.ceil(ROTATION_FACTOR * l2_bytes / bytes_per_set)
    return max(min_sets, min(max_sets, needed))


def achieved(metric: str, work: float, time_ms: float) -> float:
    """TFLOP/s or GB/s from work (FLOPs or bytes) done in ``time_ms``.

    >>> achieved("tflops", 2e12, 1000.0), achieved("gbps", 3e9, 500.0)
    (2.0, 6.0)
    """
    return work / (time_ms * 1e-3) / METRICS[metric]


def summarize(times_ms: list[float]) -> dict[str, float]:
    s = sorted(times_ms)
    return {"median_ms": median(s), "min_ms": s[0], "max_ms": s[-1], "samples": len(s)}


def make_result(*, package: str, kernel: str, name: str, shape: dict, metric: str, work: float,
                times_ms: list[float], ceiling: float | None, reference: dict | None = None) -> dict:
    """One result record; derived numbers are stored for reading, the report recomputes them."""
    stats = summarize(times_ms)
    value = achieved(metric, work, stats["median_ms"])
    ref_ms = (reference or {}).get("median_ms")
    return {
        "package": package, "kernel": kernel, "name": name, "shape": shape,
        "metric": metric, "work": work, **stats, "achieved": value,
        "ceiling": ceiling, "fraction_of_ceiling": value / ceiling if ceiling else None,
        "reference": reference, "speedup_vs_reference": ref_ms / stats["median_ms"] if ref_ms else None,
        "error": None,
    }


def error_result(*, package: str, kernel: str, name: str, shape: dict, exc: BaseException) -> dict:
    return {"package": package, "kernel": kernel, "name": name, "shape": shape,
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


REQUIRED_KEYS = ("schema", "environment", "ceilings", "results", "first_launch")


def validate_results(doc: Any, source: str = "results") -> dict:
    """Check a results document's shape; raise UsageError naming what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise UsageError(f"{source} is not a blackwheel bench result (expected schema {SCHEMA!r})")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise UsageError(f"{source} lacks {', '.join(missing)}")
    for i, r in enumerate(doc["results"]):
        if "error" not in r or "name" not in r:
            raise UsageError(f"{source}: result {i} lacks 'name' or 'error'")
        if r["error"] is None and not all(k in r for k in ("metric", "work", "median_ms")):
            raise UsageError(f"{source}: result {r['name']!r} lacks metric, work or median_ms")
    return doc


# ---- timing ------------------------------------------------------------------------------------------
class Timer:
    """Milliseconds per call of a block of calls: CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, torch_mod, device):
        self.torch = torch_mod
        self.cuda = device.type == "cuda"

    def per_call_ms(self, block: Callable[[int], None], calls: int) -> float:
        torch = self.torch
        if not self.cuda:
            t0 = time.perf_counter()
            block(calls)
            return (time.perf_counter() - t0) * 1e3 / calls
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        spin = getattr(torch.cuda, "_sleep", None)
        if spin is not None:  # the GPU spins while the host queues the block: launch cost is not timed
            spin(min(SPIN_CYCLES_PER_CALL * calls, SPIN_CYCLES_MAX))
        start.record()
        block(calls)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls


def measure(fns: list[Callable[[], Any]], timer: Timer, *, warmup: int, reps: int,
            min_sample_ms: float = 1.0, max_calls: int = 64) -> list[float]:
    """Per-call times (ms) of ``reps`` samples; calls rotate through ``fns`` (one per input set).

    A sample spans enough calls to last ``min_sample_ms`` so event resolution does not dominate.
    """
    step = itertools.count()

    def block(calls: int) -> None:
        for _ in range(calls):
            fns[next(step) % len(fns)]()

    timer.per_call_ms(block, warmup * len(fns))
    estimate = timer.per_call_ms(block, len(fns))
    calls = len(fns) * max(1, min(max_calls, math.ceil(min_sample_ms / max(estimate, 1e-6) / len(fns))))
    return [timer.per_call_ms(block, calls) for _ in range(reps)]


# ---- sizes and context -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    copy_bytes: int
    matmul_n: int
    warmup: int
    reps: int
    quick: bool = False
    tiny: bool = False          # CPU harness check: shapes small enough for a CPU
    max_sets: int = 32          # input sets rotated through, at most


SIZES = {
    "full": Sizes(copy_bytes=1 << 30, matmul_n=8192, warmup=5, reps=30),
    "quick": Sizes(copy_bytes=512 << 20, matmul_n=8192, warmup=3, reps=12, quick=True),
    "tiny": Sizes(copy_bytes=1 << 20, matmul_n=128, warmup=1, reps=3, quick=True, tiny=True, max_sets=2),
}


@dataclass
class BenchContext:
    torch: Any
    device: Any
    timer: Timer
    l2_bytes: int
    sizes: Sizes
    ceilings: dict[str, float] = field(default_factory=dict)   # metric -> measured ceiling

    def time(self, fns: list[Callable[[], Any]]) -> list[float]:
        return measure(fns, self.timer, warmup=self.sizes.warmup, reps=self.sizes.reps)

    def sets(self, factory: Callable[[int], Any], bytes_per_set: int) -> list[Any]:
        """Input sets for rotation (each made by ``factory(seed)``), together > 2x L2."""
        count = rotation_sets(bytes_per_set, self.l2_bytes, max_sets=self.sizes.max_sets)
        return [factory(i) for i in range(count)]

    def randn(self, shape, dtype, seed: int, requires_grad: bool = False):
        torch = self.torch
        gen = torch.Generator(device=self.device).manual_seed(seed)
        x = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32).to(dtype)
        return x.requires_grad_(requires_grad)

    def release(self) -> None:
        if self.device.type != "cuda":
            return
        try:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
        except RuntimeError:  # a sticky CUDA error: the failing case already recorded it
            pass


# ---- ceilings ----------------------------------------------------------------------------------------
def bench_copy(ctx: BenchContext) -> dict:
    n = ctx.sizes.copy_bytes // 4
    src = ctx.randn((n,), ctx.torch.float32, seed=1)
    dst = ctx.torch.empty_like(src)
    times = ctx.time([lambda: dst.copy_(src)])
    shape = {"bytes": n * 4}
    return make_result(package="ceiling", kernel="copy", name=f"device copy {n * 4 >> 20} MiB",
                       shape=shape, metric="gbps", work=copy_bytes(n * 4), times_ms=times, ceiling=None)


def bench_matmul(ctx: BenchContext) -> dict:
    torch, n = ctx.torch, ctx.sizes.matmul_n

    def make(seed: int):
        a = ctx.randn((n, n), torch.bfloat16, seed=10 + 2 * seed)
        b = ctx.randn((n, n), torch.bfloat16, seed=11 + 2 * seed)
        return a, b, torch.empty_like(a)

    sets = ctx.sets(make, 3 * n * n * 2)
    fns = [lambda a=a, b=b, c=c: torch.matmul(a, b, out=c) for a, b, c in sets]
    times = ctx.time(fns)
    return make_result(package="ceiling", kernel="matmul", name=f"bf16 matmul {n}^3",
                       shape={"m": n, "n": n, "k": n, "dtype": "bf16"}, metric="tflops",
                       work=matmul_flops(n, n, n), times_ms=times, ceiling=None)


CEILINGS = {"gbps": bench_copy, "tflops": bench_matmul}


# ---- the registry ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackageBench:
    """One package's benchmarks: ``run(ctx, module, record)`` and first-launch kernel families.

    ``record(result)`` stores each result as it is made. Each family is a callable
    ``(torch, module, device) -> None`` that launches the family's kernels once. ``env`` is set
    (where not already set) before the module is imported; ``gpu_only`` refuses ``--device cpu``.
    """

    import_name: str
    distribution: str
    run: Callable[[BenchContext, Any, Callable[[dict], None]], None]
    families: dict[str, Callable[[Any, Any, Any], None]]
    env: dict[str, str] = field(default_factory=dict)
    gpu_only: bool = False

    def apply_env(self) -> None:
        for key, value in self.env.items():
            os.environ.setdefault(key, value)


BENCHMARKS: dict[str, PackageBench] = {}   # filled at the end of this module


# ---- flash-attn ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttnCase:
    """One attention shape. Layout (batch, seqlen, heads, headdim), bf16; GQA when heads_k < heads."""

    kernel: str            # fwd, bwd (training shapes), prefill, decode (serving shapes)
    batch: int
    heads: int
    heads_k: int
    seqlen_q: int
    seqlen_k: int
    headdim: int
    causal: bool

    @property
    def name(self) -> str:
        heads = f"h{self.heads}" if self.heads == self.heads_k else f"gqa{self.heads}/{self.heads_k}"
        causal = " causal" if self.causal else ""
        return (f"{self.kernel}{causal} b{self.batch} {heads} sq{self.seqlen_q} sk{self.seqlen_k} "
                f"d{self.headdim} bf16")

    @property
    def metric(self) -> str:
        return "gbps" if self.kernel == "decode" else "tflops"

    def work(self, itemsize: int = 2) -> float:
        if self.kernel == "decode":
            return kv_cache_bytes(self.batch, self.seqlen_k, self.heads_k, self.headdim, itemsize)
        return attention_flops(self.batch, self.heads, self.seqlen_q, self.seqlen_k, self.headdim,
                               self.causal, backward=self.kernel == "bwd")

    def set_bytes(self, itemsize: int = 2) -> int:
        """Bytes of one input set (q, k, v, out; dout too for backward)."""
        q = self.batch * self.seqlen_q * self.heads * self.headdim
        kv = 2 * self.batch * self.seqlen_k * self.heads_k * self.headdim
        return (q * (3 if self.kernel == "bwd" else 2) + kv) * itemsize

    def shape(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "heads_k": self.heads_k,
                "seqlen_q": self.seqlen_q, "seqlen_k": self.seqlen_k, "headdim": self.headdim,
                "causal": self.causal, "dtype": "bf16"}


def flash_attn_cases(sizes: Sizes) -> list[AttnCase]:
    """Training shapes (fwd/bwd, d=128, s=4096) and GB10 serving shapes (GQA 32/8 prefill, decode)."""
    if sizes.tiny:
        return [AttnCase("fwd", 1, 2, 2, 128, 128, 64, True), AttnCase("bwd", 1, 2, 2, 128, 128, 64, False),
                AttnCase("prefill", 1, 4, 2, 128, 128, 64, True), AttnCase("decode", 1, 4, 2, 1, 256, 64, False)]
    cases = [AttnCase(k, 4, 32, 32, 4096, 4096, 128, c) for k in ("fwd", "bwd") for c in (False, True)]
    prefill = (4096,) if sizes.quick else (2048, 4096)
    cases += [AttnCase("prefill", 1, 32, 8, s, s, 128, True) for s in prefill]
    decode = [(1, 8192), (1, 32768)] + ([] if sizes.quick else [(8, 16384)])
    cases += [AttnCase("decode", b, 32, 8, 1, kv, 128, False) for b, kv in decode]
    return cases


def _flash_attn_fns(ctx: BenchContext, fa, case: AttnCase) -> list[Callable[[], Any]]:
    torch, c = ctx.torch, case
    dt, grad = torch.bfloat16, case.kernel == "bwd"

    def make(seed: int):
        s = 4 * seed
        q = ctx.randn((c.batch, c.seqlen_q, c.heads, c.headdim), dt, s, grad)
        k = ctx.randn((c.batch, c.seqlen_k, c.heads_k, c.headdim), dt, s + 1, grad)
        v = ctx.randn((c.batch, c.seqlen_k, c.heads_k, c.headdim), dt, s + 2, grad)
        if c.kernel == "decode":
            lens = torch.full((c.batch,), c.seqlen_k, dtype=torch.int32, device=ctx.device)
            return q, k, v, lens
        if not grad:
            return q, k, v
        out = fa.flash_attn_func(q, k, v, causal=c.causal)
        return q, k, v, out, ctx.randn(tuple(out.shape), dt, s + 3)

    sets = ctx.sets(make, c.set_bytes())
    if c.kernel == "decode":
        return [lambda s=s: fa.flash_attn_with_kvcache(s[0], s[1], s[2], cache_seqlens=s[3]) for s in sets]
    if grad:
        return [lambda s=s: torch.autograd.grad(s[3], s[:3], s[4], retain_graph=True) for s in sets]
    return [lambda s=s: fa.flash_attn_func(s[0], s[1], s[2], causal=c.causal) for s in sets]


def _sdpa_fns(ctx: BenchContext, case: AttnCase, expand_kv: bool) -> list[Callable[[], Any]]:
    """torch SDPA on the same shapes, (batch, heads, seq, dim) layout; GQA native or KV expanded."""
    torch, c = ctx.torch, case
    sdpa = torch.nn.functional.scaled_dot_product_attention
    dt, grad = torch.bfloat16, case.kernel == "bwd"
    heads_k = c.heads if expand_kv else c.heads_k
    gqa = {"enable_gqa": True} if heads_k != c.heads else {}
    causal = c.causal and c.seqlen_q == c.seqlen_k    # SDPA aligns causal top-left; equal lengths agree

    def make(seed: int):
        s = 4 * seed
        q = ctx.randn((c.batch, c.heads, c.seqlen_q, c.headdim), dt, s, grad)
        k = ctx.randn((c.batch, heads_k, c.seqlen_k, c.headdim), dt, s + 1, grad)
        v = ctx.randn((c.batch, heads_k, c.seqlen_k, c.headdim), dt, s + 2, grad)
        if not grad:
            return q, k, v
        out = sdpa(q, k, v, is_causal=causal, **gqa)
        return q, k, v, out, ctx.randn(tuple(out.shape), dt, s + 3)

    sets = ctx.sets(make, c.set_bytes())
    if grad:
        return [lambda s=s: torch.autograd.grad(s[3], s[:3], s[4], retain_graph=True) for s in sets]
    return [lambda s=s: sdpa(s[0], s[1], s[2], is_causal=causal, **gqa) for s in sets]


def _sdpa_reference(ctx: BenchContext, case: AttnCase) -> dict:
    """Time SDPA's flash backend; for GQA try native GQA first, then KV expanded to all heads."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # torch: heavy, and only the GPU bench needs it

    modes = (False, True) if case.heads != case.heads_k else (False,)
    ref: dict = {"impl": "torch sdpa, flash backend"}
    for expand in modes:
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                times = ctx.time(_sdpa_fns(ctx, case, expand))
        except Exception as exc:  # no flash kernel for this shape: record why, try the next mode
            ref["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
            ctx.release()
            continue
        note = "KV expanded to all heads (no native GQA)" if expand else None
        return {**ref, "error": None, "note": note, **summarize(times),
                "achieved": achieved(case.metric, case.work(), median(times))}
    return ref


def _run_cases(ctx: BenchContext, package: str, cases: list, fns: Callable[[Any], list],
               reference: Callable[[Any], dict | None], record: Callable[[dict], None]) -> None:
    """Time each case (``fns(case)``: its calls, one per input set), then its reference; record it."""
    for case in cases:
        base = {"package": package, "kernel": case.kernel, "name": case.name, "shape": case.shape()}
        try:
            times = ctx.time(fns(case))
            ctx.release()
            ref = reference(case)
            record(make_result(**base, metric=case.metric, work=case.work(), times_ms=times,
                               ceiling=ctx.ceilings.get(case.metric), reference=ref))
        except Exception as exc:  # one broken case must not lose the others
            record(error_result(**base, exc=exc))
        finally:
            ctx.release()


def run_flash_attn(ctx: BenchContext, fa, record: Callable[[dict], None]) -> None:
    _run_cases(ctx, "flash_attn", flash_attn_cases(ctx.sizes), lambda c: _flash_attn_fns(ctx, fa, c),
               lambda c: _sdpa_reference(ctx, c), record)


def _fa_family_fwd(torch, fa, device) -> None:
    q, k, v = (torch.randn(2, 512, 8, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    fa.flash_attn_func(q, k, v, causal=True)


def _fa_family_bwd(torch, fa, device) -> None:
    q, k, v = (torch.randn(2, 512, 8, 128, device=device, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    out.backward(torch.randn_like(out))


def _fa_family_varlen(torch, fa, device) -> None:
    q, k, v = (torch.randn(512, 8, 128, device=device, dtype=torch.bfloat16) for _ in range(3))
    cu = torch.tensor([0, 100, 512], dtype=torch.int32, device=device)
    fa.flash_attn_varlen_func(q, k, v, cu, cu, 412, 412, causal=True)


def _fa_family_kvcache(torch, fa, device) -> None:
    q = torch.randn(2, 1, 8, 128, device=device, dtype=torch.bfloat16)
    kc, vc = (torch.randn(2, 1024, 2, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    lens = torch.tensor([700, 1024], dtype=torch.int32, device=device)
    fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)


# ---- FlashInfer ----------------------------------------------------------------------------------------
# The AOT wheel runs with JIT and downloads off and the CUDA norm (not CuTe DSL); set before the import
# where unset. FlashInfer reads any non-empty FLASHINFER_DISABLE_JIT as 'off': set it empty to allow JIT.
FLASHINFER_ENV = {"FLASHINFER_DISABLE_JIT": "1", "FLASHINFER_NO_DOWNLOAD": "1", "FLASHINFER_USE_CUDA_NORM": "1"}
FI_WORKSPACE_BYTES = 128 << 20
KV_ITEMSIZE = {"bf16": 2, "fp8_e4m3": 1}


@dataclass(frozen=True)
class FlashInferCase:
    """A serving shape: bf16 queries, NHD layout, GQA 32/8, head dim 128 unless given.

    decode: ``batch`` sequences of ``seqlen`` cached tokens, paged KV (shuffled pages), KV in ``kv_dtype``;
    prefill: ``batch`` ragged requests of ``seqlen`` new tokens each (qo_len == kv_len), causal, fa2.
    """

    kernel: str            # decode, prefill
    batch: int
    seqlen: int
    kv_dtype: str = "bf16"
    heads: int = 32
    heads_k: int = 8
    headdim: int = 128
    page_size: int = 16

    @property
    def name(self) -> str:
        heads = f"h{self.heads}" if self.heads == self.heads_k else f"gqa{self.heads}/{self.heads_k}"
        if self.kernel == "decode":
            return (f"flashinfer decode paged b{self.batch} {heads} kv{self.seqlen} d{self.headdim} "
                    f"page{self.page_size} {self.kv_dtype} kv")
        return f"flashinfer prefill ragged causal {self.batch}x{self.seqlen} {heads} d{self.headdim} bf16 fa2"

    @property
    def metric(self) -> str:
        return "gbps" if self.kernel == "decode" else "tflops"

    @property
    def pages(self) -> int:
        return self.batch * math.ceil(self.seqlen / self.page_size)

    def work(self) -> float:
        if self.kernel == "decode":
            return kv_cache_bytes(self.batch, self.seqlen, self.heads_k, self.headdim, KV_ITEMSIZE[self.kv_dtype])
        per_request = attention_flops(1, self.heads, self.seqlen, self.seqlen, self.headdim, causal=True)
        return self.batch * per_request

    def set_bytes(self) -> int:
        """Bytes of one input set: decode q, out and the paged cache; prefill q, k, v, out."""
        if self.kernel == "decode":
            cache = self.pages * 2 * self.page_size * self.heads_k * self.headdim * KV_ITEMSIZE[self.kv_dtype]
            return cache + 2 * self.batch * self.heads * self.headdim * 2
        tokens = self.batch * self.seqlen
        return 2 * tokens * (self.heads + self.heads_k) * self.headdim * 2

    def shape(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "heads_k": self.heads_k,
                "seqlen_q": 1 if self.kernel == "decode" else self.seqlen, "seqlen_k": self.seqlen,
                "headdim": self.headdim, "causal": self.kernel == "prefill", "dtype": "bf16",
                "kv_dtype": self.kv_dtype, "layout": f"paged{self.page_size}" if self.kernel == "decode" else "ragged"}

    def reference_case(self) -> AttnCase | None:
        """The same total work as one SDPA call (equal-length requests batch up); decode has none."""
        if self.kernel != "prefill":
            return None
        return AttnCase("prefill", self.batch, self.heads, self.heads_k, self.seqlen, self.seqlen,
                        self.headdim, True)


def flashinfer_cases(sizes: Sizes) -> list[FlashInferCase]:
    """Decode over a paged cache (bf16 and fp8 KV) and ragged causal prefill, GQA 32/8, d=128."""
    if sizes.tiny:
        small = {"heads": 4, "heads_k": 2, "headdim": 64}
        return [FlashInferCase("decode", 2, 64, **small), FlashInferCase("decode", 2, 64, "fp8_e4m3", **small),
                FlashInferCase("prefill", 2, 64, **small)]
    decode = [(8, 16384), (64, 4096)]
    cases = [FlashInferCase("decode", b, kv) for b, kv in decode]
    cases += [FlashInferCase("decode", b, kv, "fp8_e4m3") for b, kv in decode[1 if sizes.quick else 0:]]
    prefill = [(4, 2048)] + ([] if sizes.quick else [(1, 8192)])
    return cases + [FlashInferCase("prefill", n, s) for n, s in prefill]


def _flashinfer_fns(ctx: BenchContext, fi, case: FlashInferCase) -> list[Callable[[], Any]]:
    """Plan once (every input set shares the page table / indptr), then time ``run`` alone."""
    torch, c, dev = ctx.torch, case, ctx.device
    dt = torch.bfloat16
    ws = torch.empty(FI_WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    if c.kernel == "decode":
        kv_dt = {"bf16": torch.bfloat16, "fp8_e4m3": torch.float8_e4m3fn}[c.kv_dtype]
        per_seq = c.pages // c.batch
        gen = torch.Generator(device=dev).manual_seed(0)
        indices = torch.randperm(c.pages, generator=gen, device=dev).int()
        indptr = torch.arange(c.batch + 1, dtype=torch.int32, device=dev) * per_seq
        last = torch.full((c.batch,), c.seqlen - (per_seq - 1) * c.page_size, dtype=torch.int32, device=dev)
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD")
        wrapper.plan(indptr, indices, last, c.heads, c.heads_k, c.headdim, c.page_size,
                     q_data_type=dt, kv_data_type=kv_dt)

        def make(seed: int):
            q = ctx.randn((c.batch, c.heads, c.headdim), dt, 2 * seed)
            cache = ctx.randn((c.pages, 2, c.page_size, c.heads_k, c.headdim), kv_dt, 2 * seed + 1)
            return q, cache
    else:
        indptr = torch.arange(c.batch + 1, dtype=torch.int32, device=dev) * c.seqlen
        wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa2")
        wrapper.plan(indptr, indptr, c.heads, c.heads_k, c.headdim, causal=True, q_data_type=dt)

        def make(seed: int):
            n = c.batch * c.seqlen
            return (ctx.randn((n, c.heads, c.headdim), dt, 3 * seed),
                    ctx.randn((n, c.heads_k, c.headdim), dt, 3 * seed + 1),
                    ctx.randn((n, c.heads_k, c.headdim), dt, 3 * seed + 2))

    sets = ctx.sets(make, c.set_bytes())
    return [lambda s=s: wrapper.run(*s) for s in sets]


def run_flashinfer(ctx: BenchContext, fi, record: Callable[[dict], None]) -> None:
    def reference(case: FlashInferCase) -> dict | None:
        ref_case = case.reference_case()
        return _sdpa_reference(ctx, ref_case) if ref_case else None

    _run_cases(ctx, "flashinfer", flashinfer_cases(ctx.sizes), lambda c: _flashinfer_fns(ctx, fi, c),
               reference, record)


def _fi_family_decode(torch, fi, device) -> None:
    cache = torch.randn(8, 2, 16, 2, 128, device=device, dtype=torch.bfloat16)
    indptr = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    pages = torch.arange(8, dtype=torch.int32, device=device)
    last = torch.tensor([5, 16], dtype=torch.int32, device=device)
    wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device=device), "NHD")
    wrapper.plan(indptr, pages, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
    wrapper.run(torch.randn(2, 8, 128, device=device, dtype=torch.bfloat16), cache)


def _fi_family_prefill(torch, fi, device) -> None:
    q = torch.randn(128, 8, 128, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(128, 2, 128, device=device, dtype=torch.bfloat16) for _ in range(2))
    indptr = torch.tensor([0, 100, 128], dtype=torch.int32, device=device)
    ws = torch.empty(16 << 20, dtype=torch.uint8, device=device)
    wrapper = fi.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa2")
    wrapper.plan(indptr, indptr, 8, 2, 128, causal=True, q_data_type=torch.bfloat16)
    wrapper.run(q, k, v)


def _fi_family_norm(torch, fi, device) -> None:
    x = torch.randn(64, 4096, device=device, dtype=torch.bfloat16)
    fi.norm.rmsnorm(x, torch.randn(4096, device=device, dtype=torch.bfloat16), eps=1e-6)


def _fi_family_activation(torch, fi, device) -> None:
    fi.activation.silu_and_mul(torch.randn(64, 2 * 2048, device=device, dtype=torch.bfloat16))


# ---- first launch: a fresh process per kernel family -----------------------------------------------
def first_launch_child(package: str, family: str, device_name: str) -> int:
    """Runs in the subprocess: print one JSON line of timings (seconds)."""
    t0 = time.perf_counter()
    import torch  # heavy: imported here so the child times import-to-first-result itself

    device = torch.device(device_name)
    torch.ones(1, device=device).add_(1)         # context creation is not the package's cost
    _sync(torch, device)
    t_ready = time.perf_counter()
    bench = BENCHMARKS[package]
    bench.apply_env()
    module = importlib.import_module(bench.import_name)
    t_import = time.perf_counter()
    bench.families[family](torch, module, device)
    _sync(torch, device)
    t_first = time.perf_counter()
    bench.families[family](torch, module, device)
    _sync(torch, device)
    t_second = time.perf_counter()
    print(json.dumps({"torch_and_context_s": t_ready - t0, "import_s": t_import - t_ready,
                      "first_call_s": t_first - t_import, "second_call_s": t_second - t_first,
                      "import_to_first_result_s": t_first - t_ready}))
    return 0


def _sync(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _run_child(package: str, family: str, device: str, *, allow_jit: bool, timeout_s: float) -> dict:
    env = dict(os.environ, CUDA_CACHE_DISABLE="1")   # a warm JIT cache would hide the JIT cost
    if not allow_jit:
        env["CUDA_DISABLE_PTX_JIT"] = "1"               # only native SASS may load
    src = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "blackwheel.cli", "bench", "--first-launch-child", package, family,
           "--device", device]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"no result within {timeout_s:.0f} s", "timed_out": True}
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    if proc.returncode == 0 and lines:
        return {"ok": True, "timings": json.loads(lines[-1])}
    tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or [f"exit code {proc.returncode}"]
    return {"ok": False, "error": tail[0][:400]}


def first_launch(package: str, family: str, device: str, timeout_s: float) -> dict:
    """Native first (PTX JIT off); only if that fails, again with JIT on to time the fallback."""
    record: dict = {"package": package, "family": family, "error": None}
    native = _run_child(package, family, device, allow_jit=False, timeout_s=timeout_s)
    if native["ok"]:
        return {**record, "native_code": True, **native["timings"]}
    record.update(native_code=False, native_error=native["error"])
    jit = _run_child(package, family, device, allow_jit=True, timeout_s=timeout_s)
    if jit["ok"]:
        return {**record, **jit["timings"]}
    return {**record, "error": jit["error"], "timed_out": jit.get("timed_out", False)}


# ---- environment and manifests ---------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:400] if text else ""


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return lines[0].strip() if out.returncode == 0 and lines else None


def _distribution_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(torch, device, packages: list[str]) -> dict:
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "machine": platform.machine(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "driver": _driver_version() if device.type == "cuda" else None,
           "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_MODULE_LOADING",
                                                  *(k for p in packages for k in BENCHMARKS[p].env))}}
    dists = ["torch", "triton"] + [BENCHMARKS[p].distribution for p in packages]
    env["packages"] = {d: _distribution_version(d) for d in dists}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, cc=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_gb=round(props.total_memory / 1e9, 1), l2_bytes=getattr(props, "L2_cache_size", None))
    else:
        env.update(device=f"cpu ({platform.processor() or platform.machine()})", cc=None, sms=None,
                   memory_gb=None, l2_bytes=None)
    return env


def find_manifests(paths: list[str], wheelhouse: str | None) -> list[Path]:
    found = []
    for p in paths:
        if not Path(p).is_file():
            raise UsageError(f"manifest {p} does not exist")
        found.append(Path(p))
    if wheelhouse:
        if not Path(wheelhouse).is_dir():
            raise UsageError(f"wheelhouse {wheelhouse} is not a folder")
        found += sorted(Path(wheelhouse).rglob("*.manifest.json"))
    return found


def load_manifest(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"manifest {path} is not readable JSON: {_first_line(exc)}") from exc
    return {"path": str(path), "sha256": sha256_file(path), "content": content}


# ---- the run -------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultsFile:
    """The results document, rewritten atomically after every change."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc = path, doc
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.doc)

    def add(self, section: str, item: Any) -> None:
        self.doc[section].append(item)
        self.save()
        _show(section, item)


def _show(section: str, item: Any) -> None:
    """One line per finished measurement (the work is shown as it happens)."""
    if not isinstance(item, dict):
        print(f"[{section}] {item}", flush=True)
    elif item.get("error"):
        print(f"[{section}] {item.get('name') or item.get('family')}: ERROR {item['error']}", flush=True)
    elif section == "first_launch":
        print(f"[first launch] {item['package']} {item['family']}: native={item['native_code']} "
              f"import->first result {item['import_to_first_result_s']:.2f} s", flush=True)
    else:
        unit = "TFLOP/s" if item["metric"] == "tflops" else "GB/s"
        ref = item.get("speedup_vs_reference")
        vs = f", {ref:.2f}x SDPA" if ref else ""
        print(f"[{section}] {item['name']}: {item['median_ms']:.3f} ms, {item['achieved']:.1f} {unit}{vs}",
              flush=True)


def _measure_ceilings(ctx: BenchContext, results: ResultsFile) -> None:
    for metric, bench in CEILINGS.items():
        try:
            r = bench(ctx)
            ctx.ceilings[metric] = r["achieved"]
            results.doc["ceilings"][metric] = r
            results.save()
            _show("ceiling", r)
        except Exception as exc:
            results.add("errors", f"ceiling {metric}: {type(exc).__name__}: {_first_line(exc)}")
        finally:
            ctx.release()


def _bench_package(ctx: BenchContext, name: str, results: ResultsFile, args) -> None:
    bench = BENCHMARKS[name]
    try:
        module = importlib.import_module(bench.import_name)
    except Exception as exc:
        results.add("errors", f"{name}: import {bench.import_name} failed: {type(exc).__name__}: {_first_line(exc)}")
        return
    packages = results.doc["environment"]["packages"]
    if packages.get(bench.distribution) is None:    # not pip-installed: the module's own word
        packages[bench.distribution] = getattr(module, "__version__", None)
    results.doc["environment"].setdefault("modules", {})[name] = getattr(module, "__file__", None)
    try:
        bench.run(ctx, module, lambda r: results.add("results", r))
    except Exception:
        results.add("errors", f"{name}: {traceback.format_exc(limit=3)}")
    if args.skip_first_launch:
        return
    for family in bench.families:
        results.add("first_launch", first_launch(name, family, args.device, args.first_launch_timeout))


def run(args) -> int:
    unknown = [p for p in args.packages if p not in BENCHMARKS]
    if unknown:
        raise UsageError(f"no benchmark for {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    gpu_only = [p for p in args.packages if BENCHMARKS[p].gpu_only]
    if gpu_only and not args.device.startswith("cuda"):
        raise UsageError(f"{', '.join(gpu_only)} runs only on a CUDA GPU, not on --device {args.device}")
    for name in args.packages:
        BENCHMARKS[name].apply_env()
    manifests = [load_manifest(p) for p in find_manifests(args.manifest, args.wheelhouse)]
    try:
        import torch  # heavy and optional: blackwheel itself runs without it
    except ImportError as exc:
        raise UsageError("the benchmark needs torch; it is not importable") from exc
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("no CUDA GPU visible (torch.cuda.is_available() is False); nothing to measure")
    sizes = SIZES["tiny" if device.type == "cpu" else "quick" if args.quick else "full"]
    env = environment(torch, device, args.packages)
    doc = {"schema": SCHEMA, "synthetic": False, "started": _now(), "finished": None, "timing": TIMING,
           "mode": "tiny-cpu-harness-check" if sizes.tiny else "quick" if sizes.quick else "full",
           "environment": env, "manifests": manifests, "ceilings": {}, "results": [],
           "first_launch": [], "errors": []}
    results = ResultsFile(Path(args.out) / RESULTS_NAME, doc)
    ctx = BenchContext(torch, device, Timer(torch, device), env["l2_bytes"] or (8 << 20), sizes)
    _measure_ceilings(ctx, results)
    for name in args.packages:
        _bench_package(ctx, name, results, args)
    doc["finished"] = _now()
    results.save()
    print(f"results: {results.path}")
    failed = doc["errors"] or any(r.get("error") for r in doc["results"] + doc["first_launch"])
    return 1 if failed else 0


TIMING = ("CUDA events around blocks of calls rotating among input sets that total > 2x L2, "
          "queued behind a GPU spin so host launch cost is not timed; median of the samples")


BENCHMARKS["flash_attn"] = PackageBench(
    import_name="flash_attn", distribution="flash-attn", run=run_flash_attn,
    families={"fwd": _fa_family_fwd, "bwd": _fa_family_bwd, "varlen": _fa_family_varlen,
              "kvcache": _fa_family_kvcache},
)
BENCHMARKS["flashinfer"] = PackageBench(
    import_name="flashinfer", distribution="flashinfer-python", run=run_flashinfer,
    families={"decode": _fi_family_decode, "prefill": _fi_family_prefill, "norm": _fi_family_norm,
              "activation": _fi_family_activation},
    env=FLASHINFER_ENV, gpu_only=True,
)
