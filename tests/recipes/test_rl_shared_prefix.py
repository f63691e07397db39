"""Shared-prefix training forwards: the index maps, and equality with the padded forward."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from recipe_support import rollout_tensors
from transformers import AutoModelForCausalLM

from moepost.components.model.loading import enable_gradient_checkpointing
from moepost.components.rollout.shared_prefix import PrefixShare, can_share_prefix
from moepost.config.schema import Config
from moepost.config.validate import resolve_rl_presets
from moepost.distributed import DistContext
from moepost.recipes.rl_passes import (
    completion_logits,
    shared_prefix_off,
)
from moepost.recipes.step_tensors import StepTensors


def test_find_groups_consecutive_equal_prefixes_and_maps_tokens_both_ways() -> None:
    # 5 rows of width 5: a 3-column prompt block, then a 2-column completion block.
    ids = torch.tensor(
        [[0, 1, 2, 7, 8], [0, 1, 2, 9, 0], [0, 3, 4, 5, 6], [0, 3, 4, 5, 0], [5, 5, 5, 1, 1]]
    )
    mask = torch.tensor(
        [[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    )
    share = PrefixShare.find(ids, mask, completion_width=2)
    assert share is not None
    assert share.representative.tolist() == [0, 2, 4]
    assert share.owner.tolist() == [0, 0, 1, 1, 2]
    assert share.call_sizes == (3 * 3, 5 * 2)
    # shared order: prefixes of rows 0, 2, 4, then the completion columns of rows 0..4
    assert share.to_shared.tolist() == [0, 1, 2, 10, 11, 12, 20, 21, 22] + [
        3, 4, 8, 9, 13, 14, 18, 19, 23, 24
    ]  # fmt: skip
    # padded row 1 reads its prefix from run 0 (0, 1, 2) and its completion at 9 + 2..3
    assert share.to_padded.view(5, 5)[1].tolist() == [0, 1, 2, 11, 12]
    assert share.to_padded.view(5, 5)[3].tolist() == [3, 4, 5, 15, 16]
    # A round trip gives the padded grid back, since rows of a run hold the same prefix.
    grid = ids.flatten()
    assert torch.equal(grid[share.to_shared][share.to_padded], grid)
    routes = torch.arange(2 * 25 * 1).view(2, 25, 1)  # [L, N, K]
    calls = share.split_routes(routes)
    assert [len(c) for c in calls] == [2, 2]
    assert [c.shape[0] for c in calls[1]] == [9, 10]
    assert torch.equal(torch.cat(calls[1]), routes[1, share.to_shared])


def test_find_returns_none_without_neighbours_sharing() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 5, 6], [1, 3, 3, 4]])
    mask = torch.ones_like(ids)
    assert PrefixShare.find(ids, mask, completion_width=2) is not None  # rows 0, 1 share [1, 2]
    assert PrefixShare.find(ids[[0, 2]], mask[[0, 2]], completion_width=2) is None
    assert PrefixShare.find(ids[:1], mask[:1], completion_width=2) is None  # one row
    assert PrefixShare.find(ids, mask, completion_width=4) is None  # no prompt columns
    assert PrefixShare.find(ids, mask, completion_width=0) is None  # no completion columns
    other_mask = mask.clone()
    other_mask[1, 0] = 0  # same ids, different padding: not the same prefix
    assert PrefixShare.find(ids[:2], other_mask[:2], completion_width=2) is None


# Two prompts sampled 3 and 2 times and a third one once; one row produced nothing.
PROMPTS = [[5, 6, 7]] * 3 + [[8, 9, 10, 11, 12, 13]] * 2 + [[14, 15]]
COMPLETIONS = [[20, 21, 22, 23], [24], [25, 26], [27, 28, 29], [], [30, 31]]


def _tensors() -> StepTensors:
    return dataclasses.replace(rollout_tensors(PROMPTS, COMPLETIONS), shared_prefix=True)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prefix_logits_and_grads_equal_the_padded_forward(
    tiny_model: Path, attn: str
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation=attn)
    t = _tensors()
    rows = slice(0, len(PROMPTS))
    share = t.share(rows)
    assert share is not None and share.representative.tolist() == [0, 3, 5]
    mask = t.completion_mask.bool()
    assert int(mask.sum()) == 12
    results = []
    for s in (None, share):
        model.zero_grad()
        logits = completion_logits(model, t, rows, s)
        picked = logits.log_softmax(-1).gather(-1, t.completion_ids[..., None])[..., 0]
        (picked * t.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (padded, g_padded), (shared, g_shared) = results
    assert shared.shape == padded.shape
    torch.testing.assert_close(shared[mask], padded[mask], rtol=1e-5, atol=1e-5)
    assert g_shared.keys() == g_padded.keys()
    for name in g_padded:
        torch.testing.assert_close(g_shared[name], g_padded[name], rtol=1e-4, atol=1e-6)


def test_sharing_is_off_where_it_cannot_run(tiny_model: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    cfg, one = Config(), DistContext()
    assert can_share_prefix(model) is None
    assert shared_prefix_off(cfg, one, model, None) is None
    cfg.rl.shared_prefix = False
    assert shared_prefix_off(cfg, one, model) == "rl.shared_prefix is false"
    cfg = Config()
    cfg.data.packing = True
    assert "data.packing" in str(shared_prefix_off(cfg, one, model))
    two = DistContext(world_size=2)
    assert shared_prefix_off(Config(), two, model) is None  # DDP: tests/distributed
    cfg = Config()
    cfg.distributed.backend = "fsdp"
    assert shared_prefix_off(cfg, two, model) is None  # FSDP2: tests/distributed/test_fsdp_rl
    cfg.distributed.backend = "deepspeed"
    assert shared_prefix_off(cfg, two, model) == "not yet with distributed.backend deepspeed"
    enable_gradient_checkpointing(model)
    assert "checkpointing" in str(can_share_prefix(model))
    assert "checkpointing" in str(shared_prefix_off(Config(), one, model))
    t = dataclasses.replace(_tensors(), shared_prefix=False)
    assert t.share(slice(0, 6)) is None


def test_token_budget_counts_each_shared_prompt_once() -> None:
    """Rows 0-2: a 3-token prompt, 1-4 completion tokens; rows 3-4: 6-token prompt; row 5:
    2-token prompt. T = 4 completion columns, so the rows are 7, 7, 7, 10, 10, 6 wide after
    their own pad cut. A micro-batch feeds runs x (width - 4) + rows x 4 tokens."""
    from moepost.recipes.rl_passes import plan_step_micro_batches

    t, cfg = _tensors(), Config()

    def plan(budget: int) -> list[tuple[int, int]]:
        cfg.train.micro_batch_tokens = budget
        return [(s.start, s.stop) for s in plan_step_micro_batches(t, cfg)]

    # 20: rows 0-2 feed 3 + 3 x 4 = 15; adding row 3 (a second run, width 10) would feed
    # 2 x 6 + 4 x 4 = 28. Rows 3-4 feed 6 + 8 = 14; adding row 5: 2 x 6 + 3 x 4 = 24.
    assert plan(20) == [(0, 3), (3, 5), (5, 6)]
    # 30: rows 0-3 feed 28; adding row 4 gives 2 x 6 + 5 x 4 = 32. Rows 4-5: 2 x 6 + 8 = 20.
    assert plan(30) == [(0, 4), (4, 6)]
    assert plan(5) == [(i, i + 1) for i in range(6)]  # every row alone is over the budget
    t = dataclasses.replace(
        t, shared_prefix=False
    )  # padded cost, rows x widest: 3 x 7 = 21, then 3 x 10 = 30
    assert plan(30) == [(0, 3), (3, 6)]


def test_shared_prefix_under_lora_and_its_reference_pass(tiny_model: Path) -> None:
    """A PEFT model (adapters on attention and experts): the policy pass and the reference pass
    (adapters disabled) give the padded log-probs, and LoRA gradients match."""
    from moepost.components.model.lora import apply_lora
    from moepost.config.schema import LoraConfig
    from moepost.recipes.rl_passes import logprob_pass

    torch.manual_seed(0)
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(target_experts=True)
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters change the outputs
            param.data.normal_(0.0, 0.05)
    assert can_share_prefix(model) is None
    cfg = Config()
    cfg.train.micro_batch_size = 6
    t = _tensors()
    mask = t.completion_mask.bool()
    passes = {}
    for shared in (False, True):
        t = dataclasses.replace(t, shared_prefix=shared)
        passes[shared] = (
            logprob_pass(model, t, cfg),
            logprob_pass(model, t, cfg, disable_adapter=True),
        )
    for got, want in zip(passes[True], passes[False], strict=True):
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert (passes[False][0][mask] - passes[False][1][mask]).abs().max() > 1e-3  # adapters act
    grads = []
    for shared in (False, True):
        t = dataclasses.replace(t, shared_prefix=shared)
        model.zero_grad()
        logits = completion_logits(model, t, slice(0, 6), t.share(slice(0, 6)))
        picked = logits.log_softmax(-1).gather(-1, t.completion_ids[..., None])[..., 0]
        (picked * t.completion_mask).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert any("experts" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_gspo_sequence_metrics_do_not_depend_on_the_micro_batch_split(tiny_model: Path) -> None:
    """clip_frac / ratio_mean of GSPO are shares of sequences: micro-batches are weighted by
    their sequences, not their tokens, so any split of the rows logs the same values."""
    from moepost.components.moe.router_setup import router_setup
    from moepost.recipes.rl_update import policy_update

    cfg = Config()  # gspo, with the preset's values filled in as config loading does
    cfg.rl.clip_eps_low, cfg.rl.clip_eps_high, cfg.rl.kl_coef = 3e-4, 4e-4, 0.0
    cfg.rl.loss_aggregation = "seq_mean_token_mean"
    resolve_rl_presets(cfg)
    g = torch.Generator().manual_seed(5)
    logged = []
    for split in ([slice(0, 2), slice(2, 6)], [slice(0, 1), slice(1, 5), slice(5, 6)]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model)
        g.manual_seed(5)
        advantages = torch.randn(6, generator=g)
        # old log-probs away from the current ones: some sequences clip, some do not
        old = -4.0 + 1.5 * torch.randn((6, 4), generator=g)
        t = dataclasses.replace(
            _tensors(), advantages=advantages, old_logprobs=old, micro_batches=split
        )
        logged.append(
            policy_update(model, t, cfg, router_setup(model, cfg.moe), update_index=0).metrics
        )
    assert 0.0 < logged[0]["clip_frac"] < 1.0, logged[0]["clip_frac"]  # the check is not vacuous
    for key in ("clip_frac", "ratio_mean", "loss", "kl"):
        if key in logged[0]:
            assert logged[1][key] == pytest.approx(logged[0][key], rel=1e-5, abs=1e-7), key
