"""moepost's routed-experts forward for transformers v5, and the `experts_implementation` choice.

transformers v5 runs every MoE block's experts through a pluggable function
(`ALL_EXPERTS_FUNCTIONS`, chosen by `config._experts_implementation`). Its `grouped_mm`
function gathers the (token, expert) pairs with advanced indexing, multiplies by the routing
weights, un-permutes with a second gather, and sums the top-k rows. On CPU each advanced-index
gather costs an `index_put_(accumulate=True)` in backward, 8% of a forward+backward of the
bench model in `torch.profiler` (docs/benchmarks.md).

`moepost_grouped` computes the same sum with the same two grouped matmuls, but gathers with
`index_select` and scatters the weighted rows straight back with `index_add_` (no second
permutation; its backward is a plain `index_select`). The result equals `grouped_mm`'s up to the
order in which the top-k contributions of a token are added (about 1 ulp). `index_add_` is not
deterministic on CUDA (atomics), so "auto" picks it on CPU only.

Without autograd and with few rows per expert (decode steps, small evaluation batches) the
pairs are instead laid out as [E, m, H] (m = most rows any expert got, zero-padded) and each
projection is one `torch.bmm`: on CPU `_grouped_mm` runs one small GEMM per expert, and at
16 tokens x top-4 of 32 experts one layer's experts took 1.39 ms where the padded bmm takes
0.93 ms (docs/benchmarks.md); it loses above ~64 rows per expert and when few experts are hit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

import torch
from torch import nn

from moepost.components.moe.routers import unwrap_model

NAME = "moepost_grouped"
PADDED_MAX_ROWS = 64  # padded-bmm path only up to this many rows per expert


class _Experts(Protocol):
    """What the forward reads of a transformers v5 experts module (`use_experts_implementation`);
    the bias tensors exist when `has_bias`, `gate_up_proj` when `has_gate`, else `up_proj`."""

    num_experts: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool
    _is_expert_parallel: bool
    gate_up_proj: torch.Tensor  # [E, 2I, H] ([E, H, 2I] when is_transposed)
    up_proj: torch.Tensor
    down_proj: torch.Tensor
    gate_up_proj_bias: torch.Tensor
    up_proj_bias: torch.Tensor
    down_proj_bias: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    post_expert_norm: Callable[[torch.Tensor], torch.Tensor]

    def _apply_gate(self, h: torch.Tensor) -> torch.Tensor: ...


def sorted_experts_forward(
    self: _Experts,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Routed experts for hidden_states [T, H], top_k_index / top_k_weights [T, k] -> [T, H].

    `self` is a transformers experts module decorated with `use_experts_implementation`
    (gate_up_proj [E, 2I, H] or [E, H, 2I] when `is_transposed`, down_proj, optional biases).
    """
    from transformers.integrations.moe import grouped_mm_experts_forward

    if self._is_expert_parallel:  # sentinel expert ids need transformers' masking
        module = cast(nn.Module, self)  # the experts module itself, seen through `_Experts`
        return grouped_mm_experts_forward(module, hidden_states, top_k_index, top_k_weights)
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)  # [S], S = T * k
    order = torch.argsort(expert_ids, stable=True)  # pairs grouped by expert
    token_of_pair = order // top_k  # [S] source row of each sorted pair
    counts = torch.bincount(expert_ids, minlength=self.num_experts)
    sorted_ids = expert_ids[order]
    x = hidden_states.index_select(0, token_of_pair)  # [S, H]
    if _use_padded(counts):
        y = _padded_experts(self, x, sorted_ids, counts)
    else:
        y = _grouped_experts(self, x, counts, sorted_ids)
    y = y * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(y.dtype)
    out = torch.zeros(hidden_states.shape, dtype=y.dtype, device=hidden_states.device)
    return out.index_add_(0, token_of_pair, y).to(hidden_states.dtype)


def _use_padded(counts: torch.Tensor) -> bool:
    """No autograd, at most PADDED_MAX_ROWS rows per expert and at least half the experts hit
    (the bmm reads every expert's weights; `_grouped_mm` only those of the experts hit)."""
    if torch.is_grad_enabled():
        return False
    return int(counts.max()) <= PADDED_MAX_ROWS and int((counts > 0).sum()) * 2 >= len(counts)


def _grouped_experts(
    self: _Experts, x: torch.Tensor, counts: torch.Tensor, sorted_ids: torch.Tensor
) -> torch.Tensor:
    """Expert MLP of the expert-sorted pairs x [S, H] -> [S, H], one grouped GEMM each."""
    from transformers.integrations.moe import _grouped_linear

    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up_weight = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = None
    if self.has_bias:
        up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias)[sorted_ids]
    h = _grouped_linear(x, up_weight, offsets, bias=up_bias, is_transposed=self.is_transposed)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # [S, I]
    down_bias = self.down_proj_bias[sorted_ids] if self.has_bias else None
    y = _grouped_linear(
        h, self.down_proj, offsets, bias=down_bias, is_transposed=self.is_transposed
    )  # [S, H]
    return self.post_expert_norm(y) if self.has_post_expert_norm else y


def _padded_experts(
    self: _Experts, x: torch.Tensor, sorted_ids: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """The same MLP with the pairs laid out [E, m, H] (zero rows pad), one bmm each."""
    starts = torch.cumsum(counts, dim=0) - counts
    slot = torch.arange(x.shape[0], device=x.device) - starts[sorted_ids]  # row within expert
    padded = x.new_zeros(counts.shape[0], int(counts.max()), x.shape[-1])
    padded[sorted_ids, slot] = x

    def linear(inp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = torch.bmm(inp, weight if self.is_transposed else weight.transpose(-2, -1))
        return out + bias.unsqueeze(1) if bias is not None else out

    biases = self.has_bias
    if self.has_gate:
        h = linear(padded, self.gate_up_proj, self.gate_up_proj_bias if biases else None)
        h = self._apply_gate(h)
    else:
        h = self.act_fn(linear(padded, self.up_proj, self.up_proj_bias if biases else None))
    y = linear(h, self.down_proj, self.down_proj_bias if biases else None)[sorted_ids, slot]
    return self.post_expert_norm(y) if self.has_post_expert_norm else y


def register() -> None:
    """Make `moepost_grouped` a valid `experts_implementation` (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if NAME not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(NAME, sorted_experts_forward)


def supports_experts_implementation(model: nn.Module) -> bool:
    """True when the model's MoE blocks dispatch through transformers' experts interface."""
    base = unwrap_model(model)
    config = getattr(base, "config", None)
    if getattr(config, "_experts_implementation", None) is None:
        return False
    can_set = getattr(base, "_can_set_experts_implementation", None)
    return bool(can_set()) if callable(can_set) else False


def experts_in_use(model: nn.Module) -> str | None:
    """The model's current `experts_implementation`, None when it has no pluggable experts."""
    base = unwrap_model(model)
    if not supports_experts_implementation(model):
        return None
    config: Any = base.config  # a PretrainedConfig (supports_experts_implementation checked it)
    return str(config._experts_implementation)


def auto_experts_implementation(device: torch.device) -> str | None:
    """The "auto" choice: `moepost_grouped` on CPU, transformers' default elsewhere (None)."""
    return NAME if device.type == "cpu" else None


def apply_experts_implementation(model: nn.Module, requested: str, device: torch.device) -> str:
    """Switch the loaded model to `requested` ("auto" resolved for `device`); returns the name
    in use ("n/a" for a model without pluggable experts)."""
    if not supports_experts_implementation(model):
        return "n/a"
    base: Any = unwrap_model(model)  # a PreTrainedModel (supports_experts_implementation)
    name = auto_experts_implementation(device) if requested == "auto" else requested
    if name == NAME:
        register()
    if name is not None and name != base.config._experts_implementation:
        base.set_experts_implementation(name)
    return experts_in_use(model) or "n/a"
