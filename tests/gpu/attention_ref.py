"""Attention references for kernel tests, layout (batch, seqlen, heads, headdim) like flash-attn.

- ``attention_fp32``: the truth. torch SDPA with the math backend on fp32 copies, GQA by repeating
  KV heads, causal as an explicit bottom-right-aligned mask (flash-attn's convention when
  seqlen_q != seqlen_k; SDPA's ``is_causal`` is top-left aligned).
- ``attention_lowprec``: the same attention in the inputs' own precision, rounding where a fused
  kernel must (scores and probabilities stored in the low dtype): it measures unavoidable rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def causal_mask(seqlen_q: int, seqlen_k: int, device) -> torch.Tensor:
    """True where query i may attend key j: j <= i + seqlen_k - seqlen_q (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device).view(-1, 1)
    j = torch.arange(seqlen_k, device=device).view(1, -1)
    return j <= i + (seqlen_k - seqlen_q)


def _heads_first(q, k, v):
    """(b, s, h, d) -> (b, h, s, d), KV heads repeated to the query's head count (GQA/MQA)."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return q, k, v


def attention_fp32(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    q, k, v = _heads_first(*(x.float() for x in (q, k, v)))
    mask = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def attention_lowprec(q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
    dtype = q.dtype
    q, k, v = _heads_first(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-1, -2)                 # rounded to dtype, as stored
    if causal:
        keep = causal_mask(q.shape[2], k.shape[2], q.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(dtype)    # fp32 softmax, rounded for P @ V
    return (probs @ v).transpose(1, 2)


def attention_varlen(attend: Callable, q, k, v, cu_q: list[int], cu_k: list[int], causal: bool):
    """Packed (total, heads, dim) sequences, each attended on its own."""
    outs = [attend(q[None, cu_q[i]:cu_q[i + 1]], k[None, cu_k[i]:cu_k[i + 1]], v[None, cu_k[i]:cu_k[i + 1]],
                   causal)[0] for i in range(len(cu_q) - 1)]
    return torch.cat(outs)


@dataclass
class Reference:
    out: torch.Tensor
    out_lowprec: torch.Tensor
    grads: tuple | None = None            # dq, dk, dv from the fp32 reference
    grads_lowprec: tuple | None = None


def reference(attend: Callable, q, k, v, dout=None) -> Reference:
    """Run ``attend(q, k, v, lowprec)`` in fp32 and in the inputs' precision; gradients if ``dout``."""
    grad = dout is not None
    leaves32 = [x.detach().float().requires_grad_(grad) for x in (q, k, v)]
    leaves_lp = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
    out32, out_lp = attend(*leaves32, False), attend(*leaves_lp, True)
    if not grad:
        return Reference(out32.detach(), out_lp.detach())
    g32 = torch.autograd.grad(out32, leaves32, dout.float())
    glp = torch.autograd.grad(out_lp, leaves_lp, dout)
    return Reference(out32.detach(), out_lp.detach(), g32, glp)


def to_paged(cache: torch.Tensor, block: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, capacity, hk, d) -> blocks (b * capacity/block, block, hk, d) in shuffled order + table."""
    b, cap = cache.shape[:2]
    order = torch.randperm(b * (cap // block), generator=generator, device=generator.device)
    table = order.view(b, cap // block).to(device=cache.device, dtype=torch.int32)
    return scatter_blocks(cache, table, block), table


def scatter_blocks(cache: torch.Tensor, table: torch.Tensor, block: int) -> torch.Tensor:
    """Place a (b, capacity, hk, d) cache into blocks where ``table[seq, j]`` says."""
    n = table.numel()
    paged = torch.empty((n, block, *cache.shape[2:]), dtype=cache.dtype, device=cache.device)
    paged[table.long().flatten()] = cache.reshape(n, block, *cache.shape[2:])
    return paged


def from_paged(paged: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    b, per_seq = table.shape
    return paged[table.long().flatten()].reshape(b, per_seq * paged.shape[1], *paged.shape[2:])
