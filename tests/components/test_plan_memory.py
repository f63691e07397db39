"""`tools.plan_memory`: per-rank bytes of each backend at world size 2 and 4, written by hand
from the formulas in the module docstring, on the tiny qwen3_moe in bfloat16 (b = 2 B)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moepost.config.load import load_config
from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.tools.plan import estimate_memory, plan_warnings, run_plan
from moepost.tools.tiny_model import build_tiny_model

P = 37824  # tiny qwen3_moe parameters (hand count in test_plan.py)
L = 15568  # its largest decoder layer
R = 104 * 32 * 2 + 32  # root: embeddings + untied lm_head (vocab 104 x hidden 32) + final norm
assert 2 * L + R == P
LORA = 3584  # r=8 adapters on q, k, v, o of 2 layers (float32)
STATE_KEYS = (
    "weights_bytes",
    "gathered_layer_bytes",
    "grads_bytes",
    "grad_buckets_bytes",
    "optimizer_bytes",
    "master_weights_bytes",
    "offloaded_cpu_bytes",
)


@pytest.fixture(scope="module")
def conf(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = build_tiny_model(tmp_path_factory.mktemp("pm") / "moe", "qwen3_moe", hidden_size=32)
    return json.loads((path / "config.json").read_text())


def _cfg(*overrides: str, stage: str = "sft") -> Config:
    base = [
        f"stage={stage}",
        "model.policy_name_or_path=unused",
        "data.train_file=unused.jsonl",
        "model.dtype=bfloat16",
        "train.micro_batch_size=1",
        "train.batch_size=8",
        "distributed.enabled=true",
    ]
    if stage == "rl":
        base += ["reward.functions=[{name: exact_match}]", "train.prompts_per_step=4"]
    return load_config(None, base + list(overrides))


def _state(conf: dict, gpus: int, *overrides: str, stage: str = "sft") -> list[float]:
    est = estimate_memory(conf, _cfg(*overrides, stage=stage), gpus)
    return [est[k] for k in STATE_KEYS]


FP32_ADAM = "optim.master_weights=fp32"  # bf16 weights, float32 master + AdamW moments


@pytest.mark.parametrize("w", [2, 4])
def test_ddp_holds_everything_plus_reducer_buckets(conf: dict, w: int) -> None:
    # weights 2P, gradients 2P, buckets 2P, moments 8P, master 4P -- none divided by W
    assert _state(conf, w, "distributed.backend=ddp", FP32_ADAM) == [
        2 * P, 0, 2 * P, 2 * P, 8 * P, 4 * P, 0,
    ]  # fmt: skip


@pytest.mark.parametrize("w", [2, 4])
def test_fsdp2_full_shard(conf: dict, w: int) -> None:
    # everything / W, plus the root and two layers (running + prefetched) unsharded
    assert _state(conf, w, "distributed.backend=fsdp", FP32_ADAM) == [
        2 * P / w, 2 * (R + 2 * L), 2 * P / w, 0, 8 * P / w, 4 * P / w, 0,
    ]  # fmt: skip
    no_shard = _state(
        conf, w, "distributed.backend=fsdp", "distributed.fsdp_sharding_strategy=NO_SHARD"
    )
    # torch AdamW moments in bf16 (2 x 2 B), all whole, no buckets
    assert no_shard == [2 * P, 0, 2 * P, 0, 4 * P, 0, 0]


@pytest.mark.parametrize("w", [2, 4])
def test_zero2_and_zero3(conf: dict, w: int) -> None:
    ds = "distributed.backend=deepspeed"
    # ZeRO-2: weights whole; bf16 gradients, fp32 moments (8 B) and master (4 B) / W
    assert _state(conf, w, ds, "distributed.zero_stage=2") == [
        2 * P, 0, 2 * P / w, 0, 8 * P / w, 4 * P / w, 0,
    ]  # fmt: skip
    # ZeRO-3: weights / W too, the running layer and its prefetch (L < 5e7) gathered
    assert _state(conf, w, ds, "distributed.zero_stage=3") == [
        2 * P / w, 2 * 2 * L, 2 * P / w, 0, 8 * P / w, 4 * P / w, 0,
    ]  # fmt: skip


@pytest.mark.parametrize("w", [2, 4])
def test_deepspeed_offload_moves_states_to_cpu(conf: dict, w: int) -> None:
    ds = "distributed.backend=deepspeed"
    opt = "distributed.offload_optimizer=true"
    # CPU Adam: fp32 master 4 + moments 8 + fp32 gradient partition 4 = 16 B / W in CPU RAM
    assert _state(conf, w, ds, "distributed.zero_stage=2", opt) == [
        2 * P, 0, 2 * P / w, 0, 0, 0, 16 * P / w,
    ]  # fmt: skip
    both = _state(conf, w, ds, "distributed.zero_stage=3", opt, "distributed.offload_param=true")
    # the bf16 weight partitions join them; the gathered layers stay on the GPU
    assert both == [0, 2 * 2 * L, 2 * P / w, 0, 0, 0, 16 * P / w + 2 * P / w]


@pytest.mark.parametrize("w", [2, 4])
def test_lora_only_adapters_have_gradients_and_states(conf: dict, w: int) -> None:
    lora = "model.lora.enabled=true"
    # float32 adapters: gradients 4 B, moments 8 B; no master copy (already float32)
    assert _state(conf, w, lora, "distributed.backend=ddp") == [
        2 * P + 4 * LORA, 0, 4 * LORA, 4 * LORA, 8 * LORA, 0, 0,
    ]  # fmt: skip
    assert _state(conf, w, lora, "distributed.backend=deepspeed") == [  # ZeRO-2 by default
        2 * P + 4 * LORA, 0, 4 * LORA / w, 0, 8 * LORA / w, 0, 0,
    ]  # fmt: skip


def test_reference_is_whole_on_every_rank_and_peak_adds_up(conf: dict) -> None:
    grpo = ("rl.algorithm=grpo", "distributed.backend=fsdp", FP32_ADAM)
    est = estimate_memory(conf, _cfg(*grpo, stage="rl"), 4)
    assert est["reference_bytes"] == 2 * P  # kl_coef 0.04: a bf16 copy no backend shards
    static = 2 * P / 4 + 2 * (R + 2 * L) + 8 * P / 4 + 4 * P / 4 + 2 * P
    training = 2 * P / 4 + est["activations_bytes"] + est["logits_bytes"]
    assert est["total_bytes"] == static + max(training, est["kv_cache_bytes"])


def test_lm_head_chunking_and_zero3_hooks(conf: dict) -> None:
    rl = ("generation.max_new_tokens=8", "data.max_prompt_length=8")
    chunked = estimate_memory(conf, _cfg(*rl, "train.lm_head_chunk_rows=4", stage="rl"), 2)
    # 1 row x (T + 1 = 9) scored positions, 4 at a time: one [4, 104] float32 block + its grad
    assert chunked["logits_bytes"] == 4 * 104 * 4 * 2
    full = estimate_memory(conf, _cfg(*rl, "train.lm_head_chunk_rows=0", stage="rl"), 2)
    # bf16 [9, 104] logits + gradient, and one float32 log-softmax chunk + its gradient
    assert full["logits_bytes"] == 9 * 104 * 2 * 2 + 9 * 104 * 4 * 2
    z3 = ("distributed.backend=deepspeed", "distributed.zero_stage=3")
    hooked = estimate_memory(conf, _cfg(*rl, *z3, stage="rl"), 2)
    assert hooked["logits_bytes"] == full["logits_bytes"]  # ZeRO-3's hooks: head not chunked


def test_warnings_name_what_the_trainer_refuses(conf: dict) -> None:
    def warns(gpus: int, *overrides: str, stage: str = "sft", limit: float | None = None):
        cfg = _cfg(*overrides, stage=stage)
        return plan_warnings(estimate_memory(conf, cfg, gpus), cfg, gpus, limit)

    assert warns(2, "distributed.backend=fsdp") == []
    [vllm] = warns(2, "distributed.backend=fsdp", "generation.backend=vllm", stage="rl")
    assert vllm.startswith("WARN: the trainer refuses this at 2 rank(s): generation.backend=vllm")
    [ds] = warns(2, "distributed.backend=deepspeed", FP32_ADAM)
    assert "DeepSpeed keeps its own fp32 master weights" in ds
    [split] = warns(16, "distributed.backend=ddp")  # batch 8 over 16 ranks
    assert "train.batch_size (8) must be divisible by the world size (16)" in split
    [ignored] = warns(1, "distributed.backend=deepspeed", "distributed.offload_optimizer=true")
    assert ignored == (
        "WARN: distributed.offload_optimizer has no effect with one rank: "
        "only DeepSpeed offloads; the optimizer states stay on the GPU"
    )
    with pytest.raises(UserError, match="offload_optimizer needs distributed.backend=deepspeed"):
        warns(2, "distributed.backend=fsdp", "distributed.offload_optimizer=true")
    [big] = warns(2, "distributed.backend=ddp", limit=1024.0)
    assert big.startswith("WARN: peak estimate") and big.endswith("of GPU memory")


def test_run_plan_prints_cpu_ram_and_gpu_memory_warning(
    conf: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(conf))
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(f"model: {{policy_name_or_path: {model}}}\n")
    overrides = [
        "data.train_file=x.jsonl",
        "model.dtype=bfloat16",
        "train.batch_size=8",
        "train.micro_batch_size=1",
        "distributed.enabled=true",
        "distributed.backend=deepspeed",
        "distributed.offload_optimizer=true",
    ]
    assert run_plan(str(run_cfg), overrides, gpus=4, gpu_memory_gb=1 / 1024) == 0
    out = capsys.readouterr().out
    assert "per device, 4 GPU(s), deepspeed ZeRO-2, stage sft:" in out
    cpu = 16 * P / 4 / 1024**2
    [line] = [x for x in out.splitlines() if "CPU RAM per rank (DeepSpeed offload)" in x]
    assert line.endswith(f" {cpu:.1f} MiB")
    assert "per rank does not fit 1.0 MiB of GPU memory" in out
