"""SFT end to end on a tiny qwen3_moe: golden losses per data format, full and LoRA,
accumulation and resume equivalence, export round trip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipe_support import (
    check_golden,
    format_rows,
    make_config,
    read_log,
    train_losses,
    write_jsonl,
)
from safetensors.torch import load_file

from moepost.recipes.sft import run_sft

FORMATS = ["messages", "alpaca", "sharegpt", "prompt_completion", "text", "gsm8k"]


def sft_config(model_dir: Path, data: Path, out: Path, **sections: dict) -> dict:
    cfg = {
        "stage": "sft",
        "model": {"policy_name_or_path": str(model_dir)},
        "data": {"train_file": str(data), "max_seq_length": 64},
        "train": {"max_steps": 3, "batch_size": 4, "micro_batch_size": 2, "seed": 1},
        "optim": {"learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_steps": 1},
        "logging": {"output_dir": str(out), "save_final": True, "write_report": False},
        "misc": {"device": "cpu"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_full_each_format_matches_golden(tiny_model: Path, tmp_path: Path, fmt: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows(fmt))
    run_sft(make_config(sft_config(tiny_model, data, tmp_path / "run")))
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    check_golden("sft_full", {fmt: losses})
    assert (tmp_path / "run" / "resolved_config.yaml").is_file()
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_lora_with_experts_each_format(tiny_model: Path, tmp_path: Path, fmt: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows(fmt))
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_experts": True}}
    run_sft(make_config(sft_config(tiny_model, data, tmp_path / "run", model=lora)))
    losses = train_losses(tmp_path / "run")
    check_golden("sft_lora", {fmt: losses})
    adapter = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    expert_b = {k: v for k, v in adapter.items() if "experts" in k and "lora_B" in k}
    assert expert_b, f"no expert adapters saved: {sorted(adapter)[:5]}"
    # lora_B starts at zero: any non-zero entry means the expert adapters were trained.
    assert all(float(v.abs().max()) > 0 for v in expert_b.values())


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_accumulation_equivalence(tiny_model: Path, tmp_path: Path) -> None:
    """micro_batch 4 x accumulation 1 == micro_batch 1 x accumulation 4 (aux loss off: it is
    a per-micro-batch statistic and so legitimately differs)."""
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("messages", n=16))
    runs = {}
    for mb, acc in ((4, 1), (1, 4)):
        out = tmp_path / f"run_{mb}x{acc}"
        train = {"micro_batch_size": mb, "gradient_accumulation_steps": acc}
        cfg = sft_config(tiny_model, data, out, train=train, moe={"router_aux_loss_coef": 0.0})
        run_sft(make_config(cfg))
        runs[(mb, acc)] = (train_losses(out), _final_weights(out))
    (l1, w1), (l2, w2) = runs[(4, 1)], runs[(1, 4)]
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    # Summation order differs between the two, and Adam's 1/sqrt(v) magnifies float noise on
    # near-zero gradients: allow a few 1e-6 on weights that moved by ~lr=3e-3 per step.
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_token_budget_micro_batches_equal_row_micro_batches(
    tiny_model: Path, tmp_path: Path, packing: bool
) -> None:
    """train.micro_batch_tokens regroups a step's examples (or packed rows; longest first, as
    many as fit the budget); the loss is normalised over the whole step, so losses and weights
    stay those of row micro-batches (aux loss off: a per-micro-batch statistic)."""
    rows = format_rows("messages", n=16 if not packing else 48)
    for i, row in enumerate(rows):  # lengths that differ, so the budget groups unevenly
        row["messages"][1]["content"] += " ok" * (i % 5)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    budget = 128 if packing else 90  # packed rows fill up to max_seq_length = 64 tokens
    runs = {}
    for name, train in (
        ("rows", {"micro_batch_size": 4}),
        ("tokens", {"micro_batch_tokens": budget}),
    ):
        out = tmp_path / name
        cfg = sft_config(tiny_model, data, out, train=train, moe={"router_aux_loss_coef": 0.0})
        cfg["data"]["packing"] = packing
        run_sft(make_config(cfg))
        log = [r for r in read_log(out) if "loss" in r]
        runs[name] = (log, _final_weights(out))
    (rows_log, w1), (tok_log, w2) = runs["rows"], runs["tokens"]
    assert [r["train/micro_batches"] for r in rows_log] == [1, 1, 1]
    assert all(r["train/micro_batches"] >= 2 for r in tok_log), tok_log
    assert [r["loss"] for r in tok_log] == pytest.approx([r["loss"] for r in rows_log], rel=1e-5)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)


def test_global_aux_scope_makes_accumulation_exact_with_aux_on(
    tiny_model: Path, tmp_path: Path
) -> None:
    """With moe.aux_loss_scope=global the expert counts come from the whole step, so the aux
    loss (and everything else) no longer depends on how the step is split."""
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("messages", n=16))
    runs = {}
    for mb, acc in ((4, 1), (1, 4)):
        out = tmp_path / f"run_{mb}x{acc}"
        train = {"micro_batch_size": mb, "gradient_accumulation_steps": acc}
        moe = {"router_aux_loss_coef": 0.5, "aux_loss_scope": "global"}
        run_sft(make_config(sft_config(tiny_model, data, out, train=train, moe=moe)))
        rows = [r for r in read_log(out) if "loss" in r]
        runs[(mb, acc)] = ([r["aux_loss"] for r in rows], _final_weights(out))
    (a1, w1), (a2, w2) = runs[(4, 1)], runs[(1, 4)]
    assert a1 == pytest.approx(a2, rel=1e-5)
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=1e-4, atol=1e-5)


FAULT_DRIVER = str(Path(__file__).parent / "fault_driver.py")


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`moepost ARGS` in a subprocess; with `env`, through the fault-hook driver."""
    entry = [FAULT_DRIVER] if env else ["-m", "moepost"]
    return subprocess.run(
        [sys.executable, *entry, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


@pytest.mark.slow
def test_resume_after_kill_equals_uninterrupted(tiny_model: Path, tmp_path: Path) -> None:
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl", format_rows("alpaca", n=16))
    paths = {}
    for name in ("straight", "killed"):
        cfg = sft_config(
            tiny_model,
            data,
            tmp_path / name,
            train={"max_steps": 5, "save_every": 2},
            logging={"keep_last_checkpoints": 1},
        )
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    assert _cli(["train", str(paths["straight"])]).returncode == 0
    killed = _cli(["train", str(paths["killed"])], env={"MOEPOST_CRASH_AFTER_STEP": "3"})
    assert killed.returncode == 17, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "final").exists()
    assert [r["step"] for r in read_log(tmp_path / "killed") if "loss" in r] == [1, 2, 3]
    resumed = _cli(["train", str(paths["killed"]), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    straight, again = train_losses(tmp_path / "straight"), train_losses(tmp_path / "killed")
    assert len(again) == 5
    assert again == pytest.approx(straight, rel=1e-6, abs=1e-7)
    w1, w2 = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    for key in w1:
        torch.testing.assert_close(w1[key], w2[key], rtol=0, atol=1e-6)


def test_export_merged_lora_round_trip(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from moepost.components.model.loading import load_policy
    from moepost.config.schema import MiscConfig, ModelConfig

    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k"))
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_experts": True}}
    run_sft(make_config(sft_config(tiny_model, data, tmp_path / "run", model=lora)))
    result = _cli(["export", str(tmp_path / "run"), str(tmp_path / "merged"), "--merge-lora"])
    assert result.returncode == 0, result.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    peft_model = load_policy(
        ModelConfig(policy_name_or_path=str(tmp_path / "run" / "final")),
        MiscConfig(device="cpu"),
        device=torch.device("cpu"),
        for_training=False,
    ).eval()
    ids = torch.tensor([[5, 17, 30, 42, 8, 9, 60]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft_model(ids).logits, rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, merged(ids).logits, atol=1e-4)
