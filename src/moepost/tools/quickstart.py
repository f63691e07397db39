"""`moepost quickstart`: the embedded default, end to end on a laptop CPU in about ten minutes.

1. `tiny-model`: a random 4-layer Qwen3-MoE (8 experts, top-2, ~1.8 M parameters) and its
   character-level ChatML tokenizer.
2. A seeded arithmetic word-problem dataset in GSM8K form (`quickstart_data`), train + held out.
3. `configs/quickstart/sft.yaml`, then `configs/quickstart/gspo.yaml` from the SFT result, run
   with `moepost train` exactly as a user would; the tool only fills in paths and the seed.
4. The base, SFT and GSPO models are scored on the same held-out problems (greedy, GSM8K strict):
   `moepost eval gspo.yaml` for base and SFT; the GSPO run's own end-of-training eval (same
   function, same settings) for GSPO.

Expert-load entropy is measured the same way for all three models: normalised entropy of the
top-k expert counts per MoE layer (1 = perfectly balanced), averaged over layers, on the eval
prompts with their reference answers.

Layout of the output folder: model/, data/, base_eval/, sft/, sft_eval/, gspo/,
quickstart_summary.json. `sft/eval_outputs.jsonl` is a copy of `sft_eval/eval_outputs.jsonl`
(generations of sft/final), since the SFT recipe itself evaluates by loss, not by generation.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moepost.errors import UserError

STAGES = ("base", "sft", "gspo")
# What a quickstart writes into its output folder (removed again on a re-run).
OUTPUTS = ("model", "data", "base_eval", "sft", "sft_eval", "gspo", "quickstart_summary.json")
MARKER = ".moepost_quickstart"
# The `moepost` command's entry point (`cli.main`: argv -> exit code), passed in by the CLI.
# The train / eval steps run through it, the same code path as the shell command; taking it as
# an argument keeps this module below the CLI that imports it.
Command = Callable[[list[str]], int]
MODEL: dict[str, Any] = {"hidden_size": 128, "num_layers": 4, "num_experts": 8, "top_k": 2}
# Fast mode (the end-to-end test): a few steps per stage, every output still written.
FAST_DATA = {"num_train": 64, "num_eval": 8}
FAST_SFT = ["train.max_steps=4", "train.eval_every=2", "train.save_every=2", "logging.log_every=1"]
FAST_GSPO = [
    "train.max_steps=2",
    "train.prompts_per_step=2",
    "train.micro_batch_size=16",
    "train.eval_every=0",  # the end-of-run eval still picks best/
    "train.save_every=2",
]


def config_dir() -> Path:
    """`configs/quickstart` of the source tree (or of the current directory)."""
    for root in (Path(__file__).resolve().parents[3], Path.cwd()):
        path = root / "configs" / "quickstart"
        if (path / "sft.yaml").is_file() and (path / "gspo.yaml").is_file():
            return path
    raise UserError(
        "quickstart: configs/quickstart/{sft,gspo}.yaml not found next to the package or in the "
        "current directory; run from a checkout of moepost"
    )


def _cli(command: Command, args: list[str]) -> None:
    """Run a `moepost` command in this process, the same code path as the shell command."""
    print(f"\n$ moepost {' '.join(args)}", flush=True)
    code = command(args)
    if code != 0:  # the command has printed its own error line
        raise UserError(f"quickstart: `moepost {' '.join(args[:2])}` failed (exit code {code})")


def _last(path: Path, key: str) -> float | None:
    """The last value of `key` in a JSONL log (None when never logged)."""
    value = None
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if key in row:
                value = row[key]
    return value


def load_entropy(model_dir: Path, eval_file: Path, limit: int = 64) -> float:
    """Mean normalised expert-load entropy of `model_dir` over eval prompts + reference answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moepost.components.moe.router_setup import (
        capture_router,
        new_monitor,
        record_load,
        router_setup,
    )
    from moepost.config.schema import MoEConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(x) for x in eval_file.read_text(encoding="utf-8").splitlines()[:limit]]
    texts = [
        tokenizer.apply_chat_template(
            [
                {"role": "user", "content": r["question"]},
                {"role": "assistant", "content": r["answer"]},
            ],
            tokenize=False,
        )
        for r in rows
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    # Thresholds off: this is a measurement, the collapse warning belongs to training runs.
    quiet = MoEConfig(
        router_aux_loss_coef=0.0, collapse_entropy_threshold=0.0, collapse_dead_threshold=10**9
    )
    router = router_setup(model, quiet)
    monitor = new_monitor(router, quiet)
    with torch.no_grad(), capture_router(router) as cap:
        model(**batch, use_cache=False)
    record_load(monitor, router, cap, batch["attention_mask"].flatten().bool())
    metrics, _ = monitor.flush(0)
    return float(metrics["moe/load_entropy"])


def _eval_stage(
    command: Command, name: str, model_dir: Path, out: Path, gspo_cfg: Path, paths: list[str]
) -> dict[str, Any]:
    """`moepost eval gspo.yaml` on `model_dir`; returns accuracy / reward_mean from its log."""
    run_dir = out / f"{name}_eval"
    _cli(
        command,
        [
            "eval",
            str(gspo_cfg),
            *paths,
            f"model.policy_name_or_path={model_dir}",
            f"logging.output_dir={run_dir}",
        ],
    )
    return {
        "accuracy": _last(run_dir / "eval_log.jsonl", "eval/accuracy"),
        "reward_mean": _last(run_dir / "eval_log.jsonl", "eval/reward_mean"),
        "eval_dir": str(run_dir),
    }


def _report(run_dir: Path) -> str:
    from moepost.components.training.report import write_report

    return str(write_report(run_dir))


def _prepare_output(output: str | Path) -> Path:
    """An empty output folder, or one a previous quickstart wrote (its outputs are removed:
    the run logs are appended to, so stale ones would mix with the new run's)."""
    out = Path(output).resolve()
    marker = out / MARKER
    if out.is_dir() and any(out.iterdir()) and not marker.is_file():
        raise UserError(
            f"quickstart --output {out}: folder exists and is not a quickstart output; "
            "pass a new or empty folder"
        )
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by `moepost quickstart`; its outputs are replaced on a re-run\n")
    return out


def _run_sft(
    command: Command, out: Path, sft_cfg: Path, gspo_cfg: Path, args: list[str], fast: bool
) -> dict[str, Any]:
    run_dir = out / "sft"
    paths = [f"model.policy_name_or_path={out / 'model'}", f"logging.output_dir={run_dir}"]
    # The report is drawn below, once the generation eval outputs are in the run folder.
    _cli(
        command,
        [
            "train",
            str(sft_cfg),
            *args,
            *paths,
            "logging.write_report=false",
            *(FAST_SFT if fast else []),
        ],
    )
    stage = _eval_stage(command, "sft", run_dir / "final", out, gspo_cfg, args)
    shutil.copyfile(out / "sft_eval" / "eval_outputs.jsonl", run_dir / "eval_outputs.jsonl")
    stage.update(model=str(run_dir / "final"), report=_report(run_dir))
    return stage


def _run_gspo(
    command: Command, out: Path, gspo_cfg: Path, args: list[str], fast: bool
) -> dict[str, Any]:
    run_dir = out / "gspo"
    paths = [f"model.policy_name_or_path={out / 'sft' / 'final'}", f"logging.output_dir={run_dir}"]
    _cli(command, ["train", str(gspo_cfg), *args, *paths, *(FAST_GSPO if fast else [])])
    # The run ends with an eval of its final weights on the eval split: the GSPO figures.
    log = run_dir / "train_log.jsonl"
    report = run_dir / "report.html"
    return {
        "accuracy": _last(log, "eval/accuracy"),
        "reward_mean": _last(log, "eval/reward_mean"),
        "model": str(run_dir / "final"),
        "report": str(report) if report.is_file() else _report(run_dir),
    }


def run_quickstart(
    output: str | Path, *, command: Command, seed: int = 0, fast: bool = False
) -> dict[str, Any]:
    """Build, train (SFT then GSPO), evaluate and summarise; returns the summary dict.

    command: `moepost.cli.main`, which runs each train / eval step (see `Command`).
    """
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards" at every save
    try:
        return _run(output, command, seed=seed, fast=fast)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run(output: str | Path, command: Command, *, seed: int, fast: bool) -> dict[str, Any]:
    from moepost.tools.quickstart_data import write_dataset
    from moepost.tools.tiny_model import build_tiny_model

    t_all = time.perf_counter()
    out = _prepare_output(output)
    cfgs = config_dir()
    sft_cfg, gspo_cfg = cfgs / "sft.yaml", cfgs / "gspo.yaml"
    model_dir = build_tiny_model(out / "model", "qwen3_moe", seed=seed, **MODEL)
    train_file, eval_file = write_dataset(out / "data", seed=seed, **(FAST_DATA if fast else {}))
    args = [f"data.train_file={train_file}", f"data.eval_file={eval_file}", f"train.seed={seed}"]
    stages: dict[str, dict[str, Any]] = {}
    for name in STAGES:
        t0 = time.perf_counter()
        if name == "base":
            stages[name] = {
                **_eval_stage(command, name, model_dir, out, gspo_cfg, args),
                "model": str(model_dir),
            }
        elif name == "sft":
            stages[name] = _run_sft(command, out, sft_cfg, gspo_cfg, args, fast)
        else:
            stages[name] = _run_gspo(command, out, gspo_cfg, args, fast)
        stages[name]["wall_s"] = time.perf_counter() - t0
    for name in STAGES:
        stages[name]["load_entropy"] = load_entropy(Path(stages[name]["model"]), eval_file)
    summary = {
        "stages": stages,
        "wall_s": time.perf_counter() - t_all,
        "seed": seed,
        "fast": fast,
        "num_eval": len(eval_file.read_text(encoding="utf-8").splitlines()),
        "output_dir": str(out),
    }
    (out / "quickstart_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary)
    return summary


def _cells(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["stage", "accuracy", "reward_mean", "load_entropy", "wall_s"]
    rows = []
    for name in STAGES:
        s = summary["stages"][name]
        acc = s.get("accuracy")
        rows.append(
            [
                name,
                "-" if acc is None else f"{100 * acc:.1f}%",
                "-" if s.get("reward_mean") is None else f"{s['reward_mean']:.3f}",
                f"{s['load_entropy']:.3f}",
                f"{s['wall_s']:.0f}",
            ]
        )
    return header, rows


def print_summary(summary: dict[str, Any]) -> None:
    """The results table (rich on a terminal, aligned text otherwise), then the report paths."""
    header, rows = _cells(summary)
    title = (
        f"moepost quickstart (seed {summary['seed']}, {summary['num_eval']} held-out problems, "
        f"greedy, GSM8K strict)"
    )
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        print(f"\n{title}")
        for row in [header, *rows]:
            cells = [
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))
            ]
            print("  ".join(cells))
    print(
        "accuracy: share of GSM8K-strict correct answers; load_entropy: normalised expert-load "
        "entropy (1 = balanced), mean over MoE layers; wall_s: the stage's training, evaluation "
        "and report"
    )
    print(f"total wall time: {summary['wall_s']:.0f} s")
    for name in ("sft", "gspo"):
        print(f"{name} report: {summary['stages'][name]['report']}")
    print(f"summary: {Path(summary['output_dir']) / 'quickstart_summary.json'}")
