"""Which device each model of a rank goes on: the policy, the reference and the reward models.

Every process (rank) trains on one device: `cuda:$LOCAL_RANK` under a launcher, `misc.device`
otherwise (`components.model.resolve_device`, `distributed.setup.init_distributed`). Reward
models (MetricX, xCOMET) go where `reward.<kind>.device` says, resolved on each rank:

- `auto` (the default) / `policy`: the rank's own device, so N ranks use N GPUs;
- `cpu`;
- `cuda`: the rank's own GPU (the scenario spelling; never GPU 0 for every rank);
- `cuda:N`: that GPU; with several ranks on a node a list, one entry per local rank
  (`[cuda:4, cuda:5]`), since one `cuda:N` would put every rank's copy on the same GPU.

The seed pipeline's `model.policy_gpu_ids` / `model.reference_gpu_ids` name one GPU each for
a single-process run; under a launcher each rank already has its GPU, so they are refused.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moepost.errors import UserError

REWARD_MODEL_KINDS = ("metricx", "xcomet")


def _cuda_count(cuda_count: int | None) -> int:
    if cuda_count is not None:
        return cuda_count
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_reward_device(
    spec: Any,
    *,
    key: str,
    policy_device: torch.device,
    env: Mapping[str, str] | None = None,
    cuda_count: int | None = None,
) -> str:
    """The device string one rank loads a reward model on (see the module docstring).

    spec: the `reward.<kind>.device` value (str, or a list of str per local rank); key: its
    config path, for messages; env: LOCAL_RANK / LOCAL_WORLD_SIZE (default os.environ);
    cuda_count: GPUs this process sees (default torch's count).
    """
    env = os.environ if env is None else env
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    if isinstance(spec, Sequence) and not isinstance(spec, str):
        if len(spec) != local_world:
            raise UserError(
                f"{key}: a list needs one device per local rank ({local_world}), got {len(spec)}"
            )
        spec = spec[local_rank]
        local_world = 1  # this rank's own entry: no clash with the others
    if not isinstance(spec, str):
        raise UserError(f"{key}: expected auto, policy, cpu, cuda or cuda:N, got {spec!r}")
    if spec in ("auto", "policy"):
        return str(policy_device)
    if spec == "cpu":
        return "cpu"
    count = _cuda_count(cuda_count)
    if spec == "cuda":
        if count == 0:
            raise UserError(f"{key}: cuda was requested but this process sees no GPU")
        return str(policy_device) if policy_device.type == "cuda" else f"cuda:{local_rank}"
    if not spec.startswith("cuda:") or not spec[5:].isdigit():
        raise UserError(f"{key}: expected auto, policy, cpu, cuda or cuda:N, got {spec!r}")
    index = int(spec[5:])
    if index >= count:
        raise UserError(f"{key}: {spec} does not exist here (this process sees {count} GPUs)")
    if local_world > 1:
        raise UserError(
            f"{key}: {spec} would put the reward model of all {local_world} ranks of this node "
            f"on one GPU; use auto (each rank's own GPU) or a list of one device per local rank"
        )
    return spec


def place_reward_models(
    reward_fns: Sequence[Any], reward_cfg: Any, policy_device: torch.device
) -> list[str]:
    """Set the `device` keyword of the MetricX / xCOMET reward functions of this rank from
    `reward.<kind>.device` (or the same key of a `reward.functions` entry); returns one
    run-log line per model placed."""
    lines = []
    for reward in reward_fns:
        kind = getattr(reward.fn, "__name__", "").removesuffix("_reward")
        if kind not in REWARD_MODEL_KINDS:
            continue
        section = getattr(reward_cfg, kind, None) or {}
        key = f"reward.{kind}.device" if section else f"reward.functions[{reward.name}].device"
        spec = reward.kwargs.get("device", "auto")
        reward.kwargs["device"] = resolve_reward_device(spec, key=key, policy_device=policy_device)
        lines.append(f"reward model {reward.name}: {reward.kwargs['device']} ({key}: {spec})")
    return lines


def gpu_ids_device(
    ids: Sequence[int] | None, *, key: str, world_size: int, cuda_count: int | None = None
) -> torch.device | None:
    """`model.policy_gpu_ids` / `model.reference_gpu_ids`: the one GPU of a single-process
    run, None when unset; refused under a launcher and for several GPUs (one line each)."""
    if ids is None:
        return None
    ids = list(ids)
    if world_size > 1:
        raise UserError(
            f"{key} is for single-process runs; under torchrun every rank uses cuda:LOCAL_RANK "
            "(pick the GPUs with CUDA_VISIBLE_DEVICES) and reward.<kind>.device places rewards"
        )
    if len(ids) != 1 or not isinstance(ids[0], int) or isinstance(ids[0], bool):
        raise UserError(
            f"{key} = {ids}: moepost runs one model replica per process on one GPU; give one id "
            f"([0]) or use torchrun --nproc_per_node N for N GPUs (data parallel)"
        )
    count = _cuda_count(cuda_count)
    if not 0 <= ids[0] < count:
        raise UserError(f"{key} = {ids}: GPU {ids[0]} does not exist here ({count} visible)")
    return torch.device("cuda", ids[0])
