"""Chunked LM head + log-softmax equals the unchunked computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moepost.algorithms.chunked_ce import linear_token_logprobs
from moepost.algorithms.logprobs import entropy_from_logits, token_logprobs


def _inputs(n: int = 13, h: int = 8, v: int = 50, *, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.7).to(dtype).requires_grad_()
    bias = torch.randn(v, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[1, 5][: 2 if n > 5 else 1]] = -100
    return hidden, weight, bias, labels


def _reference(hidden, weight, bias, labels, **kw):
    logits = F.linear(hidden, weight, bias)[None]  # [1, N, V]
    clip, floor, temp = kw.get("logits_clip"), kw.get("logprob_min"), kw.get("temperature", 1.0)
    lp = token_logprobs(
        logits, labels[None], temperature=temp, logits_clip=clip, logprob_min=floor
    )[0]
    ent = entropy_from_logits(logits, temperature=temp)[0]
    return lp, ent, logits[0].argmax(-1)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"temperature": 0.7},
        {"logits_clip": 3.0, "temperature": 1.3},
        {"logprob_min": -6.0},
    ],
)
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_values_and_gradients_match_unchunked(kw: dict, chunk_size: int) -> None:
    hidden, weight, bias, labels = _inputs()
    g = torch.Generator().manual_seed(1)
    w_lp, w_ent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    params = (hidden, weight, bias)

    def run(fn, params, which):
        lp, ent, am = fn(*params)
        loss = (lp * w_lp.to(lp.dtype)).sum() if which == "lp" else (ent * w_ent).sum()
        return lp.detach(), ent.detach(), am, torch.autograd.grad(loss, params)

    def chunked(h, w, b):
        return linear_token_logprobs(
            h, w, labels, bias=b, chunk_size=chunk_size, with_entropy=True, **kw
        )

    def unchunked(h, w, b):
        return _reference(h, w, b, labels, **kw)

    ref, got = run(unchunked, params, "lp"), run(chunked, params, "lp")
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], ref[2])
    assert float(got[0][1]) == 0.0 and float(got[0][5]) == 0.0  # ignored labels
    for a, b in zip(got[3], ref[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # The entropy gradient (d H = -p (log p + H)): float32 loses digits to cancellation in
    # both forms, so both are held against float64, and ours must be as close as autograd's.
    params64 = tuple(p.detach().double().requires_grad_() for p in params)
    exact, ref = run(unchunked, params64, "ent"), run(unchunked, params, "ent")
    got = run(chunked, params, "ent")
    for a, r, e in zip(got[3], ref[3], exact[3]):
        ours, theirs = float((a - e).abs().max()), float((r - e).abs().max())
        assert ours <= 2 * theirs + 1e-6 * float(e.abs().max()), (ours, theirs)


def test_gradcheck_float64() -> None:
    hidden, weight, bias, labels = _inputs(n=6, h=3, v=7, dtype=torch.float64)
    labels[5] = 2

    def fn(h, w, b):
        lp, ent, _ = linear_token_logprobs(
            h, w, labels, bias=b, chunk_size=4, temperature=0.9, with_entropy=True
        )
        return lp, ent

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_logprobs_only_and_no_bias_matches() -> None:
    hidden, weight, _, labels = _inputs()
    lp, ent, _ = linear_token_logprobs(hidden, weight, labels, chunk_size=5)
    assert ent is None
    ref = _reference(hidden, weight, None, labels)[0]
    gh, gw = torch.autograd.grad(lp.sum(), (hidden, weight))
    rh, rw = torch.autograd.grad(ref.sum(), (hidden, weight))
    torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh, rh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-6)


def test_row_dropped_with_where_gets_exact_zero_gradient_despite_inf_logits() -> None:
    hidden, weight, _, labels = _inputs(n=4)
    with torch.no_grad():
        hidden[2] = 3e38  # finite, but the head overflows to inf (not NaN in the model)
    lp, _, _ = linear_token_logprobs(hidden, weight, labels.clamp(min=0), chunk_size=2)
    assert not bool(torch.isfinite(lp[2]))
    bad = ~torch.isfinite(lp)
    kept = torch.where(bad, torch.zeros_like(lp), lp)
    gh, gw = torch.autograd.grad(kept.sum(), (hidden, weight))
    assert bool(torch.isfinite(gw).all()) and bool(torch.isfinite(gh).all())
    assert float(gh[2].abs().sum()) == 0.0


def test_bfloat16_follows_the_unchunked_rounding() -> None:
    hidden, weight, bias, labels = _inputs(n=32, h=16, v=64, dtype=torch.bfloat16)
    lp, _, am = linear_token_logprobs(hidden, weight, labels, bias=bias, chunk_size=8)
    ref_lp, _, ref_am = _reference(hidden, weight, bias, labels)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=0)  # same bf16 logits, same fp32 math
    assert torch.equal(am, ref_am)
    gw = torch.autograd.grad(lp.sum(), weight)[0]
    rw = torch.autograd.grad(ref_lp.sum(), weight)[0]
    assert gw.dtype == torch.bfloat16
    torch.testing.assert_close(gw.float(), rw.float(), rtol=2e-2, atol=2e-2)


def test_bad_options_are_refused() -> None:
    hidden, weight, _, labels = _inputs()
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        linear_token_logprobs(hidden[None], weight, labels)
    with pytest.raises(Exception, match="chunk_size"):
        linear_token_logprobs(hidden, weight, labels, chunk_size=0)
