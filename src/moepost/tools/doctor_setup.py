"""What `moepost doctor`'s checks share: the set-up they run on and the line each one reports.

Its own module so that the check modules (`doctor`, `doctor_rollout`, `doctor_router`) all
import it and none imports another's internals back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from moepost.components.moe.router_setup import RouterSetup
from moepost.config.schema import Config

Status = Literal["OK", "WARN", "FAIL"]


@dataclass
class Check:
    name: str
    status: Status
    detail: str


@dataclass
class DoctorSetup:
    """What every check works on: the run's config, model (as the run sets it up), prompts."""

    cfg: Config
    model: torch.nn.Module
    tokenizer: Any
    router: RouterSetup
    prompts: list[list[int]]
    device: torch.device
