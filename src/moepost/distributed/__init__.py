"""Data parallelism: the only package that knows about process groups.

`init_distributed` joins the launcher's process group (torchrun / accelerate launch /
deepspeed) and returns a `DistContext`; `prepare_model` wraps the policy for DDP or FSDP2 and
`attach_optimizer` builds the DeepSpeed engine. See docs/distributed.md.
"""

from __future__ import annotations

from moepost.distributed.context import DistContext, require_deepspeed
from moepost.distributed.setup import (
    check_supported,
    describe,
    generation_lockstep,
    init_distributed,
)
from moepost.distributed.wrap import attach_optimizer, deepspeed_config, prepare_model

__all__ = [
    "DistContext",
    "attach_optimizer",
    "check_supported",
    "deepspeed_config",
    "describe",
    "generation_lockstep",
    "init_distributed",
    "prepare_model",
    "require_deepspeed",
]
