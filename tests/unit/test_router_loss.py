"""`router_aux_loss`: the stateless aux (+ z) loss call, hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from moepost.components.moe.router_loss import GlobalRouteCounts, router_aux_loss


def test_uniform_logits_give_k_and_z_is_log_e_squared() -> None:
    logits = torch.zeros(1, 4, 2)  # L=1, N=4 tokens, E=2: P_e = 1/2
    # Top-1 picks expert 0 for every token: f_0 = 1, so aux = E * f_0 * P_0 = 2 * 1 * 0.5 = 1.
    mask = torch.ones(4, dtype=torch.bool)
    total, metrics = router_aux_loss(logits, mask, top_k=1, aux_coef=0.1, z_coef=0.01)
    assert metrics["aux_loss"] == pytest.approx(1.0)
    assert metrics["z_loss"] == pytest.approx(math.log(2) ** 2)
    assert float(total) == pytest.approx(0.1 * 1.0 + 0.01 * math.log(2) ** 2)


def test_global_counts_replace_the_local_f() -> None:
    logits = torch.zeros(1, 4, 2, requires_grad=True)
    mask = torch.ones(4, dtype=torch.bool)
    # The step's counts say half the slots went to each expert: aux = 2 * (0.5*0.5 + 0.5*0.5).
    counts = GlobalRouteCounts(torch.tensor([4, 4]), num_tokens=8.0)
    total, metrics = router_aux_loss(
        logits, mask, top_k=1, aux_coef=1.0, z_coef=0.0, global_counts=counts
    )
    assert metrics["aux_loss"] == pytest.approx(1.0) and "z_loss" not in metrics
    total.backward()
    assert logits.grad is not None
