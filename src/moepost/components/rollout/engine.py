"""Rollout engines: sample G completions per prompt and return their exact per-token log-probs.

`HFRolloutEngine` runs its own decode loop on a transformers model instead of `model.generate`, for
three reasons: each distinct prompt is prefilled once and its KV cache shared by its G samples;
a `step_callback` lets router capture tag every forward pass (prefill / decode step); and the
returned log-probs are exactly what the training pass recomputes (see `RolloutBatch.logprobs`).

Row order everywhere is prompt-major: rows i*G .. i*G+G-1 belong to prompt i.

The training layout of the rows (`build_training_tensors`) is in `layout`; the types both engines
share (`SamplingParams`, `RolloutBatch`, `RolloutEngine`) are in `interface`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache

from moepost.components.rollout.interface import (  # noqa: F401 (SamplingParams ...: re-export)
    LockStep,
    RolloutBatch,
    RolloutEngine,
    SamplingParams,
    cut_at_stop,
)
from moepost.components.rollout.kv_cache import cache_kwargs, drop_finished_rows, reserved_cache
from moepost.components.rollout.layout import (  # noqa: F401 (build_training_tensors: re-export)
    build_training_tensors,
    real_positions,
)
from moepost.components.rollout.sampling import sample_tokens
from moepost.components.rollout.vllm_engine import VLLMRolloutEngine
from moepost.errors import UserError

StepCallback = Callable[[int, str], None]
# Phase of a forward that only keeps this rank in step with the others (lock-step generation):
# no row of this rank is running in it, so its routes belong to no row.
IDLE = "idle"
_EOS, _STOP, _LENGTH = 1, 2, 3
_REASONS = {_EOS: "eos", _STOP: "stop", _LENGTH: "length"}


def _left_pad(
    prompts: list[list[int]], pad_token_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return input_ids [B, P] and attention_mask [B, P] with prompts right-aligned."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, width - len(p) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _default_eos_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("model: neither generation_config nor the tokenizer defines eos_token_id")
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


@dataclass
class _ChunkOut:
    tokens: torch.Tensor  # [n, s] long, pad after each row's end
    logprobs: torch.Tensor  # [n, s] float32, 0 after each row's end
    lengths: torch.Tensor  # [n] long
    reasons: torch.Tensor  # [n] long finish code


class HFRolloutEngine:
    """Decode loop on a transformers causal LM with a shared-prefix DynamicCache.

    micro_batch_size: rows (samples) per generation chunk, 0 = all rows at once. A chunk always
        holds whole groups: max(1, micro_batch_size // G) prompts.
    step_callback(step_index, phase): called before every forward pass. "prefill" (index 0) runs
        on one row per distinct prompt of the chunk; "decode" index s produces token s of all
        B_chunk * G rows. Chunks run one after another and each restarts at index 0.
    share_prefix: False prefills G copies of every prompt (only for checking equivalence).
    compact_finished: once a quarter of the rows in the decode batch have finished, they leave
        it (their KV cache rows are dropped); `batch_rows` then names the chunk rows each
        forward runs on (None: all), for route capture. Sampling still draws for every row, so
        the random stream is that of the uncompacted loop. False keeps every row to the end.
    lockstep: the ranks' collectives (see `LockStep`), when every forward is a collective. Then
        every rank runs as many chunks as the rank with most (extra ones on a one-token dummy
        prompt) and, within a chunk, decodes until no rank has a running row: a rank whose
        rows are all done keeps feeding one finished row (outputs ignored; compacted down to
        it). Those forwards are tagged `IDLE` for the step callback, so route capture gives
        every row exactly the routes the free-running loop gives it. Tokens and log-probs are
        unchanged: finished rows are masked, and a step with no running row draws nothing.

    Generation runs under torch.no_grad rather than inference_mode: the returned log-probs later
    meet autograd tensors in the loss, and inference tensors cannot be saved for backward.
    sync_weights is a no-op: the engine holds the policy module itself, so it is always current.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        device: torch.device | str | None = None,
        eos_token_ids: list[int] | None = None,
        pad_token_id: int | None = None,
        micro_batch_size: int = 0,
        step_callback: StepCallback | None = None,
        share_prefix: bool = True,
        compact_finished: bool = True,
        lockstep: LockStep | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.eos_token_ids = list(eos_token_ids or _default_eos_ids(model, tokenizer))
        pad = pad_token_id if pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else self.eos_token_ids[0])
        if micro_batch_size < 0:
            raise UserError(f"train.micro_batch_size must be >= 0, got {micro_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.step_callback = step_callback
        self.share_prefix = share_prefix
        self.compact_finished = compact_finished
        self.lockstep = lockstep
        self.batch_rows: torch.Tensor | None = None  # chunk rows of the current forward
        self._idle = False  # the current forwards only keep this rank in step (lockstep)

    def sync_weights(self, model: torch.nn.Module) -> None:
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate() needs at least one prompt and no empty prompt")
        group_size = params.num_samples_per_prompt
        per_chunk = (
            max(1, self.micro_batch_size // group_size) if self.micro_batch_size else len(prompts)
        )
        generator = torch.Generator(device=self.device)
        if params.seed is None:
            generator.seed()
        else:
            generator.manual_seed(params.seed)
        was_training = self.model.training
        self.model.eval()
        start = time.perf_counter()
        try:
            with torch.no_grad():
                starts = range(0, len(prompts), per_chunk)
                chunks = [
                    self._generate_chunk(prompts[i : i + per_chunk], params, generator)
                    for i in starts
                ]
                if self.lockstep is not None:
                    for _ in range(self.lockstep.max_int(len(starts)) - len(starts)):
                        self._idle_chunk(params)
        finally:
            self.model.train(was_training)
        return self._assemble(prompts, chunks, params, time.perf_counter() - start)

    def _idle_chunk(self, params: SamplingParams) -> None:
        """A chunk on a one-token dummy prompt, run only to match another rank's chunk count;
        its own generator leaves this rank's sampling stream alone, its output is dropped."""
        dummy = dataclasses.replace(params, num_samples_per_prompt=1, stop=[])
        self._idle = True
        try:
            self._generate_chunk([[self.pad_token_id]], dummy, torch.Generator(self.device))
        finally:
            self._idle = False

    def _forward(self, step: int, phase: str, **inputs: Any) -> torch.Tensor:
        """One model call; returns last-position logits [n, V]."""
        if self.step_callback is not None:
            self.step_callback(step, IDLE if self._idle else phase)
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :]

    def _prefill(
        self, prompts: list[list[int]], group_size: int, reserve: int
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        """Prefill; returns the cache, logits [n, V] and attention_mask [n, P], n = len*G."""
        if not self.share_prefix:
            prompts = [p for p in prompts for _ in range(group_size)]
        input_ids, attention_mask = _left_pad(prompts, self.pad_token_id, self.device)
        # Room for the completion, so decode steps write in place instead of re-concatenating.
        cache = reserved_cache(self.model.config, reserve=reserve)
        logits = self._forward(
            0,
            "prefill",
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=real_positions(attention_mask),
            **cache_kwargs(self.model, cache),
        )
        if self.share_prefix and group_size > 1:
            # Samples of one prompt share its prefix: copy the cache rows instead of recomputing.
            cache.batch_repeat_interleave(group_size)
            logits = logits.repeat_interleave(group_size, dim=0)
            attention_mask = attention_mask.repeat_interleave(group_size, dim=0)
        return cache, logits, attention_mask

    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator
    ) -> _ChunkOut:
        self.batch_rows = None
        cache, logits, attention_mask = self._prefill(
            prompts, params.num_samples_per_prompt, params.max_new_tokens
        )
        n = logits.shape[0]
        rows = None  # chunk rows in the model's decode batch (None: all n)
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        reasons = torch.zeros(n, dtype=torch.long, device=self.device)
        lengths = torch.zeros(n, dtype=torch.long, device=self.device)
        history: list[list[int]] = [[] for _ in range(n)]
        tokens_out, logprobs_out = [], []
        for step in range(params.max_new_tokens):
            active = reasons == 0
            if bool(active.any()):
                tokens, logprobs = sample_tokens(logits, params, generator)
            else:  # lock-step, all rows done: draw nothing, so the stream stays the free loop's
                tokens, logprobs = torch.zeros_like(reasons), torch.zeros_like(lengths).float()
            tokens = torch.where(active, tokens, self.pad_token_id)
            tokens_out.append(tokens)
            logprobs_out.append(torch.where(active, logprobs, 0.0))
            lengths += active.long()
            reasons[active & torch.isin(tokens, eos)] = _EOS
            if params.stop:
                self._mark_stops(tokens, reasons, history, params.stop)
            if step == params.max_new_tokens - 1:
                reasons[reasons == 0] = _LENGTH
            done = bool((reasons != 0).all())
            if self.lockstep is not None:  # one collective per step: stop when all ranks do
                done = not self.lockstep.any_true(not done)
            if done:
                break
            # A finished row feeds pad with mask 0 (outputs ignored) until it leaves the batch.
            attention_mask = torch.cat([attention_mask, active.long()[:, None]], dim=-1)
            if self.compact_finished:
                rows = drop_finished_rows(cache, rows, reasons == 0, n)
                self.batch_rows = rows
            mask = attention_mask if rows is None else attention_mask[rows]
            out = self._forward(
                step + 1,
                "decode" if bool((reasons == 0).any()) else IDLE,
                input_ids=(tokens if rows is None else tokens[rows])[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                **cache_kwargs(self.model, cache),
            )
            # Sampling draws for all n rows, so its random stream does not depend on `rows`.
            logits = (
                out if rows is None else out.new_zeros(n, out.shape[-1]).index_copy_(0, rows, out)
            )
        return _ChunkOut(
            tokens=torch.stack(tokens_out, dim=1).cpu(),
            logprobs=torch.stack(logprobs_out, dim=1).cpu(),
            lengths=lengths.cpu(),
            reasons=reasons.cpu(),
        )

    def _mark_stops(
        self,
        tokens: torch.Tensor,
        reasons: torch.Tensor,
        history: list[list[int]],
        stop: list[str],
    ) -> None:
        """Set reason STOP for rows whose newest tokens complete a stop string.

        Only the last few tokens of each still-running row are decoded: a stop string of c
        characters spans at most c tokens when every token decodes to >= 1 character, and the
        margin of 2 covers tokens that decode to nothing (skipped specials).
        """
        window = max(len(s) for s in stop) + 2
        running = (reasons == 0).nonzero().flatten().tolist()
        new_tokens = tokens.tolist()
        for row in running:
            history[row].append(new_tokens[row])
            tail = self.tokenizer.decode(history[row][-window:], skip_special_tokens=True)
            if any(s in tail for s in stop):
                reasons[row] = _STOP

    def _assemble(
        self,
        prompts: list[list[int]],
        chunks: list[_ChunkOut],
        params: SamplingParams,
        gen_time_s: float,
    ) -> RolloutBatch:
        group_size = params.num_samples_per_prompt
        lengths = torch.cat([c.lengths for c in chunks]).tolist()
        reasons = [_REASONS[r] for r in torch.cat([c.reasons for c in chunks]).tolist()]
        rows = [
            (c.tokens[i], c.logprobs[i], int(c.lengths[i]))
            for c in chunks
            for i in range(len(c.lengths))
        ]
        completion_ids = [tokens[:n].tolist() for tokens, _, n in rows]
        logprobs = pad_sequence([lp[:n] for _, lp, n in rows], batch_first=True)  # pads with 0
        texts = [self.tokenizer.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        texts = [cut_at_stop(t, params.stop)[0] for t in texts]
        return RolloutBatch(
            prompt_ids=[list(p) for p in prompts for _ in range(group_size)],
            completion_ids=completion_ids,
            completion_texts=texts,
            logprobs=logprobs,
            truncated=[r == "length" for r in reasons],
            finish_reason=reasons,
            group_size=group_size,
            gen_time_s=gen_time_s,
            num_prompt_tokens=sum(len(p) for p in prompts),
            num_completion_tokens=sum(lengths),
        )


# vllm_engine imports vLLM itself only when an engine is built, so importing it here is cheap.
_ENGINES: dict[str, Callable[..., RolloutEngine]] = {
    "hf": HFRolloutEngine,
    "vllm": VLLMRolloutEngine,
}


def build_engine(
    backend: str, model: torch.nn.Module, tokenizer: Any, **kwargs: Any
) -> RolloutEngine:
    """Engine for `generation.backend`; kwargs go to the engine's constructor."""
    if backend not in _ENGINES:
        raise UserError(f"generation.backend must be one of {sorted(_ENGINES)}, got {backend!r}")
    return _ENGINES[backend](model, tokenizer, **kwargs)
