"""LoRA on MoE models (experts and routers included) and parameter accounting.

transformers v5 stores each MoE layer's experts as 3-D parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]) and routers as `*TopKRouter` modules holding a 2-D
`weight` [E, H]. Neither is an `nn.Linear`, so LoRA reaches them through peft's
`target_parameters` rather than `target_modules`.
"""

from __future__ import annotations

import re

from torch import nn

from moepost.config.schema import LoraConfig
from moepost.errors import UserError


def _unwrapped_name(name: str) -> str:
    """A module / parameter name with peft's wrapper levels removed."""
    name = name.replace(".base_layer", "")
    return name.removeprefix("base_model.model.")


def _expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules holding stacked expert weights, keyed by their unwrapped name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ParamWrapper":
            continue
        stacked = [p for p in module.parameters(recurse=False) if p.dim() == 3]
        if stacked and (
            hasattr(module, "is_transposed") or type(module).__name__.endswith("Experts")
        ):
            found[_unwrapped_name(name)] = module
    return found


def _router_modules(model: nn.Module) -> dict[str, nn.Module]:
    """v5 `*TopKRouter` modules (a 2-D `weight` [E, H]), keyed by their unwrapped name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if "router" in type(module).__name__.lower() and isinstance(weight, nn.Parameter):
            found[_unwrapped_name(name)] = module
    return found


def _layer_suffix(name: str) -> str:
    """`model.layers.3.mlp.experts.down_proj` -> `mlp.experts.down_proj` (one pattern for all layers)."""
    return re.split(r"\.\d+\.", name)[-1]


def lora_target_parameters(model: nn.Module, lora_cfg: LoraConfig) -> list[str]:
    """peft `target_parameters` for the experts (3-D stacks) and/or routers (`weight`) of `model`."""
    targets: set[str] = set()
    if lora_cfg.target_experts:
        for name, module in _expert_modules(model).items():
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    targets.add(_layer_suffix(f"{name}.{pname}"))
        if not targets:
            raise UserError(
                "model.lora.target_experts: this model has no stacked (3-D) expert weights to adapt"
            )
    if lora_cfg.target_router:
        routers = _router_modules(model)
        if not routers:
            raise UserError(
                "model.lora.target_router: this model has no *TopKRouter module to adapt"
            )
        targets.update(_layer_suffix(f"{name}.weight") for name in routers)
    return sorted(targets)


def apply_lora(model: nn.Module, lora_cfg: LoraConfig) -> nn.Module:
    """Wrap `model` in a peft LoRA model; only the adapter parameters stay trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if hasattr(model, "peft_config"):
        # A second adapter would silently stack on the first; resuming goes through load_policy.
        raise ValueError("apply_lora: the model already carries a peft adapter")
    target_parameters = lora_target_parameters(model, lora_cfg)
    if target_parameters and lora_cfg.dropout:
        raise UserError(
            f"model.lora.dropout: must be 0 with target_experts or target_router (got {lora_cfg.dropout}); "
            "peft cannot apply dropout to LoRA on parameters"
        )
    target_modules = list(lora_cfg.target_modules)
    if not target_modules and not target_parameters:
        raise UserError(
            "model.lora: target_modules is empty and target_experts / target_router are off"
        )
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=(target_modules[0] if target_modules == ["all-linear"] else target_modules)
        or None,
        target_parameters=target_parameters or None,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(f"model.lora.target_modules: {first_line}") from err


def _owner(name: str, prefixes: list[str]) -> bool:
    clean = _unwrapped_name(name)
    return any(clean.startswith(prefix + ".") for prefix in prefixes)


def parameter_report(model: nn.Module) -> dict[str, int]:
    """Parameter counts: total, trainable, and trainable ones that live in experts / routers.

    LoRA adapters on expert or router parameters count towards `trainable_experts` /
    `trainable_router`, as do the expert / router weights themselves in full fine-tuning.
    """
    experts = list(_expert_modules(model))
    routers = list(_router_modules(model))
    report = {"total": 0, "trainable": 0, "trainable_experts": 0, "trainable_router": 0}
    for name, param in model.named_parameters():
        report["total"] += param.numel()
        if not param.requires_grad:
            continue
        report["trainable"] += param.numel()
        if _owner(name, experts):
            report["trainable_experts"] += param.numel()
        elif _owner(name, routers):
            report["trainable_router"] += param.numel()
    return report


def describe_parameters(report: dict[str, int]) -> str:
    """One line for the run log, e.g. `params 1.80M, trainable 12.3K (0.68%): experts 8.2K, router 0`."""

    def short(n: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if n >= size:
                return f"{n / size:.2f}{unit}"
        return str(n)

    share = 100.0 * report["trainable"] / max(report["total"], 1)
    return (
        f"params {short(report['total'])}, trainable {short(report['trainable'])} ({share:.2f}%): "
        f"experts {short(report['trainable_experts'])}, router {short(report['trainable_router'])}"
    )
