"""Sign / range checks of every numeric config key (one table, checked before anything loads).

Each int / float field of `schema.Config` appears in `RANGES` or in `UNBOUNDED` (a test keeps
it that way), so a new numeric key cannot be added without deciding its valid range. `None`
(where the schema allows it) always passes; NaN and infinity never do.
"""

from __future__ import annotations

import math
from typing import Any

from moepost.config.schema import Config
from moepost.errors import UserError

# key -> (low, low_inclusive, high, high_inclusive); None: no bound on that side.
Range = tuple[float | None, bool, float | None, bool]
_POS = (0, False, None, False)  # > 0
_NONNEG = (0, True, None, False)  # >= 0
_ONE = (1, True, None, False)  # >= 1
_UNIT = (0, True, 1, True)  # [0, 1]
_UNIT_OPEN = (0, True, 1, False)  # [0, 1)

RANGES: dict[str, Range] = {
    "model.policy_gpu_ids": _NONNEG,  # each id
    "model.reference_gpu_ids": _NONNEG,
    "model.lora.r": _ONE,
    "model.lora.alpha": _POS,
    "model.lora.dropout": _UNIT_OPEN,
    "data.max_prompt_length": _ONE,
    "data.max_seq_length": _ONE,
    "data.test_size": _NONNEG,
    "data.max_train_samples": _ONE,
    "data.max_eval_samples": _ONE,
    "data.shuffle_buffer_size": _NONNEG,  # 0: no shuffle buffer (file order within a pass)
    "data.max_in_memory_bytes": _POS,  # null: no cap
    "generation.num_samples_per_prompt": _ONE,
    "generation.max_new_tokens": _ONE,
    "generation.temperature": _NONNEG,
    "generation.top_p": (0, False, 1, True),
    "generation.top_k": _NONNEG,
    "generation.micro_batch_size": _NONNEG,
    "generation.eval_temperature": _NONNEG,
    "generation.eval_max_new_tokens": _ONE,
    "generation.vllm_gpu_memory_utilization": (0, False, 1, True),
    "rl.clip_eps_low": _NONNEG,
    "rl.clip_eps_high": _NONNEG,
    "rl.kl_coef": _NONNEG,
    "rl.num_policy_updates": _ONE,
    "rl.max_dynamic_sampling_rounds": _NONNEG,
    "rl.overlong_cache_length": _NONNEG,
    "reward.timeout_s": _POS,  # null: no limit
    "moe.router_aux_loss_coef": _NONNEG,
    "moe.router_z_loss_coef": _NONNEG,
    "moe.collapse_entropy_threshold": _UNIT,
    "moe.collapse_dead_threshold": _NONNEG,
    "optim.learning_rate": _NONNEG,
    "optim.warmup_ratio": _UNIT_OPEN,
    "optim.warmup_steps": _NONNEG,
    "optim.weight_decay": _NONNEG,
    "optim.max_grad_norm": _NONNEG,  # 0 (or null): no clipping
    "optim.betas": _UNIT_OPEN,  # each of the two
    "optim.eps": _POS,
    "train.max_steps": _NONNEG,  # 0: from num_epochs (SFT) / one pass over the prompts (RL)
    "train.num_epochs": _POS,
    "train.prompts_per_step": _ONE,
    "train.batch_size": _ONE,
    "train.micro_batch_size": _ONE,
    "train.micro_batch_tokens": _NONNEG,
    "train.gradient_accumulation_steps": _ONE,
    "train.lm_head_chunk_rows": _NONNEG,  # 0: full logits
    "train.eval_every": _NONNEG,
    "train.save_every": _NONNEG,
    "train.seed": (0, True, 2**32 - 1, True),  # numpy's seed range
    "stability.adaptive_grad_clip.ema_beta": _UNIT_OPEN,
    "stability.adaptive_grad_clip.coef": _POS,
    "stability.adaptive_grad_clip.warmup_steps": _NONNEG,
    "stability.grad_normalization.alpha": _UNIT,
    "stability.logits_clip": _POS,
    "stability.logprob_min": (None, False, 0, False),  # a log-prob floor: negative
    "stability.max_consecutive_skips": _ONE,
    "noise_injection.sigma_start": _NONNEG,
    "noise_injection.sigma_end": _NONNEG,
    "noise_injection.num_stages": _ONE,
    "noise_injection.seed": (0, True, 2**32 - 1, True),
    "distributed.zero_stage": (0, True, 3, True),
    "distributed.expert_parallel_size": _ONE,
    "logging.log_every": _ONE,
    "logging.keep_last_checkpoints": _NONNEG,
    "misc.num_threads": _ONE,
}
# Numeric keys with no sign / range constraint of their own.
UNBOUNDED: frozenset[str] = frozenset()


def _describe(r: Range) -> str:
    low, low_inc, high, high_inc = r
    if low is not None and high is not None:
        return f"in {'[' if low_inc else '('}{low:g}, {high:g}{']' if high_inc else ')'}"
    if low is not None:
        return f"{'>=' if low_inc else '>'} {low:g}"
    return f"{'<=' if high_inc else '<'} {high:g}"


def _inside(value: float, r: Range) -> bool:
    low, low_inc, high, high_inc = r
    if not math.isfinite(value):
        return False
    if low is not None and (value < low or (value == low and not low_inc)):
        return False
    return high is None or value < high or (value == high and high_inc)


def _lookup(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_ranges(cfg: Config) -> None:
    """One-line `UserError` naming the first key whose value is out of its range."""
    for key, r in RANGES.items():
        value = _lookup(cfg, key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not _inside(float(v), r):
                raise UserError(f"{key} = {value!r}: must be {_describe(r)}")
