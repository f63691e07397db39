"""The router policy as explicit values: `RouterSetup` and its calls without hidden state, and
the per-batch `BatchRoutes` (what replaced the stateful RouterTools)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from moepost.components.moe.expert_monitor import ExpertMonitor
from moepost.components.moe.router_setup import (
    add_route_counts,
    aux_loss,
    capture_router,
    describe_router,
    record_load,
    reduce_route_counts,
    route_counts,
    router_setup,
    select_tokens,
)
from moepost.components.rollout.batch_routes import BatchRoutes, batch_routes, slice_key
from moepost.config.schema import MoEConfig
from moepost.tools.tiny_model import build_tiny_model

IDS = torch.tensor([[5, 17, 30, 42, 8, 9], [60, 3, 11, 12, 13, 14]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("values"), "qwen3_moe", hidden_size=32)


def _model(model_dir: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_setup_is_a_frozen_value_read_from_config_and_checkpoint(model_dir: Path) -> None:
    model = _model(model_dir)
    setup = router_setup(model, MoEConfig(router_z_loss_coef=0.5, freeze_router=True))
    assert (setup.num_layers, setup.num_experts, setup.top_k) == (2, 4, 2)
    assert setup.aux_coef == pytest.approx(0.001)  # the checkpoint's router_aux_loss_coef
    assert setup.frozen == 2 and not setup.layers[0].weight.requires_grad
    assert setup.active and setup.aux_enabled and not setup.global_scope
    assert "aux coef 0.001" in describe_router(setup) and "router frozen (2 tensors)" in (
        describe_router(setup)
    )
    with pytest.raises(AttributeError):
        setup.aux_coef = 1.0  # type: ignore[misc]


def test_aux_loss_has_no_side_effects_and_load_goes_only_where_told(model_dir: Path) -> None:
    model = _model(model_dir)
    setup = router_setup(model, MoEConfig(router_aux_loss_coef=0.1))
    monitor = ExpertMonitor(setup.num_experts, MoEConfig())
    mask = torch.ones(IDS.numel(), dtype=torch.bool)
    with capture_router(setup) as cap:
        model(input_ids=IDS)
    first, m1 = aux_loss(setup, cap, mask, share=1.0)
    second, m2 = aux_loss(setup, cap, mask, share=0.25)
    assert first is not None and second is not None
    torch.testing.assert_close(second, first * 0.25, rtol=0, atol=0)
    assert m1 == m2 and m1["aux_loss"] >= 2.0 - 1e-6  # K=2 at perfect balance
    assert monitor.flush(1) == ({}, None)  # aux_loss recorded nothing
    record_load(monitor, setup, cap, mask)
    metrics, row = monitor.flush(2)
    assert row is not None and row["step"] == 2 and "moe/load_entropy" in metrics


def test_global_counts_split_over_micro_batches_and_ranks(model_dir: Path) -> None:
    """Counts of two micro-batches add up to the counts of one; the micro-batches' aux losses,
    each scaled by its token share and given the step's counts, add up to the one-batch loss."""
    model = _model(model_dir)
    setup = router_setup(model, MoEConfig(router_aux_loss_coef=0.1, aux_loss_scope="global"))
    assert setup.global_scope
    caps = []
    for rows in (IDS, IDS[:1], IDS[1:]):
        with capture_router(setup) as cap:
            model(input_ids=rows)
        caps.append(cap)
    whole, half_a, half_b = (
        route_counts(setup, c, torch.ones(c.indices().shape[1], dtype=torch.bool)) for c in caps
    )
    assert whole is not None and whole.num_tokens == 12.0
    summed = add_route_counts(half_a, half_b)
    assert summed is not None and summed.num_tokens == 12.0
    torch.testing.assert_close(summed.counts, whole.counts, rtol=0, atol=0)
    assert add_route_counts(None, half_a) is half_a
    twice = reduce_route_counts(whole, lambda x: 2 * x)  # two ranks with the same rows
    assert twice is not None and twice.num_tokens == 24.0
    torch.testing.assert_close(twice.counts, 2 * whole.counts)
    six = torch.ones(6, dtype=torch.bool)
    one, _ = aux_loss(setup, caps[0], torch.ones(12, dtype=torch.bool), share=1.0, counts=whole)
    parts = [aux_loss(setup, c, six, share=0.5, counts=whole)[0] for c in caps[1:]]
    assert one is not None and all(p is not None for p in parts)
    torch.testing.assert_close(sum(parts), one, rtol=1e-6, atol=1e-7)  # type: ignore[arg-type]


def test_batch_routes_layout_replay_and_drift_references(model_dir: Path) -> None:
    model = _model(model_dir)
    setup = router_setup(model, MoEConfig(routing_replay="r3"))
    # two rows: prompts of 2 and 3 tokens, routes for prompt + completion (3 and 4 tokens)
    rows = [torch.full((2, 3, 2), 1), torch.full((2, 4, 2), 2)]
    routes = batch_routes(setup, rows, [[5, 6], [7, 8, 9]], width=6, p_len=4)
    assert routes.rollout is not None and routes.rollout.shape == (2, 2, 6, 2)
    assert routes.rollout[0, 0, :, 0].tolist() == [-1, -1, 1, 1, 1, -1]  # starts at 4 - 2
    assert routes.rollout[0, 1, :, 0].tolist() == [-1, 2, 2, 2, 2, -1]
    replay = routes.replay_for(slice(0, 2), slice(1, None))
    assert replay is not None
    expected = select_tokens(routes.rollout[:, 0:2], slice(1, None))  # [L, 2*5, K]
    torch.testing.assert_close(replay.per_layer[0][0], expected[0], rtol=0, atol=0)

    r2 = BatchRoutes("r2")
    assert r2.replay_for(slice(0, 2)) is None  # nothing recorded yet: the router decides
    recorded = torch.zeros(2, 12, 2, dtype=torch.long)
    with_old = r2.with_recorded({slice_key(slice(0, 2)): recorded})
    assert r2.recorded == {} and with_old.replay_for(slice(0, 1)) is None  # another slice
    replay = with_old.replay_for(slice(0, 2))
    assert replay is not None and torch.equal(replay.per_layer[0][0], recorded[0])
    assert BatchRoutes("none", routes.rollout).replay_for(slice(0, 2)) is None
    nxt = with_old.with_previous({(0, 2): recorded})
    assert with_old.previous == {} and nxt.previous[(0, 2)] is recorded
