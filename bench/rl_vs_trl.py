"""GSPO step time, tokens/s and peak RSS: moepost `run_rl` against TRL's `GRPOTrainer`.

Both sides get the same checkpoint, the same prompts, G completions per prompt, the same
completion cap, temperature, learning rate, k3 KL (coef 0.04, so both run a reference pass),
sequence-level ratios with the GSPO clip range, seq-mean-token-mean aggregation, one policy
update per batch of 16 rows, fp32, no activation checkpointing and 2 torch threads
(`--threads`). TRL runs micro-batches of 8 rows (2 accumulation steps). moepost gets a token
budget equal to the most 8 padded rows can hold (8 x (longest prompt + completion cap)); it
feeds each shared prompt once (`rl.shared_prefix`), so a whole step fits one forward. The
`--before` side runs moepost with 8-row micro-batches and no prompt sharing. The reward is moepost's `gsm8k` (flexible extraction) for
both, wrapped for TRL's chat-format completions. Runs alternate moepost, TRL, moepost, ... each
in its own process; the first step of each run is warm-up and left out of the medians.

    python bench/rl_vs_trl.py [--runs 3] [--steps 4] [--quick]
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
    gsm8k_file,
    longest_prompt_tokens,
    parameter_counts,
    trl_gsm8k_dataset,
    trl_gsm8k_reward,
)

SCRIPT = Path(__file__).resolve()
# `--before`: moepost with this job's latest optimisation off (payload changes), and its label
BEFORE_SIDE: dict[str, Any] = {"overrides": ["rl.shared_prefix=false"], "micro_batch_tokens": 0}
BEFORE_LABEL = "8-row micro-batches, rl.shared_prefix=false"


def settings(quick: bool = False) -> dict[str, Any]:
    """The shared RL settings (both frameworks read the same dict)."""
    return {
        "prompts_per_step": 2,
        "group_size": 8,
        "micro_batch_size": 8,  # rows per forward/backward; 16 rows -> 2 accumulation steps
        "max_new_tokens": 32,
        "temperature": 1.0,
        "learning_rate": 1e-5,
        "kl_coef": 0.04,
        "clip_eps_low": 3e-4,  # GSPO paper's range, moepost's gspo preset
        "clip_eps_high": 4e-4,
        "steps": 3 if quick else 6,
        "seed": 42,
        "device": "cpu",
        "dtype": "float32",
    }


# ---------------------------------------------------------------- children


def moepost_job(p: dict[str, Any]) -> dict[str, Any]:
    """One moepost GSPO run; per-step marks are taken where the recipe logs each step."""
    t_start = time.perf_counter()
    import moepost.recipes.rl as rl
    from moepost.components.training.logging import RunLogger
    from moepost.config.load import load_config

    marks: list[dict[str, Any]] = []
    logprob_s = [0.0]
    original_log, original_ref = RunLogger.log, rl.reference_and_old_logprobs

    def log(self: Any, row: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        marks.append(
            {"wall": time.perf_counter(), "cpu": time.process_time(), "lp": logprob_s[0], **row}
        )
        return original_log(self, row, *args, **kwargs)

    def timed_ref(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original_ref(*args, **kwargs)
        finally:
            logprob_s[0] += time.perf_counter() - t0

    RunLogger.log = log  # type: ignore[method-assign]
    rl.reference_and_old_logprobs = timed_ref
    cfg = load_config(
        None,
        [
            "stage=rl",
            f"model.policy_name_or_path={p['model_dir']}",
            f"model.experts_implementation={p.get('experts', 'auto')}",
            f"model.dtype={p['dtype']}",
            f"data.train_file={p['data_file']}",
            f"generation.num_samples_per_prompt={p['group_size']}",
            f"generation.max_new_tokens={p['max_new_tokens']}",
            f"generation.temperature={p['temperature']}",
            "rl.algorithm=gspo",
            f"rl.kl_coef={p['kl_coef']}",
            "rl.kl_estimator=k3",
            f"rl.clip_eps_low={p['clip_eps_low']}",
            f"rl.clip_eps_high={p['clip_eps_high']}",
            "rl.loss_aggregation=seq_mean_token_mean",
            f"train.max_steps={p['steps']}",
            f"train.prompts_per_step={p['prompts_per_step']}",
            # a token budget when the bench sets one (see `run`), else rows
            f"train.micro_batch_tokens={p['micro_batch_tokens']}"
            if p.get("micro_batch_tokens")
            else f"train.micro_batch_size={p['micro_batch_size']}",
            f"train.seed={p['seed']}",
            f"optim.learning_rate={p['learning_rate']}",
            "optim.lr_scheduler=constant",
            "reward.functions=[{name: gsm8k, method: flexible}]",
            f"logging.output_dir={Path(p.get('out_dir', '.')) / 'moepost_rl_out'}",
            "logging.save_final=false",
            f"misc.device={p['device']}",
            f"misc.num_threads={p.get('threads', 2)}",
            *p.get("overrides", []),  # A/B sides, e.g. rl.shared_prefix=false
        ],
    )
    try:
        rl.run_rl(cfg)
    finally:  # leave the classes as found when several jobs share one process (gpu.py --dry)
        RunLogger.log, rl.reference_and_old_logprobs = original_log, original_ref
    steps, prev = [], None
    for m in marks:
        if "time/step_s" not in m:
            continue  # an eval row
        lp = m["lp"] - (prev["lp"] if prev else 0.0)
        steps.append(
            {
                "step": m["step"],
                "interval_s": m["wall"] - (prev["wall"] if prev else t_start),
                "cpu_s": m["cpu"] - (prev["cpu"] if prev else 0.0),
                "tokens": m["throughput/tokens_per_s"] * m["time/step_s"],
                "gen_s": m["time/rollout_s"],
                "logprob_s": lp,
                "update_s": m["time/update_s"] - lp,
                "other_s": m["time/step_s"] - m["time/rollout_s"] - m["time/update_s"],
                "reward": m.get("reward/mean", float("nan")),
            }
        )
        prev = m
    return {"steps": steps, "peak_gpu_mb": peak_gpu_mb()}


def trl_job(p: dict[str, Any]) -> dict[str, Any]:
    """One TRL GRPOTrainer run configured as GSPO; phases timed by overriding two methods."""
    t_start = p.get("t_start", time.perf_counter())  # a caller that imported TRL first
    import torch
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dataset = trl_gsm8k_dataset(Path(p["data_file"]))

    timers = {"gen": 0.0, "gen_score": 0.0}

    class TimedGRPO(GRPOTrainer):
        def _generate(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super()._generate(*args, **kwargs)
            finally:
                timers["gen"] += time.perf_counter() - t0

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super()._generate_and_score_completions(*args, **kwargs)
            finally:
                timers["gen_score"] += time.perf_counter() - t0

    marks: list[dict[str, Any]] = []
    logged: dict[int, dict[str, Any]] = {}

    class Marks(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            marks.append(
                {
                    "step": state.global_step,
                    "wall": time.perf_counter(),
                    "cpu": time.process_time(),
                    "tokens": float(state.num_input_tokens_seen),
                    **timers,
                }
            )

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs:
                logged.setdefault(state.global_step, {}).update(logs)

    rows_per_step = p["prompts_per_step"] * p["group_size"]
    on_cpu = p["device"] == "cpu"
    args = GRPOConfig(
        output_dir=str(Path(p.get("out_dir", ".")) / "trl_rl_out"),
        per_device_train_batch_size=p["micro_batch_size"],
        gradient_accumulation_steps=rows_per_step // p["micro_batch_size"],
        num_generations=p["group_size"],
        max_completion_length=p["max_new_tokens"],
        temperature=p["temperature"],
        top_p=1.0,
        top_k=0,
        beta=p["kl_coef"],
        importance_sampling_level="sequence",
        loss_type="grpo",
        scale_rewards="group",
        epsilon=p["clip_eps_low"],
        epsilon_high=p["clip_eps_high"],
        num_iterations=1,
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
        use_cpu=on_cpu,
        bf16=p["dtype"] == "bfloat16",
        activation_checkpointing=False,  # TRL defaults to True; moepost to False
        model_init_kwargs={"dtype": getattr(torch, p["dtype"])},
        dataloader_num_workers=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(p["model_dir"])
    trainer = TimedGRPO(
        model=p["model_dir"],
        reward_funcs=[trl_gsm8k_reward("flexible")],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Marks()],
    )
    # Progress bars and printed log dicts would only fill the job's log.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    steps, prev = [], None
    for m in marks:
        gen = m["gen"] - (prev["gen"] if prev else 0.0)
        gen_score = m["gen_score"] - (prev["gen_score"] if prev else 0.0)
        interval = m["wall"] - (prev["wall"] if prev else t_start)
        steps.append(
            {
                "step": m["step"],
                "interval_s": interval,
                "cpu_s": m["cpu"] - (prev["cpu"] if prev else 0.0),
                "tokens": m["tokens"] - (prev["tokens"] if prev else 0.0),
                "gen_s": gen,
                "logprob_s": gen_score - gen,  # reference pass + reward scoring + padding
                "update_s": interval - gen_score,
                "other_s": 0.0,
                "reward": logged.get(m["step"], {}).get("reward", float("nan")),
            }
        )
        prev = m
    return {"steps": steps, "peak_gpu_mb": peak_gpu_mb()}


# ---------------------------------------------------------------- aggregation


def run_figures(res: ChildResult, warmup: int) -> dict[str, float]:
    """Figures of one run over its steps after the first `warmup`."""
    steps = res.result["steps"][warmup:]
    if not steps:
        raise RuntimeError(f"run {res.log_path} logged no step after the warm-up")
    total = sum(s["interval_s"] for s in steps)
    return {
        "step_s": median([s["interval_s"] for s in steps]),
        "best_step_s": min(s["interval_s"] for s in steps),
        "tokens_per_s": sum(s["tokens"] for s in steps) / total,
        "cpu_s": median([s["cpu_s"] for s in steps]),
        "gen_s": median([s["gen_s"] for s in steps]),
        "logprob_s": median([s["logprob_s"] for s in steps]),
        "update_s": median([s["update_s"] for s in steps]),
        "reward": sum(s["reward"] for s in steps) / len(steps),
        "first_step_s": res.result["steps"][0]["interval_s"],
        "peak_rss_mb": res.peak_rss_mb,
    }


def tables(agg: dict[str, dict[str, Any]], runs: int, steps: int) -> str:
    a, b = agg["moepost"], agg["trl"]
    rows = []
    for key, label in (
        ("step_s", "step time, s (median)"),
        ("best_step_s", "fastest step, s"),
        ("tokens_per_s", "tokens/s (prompt + completion)"),
        ("cpu_s", "CPU s per step (all threads)"),
        ("gen_s", "  generation, s"),
        ("logprob_s", "  reference log-prob pass (+ scoring), s"),
        ("update_s", "  policy update (fwd+bwd+optimizer), s"),
        ("first_step_s", "start-up + first step, s"),
        ("peak_rss_mb", "peak RSS, MB"),
        ("reward", "reward mean (measured steps)"),
    ):
        ma, mb = a["median"][key], b["median"][key]
        row = [label, ma, mb, ratio(ma, mb), spread(a["runs"][key]), spread(b["runs"][key])]
        rows.append(row + before_cells(agg, key))
    head = ["GSPO step", "moepost", "TRL", "moepost/TRL", "moepost runs", "TRL runs"]
    if BEFORE in agg:
        head += before_head(BEFORE_LABEL)
    return (
        f"{runs} alternating runs each, {steps} steps per run, first step left out\n"
        + markdown_table(head, rows)
    )


def run(
    runs: int = 3,
    quick: bool = False,
    workdir: Path | None = None,
    say: Any = print,
    threads: int = NUM_THREADS,
    before: bool = False,
) -> dict[str, Any]:
    """Build inputs, run both sides alternately, print and return the figures."""
    p = {**settings(quick), "threads": threads}
    model_dir = bench_model()
    p.update(model_dir=str(model_dir), data_file=str(gsm8k_file()))
    # moepost's micro-batches: a token budget equal to the most a TRL micro-batch of
    # `micro_batch_size` rows can hold (longest prompt + completion cap, per row). TRL pads
    # every row; moepost feeds each shared prompt once, so more rows fit the same budget.
    longest = longest_prompt_tokens(model_dir, Path(p["data_file"]))
    p["micro_batch_tokens"] = p["micro_batch_size"] * (longest + p["max_new_tokens"])
    workdir = workdir or CACHE / "work" / "rl"
    shutil.rmtree(workdir, ignore_errors=True)  # only this benchmark's own scratch files
    counts = parameter_counts(model_dir)
    say(
        f"RL: Qwen3-MoE {counts['total'] / 1e6:.2f} M params ({counts['active'] / 1e6:.2f} M "
        f"active), {p['prompts_per_step']} prompts x G={p['group_size']}, "
        f"max_new_tokens {p['max_new_tokens']}, micro-batch: TRL {p['micro_batch_size']} rows, "
        f"moepost a budget of {p['micro_batch_tokens']} tokens = {p['micro_batch_size']} x "
        f"({longest} + {p['max_new_tokens']})"
    )
    results = alternate(side_jobs(SCRIPT, p, workdir, BEFORE_SIDE if before else None), runs, say)
    agg = {name: aggregate(res, lambda r: run_figures(r, 1)) for name, res in results.items()}
    text = tables(agg, runs, p["steps"])
    say(text)
    return {"settings": p, "params": counts, "figures": agg, "table": text}


def main(argv: list[str] | None = None) -> int:
    args = parse_side_args(__doc__, "3 steps per run instead of 6", argv)
    run(args.runs, args.quick, threads=args.threads, before=args.before)
    return 0


if __name__ == "__main__":
    if not child_entry({"moepost": moepost_job, "trl": trl_job}):
        sys.exit(main())
