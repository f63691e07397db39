"""The few collectives the training loops need, and gathering whole weights to save them.

A `DistContext` is what a recipe holds: its rank, world size and device, the reductions the
loop needs (global token counts, metric means over ranks), and, once `wrap.prepare_model` has
run, the wrapped module and how to backward / accumulate / step through it. With one process
and `distributed.enabled: false` it is the same object with world size 1: every reduction is
the identity and no process group exists, so one code path serves both.

Gradient scaling: DDP, FSDP2 and DeepSpeed all *average* gradients over ranks, while our losses
are sums over the rank's tokens divided by the step's global count. `backward` therefore
multiplies the loss by the world size, so the averaged gradient is the global sum, equal to the
one-process gradient of the same global batch (exactly, for a power-of-two world size).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from moepost.errors import UserError

# Seeds of different ranks are this far apart, so per-rank sampling streams never coincide.
RANK_SEED_STRIDE = 1_000_003


@dataclass
class DistContext:
    """This process's place in the job, and the collectives the recipes use."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = "ddp"  # distributed.backend: how the model is wrapped
    active: bool = False  # a process group is live (distributed.enabled or WORLD_SIZE > 1)
    owns_group: bool = False  # we created the process group, so we destroy it
    wrapped: torch.nn.Module | None = None  # set by wrap.prepare_model
    engine: Any = None  # a DeepSpeed engine, when backend=deepspeed
    expert_parallel: int = 1  # distributed.expert_parallel_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- data ------------------------------------------------------------------------------

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous slice of a list the ranks all built identically.

        Rank r takes items [r * n / W, (r + 1) * n / W); the config checks make n divisible
        by W, so together the ranks see every item once, in the one-process order.
        """
        n = len(items)
        if n % self.world_size:
            raise UserError(
                f"cannot split {n} items evenly over {self.world_size} ranks "
                "(check train.batch_size / train.prompts_per_step against the world size)"
            )
        per = n // self.world_size
        return list(items[self.rank * per : (self.rank + 1) * per])

    def sampling_seed(self, seed: int) -> int:
        """Deterministic per-rank generation seed: different prompts must not share a stream."""
        return seed + self.rank * RANK_SEED_STRIDE

    # ---- collectives -----------------------------------------------------------------------

    def _comm_device(self) -> torch.device:
        # NCCL only moves CUDA tensors; gloo only CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of `tensor` (any shape) over ranks, returned on the tensor's own device."""
        if not self.active or self.world_size == 1:
            return tensor
        buf = tensor.detach().to(self._comm_device(), copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        return buf.to(tensor.device)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Several scalars summed over ranks in one collective (float64: counts stay exact)."""
        if not self.active or self.world_size == 1:
            return [float(v) for v in values]
        summed = self.all_reduce_sum(torch.tensor([float(v) for v in values], dtype=torch.float64))
        return summed.tolist()

    def max_int(self, value: int) -> int:
        """The largest of one integer over ranks."""
        if not self.active or self.world_size == 1:
            return int(value)
        buf = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.MAX)
        return int(buf.item())

    def _union_keys(self, metrics: dict[str, Any]) -> list[str]:
        """Sorted union of every rank's numeric keys (a rank may lack a metric, e.g. a drift
        value that was non-finite there), so every rank reduces the same vector."""
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)))
        if not self.active or self.world_size == 1:
            return keys
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, keys)
        return sorted({k for ks in gathered for k in (ks or [])})

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-key sum over ranks (a key missing on a rank counts as 0 there)."""
        if not self.active or self.world_size == 1:
            return dict(metrics)
        keys = self._union_keys(metrics)
        sums = self.sum_floats([float(metrics.get(k) or 0.0) for k in keys])
        return {**metrics, **dict(zip(keys, sums))}

    def mean_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Logged values as means over the ranks that have them; `*/max` keys take the max and
        `*/min` keys the min. Non-numeric values pass through. Identity on one process."""
        if not self.active or self.world_size == 1:
            return dict(metrics)
        keys = self._union_keys(metrics)
        present = [isinstance(metrics.get(k), (int, float)) for k in keys]
        vals = [float(metrics[k]) if p else 0.0 for k, p in zip(keys, present)]
        sums = self.sum_floats(vals + [float(p) for p in present])
        out = dict(metrics)
        for i, k in enumerate(keys):
            out[k] = sums[i] / max(1.0, sums[len(keys) + i])
        extremes = [(k, p) for k, p in zip(keys, present) if k.endswith(("/max", "/min"))]
        for k, p in extremes:  # a mean of maxima is no maximum
            sign = 1.0 if k.endswith("/max") else -1.0
            local = sign * float(metrics[k]) if p else -float("inf")
            buf = torch.tensor([local], dtype=torch.float64, device=self._comm_device())
            dist.all_reduce(buf, op=dist.ReduceOp.MAX)
            out[k] = sign * float(buf.item())
        return out

    def all_true(self, flag: bool) -> bool:
        """True when `flag` holds on every rank (a decision all ranks must take together)."""
        if not self.active or self.world_size == 1:
            return bool(flag)
        return self.sum_floats([1.0 if flag else 0.0])[0] == self.world_size

    def any_true(self, flag: bool) -> bool:
        """True when `flag` holds on at least one rank (lock-step generation: "a rank still
        decodes"); one small all-reduce."""
        if not self.active or self.world_size == 1:
            return bool(flag)
        return self.max_int(1 if flag else 0) == 1

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank `src`'s `obj` on every rank (pickled; for small things such as a path)."""
        if not self.active or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active and self.world_size > 1:
            dist.barrier()

    # ---- training through the wrapped model ------------------------------------------------

    @property
    def grad_scale(self) -> float:
        """Loss multiplier that turns the backends' gradient mean over ranks into a sum."""
        return float(self.world_size) if self.active else 1.0

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of a loss normalised by *global* counts (see the module docstring)."""
        scaled = loss * self.grad_scale if self.grad_scale != 1.0 else loss
        if self.engine is not None:
            # Our losses are already normalised over the step: no division by accumulation.
            self.engine.backward(scaled, scale_wrt_gas=False)
        else:
            scaled.backward()

    def set_grad_sync(self, *, last: bool) -> None:
        """Call before each micro-batch's forward: DDP all-reduces gradients only in the
        backward of the step's last micro-batch (what `no_sync()` does, without re-indenting
        the loop); DeepSpeed is told where the step boundary is. FSDP2 reduce-scatters every
        micro-batch, which keeps the accumulated gradients sharded (less memory)."""
        if self.engine is not None:
            self.engine.set_gradient_accumulation_boundary(last)
        elif isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel):
            self.wrapped.require_backward_grad_sync = last

    def optimizer_step(self, opt: Any) -> dict[str, float]:
        """`opt.step()` (gradient pipeline, non-finite skip, optimizer, schedule); with
        DeepSpeed the engine steps (its clipping, its optimizer wrapper) and reports the norm."""
        if self.engine is None:
            return opt.step()
        lr = opt.optimizer.param_groups[0]["lr"]
        self.engine.step()
        opt.calls += 1
        metrics = {"lr": lr}
        norm = self.engine.get_global_grad_norm()  # None where the engine does not compute it
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics

    @contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Every rank enters, so rank 0 can save whole weights inside: FSDP2 gathers the full
        state dict to rank 0, DeepSpeed ZeRO-3 gathers the parameters; a no-op otherwise."""
        with gathered_parameters(model, self):
            yield

    def close(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False
        self.active = False


DEEPSPEED_HINT = "pip install 'moepost[deepspeed]'"


def require_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as err:
        raise UserError(
            f"distributed.backend=deepspeed needs the deepspeed package, which is not "
            f"installed: {DEEPSPEED_HINT} (or use distributed.backend=ddp or fsdp)"
        ) from err
    return deepspeed


@contextmanager
def gathered_parameters(model: torch.nn.Module, ctx: DistContext) -> Iterator[None]:
    """Whole parameters on every rank inside the block (all ranks must enter it)."""
    if not ctx.active:
        yield
        return
    if ctx.backend == "fsdp":
        with _fsdp2_full_state_for_save(model, ctx):
            yield
        return
    if ctx.engine is not None and ctx.engine.zero_optimization_stage() == 3:
        deepspeed = require_deepspeed()
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
        return
    yield


@contextmanager
def _fsdp2_full_state_for_save(model: torch.nn.Module, ctx: DistContext) -> Iterator[None]:
    """FSDP2: every rank joins the all-gather of the full state dict (CPU, rank 0 only); inside
    the block rank 0's `save_pretrained` writes that dict instead of the sharded DTensors.

    FSDP2's state-dict hooks always return shards, even after `unshard()`, and
    `components.checkpoint` calls a plain `save_pretrained(dir)`, so the full dict is bound to
    the instance for the duration of the block (transformers and PEFT both take `state_dict=`).
    """
    import functools

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from moepost.components.training.checkpoint import unwrap

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    target: Any = unwrap(model)  # a transformers / PEFT model (`save_pretrained`)
    if ctx.is_main:
        bound = functools.partial(type(target).save_pretrained, target, state_dict=full)
        target.__dict__["save_pretrained"] = bound
    try:
        yield
    finally:
        target.__dict__.pop("save_pretrained", None)
