"""Routers moepost has not verified: found by shape and behaviour, or named by `moe.router_module`.

A sparse block whose router class is not in `moe_routers._ROUTER_SPECS` (a `trust_remote_code`
model such as G3MoE) is read by what it does instead of by its class:

- the MoE block is the module that holds the experts (an `experts` child);
- its router is the one child (outside `experts`) holding a 2-D weight [E, H], E the block's
  number of experts and H the hidden size: an `nn.Linear(H, E)` gate or any module with such a
  weight; what it returns (a tensor [..., E], or a tuple starting with one) is the raw logits;
- the routes are the block's own top-k over the E experts (`moe_block_hooks` intercepts it).

`moe.router_module` names the router instead (a class name such as `G3MoeTopkRouter`, or an
attribute path such as `mlp.gate` matched at the end of module names), for a block this reading
gets wrong or cannot decide. Either way the run log gets one WARN naming the module taken, and
`moepost doctor` checks the reading on a real forward. Only a block in which no router can be
found is an error (naming the `moe.router_module` key).
"""

from __future__ import annotations

import logging
import weakref

from torch import nn

from moepost.errors import UserError

log = logging.getLogger("moepost.moe")

KEY = "moe.router_module"
_KEY_HINT = (
    f"set {KEY} to the module that computes the router logits (a class name such as "
    "'G3MoeTopkRouter' or an attribute path such as 'mlp.gate')"
)
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "num_experts_per_token", "moe_top_k", "topk",
                "n_activated_experts", "num_selected_experts", "experts_per_token")  # fmt: skip
_NUM_EXPERTS_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

# The user's `moe.router_module` per model (the unwrapped root), and models already warned about.
_POINTED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_WARNED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def set_router_module(root: nn.Module, spec: str | None) -> None:
    """Make `find_moe_layers(root)` take `spec`'s modules as the routers (None: discover)."""
    if spec is None:
        _POINTED.pop(root, None)
    else:
        _POINTED[root] = spec
    _WARNED.discard(root)


def pointed_spec(root: nn.Module) -> str | None:
    return _POINTED.get(root)


def bare(module: nn.Module) -> nn.Module:
    """Peel peft tuner wrappers (`lora.Linear`, `ParamWrapper`, nested) off `module`."""
    for _ in range(8):
        base = getattr(module, "base_layer", None)
        if not isinstance(base, nn.Module):
            break
        module = base
    return module


def _config_value(config: object, names: tuple[str, ...]) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def block_num_experts(block: nn.Module, config: object) -> int | None:
    """E of a block: its experts list, an attribute, a stacked [E, ...] parameter, the config."""
    experts = getattr(block, "experts", None)
    if isinstance(experts, (nn.ModuleList, nn.Sequential)):
        return len(experts)
    for holder in (experts, block):
        value = _config_value(holder, _NUM_EXPERTS_ATTRS) if holder is not None else None
        if value:
            return value
    if isinstance(experts, nn.Module):
        stacked = [p for p in experts.parameters(recurse=False) if p.ndim == 3]
        if stacked:
            return int(stacked[0].shape[0])
    return _config_value(config, _NUM_EXPERTS_ATTRS)


def block_top_k(block: nn.Module, router: nn.Module, config: object) -> int | None:
    """K: an attribute of the router or the block, else the model config's."""
    for holder in (router, block):
        value = _config_value(holder, _TOP_K_ATTRS)
        if value:
            return value
    return _config_value(config, _TOP_K_ATTRS)


def router_weight(router: nn.Module, num_experts: int | None) -> nn.Parameter | None:
    """The router's own 2-D weight [E, H] (E = num_experts when known), not a LoRA adapter's."""
    router = bare(router)
    weight = getattr(router, "weight", None)
    candidates = [weight] if isinstance(weight, nn.Parameter) else []
    candidates += [p for n, p in router.named_parameters() if "lora_" not in n]
    for param in candidates:
        if param.ndim == 2 and (num_experts is None or param.shape[0] == num_experts):
            return param
    return None


def gate_candidates(block: nn.Module, num_experts: int, hidden: int | None) -> list[str]:
    """Children of `block` (not its experts) holding a weight [num_experts, hidden]."""
    found = []
    for name, child in block.named_children():
        if name == "experts" or "shared" in name:
            continue
        weight = router_weight(child, num_experts)
        if weight is not None and (hidden is None or weight.shape[1] == hidden):
            found.append(name)
    return found


def discover_router(block_name: str, block: nn.Module, config: object) -> tuple[str, nn.Module]:
    """(child name, module) of the router of a sparse block; UserError naming the key if none."""
    where = f"model: MoE block '{block_name}' ({type(block).__name__})"
    num_experts = block_num_experts(block, config)
    if num_experts is None:
        raise UserError(f"{where}: cannot tell how many experts it has; {_KEY_HINT}")
    hidden = _config_value(config, ("hidden_size", "d_model", "n_embd"))
    names = gate_candidates(block, num_experts, hidden)
    if len(names) != 1:
        what = "several candidates " + ", ".join(names) if names else "no child with a 2-D weight"
        raise UserError(
            f"{where} has a router moepost cannot capture ({what} [E={num_experts}, "
            f"H={hidden or '?'}] next to its experts); {_KEY_HINT}"
        )
    return names[0], getattr(block, names[0])


def _class_matches(spec: str, module: nn.Module) -> bool:
    cls = type(bare(module))
    return spec in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}")


def pointed_routers(root: nn.Module, spec: str) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module `spec` names: by class name, else by attribute path
    (`mlp.gate` matches `model.layers.3.mlp.gate`). peft wrappers stand for what they wrap."""
    named = [(n, m) for n, m in root.named_modules() if n and ".base_layer" not in f".{n}."]
    found = [(n, m) for n, m in named if _class_matches(spec, m)]
    found = found or [(n, m) for n, m in named if n == spec or n.endswith("." + spec)]
    if not found:
        raise UserError(
            f"{KEY}: '{spec}' names no module of the model (expected a router class name or "
            "an attribute path such as 'mlp.gate' that ends the routers' module names)"
        )
    return found


def owning_block(root: nn.Module, router_name: str) -> tuple[str, nn.Module]:
    """The nearest ancestor of `router_name` holding `experts`, else its parent."""
    parts = router_name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:cut])
        module = root.get_submodule(name)
        if isinstance(getattr(module, "experts", None), nn.Module):
            return name, module
    name = ".".join(parts[:-1])
    return name, root.get_submodule(name)


def warn_once(root: nn.Module, how: str, router_name: str, detail: str, layers: int) -> None:
    """The run-log WARN for a router moepost has not verified (once per model)."""
    if root in _WARNED:
        return
    _WARNED.add(root)
    log.warning(
        "WARN router %s is not in moepost's verified list; %s: took '%s' (%s) as the router of "
        "%d MoE layer(s); run `moepost doctor` on this config to verify capture, aux-loss "
        "gradient and replay (%s sets it explicitly)",
        type(bare(root.get_submodule(router_name))).__name__, how, router_name, detail, layers,
        KEY,
    )  # fmt: skip
