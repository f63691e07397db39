"""Per-rank memory of the model state under each training backend, for `moepost plan`.

Notation, per rank: W the world size, P the model's parameters, T the trainable ones (all of P
in full fine-tuning, the adapters under LoRA), b the bytes of a weight (2 in bf16), g the bytes
of a trainable parameter (b, or 4 for peft's float32 adapters), L the largest decoder layer's
parameters, R the root's (embeddings + lm_head + final norm). "fp32 states" means AdamW's two
moments in float32 (8 B per trainable parameter) -- with stochastic rounding,
`optim.master_weights: fp32` or DeepSpeed; else torch AdamW keeps them in the parameter dtype
(2 g). Master weights (4 T) exist with bf16/fp16 weights under `master_weights: fp32` or
DeepSpeed.

  ddp               weights P b, gradients T g, DDP's reducer buckets T g (a copy of the
                    gradients: `gradient_as_bucket_view` is off), moments, master -- all whole.
  fsdp FULL_SHARD   weights, gradients, moments, master all / W; while a layer runs FSDP2
                    holds it unsharded plus the next one it prefetches, and the root stays
                    gathered from forward to backward: gathered = (R + 2 L) b.
  fsdp SHARD_GRAD_OP  as FULL_SHARD, but no layer is resharded after forward: the whole model
                    is gathered during forward + backward: gathered = P b.
  fsdp HYBRID_SHARD as FULL_SHARD with W replaced by the ranks per node (at most 8).
  fsdp NO_SHARD     everything whole (FSDP2 on a shard dimension of 1), no reducer buckets.
  deepspeed ZeRO-s  fp32 master and moments / W from stage 1, gradients / W from stage 2,
                    weights / W at stage 3, which gathers the running layer plus its prefetch
                    (`stage3_prefetch_bucket_size`, 5e7 elements by default, at most a layer):
                    gathered = (L + min(L, 5e7)) b.
  offload_optimizer (DeepSpeed) master, moments and the fp32 gradient partition DeepSpeed's
                    CPU Adam steps on live in CPU RAM: CPU = (4 + 8 + 4) T / W (sharded from
                    stage 1). Other backends ignore the key (a WARN says so).
  offload_param     (ZeRO-3 only) the weight partitions live in CPU RAM: CPU += P b / W.
  reference (RL, rl.kl_coef > 0, full fine-tuning or an explicit reference under LoRA)
                    a frozen whole copy P b on every rank: no backend shards it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.tools.param_count import ParamCounts, config_value, model_dims

DS_PREFETCH_ELEMENTS = 50_000_000  # DeepSpeed's default stage3_prefetch_bucket_size
HYBRID_NODE_RANKS = 8  # HYBRID_SHARD plans one node as up to 8 ranks


def root_params(config: Any) -> int:
    """R: embeddings, lm_head (unless tied) and the final norm."""
    h, vocab = model_dims(config)["hidden"], int(config.vocab_size)
    tied = bool(config_value(config, "tie_word_embeddings", default=False))
    return vocab * h * (1 if tied else 2) + h


def shard_degree(cfg: Config, gpus: int) -> tuple[int, int, int, int]:
    """Divisors of (weights, gradients, optimizer states + master weights, CPU offload)."""
    if gpus <= 1:
        return 1, 1, 1, 1
    dist = cfg.distributed
    if dist.backend == "deepspeed":
        stage = dist.zero_stage
        opt = gpus if stage >= 1 else 1
        return (gpus if stage >= 3 else 1), (gpus if stage >= 2 else 1), opt, opt
    if dist.backend == "fsdp":
        strategy = dist.fsdp_sharding_strategy
        if strategy in ("FULL_SHARD", "SHARD_GRAD_OP"):
            return gpus, gpus, gpus, 1
        if strategy == "HYBRID_SHARD":
            node = min(gpus, HYBRID_NODE_RANKS)
            return node, node, node, 1
    return 1, 1, 1, 1  # DDP / NO_SHARD: every rank holds everything


def _gathered(config: Any, cfg: Config, counts: ParamCounts, gpus: int, b: int) -> float:
    """Bytes of unsharded weights held next to the shards while a layer runs."""
    if gpus <= 1:
        return 0.0
    dist, layer = cfg.distributed, counts.max_layer_params
    if dist.backend == "fsdp" and dist.fsdp_sharding_strategy == "SHARD_GRAD_OP":
        return float(counts.total * b)
    if dist.backend == "fsdp" and dist.fsdp_sharding_strategy != "NO_SHARD":
        return float((root_params(config) + 2 * layer) * b)
    if dist.backend == "deepspeed" and dist.zero_stage >= 3:
        return float((layer + min(layer, DS_PREFETCH_ELEMENTS)) * b)
    return 0.0


def model_state_memory(
    config: Any, cfg: Config, counts: ParamCounts, gpus: int, b: int
) -> dict[str, float]:
    """Per-rank bytes of weights, gradients, optimizer states, master weights and the
    reference model on the GPU, and what DeepSpeed offloads to CPU RAM (module docstring)."""
    dist = cfg.distributed
    deepspeed = dist.backend == "deepspeed" and gpus > 1
    fp32_states = cfg.optim.stochastic_rounding or cfg.optim.master_weights == "fp32" or deepspeed
    t, g_bytes = counts.trainable, counts.trainable_bytes
    moments = 2 * (4 * t if fp32_states else g_bytes)
    low_precision = g_bytes < 4 * t
    master = 4 * t if low_precision and (cfg.optim.master_weights == "fp32" or deepspeed) else 0
    s_w, s_g, s_o, s_cpu = shard_degree(cfg, gpus)
    ddp = gpus > 1 and dist.backend == "ddp"
    out = {
        "weights_bytes": counts.weights_bytes / s_w,
        "gathered_layer_bytes": _gathered(config, cfg, counts, gpus, b),
        "grads_bytes": g_bytes / s_g,
        "grad_buckets_bytes": float(g_bytes if ddp else 0),
        "optimizer_bytes": moments / s_o,
        "master_weights_bytes": master / s_o,
        "optimizer_bytes_per_param": moments / max(t, 1),
        "offloaded_cpu_bytes": 0.0,
        "reference_bytes": float(counts.total * b) if _separate_reference(cfg) else 0.0,
    }
    if deepspeed and dist.offload_optimizer:
        # DeepSpeed's CPU Adam: fp32 master, moments and gradient partition all in host RAM
        out["offloaded_cpu_bytes"] += (4 * t + 8 * t + 4 * t) / s_cpu
        out["optimizer_bytes"] = out["master_weights_bytes"] = 0.0
    if deepspeed and dist.offload_param:
        out["offloaded_cpu_bytes"] += out["weights_bytes"]
        out["weights_bytes"] = 0.0
    return out


def _separate_reference(cfg: Config) -> bool:
    """A second frozen model is loaded (`components.model.loading.load_reference`)."""
    if cfg.stage != "rl" or not cfg.rl.kl_coef:
        return False
    return not cfg.model.lora.enabled or cfg.model.reference_name_or_path is not None


_POST_HEAD_ATTRS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def head_not_chunked(config: Any, cfg: Config, gpus: int) -> str | None:
    """Why the LM head would run unchunked (full [B, T, V] logits), or None when
    `train.lm_head_chunk_rows` applies (`components.model.lm_head.chunked_head_off`)."""
    if cfg.train.lm_head_chunk_rows <= 0:
        return "train.lm_head_chunk_rows: 0"
    lora = cfg.model.lora
    if lora.enabled and "lm_head" in lora.target_modules:
        return "LoRA adapts the lm_head"
    dist = cfg.distributed
    if gpus > 1 and dist.backend == "deepspeed" and dist.zero_stage >= 3:
        return "ZeRO-3 puts parameter-fetching hooks on the lm_head"
    for attr, neutral in _POST_HEAD_ATTRS.items():
        if config_value(config, attr, default=neutral) not in (neutral, None):
            return f"the model changes the logits after its head ({attr})"
    return None


def trainer_refusals(cfg: Config, gpus: int) -> list[str]:
    """The one-line errors the trainer would stop with at `gpus` ranks (the trainer's own
    checks: `distributed.setup.check_supported`, `config.validate.check_world_size`,
    `components.model.placement.gpu_ids_device`)."""
    from moepost.components.model.placement import gpu_ids_device
    from moepost.config.validate import check_world_size
    from moepost.distributed.context import DistContext
    from moepost.distributed.setup import check_supported

    active = gpus > 1 or cfg.distributed.enabled
    ctx = DistContext(world_size=gpus, backend=cfg.distributed.backend, active=active)
    checks: list[Callable[[], object]] = [
        lambda: check_supported(cfg, ctx, resume=None),
        lambda: check_world_size(cfg, gpus),
    ]
    for key in ("policy_gpu_ids", "reference_gpu_ids"):
        ids = getattr(cfg.model, key, None)
        checks.append(
            partial(gpu_ids_device, ids, key=f"model.{key}", world_size=gpus, cuda_count=1 << 16)
        )
    out = []
    for check in checks:
        try:
            check()
        except UserError as err:
            out.append(str(err))
    return out


def ignored_settings(cfg: Config, gpus: int) -> list[str]:
    """Keys the run would accept but not act on at `gpus` ranks."""
    dist, out = cfg.distributed, []
    # Other backends refuse offload_optimizer at load (config/validate.py); one rank runs no engine.
    if dist.offload_optimizer and gpus <= 1:
        out.append(
            "distributed.offload_optimizer has no effect with one rank: only DeepSpeed "
            "offloads; the optimizer states stay on the GPU"
        )
    if gpus > 1 and not dist.enabled:
        out.append(
            "distributed.enabled is false: launched without torchrun the run uses one device"
        )
    return out
