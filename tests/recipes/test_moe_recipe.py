"""MoE features end to end: aux loss reaches the router, routing replay (R3, R2), router
freezing, and the moe/* metrics of an RL run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from recipe_support import format_rows, make_config, read_log, write_jsonl
from safetensors.torch import load_file
from test_rl_recipe import rl_config
from test_sft_recipe import sft_config

from moepost.components.model.loading import load_policy
from moepost.components.moe.capture import find_moe_layers
from moepost.components.moe.router_setup import aux_loss, capture_router, router_setup
from moepost.components.rollout import engine as rollout
from moepost.config.schema import MiscConfig, ModelConfig, MoEConfig
from moepost.recipes.rl import run_rl
from moepost.recipes.sft import run_sft


def test_aux_loss_reaches_router_from_raw_logits(tiny_model: Path) -> None:
    model = load_policy(
        ModelConfig(policy_name_or_path=str(tiny_model)),
        MiscConfig(device="cpu"),
        device=torch.device("cpu"),
    )
    tools = router_setup(model, MoEConfig())
    assert tools.aux_coef == pytest.approx(0.001)  # the checkpoint's own coefficient
    ids = torch.tensor([[5, 17, 30, 42, 8, 9, 60, 3]])
    with capture_router(tools) as cap:
        model(input_ids=ids)
    logits = cap.logits()
    assert logits.shape == (2, 8, 4)
    # Raw logits: rows are not probability vectors.
    assert not torch.allclose(logits.sum(-1), torch.ones(2, 8), atol=1e-3)
    aux, metrics = aux_loss(tools, cap, torch.ones(8, dtype=torch.bool), share=1.0)
    assert metrics["aux_loss"] >= 2.0 - 1e-6  # K=2 is the perfectly balanced minimum
    aux.backward()
    for info in find_moe_layers(model):
        assert info.weight.grad is not None and float(info.weight.grad.norm()) > 0


def _perturbed_rollout_routers(monkeypatch: pytest.MonkeyPatch, scale: float) -> None:
    """Make the rollout policy differ from the training one the way an inference engine with
    other kernels (or stale weights) does: the routers see slightly different weights while
    generating, restored exactly afterwards."""
    original = rollout.HFRolloutEngine.generate

    def generate(self, prompts, params):  # type: ignore[no-untyped-def]
        weights = [info.weight for info in find_moe_layers(self.model)]
        saved = [w.detach().clone() for w in weights]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn(w.shape, generator=g) * scale)
        try:
            return original(self, prompts, params)
        finally:
            with torch.no_grad():
                for w, s in zip(weights, saved):
                    w.copy_(s)

    monkeypatch.setattr(rollout.HFRolloutEngine, "generate", generate)


def _first_step(out: Path) -> dict:
    return [r for r in read_log(out) if "loss" in r][0]


def test_r3_replay_zero_flips_and_smaller_gap(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _perturbed_rollout_routers(monkeypatch, scale=0.5)
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    rows = {}
    for replay in ("none", "r3"):
        out = tmp_path / replay
        cfg = rl_config(
            tiny_model, data, out, moe={"routing_replay": replay}, train={"max_steps": 1}
        )
        cfg["generation"]["max_new_tokens"] = 16
        run_rl(make_config(cfg))
        rows[replay] = _first_step(out)
    off, on = rows["none"], rows["r3"]
    assert off["moe/route_flip_rate_rollout_train"] > 0.05
    assert on["moe/route_flip_rate_rollout_train"] == 0.0
    # The router's own choice still differs from the rollout (that is what replay overrides).
    assert on["moe/route_flip_rate_rollout_train_own"] > 0.05
    assert on["logprob_gap/mean"] < off["logprob_gap/mean"]
    print(
        f"R3 figures: flip rate {off['moe/route_flip_rate_rollout_train']:.4f} -> "
        f"{on['moe/route_flip_rate_rollout_train']:.4f}, log-prob gap mean "
        f"{off['logprob_gap/mean']:.5f} -> {on['logprob_gap/mean']:.5f}"
    )


def test_trimmed_pad_columns_change_nothing_under_r3(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Micro-batches drop the left-pad columns all their rows share (and a mask that is then
    trailing-only): losses, KL, gaps and R3 replay/drift equal the full-width run."""
    from moepost.recipes.step_tensors import StepTensors

    _perturbed_rollout_routers(monkeypatch, scale=0.5)
    rows_in = format_rows("gsm8k", n=12)
    for i, row in enumerate(rows_in):  # prompts of clearly different lengths
        row["question"] = "Please answer. " * (i % 3) + row["question"]
    data = write_jsonl(tmp_path / "d.jsonl", rows_in)
    full_columns = StepTensors.columns
    cut: list[int] = []

    def spy(self: StepTensors, idx: slice) -> slice:
        cols = full_columns(self, idx)
        cut.append(cols.start)
        return cols

    rows = {}
    for name, columns in (("trimmed", spy), ("full", lambda self, idx: slice(None))):
        monkeypatch.setattr(StepTensors, "columns", columns)
        out = tmp_path / name
        cfg = rl_config(tiny_model, data, out, moe={"routing_replay": "r3"}, rl={"kl_coef": 0.1})
        run_rl(make_config(cfg))
        rows[name] = [r for r in read_log(out) if "loss" in r]
    assert max(cut) > 0, "no micro-batch had shared left padding to cut"
    for trimmed, full in zip(rows["trimmed"], rows["full"], strict=True):
        for key in ("loss", "kl", "logprob_gap/mean", "moe/route_flip_rate_rollout_train"):
            assert trimmed[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
    assert rows["trimmed"][0]["moe/route_flip_rate_rollout_train"] == 0.0


VARIANTS = {  # name: (train, data, rl) overrides
    "tokens": ({"micro_batch_tokens": 100}, {}, {}),
    "packed": ({"micro_batch_size": 4}, {"packing": True}, {}),
    "packed_tokens": ({"micro_batch_tokens": 150}, {"packing": True}, {}),
    "unshared": ({"micro_batch_size": 8}, {}, {"shared_prefix": False}),
    "unshared_tokens": ({"micro_batch_tokens": 100}, {}, {"shared_prefix": False}),
}


@pytest.mark.parametrize("replay", ["r3", "r2"])
def test_token_budget_packing_and_shared_prefix_change_nothing(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replay: str
) -> None:
    """train.micro_batch_tokens cuts the step's rows into consecutive slices of varying size,
    data.packing runs each micro-batch as one padding-free row, and rl.shared_prefix (on by
    default) runs each group's prompt once: losses, KL, aux loss, entropy, gaps and routing
    replay (R3 from the rollout; R2 from the old-policy pass, over two updates) equal one padded
    micro-batch of all rows (aux scope global, so the aux loss does not depend on the split
    either)."""
    from moepost.recipes import rl_passes

    _perturbed_rollout_routers(monkeypatch, scale=0.5)
    shared_calls: list[int] = []
    real_shared = rl_passes.shared_prefix_logits

    def spy(model: torch.nn.Module, inputs: dict, share: object) -> torch.Tensor:
        shared_calls.append(int(inputs["input_ids"].shape[0]))
        return real_shared(model, inputs, share)

    monkeypatch.setattr(rl_passes, "shared_prefix_logits", spy)
    rows_in = format_rows("gsm8k", n=12)
    for i, row in enumerate(rows_in):  # prompts of clearly different lengths
        row["question"] = "Please answer. " * (i % 3) + row["question"]
    data_file = write_jsonl(tmp_path / "d.jsonl", rows_in)
    logs, calls = {}, {}
    moe = {"routing_replay": replay, "aux_loss_scope": "global"}
    runs = {"rows": ({"micro_batch_size": 8}, {}, {}), **VARIANTS}
    for name, (train, data_cfg, rl_extra) in runs.items():
        out = tmp_path / name
        rl = {"kl_coef": 0.1, "num_policy_updates": 2 if replay == "r2" else 1, **rl_extra}
        cfg = rl_config(tiny_model, data_file, out, moe=moe, rl=rl, train=train)
        cfg["data"].update(data_cfg)
        shared_calls.clear()
        run_rl(make_config(cfg))
        logs[name], calls[name] = [r for r in read_log(out) if "loss" in r], list(shared_calls)
    assert [r["train/micro_batches"] for r in logs["rows"]] == [1, 1]
    # the shared path ran on every micro-batch of the default runs, and only there
    assert calls["rows"] and set(calls["rows"]) == {8}, calls["rows"]
    assert calls["tokens"] and not calls["unshared"] and not calls["packed"]
    assert all(r["train/micro_batches"] >= 2 for r in logs["tokens"]), logs["tokens"]
    keys = ["loss", "kl", "aux_loss", "logprob_gap/mean", "grad_norm", "entropy", "clip_frac"]
    keys.append("moe/route_flip_rate_rollout_train")
    if replay == "r2":
        keys.append("moe/route_flip_rate_update")
    for name in VARIANTS:
        for got, want in zip(logs[name], logs["rows"], strict=True):
            for key in keys:
                assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (name, key)


def test_r2_replays_old_policy_routes_in_every_update(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    out = tmp_path / "run"
    cfg = rl_config(
        tiny_model,
        data,
        out,
        rl={"algorithm": "grpo", "num_policy_updates": 3},
        moe={"routing_replay": "r2"},
        optim={"learning_rate": 3e-2},
    )
    run_rl(make_config(cfg))
    row = _first_step(out)
    # Routes are forced to the recorded ones, so the router's own top-k drifting between
    # updates (it does at this learning rate) does not change what the experts see.
    assert row["moe/route_flip_rate_update"] > 0.0
    assert all(math.isfinite(row[k]) for k in row if isinstance(row[k], float))


def _router_weights(path: Path) -> dict[str, torch.Tensor]:
    weights = load_file(str(path / "model.safetensors"))
    return {k: v for k, v in weights.items() if k.endswith("mlp.gate.weight")}


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_freeze_router_keeps_router_bit_identical(
    tiny_model: Path, tmp_path: Path, stage: str
) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    out = tmp_path / "run"
    builder = sft_config if stage == "sft" else rl_config
    cfg = builder(tiny_model, data, out, moe={"freeze_router": True}, optim={"learning_rate": 1e-2})
    (run_sft if stage == "sft" else run_rl)(make_config(cfg))
    before, after = _router_weights(tiny_model), _router_weights(out / "final")
    assert before and set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    full_before = load_file(str(tiny_model / "model.safetensors"))
    full_after = load_file(str(out / "final" / "model.safetensors"))
    moved = [k for k in full_before if not torch.equal(full_before[k], full_after[k])]
    assert moved, "nothing trained at all"


def test_rl_moe_metrics_and_expert_load_rows(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    out = tmp_path / "run"
    cfg = rl_config(tiny_model, data, out, train={"max_steps": 3}, logging={"log_every": 1})
    run_rl(make_config(cfg))
    rows = [r for r in read_log(out) if "loss" in r]
    keys = [
        "moe/load_entropy", "moe/load_entropy_min", "moe/max_violation", "moe/cv",
        "moe/dead_experts", "moe/route_flip_rate_rollout_train", "aux_loss",
    ]  # fmt: skip
    for row in rows:
        for key in keys:
            assert key in row and math.isfinite(row[key]), key
        assert 0.0 <= row["moe/load_entropy"] <= 1.0
    load = read_log(out, "expert_load.jsonl")
    assert [r["step"] for r in load] == [r["step"] for r in rows]
    fractions = torch.tensor(load[0]["load_fraction"])
    assert fractions.shape == (2, 4)
    torch.testing.assert_close(fractions.sum(-1), torch.ones(2), atol=1e-4, rtol=0)
