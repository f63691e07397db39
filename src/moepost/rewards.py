"""Public reward functions: ``from moepost.rewards import gsm8k``.

Each follows TRL's convention (keyword arguments, one float or None per completion), e.g.
``gsm8k(prompts=prompts, completions=completions, answer=answers, method="strict")``, so they
also work as ``reward_funcs`` of TRL's own GRPOTrainer, with string or message-list completions.
"""

from __future__ import annotations

from moepost.components.rewards import (
    BUILTIN_REWARDS,
    RewardFunction,
    RewardScores,
    exact_match,
    extract_gsm8k_answer,
    format_reward,
    gsm8k,
    length_penalty,
    math_verify_reward,
    metricx_reward,
    overlong_penalty,
    raise_if_all_none,
    resolve_reward,
    resolve_rewards,
    reward_metrics,
    reward_state,
    score_rewards,
    xcomet_reward,
)
from moepost.components.rewards.translation_qe import XCOMET, MetricXQE

__all__ = [
    "BUILTIN_REWARDS",
    "XCOMET",
    "MetricXQE",
    "RewardFunction",
    "RewardScores",
    "exact_match",
    "extract_gsm8k_answer",
    "format_reward",
    "gsm8k",
    "length_penalty",
    "math_verify_reward",
    "metricx_reward",
    "overlong_penalty",
    "raise_if_all_none",
    "resolve_reward",
    "resolve_rewards",
    "reward_metrics",
    "reward_state",
    "score_rewards",
    "xcomet_reward",
]
