"""`moepost doctor`'s train-vs-rollout check: a few sampled completions, their routes, and the
training-layout forward over them (the log-prob gap and the routing flip rate between the two).
"""

from __future__ import annotations

from typing import Any

import torch

from moepost.algorithms.logprobs import token_logprobs
from moepost.algorithms.moe import routing_drift
from moepost.components.moe.capture import RouterCapture, capture_routing, replay_routing
from moepost.components.rollout.batch_routes import batch_routes, generation_routes
from moepost.components.rollout.engine import (
    HFRolloutEngine,
    SamplingParams,
    build_training_tensors,
)
from moepost.tools.doctor_setup import DoctorSetup

ROLLOUT_PROMPTS = 2  # prompts x up to ROLLOUT_SAMPLES samples in the train-vs-rollout check
ROLLOUT_SAMPLES = 2
ROLLOUT_TOKENS = 16


def measure_rollout_gap(s: DoctorSetup) -> dict[str, float]:
    """Sample a few completions, capture their routes, compare with the training forward.

    Returns gap_mean / gap_max (|train - rollout| log-prob over completion tokens), tokens,
    and for a MoE model flip_rate / replaced_share (generation vs training routes) and, with
    routing_replay r3, gap_replayed (the training forward replaying the generation routes).
    """
    g = s.cfg.generation
    temperature = g.temperature if g.temperature > 0 else 1.0
    params = SamplingParams(
        num_samples_per_prompt=max(1, min(g.num_samples_per_prompt, ROLLOUT_SAMPLES)),
        max_new_tokens=min(g.max_new_tokens, ROLLOUT_TOKENS),
        temperature=temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        stop=list(g.stop),
        seed=s.cfg.train.seed,
    )
    phases: list[tuple[str, torch.Tensor | None]] = []  # as `batch_routes.capture_generation`
    engine = HFRolloutEngine(
        s.model,
        s.tokenizer,
        device=s.device,
        step_callback=lambda i, phase: phases.append((phase, engine.batch_rows)),
    )
    prompts = s.prompts[:ROLLOUT_PROMPTS]
    with capture_routing(s.model, keep_logits=False) as gen_cap:
        batch = engine.generate(prompts, params)
    lay = build_training_tensors(
        batch.prompt_ids, batch.completion_ids, engine.pad_token_id, s.device
    )
    mask = lay["completion_mask"]  # [N, T]
    rollout = batch.logprobs.to(s.device)[:, : mask.shape[1]]
    logprobs, train_cap = _training_pass(s, lay, temperature)
    tokens = float(mask.sum())
    gap = (logprobs - rollout).abs() * mask
    out = {
        "gap_mean": float(gap.sum()) / max(tokens, 1.0),
        "gap_max": float(gap.max()),
        "tokens": tokens,
    }
    if not s.router.layers:
        return out
    # The RL recipe's own R3 path lays the generation routes out in the training layout, so
    # this also checks that path: in float32 the flip rate must be exactly 0.
    routes = generation_routes(s.router, [gen_cap, phases], prompts, batch, 0)
    num_rows, seq = lay["input_ids"].shape
    full = batch_routes(s.router, routes, batch.prompt_ids, seq, lay["prompt_length"]).rollout
    if full is None:  # the engine reported no steps: nothing to compare
        return out
    num_layers, top_k = full.shape[0], full.shape[-1]
    train = train_cap.indices().reshape(num_layers, num_rows, seq, top_k)
    p_len = lay["prompt_length"]
    gen, train = full[:, :, p_len:], train[:, :, p_len:]
    fed = mask.bool() & (gen[0, :, :, 0] >= 0)  # the last token of a row is never fed back
    flat = (gen.reshape(num_layers, -1, top_k), train.reshape(num_layers, -1, top_k))
    drift = routing_drift(*flat, fed.flatten())
    out["flip_rate"] = float(drift["flip_rate"])
    out["replaced_share"] = float(drift["replaced_share"])
    if s.cfg.moe.routing_replay == "r3":
        with replay_routing(s.model, full.reshape(num_layers, num_rows * seq, top_k)):
            replayed, _ = _training_pass(s, lay, temperature)
        out["gap_replayed"] = float(((replayed - rollout).abs() * mask).sum()) / max(tokens, 1.0)
    return out


def _training_pass(
    s: DoctorSetup, lay: dict[str, Any], temperature: float
) -> tuple[torch.Tensor, RouterCapture]:
    """[N, T] log-probs of the completions from the training-layout forward, and its routes."""
    s.model.train()
    inputs = {k: lay[k] for k in ("input_ids", "attention_mask", "position_ids")}
    keep = lay["num_completion_positions"] + 1
    with torch.no_grad(), capture_routing(s.model, keep_logits=False) as cap:
        logits = s.model(**inputs, use_cache=False, logits_to_keep=keep).logits[:, :-1]
        logprobs = token_logprobs(
            logits,
            lay["completion_ids"],
            temperature=temperature,
            logits_clip=s.cfg.stability.logits_clip,
            logprob_min=s.cfg.stability.logprob_min,
        )
    return logprobs, cap
