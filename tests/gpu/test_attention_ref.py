"""The references and checks themselves, on CPU: a wrong reference would pass or fail every kernel."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

import attention_ref as ar  # noqa: E402
import kernel_check as kc  # noqa: E402

pytestmark = pytest.mark.no_gpu_needed


def _naive(q, k, v, keep):
    """Attention of one head by the textbook formula, in fp64: q (sq, d), k/v (sk, d)."""
    scores = (q.double() @ k.double().T) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, -1) @ v.double()


def test_causal_mask_is_bottom_right_aligned():
    assert ar.causal_mask(2, 5, "cpu").int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert ar.causal_mask(3, 3, "cpu").int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("causal", [False, True])
def test_fp32_reference_matches_textbook_with_gqa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g), torch.randn(2, 9, 2, 8, generator=g)
    out = ar.attention_fp32(q, k, v, causal)
    keep = ar.causal_mask(5, 9, "cpu") if causal else torch.ones(5, 9, dtype=torch.bool)
    for b in range(2):
        for h in range(4):            # query heads 0,1 read KV head 0; 2,3 read KV head 1
            want = _naive(q[b, :, h], k[b, :, h // 2], v[b, :, h // 2], keep)
            torch.testing.assert_close(out[b, :, h].double(), want, rtol=1e-5, atol=1e-5)


def test_lowprec_reference_rounds_but_stays_close():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 64, 2, 32, generator=g).to(torch.bfloat16) for _ in range(3))
    ref = ar.attention_fp32(q, k, v, True)
    err = kc.rel_err(ar.attention_lowprec(q, k, v, True), ref)
    assert 0 < err < 0.05


def test_varlen_reference_attends_within_each_sequence():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(7, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g), torch.randn(9, 2, 8, generator=g)
    out = ar.attention_varlen(lambda *a: ar.attention_fp32(*a), q, k, v, [0, 3, 7], [0, 4, 9], True)
    second = ar.attention_fp32(q[None, 3:], k[None, 4:], v[None, 4:], True)[0]
    torch.testing.assert_close(out[3:], second)


def test_paged_round_trip_shuffles_blocks():
    g = torch.Generator().manual_seed(3)
    cache = torch.randn(3, 8, 2, 4, generator=g)
    paged, table = ar.to_paged(cache, 2, g)
    assert paged.shape == (12, 2, 2, 4) and table.shape == (3, 4)
    assert table.flatten().tolist() != list(range(12)), "blocks should not stay in order"
    assert torch.equal(ar.from_paged(paged, table), cache)


def test_reference_gradients_match_autograd_in_fp32():
    g = torch.Generator().manual_seed(4)
    q, k, v, dout = (torch.randn(1, 6, 2, 8, generator=g) for _ in range(4))
    ref = ar.reference(lambda q_, k_, v_, lp: ar.attention_fp32(q_, k_, v_, False), q, k, v, dout)
    leaf = q.clone().requires_grad_()
    (ar.attention_fp32(leaf, k, v, False) * dout).sum().backward()
    torch.testing.assert_close(ref.grads[0], leaf.grad)


def test_compare_accepts_rounding_and_rejects_a_wrong_kernel():
    g = torch.Generator().manual_seed(5)
    ref = torch.randn(4, 64, generator=g)
    lowprec = ref.to(torch.bfloat16)
    tol = kc.TOLERANCES["bf16"]
    assert kc.compare("out", lowprec, ref, lowprec, tol).ok
    wrong = (ref + 0.05 * torch.randn(4, 64, generator=g)).to(torch.bfloat16)
    assert not kc.compare("out", wrong, ref, lowprec, tol).ok
    nan = lowprec.clone()
    nan[0, 0] = float("nan")
    assert not kc.compare("out", nan, ref, lowprec, tol).ok


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_poison_bytes_read_as_nan(dtype):
    raw = torch.full((4,), kc.POISON_BYTE, dtype=torch.uint8)
    assert torch.isnan(raw.view(dtype)).all()


def test_assert_written_catches_unwritten_output():
    x = torch.ones(3)
    with pytest.raises(AssertionError, match="aliases"):
        kc.assert_written(x, x)
    with pytest.raises(AssertionError, match="NaN"):
        kc.assert_written(torch.full((3,), float("nan")), x)
    with pytest.raises(AssertionError, match="zeros"):
        kc.assert_written(torch.zeros(3), x)
