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


def _shard_factors(cfg: Config, gpus: int) -> tuple[int, int, int]:
    """Divisors of (parameters, gradients, optimizer states) per device."""
    if gpus <= 1:
        return 1, 1, 1
    dist = cfg.distributed
    if dist.backend == "deepspeed":
        stage = dist.zero_stage
        return (gpus if stage >= 3 else 1), (gpus if stage >= 2 else 1), (gpus if stage >= 1 else 1)
    if dist.backend == "fsdp":
        strategy = dist.fsdp_sharding_strategy
        if strategy == "FULL_SHARD":
            return gpus, gpus, gpus
        if strategy == "HYBRID_SHARD":
            node = min(gpus, 8)  # full shard inside a node of up to 8 devices, replicate across
            return node, node, node
        if strategy == "SHARD_GRAD_OP":
            return 1, gpus, gpus
    return 1, 1, 1  # DDP / NO_SHARD: every device holds everything


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
    (default: model.dtype, auto meaning bfloat16). Peak = weights + optimizer states + master
    weights + reference + max(training: gradients + activations + logits, generation: KV cache).
    """
    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    config = as_pretrained_config(model_config)
    dtype = weight_dtype(cfg, dtype)
    counts = counts or count_parameters(config, cfg, dtype)
    bytes_per = torch.empty(0, dtype=dtype).element_size()
    shard_p, shard_g, shard_o = _shard_factors(cfg, gpus)
    deepspeed = cfg.distributed.backend == "deepspeed" and gpus > 1
    # torch AdamW keeps its moments in the parameter's dtype; the stochastic-rounding AdamW,
    # fp32 master weights and DeepSpeed's mixed-precision optimizer keep them in float32.
    fp32_states = cfg.optim.stochastic_rounding or cfg.optim.master_weights == "fp32" or deepspeed
    state_bytes = 2 * (4 * counts.trainable if fp32_states else counts.trainable_bytes)
    low_precision = counts.trainable_bytes < 4 * counts.trainable
    master = (
        4 * counts.trainable
        if low_precision and (cfg.optim.master_weights == "fp32" or deepspeed)
        else 0
    )
    out: dict[str, float] = {
        "gpus": float(gpus),
        "params_total": float(counts.total),
        "params_experts": float(counts.experts),
        "params_active": float(counts.active),
        "params_trainable": float(counts.trainable),
        "moe_layers": float(counts.num_moe_layers),
        "num_experts": float(counts.num_experts),
        "top_k": float(counts.top_k),
        "weights_bytes": counts.weights_bytes / shard_p,
        "gathered_layer_bytes": float(counts.max_layer_params * bytes_per if shard_p > 1 else 0),
        "grads_bytes": counts.trainable_bytes / shard_g,
        "optimizer_bytes": state_bytes / shard_o,
        "optimizer_bytes_per_param": state_bytes / max(counts.trainable, 1),
        "master_weights_bytes": master / shard_o,
    }
    offloaded = 0.0
    if gpus > 1 and cfg.distributed.offload_optimizer:
        offloaded += out["optimizer_bytes"] + out["master_weights_bytes"]
        out["optimizer_bytes"] = out["master_weights_bytes"] = 0.0
    if gpus > 1 and cfg.distributed.offload_param:
        offloaded += out["weights_bytes"]
        out["weights_bytes"] = 0.0
    out["offloaded_cpu_bytes"] = offloaded
    lora = cfg.model.lora.enabled
    needs_reference = cfg.stage == "rl" and bool(cfg.rl.kl_coef)
    separate = not lora or cfg.model.reference_name_or_path is not None
    out["reference_bytes"] = (
        float(counts.total * bytes_per) if needs_reference and separate else 0.0
    )
    out.update(_transient(config, cfg, counts, bytes_per))
    static_keys = ("weights", "gathered_layer", "optimizer", "master_weights", "reference")
    static = sum(out[f"{key}_bytes"] for key in static_keys)
    training = out["grads_bytes"] + out["activations_bytes"] + out["logits_bytes"]
    out["total_bytes"] = static + max(training, out["kv_cache_bytes"])
    return out


def _transient(config: Any, cfg: Config, counts: ParamCounts, bytes_per: int) -> dict[str, float]:
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
    # logits and their gradient in the model dtype, plus one float32 chunk and its softmax
    logits = logit_tokens * vocab * 2 * bytes_per + chunk * vocab * 4 * 2
    unchunked = logit_tokens * vocab * (2 * bytes_per + 4 * 2)
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
    setup = "single device" if gpus == 1 else dist.backend
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
        "gathered_layer_bytes": "  one gathered layer (sharded params)",
        "grads_bytes": "gradients (trainable)",
        "optimizer_bytes": f"AdamW states ({est['optimizer_bytes_per_param']:g} B / trainable)",
        "master_weights_bytes": "float32 master weights",
        "reference_bytes": "reference model (kl_coef > 0)",
        "activations_bytes": f"activations ({int(est['micro_batch_tokens'])} tokens, {gc})",
        "logits_bytes": "logits (chunked float32 log-softmax)",
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
    if est["offloaded_cpu_bytes"]:
        lines.append(f"  offloaded to CPU memory: {gib(est['offloaded_cpu_bytes'])}")
    other = "without" if cfg.model.gradient_checkpointing else "with"
    lines.append(
        f"  (activations {other} gradient checkpointing: {gib(est['activations_other_bytes'])}; "
        f"logits without chunking: {gib(est['logits_unchunked_bytes'])})"
    )
    training = est["grads_bytes"] + est["activations_bytes"] + est["logits_bytes"]
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


def run_plan(config_path: str, overrides: list[str], *, gpus: int = 1) -> int:
    """`moepost plan CONFIG [--gpus N]`: print the per-device memory estimate; returns 0."""
    from moepost.config.load import load_config

    if gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {gpus}")
    cfg = load_config(config_path, overrides)
    config = read_model_config(cfg)
    est = estimate_memory(config, cfg, gpus)
    for line in format_plan(est, cfg, str(getattr(config, "model_type", "?"))):
        print(line)
    if gpus > 1 and not cfg.distributed.enabled:
        print("  note: distributed.enabled is false; the run itself would use one device")
    if torch.cuda.is_available():
        device_mem = torch.cuda.get_device_properties(0).total_memory
        verdict = "fits" if est["total_bytes"] <= device_mem else "does NOT fit"
        print(f"  {verdict} in this machine's GPU 0 ({gib(device_mem)})")
    return 0
