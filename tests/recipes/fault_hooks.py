"""Fault hooks for tests, installed from the outside: nothing here is part of moepost.

Each `install_*` wraps a moepost function (or a library function moepost calls) so that a
test can put a fault at an exact point: NaN / spiked gradients before the gradient pipeline,
a crash after a step, SIGKILL at a chosen point of a checkpoint write. In-process tests pass
pytest's `monkeypatch` (undone after the test); `fault_driver.py` installs them for a
subprocess from environment variables.

Environment variables (steps are 1-based optimizer steps; `k`, `k1,k2` or `k+`):
- MOEPOST_INJECT_NAN_GRAD_AT_STEP: a NaN in one element of the first gradient.
- MOEPOST_INJECT_GRAD_SPIKE_AT_STEP: every gradient x MOEPOST_GRAD_SPIKE_SCALE (1000).
- MOEPOST_CRASH_AFTER_STEP=k: `os._exit(17)` after step k's work (its checkpoint included).
- MOEPOST_STEP_DELAY_S=s: sleep s seconds at the end of every step (a window to signal in).
- MOEPOST_LOAD_DELAY_S=s: sleep s seconds before the policy model is loaded (a window to
  signal in before the training loop starts).
- MOEPOST_KILL_DURING_SAVE=point@k: SIGKILL at `point` of the write of checkpoint-k, one of
  KILL_POINTS.
- MOEPOST_SAVE_DELAY_S=s: sleep s seconds at each of those points of every checkpoint write
  (a wide window for a test that sends SIGKILL from outside at a random time).
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch

KILL_POINTS = (
    "weights-partial",  # model.safetensors half written
    "state",  # weights and tokenizer written, trainer_state.pt not begun
    "state-partial",  # trainer_state.pt half written
    "manifest-partial",  # every file written, manifest.json half written
    "rename",  # the temporary folder complete, not yet renamed
    "prune",  # new checkpoint in place, an old one half deleted
)


class _Setter:
    """monkeypatch.setattr or plain setattr (a subprocess has nothing to undo)."""

    def __init__(self, monkeypatch: Any = None) -> None:
        self.monkeypatch = monkeypatch

    def __call__(self, owner: Any, name: str, value: Any) -> None:
        if self.monkeypatch is not None:
            self.monkeypatch.setattr(owner, name, value)
        else:
            setattr(owner, name, value)


def _steps_from_env(name: str) -> tuple[set[int], int | None]:
    raw = os.environ.get(name, "").strip()
    steps: set[int] = set()
    start: int | None = None
    for part in filter(None, (x.strip() for x in raw.split(","))):
        if part.endswith("+"):
            start = int(part[:-1])
        else:
            steps.add(int(part))
    return steps, start


def _hit(name: str, step: int) -> bool:
    steps, start = _steps_from_env(name)
    return step in steps or (start is not None and step >= start)


def install_gradient_faults(monkeypatch: Any = None) -> None:
    """The MOEPOST_INJECT_* faults, applied to the gradients the pipeline receives."""
    from moepost.components.training.stability import GradientPipeline
    from moepost.recipes.common import Optimization

    set_ = _Setter(monkeypatch)
    step_orig, call_orig = Optimization.step, GradientPipeline.__call__

    def step(self: Any) -> dict[str, float]:
        self.pipeline._fault_step = self.calls + 1  # the step this call makes (1-based)
        return step_orig(self)

    @torch.no_grad()
    def call(self: Any, params: list[torch.nn.Parameter]) -> Any:
        k = getattr(self, "_fault_step", 0)
        grads = [p.grad for p in params if p.grad is not None]
        if grads and _hit("MOEPOST_INJECT_NAN_GRAD_AT_STEP", k):
            grads[0][(0,) * grads[0].dim()] = float("nan")
        if grads and _hit("MOEPOST_INJECT_GRAD_SPIKE_AT_STEP", k):
            scale = float(os.environ.get("MOEPOST_GRAD_SPIKE_SCALE", "1000"))
            for g in grads:
                g.mul_(scale)
        return call_orig(self, params)

    set_(Optimization, "step", step)
    set_(GradientPipeline, "__call__", call)


def install_step_hooks(monkeypatch: Any = None) -> None:
    """At the end of each step, before the SIGTERM / SIGINT check: sleep MOEPOST_STEP_DELAY_S
    (a window for a test to signal in), and after it MOEPOST_CRASH_AFTER_STEP=k dies like a
    preempted job (no cleanup) after step k's work, its checkpoint included."""
    from moepost.recipes import rl, sft

    set_ = _Setter(monkeypatch)
    delay = float(os.environ.get("MOEPOST_STEP_DELAY_S", "0"))
    for module in (sft, rl):
        original = module.stop_if_signalled

        def after_step(run: Any, model: Any, tok: Any, opt: Any, state: Any, _o=original) -> None:
            time.sleep(delay)
            _o(run, model, tok, opt, state)
            if str(state.step) == os.environ.get("MOEPOST_CRASH_AFTER_STEP"):
                os._exit(17)

        set_(module, "stop_if_signalled", after_step)


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _truncate_and_kill(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)
        f.flush()
        os.fsync(f.fileno())
    _kill()


def install_save_faults(monkeypatch: Any = None) -> None:
    """MOEPOST_KILL_DURING_SAVE=point@k and MOEPOST_SAVE_DELAY_S (see the module docstring)."""
    import transformers.modeling_utils as modeling_utils

    from moepost.components.training import checkpoint, checkpoint_files

    set_ = _Setter(monkeypatch)
    point, _, at = os.environ.get("MOEPOST_KILL_DURING_SAVE", "").partition("@")
    delay = float(os.environ.get("MOEPOST_SAVE_DELAY_S", "0"))
    current: dict[str, int | None] = {"step": None}

    def hit(name: str) -> bool:
        if delay and current["step"] is not None:
            time.sleep(delay)
        return point == name and at and current["step"] == int(at)

    save_ckpt = checkpoint.save_checkpoint

    def save_checkpoint(output_dir: Any, step: int, *args: Any, **kwargs: Any) -> Path:
        current["step"] = step
        try:
            return save_ckpt(output_dir, step, *args, **kwargs)
        finally:
            current["step"] = None

    safe_save = modeling_utils.safe_save_file

    def safe_save_file(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> Any:
        out = safe_save(tensors, filename, *args, **kwargs)
        if hit("weights-partial"):
            _truncate_and_kill(Path(filename))
        return out

    torch_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, (str, Path)) and Path(f).name == checkpoint.STATE_FILE:
            if hit("state"):
                _kill()
            if point == "state-partial" and at and current["step"] == int(at):
                buf = io.BytesIO()
                torch_save(obj, buf, *args, **kwargs)
                Path(f).write_bytes(buf.getvalue())
                _truncate_and_kill(Path(f))
        torch_save(obj, f, *args, **kwargs)

    write_synced = checkpoint_files._write_synced

    def _write(path: Path, text: str) -> None:
        write_synced(path, text)
        if path.name == checkpoint_files.MANIFEST and hit("manifest-partial"):
            _truncate_and_kill(path)

    replace = checkpoint_files._replace_dir

    def _replace(tmp: Path, final: Path) -> None:
        if hit("rename"):
            _kill()
        replace(tmp, final)

    def remove_dir(path: Path) -> None:
        if hit("prune"):
            doomed = path.with_name("." + path.name + ".deleting")
            path.rename(doomed)
            (doomed / checkpoint.STATE_FILE).unlink()
            _kill()
        checkpoint_files.remove_dir(path)

    set_(checkpoint, "save_checkpoint", save_checkpoint)
    set_(modeling_utils, "safe_save_file", safe_save_file)
    set_(torch, "save", save)
    set_(checkpoint_files, "_write_synced", _write)
    set_(checkpoint_files, "_replace_dir", _replace)
    set_(checkpoint, "remove_dir", remove_dir)


def install_load_delay(monkeypatch: Any = None) -> None:
    """MOEPOST_LOAD_DELAY_S: a slow model load (both recipes)."""
    from moepost.recipes import rl, sft

    set_ = _Setter(monkeypatch)
    delay = float(os.environ.get("MOEPOST_LOAD_DELAY_S", "0"))
    for module in (sft, rl):

        def load_policy(*args: Any, _o=module.load_policy, **kwargs: Any) -> Any:
            time.sleep(delay)
            return _o(*args, **kwargs)

        set_(module, "load_policy", load_policy)


def install_from_env() -> None:
    """Every hook whose environment variable is set (fault_driver.py)."""
    if os.environ.get("MOEPOST_INJECT_NAN_GRAD_AT_STEP") or os.environ.get(
        "MOEPOST_INJECT_GRAD_SPIKE_AT_STEP"
    ):
        install_gradient_faults()
    if os.environ.get("MOEPOST_CRASH_AFTER_STEP") or os.environ.get("MOEPOST_STEP_DELAY_S"):
        install_step_hooks()
    if os.environ.get("MOEPOST_LOAD_DELAY_S"):
        install_load_delay()
    if os.environ.get("MOEPOST_KILL_DURING_SAVE") or os.environ.get("MOEPOST_SAVE_DELAY_S"):
        install_save_faults()
