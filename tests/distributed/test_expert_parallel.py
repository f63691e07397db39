"""Expert parallelism (`distributed.expert_parallel_size=2`) with FSDP2 on CPU/gloo.

Two launches of `torchrun --nproc_per_node 2`: `ep_driver.py` (the experts' layout, the RL
update of GSPO and GRPO against one process, and an SFT run saving a sharded checkpoint every
step), then `moepost train --resume auto` of that run from its checkpoint-2. The one-process
SFT reference runs in this process. The config refusals run without a process group.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file
from test_ddp_gloo import assert_same_run, log_rows, torchrun

from moepost.config.load import load_config
from moepost.distributed.expert_parallel import _ep_plan, check_expert_parallel
from moepost.errors import UserError
from moepost.recipes.sft import run_sft

DRIVER = Path(__file__).parent / "ep_driver.py"
EP = ["distributed.backend=fsdp", "distributed.expert_parallel_size=2"]
SAVE = ["train.save_every=1", "logging.keep_last_checkpoints=5"]


@pytest.fixture(scope="module")
def one_process_sft(sft_cfg: Path, workdir: Path) -> Path:
    run_sft(load_config(sft_cfg))
    return workdir / "sft_one"


@pytest.fixture(scope="module")
def ep_launch(sft_cfg: Path, rl_cfg: Path, workdir: Path) -> dict[str, Any]:
    out = workdir / "ep"
    out.mkdir()
    sft_argv = ["train", str(sft_cfg), f"logging.output_dir={out / 'sft'}", *EP, *SAVE]
    spec = out / "spec.json"
    spec.write_text(json.dumps({"rl_cfg": str(rl_cfg), "sft_argv": sft_argv}))
    torchrun([str(DRIVER), str(out), str(spec)])
    return {"dir": out, **json.loads((out / "results.json").read_text())}


@pytest.mark.slow
def test_experts_are_split_over_the_ep_axis(ep_launch: dict[str, Any]) -> None:
    """Each rank holds 2 of the tiny model's 4 experts: gate_up_proj [4, 128, 64] and
    down_proj [4, 64, 64] are Shard(0) DTensors on the (efsdp, ep) mesh, local [2, ...]."""
    layout = ep_launch["layout"]
    assert layout["local_num_experts"] == [2]
    params = layout["params"]
    assert len(params) == 4  # 2 layers x (gate_up_proj, down_proj)
    for name, p in params.items():
        assert p["mesh"] == ["efsdp", "ep"], name
        assert p["global"][0] == 4 and p["local"] == [2, *p["global"][1:]], (name, p)
    assert params["model.layers.0.mlp.experts.gate_up_proj"]["global"] == [4, 128, 64]


@pytest.mark.slow
def test_sft_expert_parallel_matches_one_process(
    one_process_sft: Path, ep_launch: dict[str, Any]
) -> None:
    """2 EP ranks x 2 examples == 1 process x 4 examples: per-step loss, token accuracy, aux
    loss, grad norm (DTensor norms over two meshes), lr, load entropy; final weights 1e-5;
    the expert loads (expert_load.jsonl) come from global counts, the same as one process."""
    assert ep_launch["sft_exit"] == 0
    run = ep_launch["dir"] / "sft"
    assert_same_run(one_process_sft, run)
    assert log_rows(run)[0]["grad_norm"] > 0.1  # the comparison is not vacuous
    loads_one = (one_process_sft / "expert_load.jsonl").read_text().splitlines()
    loads_two = (run / "expert_load.jsonl").read_text().splitlines()
    fractions = [[json.loads(r)["load_fraction"] for r in rows] for rows in (loads_one, loads_two)]
    assert fractions[0] == fractions[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["gspo", "grpo"])
def test_rl_update_expert_parallel_matches_one_process(
    ep_launch: dict[str, Any], case: str
) -> None:
    """policy_update + optimizer step, 2 EP ranks x 2 groups == 1 process x 4 groups: loss,
    KL, clip fraction, global-scope aux loss, grad norm, updated weights (gathered) 1e-5."""
    r = ep_launch["update"][case]
    assert r["weights_moved"] > 5e-4
    assert r["weights_max_diff"] < 1e-5, r["weights_max_diff"]
    for key in ("loss", "kl", "clip_frac", "aux_loss", "grad_norm"):
        one, two = r[key]
        assert two == pytest.approx(one, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_resume_under_expert_parallel_continues_exactly(
    sft_cfg: Path, ep_launch: dict[str, Any], workdir: Path
) -> None:
    """The EP run's checkpoint-2 (DCP shards: experts on the (efsdp, ep) mesh, the rest on
    the FSDP mesh, Adam moments, per-rank RNG) resumed with `--resume auto` gives the
    uninterrupted step 3 and final weights (what came after step 2 is deleted first)."""
    whole = ep_launch["dir"] / "sft"
    again = workdir / "ep_resumed"
    shutil.copytree(whole, again)
    shutil.rmtree(again / "checkpoint-3")
    shutil.rmtree(again / "final")
    rows = (again / "train_log.jsonl").read_text().splitlines()
    (again / "train_log.jsonl").write_text("\n".join(rows[:2]) + "\n")
    args = ["-m", "moepost", "train", str(sft_cfg), f"logging.output_dir={again}", *EP, *SAVE]
    torchrun([*args, "--resume", "auto"])
    a, b = log_rows(whole), log_rows(again)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "grad_norm", "aux_loss", "lr"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-6), key
    w_a, w_b = (
        load_file(str(whole / "final/model.safetensors")),
        load_file(str(again / "final/model.safetensors")),
    )
    assert max(float((w_a[k] - w_b[k]).abs().max()) for k in w_a) < 1e-6


def _cfg(sft_cfg: Path, *extra: str) -> Any:
    return load_config(sft_cfg, list(extra))


@pytest.mark.parametrize(
    ("extra", "world", "active", "message"),
    [
        (["distributed.expert_parallel_size=2"], 1, False, "needs a process group"),
        (["distributed.expert_parallel_size=3", *EP[:1]], 4, True, "must divide the world size"),
        (["distributed.expert_parallel_size=2"], 2, True, "use distributed.backend=fsdp"),
        (
            [*EP, "distributed.fsdp_sharding_strategy=HYBRID_SHARD"],
            2,
            True,
            "HYBRID_SHARD is not supported",
        ),
        ([*EP, "model.lora.enabled=true"], 2, True, "LoRA adapters on expert-parallel"),
    ],
)
def test_refused_combinations(
    sft_cfg: Path, extra: list[str], world: int, active: bool, message: str
) -> None:
    with pytest.raises(UserError, match=message) as err:
        check_expert_parallel(_cfg(sft_cfg, *extra), world, active=active)
    assert "distributed.expert_parallel_size" in str(err.value)
    assert "\n" not in str(err.value)


def test_size_one_and_supported_layout_pass(sft_cfg: Path) -> None:
    check_expert_parallel(_cfg(sft_cfg), 1, active=False)
    check_expert_parallel(_cfg(sft_cfg, *EP), 4, active=True)


def test_rl_with_vllm_refused(rl_cfg: Path) -> None:
    cfg = load_config(rl_cfg, [*EP, "generation.backend=vllm", "moe.routing_replay=none"])
    with pytest.raises(UserError, match="generation.backend=vllm"):
        check_expert_parallel(cfg, 2, active=True)


def test_experts_not_divisible_refused(tiny_model: Path) -> None:
    """4 experts over 3 EP ranks: refused, naming the key and the model's expert count."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with pytest.raises(UserError, match=r"expert_parallel_size=3 must divide .* experts \(4\)"):
        _ep_plan(model, 3, 3)
    plan = _ep_plan(model, 2, 2)
    assert plan["model.layers.1.mlp.experts"] == "ep_dispatch_experts"
    assert plan["model.layers.1.mlp.experts.down_proj"] == "grouped_gemm"
