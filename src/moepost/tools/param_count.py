"""Exact parameter counts of a run's model (`moepost plan`, `moepost doctor`).

The model is built on PyTorch's meta device (shapes, no storage), with LoRA applied and routers
frozen the way the run would, so a 30B checkpoint's config from the Hugging Face cache costs a
few seconds and no memory.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moepost.config.schema import Config
from moepost.errors import UserError


@dataclass
class ParamCounts:
    total: int
    experts: int  # parameters inside routed-expert modules (only K of E are used per token)
    active: int  # per token: total - experts * (1 - K/E)
    trainable: int
    weights_bytes: int  # every parameter at its own dtype (LoRA adapters are float32)
    trainable_bytes: int  # trainable parameters at their own dtype (what a gradient takes)
    max_layer_params: int  # largest decoder layer (what ZeRO-3 / FSDP gathers at once)
    num_moe_layers: int
    num_experts: int
    top_k: int


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def as_pretrained_config(model_config: dict[str, Any] | Any) -> Any:
    """A transformers config object from a config.json dict (or the object itself)."""
    if not isinstance(model_config, dict):
        return model_config
    from transformers import AutoConfig

    data = dict(model_config)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise UserError("model config: 'model_type' is missing from config.json")
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, KeyError) as err:
        raise UserError(f"model config: model_type '{model_type}' is unknown ({err})") from err


def read_model_config(cfg: Config) -> Any:
    """The policy's config.json (the base model's for an adapter folder); no weights are read."""
    from transformers import AutoConfig

    from moepost.components.model.loading import ADAPTER_CONFIG, hub_kwargs

    name = cfg.model.policy_name_or_path
    key = "model.policy_name_or_path"
    adapter = Path(name) / ADAPTER_CONFIG
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise UserError(f"{adapter}: base_model_name_or_path is missing")
        name, key = base, f"{adapter} base_model_name_or_path"
    kwargs = hub_kwargs(name, cfg.misc, key)
    try:
        return AutoConfig.from_pretrained(
            name, trust_remote_code=cfg.model.trust_remote_code, **kwargs
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{key}: no readable config.json in '{name}' ({first})") from err


def weight_dtype(cfg: Config, dtype: torch.dtype | None = None) -> torch.dtype:
    """The training dtype: `dtype` if given, else model.dtype with auto = bfloat16 (a GPU)."""
    if dtype is not None:
        return dtype
    name = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
    return getattr(torch, name)


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The longest ModuleList named '*layers' (the decoder stack)."""
    best: list[nn.Module] = []
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and name.endswith("layers")
            and len(module) > len(best)
        ):
            best = list(module)
    return best


def _is_adapter(name: str) -> bool:
    return "lora_" in name


def counts_from_model(model: nn.Module) -> ParamCounts:
    """Exact counts of a built model (plain or peft-wrapped, real or on the meta device)."""
    from moepost.components.moe.capture import find_moe_layers, unwrap_model

    root = unwrap_model(model)
    infos = find_moe_layers(model)
    experts = 0
    for info in infos:
        # the MoE block: its `experts` module holds the expert weights
        block: Any = root.get_submodule(info.name.replace(".base_layer", "").rsplit(".", 1)[0])
        experts += sum(p.numel() for n, p in block.experts.named_parameters() if not _is_adapter(n))
    layers = _decoder_layers(root)
    max_layer = max(
        (
            sum(p.numel() for n, p in layer.named_parameters() if not _is_adapter(n))
            for layer in layers
        ),
        default=0,
    )
    named = list(model.named_parameters())
    trainable = [p for _, p in named if p.requires_grad]
    # "parameters" means the base model's own; LoRA adapters are counted as trainable only
    total = sum(p.numel() for n, p in named if not _is_adapter(n))
    top_k, num_experts = (infos[0].top_k, infos[0].num_experts) if infos else (0, 0)
    return ParamCounts(
        total=total,
        experts=experts,
        active=total - experts + (experts * top_k // num_experts if infos else 0),
        trainable=sum(p.numel() for p in trainable),
        weights_bytes=sum(p.numel() * p.element_size() for _, p in named),
        trainable_bytes=sum(p.numel() * p.element_size() for p in trainable),
        max_layer_params=max_layer,
        num_moe_layers=len(infos),
        num_experts=num_experts,
        top_k=top_k,
    )


def _meta_counts(config: Any, cfg: Config, dtype: torch.dtype) -> ParamCounts:
    """Build the model on the meta device, set it up as the run would, and count."""
    from transformers import AutoModelForCausalLM

    from moepost.components.model.lora import apply_lora
    from moepost.components.moe.capture import freeze_router

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # deprecation chatter from transformers / peft
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=cfg.model.trust_remote_code
        )
        if cfg.model.lora.enabled:
            model = apply_lora(model, cfg.model.lora)
    if cfg.moe.freeze_router:
        freeze_router(model)
    return counts_from_model(model)


def model_dims(config: Any) -> dict[str, int]:
    """Sizes read off a config under the names the common MoE families use."""
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(config_value(config, "head_dim", default=hidden // heads))
    moe_inter = config_value(
        config, "moe_intermediate_size", "intermediate_size", default=4 * hidden
    )
    shared = config_value(config, "shared_expert_intermediate_size", default=None)
    if shared is None and config_value(config, "n_shared_experts", default=0):
        shared = int(config.n_shared_experts) * int(moe_inter)
    return {
        "hidden": hidden,
        "q_dim": heads * head_dim,
        "kv_dim": int(config_value(config, "num_key_value_heads", default=heads)) * head_dim,
        "inter": int(config_value(config, "intermediate_size", default=4 * hidden)),
        "moe_inter": int(moe_inter),
        "shared_inter": int(shared or 0),
    }


def count_parameters(config: Any, cfg: Config, dtype: torch.dtype) -> ParamCounts:
    """Exact counts of the model `config` describes, set up as `cfg` says (meta device)."""
    try:
        return _meta_counts(config, cfg, dtype)
    except UserError:
        raise
    except Exception as err:  # e.g. remote code that is not cached locally
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"model: cannot build {getattr(config, 'model_type', '?')} from its config.json to "
            f"count parameters ({first})"
        ) from err
