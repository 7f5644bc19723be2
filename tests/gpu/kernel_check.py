"""Checks every kernel test uses: tolerances per dtype, relative errors, output poisoning.

Tolerances are calibrated the way flash-attention's own tests are: a kernel in low precision may
differ from the fp32 reference by at most ``factor`` times what a plain torch computation in the
same low precision differs by, plus a floor of about one unit in the last place. The fp32 reference
is the truth; the low-precision reference says how much rounding is unavoidable for this input.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Tolerance:
    dtype: torch.dtype
    fwd_factor: float   # outputs
    bwd_factor: float   # gradients: longer chains of rounding, as upstream allows
    floor: float        # relative to the reference's largest magnitude: ~1 ulp of the dtype


# The one table of tolerances.
TOLERANCES = {
    "bf16": Tolerance(torch.bfloat16, fwd_factor=2.0, bwd_factor=3.0, floor=2.0 ** -8),
    "fp16": Tolerance(torch.float16, fwd_factor=2.0, bwd_factor=3.0, floor=2.0 ** -11),
}

# 0xFFFF is a NaN in both fp16 and bf16: memory poisoned with 0xFF bytes reads as NaN.
POISON_BYTE = 0xFF


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute difference over the reference's largest magnitude (fp64 arithmetic)."""
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


@dataclass(frozen=True)
class Check:
    name: str
    err: float           # ours vs the fp32 reference
    lowprec_err: float   # torch in the same low precision vs the fp32 reference
    allowed: float

    @property
    def ok(self) -> bool:
        return self.err <= self.allowed    # NaN compares False: fails

    def __str__(self) -> str:
        return (f"{self.name}: rel err {self.err:.3g} > allowed {self.allowed:.3g} "
                f"(same-precision torch: {self.lowprec_err:.3g})")


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, ref_lowprec: torch.Tensor,
            tol: Tolerance, backward: bool = False) -> Check:
    if out.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    base = rel_err(ref_lowprec, ref)
    factor = tol.bwd_factor if backward else tol.fwd_factor
    return Check(name, rel_err(out, ref), base, factor * base + tol.floor)


def assert_checks(checks: list[Check], record) -> None:
    """Record every check's numbers, then fail naming each check that is off."""
    for c in checks:
        record(**{f"{c.name}_rel_err": c.err, f"{c.name}_allowed": c.allowed,
                  f"{c.name}_lowprec_rel_err": c.lowprec_err})
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "; ".join(bad)


def poison_allocator(nbytes: int, device: torch.device) -> None:
    """Leave a freed block of NaN bytes in the caching allocator, so an output of that size the
    kernel forgets to write reads as NaN (best effort: the allocator usually hands the block back)."""
    if device.type == "cuda":
        block = torch.empty(nbytes, dtype=torch.uint8, device=device)
        block.fill_(POISON_BYTE)
        del block


def assert_written(out: torch.Tensor, *inputs: torch.Tensor) -> None:
    """The output is a fresh buffer the kernel filled: finite, not all zero, not an input."""
    assert all(out.data_ptr() != x.data_ptr() for x in inputs), "output aliases an input buffer"
    finite = torch.isfinite(out)
    assert bool(finite.all()), f"{int((~finite).sum())} of {out.numel()} outputs are NaN/inf (unwritten?)"
    assert bool((out != 0).any()), "output is all zeros"


def import_or_fail(name: str):
    """Import the package under test; on a GPU machine a missing or broken package is a failure."""
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, or an OSError / RuntimeError from loading its .so
        pytest.fail(f"{name} does not import on this GPU machine: {type(exc).__name__}: {exc}", pytrace=False)
