"""`moepost doctor` on tiny models: a healthy MoE, a dense model and deliberately broken routers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from transformers.models.qwen3_moe import modeling_qwen3_moe

from moepost.errors import UserError
from moepost.tools import doctor
from moepost.tools.doctor import Check, diagnose, measure_rollout_gap, prepare, run_doctor
from moepost.tools.tiny_model import build_tiny_model, build_tokenizer

ROUTER = modeling_qwen3_moe.Qwen3MoeTopKRouter
MOE_CHECKS = [
    "MoE layers",
    "router logits",
    "aux loss gradient",
    "aux coefficient",
    "expert load (prompts)",
    "train vs rollout logprob",
    "train vs rollout routing",
    "memory",
]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("doctor")
    moe = build_tiny_model(root / "moe", "qwen3_moe", hidden_size=32)
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{a}+{b}=?"},
                {"role": "assistant", "content": f"{a + b}"},
            ]
        }
        for a, b in [(1, 2), (13, 4), (5, 16), (7, 1)]  # unequal lengths: left padding
    ]
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "moe": moe, "data": data}


def _config(files: dict[str, Path], name: str, model: Path, **sections: dict) -> Path:
    cfg = {
        "stage": "rl",
        "model": {"policy_name_or_path": str(model)},
        "data": {"train_file": str(files["data"])},
        "generation": {"num_samples_per_prompt": 2, "max_new_tokens": 6},
        "train": {"prompts_per_step": 2, "micro_batch_size": 2},
        "reward": {"functions": [{"name": "exact_match"}]},
        "misc": {"device": "cpu"},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path = files["root"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


@pytest.fixture
def patch_router(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Callable], None]]:
    """Replace the Qwen3-MoE router's forward with `wrap(original_output, module)`."""
    original = ROUTER.forward

    def install(wrap: Callable) -> None:
        def forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> tuple:
            return wrap(original(self, hidden_states), self)

        monkeypatch.setattr(ROUTER, "forward", forward)

    yield install


def test_tiny_moe_passes_every_check(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    assert run_doctor(str(_config(files, "ok", files["moe"])), []) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["check", "status", "detail"]
    assert [line.split("  ")[0] for line in lines[1:-1]] == MOE_CHECKS
    assert all(" OK " in line for line in lines[1:-1])
    assert lines[-1] == "8 checks: 8 OK, 0 WARN, 0 FAIL"
    assert "2 MoE layers, Qwen3MoeTopKRouter (softmax_topk), E=4, K=2" in out
    # tiny_model writes router_aux_loss_coef 0.001 into the checkpoint's config
    assert "0.001 from the checkpoint's router_aux_loss_coef" in out
    # float32 on CPU: the cached decode and the training forward route every token alike
    assert "flip rate 0 (share of experts replaced 0)" in out


def test_rollout_gap_is_exact_in_float32_and_replay_lines_up(files: dict[str, Path]) -> None:
    setup = prepare(str(_config(files, "r3", files["moe"], moe={"routing_replay": "r3"})), [])
    m = measure_rollout_gap(setup)
    # 2 prompts x 2 samples x up to 6 tokens, all sampled (no EOS in a random model is likely)
    assert 4 <= m["tokens"] <= 24
    assert m["gap_mean"] < 1e-5 and m["gap_max"] < 1e-4
    assert m["flip_rate"] == 0.0 and m["replaced_share"] == 0.0
    assert m["gap_replayed"] < 1e-5  # replaying the generation's own routes changes nothing


def test_dense_model_warns_and_exits_zero(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = build_tokenizer()
    config = Qwen3Config(
        vocab_size=104,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    cfg = _config(files, "dense", tmp_path / "dense")
    assert run_doctor(str(cfg), ["stage=sft"]) == 0
    out = capsys.readouterr().out
    assert (
        "MoE layers                WARN    no MoE layers: aux loss, monitoring and replay are off"
        in out
    )
    assert "router logits" not in out and "routing" not in out  # router rows make no sense
    assert out.splitlines()[-1] == "3 checks: 2 OK, 1 WARN, 0 FAIL"


def test_router_returning_probabilities_fails(
    files: dict[str, Path], patch_router: Callable, capsys: pytest.CaptureFixture
) -> None:
    patch_router(lambda out, m: (torch.softmax(out[0].float(), dim=-1), out[1], out[2]))
    assert run_doctor(str(_config(files, "probs", files["moe"])), []) == 1
    out = capsys.readouterr().out
    assert (
        "router logits             FAIL    router returns probabilities, not logits "
        "(MoE layers [0, 1]): the aux loss would be computed on softmax(softmax)"
    ) in out
    assert out.splitlines()[-1].endswith("1 FAIL")


def test_detached_router_logits_fail_the_gradient_check(
    files: dict[str, Path], patch_router: Callable
) -> None:
    patch_router(lambda out, m: (out[0].detach(), out[1], out[2]))
    checks = _by_name(diagnose(str(_config(files, "detached", files["moe"])), []))
    assert checks["router logits"].status == "OK"
    assert checks["aux loss gradient"].status == "FAIL"
    assert "reaches the router of MoE layers [0, 1]" in checks["aux loss gradient"].detail


def test_frozen_router_and_lora_without_router(files: dict[str, Path]) -> None:
    path = str(_config(files, "frozen", files["moe"]))
    frozen = _by_name(diagnose(path, ["moe.freeze_router=true"]))["aux loss gradient"]
    assert frozen.status == "OK"
    assert frozen.detail.startswith(
        "router frozen by moe.freeze_router: the aux loss acts through the router inputs only"
    )
    lora = _by_name(diagnose(path, ["model.lora.enabled=true"]))["aux loss gradient"]
    assert lora.status == "OK"  # q/k/v/o adapters below the routers get the aux gradient
    assert "not trainable (LoRA without model.lora.target_router)" in lora.detail
    head_only = ["model.lora.enabled=true", "model.lora.target_modules=[lm_head]"]
    useless = _by_name(diagnose(path, head_only))["aux loss gradient"]
    assert useless.status == "WARN" and "reaches no trainable parameter" in useless.detail
    on_router = ["model.lora.enabled=true", "model.lora.target_router=true"]
    assert _by_name(diagnose(path, on_router))["aux loss gradient"].detail.startswith(
        "reaches the router: |grad| = "  # lora_B of each router gets gradient at init
    )


def test_sft_prompts_stop_before_the_first_trained_token(files: dict[str, Path]) -> None:
    setup = prepare(str(_config(files, "sft_prompts", files["moe"])), ["stage=sft"])
    texts = [setup.tokenizer.decode(p) for p in setup.prompts]
    assert texts[0] == "<|im_start|>user\n1+2=?<|im_end|>\n<|im_start|>assistant\n"
    assert len(texts) == 4


def test_streamed_data_gives_the_same_doctor_prompts(files: dict[str, Path]) -> None:
    """data.streaming: the doctor reads only the stream's first examples, the same ones."""
    path = str(_config(files, "stream_prompts", files["moe"]))
    for stage in ("sft", "rl"):
        memory = prepare(path, [f"stage={stage}", "data.shuffle=false"])
        stream = ["data.streaming=true", "data.shuffle=false", "train.max_steps=1"]
        assert prepare(path, [f"stage={stage}", *stream]).prompts == memory.prompts


def test_sft_without_aux_loss_warns(files: dict[str, Path]) -> None:
    path = str(_config(files, "sft", files["moe"]))
    coef = _by_name(diagnose(path, ["stage=sft", "moe.router_aux_loss_coef=0"]))["aux coefficient"]
    assert coef.status == "WARN" and "aux loss is off in SFT" in coef.detail


def test_generation_train_mismatch_warns(
    files: dict[str, Path], patch_router: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Routers that pick other experts in eval mode (generation) than in train mode."""

    def eval_only_shift(out: tuple, module: torch.nn.Module) -> tuple:
        if module.training:
            return out
        logits = out[0]
        shifted = torch.roll(logits, 1, dims=-1)  # every token goes to different experts
        probs = torch.softmax(shifted, dim=-1, dtype=torch.float32)
        weights, idx = torch.topk(probs, module.top_k, dim=-1)
        return shifted, (weights / weights.sum(-1, keepdim=True)).to(out[1].dtype), idx

    patch_router(eval_only_shift)
    path = str(_config(files, "shift", files["moe"]))
    setup = prepare(path, ["moe.routing_replay=r3"])
    m = measure_rollout_gap(setup)
    assert m["flip_rate"] > 0.5 and m["gap_mean"] > 1e-4
    # replaying the generation's experts removes most of the log-prob gap
    assert m["gap_replayed"] < m["gap_mean"] / 5  # measured: 1.9e-4 vs 3.7e-3
    monkeypatch.setattr(doctor, "GAP_WARN", m["gap_mean"] / 2)
    checks = _by_name(diagnose(path, []))
    assert checks["train vs rollout routing"].status == "WARN"
    assert "moe.routing_replay=r3" in checks["train vs rollout routing"].detail
    assert checks["train vs rollout logprob"].status == "WARN"


def test_missing_model_is_a_user_error(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model.policy_name_or_path"):
        run_doctor(str(_config(files, "missing", tmp_path / "nowhere")), [])


def test_cli_exit_code(files: dict[str, Path]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moepost", "doctor", str(_config(files, "cli", files["moe"]))]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "8 checks: 8 OK, 0 WARN, 0 FAIL"


def test_cli_bad_input_exits_two(files: dict[str, Path], capsys: pytest.CaptureFixture) -> None:
    from moepost.cli import main

    assert main(["doctor", str(_config(files, "tpu", files["moe"])), "misc.device=tpu"]) == 2
    assert "misc.device: 'tpu' is not a device" in capsys.readouterr().err
