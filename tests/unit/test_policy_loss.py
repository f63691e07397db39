"""Policy losses: clipping branches, GSPO / GSPO-token / GRPO equivalences, CISPO, presets."""

from __future__ import annotations

import math

import pytest
import torch

from moepost.algorithms.policy_loss import ALGORITHM_PRESETS, policy_loss
from moepost.errors import UserError

LN15, LN05 = math.log(1.5), math.log(0.5)


def _grad(loss: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(loss, logprobs)
    return grad


def test_token_clipping_branches() -> None:
    # one token per sequence, old = 0, so r = exp(logp):
    #   r=1.5, A=+1: min(1.5, 1.2)   = 1.2  -> l = -1.2, clipped, grad 0
    #   r=1.5, A=-1: min(-1.5, -1.2) = -1.5 -> l = +1.5, dl/dlogp = r = 1.5
    #   r=0.5, A=+1: min(0.5, 0.8)   = 0.5  -> l = -0.5, dl/dlogp = -r = -0.5
    #   r=0.5, A=-1: min(-0.5, -0.8) = -0.8 -> l = +0.8, clipped, grad 0
    # token_mean: (-1.2 + 1.5 - 0.5 + 0.8) / 4 = 0.15; grads / 4 = [0, 0.375, -0.125, 0]
    logprobs = torch.tensor([[LN15], [LN15], [LN05], [LN05]], requires_grad=True)
    old = torch.zeros(4, 1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    mask = torch.ones(4, 1)
    loss, metrics = policy_loss(
        logprobs, old, adv, mask, ratio_level="token", aggregation="token_mean"
    )
    assert loss.item() == pytest.approx(0.15, abs=1e-6)
    torch.testing.assert_close(_grad(loss, logprobs), torch.tensor([[0.0], [0.375], [-0.125], [0]]))
    assert metrics["clip_frac"].item() == 0.5
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)  # (1.5 + 1.5 + 0.5 + 0.5) / 4
    # approx_kl = mean(old - logp) = (2 * -0.405465 + 2 * 0.693147) / 4 = 0.143841
    assert metrics["approx_kl"].item() == pytest.approx(0.143841, abs=1e-6)
    assert metrics["pg_loss"].item() == pytest.approx(0.15, abs=1e-6)


def test_single_clipped_token_is_minus_1_2() -> None:
    # ratio 1.5, A = +1, eps 0.2 -> -min(1.5, 1.2) = -1.2
    loss, _ = policy_loss(
        torch.tensor([[LN15]]),
        torch.zeros(1, 1),
        torch.ones(1),
        torch.ones(1, 1),
        ratio_level="token",
    )
    assert loss.item() == pytest.approx(-1.2)


def test_asymmetric_clip_higher() -> None:
    # DAPO clip-higher: r = 1.25, A = +1 is inside 1 + 0.28 -> -1.25; with eps_high 0.2 -> -1.2
    logp, old, adv, mask = (
        torch.tensor([[math.log(1.25)]]),
        torch.zeros(1, 1),
        torch.ones(1),
        torch.ones(1, 1),
    )
    high, _ = policy_loss(logp, old, adv, mask, ratio_level="token", clip_eps_high=0.28)
    sym, _ = policy_loss(logp, old, adv, mask, ratio_level="token", clip_eps_high=0.2)
    assert high.item() == pytest.approx(-1.25)
    assert sym.item() == pytest.approx(-1.2)


@pytest.mark.parametrize("ratio_level", ["token", "sequence", "sequence_token"])
def test_ratio_exactly_one_on_fresh_samples(ratio_level: str) -> None:
    torch.manual_seed(0)
    logprobs = (-torch.rand(2, 4)).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv = torch.tensor([1.0, -0.5])
    loss, metrics = policy_loss(
        logprobs,
        logprobs.detach().clone(),
        adv,
        mask,
        ratio_level=ratio_level,
        clip_eps_low=3e-4,
        clip_eps_high=4e-4,
    )
    assert metrics["ratio_mean"].item() == 1.0
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    # seq_mean_token_mean with r = 1: -(1 + (-0.5)) / 2 = -0.25
    assert loss.item() == pytest.approx(-0.25)


def test_gspo_hand_example() -> None:
    # one sequence, logp - old = [0.2, 0.4] (+ padding): s = exp(0.3) = 1.349859
    logprobs = torch.tensor([[0.2, 0.4, 123.0]], requires_grad=True)
    old, mask, adv = torch.zeros(1, 3), torch.tensor([[1, 1, 0]]), torch.ones(1)
    # GSPO preset eps 3e-4 / 4e-4: clipped at 1.0004 -> loss -1.0004, no gradient
    loss, metrics = policy_loss(
        logprobs, old, adv, mask, ratio_level="sequence", clip_eps_low=3e-4, clip_eps_high=4e-4
    )
    assert loss.item() == pytest.approx(-1.0004)
    assert metrics["clip_frac"].item() == 1.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.349859, abs=1e-6)
    assert torch.all(_grad(loss, logprobs) == 0)
    # wide clip: loss -s = -1.349859; d/dlogp_t = -A s / |o| = -0.674929 on both tokens
    loss, metrics = policy_loss(logprobs, old, adv, mask, ratio_level="sequence", clip_eps_high=1.0)
    assert loss.item() == pytest.approx(-1.349859, abs=1e-6)
    assert metrics["clip_frac"].item() == 0.0
    torch.testing.assert_close(_grad(loss, logprobs), torch.tensor([[-0.674929, -0.674929, 0.0]]))


def _random_batch(seed: int, batch: int, seq_len: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, seq_len, generator=gen) * 3
    logprobs = (old + 0.3 * torch.randn(batch, seq_len, generator=gen)).requires_grad_(True)
    adv = torch.randn(batch, generator=gen)
    return logprobs, old, adv


def test_gspo_equals_grpo_with_one_token_per_sequence() -> None:
    logprobs, old, adv = _random_batch(1, 6, 3)
    # one valid token per sequence, at varying positions (the rest is padding)
    mask = torch.zeros(6, 3)
    mask[torch.arange(6), torch.tensor([0, 1, 2, 0, 1, 2])] = 1
    kwargs = {"clip_eps_low": 0.1, "clip_eps_high": 0.15, "aggregation": "seq_mean_token_mean"}
    gspo, gspo_m = policy_loss(logprobs, old, adv, mask, ratio_level="sequence", **kwargs)
    grpo, grpo_m = policy_loss(logprobs, old, adv, mask, ratio_level="token", **kwargs)
    torch.testing.assert_close(gspo, grpo)
    torch.testing.assert_close(_grad(gspo, logprobs), _grad(grpo, logprobs))
    assert 0 < grpo_m["clip_frac"].item() < 1  # both branches exercised
    torch.testing.assert_close(gspo_m["clip_frac"], grpo_m["clip_frac"])


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean"])
def test_sequence_token_equals_gspo_with_constant_advantages(aggregation: str) -> None:
    logprobs, old, adv = _random_batch(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
    kwargs = {"clip_eps_low": 0.05, "clip_eps_high": 0.05, "aggregation": aggregation}
    gspo, gspo_m = policy_loss(logprobs, old, adv, mask, ratio_level="sequence", **kwargs)
    per_token_adv = adv[:, None].expand(5, 4).clone()  # [B, T] advantages, constant per row
    tok, tok_m = policy_loss(
        logprobs, old, per_token_adv, mask, ratio_level="sequence_token", **kwargs
    )
    torch.testing.assert_close(tok, gspo)
    torch.testing.assert_close(_grad(tok, logprobs), _grad(gspo, logprobs))
    assert 0 < gspo_m["clip_frac"].item() < 1
    torch.testing.assert_close(tok_m["clip_frac"], gspo_m["clip_frac"])


def test_sequence_token_with_per_token_advantages() -> None:
    # logp - old = [0.2, 0.4]: s = exp(0.3) = 1.349859 on both tokens; A = [+1, -1], wide clip.
    # l_t = -s A_t = [-1.349859, +1.349859] -> seq_mean_token_mean (sum / 2) = 0
    # GSPO-token: dl_t/dlogp_t = -A_t s, / 2 -> grads [-0.674929, +0.674929]
    # GSPO (sequence ratio): every logp_u moves s, sum_t -A_t s / 2 / 2 = 0 -> grads [0, 0]
    logprobs = torch.tensor([[0.2, 0.4]], requires_grad=True)
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    kwargs = {"clip_eps_low": 1.0, "clip_eps_high": 1.0}
    tok, _ = policy_loss(logprobs, old, adv, mask, ratio_level="sequence_token", **kwargs)
    seq, _ = policy_loss(logprobs, old, adv, mask, ratio_level="sequence", **kwargs)
    assert tok.item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(_grad(tok, logprobs), torch.tensor([[-0.674929, 0.674929]]))
    torch.testing.assert_close(_grad(seq, logprobs), torch.zeros(1, 2))


def test_cispo_keeps_gradient_on_clipped_tokens() -> None:
    # token 0: r = 1.5 > 1.28 -> weight sg(1.28); logp = -1 + ln 1.5 = -0.594535
    #   l = -1.28 * 1 * -0.594535 = 0.761005, dl/dlogp = -1.28
    # token 1: r = 1 -> weight 1, logp = -2: l = 2, dl/dlogp = -1
    # token_mean over 2: (0.761005 + 2) / 2 = 1.380502; grads [-0.64, -0.5]
    logprobs = torch.tensor([[-1.0 + LN15, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0]])
    loss, metrics = policy_loss(
        logprobs,
        old,
        torch.ones(1),
        torch.ones(1, 2),
        ratio_level="cispo",
        clip_eps_high=0.28,
        aggregation="token_mean",
    )
    assert loss.item() == pytest.approx(1.380502, abs=1e-6)
    torch.testing.assert_close(_grad(loss, logprobs), torch.tensor([[-0.64, -0.5]]))
    assert metrics["clip_frac"].item() == 0.5


def test_none_is_plain_policy_gradient() -> None:
    # l = -A logp, A = 2: -2 * (-0.5 - 1.5) / 2 tokens = 2 (seq_mean_token_mean); grad -2/2 = -1
    logprobs = torch.tensor([[-0.5, -1.5]], requires_grad=True)
    loss, metrics = policy_loss(
        logprobs, None, torch.tensor([2.0]), torch.ones(1, 2), ratio_level="none"
    )
    assert loss.item() == pytest.approx(2.0)
    torch.testing.assert_close(_grad(loss, logprobs), torch.tensor([[-1.0, -1.0]]))
    assert metrics["ratio_mean"].item() == 1.0


def test_kl_term_added_before_aggregation() -> None:
    # r = 1 and A = 0, so the loss is the KL term alone:
    # k3 = [0.018731, 0.148721, 0] -> mean 0.167452 / 3 = 0.055817; x 0.04 = 0.0022327
    # dk3/dlogp = 1 - e^x = [0.181269, -0.648721, 0], times 0.04 / 3 = [0.002417, -0.008650, 0]
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.2, -1.5, -0.5]])
    loss, metrics = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(1),
        torch.ones(1, 3),
        ratio_level="token",
        ref_logprobs=ref,
        kl_coef=0.04,
    )
    assert loss.item() == pytest.approx(0.0022327, abs=1e-7)
    assert metrics["kl"].item() == pytest.approx(0.055817, abs=1e-6)
    assert metrics["pg_loss"].item() == 0.0
    torch.testing.assert_close(
        _grad(loss, logprobs), torch.tensor([[0.002417, -0.008650, 0.0]]), atol=1e-6, rtol=0
    )
    # kl_coef 0: the metric is still reported, the loss has no KL
    loss0, metrics0 = policy_loss(
        logprobs,
        logprobs.detach(),
        torch.zeros(1),
        torch.ones(1, 3),
        ratio_level="token",
        ref_logprobs=ref,
        kl_coef=0.0,
    )
    assert loss0.item() == 0.0 and metrics0["kl"].item() == pytest.approx(0.055817, abs=1e-6)


@pytest.mark.parametrize("algorithm", ["gspo", "grpo", "dapo", "dr_grpo", "cispo"])
def test_micro_batches_sum_to_one_batch(algorithm: str) -> None:
    preset = ALGORITHM_PRESETS[algorithm]
    logprobs, old, adv = _random_batch(3, 4, 5)
    ref = old - 0.1
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    kwargs = {
        "ratio_level": preset.ratio_level,
        "clip_eps_low": 0.1,
        "clip_eps_high": 0.1,
        "aggregation": preset.aggregation,
        "kl_coef": 0.05,
        "ref_logprobs": ref,
        "max_new_tokens": 5,
    }
    full, _ = policy_loss(logprobs, old, adv, mask, **kwargs)
    full_grad = _grad(full, logprobs)
    total = 0.0
    for rows in (slice(0, 3), slice(3, 4)):
        part_kwargs = {**kwargs, "ref_logprobs": ref[rows]}
        part, _ = policy_loss(
            logprobs[rows],
            old[rows],
            adv[rows],
            mask[rows],
            num_global_tokens=11,
            num_global_seqs=4,
            **part_kwargs,
        )
        total = total + part
    torch.testing.assert_close(total, full)
    torch.testing.assert_close(_grad(total, logprobs), full_grad)


def test_nan_in_padding_does_not_leak() -> None:
    logprobs = torch.tensor([[-1.0, math.nan], [-0.5, -0.7]], requires_grad=True)
    old = torch.tensor([[-1.1, math.inf], [-0.5, -0.6]])
    mask = torch.tensor([[1, 0], [1, 1]])
    for level in ("token", "sequence", "sequence_token", "cispo", "none"):
        loss, metrics = policy_loss(
            logprobs,
            old,
            torch.tensor([1.0, -1.0]),
            mask,
            ratio_level=level,
            ref_logprobs=old,
            kl_coef=0.1,
        )
        assert torch.isfinite(loss)
        assert torch.isfinite(_grad(loss, logprobs)).all()
        assert all(torch.isfinite(v) for v in metrics.values())


def test_presets_table() -> None:
    assert set(ALGORITHM_PRESETS) == {
        "gspo",
        "grpo",
        "dapo",
        "dr_grpo",
        "reinforce",
        "rloo",
        "cispo",
    }
    gspo = ALGORITHM_PRESETS["gspo"]
    assert (gspo.ratio_level, gspo.clip_eps_low, gspo.clip_eps_high) == (
        "sequence",
        3e-4,
        4e-4,
    )
    assert ALGORITHM_PRESETS["grpo"].kl_coef == 0.04
    assert ALGORITHM_PRESETS["dapo"].clip_eps_high == 0.28
    assert ALGORITHM_PRESETS["dapo"].aggregation == "token_mean"
    assert ALGORITHM_PRESETS["dapo"].dynamic_sampling is True
    assert ALGORITHM_PRESETS["dr_grpo"].aggregation == "seq_mean_token_sum_norm"
    assert ALGORITHM_PRESETS["dr_grpo"].advantage_mode == "mean"
    assert ALGORITHM_PRESETS["rloo"].advantage_mode == "rloo"
    assert ALGORITHM_PRESETS["reinforce"].ratio_level == "none"
    assert ALGORITHM_PRESETS["cispo"].ratio_level == "cispo"
    # every preset's loss fields are accepted by policy_loss
    loss_keys = ("ratio_level", "clip_eps_low", "clip_eps_high", "aggregation", "kl_coef")
    for preset in ALGORITHM_PRESETS.values():
        kwargs = {k: getattr(preset, k) for k in (*loss_keys, "kl_estimator")}
        loss, _ = policy_loss(
            torch.zeros(1, 2),
            torch.zeros(1, 2),
            torch.ones(1),
            torch.ones(1, 2),
            ref_logprobs=torch.zeros(1, 2),
            max_new_tokens=2,
            **kwargs,
        )
        assert torch.isfinite(loss)


def test_bad_ratio_level_raises() -> None:
    with pytest.raises(UserError, match="ratio_level"):
        policy_loss(
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.ones(1),
            torch.ones(1, 1),
            ratio_level="tokens",  # type: ignore[arg-type]
        )
