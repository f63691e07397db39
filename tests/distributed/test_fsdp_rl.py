"""FSDP2 for RL and exact resume, on CPU with gloo (2 processes).

Five launches of `torchrun --nproc_per_node 2 fsdp_driver.py` (start-up dominates on CPU):
one per (stage, backend) in {SFT, RL} x {ddp, fsdp}, each an uninterrupted 4-step run and a
copy killed after step 3 (checkpoint at step 2; the fsdp RL launch adds a GSPO LoRA run), then
one launch that resumes the four killed runs with `--resume auto` and checks the RL update of
2 FSDP2 ranks against one process. `moepost export` of the sharded checkpoints runs here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from gloo_retry import retry_teardown_abort  # this folder (pytest puts it on sys.path)
from safetensors.torch import load_file

from moepost.cli import main as cli_main

DRIVER = Path(__file__).parent / "fsdp_driver.py"
STEPS = ["train.max_steps=4", "train.save_every=2", "logging.keep_last_checkpoints=1"]
RUNS = ("sft_ddp", "sft_fsdp", "rl_ddp", "rl_fsdp")
# RL keys that must agree between the fsdp and ddp runs (same seeds, same rollouts).
RL_COMPARED = (
    "loss", "kl", "grad_norm", "reward/mean", "aux_loss", "entropy", "clip_frac",
    "completion_length/mean", "moe/load_entropy", "moe/route_flip_rate_rollout_train_own",
)  # fmt: skip


def _launch(out: Path, spec: dict[str, Any], *, crashes: bool) -> dict[str, Any]:
    """One 2-process launch of the driver; its results.json (written before a crash run)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.pop("MOEPOST_CRASH_AFTER_STEP", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

    def launch() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, str(DRIVER), str(out), str(out / "spec.json")],
            env=env, capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip

    # a crash run ends with os._exit, so only a run meant to succeed can meet the teardown abort
    proc = launch() if crashes else retry_teardown_abort(launch)
    (out / "launch.log").write_text(proc.stdout + proc.stderr)  # kept for a failing run
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (proc.returncode != 0) == crashes, log  # a crash run ends the launch with os._exit
    return json.loads((out / "results.json").read_text())


def _backend(name: str) -> list[str]:
    """The run's backend; RL runs score every forward through the chunked LM head (shared-prefix
    forwards under FSDP take full logits, DDP's chunked ones: the two would differ by rounding)."""
    stage, backend = name.split("_")
    return [
        f"distributed.backend={backend}",
        *(["rl.shared_prefix=false"] if stage == "rl" else []),
    ]


def _train(cfg: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(cfg), f"logging.output_dir={out}", *STEPS, *extra]


@pytest.fixture(scope="module")
def launches(sft_cfg: Path, rl_cfg: Path, workdir: Path) -> dict[str, Any]:
    base = workdir / "fsdp_rl"
    cfgs = {"sft": sft_cfg, "rl": rl_cfg}
    results: dict[str, Any] = {"dir": base}
    for name in RUNS:
        stage, extra = name.split("_")[0], _backend(name)
        runs = [[name, _train(cfgs[stage], base / name, *extra), None]]
        if name == "rl_fsdp":  # GSPO with LoRA under FSDP2 (a sharded adapter checkpoint)
            lora = ["rl.algorithm=gspo", "model.lora.enabled=true", "model.lora.r=4"]
            runs.append(
                ["rl_fsdp_lora", _train(rl_cfg, base / "rl_fsdp_lora", *extra, *lora), None]
            )
        runs.append([f"{name}_killed", _train(cfgs[stage], base / f"{name}_killed", *extra), 3])
        results.update(_launch(base / f"launch_{name}", {"runs": runs}, crashes=True))
    resumes = [
        [f"{n}_resumed", [*_train(cfgs[n.split("_")[0]], base / f"{n}_killed", *_backend(n)),
                          "--resume", "auto"], None]
        for n in RUNS
    ]  # fmt: skip
    spec = {"runs": resumes, "update_check": str(rl_cfg)}
    results.update(_launch(base / "launch_resume", spec, crashes=False))
    return results


def _log(run: Path, name: str = "train_log.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / name).read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gspo", "grpo", "gspo_lora", "grpo_lora", "gspo_shared"])
def test_rl_update_fsdp_two_ranks_match_one_process(launches: dict[str, Any], case: str) -> None:
    """policy_update + optimizer step on 2 FSDP2 ranks x 2 groups == 1 process x 4 groups:
    loss, KL, clip fraction, global-scope aux loss, grad norm (DTensor norm over the shards),
    the updated weights (gathered), and for LoRA the adapter-disabled reference log-probs.
    gspo_shared runs shared-prefix forwards (two FSDP2 calls before one backward) against an
    unshared process: equal up to float rounding."""
    r = launches["update"][case]
    assert r["weights_moved"] > 5e-4  # the step did move the weights: the check can fail
    assert r["weights_max_diff"] < 1e-5, r["weights_max_diff"]
    assert r["ref_logprobs_max_diff"] < 1e-6
    for key in ("loss", "kl", "clip_frac", "aux_loss", "grad_norm"):
        one, two = r[key]
        assert two == pytest.approx(one, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_rl_fsdp_run_equals_ddp_run(launches: dict[str, Any]) -> None:
    """A whole GRPO run (KL, R3 replay, aux loss) under FSDP2 with lock-step generation gives
    the DDP run's rollouts, logs, expert loads and weights: each rank generates the same
    tokens from the same weights, the lock-step only adds forwards whose outputs are unused."""
    base = launches["dir"]
    assert launches["rl_fsdp"] == 0 and launches["rl_ddp"] == 0
    fsdp, ddp = base / "rl_fsdp", base / "rl_ddp"
    rows_f = [r for r in _log(fsdp) if "loss" in r]
    rows_d = [r for r in _log(ddp) if "loss" in r]
    assert [r["step"] for r in rows_f] == [1, 2, 3, 4]
    for a, b in zip(rows_d, rows_f, strict=True):
        for key in RL_COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    rollouts = [_log(run, "train_rollouts.jsonl") for run in (ddp, fsdp)]
    assert [r["completion"] for r in rollouts[0]] == [r["completion"] for r in rollouts[1]]
    for a, b in zip(*[_log(run, "expert_load.jsonl") for run in (ddp, fsdp)], strict=True):
        assert torch.allclose(torch.tensor(a["load_fraction"]), torch.tensor(b["load_fraction"]))
    w_d, w_f = _weights(ddp), _weights(fsdp)
    assert max(float((w_d[k] - w_f[k]).abs().max()) for k in w_d) < 1e-5
    assert launches["rl_fsdp_lora"] == 0  # GSPO + LoRA under FSDP2 runs too
    assert (base / "rl_fsdp_lora" / "final" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_resume_after_kill_equals_uninterrupted(launches: dict[str, Any], name: str) -> None:
    """Killed after step 3 (`os._exit` from the test hook), resumed with `--resume auto` from
    checkpoint-2: the same losses and final weights as the uninterrupted run (sharded DCP
    checkpoint under fsdp: model + optimizer shards, per-rank RNG, data position)."""
    base = launches["dir"]
    straight, killed = base / name, base / f"{name}_killed"
    assert launches[name] == 0 and launches[f"{name}_resumed"] == 0
    sharded = (killed / "checkpoint-4" / "dcp" / ".metadata").is_file()
    assert sharded == name.endswith("fsdp")
    if sharded:
        assert sorted(p.name for p in (killed / "checkpoint-4" / "rng").iterdir()) == [
            "rank-0.pt", "rank-1.pt",
        ]  # fmt: skip
        assert not list((killed / "checkpoint-4").glob("*.safetensors"))
    rows_s = [r for r in _log(straight) if "loss" in r]
    rows_k = [r for r in _log(killed) if "loss" in r]
    assert [r["step"] for r in rows_k] == [1, 2, 3, 4]
    losses = [r["loss"] for r in rows_s]
    assert [r["loss"] for r in rows_k] == pytest.approx(losses, rel=1e-6, abs=1e-9)
    w_s, w_k = _weights(straight), _weights(killed)
    assert sorted(w_s) == sorted(w_k)
    for key in w_s:
        torch.testing.assert_close(w_k[key], w_s[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_export_of_sharded_checkpoint_loads_and_equals_trained(
    launches: dict[str, Any], tmp_path: Path
) -> None:
    """`moepost export` of an fsdp checkpoint (step 4 = the final step): a transformers folder
    split into several safetensors files whose weights are the trained ones; a LoRA
    checkpoint merged with --merge-lora equals the merged final adapter."""
    from transformers import AutoModelForCausalLM

    base = launches["dir"]
    out = tmp_path / "full"
    assert cli_main(["export", str(base / "rl_fsdp" / "checkpoint-4"), str(out),
                     "--max-shard-size", "200KB"]) == 0  # fmt: skip
    assert len(list(out.glob("model-*.safetensors"))) > 1
    exported = AutoModelForCausalLM.from_pretrained(out).state_dict()
    trained = AutoModelForCausalLM.from_pretrained(base / "rl_fsdp" / "final").state_dict()
    assert sorted(exported) == sorted(trained)
    for key in trained:
        assert torch.equal(exported[key], trained[key]), key
    lora = base / "rl_fsdp_lora"
    for src, dst in ((lora / "checkpoint-4", "lora_sharded"), (lora / "final", "lora_final")):
        assert cli_main(["export", str(src), str(tmp_path / dst), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_sharded").state_dict()
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "lora_final").state_dict()
    assert sorted(merged) == sorted(expected)
    for key in expected:
        assert torch.equal(merged[key], expected[key]), key
