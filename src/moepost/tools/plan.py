"""`moepost plan`: per-device memory estimate for a run config, from the model's config.json only.

Parameter counts are exact (`param_count`: the model built on the meta device, with LoRA applied
and routers frozen the way the run would). Activation and logits figures are rough (+-50%):
they count the tensors a decoder layer keeps for backward, not allocator fragmentation or
temporary buffers.
"""

from __future__ import annotations

from typing import Any

import torch

from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.micro_batches import fullest_micro_batch_rows
from moepost.tools.param_count import (
    ParamCounts,
    as_pretrained_config,
    config_value,
    count_parameters,
    model_dims,
    read_model_config,
    weight_dtype,
)
from moepost.tools.plan_memory import (
    head_not_chunked,
    ignored_settings,
    model_state_memory,
    trainer_refusals,
)

GIB = 1024**3
LOGPROB_CHUNK = 1024  # token_logprobs' default chunk over T


def _kv_elements_per_token(config: Any, seq_len: int) -> int:
    """K and V elements one row keeps for `seq_len` tokens, summed over the attention layers."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    if (
        config_value(config, "kv_lora_rank") is not None
    ):  # MLA: the HF cache holds decompressed K and V
        per_token = heads * (
            int(config.qk_nope_head_dim) + int(config.qk_rope_head_dim) + int(config.v_head_dim)
        )
    else:
        per_token = 2 * model_dims(config)["kv_dim"]
    types = config_value(config, "layer_types", default=None) or ["full_attention"] * layers
    window = int(config_value(config, "sliding_window", default=seq_len) or seq_len)
    total = 0
    for kind in types:
        if kind == "full_attention":
            total += per_token * seq_len
        elif kind == "sliding_attention":
            total += per_token * min(seq_len, window)
        # linear-attention / recurrent layers keep a fixed-size state: negligible here
    return total


def _activation_elements_per_token(config: Any, counts: ParamCounts) -> tuple[int, int]:
    """(elements one decoder layer keeps for backward per token, elements of its input)."""
    d = model_dims(config)
    h = d["hidden"]
    attn = 2 * h + 2 * d["q_dim"] + 2 * d["kv_dim"]  # norm in, residual, q, k, v, attn out
    if counts.num_moe_layers:
        # each of the K copies of a token keeps its input, gate/up/act outputs and expert output
        mlp = 2 * h + counts.num_experts + counts.top_k * (2 * h + 3 * d["moe_inter"])
        mlp += 3 * d["shared_inter"] + h if d["shared_inter"] else 0
    else:
        mlp = 2 * h + 3 * d["inter"] + h
    return attn + mlp, h


def _lengths(cfg: Config) -> dict[str, int]:
    """Rows and tokens of one training micro-batch and of one generation chunk.

    Under `train.micro_batch_tokens` the worst micro-batch is as many full-length rows as fit
    the budget, or one row when a row alone is longer."""
    gen = cfg.generation
    seq = cfg.data.max_seq_length
    if cfg.stage == "rl":
        seq = cfg.data.max_prompt_length + gen.max_new_tokens
    budget = cfg.train.micro_batch_tokens
    rows = fullest_micro_batch_rows(seq, size=cfg.train.micro_batch_size, token_budget=budget)
    if cfg.stage == "sft":
        return {"rows": rows, "seq": seq, "logit_positions": seq, "gen_rows": 0, "gen_seq": 0}
    gen_rows = gen.micro_batch_size or cfg.train.prompts_per_step * gen.num_samples_per_prompt
    return {
        "rows": rows,
        "seq": seq,
        "logit_positions": gen.max_new_tokens + 1,  # logits_to_keep = T + 1
        "gen_rows": gen_rows,
        "gen_seq": seq,
    }


def estimate_memory(
    model_config: dict[str, Any] | Any,
    cfg: Config,
    gpus: int,
    *,
    dtype: torch.dtype | None = None,
    counts: ParamCounts | None = None,
) -> dict[str, float]:
    """Per-device memory estimate of the run `cfg` describes, in bytes (counts for `params_*`).

    model_config: config.json as a dict or a transformers config. dtype: the weights' dtype
    (default: model.dtype, auto meaning bfloat16). Peak = weights + gathered layers + optimizer
    states + master weights + reference + max(training: gradients + DDP buckets + activations +
    logits, generation: KV cache); the per-backend model-state formulas are in
    `tools.plan_memory`. `offloaded_cpu_bytes`: CPU RAM per rank (DeepSpeed offload).
    """
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    config = as_pretrained_config(model_config)
    dtype = weight_dtype(cfg, dtype)
    counts = counts or count_parameters(config, cfg, dtype)
    bytes_per = torch.empty(0, dtype=dtype).element_size()
    out: dict[str, float] = {
        "gpus": float(gpus),
        "params_total": float(counts.total),
        "params_experts": float(counts.experts),
        "params_active": float(counts.active),
        "params_trainable": float(counts.trainable),
        "moe_layers": float(counts.num_moe_layers),
        "num_experts": float(counts.num_experts),
        "top_k": float(counts.top_k),
    }
    out.update(model_state_memory(config, cfg, counts, gpus, bytes_per))
    if cfg.stage == "rl" and cfg.model.reference_gpu_ids is not None:
        # the reference sits on its own GPU (single-process runs only)
        out["reference_device_bytes"], out["reference_bytes"] = out["reference_bytes"], 0.0
    out.update(_transient(config, cfg, counts, bytes_per, gpus))
    static_keys = ("weights", "gathered_layer", "optimizer", "master_weights", "reference")
    static = sum(out[f"{key}_bytes"] for key in static_keys)
    training = (
        out["grads_bytes"]
        + out["grad_buckets_bytes"]
        + out["activations_bytes"]
        + out["logits_bytes"]
    )
    out["total_bytes"] = static + max(training, out["kv_cache_bytes"])
    return out


def _transient(
    config: Any, cfg: Config, counts: ParamCounts, bytes_per: int, gpus: int
) -> dict[str, float]:
    """Activations, logits and KV cache: the memory that comes and goes within a step."""
    n = _lengths(cfg)
    layer_elems, input_elems = _activation_elements_per_token(config, counts)
    layers = int(config.num_hidden_layers)
    tokens = n["rows"] * n["seq"]
    full = tokens * layers * layer_elems * bytes_per
    # checkpointing keeps only each layer's input, and recomputes one layer at a time
    checkpointed = tokens * (layers * input_elems + layer_elems) * bytes_per
    vocab = int(config.vocab_size)
    logit_tokens = n["rows"] * n["logit_positions"]
    chunk = n["rows"] * min(LOGPROB_CHUNK, n["logit_positions"])
    # full logits and their gradient in the model dtype, plus one float32 chunk and its softmax
    unchunked = logit_tokens * vocab * 2 * bytes_per + chunk * vocab * 4 * 2
    # chunked head: one [chunk_rows, V] float32 block and its softmax gradient, no [B, T, V]
    head_rows = min(cfg.train.lm_head_chunk_rows, logit_tokens)
    chunked = head_rows * vocab * 4 * 2
    head_off = head_not_chunked(config, cfg, gpus)
    logits = unchunked if head_off else chunked
    kv = 0.0
    if n["gen_rows"] and cfg.generation.backend == "hf":
        kv = n["gen_rows"] * _kv_elements_per_token(config, n["gen_seq"]) * bytes_per
        kv += n["gen_rows"] * vocab * 4  # last-position logits of every row, float32
    gc = cfg.model.gradient_checkpointing
    return {
        "activations_bytes": float(checkpointed if gc else full),
        "activations_other_bytes": float(full if gc else checkpointed),
        "logits_bytes": float(logits),
        "logits_unchunked_bytes": float(unchunked),
        "logits_chunked": 0.0 if head_off else 1.0,
        "kv_cache_bytes": float(kv),
        "micro_batch_tokens": float(tokens),
        "generation_rows": float(n["gen_rows"]),
    }


def _size(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def gib(n: float) -> str:
    """Bytes as GiB (MiB below 0.01 GiB)."""
    if n == 0:
        return "0"
    return f"{n / GIB:.2f} GiB" if n >= GIB / 100 else f"{n / 1024**2:.1f} MiB"


def format_plan(est: dict[str, float], cfg: Config, model_type: str) -> list[str]:
    """The lines `moepost plan` prints."""
    gpus, dist = int(est["gpus"]), cfg.distributed
    setup: str = "single device" if gpus == 1 else dist.backend
    if gpus > 1 and dist.backend == "deepspeed":
        setup += f" ZeRO-{dist.zero_stage}"
    elif gpus > 1 and dist.backend == "fsdp":
        setup += f" {dist.fsdp_sharding_strategy}"
    dtype = str(weight_dtype(cfg)).removeprefix("torch.") + (
        ", + float32 LoRA" if cfg.model.lora.enabled else ""
    )
    gc = "gradient checkpointing" if cfg.model.gradient_checkpointing else "no checkpointing"
    rows = {
        "weights_bytes": f"weights ({dtype})",
        "gathered_layer_bytes": "  gathered (unsharded) weights while a layer runs",
        "grads_bytes": "gradients (trainable)",
        "grad_buckets_bytes": "  DDP reducer buckets (a gradient copy)",
        "optimizer_bytes": f"AdamW states ({est['optimizer_bytes_per_param']:g} B / trainable)",
        "master_weights_bytes": "float32 master weights",
        "reference_bytes": "reference model (kl_coef > 0, whole on every rank)",
        "activations_bytes": f"activations ({int(est['micro_batch_tokens'])} tokens, {gc})",
        "logits_bytes": (
            f"logits (chunked LM head, {cfg.train.lm_head_chunk_rows} rows)"
            if est["logits_chunked"]
            else "logits (full [B, T, V], chunked float32 log-softmax)"
        ),
        "kv_cache_bytes": f"KV cache ({int(est['generation_rows'])} generation rows)",
        "total_bytes": "peak estimate",
    }
    moe = "dense (no MoE layers)"
    if est["moe_layers"]:
        moe = f"{int(est['moe_layers'])} MoE layers, top-{int(est['top_k'])} of "
        moe += f"{int(est['num_experts'])} experts"
    share = 100 * est["params_active"] / max(est["params_total"], 1)
    lines = [
        f"model {model_type}: {moe}; {_size(est['params_total'])} parameters, "
        f"{_size(est['params_active'])} active per token ({share:.1f}%), "
        f"{_size(est['params_trainable'])} trainable",
        f"per device, {gpus} GPU(s), {setup}, stage {cfg.stage}:",
    ]
    width = max(len(label) for label in rows.values()) + 2
    shown = [k for k in rows if est[k] or k in ("weights_bytes", "total_bytes")]
    lines += [f"  {rows[k]:<{width}}{gib(est[k]):>12}" for k in shown]
    cpu = "CPU RAM per rank (DeepSpeed offload)"
    lines.append(f"  {cpu:<{width}}{gib(est['offloaded_cpu_bytes']):>12}")
    if est.get("reference_device_bytes"):
        lines.append(
            f"  reference model on model.reference_gpu_ids: {gib(est['reference_device_bytes'])}"
        )
    other = "without" if cfg.model.gradient_checkpointing else "with"
    lines.append(
        f"  (activations {other} gradient checkpointing: {gib(est['activations_other_bytes'])}; "
        f"logits without chunking: {gib(est['logits_unchunked_bytes'])})"
    )
    training = sum(
        est[k] for k in ("grads_bytes", "grad_buckets_bytes", "activations_bytes", "logits_bytes")
    )
    if est["kv_cache_bytes"] > training:
        lines.append(
            f"  generation holds the peak: {int(est['generation_rows'])} rows at once; "
            "generation.micro_batch_size sets the rows per generation chunk"
        )
    if cfg.stage == "rl" and cfg.generation.backend == "vllm":
        lines.append(
            "  vLLM reserves generation.vllm_gpu_memory_utilization = "
            f"{cfg.generation.vllm_gpu_memory_utilization} of the device for its weights and KV"
        )
    return lines


def plan_warnings(
    est: dict[str, float], cfg: Config, gpus: int, gpu_memory: float | None
) -> list[str]:
    """WARN lines: what the trainer refuses at `gpus` ranks, keys it would ignore, and a peak
    over `gpu_memory` bytes (None: no limit given)."""
    lines = [
        f"WARN: the trainer refuses this at {gpus} rank(s): {msg}"
        for msg in trainer_refusals(cfg, gpus)
    ]
    lines += [f"WARN: {msg}" for msg in ignored_settings(cfg, gpus)]
    if gpu_memory is not None and est["total_bytes"] > gpu_memory:
        lines.append(
            f"WARN: peak estimate {gib(est['total_bytes'])} per rank does not fit "
            f"{gib(gpu_memory)} of GPU memory"
        )
    return lines


def run_plan(
    config_path: str, overrides: list[str], *, gpus: int = 1, gpu_memory_gb: float | None = None
) -> int:
    """`moepost plan CONFIG [--gpus N] [--gpu-memory-gb G]`: print the per-rank memory
    estimate and WARN lines; returns 0 (the WARN lines carry the verdict)."""
    from moepost.config.load import load_config

    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    if gpu_memory_gb is not None and gpu_memory_gb <= 0:
        raise UserError(f"--gpu-memory-gb must be > 0, got {gpu_memory_gb}")
    cfg = load_config(config_path, overrides)
    config = read_model_config(cfg)
    est = estimate_memory(config, cfg, gpus)
    for line in format_plan(est, cfg, str(getattr(config, "model_type", "?"))):
        print(line)
    limit = None if gpu_memory_gb is None else gpu_memory_gb * GIB
    if limit is None and torch.cuda.is_available():
        limit = float(torch.cuda.get_device_properties(0).total_memory)
        verdict = "fits" if est["total_bytes"] <= limit else "does NOT fit"
        print(f"  {verdict} in this machine's GPU 0 ({gib(limit)})")
    for line in plan_warnings(est, cfg, gpus, limit):
        print(line)
    return 0
