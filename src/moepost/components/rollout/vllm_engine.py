"""Colocated vLLM rollout engine (`generation.backend: vllm`, optional extra `moepost[vllm]`).

UNTESTED HERE: vLLM does not run on the CPU machine this project is developed on, so only the
missing-package error is covered by tests. The calls follow the vLLM >= 0.10 offline API
(`LLM.generate` with token-id prompts, `LLM.apply_model`, `LLM.reset_prefix_cache`).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from moepost.components.rollout.interface import RolloutBatch, SamplingParams, cut_at_stop
from moepost.errors import UserError


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:
        raise UserError(
            "generation.backend=vllm needs vLLM: pip install 'moepost[vllm]' "
            f"(or set generation.backend: hf); import failed: {err}"
        ) from err
    return vllm


def _finish_reason(output: Any) -> str:
    """vLLM says "stop" for EOS, stop tokens and stop strings; stop_reason tells them apart."""
    if output.finish_reason == "length":
        return "length"
    return "stop" if isinstance(output.stop_reason, str) else "eos"


class VLLMRolloutEngine:
    """Generation with a vLLM `LLM` living in the training process (colocated).

    model: the policy (unwrapped nn.Module); its `name_or_path` is what vLLM loads unless
        `model_path` is given. vLLM keeps its own copy of the weights: call `sync_weights(policy)`
        after every optimizer step that should affect the next rollout.
    llm_kwargs: passed to `vllm.LLM` (e.g. gpu_memory_utilization, max_model_len, dtype,
        tensor_parallel_size, enable_sleep_mode).

    Log-probs: vLLM reports the sampled token's log-prob of the raw (temperature 1) distribution
    computed by its own kernels, not of the tempered one the training pass uses, so the batch has
    `logprobs_exact=False`: the recipe must recompute old_logprobs with a training forward and can
    use these values only to measure the rollout-vs-train mismatch.
    Set VLLM_ENABLE_V1_MULTIPROCESSING=0 so the engine runs in-process; otherwise `sync_weights`
    ships the whole state dict to the engine process on every call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_path: str | None = None,
        eos_token_ids: list[int] | None = None,
        gpu_memory_utilization: float = 0.3,
        seed: int = 0,
        **llm_kwargs: Any,
    ) -> None:
        vllm = _import_vllm()
        self._vllm = vllm
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids or [])
        path = model_path or getattr(model, "name_or_path", None)
        if not path:
            raise UserError("model.policy_name_or_path: vLLM needs a checkpoint path to load")
        self.llm = vllm.LLM(
            model=str(path),
            gpu_memory_utilization=gpu_memory_utilization,
            seed=seed,
            enable_prefix_caching=True,
            **llm_kwargs,
        )

    def _sampling_params(self, params: SamplingParams) -> Any:
        return self._vllm.SamplingParams(
            n=params.num_samples_per_prompt,
            max_tokens=params.max_new_tokens,
            temperature=0.0 if params.is_greedy else params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else -1,
            stop=list(params.stop) or None,
            stop_token_ids=self.eos_token_ids or None,
            include_stop_str_in_output=False,
            skip_special_tokens=True,
            logprobs=0,  # 0 = only the sampled token's log-prob
            seed=params.seed,
        )

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        start = time.perf_counter()
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        outputs = self.llm.generate(requests, self._sampling_params(params), use_tqdm=False)
        gen_time_s = time.perf_counter() - start
        completion_ids: list[list[int]] = []
        texts: list[str] = []
        reasons: list[str] = []
        logprob_rows: list[list[float]] = []
        for request in outputs:
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                completion_ids.append(ids)
                texts.append(cut_at_stop(out.text, params.stop)[0])
                reasons.append(_finish_reason(out))
                steps = out.logprobs or []
                logprob_rows.append([step[tok].logprob for step, tok in zip(steps, ids)])
        width = max((len(r) for r in logprob_rows), default=0)
        logprobs = torch.zeros((len(logprob_rows), width), dtype=torch.float32)
        for i, row in enumerate(logprob_rows):
            logprobs[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        group_size = params.num_samples_per_prompt
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
            num_completion_tokens=sum(len(c) for c in completion_ids),
            logprobs_exact=False,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy the policy's current weights into vLLM's model (HF names; vLLM maps them).

        LoRA policies must be merged first (vLLM's loader expects base parameter names). Under
        FSDP / ZeRO-3 gather a full state dict before calling this.
        """
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]

        def load(vllm_model: Any) -> None:  # vLLM's model class (no stubs)
            vllm_model.load_weights(weights)  # returns the loaded names; not worth shipping back

        if hasattr(self.llm, "apply_model"):
            self.llm.apply_model(load)
        else:  # vLLM V0 engines without apply_model
            runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
            runner.model.load_weights(weights)
        # Cached prefixes were computed with the old weights.
        self.llm.reset_prefix_cache()
