"""A tiny `trust_remote_code` MoE whose router moepost has never seen (test fixture).

Written the way hub models for older transformers are: its own config and model classes, an
`auto_map` in config.json, `past_key_values` as the cache keyword, and a router that is a plain
`nn.Linear` gate whose logits the sparse block turns into routes itself (softmax, `torch.topk`,
renormalise), not a v5 `*TopKRouter`. `save_pretrained` copies this file next to the weights.

`router_style` picks how the block holds its router:
- "linear": `self.gate = nn.Linear(H, E)` (found by shape);
- "module": `self.gate = CustomMoeRouter(...)`, a module with its own 2-D weight that returns
  `(logits,)` (found by shape, or by class name through moe.router_module);
- "topk_router": `self.router = CustomMoeTopkRouter(...)` as DeepSeek-style hub code (and the
  G3MoE seed) writes it: an inner `nn.Linear` used through `F.linear`, sigmoid scores plus a
  correction bias, top-k inside the router, which returns `(indices, weights)` and no logits;
  next to a `shared_experts` MLP;
- "matmul": a bare [H, E] parameter on the block, no router module at all (cannot be captured).
`extra_gate` adds a second [E, H] linear next to the experts, so discovery cannot decide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput


class CustomMoeConfig(PretrainedConfig):
    model_type = "custom_moe_test"

    def __init__(
        self,
        vocab_size: int = 128,
        hidden_size: int = 32,
        intermediate_size: int = 32,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_experts: int = 4,
        num_experts_per_tok: int = 2,
        max_position_embeddings: int = 512,
        router_aux_loss_coef: float = 0.01,
        router_style: str = "linear",
        extra_gate: bool = False,
        initializer_range: float = 0.1,
        **kwargs: object,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.max_position_embeddings = max_position_embeddings
        self.router_aux_loss_coef = router_aux_loss_coef
        self.router_style = router_style
        self.extra_gate = extra_gate
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class CustomMoeRouter(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden).normal_(0, 0.1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (F.linear(x, self.weight),)


class CustomMoeTopkRouter(nn.Module):
    def __init__(self, config: CustomMoeConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.num_experts))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = hidden.view(-1, hidden.shape[-1])
        scores = F.linear(h.float(), self.router.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        chosen = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        return chosen, weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)


class CustomMoeExpert(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.up(x)))


class CustomMoeSparseBlock(nn.Module):
    def __init__(self, config: CustomMoeConfig) -> None:
        super().__init__()
        h, e = config.hidden_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.style = config.router_style
        if self.style == "linear":
            self.gate = nn.Linear(h, e, bias=False)
        elif self.style == "module":
            self.gate = CustomMoeRouter(h, e)
        elif self.style == "topk_router":
            self.router = CustomMoeTopkRouter(config)
            self.shared_experts = CustomMoeExpert(h, config.intermediate_size)
        else:
            self.gate_weight = nn.Parameter(torch.empty(h, e).normal_(0, 0.1))
        if config.extra_gate:
            self.noise_gate = nn.Linear(h, e, bias=False)  # unused here; confuses discovery
        self.experts = nn.ModuleList(CustomMoeExpert(h, config.intermediate_size) for _ in range(e))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        if self.style == "topk_router":
            chosen, weights = self.router(hidden)
            out = self._experts(x, chosen, weights.to(x.dtype)) + self.shared_experts(x)
            return out.reshape(hidden.shape)
        if self.style == "linear":
            logits = self.gate(x)
        elif self.style == "module":
            logits = self.gate(x)[0]
        else:
            logits = x @ self.gate_weight
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        return self._experts(x, chosen, weights).reshape(hidden.shape)

    def _experts(
        self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                out = out.index_add(0, rows, expert(x[rows]) * weights[rows, slot, None])
        return out


class CustomMoeAttention(nn.Module):
    def __init__(self, config: CustomMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, past_key_values: object | None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class CustomMoeLayer(nn.Module):
    def __init__(self, config: CustomMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size)
        self.attn = CustomMoeAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.hidden_size)
        self.mlp = CustomMoeSparseBlock(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, cache: object | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, cache)
        return x + self.mlp(self.norm2(x))


class CustomMoeForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CustomMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["CustomMoeLayer"]

    def __init__(self, config: CustomMoeConfig) -> None:
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(
            CustomMoeLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def _mask(self, attention_mask: torch.Tensor | None, t: int, past: int, dev) -> torch.Tensor:
        """[B or 1, 1, t, past + t] bool: causal, and padding keys masked out."""
        q = torch.arange(past, past + t, device=dev)[:, None]
        allowed = torch.arange(past + t, device=dev)[None, :] <= q
        allowed = allowed[None, None]
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -(past + t) :].bool()
        # A fully padded query row would give NaN; let it see itself (its output is ignored).
        return allowed | (torch.arange(past + t, device=dev)[None, :] == q)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: object | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        labels: torch.Tensor | None = None,
        **kwargs: object,
    ) -> CausalLMOutput:
        t = input_ids.shape[1]
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + t, device=input_ids.device)[None]
        x = self.embed(input_ids) + self.pos(position_ids)
        mask = self._mask(attention_mask, t, past, input_ids.device)
        for layer in self.layers:
            x = layer(x, mask, past_key_values)
        x = self.norm(x)
        if isinstance(logits_to_keep, int):
            x = x[:, -logits_to_keep:] if logits_to_keep else x
        else:
            x = x[:, logits_to_keep]
        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return CausalLMOutput(loss=loss, logits=logits)
