"""`moepost doctor` lines for routers moepost has not verified (kind "block_topk").

Such a router was found by shape or named by `moe.router_module` (`components/moe_discovery`),
and its routes are read off the block's own top-k (`components/moe_block_hooks`). Two real
forwards over the doctor's prompts check that reading (the aux-loss gradient has its own line):

- router capture: every MoE layer gives logits [tokens, E] and indices [tokens, K] for every
  token fed, and the block's top-k is the top-k of the captured logits (a router whose block
  routes on other scores, e.g. bias-corrected ones, is a WARN: aux loss and load statistics
  would use logits that are not the ones routed on);
- router replay: replaying the model's own routes leaves the output bit-identical, and
  replaying other experts changes it (so the intercepted top-k is the one the experts use).
"""

from __future__ import annotations

import torch

from moepost.components.moe.capture import capture_routing, replay_routing
from moepost.components.rollout.engine import build_training_tensors
from moepost.tools.doctor_setup import Check, DoctorSetup, Status

TOPK_AGREE_WARN = 0.999  # share of (layer, token) whose block top-k = top-k of the logits


def has_custom_router(s: DoctorSetup) -> bool:
    return any(info.kind == "block_topk" for info in s.router.layers)


def _forward(s: DoctorSetup) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    lay = build_training_tensors(s.prompts, [[] for _ in s.prompts], _pad(s), s.device)
    inputs = {k: lay[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return inputs, lay["attention_mask"].flatten().bool()


def _pad(s: DoctorSetup) -> int:
    pad = s.tokenizer.pad_token_id
    return int(pad if pad is not None else s.tokenizer.eos_token_id)


def custom_router_checks(s: DoctorSetup) -> list[Check]:
    """The "router capture" and "router replay" lines (see the module docstring)."""
    inputs, mask = _forward(s)
    s.model.eval()
    with torch.no_grad(), capture_routing(s.model) as cap:
        reference = s.model(**inputs, use_cache=False).logits
    r, tokens = s.router, int(mask.numel())
    logits, indices = cap.logits(), cap.indices()
    want = (r.num_layers, tokens)
    if tuple(logits.shape) != (*want, r.num_experts) or tuple(indices.shape) != (*want, r.top_k):
        detail = (
            f"captured logits {tuple(logits.shape)} and indices {tuple(indices.shape)}, expected "
            f"[L={r.num_layers}, tokens={tokens}, E={r.num_experts} / K={r.top_k}]: set "
            "moe.router_module to the module that computes the router logits"
        )
        return [Check("router capture", "FAIL", detail)]
    top = logits.float().topk(r.top_k, dim=-1).indices.sort(-1).values
    agree = (top == indices.sort(-1).values).all(-1)[:, mask]  # [L, real tokens]
    share = float(agree.float().mean())
    first = r.layers[0]
    detail = (
        f"{r.num_layers} routers like {first.name} ({type(first.router).__name__}): logits "
        f"[tokens, {r.num_experts}] for all {tokens} tokens fed; the block's top-{r.top_k} is the "
        f"top-{r.top_k} of the captured logits at {share:.1%} of {int(mask.sum())} prompt tokens"
    )
    status: Status = "OK"
    if share < TOPK_AGREE_WARN:
        status = "WARN"
        detail += (
            ": the block routes on other scores than the captured logits; aux loss and load "
            "statistics use the captured ones (check moe.router_module)"
        )
    checks = [Check("router capture", status, detail)]
    checks.append(_replay_check(s, inputs, reference, indices))
    s.model.train()
    return checks


def _replay_check(
    s: DoctorSetup, inputs: dict[str, torch.Tensor], reference: torch.Tensor, own: torch.Tensor
) -> Check:
    """Own routes [L, N, K] replayed: bit-identical output; other experts: a different one."""
    with torch.no_grad(), replay_routing(s.model, own):
        same = s.model(**inputs, use_cache=False).logits
    # Every chosen expert moved one up: still K distinct experts per token, none as before.
    other = (own + 1) % s.router.num_experts
    with torch.no_grad(), replay_routing(s.model, other):
        moved = s.model(**inputs, use_cache=False).logits
    if not torch.equal(same, reference):
        diff = float((same - reference).abs().max())
        detail = f"replaying the model's own routes changed the logits (max |diff| {diff:.3g})"
        return Check("router replay", "FAIL", detail + ": moepost cannot replay this router")
    if torch.equal(moved, reference):
        detail = "replaying other experts did not change the output: the intercepted top-k "
        return Check("router replay", "FAIL", detail + "is not what the experts use")
    change = float((moved - reference).abs().max())
    detail = (
        f"own routes replayed: output bit-identical; other experts: max |logit change| {change:.3g}"
    )
    return Check("router replay", "OK", detail)
