"""Worker script for the two-process tests: `torchrun --nproc_per_node 2 dist_driver.py ...`.

One launch (process start-up and imports dominate on CPU) runs, in one gloo process group:
  1. `moepost train SFT_CFG distributed.backend=fsdp` through the CLI (FSDP2 on CPU);
  2. `moepost train RL_CFG` (DDP, each rank generating for its own prompts);
  3. the RL update alone: `policy_update` of 2 ranks x half the groups (DDP) against one
     process on all groups, same weights and rows, for three loss aggregations;
  4. the DistContext collectives on rank-dependent values.
Rank 0 writes what the test asserts to OUT/results.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from moepost.cli import main as cli_main
from moepost.components.model.loading import load_policy
from moepost.components.moe.router_setup import router_setup
from moepost.components.rollout.engine import build_training_tensors
from moepost.config.load import load_config
from moepost.distributed import init_distributed, prepare_model
from moepost.recipes import rl_passes
from moepost.recipes.rl_passes import plan_step_micro_batches
from moepost.recipes.rl_update import policy_update
from moepost.recipes.step_tensors import StepTensors

GROUP = 2
NUM_PROMPTS = 4  # 8 rows: 4 per rank, 2 micro-batches of 2 per rank


def rows(
    seed: int, *, shared: bool = False
) -> tuple[list[list[int]], list[list[int]], torch.Tensor]:
    """Deterministic prompts / completions of uneven lengths (padding on both sides); with
    `shared`, the GROUP rows of a prompt repeat it (else only its length)."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for i in range(NUM_PROMPTS * GROUP):
        p_len = 3 + (i // GROUP) % 3
        c_len = 2 + (i * 5) % 4
        if i % GROUP == 0 or not shared:
            prompt = torch.randint(5, 90, (p_len,), generator=g).tolist()
        prompts.append(list(prompt))
        completions.append(torch.randint(5, 90, (c_len,), generator=g).tolist())
    advantages = torch.randn(len(prompts), generator=g)
    return prompts, completions, advantages


def step_tensors(
    prompts: list, completions: list, advantages: torch.Tensor, first_row: int
) -> StepTensors:
    """Training tensors of rows first_row.. (old / reference log-probs drawn per global row,
    so a rank's rows get the values the one-process batch gives them)."""
    lay = build_training_tensors(prompts, completions, pad_token_id=0)
    mask = lay["completion_mask"]
    old, ref = torch.empty_like(mask), torch.empty_like(mask)
    for r in range(mask.shape[0]):
        g = torch.Generator().manual_seed(1000 + first_row + r)
        # Away from the current log-probs, so ratios clip and the KL term is non-zero.
        old[r] = (-2.0 + 0.3 * torch.randn(16, generator=g))[: mask.shape[1]]
        ref[r] = (-2.0 + 0.3 * torch.randn(16, generator=g))[: mask.shape[1]]
    return StepTensors(
        input_ids=lay["input_ids"],
        attention_mask=lay["attention_mask"],
        position_ids=lay["position_ids"],
        completion_ids=lay["completion_ids"],
        completion_mask=mask,
        advantages=advantages,
        rollout_logprobs=torch.zeros_like(mask),
        old_logprobs=old,
        ref_logprobs=ref,
    )


REAL_SHARED = rl_passes.shared_prefix_logits


def _counted(calls: list[int], real: Any, *args: Any) -> torch.Tensor:
    """`shared_prefix_logits`, counting its calls."""
    calls.append(1)
    return real(*args)


def rl_update_check(rl_cfg_path: str, rank: int, world: int) -> dict[str, Any]:
    """Max |grad difference| and the losses, 2 ranks vs 1 process, per aggregation."""
    out: dict[str, Any] = {}
    # gspo_tokens: a token budget of 18 gives rank 0 two micro-batches and rank 1 three, so
    # rank 0 must split one of its own to run as many forwards as rank 1. gspo_shared: the
    # ranks run shared-prefix forwards (two model calls per micro-batch under DDP) against an
    # unshared single process; gspo_shared_tokens adds a budget the shared cost is planned by.
    cases = {
        "gspo": [], "grpo": [], "dr_grpo": [], "gspo_tokens": ["train.micro_batch_tokens=18"],
        "gspo_shared": [], "gspo_shared_tokens": ["train.micro_batch_tokens=14"],
    }  # fmt: skip
    for name, extra in cases.items():
        algorithm = name.removesuffix("_tokens").removesuffix("_shared")
        shared = "_shared" in name
        cfg = load_config(
            rl_cfg_path,
            [
                f"rl.algorithm={algorithm}",
                "rl.kl_coef=0.05",
                "moe.aux_loss_scope=global",
                "moe.routing_replay=none",
                "train.micro_batch_size=2",
                *extra,
            ],
        )
        prompts, completions, adv = rows(seed=11, shared=shared)
        torch.manual_seed(0)
        reference = load_policy(cfg.model, cfg.misc, device=torch.device("cpu"))
        m_ref = policy_update(
            reference, step_tensors(prompts, completions, adv, 0), cfg, router_setup(reference, cfg.moe),
            update_index=0,
        ).metrics  # fmt: skip
        cfg.distributed.enabled = True
        ctx = init_distributed(cfg, torch.device("cpu"))
        model = load_policy(cfg.model, cfg.misc, device=torch.device("cpu"))
        router = router_setup(model, cfg.moe)
        train_model = prepare_model(model, cfg, ctx)
        per = len(prompts) // world
        mine = slice(rank * per, (rank + 1) * per)  # whole groups: GROUP divides per
        local = step_tensors(prompts[mine], completions[mine], adv[mine], rank * per)
        local = dataclasses.replace(local, shared_prefix=shared)
        alone = len(plan_step_micro_batches(local, cfg))
        local = dataclasses.replace(local, micro_batches=plan_step_micro_batches(local, cfg, ctx))
        shared_calls: list[int] = []
        rl_passes.shared_prefix_logits = partial(_counted, shared_calls, REAL_SHARED)
        try:
            m_dp = policy_update(train_model, local, cfg, router, update_index=0, dist=ctx).metrics
        finally:
            rl_passes.shared_prefix_logits = REAL_SHARED
        grads = dict(reference.named_parameters())
        diff = max(
            float((p.grad - grads[name].grad).abs().max())
            for name, p in model.named_parameters()
            if p.grad is not None
        )
        counts = [None] * world
        tdist.all_gather_object(counts, (alone, len(local.micro_batches)))
        out[name] = {
            "micro_batches": counts,  # per rank: (on its own, run)
            "shared_calls": len(shared_calls),  # rank 0's shared-prefix forwards
            "grad_max_diff": diff,
            "grad_max": max(float(p.grad.abs().max()) for p in reference.parameters()),
            "loss": [m_ref["loss"], m_dp["loss"]],
            "kl": [m_ref.get("kl"), m_dp.get("kl")],
            "clip_frac": [m_ref.get("clip_frac"), m_dp.get("clip_frac")],
            "aux_loss": [m_ref.get("aux_loss"), m_dp.get("aux_loss")],
        }
    return out


def collectives_check(rank: int) -> dict[str, Any]:
    cfg = load_config_for_ctx()
    ctx = init_distributed(cfg, torch.device("cpu"))
    metrics: dict[str, Any] = {"a": float(rank), "x/max": float(10 + rank), "note": "text"}
    metrics["maybe"] = None if rank == 0 else 4.0  # a value one rank could not compute
    if rank == 0:
        metrics["only_rank0"] = 5.0
    return {
        "mean": ctx.mean_metrics(metrics),
        "sum": ctx.sum_metrics({"n": rank + 1.0}),
        "all_true_mixed": ctx.all_true(rank == 0),
        "all_true_all": ctx.all_true(True),
        "any_true_mixed": ctx.any_true(rank == 1),
        "any_true_none": ctx.any_true(False),
        "shard": ctx.shard(list(range(6))),
        "seed": ctx.sampling_seed(7),
        "broadcast": ctx.broadcast_object({"from": rank}),
        "world": ctx.world_size,
        "max_int": ctx.max_int(3 * rank + 2),
    }


def load_config_for_ctx() -> Any:
    from moepost.config.schema import Config

    cfg = Config()
    cfg.distributed.enabled = True
    return cfg


def main() -> None:
    out, sft_cfg, rl_cfg = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    tdist.init_process_group("gloo")  # the recipes join it instead of creating their own
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results: dict[str, Any] = {}
    results["fsdp_exit"] = cli_main(
        ["train", sft_cfg, "distributed.backend=fsdp", f"logging.output_dir={out / 'fsdp'}"]
    )
    results["rl_exit"] = cli_main(["train", rl_cfg, f"logging.output_dir={out / 'rl'}"])
    results["rl_update"] = rl_update_check(rl_cfg, rank, world)
    results["collectives"] = [None] * world
    tdist.all_gather_object(results["collectives"], collectives_check(rank))
    if rank == 0:
        (out / "results.json").write_text(json.dumps(results, indent=1))
    tdist.barrier()
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
