"""DeepSpeed executed on CPU (gloo, DeepSpeed's CPU accelerator): two processes must match one.

Three launches of `torchrun --nproc_per_node 2` (start-up dominates on CPU; the first one on a
fresh machine also JIT-builds DeepSpeed's shm comm op, about a minute):
  1. SFT under ZeRO-3 started by DeepSpeed's own launcher, killed after step 3 (`os._exit`
     from the test-only hook in exit_hook/sitecustomize.py);
  2. RL (GSPO LoRA, KL to the base) under ZeRO-3, killed the same way;
  3. `ds_driver.py`: SFT under ZeRO-2 / ZeRO-3 with and without offload, full and LoRA; the RL
     update alone (ZeRO-2 / ZeRO-3 x GSPO / GRPO x full / LoRA) against one process; whole RL
     runs under ZeRO-2 and ZeRO-3 (lock-step generation); `--resume auto` of the killed runs.
The one-process references run in this process.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from safetensors.torch import load_file

from moepost.config.load import load_config
from moepost.recipes.sft import run_sft

sys.path.insert(0, str(Path(__file__).parent))
from ds_driver import DS, KILLED, RL_RUNS  # noqa: E402
from gloo_retry import retry_teardown_abort  # noqa: E402

DRIVER = Path(__file__).parent / "ds_driver.py"
EXIT_HOOK = Path(__file__).parent / "exit_hook"
# Per-step values that must agree between 1 and 2 processes (timings and throughput differ).
COMPARED = ("loss", "token_accuracy", "aux_loss", "grad_norm", "lr", "moe/load_entropy", "epoch")
SFT_STEPS = 5
RL_STEPS = 4


def torchrun(args: list[str], *, env: dict[str, str] | None = None, timeout: int = 900) -> Any:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        cmd + args, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def deepspeed_launch(args: list[str], *, env: dict[str, str], timeout: int = 900) -> Any:
    """`deepspeed --num_gpus 2 --no_local_rank --module moepost ARGS` (2 CPU processes)."""
    launcher = Path(sys.executable).parent / "deepspeed"
    assert launcher.is_file(), f"DeepSpeed's launcher script is missing: {launcher}"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    with socket.socket() as sock:  # not the launcher's fixed default, 29500
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, str(launcher), "--num_gpus", "2", "--master_port", port]
    cmd += ["--no_local_rank", "--module"]
    return subprocess.run(
        [*cmd, "moepost", *args], env=full_env, capture_output=True, text=True, timeout=timeout,
        check=False,
    )  # fmt: skip


def log_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def weights(run_dir: Path) -> dict[str, Any]:
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else None
    return load_file(str(final / (name or "model.safetensors")))


def assert_same_run(one: Path, two: Path, *, steps: int = SFT_STEPS) -> None:
    rows_one, rows_two = log_rows(one), log_rows(two)
    assert [r["step"] for r in rows_two] == list(range(1, steps + 1))
    for a, b in zip(rows_one, rows_two):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    w_one, w_two = weights(one), weights(two)
    assert sorted(w_one) == sorted(w_two)
    worst = max(float((w_one[k] - w_two[k]).abs().max()) for k in w_one)
    assert worst < 1e-5, worst


def assert_close_bf16_run(one: Path, two: Path) -> None:
    """bf16: DeepSpeed reduces and accumulates gradients in bf16, one process in fp32, so the
    runs agree to bf16 rounding only: loss and grad norm within rel 5e-3 (aux loss 2e-2), and
    the weights' distance under 10% of how far training moved them (about 5% here; a wrong
    update is of the order of 100%)."""
    import torch

    rows_one, rows_two = log_rows(one), log_rows(two)
    assert [r["step"] for r in rows_two] == list(range(1, SFT_STEPS + 1))
    # the drift grows with the steps (about 1e-3 on the grad norm at step 5); the aux loss
    # follows discrete top-k choices, which bf16 rounding flips for a few tokens
    for a, b in zip(rows_one, rows_two):
        for key, rel in (("loss", 5e-3), ("grad_norm", 5e-3), ("lr", 1e-9), ("aux_loss", 2e-2)):
            assert b[key] == pytest.approx(a[key], rel=rel), (a["step"], key)
    w_one, w_two = weights(one), weights(two)
    config = yaml.safe_load((one / "resolved_config.yaml").read_text())
    w_init = load_file(str(Path(config["model"]["policy_name_or_path"]) / "model.safetensors"))
    assert w_one[next(iter(w_one))].dtype == torch.bfloat16

    def dist(a: dict[str, Any], b: dict[str, Any]) -> float:
        return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a) ** 0.5

    assert dist(w_one, w_two) < 0.1 * dist(w_one, w_init)


@pytest.fixture(scope="module")
def ds_sft_cfg(sft_cfg: Path, workdir: Path) -> Path:
    """The data-parallel SFT config, 5 steps, a checkpoint every 2 (ZeRO saves run too)."""
    data = yaml.safe_load(sft_cfg.read_text())
    data["train"].update(max_steps=SFT_STEPS, save_every=2)
    data["logging"].update(output_dir=str(workdir / "sft_one"), keep_last_checkpoints=1)
    path = workdir / "ds_sft.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def ds_rl_cfg(rl_cfg: Path, workdir: Path) -> Path:
    data = yaml.safe_load(rl_cfg.read_text())
    data["train"].update(max_steps=RL_STEPS, save_every=2)
    data["logging"].update(keep_last_checkpoints=1)
    path = workdir / "ds_rl.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def one_process(ds_sft_cfg: Path, workdir: Path) -> dict[str, Path]:
    """References: one process, the whole global batch of 4 per step, full and LoRA."""
    run_sft(load_config(ds_sft_cfg))
    lora = ["model.lora.enabled=true", "model.lora.target_experts=true"]
    run_sft(load_config(ds_sft_cfg, [*lora, f"logging.output_dir={workdir / 'sft_one_lora'}"]))
    # bf16 weights with fp32 masters, as DeepSpeed's bf16 mode keeps them
    bf16 = ["model.dtype=bfloat16", "optim.master_weights=fp32"]
    run_sft(load_config(ds_sft_cfg, [*bf16, f"logging.output_dir={workdir / 'sft_one_bf16'}"]))
    return {name: workdir / f"sft_one{suffix}" for name, suffix in
            (("full", ""), ("lora", "_lora"), ("bf16", "_bf16"))}  # fmt: skip


@pytest.fixture(scope="module")
def ds(ds_sft_cfg: Path, ds_rl_cfg: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "ds"
    out.mkdir()
    # the test-only exit hook (exit_hook/sitecustomize.py): every rank dies after step 3
    path = os.pathsep.join(p for p in (str(EXIT_HOOK), os.environ.get("PYTHONPATH")) if p)
    crash = {"MOEPOST_TEST_EXIT_AFTER_STEP": "3", "PYTHONPATH": path}
    killed = {}
    for name, (kind, extra, _) in KILLED.items():
        run, cfg = out / name, {"sft": ds_sft_cfg, "rl": ds_rl_cfg}[kind]
        args = ["train", str(cfg), *DS, *extra, f"logging.output_dir={run}"]
        # SFT is started by DeepSpeed's own launcher (the docs' `deepspeed ... --module` line)
        proc = (
            deepspeed_launch(args, env=crash)
            if kind == "sft"
            else torchrun(["-m", "moepost", *args], env=crash)
        )
        killed[name] = {
            "returncode": proc.returncode,
            "said": proc.stdout[-3000:] + proc.stderr[-3000:],
            "steps": [r["step"] for r in log_rows(run) if "loss" in r],
            "checkpoints": sorted(p.name for p in run.iterdir() if p.name.startswith("checkp")),
            "final": (run / "final").exists(),
        }
    proc = retry_teardown_abort(
        lambda: torchrun([str(DRIVER), str(out), str(ds_sft_cfg), str(ds_rl_cfg)])
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return {"dir": out, "killed": killed, **json.loads((out / "results.json").read_text())}


SFT_EXPECTED = {  # run -> (reference, stage, offload_optimizer, offload_param)
    "z2": ("full", 2, False, False),
    "z2_offload": ("full", 2, True, False),
    "z3": ("full", 3, False, False),
    "z3_offload": ("full", 3, True, True),
    "z3_lora": ("lora", 3, False, False),
    "z3_bf16": ("bf16", 3, False, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SFT_EXPECTED))
def test_sft_deepspeed_two_ranks_match_one_process(
    one_process: dict[str, Path], ds: dict[str, Any], name: str
) -> None:
    """ZeRO-2 / ZeRO-3 (offload on and off, full and LoRA) on 2 ranks == 1 process: per-step
    loss, token accuracy, aux loss, DeepSpeed's grad norm (clipped at 1.0), lr, load entropy;
    the final weights rank 0 saved (gathered from the partitions under ZeRO-3) within 1e-5."""
    reference, stage, off_opt, off_param = SFT_EXPECTED[name]
    run = ds["sft"][name]
    assert run["exit"] == 0
    # The engine that ran is the one asked for: stage, offload, our AdamW and schedule inside.
    (engine,) = run["engines"]
    assert (engine["stage"], engine["offload_optimizer"], engine["offload_param"]) == (
        stage, off_opt, off_param,
    )  # fmt: skip
    assert engine["zero_optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else
                                        "DeepSpeedZeroOptimizer")  # fmt: skip
    assert engine["client_optimizer"] == "AdamW" and engine["client_scheduler"] == "LambdaLR"
    assert engine["bf16"] is (reference == "bf16")  # else the tiny model's fp32
    if reference == "bf16":
        assert_close_bf16_run(one_process[reference], ds["dir"] / name)
    else:
        assert_same_run(one_process[reference], ds["dir"] / name)
    # save_every=2 under ZeRO wrote engine state too (keep_last_checkpoints=1 kept the newest)
    ckpt = ds["dir"] / name / "checkpoint-4"
    assert (ckpt / "deepspeed" / "latest").is_file()
    assert (ckpt / "deepspeed" / "rng_rank1.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["z2_gspo_full", "z2_grpo_lora", "z3_gspo_full",
                                  "z3_grpo_full", "z3_gspo_lora", "z3_grpo_lora"])  # fmt: skip
def test_rl_update_deepspeed_two_ranks_match_one_process(ds: dict[str, Any], name: str) -> None:
    """policy_update through the engine on 2 ranks x 2 groups == 1 process x 4 groups, then
    one step: full gradients (out of the ZeRO partitions), loss, KL, clip fraction, the
    global-scope aux loss, the clipped grad norm and the updated weights."""
    r = ds["update"][name]
    assert r["grad_max"] > 1e-3 and r["weight_moved"] > 1e-4  # the check is not vacuous
    assert r["grad_max_diff"] < 1e-6 * max(1.0, r["grad_max"])
    assert r["weight_max_diff"] < 1e-5
    for key in ("loss", "kl", "clip_frac", "aux_loss", "grad_norm", "lr"):
        ref, dp = r[key]
        assert ref is not None and dp == pytest.approx(ref, rel=1e-6, abs=1e-7), key


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RL_RUNS))
def test_rl_deepspeed_two_ranks_complete(ds: dict[str, Any], name: str) -> None:
    """Whole RL runs under ZeRO-2 and ZeRO-3 (GRPO with KL to a reference model and R3 replay;
    GSPO LoRA with KL to the adapter-free base): finite logs, the engine saved its state at
    steps 2 and 4, rank 0 wrote the final weights (gathered under ZeRO-3)."""
    assert ds["rl"][name]["exit"] == 0
    stage = 3 if "z3" in name else 2
    assert [e["stage"] for e in ds["rl"][name]["engines"]] == [stage]
    run = ds["dir"] / name
    rows = [r for r in log_rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, RL_STEPS + 1))
    for row in rows:
        for key in ("loss", "grad_norm", "reward/mean", "kl", "moe/load_entropy"):
            assert math.isfinite(row[key]), (row["step"], key)
    assert any(row["kl"] > 0 for row in rows[1:])  # the policy moved away from the reference
    assert (run / "checkpoint-4" / "deepspeed" / "latest").is_file()
    lora = "lora" in name
    assert (
        (run / "final" / ("adapter_model" if lora else "model"))
        .with_suffix(".safetensors")
        .is_file()
    )


@pytest.mark.slow
def test_rl_zero3_generation_matches_zero2(ds: dict[str, Any]) -> None:
    """Lock-step decoding under ZeRO-3 samples what free-running ZeRO-2 ranks sample: same
    seeds, same weights, so the same rewards and losses (up to reduction order)."""
    z2, z3 = ([r for r in log_rows(ds["dir"] / n) if "loss" in r] for n in ("rl_z2", "rl_z3"))
    assert len(z2) == len(z3) == RL_STEPS
    for a, b in zip(z2, z3):
        assert b["reward/mean"] == a["reward/mean"], a["step"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6), a["step"]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(KILLED))
def test_deepspeed_kill_and_resume_equals_uninterrupted(ds: dict[str, Any], name: str) -> None:
    """Killed after step 3 (checkpoint-2 on disk: engine partitions of both ranks, their RNG,
    the data position), `--resume auto` replays step 3 and finishes: every logged loss within
    rel 1e-6 of the uninterrupted run, final weights within 1e-6. SFT: ZeRO-3 full weights;
    RL: ZeRO-3 GSPO LoRA (lock-step rollouts, the frozen base outside the engine state)."""
    kind, _, twin = KILLED[name]
    steps = SFT_STEPS if kind == "sft" else RL_STEPS
    killed = ds["killed"][name]
    assert killed["returncode"] != 0 and killed["steps"] == [1, 2, 3], killed["said"]
    assert killed["checkpoints"] == ["checkpoint-2"] and not killed["final"]
    assert ds["resume"][name]["exit"] == 0
    assert "resumed from" in ds["resume"][name]["said"]
    straight, again = log_rows(ds["dir"] / twin), log_rows(ds["dir"] / name)
    losses = [[r["loss"] for r in rows if "loss" in r] for rows in (straight, again)]
    assert len(losses[1]) == steps
    assert losses[1] == pytest.approx(losses[0], rel=1e-6, abs=1e-9)
    w_straight, w_again = weights(ds["dir"] / twin), weights(ds["dir"] / name)
    worst = max(float((w_straight[k] - w_again[k]).abs().max()) for k in w_straight)
    assert worst <= 1e-6, worst
