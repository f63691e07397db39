"""Run the model's LM head chunk by chunk: per-token log-probs without [B, T, V] logits.

`head_request(model, request)` swaps the output head's `forward` for the length of one model
call. Transformers calls the head with the final hidden states ([B, T', H], already cut by
`logits_to_keep`); the replacement keeps the rows the caller wants a log-prob for (label >= 0),
and hands them with the head's own weight (and bias) to `algorithms.chunked_ce`, which never
holds more than one [chunk, V] block. The model call then returns those [N] log-probs as its
`.logits`.

The head runs *inside* the model's forward, through whatever wraps the model: DDP's forward
prepares the gradient reducer as usual, FSDP2 has the root's parameters (lm_head included)
gathered while the head runs and gathers them again for backward, and a tied lm_head weight is
the embedding's Parameter, so both uses add into one gradient.

The head is left alone (the caller uses full logits) when it is not a plain `nn.Linear` (a
LoRA-adapted or `modules_to_save` head), when it has forward hooks (which could change the
logits: a test's NaN injection, DeepSpeed ZeRO-3's parameter fetching), or when the
architecture changes the logits after the head (final logit soft-capping, logit scaling):
`chunked_head_off` says why. A model whose output turns out not to be the head's own output
is a hard error rather than a silently wrong loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moepost.algorithms.chunked_ce import linear_token_logprobs
from moepost.components.moe.routers import unwrap_model
from moepost.errors import UserError

# Config attributes of architectures that transform the logits after the head (Gemma 2/3
# soft-capping, Granite / GraniteMoE division, Cohere scaling), with their no-op value.
_POST_HEAD_ATTRS = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0}


def output_head(model: nn.Module) -> nn.Module | None:
    """The LM head (`get_output_embeddings`) under DDP / FSDP / DeepSpeed / PEFT wrappers."""
    inner = unwrap_model(getattr(model, "module", model))
    get = getattr(inner, "get_output_embeddings", None)
    return get() if callable(get) else None


def chunked_head_off(model: nn.Module) -> str | None:
    """None when the head can run chunked (`head_request`), else why not (for the run log)."""
    head = output_head(model)
    if head is None:
        return "the model has no output embeddings (get_output_embeddings)"
    if not isinstance(head, nn.Linear):
        return f"the lm_head is a {type(head).__name__} (LoRA / modules_to_save), not nn.Linear"
    if head._forward_hooks or head._forward_pre_hooks:  # noqa: SLF001
        return "the lm_head has forward hooks, which could change the logits"
    config = getattr(unwrap_model(getattr(model, "module", model)), "config", None)
    for attr, neutral in _POST_HEAD_ATTRS.items():
        value = getattr(config, attr, neutral)
        if value is not None and value != neutral:
            return f"the architecture transforms the logits after the lm_head ({attr}={value})"
    return None


@dataclass
class HeadRequest:
    """What the head computes in one model call, and what it leaves behind.

    labels: [B, T'] int64 aligned with the hidden states the head receives, negative where no
    log-prob is wanted. After the call: `valid` [B, T'] bool, `entropy` [N] (with_entropy) and
    `argmax` [N] for the N = valid.sum() scored positions, in row-major order.
    """

    labels: torch.Tensor
    temperature: float = 1.0
    logits_clip: float | None = None
    logprob_min: float | None = None
    chunk_size: int = 256
    with_entropy: bool = False
    valid: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    output: torch.Tensor | None = field(default=None, repr=False)

    def dense(self, values: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[B, T'] from [N] per-position values (`fill` where no log-prob was taken)."""
        assert self.valid is not None, "the model call has not run the head yet"
        out = values.new_full(self.valid.shape, fill)
        return out.index_put((self.valid,), values)


@contextmanager
def head_request(model: nn.Module, request: HeadRequest) -> Iterator[HeadRequest]:
    """Inside the block, one forward of `model` returns the [N] log-probs of `request` as its
    `.logits`; pass the output to `head_output` to get them checked."""
    head = output_head(model)
    assert isinstance(head, nn.Linear), chunked_head_off(model)

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # [B, T', H]
        valid = request.labels >= 0
        logprobs, entropy, argmax = linear_token_logprobs(
            hidden[valid],
            head.weight,
            request.labels[valid],
            bias=head.bias,
            temperature=request.temperature,
            logits_clip=request.logits_clip,
            logprob_min=request.logprob_min,
            chunk_size=request.chunk_size,
            with_entropy=request.with_entropy,
        )
        request.valid, request.entropy, request.argmax = valid, entropy, argmax
        request.output = logprobs
        return logprobs

    head.forward = forward  # type: ignore[method-assign, assignment]  # undone below
    try:
        yield request
    finally:
        del head.forward


def head_output(out: Any, request: HeadRequest) -> torch.Tensor:
    """[N] log-probs of the scored positions from a model output made under `head_request`."""
    logits = out.logits if hasattr(out, "logits") else out
    mine = request.output
    same = mine is not None and (
        logits is mine or (logits.shape == mine.shape and bool(torch.equal(logits, mine)))
    )
    if not same:
        raise UserError(
            "train.lm_head_chunk_rows: this model changes the logits after its lm_head, so "
            "the chunked head would compute a different loss; set train.lm_head_chunk_rows: 0"
        )
    return logits


def head_chunk_rows(model: nn.Module, rows: int) -> int:
    """`train.lm_head_chunk_rows` for this model: `rows`, or 0 (full logits) when the head
    cannot run chunked."""
    return rows if rows > 0 and chunked_head_off(model) is None else 0


def describe_head(model: nn.Module, rows: int) -> str:
    """One run-log line: how the loss gets its log-probs."""
    if rows <= 0:
        return "lm_head: full logits (train.lm_head_chunk_rows: 0)"
    why = chunked_head_off(model)
    if why is not None:
        return f"lm_head: full logits, not chunked: {why}"
    return f"lm_head: chunked, {rows} tokens at a time, only at scored positions (no [B, T, V])"


def head_weight_sharded(model: nn.Module) -> bool:
    """The head's weight is a sharded DTensor (FSDP2), so it is whole only inside a forward."""
    head = output_head(model)
    return isinstance(head, nn.Linear) and type(head.weight).__name__ == "DTensor"


@contextmanager
def head_passthrough(model: nn.Module) -> Iterator[nn.Linear]:
    """Inside the block the head returns its input, so a forward's `.logits` are the final
    hidden states [B, T', H] (for callers that reshape them before scoring, like the shared
    prompt-prefix forwards). The caller then applies `linear_token_logprobs` with the yielded
    head's weight *after* the forward, which is only right where the weight is a whole local
    tensor: one process, DDP, DeepSpeed ZeRO <= 2, not FSDP (a sharded DTensor is refused)."""
    head = output_head(model)
    assert isinstance(head, nn.Linear), chunked_head_off(model)
    if head_weight_sharded(model):  # callers take the full-logits path then
        raise UserError(
            "train.lm_head_chunk_rows with rl.shared_prefix under FSDP: the sharded lm_head "
            "weight is not available after the forward; set rl.shared_prefix: false"
        )
    head.forward = lambda hidden: hidden  # type: ignore[method-assign, assignment]  # undone below
    try:
        yield head
    finally:
        del head.forward
