"""AQN noise injection for RL rollouts (docs/ALGORITHMS.md, "Noise injection"; docs/stability.md).

The rollout model gets Gaussian noise N(0, sigma^2) on the weights of its decoder-layer RMSNorms
for the duration of generation; the training pass then runs on the bit-exact original weights.
A norm weight scales the input channels of the linear layers that follow it, so noise there acts
like a small multiplicative perturbation of those layers (what the AQN paper uses to mimic
quantisation noise and to widen exploration).

Which norms (the matching rule):

1. Candidates are modules whose class name ends with ``RMSNorm`` and that are direct children of
   a decoder layer (module name ``...layers.<i>.<norm>``): ``input_layernorm`` and
   ``post_attention_layernorm`` in every supported architecture. Norms inside a block
   (``self_attn.q_norm``/``k_norm``, ``kv_a_layernorm``) and the final ``model.norm`` are left
   alone: they do not feed a layer's input projections.
2. Each candidate "feeds" modules of its layer: ``input_layernorm`` feeds the attention child
   (a child whose name contains ``attn`` or ``attention``), ``post_attention_layernorm`` feeds
   the other non-norm children (``mlp``, and through it ``mlp.experts`` / ``mlp.gate`` in a MoE
   layer). Any other layer-level norm feeds nothing known.
3. ``target_modules`` empty: every candidate. Otherwise a candidate is kept when some entry is a
   substring of its own full name or of the full name of any module inside what it feeds. So
   ``["experts"]`` selects the post-attention norms of MoE layers only (a dense first layer of
   DeepSeek-V3 has no ``experts``), ``["mlp"]`` all post-attention norms, ``["self_attn"]`` or
   ``["input_layernorm"]`` the attention-input norms, ``["layers.0."]`` both norms of layer 0.
   An entry list that selects nothing is a config error.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from moepost.algorithms.noise import aqn_sigma, inject_noise_, restore_
from moepost.config.schema import NoiseInjectionConfig
from moepost.errors import UserError

_LAYER_CHILD = re.compile(r"(^|\.)layers\.\d+\.[^.]+$")


def _is_rmsnorm(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor)


def _fed_names(layer: torch.nn.Module, layer_name: str, norm_child: str) -> list[str]:
    """Full names of every module inside the blocks that `norm_child` of `layer` feeds."""
    children = dict(layer.named_children())

    def attention(name: str) -> bool:
        return "attn" in name or "attention" in name

    if norm_child == "input_layernorm":
        fed = [n for n in children if attention(n)]
    elif norm_child == "post_attention_layernorm":
        fed = [n for n, m in children.items() if not attention(n) and not _is_rmsnorm(m)]
    else:
        fed = []
    out = []
    for child in fed:
        for sub, _ in children[child].named_modules():
            out.append(f"{layer_name}.{child}" + (f".{sub}" if sub else ""))
    return out


def find_norm_weights(
    model: torch.nn.Module, target_modules: list[str]
) -> list[tuple[str, torch.nn.Parameter]]:
    """(module name, weight [H]) of the decoder-layer RMSNorms selected by `target_modules`."""
    modules = dict(model.named_modules())
    candidates: list[tuple[str, torch.nn.Parameter]] = []
    for name, module in modules.items():
        if not (_is_rmsnorm(module) and _LAYER_CHILD.search(name)):
            continue
        layer_name, child = name.rsplit(".", 1)
        if target_modules:
            keys = [name, *_fed_names(modules[layer_name], layer_name, child)]
            if not any(t in key for t in target_modules for key in keys):
                continue
        candidates.append((name, module.weight))
    if not candidates:
        layer_norms = [n for n, m in modules.items() if _is_rmsnorm(m) and _LAYER_CHILD.search(n)]
        raise UserError(
            f"noise_injection.target_modules = {target_modules}: matched no decoder-layer RMSNorm "
            f"(candidates: {layer_norms[:4]}{' ...' if len(layer_norms) > 4 else ''}); use "
            "substrings of a norm's name or of the block it feeds, e.g. ['mlp'] or ['self_attn']"
        )
    return candidates


class NoiseInjector:
    """Adds scheduled Gaussian noise to the rollout model's RMSNorm weights, and removes it.

    Args:
        model: the policy (plain or LoRA-wrapped); noise goes into its own norm weights, which
            the HF engine generates with directly.
        cfg: `noise_injection` section.
        total_steps: training steps of the run (the schedule's length).
        seed: the run's seed, used when `cfg.seed` is unset.

    The noise of step s comes from a fresh generator on the weights' device seeded with
    seed * 1000003 + s, so it depends only on (seed, step, device type): identical on every rank
    and after a resume, whatever else consumed random numbers. It is drawn in float32; bf16 weights are written back with
    stochastic rounding, because round-to-nearest would erase any noise below half a bf16 ulp
    of a weight near 1 (~0.002-0.004), i.e. all of a typical schedule's tail.
    """

    def __init__(
        self, model: torch.nn.Module, cfg: NoiseInjectionConfig, total_steps: int, seed: int
    ) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.targets = find_norm_weights(model, list(cfg.target_modules)) if cfg.enabled else []
        self.last_sigma = 0.0

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.targets]

    def sigma(self, step: int) -> float:
        """The schedule's sigma at 0-based training step `step` (0.0 when disabled)."""
        if not self.cfg.enabled:
            return 0.0
        c = self.cfg
        return aqn_sigma(step, self.total_steps, c.sigma_start, c.sigma_end, c.num_stages)

    @contextmanager
    def around_rollout(self, step: int) -> Iterator[float]:
        """Noisy norm weights inside the block, the bit-exact originals after it (even on error).

        Yields the sigma used, for logging as `noise/sigma`. An engine that keeps its own copy of
        the weights (vLLM) must `sync_weights(model)` inside the block to generate with noise.
        """
        sigma = self.sigma(step)
        self.last_sigma = sigma
        if sigma == 0.0 or not self.targets:
            yield sigma
            return
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for _, weight in self.targets:
            by_device.setdefault(weight.device, []).append(weight)
        saved: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        try:
            for device, weights in by_device.items():
                # A generator on the weights' own device: the stochastic rounding then uses it
                # too, and the global RNG streams (sampling) are left untouched.
                gen = torch.Generator(device=device).manual_seed(self.seed * 1000003 + step)
                saved.append((weights, inject_noise_(weights, sigma, gen, stochastic_round=True)))
            yield sigma
        finally:
            for weights, originals in saved:
                restore_(weights, originals)
