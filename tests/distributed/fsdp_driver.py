"""Worker for the FSDP2 RL / resume tests: `torchrun --nproc_per_node 2 fsdp_driver.py OUT SPEC`.

SPEC (JSON) names the `moepost train` runs of this launch, in order, each [name, argv,
crash_after_step or null]; a run with a crash step (`MOEPOST_CRASH_AFTER_STEP`, the test hook
that `os._exit`s after that step) must be the last one. With "update_check": RL_CFG the launch
also compares `policy_update` + optimizer step of 2 FSDP2 ranks x half the groups with one
process on all groups. Rank 0 writes OUT/results.json before any crash run starts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from moepost.cli import main as cli_main
from moepost.components.model.loading import load_policy
from moepost.components.moe.router_setup import router_setup
from moepost.config.load import load_config
from moepost.distributed import init_distributed, prepare_model
from moepost.recipes.common import Optimization
from moepost.recipes.rl_passes import logprob_pass, plan_step_micro_batches
from moepost.recipes.rl_update import policy_update

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
from dist_driver import rows, step_tensors  # noqa: E402
from fault_hooks import install_step_hooks  # noqa: E402

LORA = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8"]
CPU = torch.device("cpu")


def _one_case(rl_cfg: str, name: str, extra: list[str], rank: int, world: int) -> dict[str, Any]:
    algorithm, lora, shared = name.split("_")[0], "_lora" in name, "_shared" in name
    overrides = [
        f"rl.algorithm={algorithm}", "rl.kl_coef=0.05", "moe.aux_loss_scope=global",
        "moe.routing_replay=none", "train.micro_batch_size=2", *extra,
    ]  # fmt: skip
    cfg = load_config(rl_cfg, overrides)
    prompts, completions, adv = rows(seed=11, shared=shared)
    torch.manual_seed(0)  # LoRA's A matrices: the same initialisation on both sides
    one = load_policy(cfg.model, cfg.misc, device=CPU)
    opt_one = Optimization(one, cfg, 10)
    t = step_tensors(prompts, completions, adv, 0)
    if lora:  # the reference is the policy with its adapters off
        t = dataclasses.replace(t, ref_logprobs=logprob_pass(one, t, cfg, disable_adapter=True))
    before = {k: v.detach().clone() for k, v in one.state_dict().items()}
    m_one = policy_update(one, t, cfg, router_setup(one, cfg.moe), update_index=0).metrics
    m_one.update(opt_one.step())
    cfg.distributed.enabled, cfg.distributed.backend = True, "fsdp"
    ctx = init_distributed(cfg, CPU)
    torch.manual_seed(0)
    model = load_policy(cfg.model, cfg.misc, device=CPU)
    router = router_setup(model, cfg.moe)
    prepare_model(model, cfg, ctx)
    opt = Optimization(model, cfg, 10)
    per = len(prompts) // world
    mine = slice(rank * per, (rank + 1) * per)
    local = step_tensors(prompts[mine], completions[mine], adv[mine], rank * per)
    local = dataclasses.replace(local, shared_prefix=shared)
    local = dataclasses.replace(local, micro_batches=plan_step_micro_batches(local, cfg, ctx))
    ref_diff = 0.0
    if lora:
        ref = logprob_pass(model, local, cfg, disable_adapter=True)
        local = dataclasses.replace(local, ref_logprobs=ref)
        ref_diff = float((local.ref_logprobs - t.ref_logprobs[mine]).abs().max())
    m = policy_update(model, local, cfg, router, update_index=0, dist=ctx).metrics
    m.update(ctx.optimizer_step(opt))
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    one_sd = one.state_dict()
    assert sorted(full) == sorted(one_sd), "parameter names differ"
    moved = max(float((one_sd[k] - before[k]).abs().max()) for k in one_sd)
    return {
        "weights_max_diff": max(float((full[k] - one_sd[k]).abs().max()) for k in full),
        "weights_moved": moved,  # how far the step moved the weights (not vacuous)
        "ref_logprobs_max_diff": ref_diff,
        **{key: [m_one.get(key), m.get(key)] for key in ("loss", "kl", "clip_frac", "aux_loss")},
        "grad_norm": [m_one["grad_norm"], m["grad_norm"]],
    }


def update_check(rl_cfg: str, rank: int, world: int) -> dict[str, Any]:
    """GSPO and GRPO, full and LoRA (reference: adapters disabled), and shared prefixes."""
    cases = {"gspo": [], "grpo": [], "gspo_lora": LORA, "grpo_lora": LORA, "gspo_shared": []}
    return {name: _one_case(rl_cfg, name, extra, rank, world) for name, extra in cases.items()}


def main() -> None:
    out, spec = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text())
    tdist.init_process_group("gloo")  # the recipes join it instead of creating their own
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results: dict[str, Any] = {}
    if spec.get("update_check"):
        results["update"] = update_check(spec["update_check"], rank, world)
    for name, argv, crash in spec["runs"]:
        if crash is not None:  # the last run: results first, it never returns
            if rank == 0:
                (out / "results.json").write_text(json.dumps(results, indent=1))
            tdist.barrier()
            os.environ["MOEPOST_CRASH_AFTER_STEP"] = str(crash)
            install_step_hooks()  # the test hook, from outside moepost
        results[name] = cli_main(argv)
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
