"""Run logging: `train_log.jsonl`, optional tensorboard / wandb / mlflow, and the console.

Every logged step is one JSON object appended (and flushed) to `train_log.jsonl`, so a run that
is interrupted keeps every line it logged. `logging.report_to` forwards the numeric values of
each row to the integrations named there; each one is an optional extra and a missing package
is a one-line error naming the extra to install. The console shows a rich progress bar on a
terminal and plain lines otherwise (CI and `torchrun` logs stay readable).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from moepost.errors import UserError

# backend -> (pip package, moepost extra that installs it)
_PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "report"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}
# Hugging Face's spelling for "no integration"; accepted so copied configs load.
_NO_BACKEND = "none"
# mlflow refuses batches of more than 100 params.
_MLFLOW_PARAM_CHUNK = 100


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it visible rather than dropping it
    return value


def append_jsonl(path: Path, row: dict[str, Any]) -> None:
    line = json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n"
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(line)
    except OSError as e:
        from moepost.components.training.checkpoint_files import DiskFullError, is_disk_full

        if not is_disk_full(e):
            raise
        raise DiskFullError(
            f"disk full while appending to {path}: the lines logged before are intact, the "
            "checkpoints too; free space and continue with --resume auto"
        ) from None


def scalar_metrics(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a log row except `step` (bools, strings and lists are not metrics)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()  # a 0-d tensor; NaN stays a float (tensorboard draws it)
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = float(value)
    return out


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"model": {"lora": {"r": 8}}} -> {"model.lora.r": "8"} (for backends that take params)."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name + "."))
        else:
            flat[name] = str(value)[:500]
    return flat


class Backends:
    """The `logging.report_to` integrations; each import fails with the extra to install."""

    def __init__(self, names: list[str], output_dir: Path, run_name: str, config: dict) -> None:
        self._tb: Any = None
        self._wandb: Any = None
        self._mlflow: Any = None
        for name in names:
            if name == _NO_BACKEND:
                continue
            if name not in _PACKAGES:
                raise UserError(
                    f"logging.report_to: unknown backend '{name}' (choose from "
                    f"{', '.join(_PACKAGES)}, or leave the list empty)"
                )
            try:
                getattr(self, f"_open_{name}")(Path(output_dir), run_name, config)
            except ImportError as e:
                package, extra = _PACKAGES[name]
                raise UserError(
                    f"logging.report_to includes {name} but the '{e.name or package}' package "
                    f"is not installed: pip install 'moepost[{extra}]' (or pip install {package})"
                ) from None

    def _open_tensorboard(self, output_dir: Path, run_name: str, config: dict) -> None:
        # torch's writer raises a plain ImportError naming no module when tensorboard is missing.
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(output_dir / "tensorboard"))

    def _open_wandb(self, output_dir: Path, run_name: str, config: dict) -> None:
        import wandb  # honours WANDB_MODE=offline, WANDB_PROJECT, WANDB_ENTITY

        self._wandb = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "moepost",
            dir=str(output_dir),
            name=run_name,
            config=config,
        )

    def _open_mlflow(self, output_dir: Path, run_name: str, config: dict) -> None:
        import mlflow

        # Without a tracking server the run goes to a file store inside the run directory.
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((output_dir / "mlruns").resolve().as_uri())
        self._mlflow = mlflow
        mlflow.start_run(run_name=run_name)
        items = list(flatten_config(config).items())
        for start in range(0, len(items), _MLFLOW_PARAM_CHUNK):
            mlflow.log_params(dict(items[start : start + _MLFLOW_PARAM_CHUNK]))

    def log(self, row: dict[str, Any], step: int) -> None:
        scalars = scalar_metrics(row)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._mlflow is not None:
            # mlflow stores no NaN / inf; train_log.jsonl keeps them.
            finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
            self._mlflow.log_metrics(finite, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.end_run()
            self._mlflow = None


# What the progress display shows of an `info` dict, in this order, with these labels.
DISPLAY_KEYS: dict[str, str] = {
    "loss": "loss",
    "reward/mean": "reward",
    "eval/accuracy": "acc",
    "throughput/tokens_per_s": "tok/s",
    "lr": "lr",
}


def _fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def format_info(info: dict[str, Any], keys: dict[str, str] = DISPLAY_KEYS) -> str:
    """`loss 1.25  reward 0.5  tok/s 1234`: the keys of `keys` present in `info`, or every
    numeric entry of `info` when it holds none of them."""
    shown = [(label, info[k]) for k, label in keys.items() if k in info]
    if not shown:
        shown = list(info.items())
    parts = []
    for label, value in shown:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts.append(f"{label} {value:.0f}" if label == "tok/s" else f"{label} {_fmt(value)}")
    return "  ".join(parts)


def format_duration(seconds: float) -> str:
    """42s, 3m05s, 2h07m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Console:
    """Progress of a loop: a rich bar on a terminal, one plain line per update elsewhere.

    total: the step the loop ends at. update(step, info) reports that `step` is done; `info`
    is filtered by `keys` (default DISPLAY_KEYS: loss, reward, accuracy, tokens/s, lr).
    The ETA counts from the first update, so a resumed run (first update at step k > 1) gets
    an honest estimate. plain=False prints nothing off a terminal (for inner loops such as
    evaluation batches); transient=True removes the bar when closed.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        enabled: bool = True,
        keys: dict[str, str] | None = None,
        plain: bool = True,
        transient: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.description = description
        self.enabled = enabled
        self.keys = DISPLAY_KEYS if keys is None else keys
        self.plain = plain
        self.stream = stream if stream is not None else sys.stdout
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None  # (time, step) of the first update
        self._progress: Any = None
        if enabled and _isatty(self.stream):
            self._open_bar(transient)

    def _open_bar(self, transient: bool) -> None:
        from rich.console import Console as RichConsole
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed}/{task.total}"),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=RichConsole(file=self.stream, force_terminal=True),
            transient=transient,
        )
        self._task = self._progress.add_task(self.description, total=self.total, info="")
        self._progress.start()

    def eta_seconds(self, step: int, now: float) -> float:
        """Seconds left at `step`, from the pace since the first update (the first update's
        own duration, measured from construction, until a second one arrives)."""
        assert self._first is not None
        t_first, s_first = self._first
        if step > s_first:
            per_step = (now - t_first) / (step - s_first)
        else:
            per_step = t_first - self.start
        return per_step * max(0, self.total - step)

    def update(self, step: int, info: dict[str, Any] | None = None) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        first = self._first is None
        if first:
            self._first = (now, step)
        text = format_info(info or {}, self.keys)
        if self._progress is not None:
            if first and step > 1:
                # Resumed: start the bar's speed estimate here, not at a jump from 0 to step.
                self._progress.reset(self._task, completed=step - 1)
            self._progress.update(self._task, completed=step, info=text)
            return
        if not self.plain:
            return
        eta = format_duration(self.eta_seconds(step, now))
        line = f"[{self.description}] step {step}/{self.total}"
        line += f"  {text}" if text else ""
        print(f"{line}  eta {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> Console:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty is not None and isatty())


class RunLogger:
    """Writes `train_log.jsonl` and forwards each row to the configured backends."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        report_to: list[str],
        run_name: str,
        config: dict,
        enabled: bool = True,
        filename: str = "train_log.jsonl",
    ) -> None:
        self.dir = Path(output_dir)
        self.enabled = enabled
        self.path = self.dir / filename
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.backends = Backends(report_to, self.dir, run_name, config) if enabled else None

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, row)
        if self.backends is not None:
            self.backends.log(row, int(row.get("step", 0)))

    def write(self, filename: str, row: dict[str, Any]) -> None:
        """Append a row to another JSONL file of the run (rollouts, expert load, eval)."""
        if self.enabled:
            append_jsonl(self.dir / filename, row)

    def close(self) -> None:
        if self.backends is not None:
            self.backends.close()


def truncate_log_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step (they will be logged again)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (json.JSONDecodeError, ValueError, TypeError):
            continue
    path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
