"""Pure tensor math (torch only): losses, advantages, KL, aggregation, MoE statistics,
gradient transforms and noise schedules. Every function documents its tensor shapes."""

from moepost.algorithms.advantages import group_advantages, rewards_to_tensor
from moepost.algorithms.aggregate import aggregate
from moepost.algorithms.kl import kl_penalty
from moepost.algorithms.logprobs import (
    entropy_from_logits,
    nonfinite_rows,
    selective_log_softmax,
    token_logprobs,
)
from moepost.algorithms.moe import (
    expert_load_stats,
    load_balancing_loss,
    load_balancing_loss_global,
    load_stats_from_counts,
    router_z_loss,
    routing_counts,
    routing_drift,
)
from moepost.algorithms.noise import aqn_sigma, inject_noise_, restore_
from moepost.algorithms.policy_loss import ALGORITHM_PRESETS, AlgorithmPreset, policy_loss
from moepost.algorithms.sft_loss import sft_loss, shift_labels
from moepost.algorithms.sr_adamw import StochasticRoundingAdamW
from moepost.algorithms.stability import (
    GlobalAdaptiveClipper,
    PerTensorAdaptiveClipper,
    centralize_gradients,
    clip_by_global_norm,
    global_grad_norm,
    normalize_gradients,
    stochastic_round_to_bf16,
)

entropy = entropy_from_logits

__all__ = [
    "ALGORITHM_PRESETS",
    "AlgorithmPreset",
    "GlobalAdaptiveClipper",
    "PerTensorAdaptiveClipper",
    "StochasticRoundingAdamW",
    "aggregate",
    "aqn_sigma",
    "centralize_gradients",
    "clip_by_global_norm",
    "entropy",
    "entropy_from_logits",
    "expert_load_stats",
    "global_grad_norm",
    "group_advantages",
    "inject_noise_",
    "kl_penalty",
    "load_balancing_loss",
    "load_balancing_loss_global",
    "load_stats_from_counts",
    "nonfinite_rows",
    "normalize_gradients",
    "policy_loss",
    "restore_",
    "rewards_to_tensor",
    "router_z_loss",
    "routing_counts",
    "routing_drift",
    "selective_log_softmax",
    "sft_loss",
    "shift_labels",
    "stochastic_round_to_bf16",
    "token_logprobs",
]
