"""Single-process behaviour of the distributed package: identity reductions, config checks,
refused combinations and the generated DeepSpeed config (no process group needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moepost.config.load import load_config
from moepost.config.schema import Config
from moepost.distributed import (
    DistContext,
    check_supported,
    deepspeed_config,
    generation_lockstep,
)
from moepost.errors import UserError


def test_one_process_context_is_the_identity() -> None:
    ctx = DistContext()
    assert ctx.is_main and ctx.world_size == 1 and ctx.grad_scale == 1.0
    assert ctx.shard([3, 1, 2]) == [3, 1, 2]
    assert ctx.sum_floats([1.5, 2.0]) == [1.5, 2.0]
    metrics = {"loss": 0.25, "x/max": 3.0, "note": "kept"}
    assert ctx.mean_metrics(metrics) == metrics and ctx.sum_metrics(metrics) == metrics
    t = torch.tensor([1.0, 2.0])
    assert ctx.all_reduce_sum(t) is t
    assert ctx.all_true(True) and not ctx.all_true(False)
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert ctx.sampling_seed(42) == 42


def test_shard_takes_contiguous_equal_slices() -> None:
    # 6 items over 3 ranks: rank 1 takes items [2, 4).
    ctx = DistContext(rank=1, world_size=3)
    assert ctx.shard(list("abcdef")) == ["c", "d"]
    assert ctx.sampling_seed(5) == 5 + 1_000_003
    with pytest.raises(UserError, match="cannot split 4 items evenly over 3 ranks"):
        ctx.shard([0, 1, 2, 3])


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(data))
    return path


def _sft(tmp_path: Path, **train: int) -> dict:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    return {
        "stage": "sft",
        "model": {"policy_name_or_path": "m"},
        "data": {"train_file": str(data)},
        "train": {"batch_size": 4, "micro_batch_size": 1, **train},
    }


def test_sft_batch_must_split_over_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    load_config(_write(tmp_path, _sft(tmp_path)))  # 4 = 2 ranks x 2 micro-batches of 1
    with pytest.raises(UserError, match=r"train.batch_size \(4\) must be divisible by the world"):
        load_config(_write(tmp_path, _sft(tmp_path, micro_batch_size=4)))


def test_rl_prompts_must_split_over_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _sft(tmp_path)
    cfg.update(stage="rl", reward={"functions": [{"name": "gsm8k"}]})
    cfg["train"] = {"prompts_per_step": 3, "micro_batch_size": 1}
    with pytest.raises(UserError, match=r"train.prompts_per_step \(3\) must be divisible"):
        load_config(_write(tmp_path, cfg))
    # 2 prompts: one per rank, 4 rows each; micro-batches of 8 do not fit a rank's rows.
    cfg["train"] = {"prompts_per_step": 2, "micro_batch_size": 8}
    with pytest.raises(UserError, match="a prompt's whole group stays on one rank"):
        load_config(_write(tmp_path, cfg))


def test_deepspeed_refuses_our_gradient_transforms(tmp_path: Path) -> None:
    cfg = _sft(tmp_path)
    cfg["distributed"] = {"enabled": True, "backend": "deepspeed"}
    cfg["stability"] = {"grad_centralization": True}
    with pytest.raises(UserError, match="stability.grad_centralization: not applied under"):
        load_config(_write(tmp_path, cfg))


def _two_ranks() -> DistContext:
    return DistContext(rank=0, world_size=2, active=True)


def test_sharded_backends_refuse_rl_and_resume() -> None:
    cfg = Config(stage="rl")
    cfg.distributed.backend = "fsdp"
    check_supported(cfg, _two_ranks(), resume=None)  # RL under FSDP2: lock-step generation
    assert generation_lockstep(cfg, _two_ranks()) is not None
    assert generation_lockstep(cfg, DistContext()) is None  # one process: free-running
    cfg.generation.backend = "vllm"
    with pytest.raises(UserError, match="only the hf engine generates in lock-step"):
        check_supported(cfg, _two_ranks(), resume=None)
    cfg = Config(stage="rl")
    cfg.distributed.backend, cfg.distributed.zero_stage = "deepspeed", 3
    check_supported(cfg, _two_ranks(), resume=None)  # ZeRO-3 RL: lock-step generation too
    assert generation_lockstep(cfg, _two_ranks()) is not None
    cfg.distributed.zero_stage = 2
    assert generation_lockstep(cfg, _two_ranks()) is None  # ZeRO-2: replicated weights
    cfg.distributed.backend = "ddp"
    assert generation_lockstep(cfg, _two_ranks()) is None  # replicated weights
    cfg = Config(stage="sft")
    cfg.distributed.backend = "fsdp"
    check_supported(cfg, _two_ranks(), resume=None)  # FSDP2 SFT is supported
    check_supported(cfg, _two_ranks(), resume="auto")  # sharded (DCP) resume
    cfg.optim.master_weights, cfg.train.save_every = "fp32", 2
    with pytest.raises(UserError, match="sharded checkpoints do not hold fp32 master"):
        check_supported(cfg, _two_ranks(), resume=None)
    cfg.optim.master_weights = "none"
    for backend in ("ddp", "deepspeed"):  # DeepSpeed resumes from its engine state
        cfg.distributed.backend = backend
        check_supported(cfg, _two_ranks(), resume="auto")


def test_generated_deepspeed_config() -> None:
    cfg = Config()
    cfg.train.micro_batch_size = 2
    cfg.optim.max_grad_norm = 0.5
    cfg.distributed.zero_stage = 3
    cfg.distributed.offload_optimizer = True
    cfg.distributed.offload_param = True
    ds = deepspeed_config(cfg, DistContext(world_size=4), dtype=torch.bfloat16)
    # Accumulation is ours: DeepSpeed sees one micro-batch per "step" on each of 4 ranks.
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 1
    assert ds["train_batch_size"] == 8
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_deepspeed_config_file_fills_auto_values(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 1}})
    )
    cfg = Config()
    cfg.train.micro_batch_size = 3
    cfg.distributed.deepspeed_config_path = str(path)
    ds = deepspeed_config(cfg, DistContext(world_size=2), dtype=torch.float32)
    assert ds["train_micro_batch_size_per_gpu"] == 3  # "auto" -> ours
    assert ds["zero_optimization"] == {"stage": 1}  # the file wins
    assert ds["train_batch_size"] == 6
    cfg.distributed.deepspeed_config_path = str(tmp_path / "missing.json")
    with pytest.raises(UserError, match="distributed.deepspeed_config_path: cannot read"):
        deepspeed_config(cfg, DistContext(), dtype=torch.float32)
