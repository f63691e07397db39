"""Padding-free RL micro-batches (`data.packing` in an RL run): one [1, N] row per micro-batch
gives the log-probs and gradients of the padded layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from recipe_support import rollout_tensors
from transformers import AutoModelForCausalLM

from moepost.config.schema import Config
from moepost.recipes.rl_passes import (
    completion_logits,
    logprob_pass,
)
from moepost.recipes.step_tensors import StepTensors

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15], [16, 17, 18, 19]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26], []]  # the last row produced nothing


def _tensors(packed: bool) -> StepTensors:
    return dataclasses.replace(rollout_tensors(PROMPTS, COMPLETIONS), packed=packed)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_padded_logprobs_and_grads(tiny_model: Path, attn: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    cfg = Config()
    cfg.train.micro_batch_size = 4
    padded, packed = _tensors(False), _tensors(True)
    inputs = packed.rows(slice(0, 4))
    assert inputs["input_ids"].shape == (1, 3 + 4 + 6 + 1 + 2 + 2 + 4)  # real tokens only
    assert inputs["position_ids"][0, :7].tolist() == [0, 1, 2, 3, 4, 5, 6]  # row 0 ...
    assert inputs["position_ids"][0, 7:9].tolist() == [0, 1]  # ... and row 1 restarts
    lp_padded = logprob_pass(model, padded, cfg)
    lp_packed = logprob_pass(model, packed, cfg)
    mask = padded.completion_mask.bool()
    assert int(mask.sum()) == 7
    torch.testing.assert_close(lp_packed[mask], lp_padded[mask], rtol=1e-5, atol=1e-5)
    # past a row's end the packed logits are zeros: finite, uniform, and masked out by every use
    assert torch.isfinite(lp_packed).all()
    grads = []
    for t in (padded, packed):
        model.zero_grad()
        logits = completion_logits(model, t, slice(0, 4))
        picked = logits.log_softmax(-1).gather(-1, t.completion_ids[..., None])[..., 0]
        (picked * t.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
