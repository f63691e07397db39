"""Gradient transforms for numerically stable updates (docs/ALGORITHMS.md, "Numerical stability").

Every transform works in place on a list of gradient tensors (``p.grad`` of each trainable
parameter, ``None`` for a parameter without a gradient this step; ``None`` entries are skipped)
and returns a metrics dict of python floats / ints. Reductions are done in float32 whatever the
gradient dtype.

Order inside one optimizer step, after the backward passes of all micro-batches:

1. ``centralize_gradients``  (optional)
2. ``normalize_gradients``   (optional)
3. ``GlobalAdaptiveClipper`` / ``PerTensorAdaptiveClipper`` / ``clip_by_global_norm``
4. non-finite check on the raw global norm returned by step 3: if it is inf/NaN, every rank
   skips the step and zeroes its gradients (the clippers leave non-finite gradients untouched
   and never let a non-finite norm into their EMA state)
5. optimizer step

Under data parallelism the gradients must already be reduced (the same on every rank), so every
rank computes the same norms and the same decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "GlobalAdaptiveClipper",
    "PerTensorAdaptiveClipper",
    "centralize_gradients",
    "clip_by_global_norm",
    "global_grad_norm",
    "normalize_gradients",
    "stochastic_round_to_bf16",
]

Grads = Sequence[Tensor | None]


def _present(grads: Grads) -> list[Tensor]:
    return [g for g in grads if g is not None]


def _tensor_norms(grads: list[Tensor]) -> Tensor:
    """[n] float32 L2 norms of the tensors, on the first tensor's device."""
    if not grads:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float32).to(device) for g in grads]
    by_mesh: dict[int, list[int]] = {}
    for i, n in enumerate(norms):
        by_mesh.setdefault(id(getattr(n, "device_mesh", None)), []).append(i)
    if len(by_mesh) == 1:
        return torch.stack(norms)
    # Sharded gradients (DTensors) on several device meshes (expert parallelism: experts on
    # their own mesh) cannot be stacked together: each mesh's norms are reduced over that mesh
    # (`full_tensor`, one collective per mesh) and the plain results put back in order.
    out = torch.empty(len(norms), dtype=torch.float32, device=device)
    for idx in by_mesh.values():
        stacked = torch.stack([norms[i] for i in idx])
        full = stacked.full_tensor() if hasattr(stacked, "full_tensor") else stacked
        out[torch.tensor(idx, device=device)] = full.to(device)
    return out


def _mul_(g: Tensor, scale: Tensor) -> None:
    """g *= scale in place, computed in float32 so a bf16 gradient does not see a bf16 scale."""
    scale = scale.to(g.device)
    if g.dtype in (torch.float32, torch.float64):
        g.mul_(scale.to(g.dtype))
    else:
        g.copy_(g.float() * scale)


def global_grad_norm(grads: Grads) -> Tensor:
    """L2 norm of all gradients seen as one vector: float32 scalar, may be inf / NaN."""
    norms = _tensor_norms(_present(grads))
    return (
        torch.linalg.vector_norm(norms) if norms.numel() else torch.zeros((), dtype=torch.float32)
    )


@torch.no_grad()
def centralize_gradients(grads: Grads) -> dict[str, int]:
    """Gradient centralisation: for tensors with dim > 1, subtract the mean over all dims but the
    first (one mean per output row), in place. 1-D tensors (biases, norms) are left alone."""
    done = 0
    for g in _present(grads):
        if g.dim() > 1:
            row_mean = g.mean(dim=tuple(range(1, g.dim())), keepdim=True, dtype=torch.float32)
            g.sub_(row_mean.to(g.dtype))
            done += 1
    return {"centralized": done}


@torch.no_grad()
def normalize_gradients(grads: Grads, alpha: float, *, min_std: float = 1e-8) -> dict[str, int]:
    """Gradient normalisation per tensor: g <- (1 - alpha) g + alpha g / std(g), in place.

    std is the sample std (Bessel's correction, torch's default). A tensor is skipped (left as
    is) when it has fewer than 2 elements (std undefined), or its std is <= ``min_std`` or not
    finite (dividing would blow it up or spread NaN). Returns counts of normalised / skipped.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    present = [g for g in _present(grads) if g.numel() >= 2]
    skipped = len(_present(grads)) - len(present)
    if not present:
        return {"normalized": 0, "skipped": skipped}
    ok_flags = []
    for g in present:
        std = g.float().std()
        ok = torch.isfinite(std) & (std > min_std)
        # Decide on-device so the loop needs no host sync per tensor.
        scale = torch.where(ok, (1.0 - alpha) + alpha / std, torch.ones_like(std))
        _mul_(g, scale)
        ok_flags.append(ok.to(present[0].device))
    n_ok = int(torch.stack(ok_flags).sum().item())
    return {"normalized": n_ok, "skipped": skipped + len(present) - n_ok}


@torch.no_grad()
def _scale_(grads: list[Tensor], coef: float) -> None:
    for g in grads:
        g.mul_(coef)


def clip_by_global_norm(
    grads: Grads, max_norm: float, *, norm: float | None = None
) -> dict[str, float]:
    """Plain global-norm clipping: scale all gradients by max_norm / norm when norm > max_norm.

    The coefficient is exactly max_norm / norm (no epsilon). A non-finite norm leaves the
    gradients untouched (clip_coef 1.0): the non-finite guard that follows skips the step.
    `norm`: the global norm of `grads` when the caller already has it (one pass fewer).
    """
    present = _present(grads)
    raw = float(global_grad_norm(present).item()) if norm is None else float(norm)
    coef = 1.0
    if math.isfinite(raw) and raw > max_norm:
        coef = max_norm / raw
        _scale_(present, coef)
    return {"grad_norm_raw": raw, "grad_norm_clipped": raw * coef, "clip_coef": coef}


class GlobalAdaptiveClipper:
    """Clip the global gradient norm at ``coef`` x an EMA of past (clipped) global norms.

    Per call: ``threshold = coef * ema``; if the raw norm exceeds it, all gradients are scaled
    by threshold / norm; then ``ema <- beta * ema + (1 - beta) * clipped_norm``.
    The first finite norm initialises the EMA and is not clipped adaptively (there is no
    history yet). During the first ``warmup_steps`` finite steps, and on that first step, the
    threshold is the absolute ``warmup_max_norm`` instead (None = no clipping). Non-finite
    norms leave gradients and state untouched.
    """

    def __init__(
        self,
        ema_beta: float = 0.99,
        coef: float = 1.5,
        warmup_steps: int = 0,
        warmup_max_norm: float | None = None,
    ) -> None:
        if not 0.0 <= ema_beta < 1.0 or coef <= 0.0 or warmup_steps < 0:
            raise ValueError("need 0 <= ema_beta < 1, coef > 0 and warmup_steps >= 0")
        self.ema_beta = ema_beta
        self.coef = coef
        self.warmup_steps = warmup_steps
        self.warmup_max_norm = warmup_max_norm
        self.ema: float | None = None
        self.step = 0  # finite steps seen

    @torch.no_grad()
    def __call__(self, grads: Grads) -> dict[str, float]:
        present = _present(grads)
        raw = float(global_grad_norm(present).item())
        metrics = {"grad_norm_raw": raw, "grad_norm_clipped": raw, "clip_coef": 1.0}
        if not math.isfinite(raw):
            return metrics | {"grad_norm_ema": self.ema or 0.0, "clipped_tensors": 0}
        if self.ema is None or self.step < self.warmup_steps:
            threshold = math.inf if self.warmup_max_norm is None else self.warmup_max_norm
        else:
            threshold = self.coef * self.ema
        coef = threshold / raw if raw > threshold else 1.0
        if coef < 1.0:
            _scale_(present, coef)
        clipped = raw * coef
        beta = self.ema_beta
        self.ema = clipped if self.ema is None else beta * self.ema + (1.0 - beta) * clipped
        self.step += 1
        return {
            "grad_norm_raw": raw,
            "grad_norm_clipped": clipped,
            "clip_coef": coef,
            "grad_norm_ema": self.ema,
            "clipped_tensors": len(present) if coef < 1.0 else 0,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = None if state["ema"] is None else float(state["ema"])
        self.step = int(state["step"])


class PerTensorAdaptiveClipper:
    """AdaGC (Wang et al. 2025, arXiv:2502.11034): per-tensor clipping against an EMA gamma_i
    of that tensor's past clipped norms. Defaults are the paper's: relative threshold
    lambda_rel = ``coef`` = 1.05, beta = 0.98, 100 warm-up steps with global clipping at
    lambda_abs = ``warmup_max_norm`` = 1.0.

    - Warm-up (the first ``warmup_steps`` finite steps): plain global clipping at
      ``warmup_max_norm``; gamma_i = min(gamma_i, ||clipped g_i||) (a running minimum).
    - Afterwards: g_i <- g_i * min(1, coef * gamma_i / ||g_i||);
      gamma_i <- beta * gamma_i + (1 - beta) * ||clipped g_i||.

    Additions to the paper, for MoE and LoRA: a tensor whose gradient is exactly zero or None
    (an expert that got no token this step) leaves its gamma untouched, since a zero would freeze
    it forever; a tensor never seen with a non-zero gradient has no gamma yet and, after
    warm-up, is clipped at ``warmup_max_norm`` and starts its gamma from there.
    Note that an expert whose load grows can only raise its threshold by a factor of about
    beta + (1 - beta) * coef per step.
    The list of gradients must have the same length and order at every call (pass ``p.grad``
    of every trainable parameter, ``None`` included).
    """

    def __init__(
        self,
        ema_beta: float = 0.98,
        coef: float = 1.05,
        warmup_steps: int = 100,
        warmup_max_norm: float = 1.0,
    ) -> None:
        if not 0.0 <= ema_beta < 1.0 or coef <= 0.0 or warmup_steps < 0 or warmup_max_norm <= 0:
            raise ValueError("need 0 <= ema_beta < 1, coef > 0, warmup_steps >= 0, max norm > 0")
        self.ema_beta = ema_beta
        self.coef = coef
        self.warmup_steps = warmup_steps
        self.warmup_max_norm = warmup_max_norm
        self.gamma: Tensor | None = None  # [num_tensors] float32, NaN = not seen yet
        self.step = 0

    @torch.no_grad()
    def __call__(self, grads: Grads) -> dict[str, float]:
        if self.gamma is None:
            self.gamma = torch.full((len(grads),), float("nan"), dtype=torch.float32)
        if len(grads) != self.gamma.numel():
            raise ValueError(
                f"PerTensorAdaptiveClipper was built for {self.gamma.numel()} tensors, "
                f"got {len(grads)}"
            )
        slots = [i for i, g in enumerate(grads) if g is not None]
        present = [grads[i] for i in slots]
        norms = _tensor_norms(present)  # type: ignore[arg-type]
        raw_t = torch.linalg.vector_norm(norms) if norms.numel() else torch.zeros(())
        raw = float(raw_t.item())
        in_warmup = self.step < self.warmup_steps
        if not math.isfinite(raw) or not present:
            return {
                "grad_norm_raw": raw,
                "grad_norm_clipped": raw,
                "clip_coef": 1.0,
                "clipped_tensors": 0,
                "in_warmup": int(in_warmup),
            }
        device = norms.device
        gamma = self.gamma[slots].to(device)
        unseen = torch.isnan(gamma)
        if in_warmup:
            scales = torch.clamp(self.warmup_max_norm / raw_t, max=1.0).expand_as(norms)
            clipped = norms * scales
            updated = torch.where(unseen, clipped, torch.minimum(gamma, clipped))
        else:
            threshold = torch.where(unseen, self.warmup_max_norm, self.coef * gamma)
            scales = torch.where(norms > threshold, threshold / norms, torch.ones_like(norms))
            clipped = norms * scales
            beta = self.ema_beta
            updated = torch.where(unseen, clipped, beta * gamma + (1.0 - beta) * clipped)
        gamma = torch.where(norms > 0, updated, gamma)
        for g, s in zip(present, scales):
            _mul_(g, s)  # type: ignore[arg-type]
        self.gamma[slots] = gamma.cpu()
        self.step += 1
        clipped_norm = float(torch.linalg.vector_norm(clipped).item())
        return {
            "grad_norm_raw": raw,
            "grad_norm_clipped": clipped_norm,
            "clip_coef": clipped_norm / raw if raw > 0 else 1.0,
            "clipped_tensors": int((scales < 1.0).sum().item()),
            "in_warmup": int(in_warmup),
        }

    def state_dict(self) -> dict[str, Any]:
        gamma = None if self.gamma is None else self.gamma.clone()
        return {"gamma": gamma, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        gamma = state["gamma"]
        self.gamma = None if gamma is None else gamma.detach().to("cpu", torch.float32).clone()
        self.step = int(state["step"])


def stochastic_round_to_bf16(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round float32 values to bfloat16 stochastically and without bias.

    bf16 is the upper 16 bits of the float32 pattern. Adding a uniform random integer in
    [0, 2^16) to the pattern and truncating the low 16 bits rounds the magnitude up with
    probability (dropped bits) / 2^16, so E[result] = x. The pattern is sign + magnitude, so the
    same integer arithmetic is unbiased for negative values too. inf / NaN pass through.

    Args:
        x: float32 tensor, any shape.
        generator: torch.Generator on x's device, or None for the global one.

    Returns:
        bfloat16 tensor of x's shape.
    """
    if x.dtype != torch.float32:
        raise ValueError(f"stochastic_round_to_bf16 expects float32, got {x.dtype}")
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(
        0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator
    )
    # -65536 == 0xFFFF0000 as int32: keep sign, exponent and the top 7 mantissa bits.
    rounded = ((bits + noise) & -65536).view(torch.float32)
    return torch.where(torch.isfinite(x), rounded, x).to(torch.bfloat16)
