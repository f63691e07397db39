"""`moepost export` of a sharded (FSDP2 / DCP) checkpoint: rebuild the model on one process,
read its weights from the shards, write a Hugging Face folder (safetensors, split by size).

A full-weight checkpoint holds the model's `config.json`; a LoRA one its `adapter_config.json`
(the base model is looked up as for adapter exports, never downloaded). The optimizer state
in the shards is not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moepost.components.model.loading import ADAPTER_CONFIG, hub_kwargs
from moepost.config.schema import MiscConfig
from moepost.distributed.sharded_checkpoint import load_sharded_weights


def _rebuild(ckpt: Path, base: str | None, misc: MiscConfig, trust: bool) -> torch.nn.Module:
    """The trained model's module tree (same parameter names), weights not yet loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if base is None:
        config = AutoConfig.from_pretrained(ckpt, trust_remote_code=trust)
        return AutoModelForCausalLM.from_config(
            config, dtype=getattr(config, "dtype", None), trust_remote_code=trust
        )
    from peft import PeftConfig, get_peft_model

    kwargs = hub_kwargs(base, misc, f"{ckpt / ADAPTER_CONFIG} base_model_name_or_path")
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype="auto", trust_remote_code=trust, **kwargs
    )
    return get_peft_model(model, PeftConfig.from_pretrained(str(ckpt)))


def export_sharded(
    ckpt: Path,
    out: Path,
    *,
    base: str | None,
    merge_lora: bool,
    misc: MiscConfig,
    trust_remote_code: bool,
    max_shard_size: str,
) -> None:
    """Write the weights of sharded checkpoint `ckpt` to `out` (`base`: the adapter's base
    model, None for full weights); LoRA is merged with `merge_lora`, else saved as an adapter."""
    model: Any = _rebuild(ckpt, base, misc, trust_remote_code)  # transformers / PEFT model
    load_sharded_weights(ckpt, model)
    if base is not None and merge_lora:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
