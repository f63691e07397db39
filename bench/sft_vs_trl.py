"""SFT tokens/s, peak RSS and loss: moepost `run_sft` against TRL's `SFTTrainer`.

Same checkpoint, same chat data (one user and one assistant turn per row), loss on assistant
tokens only in both (our tiny tokenizer's ChatML template has `{% generation %}` marks, which
TRL's `assistant_only_loss=True` needs), the same batch / micro-batch, max length, learning
rate (constant), AdamW betas and no weight decay, gradient clipping at 1.0, fp32, no activation
checkpointing, no packing and 2 torch threads (`--threads`). Tokens/s counts real (non-padding) tokens only.
The loss shown is the assistant-token cross-entropy; TRL's logged loss also holds
`router_aux_loss_coef x aux_loss`, which is subtracted so the two columns mean the same thing.

    python bench/sft_vs_trl.py [--runs 3] [--quick]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    BEFORE,
    CACHE,
    NUM_THREADS,
    ChildResult,
    aggregate,
    alternate,
    before_cells,
    before_head,
    child_entry,
    markdown_table,
    median,
    parse_side_args,
    peak_gpu_mb,
    ratio,
    side_jobs,
    spread,
)
from bench.workload import (  # noqa: E402
    bench_model,
    chat_file,
    parameter_counts,
)

SCRIPT = Path(__file__).resolve()
# `--before`: moepost with this job's latest optimisation off (payload changes), and its label
BEFORE_SIDE: dict[str, Any] = {"experts": "grouped_mm"}
BEFORE_LABEL = "grouped_mm experts"


def settings(quick: bool = False) -> dict[str, Any]:
    return {
        "batch_size": 16,
        "micro_batch_size": 8,  # 2 accumulation steps
        "max_length": 128,
        "learning_rate": 3e-4,
        "steps": 5 if quick else 10,
        "warmup": 2,  # steps left out of the timing medians
        "seed": 42,
        "device": "cpu",
        "dtype": "float32",
    }


# ---------------------------------------------------------------- children


def moepost_job(p: dict[str, Any]) -> dict[str, Any]:
    t_start = time.perf_counter()
    from moepost.components.training.logging import RunLogger
    from moepost.config.load import load_config
    from moepost.recipes.sft import run_sft

    marks: list[dict[str, Any]] = []
    original_log = RunLogger.log

    def log(self: Any, row: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        marks.append({"wall": time.perf_counter(), "cpu": time.process_time(), **row})
        return original_log(self, row, *args, **kwargs)

    RunLogger.log = log  # type: ignore[method-assign]
    cfg = load_config(
        None,
        [
            "stage=sft",
            f"model.policy_name_or_path={p['model_dir']}",
            f"model.experts_implementation={p.get('experts', 'auto')}",
            f"model.dtype={p['dtype']}",
            f"data.train_file={p['data_file']}",
            "data.format=messages",
            f"data.max_seq_length={p['max_length']}",
            f"train.max_steps={p['steps']}",
            f"train.batch_size={p['batch_size']}",
            # a token budget when the bench sets one (`grid.py`: moepost's default), else rows
            f"train.micro_batch_tokens={p['micro_batch_tokens']}"
            if p.get("micro_batch_tokens")
            else f"train.micro_batch_size={p['micro_batch_size']}",
            f"train.seed={p['seed']}",
            f"optim.learning_rate={p['learning_rate']}",
            "optim.lr_scheduler=constant",
            "optim.max_grad_norm=1.0",
            f"logging.output_dir={Path(p.get('out_dir', '.')) / 'moepost_sft_out'}",
            "logging.save_final=false",
            f"misc.device={p['device']}",
            f"misc.num_threads={p.get('threads', 2)}",
            *p.get("overrides", []),  # bench/micro_batching.py's sides
        ],
    )
    try:
        run_sft(cfg)
    finally:  # leave the class as found when several jobs share one process (gpu.py --dry)
        RunLogger.log = original_log
    steps, prev = [], None
    for m in marks:
        if "time/step_s" not in m:
            continue
        steps.append(
            {
                "step": m["step"],
                "interval_s": m["wall"] - (prev["wall"] if prev else t_start),
                "cpu_s": m["cpu"] - (prev["cpu"] if prev else 0.0),
                "tokens": m["throughput/tokens_per_s"] * m["time/step_s"],
                "loss": m["loss"],
            }
        )
        prev = m
    return {"steps": steps, "peak_gpu_mb": peak_gpu_mb()}


def trl_job(p: dict[str, Any]) -> dict[str, Any]:
    t_start = p.get("t_start", time.perf_counter())  # a caller that imported TRL first
    import json

    import torch
    from datasets import Dataset
    from transformers import (
        AutoConfig,
        AutoTokenizer,
        PrinterCallback,
        ProgressCallback,
        TrainerCallback,
    )
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(p["data_file"]).read_text().splitlines()]
    dataset = Dataset.from_list(rows)
    coef = float(getattr(AutoConfig.from_pretrained(p["model_dir"]), "router_aux_loss_coef", 0.0))
    marks: list[dict[str, Any]] = []
    logged: dict[int, dict[str, Any]] = {}

    class Marks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(
                {"step": state.global_step, "wall": time.perf_counter(), "cpu": time.process_time()}
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs:
                logged.setdefault(state.global_step, {}).update(logs)

    args = SFTConfig(
        output_dir=str(Path(p.get("out_dir", ".")) / "trl_sft_out"),
        per_device_train_batch_size=p["micro_batch_size"],
        gradient_accumulation_steps=p["batch_size"] // p["micro_batch_size"],
        max_length=p["max_length"],
        assistant_only_loss=True,
        packing=False,
        padding_free=False,
        learning_rate=p["learning_rate"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=p["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=p["seed"],
        use_cpu=p["device"] == "cpu",
        bf16=p["dtype"] == "bfloat16",
        activation_checkpointing=False,  # TRL defaults to True; moepost to False
        model_init_kwargs={"dtype": getattr(torch, p["dtype"])},
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(p["model_dir"])
    trainer = SFTTrainer(
        model=p["model_dir"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Marks()],
    )
    # Progress bars and printed log dicts would only fill the job's log.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    steps, prev_wall, prev_cpu, prev_tokens = [], t_start, 0.0, 0.0
    for m in marks:
        row = logged.get(m["step"], {})
        tokens = float(row.get("num_tokens", float("nan")))
        steps.append(
            {
                "step": m["step"],
                "interval_s": m["wall"] - prev_wall,
                "cpu_s": m["cpu"] - prev_cpu,
                "tokens": tokens - prev_tokens,
                "loss": row.get("loss", float("nan")) - coef * row.get("aux_loss", 0.0),
            }
        )
        prev_wall, prev_cpu, prev_tokens = m["wall"], m["cpu"], tokens
    return {"steps": steps, "peak_gpu_mb": peak_gpu_mb()}


# ---------------------------------------------------------------- aggregation


def run_figures(res: ChildResult, warmup: int) -> dict[str, float]:
    all_steps = res.result["steps"]
    steps = all_steps[warmup:]
    if not steps:
        raise RuntimeError(f"run {res.log_path} logged no step after the warm-up")
    total = sum(s["interval_s"] for s in steps)
    return {
        "step_s": median([s["interval_s"] for s in steps]),
        "best_step_s": min(s["interval_s"] for s in steps),
        "tokens_per_s": sum(s["tokens"] for s in steps) / total,
        "cpu_s": median([s["cpu_s"] for s in steps]),
        "first_loss": all_steps[0]["loss"],
        "final_loss": all_steps[-1]["loss"],
        "startup_s": sum(s["interval_s"] for s in all_steps[:warmup]),
        "peak_rss_mb": res.peak_rss_mb,
    }


def tables(agg: dict[str, dict[str, Any]], runs: int, p: dict[str, Any]) -> str:
    a, b = agg["moepost"], agg["trl"]
    rows = []
    for key, label in (
        ("step_s", "step time, s (median)"),
        ("best_step_s", "fastest step, s"),
        ("tokens_per_s", "tokens/s (real tokens)"),
        ("cpu_s", "CPU s per step (all threads)"),
        ("startup_s", f"start-up + first {p['warmup']} steps, s"),
        ("peak_rss_mb", "peak RSS, MB"),
        ("first_loss", "loss at step 1"),
        ("final_loss", f"loss at step {p['steps']}"),
    ):
        ma, mb = a["median"][key], b["median"][key]
        row = [label, ma, mb, ratio(ma, mb), spread(a["runs"][key]), spread(b["runs"][key])]
        rows.append(row + before_cells(agg, key))
    head = ["SFT step", "moepost", "TRL", "moepost/TRL", "moepost runs", "TRL runs"]
    if BEFORE in agg:
        head += before_head(BEFORE_LABEL)
    return (
        f"{runs} alternating runs each, {p['steps']} steps per run, first {p['warmup']} left "
        "out of the timings\n" + markdown_table(head, rows)
    )


def run(
    runs: int = 3,
    quick: bool = False,
    workdir: Path | None = None,
    say: Any = print,
    threads: int = NUM_THREADS,
    before: bool = False,
) -> dict[str, Any]:
    p = {**settings(quick), "threads": threads}
    model_dir = bench_model()
    p.update(model_dir=str(model_dir), data_file=str(chat_file()))
    workdir = workdir or CACHE / "work" / "sft"
    shutil.rmtree(workdir, ignore_errors=True)  # only this benchmark's own scratch files
    counts = parameter_counts(model_dir)
    say(
        f"SFT: Qwen3-MoE {counts['total'] / 1e6:.2f} M params, batch {p['batch_size']} "
        f"(micro {p['micro_batch_size']}), max length {p['max_length']}, lr {p['learning_rate']}"
    )
    results = alternate(side_jobs(SCRIPT, p, workdir, BEFORE_SIDE if before else None), runs, say)
    agg = {
        name: aggregate(res, lambda r: run_figures(r, p["warmup"])) for name, res in results.items()
    }
    text = tables(agg, runs, p)
    say(text)
    return {"settings": p, "params": counts, "figures": agg, "table": text}


def main(argv: list[str] | None = None) -> int:
    args = parse_side_args(__doc__, "5 steps per run instead of 10", argv)
    run(args.runs, args.quick, threads=args.threads, before=args.before)
    return 0


if __name__ == "__main__":
    if not child_entry({"moepost": moepost_job, "trl": trl_job}):
        sys.exit(main())
