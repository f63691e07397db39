"""RL through the chunked LM head (`train.lm_head_chunk_rows`): log-probs, logged metrics and
every parameter's gradient equal the full-logits path, in the padded, packed and shared-prefix
layouts, with temperature, `stability.logits_clip` and `stability.logprob_min` set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from recipe_support import rollout_tensors
from transformers import AutoModelForCausalLM

from moepost.components.moe.router_setup import router_setup
from moepost.config.schema import Config
from moepost.config.validate import resolve_rl_presets
from moepost.recipes.rl_passes import logprob_pass
from moepost.recipes.rl_update import policy_update
from moepost.recipes.step_tensors import StepTensors

PROMPTS = [[5, 6, 7]] * 3 + [[8, 9, 10, 11, 12, 13]] * 2 + [[14, 15]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29], [], [30, 31]]


def _tensors(layout: str) -> StepTensors:
    t = rollout_tensors(PROMPTS, COMPLETIONS)
    g = torch.Generator().manual_seed(5)
    advantages = torch.randn(6, generator=g)
    old_logprobs = -4.0 + 1.5 * torch.randn(t.completion_mask.shape, generator=g)
    ref_logprobs = -4.0 + torch.randn(t.completion_mask.shape, generator=g)
    return dataclasses.replace(
        t,
        packed=layout == "packed",
        shared_prefix=layout == "shared",
        advantages=advantages,
        old_logprobs=old_logprobs,
        ref_logprobs=ref_logprobs,
    )


def _cfg(chunk_rows: int, algorithm: str) -> Config:
    cfg = Config()
    cfg.rl.algorithm = algorithm  # type: ignore[assignment]
    cfg.rl.kl_coef = 0.05
    cfg.rl.clip_eps_low, cfg.rl.clip_eps_high = 0.2, 0.28
    cfg.rl.loss_aggregation = "seq_mean_token_mean"
    cfg.train.micro_batch_size = 3
    cfg.train.lm_head_chunk_rows = chunk_rows
    cfg.generation.temperature = 0.8
    cfg.stability.logits_clip = 0.5  # the tiny model's logits reach it: some are clamped
    cfg.stability.logprob_min = -4.7  # and some log-probs hit the floor
    resolve_rl_presets(cfg)  # the rest from the preset, as config loading does
    return cfg


def _run(tiny_model: Path, layout: str, chunk_rows: int, algorithm: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg, t = _cfg(chunk_rows, algorithm), _tensors(layout)
    lp = logprob_pass(model, t, cfg)
    logged = policy_update(model, t, cfg, router_setup(model, cfg.moe), update_index=0).metrics
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lp, logged, grads


@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
@pytest.mark.parametrize("algorithm", ["grpo", "gspo"])
def test_chunked_head_equals_full_logits(tiny_model: Path, layout: str, algorithm: str) -> None:
    lp_full, log_full, g_full = _run(tiny_model, layout, 0, algorithm)
    lp, logged, grads = _run(tiny_model, layout, 2, algorithm)
    mask = _tensors(layout).completion_mask.bool()
    assert bool((lp_full[mask] == -4.7).any())  # the floor is exercised
    torch.testing.assert_close(lp[mask], lp_full[mask], rtol=1e-5, atol=1e-6)
    for key in ("loss", "kl", "entropy", "clip_frac", "logprob_gap/mean", "logprob_gap/max"):
        assert logged[key] == pytest.approx(log_full[key], rel=1e-5, abs=1e-7), key
    assert grads.keys() == g_full.keys() and len(grads) > 10
    for name, g in grads.items():
        torch.testing.assert_close(g, g_full[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("layout", ["padded", "shared"])
def test_overflowing_row_is_dropped_with_finite_gradients(tiny_model: Path, layout: str) -> None:
    """Row 0's final hidden state is huge but finite, so its head output overflows to inf (an
    fp16 head can): both paths drop the sample, count its tokens and give equal, finite
    gradients (the chunked backward returns an exact zero for the row `torch.where` cut)."""
    runs = []
    for chunk_rows in (0, 2):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)

        def overflow(_m: torch.nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            if out.shape[0] == 6:  # the completion forward of all six rows
                out = out.clone()
                out[0] = 3e38
            return out

        model.model.norm.register_forward_hook(overflow)
        with torch.no_grad():
            model.lm_head.weight[7] = 1.0  # token 7's logit of row 0: 64 x 3e38 = inf
        cfg, t = _cfg(chunk_rows, "grpo"), _tensors(layout)
        cfg.train.micro_batch_size = 6
        # the clamp and the floor would turn the inf logit and the -inf log-probs finite
        cfg.stability.logits_clip = cfg.stability.logprob_min = None
        logged = policy_update(model, t, cfg, router_setup(model, cfg.moe), update_index=0).metrics
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((logged, grads))
    (full, g_full), (chunked, grads) = runs
    assert full["stability/nonfinite_tokens"] == chunked["stability/nonfinite_tokens"] == 4
    for key in ("loss", "entropy", "kl"):
        assert chunked[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    for name, g in grads.items():
        assert bool(torch.isfinite(g).all()), name
        scale = float(g_full[name].abs().max())  # token 7's unit head row makes some grads ~40
        torch.testing.assert_close(g, g_full[name], rtol=1e-5, atol=1e-6 * scale, msg=name)
