"""AdamW for bf16 parameters with stochastic rounding of the weight write-back.

With bf16 weights, an update smaller than half a bf16 ulp of the weight (2^-9 relative) is
rounded away by round-to-nearest: with tiny RL learning rates most updates vanish. Here the
moments live in float32, the new weight is computed in float32 from the upcast bf16 weight,
and it is written back with unbiased stochastic rounding, so each update survives in
expectation. float32 (or other non-bf16) parameters are updated exactly like AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from moepost.algorithms.stability import stochastic_round_to_bf16

__all__ = ["StochasticRoundingAdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) with stochastic rounding to bf16.

    Args:
        params: parameters or parameter groups, as for torch.optim.AdamW.
        lr, betas, eps, weight_decay: as torch.optim.AdamW.
        seed: seed of this optimizer's own rounding generators (one per device), so a run is
            reproducible and the rounding stream is saved in ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        seed: int = 0,
    ) -> None:
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.seed = seed
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[key] = gen
        return self._generators[key]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("StochasticRoundingAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    for key in _MOMENTS:
                        state[key] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                grad = p.grad.float()
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.lerp_(grad, 1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                bias1 = 1.0 - beta1**t
                bias2 = 1.0 - beta2**t
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias2)).add_(eps)
                weight = p.float()  # a copy for bf16, p itself for float32: both fine
                weight.mul_(1.0 - lr * wd)
                weight.addcdiv_(exp_avg, denom, value=-lr / bias1)
                if p.dtype == torch.bfloat16:
                    p.copy_(stochastic_round_to_bf16(weight, self._generator(p.device)))
                elif weight is not p:
                    p.copy_(weight)
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["sr_seed"] = self.seed
        sd["sr_generators"] = {k: g.get_state() for k, g in self._generators.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        seed = state_dict.pop("sr_seed", self.seed)
        gen_states = state_dict.pop("sr_generators", {})
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter dtype on load; the moments must stay
        # float32 (bf16 moments would lose exactly what this optimizer is for).
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            for key in _MOMENTS:
                self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32).clone()
        self.seed = seed
        self._generators = {}
        for key, gen_state in gen_states.items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
