"""Device placement per rank: reward models (`reward.<kind>.device`) and the seed spellings
`model.policy_gpu_ids` / `model.reference_gpu_ids`, with fake GPU counts and LOCAL_RANKs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moepost.components.model.placement import (
    gpu_ids_device,
    place_reward_models,
    resolve_reward_device,
)
from moepost.components.rewards.translation_qe import metricx_reward, xcomet_reward
from moepost.errors import UserError

KEY = "reward.metricx.device"


def _env(local_rank: int, local_world: int) -> dict[str, str]:
    return {"LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(local_world)}


@pytest.mark.parametrize("spec", ["auto", "policy"])
def test_auto_and_policy_follow_each_rank_s_own_device(spec: str) -> None:
    for rank in range(4):
        own = torch.device("cuda", rank)
        got = resolve_reward_device(
            spec, key=KEY, policy_device=own, env=_env(rank, 4), cuda_count=4
        )
        assert got == f"cuda:{rank}"
    cpu = resolve_reward_device("auto", key=KEY, policy_device=torch.device("cpu"), env={})
    assert cpu == "cpu"


def test_cuda_means_the_rank_s_gpu_never_gpu_0_for_all() -> None:
    got = [
        resolve_reward_device(
            "cuda", key=KEY, policy_device=torch.device("cuda", r), env=_env(r, 2), cuda_count=2
        )
        for r in range(2)
    ]
    assert got == ["cuda:0", "cuda:1"]
    # a CPU policy (misc.device: cpu) on a GPU machine: the local rank's GPU
    got_cpu_policy = resolve_reward_device(
        "cuda", key=KEY, policy_device=torch.device("cpu"), env=_env(1, 2), cuda_count=2
    )
    assert got_cpu_policy == "cuda:1"
    with pytest.raises(UserError, match="reward.metricx.device: cuda was requested"):
        resolve_reward_device("cuda", key=KEY, policy_device=torch.device("cpu"), cuda_count=0)


def test_explicit_gpu_single_rank_and_per_rank_list() -> None:
    cpu = torch.device("cpu")
    one = resolve_reward_device("cuda:3", key=KEY, policy_device=cpu, env=_env(0, 1), cuda_count=4)
    assert one == "cuda:3"
    specs = ["cuda:2", "cuda:3"]
    per_rank = [
        resolve_reward_device(specs, key=KEY, policy_device=cpu, env=_env(r, 2), cuda_count=4)
        for r in range(2)
    ]
    assert per_rank == ["cuda:2", "cuda:3"]
    assert resolve_reward_device("cpu", key=KEY, policy_device=cpu, cuda_count=4) == "cpu"


@pytest.mark.parametrize(
    ("spec", "env", "count", "message"),
    [
        ("cuda:1", _env(0, 2), 4, "all 2 ranks of this node on one GPU"),
        ("cuda:4", _env(0, 1), 4, "cuda:4 does not exist here \\(this process sees 4 GPUs\\)"),
        (["cuda:0"], _env(0, 2), 4, "one device per local rank \\(2\\), got 1"),
        ("gpu0", _env(0, 1), 4, "expected auto, policy, cpu, cuda or cuda:N, got 'gpu0'"),
        (3, _env(0, 1), 4, "expected auto, policy, cpu, cuda or cuda:N, got 3"),
    ],
)
def test_bad_reward_devices_are_one_line_errors(spec, env, count, message) -> None:
    with pytest.raises(UserError, match=message) as err:
        resolve_reward_device(spec, key=KEY, policy_device=torch.device("cpu"), env=env,
                              cuda_count=count)  # fmt: skip
    assert str(err.value).startswith(KEY) and "\n" not in str(err.value)


def test_place_reward_models_sets_each_translation_reward_s_device() -> None:
    rewards = [
        SimpleNamespace(name="metricx", fn=metricx_reward, kwargs={"path": "m"}),
        SimpleNamespace(name="xcomet", fn=xcomet_reward, kwargs={"device": "cpu"}),
        SimpleNamespace(name="gsm8k", fn=len, kwargs={}),
    ]
    cfg = SimpleNamespace(metricx={"path": "m"}, xcomet={"device": "cpu"})
    lines = place_reward_models(rewards, cfg, torch.device("cpu"))
    assert rewards[0].kwargs["device"] == "cpu" and rewards[1].kwargs["device"] == "cpu"
    assert "device" not in rewards[2].kwargs
    assert lines == [
        "reward model metricx: cpu (reward.metricx.device: auto)",
        "reward model xcomet: cpu (reward.xcomet.device: cpu)",
    ]


def test_gpu_ids_seed_spellings() -> None:
    key = "model.policy_gpu_ids"
    assert gpu_ids_device(None, key=key, world_size=1) is None
    assert gpu_ids_device([1], key=key, world_size=1, cuda_count=2) == torch.device("cuda", 1)
    with pytest.raises(UserError, match="single-process runs; under torchrun every rank"):
        gpu_ids_device([0], key=key, world_size=2, cuda_count=2)
    with pytest.raises(UserError, match="one model replica per process.*torchrun"):
        gpu_ids_device([0, 1], key=key, world_size=1, cuda_count=2)
    with pytest.raises(UserError, match="GPU 2 does not exist here \\(2 visible\\)"):
        gpu_ids_device([2], key=key, world_size=1, cuda_count=2)


def test_policy_gpu_ids_in_a_config_reach_the_device_choice() -> None:
    from moepost.config.schema import Config
    from moepost.recipes.common import policy_device

    cfg = Config()
    cfg.misc.device = "cpu"
    assert policy_device(cfg) == torch.device("cpu")
    cfg.model.policy_gpu_ids = [0]
    with pytest.raises(UserError, match="model.policy_gpu_ids"):
        policy_device(cfg)  # no GPU here (or misc.device cpu disagrees): refused either way


def test_config_files_accept_the_placement_keys(tmp_path) -> None:
    import yaml

    from moepost.config.load import load_config

    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": {"policy_name_or_path": "m", "policy_gpu_ids": [0],
                          "reference_gpu_ids": [1]},
                "data": {"train_file": "t.jsonl"},
                "train": {"lm_head_chunk_rows": 64},
            }
        )
    )  # fmt: skip
    cfg = load_config(path)
    assert cfg.model.policy_gpu_ids == [0] and cfg.model.reference_gpu_ids == [1]
    assert cfg.train.lm_head_chunk_rows == 64
    with pytest.raises(UserError, match="train.lm_head_chunk_rows = -1"):
        load_config(path, ["train.lm_head_chunk_rows=-1"])
