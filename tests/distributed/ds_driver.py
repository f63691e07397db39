"""Worker script for the DeepSpeed tests: `torchrun --nproc_per_node 2 ds_driver.py OUT ...`.

One launch (start-up, imports and DeepSpeed's shm op dominate on CPU) runs in one gloo group:
  1. `moepost train SFT_CFG distributed.backend=deepspeed` through the CLI under ZeRO-2 and
     ZeRO-3, with and without CPU offload, full and LoRA (the test compares each with one
     process); every `deepspeed.initialize` is recorded (stage, offload flags, optimizer);
  2. the RL update alone under ZeRO-2 / ZeRO-3, GSPO / GRPO, full / LoRA: `policy_update` of
     2 ranks x half the groups through the engine against one process on all groups, then one
     optimizer step (gradients via `deepspeed.utils.safe_get_full_grad`, weights gathered);
  3. `moepost train RL_CFG` under ZeRO-2 and ZeRO-3 (whole RL runs: lock-step rollouts under
     ZeRO-3, reference log-probs, updates, saves), full and LoRA;
  4. `--resume auto` of the runs the test killed after step 3 (OUT/resume_*), if present.
Rank 0 writes what the test asserts to OUT/results.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from moepost.cli import main as cli_main
from moepost.components.model.loading import load_policy
from moepost.components.moe.router_setup import router_setup
from moepost.config.load import load_config
from moepost.distributed import DistContext, attach_optimizer, prepare_model
from moepost.recipes.common import Optimization
from moepost.recipes.rl_passes import plan_step_micro_batches
from moepost.recipes.rl_update import policy_update

sys.path.insert(0, str(Path(__file__).parent))
from dist_driver import rows, step_tensors  # noqa: E402

DS = ["distributed.backend=deepspeed"]
LORA = ["model.lora.enabled=true", "model.lora.target_experts=true"]
# name -> overrides of the SFT config (all DeepSpeed); the test knows which reference each uses
SFT_RUNS: dict[str, list[str]] = {
    "z2": ["distributed.zero_stage=2"],
    "z2_offload": ["distributed.zero_stage=2", "distributed.offload_optimizer=true"],
    "z3": ["distributed.zero_stage=3"],
    "z3_offload": [
        "distributed.zero_stage=3",
        "distributed.offload_optimizer=true",
        "distributed.offload_param=true",
    ],
    "z3_lora": ["distributed.zero_stage=3", *LORA],
    "z3_bf16": ["distributed.zero_stage=3", "model.dtype=bfloat16"],  # DeepSpeed's bf16 path
}
# Whole RL runs (rollouts in lock-step under ZeRO-3, reference log-probs, updates, saves)
RL_RUNS: dict[str, list[str]] = {
    "rl_z2": ["distributed.zero_stage=2"],  # GRPO, KL to a reference model, R3 replay
    "rl_z3": ["distributed.zero_stage=3"],
    "rl_z3_lora": ["distributed.zero_stage=3", "rl.algorithm=gspo", *LORA],  # KL: adapters off
}
# Runs the test kills after step 3 -> (config, overrides, uninterrupted twin: same overrides).
# The driver resumes them.
KILLED: dict[str, tuple[str, list[str], str]] = {
    "resume_sft": ("sft", SFT_RUNS["z3"], "z3"),
    "resume_rl": ("rl", RL_RUNS["rl_z3_lora"], "rl_z3_lora"),
}
# name -> (zero stage, algorithm, LoRA)
UPDATE_CASES: dict[str, tuple[int, str, bool]] = {
    "z2_gspo_full": (2, "gspo", False),
    "z2_grpo_lora": (2, "grpo", True),
    "z3_gspo_full": (3, "gspo", False),
    "z3_grpo_full": (3, "grpo", False),
    "z3_gspo_lora": (3, "gspo", True),
    "z3_grpo_lora": (3, "grpo", True),
}


def record_engines(log: list[dict[str, Any]]) -> None:
    """Wrap `deepspeed.initialize` so each engine's actual set-up is logged (what ran, not
    what the config asked for)."""
    import deepspeed

    real = deepspeed.initialize

    def initialize(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        engine = out[0]
        log.append(
            {
                "stage": engine.zero_optimization_stage(),
                "offload_optimizer": bool(engine.zero_offload_optimizer()),
                "offload_param": bool(engine.zero_offload_param()),
                "bf16": bool(engine.bfloat16_enabled()),
                "zero_optimizer": type(engine.optimizer).__name__,
                "client_optimizer": type(engine.client_optimizer).__name__,
                "client_scheduler": type(engine.client_lr_scheduler).__name__,
            }
        )
        return out

    deepspeed.initialize = initialize


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Whole gradients of the trainable parameters out of the ZeRO optimizer (a collective
    under ZeRO-3: every rank asks for every parameter, in the same order)."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            out[name] = g.detach().float().clone()
    return out


def update_case(rl_cfg: str, rank: int, world: int, stage: int, algorithm: str, lora: bool) -> dict:
    """One RL update, 2 ranks (DeepSpeed engine) vs one process on every row."""
    overrides = [
        f"rl.algorithm={algorithm}",
        "rl.kl_coef=0.05",
        "moe.aux_loss_scope=global",
        "moe.routing_replay=none",
        "train.micro_batch_size=2",
        "optim.max_grad_norm=0.5",  # the clip binds: DeepSpeed's clipping is compared too
        *(LORA if lora else []),
    ]
    cfg = load_config(rl_cfg, overrides)
    cpu = torch.device("cpu")
    prompts, completions, adv = rows(seed=11)
    torch.manual_seed(0)
    reference = load_policy(cfg.model, cfg.misc, device=cpu)
    m_ref = policy_update(
        reference, step_tensors(prompts, completions, adv, 0), cfg, router_setup(reference, cfg.moe),
        update_index=0,
    ).metrics  # fmt: skip
    g_ref = {n: p.grad.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    w_before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    m_ref.update(Optimization(reference, cfg, 1).step())
    w_ref = {n: p.detach().clone() for n, p in reference.named_parameters()}

    cfg = load_config(rl_cfg, [*overrides, *DS, f"distributed.zero_stage={stage}"])
    # The group exists already; a context of its own skips the RL-loop checks (generation is
    # not part of this check).
    ctx = DistContext(rank, world, rank, cpu, "deepspeed", active=True)
    torch.manual_seed(0)
    model = load_policy(cfg.model, cfg.misc, device=cpu)
    router = router_setup(model, cfg.moe)
    prepare_model(model, cfg, ctx)
    opt = Optimization(model, cfg, 1)
    engine = attach_optimizer(opt, cfg, ctx)
    per = len(prompts) // world
    mine = slice(rank * per, (rank + 1) * per)
    local = step_tensors(prompts[mine], completions[mine], adv[mine], rank * per)
    local = dataclasses.replace(local, micro_batches=plan_step_micro_batches(local, cfg, ctx))
    m_dp = policy_update(engine, local, cfg, router, update_index=0, dist=ctx).metrics
    grads = full_grads(model)
    m_dp.update(ctx.optimizer_step(opt))
    with ctx.full_weights(model):
        w_dp = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert sorted(grads) == sorted(g_ref), "trainable parameters differ"
    return {
        "grad_max_diff": max(float((grads[n] - g_ref[n]).abs().max()) for n in g_ref),
        "grad_max": max(float(g.abs().max()) for g in g_ref.values()),
        "weight_max_diff": max(float((w_dp[n] - w_ref[n]).abs().max()) for n in w_ref),
        "weight_moved": max(float((w_ref[n] - w_before[n]).abs().max()) for n in w_ref),
        **{k: [m_ref.get(k), m_dp.get(k)] for k in ("loss", "kl", "clip_frac", "aux_loss")},
        "grad_norm": [m_ref.get("grad_norm"), m_dp.get("grad_norm")],
        "lr": [m_ref.get("lr"), m_dp.get("lr")],
    }


def main() -> None:
    out, sft_cfg, rl_cfg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    tdist.init_process_group("gloo")  # the recipes join it instead of creating their own
    rank, world = tdist.get_rank(), tdist.get_world_size()
    engines: list[dict[str, Any]] = []
    record_engines(engines)
    results: dict[str, Any] = {"sft": {}, "update": {}, "rl": {}, "resume": {}}
    for name, extra in SFT_RUNS.items():
        first = len(engines)
        code = cli_main(["train", sft_cfg, *DS, *extra, f"logging.output_dir={out / name}"])
        results["sft"][name] = {"exit": code, "engines": engines[first:]}
    for name, (stage, algorithm, lora) in UPDATE_CASES.items():
        results["update"][name] = update_case(rl_cfg, rank, world, stage, algorithm, lora)
    for name, extra in RL_RUNS.items():
        first = len(engines)
        code = cli_main(["train", rl_cfg, *DS, *extra, f"logging.output_dir={out / name}"])
        results["rl"][name] = {"exit": code, "engines": engines[first:]}
    configs = {"sft": sft_cfg, "rl": rl_cfg}
    for name, (kind, overrides, _) in KILLED.items():
        if not (out / name).is_dir():
            continue
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            code = cli_main(
                ["train", configs[kind], *DS, *overrides, f"logging.output_dir={out / name}",
                 "--resume", "auto"]
            )  # fmt: skip
        results["resume"][name] = {"exit": code, "said": said.getvalue()}
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
