"""`moepost plan` / `estimate_memory`: hand-counted parameters and bytes on a tiny MoE and a
Qwen3-30B-A3B-shaped config (meta device, nothing allocated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from moepost.config.load import load_config
from moepost.config.schema import Config
from moepost.errors import UserError
from moepost.tools.param_count import as_pretrained_config, count_parameters
from moepost.tools.plan import estimate_memory, run_plan
from moepost.tools.tiny_model import build_tiny_model

# Tiny qwen3_moe: hidden 32, 2 layers, 4 experts (moe_intermediate 32), top-2, vocab 104,
# 4 heads x head_dim 8, 2 KV heads, untied embeddings. Per layer:
#   attention q 32*32 + k 32*16 + v 32*16 + o 32*32 + q_norm 8 + k_norm 8 = 3088
#   experts 4 * (gate_up 64*32 + down 32*32) = 4 * 3072 = 12288; router 4*32 = 128; 2 norms 64
#   layer = 15568. Model = 2 * 15568 + embed 104*32 + lm_head 104*32 + final norm 32 = 37824.
TINY_TOTAL = 37824
TINY_EXPERTS = 2 * 12288
TINY_ACTIVE = TINY_TOTAL - TINY_EXPERTS + TINY_EXPERTS * 2 // 4  # K/E = 2/4 of the experts

# Qwen3-30B-A3B (config.json of the public checkpoint, shapes only)
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "max_position_embeddings": 40960,
    "router_aux_loss_coef": 0.001,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("plan") / "moe", "qwen3_moe", hidden_size=32)


def _cfg(model: Path | str, *overrides: str, stage: str = "sft") -> Config:
    base = [
        f"stage={stage}",
        f"model.policy_name_or_path={model}",
        "data.train_file=unused.jsonl",
        "model.dtype=float32",
        "train.micro_batch_size=2",
        "train.batch_size=2",
    ]
    if stage == "rl":
        base += ["reward.functions=[{name: exact_match}]"]
    return load_config(None, base + list(overrides))


def _config_dict(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_tiny_counts_match_hand_count_and_real_model(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    est = estimate_memory(_config_dict(tiny), _cfg(tiny), gpus=1)
    real = AutoModelForCausalLM.from_pretrained(tiny)
    assert est["params_total"] == TINY_TOTAL == sum(p.numel() for p in real.parameters())
    assert est["params_experts"] == TINY_EXPERTS
    assert est["params_active"] == TINY_ACTIVE == 25536
    assert (est["moe_layers"], est["num_experts"], est["top_k"]) == (2, 4, 2)
    assert est["params_trainable"] == TINY_TOTAL
    # float32 full fine-tuning: weights 4 B, gradients 4 B, AdamW moments 2 x 4 B per parameter
    assert est["weights_bytes"] == 4 * TINY_TOTAL
    assert est["grads_bytes"] == 4 * TINY_TOTAL
    assert est["optimizer_bytes"] == 8 * TINY_TOTAL
    assert est["master_weights_bytes"] == 0 and est["reference_bytes"] == 0
    assert est["kv_cache_bytes"] == 0  # SFT generates nothing


def test_bf16_optimizer_states_follow_the_optimizer(tiny: Path) -> None:
    conf = _config_dict(tiny)
    plain = estimate_memory(conf, _cfg(tiny, "model.dtype=bfloat16"), gpus=1)
    # torch AdamW keeps its moments in the parameter dtype: 2 x 2 B
    assert plain["weights_bytes"] == plain["grads_bytes"] == 2 * TINY_TOTAL
    assert plain["optimizer_bytes"] == 4 * TINY_TOTAL
    master = estimate_memory(
        conf, _cfg(tiny, "model.dtype=bfloat16", "optim.master_weights=fp32"), gpus=1
    )
    assert master["optimizer_bytes"] == 8 * TINY_TOTAL
    assert master["master_weights_bytes"] == 4 * TINY_TOTAL
    sr = estimate_memory(
        conf, _cfg(tiny, "model.dtype=bfloat16", "optim.stochastic_rounding=true"), gpus=1
    )
    assert sr["optimizer_bytes"] == 8 * TINY_TOTAL and sr["master_weights_bytes"] == 0


def test_lora_counts_match_peft(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    from moepost.components.model.lora import apply_lora

    cfg = _cfg(tiny, "model.lora.enabled=true", "model.dtype=bfloat16")
    est = estimate_memory(_config_dict(tiny), cfg, gpus=1)
    # r=8 on q, k, v, o: 8 * ((32+32) + (32+16) + (32+16) + (32+32)) = 1792 per layer, 2 layers
    assert est["params_trainable"] == 3584
    real = apply_lora(AutoModelForCausalLM.from_pretrained(tiny), cfg.model.lora)
    assert sum(p.numel() for p in real.parameters() if p.requires_grad) == 3584
    assert est["params_total"] == TINY_TOTAL  # adapters are not "parameters of the model"
    # adapters are float32 (peft upcasts them): 4 B gradients, 2 x 4 B moments
    assert est["grads_bytes"] == 4 * 3584 and est["optimizer_bytes"] == 8 * 3584
    assert est["weights_bytes"] == 2 * TINY_TOTAL + 4 * 3584


def test_sharding_divides_what_each_stage_shards(tiny: Path) -> None:
    conf = _config_dict(tiny)
    one = estimate_memory(conf, _cfg(tiny), gpus=1)

    def on4(*overrides: str) -> dict[str, float]:
        return estimate_memory(conf, _cfg(tiny, "distributed.enabled=true", *overrides), gpus=4)

    ddp = on4("distributed.backend=ddp")
    assert [ddp[k] for k in ("weights_bytes", "grads_bytes", "optimizer_bytes")] == [
        one["weights_bytes"],
        one["grads_bytes"],
        one["optimizer_bytes"],
    ]
    z1 = on4("distributed.backend=deepspeed", "distributed.zero_stage=1")
    assert z1["optimizer_bytes"] == one["optimizer_bytes"] / 4
    assert z1["grads_bytes"] == one["grads_bytes"] and z1["weights_bytes"] == one["weights_bytes"]
    z3 = on4("distributed.backend=deepspeed", "distributed.zero_stage=3")
    assert z3["weights_bytes"] == one["weights_bytes"] / 4
    assert z3["grads_bytes"] == one["grads_bytes"] / 4
    # the running decoder layer (15568 params, float32) and the one DeepSpeed prefetches
    assert z3["gathered_layer_bytes"] == 2 * 4 * 15568
    grad_op = on4("distributed.backend=fsdp", "distributed.fsdp_sharding_strategy=SHARD_GRAD_OP")
    # FSDP2 with reshard_after_forward=False: shards plus every layer gathered until backward
    assert grad_op["weights_bytes"] == one["weights_bytes"] / 4
    assert grad_op["gathered_layer_bytes"] == one["weights_bytes"]
    assert grad_op["grads_bytes"] == one["grads_bytes"] / 4
    offload = on4(
        "distributed.backend=deepspeed",
        "distributed.zero_stage=2",
        "distributed.offload_optimizer=true",
    )
    assert offload["optimizer_bytes"] == 0
    # DeepSpeed's CPU Adam: float32 master 4 B + moments 8 B + gradient 4 B, sharded over 4
    assert offload["offloaded_cpu_bytes"] == 16 * TINY_TOTAL / 4


def test_rl_kv_cache_reference_and_activations(tiny: Path) -> None:
    conf = _config_dict(tiny)
    rl = (
        "generation.num_samples_per_prompt=2",
        "train.prompts_per_step=2",
        "data.max_prompt_length=8",
        "generation.max_new_tokens=8",
    )
    grpo = estimate_memory(conf, _cfg(tiny, "rl.algorithm=grpo", *rl, stage="rl"), gpus=1)
    # 4 rows x 16 tokens x 2 layers x (K and V: 2 x 2 heads x 8) x 4 B, + last logits 4 x 104 x 4 B
    assert grpo["kv_cache_bytes"] == 4 * 16 * 2 * 32 * 4 + 4 * 104 * 4 == 18048
    assert grpo["reference_bytes"] == 4 * TINY_TOTAL  # kl_coef 0.04, full fine-tuning
    gspo = estimate_memory(conf, _cfg(tiny, *rl, stage="rl"), gpus=1)
    assert gspo["reference_bytes"] == 0  # kl_coef 0
    lora = _cfg(tiny, "rl.algorithm=grpo", "model.lora.enabled=true", *rl, stage="rl")
    assert estimate_memory(conf, lora, gpus=1)["reference_bytes"] == 0  # adapters disabled
    # per token per layer: attention 2h + 2q + 2kv = 64 + 64 + 32 = 160,
    # MoE 2h + E + K (2h + 3 I) = 64 + 4 + 2 * (64 + 96) = 388; so 548 elements
    tokens = 2 * 16  # micro-batch 2 rows x (prompt 8 + completion 8)
    assert gspo["activations_bytes"] == tokens * 2 * 548 * 4
    ckpt = estimate_memory(
        conf, _cfg(tiny, *rl, "model.gradient_checkpointing=true", stage="rl"), 1
    )
    assert ckpt["activations_bytes"] == tokens * (2 * 32 + 548) * 4  # layer inputs + one layer
    # chunked head (lm_head_chunk_rows 256 > 2 x 9 scored rows): one [18, V] float32 block and
    # its gradient; full logits for T + 1 = 9 positions of 2 rows: logits + grad, one chunk x 2
    assert gspo["logits_bytes"] == 2 * 9 * 104 * 8
    assert gspo["logits_unchunked_bytes"] == 2 * 9 * 104 * (2 * 4) + 2 * 9 * 104 * 8
    # A token budget of 50 fits 3 full rows of 16 tokens: the worst micro-batch is 3 x 16.
    budget = estimate_memory(conf, _cfg(tiny, *rl, "train.micro_batch_tokens=50", stage="rl"), 1)
    assert budget["activations_bytes"] == 3 * 16 * 2 * 548 * 4
    alone = estimate_memory(conf, _cfg(tiny, *rl, "train.micro_batch_tokens=10", stage="rl"), 1)
    assert alone["activations_bytes"] == 1 * 16 * 2 * 548 * 4  # a row longer than the budget


@pytest.fixture(scope="module")
def qwen3_30b_counts() -> object:
    cfg = Config()
    return count_parameters(as_pretrained_config(QWEN3_30B), cfg, torch.bfloat16)


def test_qwen3_30b_parameters(qwen3_30b_counts: object) -> None:
    counts = qwen3_30b_counts
    # per layer: attention 2048*4096 + 2 * 2048*512 + 4096*2048 + 2 * 128 = 18,874,624
    #   experts 128 * (1536*2048 + 2048*768) = 603,979,776; router 128*2048; 2 norms 2*2048
    #   -> 623,120,640; 48 layers + embed and lm_head 2 * 151936*2048 + final norm 2048
    layer = 18_874_624 + 603_979_776 + 262_144 + 4_096
    assert counts.max_layer_params == layer == 623_120_640
    assert counts.total == 48 * layer + 2 * 151_936 * 2048 + 2048 == 30_532_122_624
    experts = 48 * 603_979_776
    assert counts.active == counts.total - experts + experts * 8 // 128 == 3_353_032_704
    assert counts.total == pytest.approx(30.5e9, rel=0.01)  # the published "30B-A3B" figures
    assert counts.active == pytest.approx(3.3e9, rel=0.02)
    assert (counts.num_moe_layers, counts.num_experts, counts.top_k) == (48, 128, 8)


def test_unbuildable_configs_are_user_errors() -> None:
    from transformers import CLIPConfig

    with pytest.raises(UserError, match="model_type 'no_such_model' is unknown"):
        as_pretrained_config({"model_type": "no_such_model"})
    with pytest.raises(UserError, match="cannot build clip from its config.json"):
        count_parameters(CLIPConfig(), Config(), torch.float32)


def test_qwen3_30b_zero3_on_8_gpus(qwen3_30b_counts: object, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "model.policy_name_or_path=x",
            "data.train_file=x",
            "distributed.enabled=true",
            "distributed.backend=deepspeed",
            "distributed.zero_stage=3",
        ],
    )
    one = estimate_memory(QWEN3_30B, cfg, 1, counts=qwen3_30b_counts)
    eight = estimate_memory(QWEN3_30B, cfg, 8, counts=qwen3_30b_counts)
    assert one["weights_bytes"] == pytest.approx(2 * 30.53e9, rel=1e-3)  # bfloat16
    assert eight["weights_bytes"] == one["weights_bytes"] / 8
    # DeepSpeed mixed precision: 12 B of float32 master + moments per parameter, sharded
    assert eight["optimizer_bytes"] + eight["master_weights_bytes"] == pytest.approx(
        12 * qwen3_30b_counts.total / 8
    )


def test_run_plan_prints_from_config_json_only(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model_dir = tmp_path / "qwen3_30b"  # a config.json and no weights
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(QWEN3_30B))
    run_cfg = tmp_path / "rl.yaml"
    run_cfg.write_text(
        yaml.safe_dump(
            {
                "stage": "rl",
                "model": {"policy_name_or_path": str(model_dir), "gradient_checkpointing": True},
                "data": {"train_file": "unused.jsonl"},
                "reward": {"functions": [{"name": "gsm8k"}]},
                "train": {"prompts_per_step": 4, "micro_batch_size": 4},
            }
        )
    )
    assert run_plan(str(run_cfg), [], gpus=2) == 0
    out = capsys.readouterr().out
    assert (
        "model qwen3_moe: 48 MoE layers, top-8 of 128 experts; 30.53B parameters, 3.35B active"
        in out
    )
    assert "per device, 2 GPU(s), ddp, stage rl:" in out
    assert "peak estimate" in out
    with pytest.raises(UserError, match="--gpus must be >= 1"):
        run_plan(str(run_cfg), [], gpus=0)
    with pytest.raises(UserError, match="model.policy_name_or_path"):
        run_plan(str(run_cfg), [f"model.policy_name_or_path={tmp_path / 'none'}"], gpus=1)
