"""The numerical-stability toolbox end to end on a tiny qwen3_moe: injected NaN / spiked
gradients (the MOEPOST_INJECT_* hooks of fault_hooks.py), consecutive skips stopping the run with the checkpoint
intact, NaN logits rows dropped from the SFT loss, and the AQN sigma in the RL log."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from fault_hooks import install_gradient_faults
from recipe_support import format_rows, make_config, read_log, write_jsonl
from safetensors.torch import load_file

from moepost.components.training import checkpoint as ckpt
from moepost.errors import UserError
from moepost.recipes import sft as sft_recipe
from moepost.recipes.rl import run_rl
from moepost.recipes.sft import run_sft

STABILITY_KEYS = [
    "grad_norm", "stability/grad_norm_raw", "stability/grad_norm_clipped", "stability/clip_coef",
    "stability/grad_norm_ema", "stability/skipped", "stability/step_skipped",
    "stability/nonfinite_tokens",
]  # fmt: skip
LR = 3e-3


def sft_config(model_dir: Path, data: Path, out: Path, **sections: dict) -> dict:
    cfg: dict[str, Any] = {
        "stage": "sft",
        "model": {"policy_name_or_path": str(model_dir)},
        "data": {"train_file": str(data), "max_seq_length": 64},
        "train": {"max_steps": 4, "batch_size": 2, "micro_batch_size": 2, "seed": 1},
        "optim": {"learning_rate": LR, "lr_scheduler": "cosine", "warmup_steps": 1},
        "stability": {"adaptive_grad_clip": {"enabled": True, "ema_beta": 0.99, "coef": 1.5}},
        "logging": {"output_dir": str(out), "save_final": True, "keep_last_checkpoints": 0},
        "misc": {"device": "cpu"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


def rl_config(model_dir: Path, data: Path, out: Path, **sections: dict) -> dict:
    cfg: dict[str, Any] = {
        "stage": "rl",
        "model": {"policy_name_or_path": str(model_dir)},
        "data": {"train_file": str(data), "test_size": 0},
        "generation": {"num_samples_per_prompt": 2, "max_new_tokens": 6, "temperature": 1.0},
        "rl": {"algorithm": "grpo", "kl_coef": 0.0},
        "reward": {"functions": [{"name": "format", "pattern": "[0-9]"}]},
        "train": {"max_steps": 3, "prompts_per_step": 2, "micro_batch_size": 4, "seed": 3},
        "optim": {"learning_rate": 1e-3, "lr_scheduler": "cosine", "warmup_steps": 1},
        "logging": {"output_dir": str(out), "save_final": True},
        "misc": {"device": "cpu"},
    }
    for name, values in sections.items():
        cfg[name] = {**cfg.get(name, {}), **values}
    return cfg


@pytest.fixture(autouse=True)
def gradient_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """The MOEPOST_INJECT_* hooks (tests/recipes/fault_hooks.py), undone after each test."""
    install_gradient_faults(monkeypatch)


@pytest.fixture
def sft_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", format_rows("messages", n=12))


@pytest.fixture
def rl_data(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "rl.jsonl", format_rows("gsm8k", n=8))


def _all_finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(w).all()) for w in weights.values())


def _optimizer_state_finite(checkpoint: Path) -> bool:
    state = ckpt.load_trainer_state(checkpoint)["optim"]["optimizer"]["state"]
    tensors = [v for s in state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors)


def test_sft_nan_gradient_step_is_skipped(
    tiny_model: Path, sft_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEPOST_INJECT_NAN_GRAD_AT_STEP", "2")
    out = tmp_path / "run"
    run_sft(make_config(sft_config(tiny_model, sft_data, out, train={"save_every": 1})))
    rows = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert not [k for k in STABILITY_KEYS if k not in row], row
    assert rows[1]["grad_norm"] == "nan"  # JSON has no NaN: the logger writes the string
    assert [r["stability/step_skipped"] for r in rows] == [0, 1, 0, 0]
    assert [r["stability/skipped"] for r in rows] == [0, 1, 1, 1]
    assert rows[1]["stability/clip_coef"] == 0.0 and rows[1]["stability/grad_norm_clipped"] == 0
    # The EMA does not see the skipped step.
    assert rows[1]["stability/grad_norm_ema"] == rows[0]["stability/grad_norm_ema"]
    # Cosine over 4 steps, 1 warm-up step: factors f(0)=1/2, f(1)=1, f(2)=(1+cos(pi/3))/2=3/4.
    # The skipped step 2 does not advance the schedule, so step 3 gets f(1) again.
    assert [r["lr"] for r in rows] == pytest.approx([LR / 2, LR, LR, 0.75 * LR])
    # Step 2 changed no weight; the optimizer state never saw the NaN.
    w1, w2 = (load_file(str(out / f"checkpoint-{s}" / "model.safetensors")) for s in (1, 2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert _optimizer_state_finite(out / "checkpoint-4")
    final = load_file(str(out / "final" / "model.safetensors"))
    assert _all_finite(final) and not all(torch.equal(final[k], w2[k]) for k in final)


def test_rl_nan_gradient_step_is_skipped(
    tiny_model: Path, rl_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEPOST_INJECT_NAN_GRAD_AT_STEP", "2")
    out = tmp_path / "run"
    run_rl(make_config(rl_config(tiny_model, rl_data, out, train={"save_every": 3})))
    rows = [r for r in read_log(out) if "loss" in r]
    assert [r["stability/skipped"] for r in rows] == [0, 1, 1]
    assert [r["stability/step_skipped"] for r in rows] == [0, 1, 0]
    assert rows[-1]["stability/nonfinite_tokens"] == 0
    # Cosine over 3 steps, 1 warm-up: f(0)=1/2, f(1)=1; step 3 repeats f(1) after the skip.
    assert [r["lr"] for r in rows] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert _all_finite(load_file(str(out / "final" / "model.safetensors")))
    assert _optimizer_state_finite(out / "checkpoint-3")


def test_consecutive_nan_steps_stop_with_checkpoint_intact(
    tiny_model: Path, sft_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEPOST_INJECT_NAN_GRAD_AT_STEP", "3+")  # step 3 and every later one
    out = tmp_path / "run"
    cfg = sft_config(
        tiny_model,
        sft_data,
        out,
        train={"max_steps": 6, "save_every": 1},
        stability={"max_consecutive_skips": 2},
    )
    with pytest.raises(UserError, match=r"stability\.max_consecutive_skips = 2"):
        run_sft(make_config(cfg))
    # Steps 3 and 4 failed; step 3 finished (and saved, unchanged weights), step 4 stopped.
    assert [p.name for p in ckpt.list_checkpoints(out)] == [f"checkpoint-{s}" for s in (1, 2, 3)]
    last = ckpt.resolve_resume(out, "auto")
    assert last is not None and last.name == "checkpoint-3"
    weights = load_file(str(last / "model.safetensors"))
    before = load_file(str(out / "checkpoint-2" / "model.safetensors"))
    assert _all_finite(weights) and all(torch.equal(weights[k], before[k]) for k in weights)
    assert _optimizer_state_finite(last)
    # The run continues from there once the cause is gone.
    monkeypatch.delenv("MOEPOST_INJECT_NAN_GRAD_AT_STEP")
    run_sft(make_config(cfg), resume="auto")
    rows = [r for r in read_log(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["stability/skipped"] == 1  # the skip of step 3, restored from the checkpoint


def test_gradient_spike_is_clipped_at_coef_times_ema(
    tiny_model: Path, sft_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOEPOST_INJECT_GRAD_SPIKE_AT_STEP", "2")
    monkeypatch.setenv("MOEPOST_GRAD_SPIKE_SCALE", "1000")
    out = tmp_path / "run"
    run_sft(make_config(sft_config(tiny_model, sft_data, out, train={"max_steps": 2})))
    first, spike = [r for r in read_log(out) if "loss" in r]
    # Step 1 starts the EMA at its own norm, unclipped; step 2's threshold is 1.5 x that EMA.
    assert first["stability/clip_coef"] == 1.0
    assert first["stability/grad_norm_ema"] == pytest.approx(first["stability/grad_norm_raw"])
    assert spike["stability/grad_norm_raw"] > 100 * first["stability/grad_norm_raw"]
    threshold = 1.5 * first["stability/grad_norm_ema"]
    assert spike["stability/grad_norm_clipped"] == pytest.approx(threshold, rel=1e-5)
    assert spike["stability/clip_coef"] == pytest.approx(
        threshold / spike["stability/grad_norm_raw"], rel=1e-5
    )
    # ema <- 0.99 * ema + 0.01 * clipped
    expected_ema = 0.99 * first["stability/grad_norm_ema"] + 0.01 * threshold
    assert spike["stability/grad_norm_ema"] == pytest.approx(expected_ema, rel=1e-5)
    assert spike["stability/skipped"] == 0


def test_sft_overflowing_logits_row_is_dropped_from_the_loss() -> None:
    """Row 0's logits overflow to +inf inside the matmul (as an fp16 lm_head can): its loss is
    NaN, and masking its labels alone would still give NaN gradients (softmax of inf logits
    times a zero upstream gradient). Dropped properly, the loss and the gradients equal those
    of the clean row alone, and the dropped target tokens are counted."""
    torch.manual_seed(0)

    class Stub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            with torch.no_grad():
                self.head.weight.fill_(1.0)
                self.embed.weight[1:5] = 1e38  # 8 x 1e38 > float32 max 3.4e38: logits inf

        def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
            return type("Out", (), {"logits": self.head(self.embed(input_ids))})()

    model = Stub()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    labels = torch.tensor([[-100, 2, 3, 4], [-100, -100, 7, 8]])  # row 0: 3 targets, row 1: 2

    def run(rows: slice) -> tuple[float, float, list[torch.Tensor]]:
        model.zero_grad()
        batch = {"input_ids": ids[rows], "labels": labels[rows].clone()}
        loss, m = sft_recipe.forward_loss(model, batch, 5)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
        return float(loss.detach()), float(m["nonfinite_tokens"]), grads

    loss, dropped, grads = run(slice(0, 2))
    clean_loss, clean_dropped, clean_grads = run(slice(1, 2))
    assert dropped == 3 and clean_dropped == 0
    assert math.isfinite(loss) and loss == pytest.approx(clean_loss, rel=1e-6)
    assert all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(torch.allclose(g, c, atol=1e-7) for g, c in zip(grads, clean_grads))


def test_sft_run_with_a_nan_logits_row_is_not_skipped(
    tiny_model: Path, sft_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    original = sft_recipe.load_policy

    def poisoned(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = original(*args, **kwargs)

        def hook(_module: torch.nn.Module, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 1:  # the first training forward: row 0 overflows
                rows = torch.arange(logits.shape[0])[:, None, None] == 0
                return torch.where(rows, float("inf"), logits)
            return logits

        model.lm_head.register_forward_hook(hook)
        return model

    monkeypatch.setattr(sft_recipe, "load_policy", poisoned)
    out = tmp_path / "run"
    run_sft(make_config(sft_config(tiny_model, sft_data, out, train={"max_steps": 2})))
    rows = [r for r in read_log(out) if "loss" in r]
    assert rows[0]["stability/nonfinite_tokens"] > 0 and rows[1]["stability/nonfinite_tokens"] == 0
    assert [r["stability/skipped"] for r in rows] == [0, 0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert _all_finite(load_file(str(out / "final" / "model.safetensors")))


def test_rl_logs_aqn_sigma_following_the_schedule(
    tiny_model: Path, rl_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    noise = {"enabled": True, "sigma_start": 1e-2, "sigma_end": 1e-4, "num_stages": 3}
    cfg = rl_config(tiny_model, rl_data, out, noise_injection=noise, train={"max_steps": 3})
    run_rl(make_config(cfg))
    rows = [r for r in read_log(out) if "loss" in r]
    # 3 steps in 3 stages: step index 0 -> no noise, 1 -> sigma_start, 2 -> sigma_end.
    assert [r["noise/sigma"] for r in rows] == pytest.approx([0.0, 1e-2, 1e-4])
    # The HF engine generates with the noisy norms, the training pass runs on the clean ones:
    # the rollout-vs-train log-prob gap is numerical noise at sigma 0 and clearly not at 1e-2.
    gaps = [r["logprob_gap/mean"] for r in rows]
    assert gaps[0] < 1e-5 and gaps[1] > 1e-4
