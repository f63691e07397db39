"""Data parallelism on CPU with gloo: two processes must match one process.

Two launches of `torchrun --nproc_per_node 2` (process start-up dominates on CPU):
`-m moepost train` for DDP SFT, and `dist_driver.py` for FSDP2 SFT, an RL run, the RL update
alone (2 ranks x half the groups vs 1 process) and the collectives. The one-process references
run in this process. DeepSpeed runs in test_deepspeed_gloo.py; here only its missing-package
error.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from gloo_retry import retry_teardown_abort  # this folder (pytest puts it on sys.path)
from safetensors.torch import load_file

from moepost.config.load import load_config
from moepost.errors import UserError
from moepost.recipes.sft import run_sft

DRIVER = Path(__file__).parent / "dist_driver.py"
# Per-step values that must agree between 1 and 2 processes (timings and throughput differ).
COMPARED = ("loss", "token_accuracy", "aux_loss", "grad_norm", "lr", "moe/load_entropy", "epoch")


def torchrun(args: list[str], *, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = retry_teardown_abort(
        lambda: subprocess.run(
            cmd + args, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def log_rows(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def assert_same_run(one: Path, two: Path) -> None:
    rows_one, rows_two = log_rows(one), log_rows(two)
    assert [r["step"] for r in rows_two] == [1, 2, 3]
    for a, b in zip(rows_one, rows_two):
        for key in COMPARED:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    w_one = load_file(str(one / "final" / "model.safetensors"))
    w_two = load_file(str(two / "final" / "model.safetensors"))
    assert sorted(w_one) == sorted(w_two)
    worst = max(float((w_one[k] - w_two[k]).abs().max()) for k in w_one)
    assert worst < 1e-5, worst


@pytest.fixture(scope="module")
def one_process_sft(sft_cfg: Path, workdir: Path) -> Path:
    """Reference: one process, the whole global batch of 4 per step."""
    run_sft(load_config(sft_cfg))
    return workdir / "sft_one"


@pytest.fixture(scope="module")
def driver(sft_cfg: Path, rl_cfg: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "driver"
    out.mkdir()
    torchrun([str(DRIVER), str(out), str(sft_cfg), str(rl_cfg)])
    return {"dir": out, **json.loads((out / "results.json").read_text())}


@pytest.mark.slow
def test_sft_ddp_two_ranks_match_one_process(
    one_process_sft: Path, sft_cfg: Path, workdir: Path
) -> None:
    """2 ranks x 2 examples (DDP, no_sync accumulation, global token count and expert counts
    all-reduced) == 1 process x 4 examples: per-step logs and final weights."""
    two = workdir / "sft_ddp"
    torchrun(["-m", "moepost", "train", str(sft_cfg), f"logging.output_dir={two}"])
    assert_same_run(one_process_sft, two)


@pytest.mark.slow
def test_sft_fsdp2_two_ranks_match_one_process(
    one_process_sft: Path, driver: dict[str, Any]
) -> None:
    """FSDP2 (fully_shard per decoder layer + root) on CPU/gloo: same losses, same grad norm
    (DTensor norm across shards), and rank 0 saves the gathered full weights."""
    assert driver["fsdp_exit"] == 0
    assert_same_run(one_process_sft, driver["dir"] / "fsdp")


@pytest.mark.slow
def test_rl_ddp_two_ranks_complete(driver: dict[str, Any]) -> None:
    """Each rank generates its own prompt's group; logs are finite and written by rank 0."""
    assert driver["rl_exit"] == 0
    run = driver["dir"] / "rl"
    rows = [r for r in log_rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "grad_norm", "reward/mean", "kl", "moe/load_entropy"):
            assert math.isfinite(row[key]), (row["step"], key)
    # Rank 0 writes only its own rollouts: 1 prompt x 4 samples per step.
    rollouts = (run / "train_rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 2 * 4
    assert (run / "final" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    "algorithm", ["gspo", "grpo", "dr_grpo", "gspo_tokens", "gspo_shared", "gspo_shared_tokens"]
)
def test_rl_update_two_ranks_match_one_process(driver: dict[str, Any], algorithm: str) -> None:
    """policy_update on 2 ranks x 2 groups (DDP) == 1 process x 4 groups: gradients, loss,
    KL, clip fraction and the global-scope aux loss (normalisers and counts all-reduced).
    The three presets cover seq-mean-token-mean, token-mean and seq-mean-token-sum-norm;
    gspo_tokens uses a token budget under which the ranks need 2 and 3 micro-batches. The
    _shared cases run shared-prefix forwards (two calls per micro-batch through DDP) against an
    unshared process, so they match up to float rounding; gspo_shared_tokens plans rank 0's
    rows 8 + 13 | 9 + 14 and rank 1's 10 | 10 | 8 + 13 tokens against a budget of 14."""
    r = driver["rl_update"][algorithm]
    if algorithm.endswith("_tokens"):
        assert r["micro_batches"] == [[2, 3], [3, 3]]  # rank 0 split one to match rank 1
    else:
        assert r["micro_batches"] == [[2, 2], [2, 2]]
    shared = "_shared" in algorithm
    assert (r["shared_calls"] > 0) == shared, r["shared_calls"]  # one per micro-batch when on
    assert r["grad_max"] > 1e-3  # the check is not vacuous
    tol = 1e-5 if shared else 1e-6
    assert r["grad_max_diff"] < tol * max(1.0, r["grad_max"])
    for key in ("loss", "kl", "clip_frac", "aux_loss"):
        ref, dp = r[key]
        assert dp == pytest.approx(ref, rel=tol, abs=1e-7), key


@pytest.mark.slow
def test_collectives_two_ranks(driver: dict[str, Any]) -> None:
    rank0, rank1 = driver["collectives"]
    # a: mean of 0 and 1; x/max: max of 10 and 11; only_rank0 / maybe: mean over the ranks
    # that have a number for it (rank 0 alone / rank 1 alone).
    expected = {"a": 0.5, "x/max": 11.0, "note": "text", "only_rank0": 5.0, "maybe": 4.0}
    assert rank0["mean"] == expected and rank1["mean"] == expected
    assert rank0["sum"] == {"n": 3.0}  # 1 + 2
    assert rank0["all_true_mixed"] is False and rank1["all_true_all"] is True
    assert rank0["any_true_mixed"] is True and rank1["any_true_none"] is False
    assert rank0["shard"] == [0, 1, 2] and rank1["shard"] == [3, 4, 5]
    assert rank0["seed"] == 7 and rank1["seed"] == 7 + 1_000_003
    assert rank1["broadcast"] == {"from": 0}
    assert rank0["max_int"] == rank1["max_int"] == 5  # max(2, 5)


@pytest.mark.slow
def test_group_of_one_matches_plain_run(
    one_process_sft: Path, sft_cfg: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """distributed.enabled on one process: a gloo group of one and a DDP wrapper, same result
    as the plain run (world size 1 runs the distributed code path)."""
    out = workdir / "sft_group_of_one"
    run_sft(load_config(sft_cfg, ["distributed.enabled=true", f"logging.output_dir={out}"]))
    assert "data parallel: rank 0/1 (ddp, gloo on cpu)" in capsys.readouterr().out
    assert_same_run(one_process_sft, out)
    import torch.distributed as tdist

    assert not tdist.is_initialized()  # the recipe destroyed the group it created


def test_deepspeed_missing_is_a_clear_user_error(
    sft_cfg: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed is a dev dependency, so its absence is simulated: `import deepspeed` fails
    the way it does when the package is not installed."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # None in sys.modules: ImportError
    overrides = [
        "distributed.enabled=true",
        "distributed.backend=deepspeed",
        f"logging.output_dir={workdir / 'ds'}",
    ]
    with pytest.raises(UserError, match=r"pip install 'moepost\[deepspeed\]'"):
        run_sft(load_config(sft_cfg, overrides))
