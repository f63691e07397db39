"""What a rollout engine is given and returns: `SamplingParams`, `RolloutBatch`, the engine Protocol.

Both engines (`engine.HFRolloutEngine`, `vllm_engine.VLLMRolloutEngine`) and the sampler build on
these, so they live below all three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from moepost.errors import UserError


@dataclass
class SamplingParams:
    """How to sample. `greedy=True` (or temperature 0) takes the argmax at every step."""

    num_samples_per_prompt: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] = field(default_factory=list)
    greedy: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.num_samples_per_prompt >= 1, "num_samples_per_prompt", "an integer >= 1"),
            (self.max_new_tokens >= 1, "max_new_tokens", "an integer >= 1"),
            (self.temperature >= 0.0, "temperature", "a number >= 0 (0 means greedy)"),
            (0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]"),
            (self.top_k >= 0, "top_k", "an integer >= 0 (0 disables top-k)"),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "non-empty strings"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise UserError(f"generation.{key} must be {expected}, got {getattr(self, key)!r}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the distribution the log-probs are reported under (1.0 when T=0)."""
        return self.temperature if self.temperature > 0.0 else 1.0


@dataclass
class RolloutBatch:
    """B prompts x G samples, N = B*G rows in prompt-major order.

    completion_ids: generated tokens up to and including the token that ended the row. An EOS
        token is kept (the policy must learn to emit it); for a stop string the ids run through
        the token that completed it, while `completion_texts` are cut before the stop string.
    logprobs: [N, T] float32 on CPU, T = longest completion, 0.0 past each row's length. Each
        entry is log_softmax(logits / temperature) of the sampled token in float32, taken BEFORE
        top-k / top-p filtering: these are the policy log-probs used as old_logprobs, so they
        describe the unfiltered tempered distribution that the training pass recomputes.
    logprobs_exact: False when the engine cannot report that distribution (vLLM) and the recipe
        must recompute old_logprobs with a training-side forward.
    num_prompt_tokens counts each distinct prompt once (it is prefilled once).
    """

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    completion_texts: list[str]
    logprobs: torch.Tensor
    truncated: list[bool]
    finish_reason: list[str]
    group_size: int
    gen_time_s: float
    num_prompt_tokens: int
    num_completion_tokens: int
    logprobs_exact: bool = True
    # Per row, the experts each fed token was routed to during generation, [L, fed, K]
    # (prompt then completion; -1 where a token was never fed). Set by `batch_routes.generation_routes`.
    routes: list[torch.Tensor] | None = None


class LockStep(Protocol):
    """The two collectives lock-step generation needs (`distributed.DistContext` has them).

    Under sharded weights (FSDP2, ZeRO-3) every forward all-gathers parameters, so all ranks
    must run the same number of forwards: the same number of chunks, and in each chunk the
    same number of decode steps. One `any_true` per decode step decides "someone still runs".
    """

    def any_true(self, flag: bool) -> bool: ...

    def max_int(self, value: int) -> int: ...


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Cut `text` before the earliest occurrence of any stop string; report whether one occurred."""
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
