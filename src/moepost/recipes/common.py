"""What both recipes share: run directory set-up, the optimizer step, save and resume."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from moepost.components.training import checkpoint as ckpt
from moepost.components.training.logging import RunLogger, truncate_log_after
from moepost.components.training.optim import MasterWeights, build_optimizer, build_scheduler
from moepost.components.training.report import write_report
from moepost.components.training.stability import GradientPipeline
from moepost.config.load import config_to_dict, write_resolved_config
from moepost.config.schema import Config
from moepost.distributed import deepspeed_checkpoint, describe, init_distributed
from moepost.distributed.sharded_checkpoint import load_sharded, save_sharded
from moepost.micro_batches import plan_micro_batches, split_to_count
from moepost.recipes import signals
from moepost.recipes.run_dir import prepare_run_dir

if TYPE_CHECKING:
    from moepost.distributed import DistContext


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Run:
    """Where a run writes and how it reports."""

    cfg: Config
    output_dir: Path
    device: torch.device
    logger: RunLogger
    is_main: bool = True
    notes: list[str] = field(default_factory=list)
    dist: Any = None  # the recipe's DistContext (moepost.distributed); None: one process
    resume_checked: bool = False  # open_run chose `resume_from` (None: start fresh)
    resume_from: Path | None = None

    def say(self, message: str) -> None:
        if self.is_main:
            print(message, flush=True)


def start_run(cfg: Config, device: torch.device, *, eval_only: bool = False) -> Run:
    """Create the output dir, write `resolved_config.yaml`, open the logger.

    An eval-only run may share a training run's folder: it writes `resolved_config.eval.yaml`
    and `eval_log.jsonl` and leaves the training run's files alone.
    """
    if cfg.misc.num_threads:
        torch.set_num_threads(cfg.misc.num_threads)
    # Our own console shows progress; per-file weight bars would drown it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out = Path(cfg.logging.output_dir)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        name = "resolved_config.eval.yaml" if eval_only else "resolved_config.yaml"
        write_resolved_config(cfg, out, name)
    logger = RunLogger(
        out,
        report_to=cfg.logging.report_to,
        run_name=cfg.logging.run_name or out.name,
        config=config_to_dict(cfg),
        enabled=rank == 0,
        filename="eval_log.jsonl" if eval_only else "train_log.jsonl",
    )
    return Run(cfg=cfg, output_dir=out, device=device, logger=logger, is_main=rank == 0)


def policy_device(cfg: Config) -> torch.device:
    """`misc.device`, or the one GPU of `model.policy_gpu_ids` (single-process runs)."""
    from moepost.components.model.loading import resolve_device
    from moepost.components.model.placement import gpu_ids_device
    from moepost.errors import UserError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    key = "model.policy_gpu_ids"
    device = gpu_ids_device(cfg.model.policy_gpu_ids, key=key, world_size=world)
    if device is None:
        return resolve_device(cfg.misc.device)
    if cfg.misc.device not in ("auto", "cuda", str(device)):
        raise UserError(
            f"{key} = {cfg.model.policy_gpu_ids} and misc.device = "
            f"{cfg.misc.device} disagree; set only one of them"
        )
    return device


def open_run(
    cfg: Config, *, resume: str | None, eval_only: bool, allow_config_change: bool = False
) -> Run:
    """Seed, check the run directory (earlier run, checkpoint to resume, changed config), pick
    the device, join the process group (if any), create the run directory."""
    seed_everything(cfg.train.seed)
    # Every rank checks before the rendezvous, so none sees files another rank wrote.
    resume_from = None
    if not eval_only:
        resume_from = prepare_run_dir(cfg, resume, allow_config_change=allow_config_change)
    dist = init_distributed(cfg, policy_device(cfg), resume=resume)
    run = start_run(cfg, dist.device, eval_only=eval_only)
    run.dist = dist
    run.resume_checked, run.resume_from = not eval_only, resume_from
    if dist.active:
        run.say(describe(dist))
    return run


@dataclass
class TrainState:
    """Everything beyond weights and optimizer needed to continue a run exactly."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0  # position inside the current epoch's order
    best_metric: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Optimization:
    """Optimizer, schedule and gradient pipeline for the trainable parameters of a model."""

    def __init__(self, model: torch.nn.Module, cfg: Config, total_steps: int) -> None:
        model_params = [p for p in model.parameters() if p.requires_grad]
        # With fp32 master weights the pipeline and the optimizer work on the masters.
        self.master = MasterWeights(model_params) if cfg.optim.master_weights == "fp32" else None
        self.params = self.master.masters if self.master is not None else model_params
        self.optimizer = build_optimizer(self.params, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps)
        self.pipeline = GradientPipeline(cfg.stability, cfg.optim.max_grad_norm)
        self.calls = 0  # optimizer steps attempted, skipped ones included

    def step(self) -> dict[str, float]:
        """Transform gradients, step (unless non-finite), advance the schedule, zero grads.

        On a skipped step neither the optimizer nor the schedule moves.
        """
        self.calls += 1
        if self.master is not None:
            self.master.grads_to_masters()
        ok, metrics = self.pipeline(self.params)
        lr = self.optimizer.param_groups[0]["lr"]
        if ok:
            self.optimizer.step()
            if self.master is not None:
                self.master.masters_to_params()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.zero_grad()
        metrics["lr"] = lr
        return metrics

    def state_dict(self) -> dict[str, Any]:
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "pipeline": self.pipeline.state_dict(),
            "calls": self.calls,
        }
        if self.master is not None:
            state["master_weights"] = self.master.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Call after the model weights are restored (masters missing from an older
        checkpoint are rebuilt from them)."""
        if "optimizer" in state:  # a sharded checkpoint restored it already
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.pipeline.load_state_dict(state["pipeline"])
        self.calls = int(state.get("calls", self.scheduler.last_epoch))
        if self.master is not None:
            if "master_weights" in state:
                self.master.load_state_dict(state["master_weights"])
            else:
                self.master.refresh_from_params()


def save(
    run: Run, model: torch.nn.Module, tokenizer: Any, opt: Optimization, state: TrainState
) -> Path | None:
    if run.dist is not None and run.dist.engine is not None:  # DeepSpeed: its sharded state too
        return deepspeed_checkpoint.save(run, model, tokenizer, opt, state)
    if _sharded(run):  # FSDP2: every rank writes its shards (distributed.sharded_checkpoint)
        return _save_sharded(run, model, tokenizer, opt, state)
    with _full_weights(run, model):
        if not run.is_main:
            return None
        trainer_state = {"train": dataclasses.asdict(state), "optim": opt.state_dict()}
        return ckpt.save_checkpoint(
            run.output_dir,
            state.step,
            model,
            tokenizer,
            trainer_state,
            keep_last=run.cfg.logging.keep_last_checkpoints,
            config=config_to_dict(run.cfg),
        )


def _sharded(run: Run) -> bool:
    return run.dist is not None and run.dist.active and run.dist.backend == "fsdp"


def _save_sharded(
    run: Run, model: torch.nn.Module, tokenizer: Any, opt: Optimization, state: TrainState
) -> Path:
    # The optimizer's state is in the shards; the rest is the same on every rank.
    optim = {k: v for k, v in opt.state_dict().items() if k != "optimizer"}
    trainer_state = {"train": dataclasses.asdict(state), "optim": optim}
    return save_sharded(
        run.output_dir, state.step, model, opt.optimizer, tokenizer, trainer_state, run.dist,
        keep_last=run.cfg.logging.keep_last_checkpoints, config=config_to_dict(run.cfg),
    )  # fmt: skip


def _full_weights(run: Run, model: torch.nn.Module) -> Any:
    """Sharded weights (FSDP2, ZeRO-3) are gathered by every rank before rank 0 saves."""
    return run.dist.full_weights(model) if run.dist is not None else contextlib.nullcontext()


def maybe_resume(
    run: Run, resume: str | None, model: torch.nn.Module, opt: Optimization
) -> TrainState:
    """Restore weights, optimizer, schedule, RNG and data position from a checkpoint.

    From here on a SIGTERM / SIGINT ends the run after the current step (`signals`).
    """
    signals.defer_signals()
    path = run.resume_from if run.resume_checked else ckpt.resolve_resume(run.output_dir, resume)
    if path is None:
        if resume == "auto":
            run.say("resume: no complete checkpoint found, starting from scratch")
        reset_logs(run, after_step=None)
        return TrainState()
    if run.dist is not None and run.dist.engine is not None:  # weights, optimizer, RNG per rank
        blob = deepspeed_checkpoint.load(run, path, model, opt)
    else:
        blob = ckpt.load_trainer_state(path)
        if "deepspeed" in blob:
            deepspeed_checkpoint.refuse_engine_state(path, blob)
        if blob.get("sharded"):  # FSDP2: this rank's model / optimizer shards and RNG
            load_sharded(path, model, opt.optimizer, run.dist)
            opt.load_state_dict(blob["optim"])
        else:
            ckpt.load_weights_into(model, path)
            opt.load_state_dict(blob["optim"])
            ckpt.set_rng_state(blob["rng"])
    state = TrainState(**blob["train"])
    reset_logs(run, after_step=state.step)
    run.say(f"resumed from {path} at step {state.step}")
    return state


RUN_LOGS = (
    "train_log.jsonl",
    "expert_load.jsonl",
    "train_rollouts.jsonl",
    "eval_outputs.jsonl",
    "eval_log.jsonl",
)
EVAL_LOGS = ("eval_outputs.jsonl", "eval_log.jsonl")


def reset_logs(run: Run, *, after_step: int | None, names: tuple[str, ...] = RUN_LOGS) -> None:
    """A fresh run starts its logs empty; a resumed one drops rows past its checkpoint (they
    are logged again), so a run dir never mixes two runs' lines."""
    if not run.is_main:
        return
    for name in names:
        path = run.output_dir / name
        if not path.is_file():
            continue
        if after_step is None:
            path.unlink()
            run.say(f"note: removed {path} left by an earlier run (start fresh or use --resume)")
        else:
            truncate_log_after(path, after_step)


def save_final(run: Run, model: torch.nn.Module, tokenizer: Any, name: str = "final") -> None:
    with _full_weights(run, model):
        if run.is_main:
            ckpt.save_model_dir(model, tokenizer, run.output_dir / name)


def finish_run(run: Run) -> None:
    """Close the logger and write `report.html` + `plots/` (`logging.write_report`)."""
    run.logger.close()
    if run.is_main and run.cfg.logging.write_report:
        run.say(f"report: {write_report(run.output_dir)}")


def stop_if_signalled(
    run: Run, model: torch.nn.Module, tokenizer: Any, opt: Optimization, state: TrainState
) -> None:
    """End of a step: after SIGTERM / SIGINT (on any rank) save unless this step already did
    (`train.save_on_signal`), close the logs and raise `signals.Stopped`."""
    signum = signals.requested(run.dist)
    if signum is None:
        return
    cfg = run.cfg
    saved = bool(cfg.train.save_every and state.step % cfg.train.save_every == 0)
    if cfg.train.save_on_signal and not saved:
        save(run, model, tokenizer, opt, state)
    latest = ckpt.list_checkpoints(run.output_dir) if run.is_main else []
    where = f"latest checkpoint {latest[-1]}" if latest else "no checkpoint yet"
    why = "" if cfg.train.save_on_signal else " (train.save_on_signal: false)"
    run.logger.close()
    if run.dist is not None:
        run.dist.close()
    raise signals.Stopped(
        signum,
        f"stopped by {signals.signal_name(signum)} after step {state.step}{why}; {where}; "
        "continue with --resume auto",
    )


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """Deterministic shuffle of `n` examples for `epoch` (independent of global RNG state)."""
    g = torch.Generator().manual_seed(seed * 1000003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def take_examples(
    state: TrainState, n_total: int, count: int, seed: int, *, shuffle: bool = True
) -> list[int]:
    """The next `count` example indices, moving `state.epoch` / `state.cursor` forward.

    shuffle: `data.shuffle`; False visits the examples in file order every epoch.
    """
    out: list[int] = []

    def order_of(epoch: int) -> list[int]:
        return epoch_order(n_total, seed, epoch) if shuffle else list(range(n_total))

    order = order_of(state.epoch)
    while len(out) < count:
        if state.cursor >= n_total:
            state.epoch += 1
            state.cursor = 0
            order = order_of(state.epoch)
        take = min(count - len(out), n_total - state.cursor)
        out.extend(order[state.cursor : state.cursor + take])
        state.cursor += take
    return out


def micro_batch_groups(
    lengths: Sequence[int],
    cfg: Config,
    *,
    longest_first: bool,
    dist: DistContext | None = None,
    packed: bool = False,
) -> list[list[int]]:
    """Row ids of each micro-batch of one step (this rank's rows; `lengths` in tokens).

    `moepost.micro_batches.plan_micro_batches` with `train.micro_batch_size` /
    `train.micro_batch_tokens`. `longest_first`: SFT (less padding, the peak memory shows at
    the first micro-batch); RL keeps its row order, which routing replay indexes. With `dist`
    and a token budget, every rank runs as many micro-batches as the rank that needs most.
    """
    budget = cfg.train.micro_batch_tokens
    groups = plan_micro_batches(
        lengths,
        size=cfg.train.micro_batch_size,
        token_budget=budget,
        packed=packed,
        longest_first=longest_first,
    )
    if budget <= 0 or dist is None:  # by rows, every rank has the same number of micro-batches
        return groups
    return split_to_count(groups, lengths, dist.max_int(len(groups)), packed=packed)
