"""Run logging: train_log.jsonl, the report_to backends, and the console progress display."""

from __future__ import annotations

import builtins
import io
import json
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch

import moepost.components.training.logging as mlog
from moepost.components.training.logging import (
    Backends,
    Console,
    RunLogger,
    flatten_config,
    format_duration,
    format_info,
    truncate_log_after,
)
from moepost.errors import UserError

ROWS: list[dict[str, Any]] = [
    {"step": 1, "loss": 1.5, "reward/mean": 0.25, "note": "text", "flag": True},
    {"step": 2, "loss": torch.tensor(0.75), "reward/mean": float("nan"), "lengths": [3, 4]},
]


def _log_rows(out: Path, report_to: list[str], config: dict | None = None) -> None:
    logger = RunLogger(out, report_to=report_to, run_name="run-a", config=config or {})
    for row in ROWS:
        logger.log(row)
    logger.close()


# ---------------------------------------------------------------- train_log.jsonl, tensorboard


def test_jsonl_and_tensorboard_event_files(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_rows(tmp_path, ["tensorboard"])
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    # The tensor became a number; NaN is kept visible as a string (JSON has no NaN).
    assert lines[1] == {"step": 2, "loss": 0.75, "reward/mean": "nan", "lengths": [3, 4]}
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    # Only numbers are scalars: not `step` itself, the string, the bool or the list.
    assert sorted(acc.Tags()["scalars"]) == ["loss", "reward/mean"]
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.5), (2, 0.75)]
    reward = acc.Scalars("reward/mean")
    assert [e.step for e in reward] == [1, 2] and reward[0].value == 0.25
    assert math.isnan(reward[1].value)  # tensorboard draws NaN, so it gets it


def test_none_backend_and_unknown_backend(tmp_path: Path) -> None:
    _log_rows(tmp_path, ["none"])  # Hugging Face's "no integration" spelling
    assert not (tmp_path / "tensorboard").exists()
    assert len((tmp_path / "train_log.jsonl").read_text().splitlines()) == 2
    with pytest.raises(UserError, match="unknown backend 'tensorbord' .*tensorboard, wandb"):
        Backends(["tensorbord"], tmp_path, "r", {})


@pytest.mark.parametrize(
    ("backend", "module", "extra"),
    [
        ("tensorboard", "tensorboard", "report"),
        ("wandb", "wandb", "wandb"),
        ("mlflow", "mlflow", "mlflow"),
    ],
)
def test_missing_package_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, module: str, extra: str
) -> None:
    real_import = builtins.__import__

    def failing_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == module or name.startswith(module + "."):
            raise ImportError(f"No module named '{module}'", name=module)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", failing_import)
    with pytest.raises(UserError) as info:
        Backends([backend], tmp_path, "r", {})
    message = str(info.value)
    assert f"logging.report_to includes {backend}" in message
    assert f"pip install 'moepost[{extra}]'" in message and f"'{module}' package" in message


# ---------------------------------------------------------------- wandb and mlflow glue


class _FakeWandbRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = False

    def log(self, data: dict[str, float], step: int) -> None:
        self.logged.append((data, step))

    def finish(self) -> None:
        self.finished = True


def test_wandb_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _FakeWandbRun()
    calls: dict[str, Any] = {}

    def init(**kwargs: Any) -> _FakeWandbRun:
        calls.update(kwargs)
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    _log_rows(tmp_path, ["wandb"], config={"rl": {"algorithm": "gspo"}})
    assert calls == {
        "project": "moepost",
        "dir": str(tmp_path),
        "name": "run-a",
        "config": {"rl": {"algorithm": "gspo"}},
    }
    assert run.logged[0] == ({"loss": 1.5, "reward/mean": 0.25}, 1)
    assert run.logged[1][1] == 2 and run.logged[1][0]["loss"] == 0.75
    assert run.finished


class _FakeMlflow(types.SimpleNamespace):
    def __init__(self) -> None:
        super().__init__(uri=None, run_name=None, params=[], metrics=[], ended=False)

    def set_tracking_uri(self, uri: str) -> None:
        self.uri = uri

    def start_run(self, run_name: str) -> None:
        self.run_name = run_name

    def log_params(self, params: dict[str, str]) -> None:
        self.params.append(params)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.metrics.append((metrics, step))

    def end_run(self) -> None:
        self.ended = True


def test_mlflow_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {"a": {f"k{i}": i for i in range(150)}, "b": "x"}
    _log_rows(tmp_path, ["mlflow"], config=config)
    assert fake.uri == (tmp_path / "mlruns").resolve().as_uri() and fake.run_name == "run-a"
    # 151 params in batches of at most 100: 100 + 51.
    assert [len(p) for p in fake.params] == [100, 51]
    assert fake.params[0]["a.k7"] == "7" and fake.params[1]["b"] == "x"
    # The NaN reward of step 2 is left out: mlflow cannot store it.
    assert fake.metrics == [({"loss": 1.5, "reward/mean": 0.25}, 1), ({"loss": 0.75}, 2)]
    assert fake.ended
    # A configured tracking server wins over the run-local file store.
    fake2 = _FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake2)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    Backends(["mlflow"], tmp_path, "r", {}).close()
    assert fake2.uri is None and fake2.ended


def test_flatten_config() -> None:
    flat = flatten_config({"model": {"lora": {"r": 8, "target_modules": ["q"]}}, "x": {}})
    assert flat == {"model.lora.r": "8", "model.lora.target_modules": "['q']", "x": "{}"}


def test_wandb_offline_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb", reason="wandb not installed: pip install 'moepost[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_rows(tmp_path, ["wandb"], config={"stage": "rl"})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_mlflow_file_store_for_real(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow", reason="mlflow not installed: pip install 'moepost[mlflow]'")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _log_rows(tmp_path, ["mlflow"], config={"stage": "rl"})
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.5), (2, 0.75)]
    assert run.data.params["stage"] == "rl"


# ---------------------------------------------------------------- console


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(mlog, "time", c)
    return c


def test_console_plain_lines_and_eta(clock: _Clock) -> None:
    out = io.StringIO()  # not a terminal
    console = Console(4, "sft", stream=out)
    clock.now = 10.0
    info = {"loss": 1.5, "throughput/tokens_per_s": 1234.4, "moe/cv": 0.3, "lr": 2e-4}
    console.update(1, info)
    clock.now = 30.0
    console.update(3, {"loss": 1.25})
    console.close()
    # Step 1 took 10 s (from construction) -> 3 left x 10 s = 30 s.
    # Steps 1 -> 3 took 20 s, 10 s each -> 1 left = 10 s.
    assert out.getvalue().splitlines() == [
        "[sft] step 1/4  loss 1.5  tok/s 1234  lr 0.0002  eta 30s",
        "[sft] step 3/4  loss 1.25  eta 10s",
    ]


def test_console_eta_after_resume(clock: _Clock) -> None:
    out = io.StringIO()
    console = Console(20, "gspo", stream=out)
    clock.now = 5.0
    console.update(11, {})  # resumed at step 10: the first step seen took 5 s
    clock.now = 15.0
    console.update(13, {"kl": 0.25})  # no display key given: show what was passed
    # 9 left x 5 s = 45 s; then (15 - 5) / (13 - 11) = 5 s per step x 7 left = 35 s.
    assert out.getvalue().splitlines() == [
        "[gspo] step 11/20  eta 45s",
        "[gspo] step 13/20  kl 0.25  eta 35s",
    ]


def test_console_disabled_or_not_plain_prints_nothing() -> None:
    out = io.StringIO()
    for console in (
        Console(3, "a", enabled=False, stream=out),
        Console(3, "b", plain=False, stream=out),
    ):
        console.update(1, {"loss": 1.0})
        console.close()
    assert out.getvalue() == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_rich_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # rich reads the width from here for a non-tty file
    out = _Terminal()
    with Console(20, "gspo", stream=out) as console:
        console.update(11, {"loss": 1.5, "reward/mean": 0.5, "throughput/tokens_per_s": 1200.0})
        console.update(12, {"loss": 1.25, "reward/mean": 0.75, "throughput/tokens_per_s": 1300.0})
    text = out.getvalue()
    assert "\x1b[" in text  # rendered for a terminal, not as plain lines
    assert "gspo" in text and "step 12/20" in text
    assert "loss 1.25  reward 0.75  tok/s 1300" in text and "eta" in text
    assert "[gspo] step" not in text


def test_format_helpers() -> None:
    assert (
        format_info({"lr": 1e-5, "loss": 2.0, "reward/mean": 0.5}) == "loss 2  reward 0.5  lr 1e-05"
    )
    assert format_info({"eval/accuracy": 0.75, "note": "x"}) == "acc 0.75"
    assert [format_duration(s) for s in (0.4, 42, 185, 7620)] == ["0s", "42s", "3m05s", "2h07m"]


def test_truncate_log_after(tmp_path: Path) -> None:
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + "not json\n")
    truncate_log_after(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
