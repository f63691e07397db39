"""`moepost doctor`: pre-flight MoE checks of a run config on a few of its own prompts.

The model is loaded and set up exactly as the run would (LoRA, gradient checkpointing, router
freezing through `router_setup`), then:

1. MoE layers: how many, router kind, E and K (a dense model is a WARN: router tools are off).
2. Router logits: what capture sees at the router must be raw logits, not probabilities.
3. Aux-loss gradient: the HF-scaled load-balancing loss from the captured logits, backward, and
   the gradient norm that reaches the router's trainable parameters (weights or LoRA adapters).
4. Aux coefficient: the effective `router_aux_loss_coef` and where it comes from.
5. Expert load of the prompt tokens: normalised entropy and dead experts per layer.
   (Routers moepost has not verified get two more lines, see `doctor_router`: capture of
   [tokens, E] logits consistent with the block's top-k, and replay of the model's own routes.)
6. Train vs rollout: a few completions from `HFRolloutEngine` with the routes of every decode
   step captured, then the training-layout forward: log-prob gap and routing flip rate over the
   completion tokens (and, with `moe.routing_replay=r3`, the gap under replay).
7. Memory: `plan.estimate_memory` for this setup against the device's memory.

Each line is OK / WARN / FAIL; the exit code is 1 when any line is FAIL.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from moepost.algorithms.moe import (
    expert_load_stats,
    load_balancing_loss,
    looks_like_probabilities,
)
from moepost.components.moe.capture import (
    RouterCapture,
    capture_routing,
    router_parameters,
    unwrap_model,
)
from moepost.components.moe.router_setup import router_setup
from moepost.components.rollout.engine import build_training_tensors
from moepost.config.schema import Config
from moepost.tools.doctor_rollout import measure_rollout_gap
from moepost.tools.doctor_router import custom_router_checks, has_custom_router
from moepost.tools.doctor_setup import Check, DoctorSetup

NUM_PROMPTS = 4  # prompts in the router probe (checks 2-5)
GAP_WARN = 0.05  # mean |train - rollout| log-prob per completion token
FLIP_WARN = 0.1  # share of (layer, token) whose top-k set differs


@dataclass
class _Probe:
    """One training-mode forward over the prompts with routing captured (logits keep grads)."""

    cap: RouterCapture
    mask: torch.Tensor  # [N] real (non-padding) token rows, in router row order


def doctor_prompts(cfg: Config, tokenizer: Any, n: int = NUM_PROMPTS) -> list[list[int]]:
    """Token ids of the first `n` prompts of the config's training data.

    RL: the prompts as the recipe builds them. SFT: each example up to its first trained token
    (the prompt part), or its first half when every token is trained (plain text).
    """
    from moepost.components.data.formats import IGNORE_INDEX
    from moepost.components.data.loading import load_rl_data, load_sft_data

    seed = cfg.train.seed
    if cfg.data.streaming:  # the stream's first n examples; the source may not fit in memory
        from moepost.components.data.loading import stream_rl_data, stream_sft_data

        loader = stream_rl_data if cfg.stage == "rl" else stream_sft_data
        stream, _, _ = loader(cfg.data, cfg.misc, tokenizer, seed=seed)
        train: list[Any] = stream.take(n)
    elif cfg.stage == "rl":
        train, _, _ = load_rl_data(cfg.data, cfg.misc, tokenizer, seed=seed)
    else:
        train, _, _ = load_sft_data(cfg.data, cfg.misc, tokenizer, seed=seed)
    if cfg.stage == "rl":
        return [list(ex.prompt_ids) for ex in train[:n]]
    prompts = []
    for ex in train[:n]:
        first = next((i for i, label in enumerate(ex.labels) if label != IGNORE_INDEX), 0)
        if first < 2:
            first = max(1, len(ex.input_ids) // 2)
        prompts.append(list(ex.input_ids[: min(first, cfg.data.max_prompt_length)]))
    return prompts


def _guard(name: str, fn: Callable[[], Check | list[Check]]) -> list[Check]:
    """Run one check; a crash becomes a FAIL line instead of hiding the other checks."""
    try:
        out = fn()
    except Exception as err:  # noqa: BLE001 - reported in the table, not swallowed
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return [Check(name, "FAIL", f"{type(err).__name__}: {first}"[:300])]
    return out if isinstance(out, list) else [out]


def prepare(config_path: str | None, overrides: list[str]) -> DoctorSetup:
    """Config, tokenizer, prompts and the model set up as the run would set it up."""
    from moepost.components.model.loading import load_policy, load_tokenizer, resolve_device
    from moepost.config.load import load_config

    cfg = load_config(config_path, overrides)
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.misc.device)
    tokenizer = load_tokenizer(cfg.model, cfg.misc)
    prompts = doctor_prompts(cfg, tokenizer)
    model = load_policy(cfg.model, cfg.misc, device=device, for_training=True)
    return DoctorSetup(cfg, model, tokenizer, router_setup(model, cfg.moe), prompts, device)


def diagnose(config_path: str | None, overrides: list[str]) -> list[Check]:
    """Every check of the module docstring, in table order."""
    s = prepare(config_path, overrides)
    checks = [_layers_check(s)]
    if s.router.layers:
        probe: list[_Probe] = []
        load: list[Check] = []
        checks += _guard("router logits", lambda: _logits_check(s, probe))
        if probe:
            load = _guard("expert load (prompts)", lambda: _load_check(s, probe[0]))
            checks += _guard("aux loss gradient", lambda: _aux_grad_check(s, probe[0]))
            probe[0].cap.clear()  # frees the graph the captured logits hold
        checks += _guard("aux coefficient", lambda: _aux_coef_check(s))
        checks += load
        if has_custom_router(s):  # found by shape or named by moe.router_module
            checks += _guard("router capture", lambda: custom_router_checks(s))
    checks += _guard("train vs rollout", lambda: _rollout_checks(s))
    checks += _guard("memory", lambda: _memory_check(s))
    return checks


def run_doctor(config_path: str | None, overrides: list[str]) -> int:
    """`moepost doctor CONFIG [key=value ...]`: print the checks; 1 if any FAILed, else 0."""
    checks = diagnose(config_path, overrides)
    print_table(checks)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def print_table(checks: list[Check]) -> None:
    """A rich table on a terminal, plain aligned columns otherwise; then a summary line."""
    counts = {s: sum(c.status == s for c in checks) for s in ("OK", "WARN", "FAIL")}
    summary = f"{len(checks)} checks: " + ", ".join(f"{n} {s}" for s, n in counts.items())
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title="moepost doctor")
        for column in ("check", "status", "detail"):
            table.add_column(column, overflow="fold")
        colours = {"OK": "green", "WARN": "yellow", "FAIL": "bold red"}
        for c in checks:
            table.add_row(c.name, f"[{colours[c.status]}]{c.status}[/]", c.detail)
        Console().print(table, summary, sep="\n")
        return
    width = max(len("check"), *(len(c.name) for c in checks))
    print(f"{'check':<{width}}  status  detail")
    for c in checks:
        print(f"{c.name:<{width}}  {c.status:<6}  {c.detail}")
    print(summary)


# ---- router checks (MoE models only) ------------------------------------------------------


def _layers_check(s: DoctorSetup) -> Check:
    r = s.router
    if not r.layers:
        return Check("MoE layers", "WARN", "no MoE layers: aux loss, monitoring and replay are off")
    info = r.layers[0]
    detail = f"{r.num_layers} MoE layers, {type(info.router).__name__} ({info.kind}), "
    if info.kind == "block_topk":
        how = f"moe.router_module '{s.cfg.moe.router_module}'" if s.cfg.moe.router_module else ""
        detail += f"not verified, taken at {info.name} by {how or 'shape'}, "
    return Check("MoE layers", "OK", detail + f"E={r.num_experts}, K={r.top_k}")


def _logits_check(s: DoctorSetup, out: list[_Probe]) -> Check:
    """Training-mode forward over the prompts; the probe it leaves feeds the next checks."""
    name = "router logits"
    lay = build_training_tensors(s.prompts, [[] for _ in s.prompts], _pad_id(s), s.device)
    s.model.train()
    s.model.zero_grad(set_to_none=True)
    inputs = {k: lay[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with capture_routing(s.model) as cap:
        s.model(**inputs, use_cache=False, logits_to_keep=1)
    mask = lay["attention_mask"].flatten().bool()
    out.append(_Probe(cap, mask))
    logits = cap.logits()[:, mask]  # [L, n_real, E]
    if not bool(torch.isfinite(logits).all()):
        return Check(name, "FAIL", "router logits hold NaN/Inf on the prompts")
    as_probs = [i for i in range(logits.shape[0]) if looks_like_probabilities(logits[i])]
    if as_probs:
        msg = f"router returns probabilities, not logits (MoE layers {as_probs}): "
        return Check(name, "FAIL", msg + "the aux loss would be computed on softmax(softmax)")
    std = float(logits.detach().float().std())
    detail = f"raw logits captured at {logits.shape[0]} routers ({int(mask.sum())} prompt tokens"
    return Check(name, "OK", f"{detail}, logit std {std:.3g})")


def _router_grad_norms(s: DoctorSetup) -> list[float | None]:
    """Per MoE layer: grad norm over its trainable router params (None: nothing trainable)."""
    params = router_parameters(s.model, include_adapters=True)
    norms: list[float | None] = []
    for info in s.router.layers:
        prefix = info.name.replace(".base_layer", "") + "."
        mine = [
            p
            for n, p in params
            if p.requires_grad
            and n.replace(".base_layer", "").removeprefix("base_model.model.").startswith(prefix)
        ]
        squares = [float(p.grad.float().square().sum()) for p in mine if p.grad is not None]
        norms.append(sum(squares) ** 0.5 if mine else None)
    return norms


def _aux_grad_check(s: DoctorSetup, probe: _Probe) -> Check:
    name, r = "aux loss gradient", s.router
    aux = load_balancing_loss(probe.cap.logits(), r.top_k, probe.mask)
    if aux.requires_grad:
        aux.backward()
    norms = _router_grad_norms(s)
    grads = [p.grad for p in s.model.parameters() if p.requires_grad and p.grad is not None]
    upstream = sum(float(g.float().square().sum()) for g in grads) ** 0.5
    s.model.zero_grad(set_to_none=True)
    value = f"aux = {float(aux.detach()):.4f} (K = {r.top_k} at perfect balance)"
    if all(n is None for n in norms):
        # The router weights cannot move, but the aux loss still shapes the router's inputs.
        why = "frozen by moe.freeze_router" if s.cfg.moe.freeze_router else "not trainable"
        if not s.cfg.moe.freeze_router:
            why += " (LoRA without model.lora.target_router)"
        if upstream > 0 or r.aux_coef == 0:
            detail = f"router {why}: the aux loss acts through the router inputs only "
            return Check(name, "OK", detail + f"(|grad| = {upstream:.3g}); {value}")
        msg = f"router {why} and the aux loss (coef {r.aux_coef:g}) reaches no trainable "
        return Check(name, "WARN", msg + "parameter: it only costs compute; set it to 0")
    dead = [i for i, n in enumerate(norms) if n is not None and not 0 < n < float("inf")]
    if dead:
        msg = f"no (finite) aux-loss gradient reaches the router of MoE layers {dead}: "
        return Check(name, "FAIL", msg + "the captured logits are detached from the router")
    total = sum(n * n for n in norms if n is not None) ** 0.5
    return Check(name, "OK", f"reaches the router: |grad| = {total:.3g}; {value}")


def _aux_coef_check(s: DoctorSetup) -> Check:
    r, moe = s.router, s.cfg.moe
    source = "moe.router_aux_loss_coef" if moe.router_aux_loss_coef is not None else ""
    source = source or "the checkpoint's router_aux_loss_coef"
    if r.aux_coef == 0 and s.cfg.stage == "sft":
        msg = f"aux loss is off in SFT ({source} = 0): the routers may drift towards a few "
        return Check("aux coefficient", "WARN", msg + "experts; set moe.router_aux_loss_coef")
    extra = f", z-loss {r.z_coef:g}" if r.z_coef else ""
    detail = f"{r.aux_coef:g} from {source}, scope {moe.aux_loss_scope}{extra}"
    return Check("aux coefficient", "OK", detail)


def _load_check(s: DoctorSetup, probe: _Probe) -> Check:
    name, r, moe = "expert load (prompts)", s.router, s.cfg.moe
    indices = probe.cap.indices()
    stats = expert_load_stats(indices, r.num_experts, probe.mask.to(indices.device))
    entropy, dead = stats["entropy"], stats["dead"]
    tokens = int(probe.mask.sum())
    # Dead experts only mean something with enough (token, choice) slots per expert.
    enough = tokens * r.top_k >= 8 * r.num_experts
    collapsed = {i for i, e in enumerate(entropy.tolist()) if e < moe.collapse_entropy_threshold}
    if enough:
        collapsed |= {i for i, d in enumerate(dead.tolist()) if d > moe.collapse_dead_threshold}
    detail = (
        f"entropy min {float(entropy.min()):.3f} / mean {float(entropy.mean()):.3f}, dead experts "
        f"{int(dead.sum())} over {r.num_layers} layers ({tokens} prompt tokens)"
    )
    if collapsed:
        return Check(name, "WARN", f"collapsed in MoE layers {sorted(collapsed)}: {detail}")
    return Check(name, "OK", detail + ("" if enough else "; too few tokens to judge dead experts"))


def _pad_id(s: DoctorSetup) -> int:
    pad = s.tokenizer.pad_token_id
    return int(pad if pad is not None else s.tokenizer.eos_token_id)


# ---- train vs rollout -----------------------------------------------------------------------


def _rollout_checks(s: DoctorSetup) -> list[Check]:
    m = measure_rollout_gap(s)
    gap = m.get("gap_replayed", m["gap_mean"])
    detail = (
        f"|logprob gap| mean {m['gap_mean']:.3g}, max {m['gap_max']:.3g} over "
        f"{int(m['tokens'])} completion tokens"
    )
    if "gap_replayed" in m:
        detail += f"; with r3 replay mean {m['gap_replayed']:.3g}"
    if gap > GAP_WARN:
        detail += (
            ": use GSPO (sequence-level ratios) or moe.routing_replay=r3, or freeze the router"
        )
    checks = [Check("train vs rollout logprob", "WARN" if gap > GAP_WARN else "OK", detail)]
    if "flip_rate" in m:
        detail = (
            f"flip rate {m['flip_rate']:.3g} (share of experts replaced {m['replaced_share']:.3g})"
        )
        warn = m["flip_rate"] > FLIP_WARN and s.cfg.moe.routing_replay != "r3"
        if warn:
            detail += ": enable moe.routing_replay=r3 (replays the rollout's experts) or freeze the router"
        checks.append(Check("train vs rollout routing", "WARN" if warn else "OK", detail))
    return checks


# ---- memory ---------------------------------------------------------------------------------


def _device_memory(device: torch.device) -> tuple[float | None, str]:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return float(props.total_memory), props.name
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "host RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown device memory"


def _memory_check(s: DoctorSetup) -> Check:
    from moepost.tools.param_count import counts_from_model
    from moepost.tools.plan import estimate_memory, gib

    base = unwrap_model(s.model)
    gpus = int(os.environ.get("WORLD_SIZE", "1"))
    counts = counts_from_model(s.model)
    dtype = base.dtype  # a PreTrainedModel's (its first floating-point parameter's)
    est = estimate_memory(
        base.config, s.cfg, gpus, dtype=dtype if isinstance(dtype, torch.dtype) else None,
        counts=counts,
    )  # fmt: skip
    total, (capacity, what) = est["total_bytes"], _device_memory(s.device)
    parts = (
        f"weights {gib(est['weights_bytes'])}, grads {gib(est['grads_bytes'])}, optimizer "
        f"{gib(est['optimizer_bytes'] + est['master_weights_bytes'])}, activations+logits "
        f"{gib(est['activations_bytes'] + est['logits_bytes'])}, KV {gib(est['kv_cache_bytes'])}"
    )
    if capacity is None:
        return Check("memory", "OK", f"~{gib(total)} per device ({parts}); {what}")
    verdict = "exceeds" if total > capacity else "of"
    detail = f"~{gib(total)} per device {verdict} {gib(capacity)} {what} ({parts})"
    return Check("memory", "WARN" if total > capacity else "OK", detail)
