"""Finding the MoE routers of a transformers v5 model and recomputing their gate weights.

In transformers v5 every sparse block owns a router module (`*TopKRouter`, attribute `gate` or
`router`) whose forward takes the flattened hidden states [N, H] and returns
`(router_logits [N, E], router_scores [N, K], router_indices [N, K])`:

- `router_logits` is the raw `h W^T (+ b)`: pre-softmax (Qwen2/Qwen3/Qwen3.5/Mixtral/OLMoE and
  GPT-OSS), pre-sigmoid and in float32 (DeepSeek-V3).
- top-k happens inside the router; `router_scores` are the gate weights the experts multiply by.

Only router classes whose forward was read line by line are listed in `_ROUTER_SPECS`, because
routing replay recomputes their gate weights (`gate_weights`) and a wrong guess would silently
change the model. Any other sparse block is read by shape and behaviour (`moe_discovery`: a
linear [H -> E] router next to the experts, the block's own top-k; kind "block_topk") or through
`moe.router_module`, with a WARN that `moepost doctor` should verify it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, Protocol, cast

import torch
from torch import nn

from moepost.components.moe.discovery import (
    KEY,
    block_num_experts,
    block_top_k,
    discover_router,
    owning_block,
    pointed_routers,
    pointed_spec,
    router_weight,
    warn_once,
)
from moepost.components.moe.discovery import bare as _bare_module
from moepost.errors import UserError

# block_topk: a router moepost has not verified; the block's own top-k is intercepted.
RouterKind = Literal["softmax_topk", "sigmoid_group_topk", "topk_softmax", "block_topk"]


@dataclass(frozen=True)
class _RouterSpec:
    kind: RouterKind
    # None: read `router.norm_topk_prob`; a bool: the class renormalises (or not) unconditionally.
    norm_topk_prob: bool | None


_SOFTMAX_READ_FLAG = _RouterSpec("softmax_topk", None)
_SOFTMAX_ALWAYS_NORM = _RouterSpec("softmax_topk", True)

_ROUTER_SPECS: dict[str, _RouterSpec] = {
    # p = softmax(logits) in float32; (w, idx) = topk(p); w /= sum(w) if norm_topk_prob.
    "Qwen2MoeTopKRouter": _SOFTMAX_READ_FLAG,
    "Qwen3MoeTopKRouter": _SOFTMAX_READ_FLAG,
    "Qwen3NextTopKRouter": _SOFTMAX_READ_FLAG,
    "Qwen3OmniMoeThinkerTextTopKRouter": _SOFTMAX_READ_FLAG,
    "Qwen3OmniMoeTalkerTextTopKRouter": _SOFTMAX_READ_FLAG,
    "OlmoeTopKRouter": _SOFTMAX_READ_FLAG,
    "FlexOlmoTopKRouter": _SOFTMAX_READ_FLAG,
    # Same, but these classes always renormalise and have no flag.
    "MixtralTopKRouter": _SOFTMAX_ALWAYS_NORM,
    "MiniMaxTopKRouter": _SOFTMAX_ALWAYS_NORM,
    "Qwen3_5MoeTopKRouter": _SOFTMAX_ALWAYS_NORM,
    "Qwen3VLMoeTextTopKRouter": _SOFTMAX_ALWAYS_NORM,
    "Qwen3OmniMoeTextTopKRouter": _SOFTMAX_ALWAYS_NORM,
    # s = sigmoid(logits); top-k of s + e_score_correction_bias inside the best topk_group of
    # n_group groups; w = s.gather(idx) (/ sum if norm_topk_prob) * routed_scaling_factor.
    "DeepseekV3TopkRouter": _RouterSpec("sigmoid_group_topk", None),
    "Glm4MoeTopkRouter": _RouterSpec("sigmoid_group_topk", None),
    # GPT-OSS: top-k of the raw logits (with bias), then softmax over the K chosen logits.
    "GptOssTopKRouter": _RouterSpec("topk_softmax", True),
}

_ROUTER_ATTRS = ("gate", "router")
_DATA_PARALLEL_CLASSES = ("DistributedDataParallel", "FullyShardedDataParallel", "DataParallel")
_MOE_CLASS_PATTERN = re.compile(r"SparseMoe|MoeBlock|MoE$|Moe$|Router", re.IGNORECASE)


@dataclass(frozen=True, eq=False)
class MoELayerInfo:
    """One MoE layer: its router module and the routing rule it follows.

    `index` is the position among the model's MoE layers (0..L-1; what `RouterCapture.records`
    and replay routes are indexed by); `layer_idx` is the decoder layer number parsed from
    `name` (they differ when some decoder layers are dense, e.g. DeepSeek's first_k_dense_replace).
    `router` is the bare router module, under any peft wrapper; `weight` [E, H] and `bias` [E]
    are its own Parameters (not LoRA adapters). For kind "block_topk" `router` is the module as
    the block calls it (a peft wrapper included, so its output carries the adapter), and `block`
    is the MoE block whose top-k is intercepted.
    """

    index: int
    layer_idx: int
    name: str
    router: nn.Module
    kind: RouterKind
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    weight: nn.Parameter
    bias: nn.Parameter | None
    routed_scaling_factor: float
    block: nn.Module | None = None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP / DataParallel (`.module`) and peft (`base_model.model`)."""
    for _ in range(8):
        inner = getattr(model, "module", None)
        if type(model).__name__ in _DATA_PARALLEL_CLASSES and isinstance(inner, nn.Module):
            model = inner
            continue
        tuner = getattr(model, "base_model", None)
        inner = getattr(tuner, "model", None)
        if hasattr(model, "peft_config") and isinstance(inner, nn.Module):
            model = inner
            continue
        break
    return model


def _layer_number(name: str, fallback: int) -> int:
    numbers = re.findall(r"(?:^|\.)(\d+)(?=\.)", name)
    return int(numbers[-1]) if numbers else fallback


class _TopKRouter(Protocol):
    """The attributes every router class of `_ROUTER_SPECS` has."""

    num_experts: int
    top_k: int
    weight: nn.Parameter  # [E, H]
    norm_topk_prob: bool


def _info(index: int, name: str, router: nn.Module) -> MoELayerInfo:
    spec = _ROUTER_SPECS[type(router).__name__]
    verified = cast(_TopKRouter, router)  # a class of `_ROUTER_SPECS`: these attributes exist
    norm = spec.norm_topk_prob
    if norm is None:
        norm = bool(verified.norm_topk_prob)
    bias = getattr(router, "bias", None)
    return MoELayerInfo(
        index=index,
        layer_idx=_layer_number(name, index),
        name=name,
        router=router,
        kind=spec.kind,
        num_experts=int(verified.num_experts),
        top_k=int(verified.top_k),
        norm_topk_prob=norm,
        weight=verified.weight,
        bias=bias if isinstance(bias, nn.Parameter) else None,
        routed_scaling_factor=float(getattr(router, "routed_scaling_factor", 1.0)),
    )


def _custom_info(index: int, root: nn.Module, router_name: str) -> MoELayerInfo:
    """MoELayerInfo of a router moepost has not verified (kind block_topk)."""
    block_name, block = owning_block(root, router_name)
    router = root.get_submodule(router_name)
    config = getattr(root, "config", None)
    num_experts = block_num_experts(block, config)
    weight = router_weight(router, num_experts)
    if weight is None:
        raise UserError(
            f"{KEY}: module '{router_name}' ({type(_bare_module(router)).__name__}) has no 2-D "
            f"weight [E={num_experts or '?'}, H]: name the module that computes the router logits"
        )
    top_k = block_top_k(block, _bare_module(router), config)
    if top_k is None:
        raise UserError(
            f"model: MoE block '{block_name}' ({type(block).__name__}): cannot find its top-k (no "
            "top_k / num_experts_per_tok on its router, the block or the model config)"
        )
    bias = getattr(_bare_module(router), "bias", None)
    return MoELayerInfo(
        index=index,
        layer_idx=_layer_number(router_name, index),
        name=router_name,
        router=router,
        kind="block_topk",
        num_experts=int(weight.shape[0]),
        top_k=top_k,
        norm_topk_prob=bool(getattr(_bare_module(router), "norm_topk_prob", False)),
        weight=weight,
        bias=bias if isinstance(bias, nn.Parameter) and bias.ndim == 1 else None,
        routed_scaling_factor=1.0,
        block=block,
    )


def _sparse_block_router(root: nn.Module, name: str, module: nn.Module) -> str | None:
    """Name of the router of `module` when it is a sparse block without a verified router
    (found by shape, see `moe_discovery`); None when it is not such a block. UserError when it
    looks sparse but no router can be found in it."""
    children = [_bare_module(c) for c in module.children()]
    if any(type(c).__name__ in _ROUTER_SPECS for c in children):
        return None
    if isinstance(getattr(module, "experts", None), nn.Module):
        child, _ = discover_router(name, module, getattr(root, "config", None))
        return f"{name}.{child}" if name else child
    if not _MOE_CLASS_PATTERN.search(type(module).__name__):
        return None
    raise UserError(
        f"model: module '{name}' ({type(module).__name__}) looks like an MoE router or block but "
        f"holds no experts and no router moepost knows (supported: {', '.join(sorted(_ROUTER_SPECS))}); "
        f"set {KEY} to the module that computes the router logits"
    )


def _pointed_layers(root: nn.Module, spec: str) -> list[MoELayerInfo]:
    infos: list[MoELayerInfo] = []
    for name, module in pointed_routers(root, spec):
        if type(_bare_module(module)).__name__ in _ROUTER_SPECS:
            infos.append(_info(len(infos), name, _bare_module(module)))
        else:
            infos.append(_custom_info(len(infos), root, name))
    custom = [i for i in infos if i.kind == "block_topk"]
    if custom:
        warn_once(root, f"{KEY} = '{spec}'", custom[0].name, _describe(custom[0]), len(custom))
    return infos


def _describe(info: MoELayerInfo) -> str:
    weight = tuple(info.weight.shape)
    block = type(info.block).__name__ if info.block is not None else "?"
    return (
        f"weight {list(weight)} = [E, H], top-{info.top_k} of {info.num_experts} experts in {block}"
    )


def find_moe_layers(model: nn.Module) -> list[MoELayerInfo]:
    """Every MoE router of `model` in forward order; [] for a dense model.

    Works on a plain model, a PeftModel and a DDP/FSDP-wrapped module. Verified router classes
    are taken as they are; a sparse block (a module holding `experts`) with another router is
    read by shape (`moe_discovery`), or the modules `moe.router_module` names are used
    (`set_router_module`). Raises UserError, naming that key, when a block looks sparse but no
    router can be found in it.
    """
    root = unwrap_model(model)
    spec = pointed_spec(root)
    if spec is not None:
        return _pointed_layers(root, spec)
    infos: list[MoELayerInfo] = []
    seen: set[int] = set()
    claimed: list[str] = []  # blocks whose router was found by shape: their insides are read
    for name, module in root.named_modules():
        if _is_peft_wrapper(module) or any(name.startswith(p) for p in claimed):
            continue
        if type(module).__name__ in _ROUTER_SPECS:
            if id(module) not in seen:
                seen.add(id(module))
                infos.append(_info(len(infos), name, module))
            continue
        router_name = _sparse_block_router(root, name, module)
        if router_name is not None:
            infos.append(_custom_info(len(infos), root, router_name))
            claimed.append(f"{name}." if name else "")
    custom = [i for i in infos if i.kind == "block_topk"]
    if custom:
        how = "found by shape (a linear [H -> E] next to the experts, then the block's top-k)"
        warn_once(root, how, custom[0].name, _describe(custom[0]), len(custom))
    return infos


def _is_peft_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "base_layer", None), nn.Module)


def router_parameters(
    model: nn.Module, *, include_adapters: bool = False
) -> list[tuple[str, nn.Parameter]]:
    """(name, Parameter) of every router weight and bias, named as in `model.named_parameters()`.

    With `include_adapters`, LoRA parameters of a peft wrapper around a router are included too.
    """
    infos = find_moe_layers(model)
    wanted = {id(p) for info in infos for p in _own_parameters(info)}
    router_ids = {id(_bare_module(info.router)) for info in infos}
    wrapper_prefixes: list[str] = []
    if include_adapters:
        for name, module in model.named_modules():
            if _is_peft_wrapper(module) and id(_bare_module(module)) in router_ids:
                wrapper_prefixes.append(name + ".")
    found: list[tuple[str, nn.Parameter]] = []
    for name, param in model.named_parameters():
        if id(param) in wanted or any(name.startswith(p) for p in wrapper_prefixes):
            found.append((name, param))
    return found


def _own_parameters(info: MoELayerInfo) -> list[nn.Parameter]:
    """A router's own parameters: weight and bias, or every one of a custom router module."""
    if info.kind == "block_topk":
        return list(_bare_module(info.router).parameters())
    return [p for p in (info.weight, info.bias) if p is not None]


def freeze_router(model: nn.Module, *, include_adapters: bool = True) -> int:
    """Set requires_grad=False on every router weight/bias (and LoRA adapters on routers).

    Returns how many parameter tensors were frozen; 0 for a dense model.
    """
    params = router_parameters(model, include_adapters=include_adapters)
    for _, param in params:
        param.requires_grad_(False)
    return len(params)


def gate_weights(
    info: MoELayerInfo, router_logits: torch.Tensor, top_k_index: torch.Tensor
) -> torch.Tensor:
    """Gate weights [N, K] the router would give the experts `top_k_index` [N, K] (int64).

    `router_logits` [N, E] are the router's raw logits. The arithmetic copies each router's
    forward op for op, so with the router's own indices the result is bit-identical to its
    `router_scores` (before the caller casts to their dtype). Gradients reach the logits.
    """
    if info.kind == "block_topk":
        raise ValueError(f"{info.name}: a custom router's gate weights are the block's own")
    if info.kind == "softmax_topk":
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights = probs.gather(1, top_k_index)
        if info.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights
    if info.kind == "sigmoid_group_topk":
        weights = router_logits.sigmoid().gather(1, top_k_index)
        if info.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * info.routed_scaling_factor
    # topk_softmax: softmax over the chosen raw logits, in their own dtype as GPT-OSS does.
    chosen = router_logits.gather(1, top_k_index)
    return torch.softmax(chosen, dim=1, dtype=chosen.dtype)
