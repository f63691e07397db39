"""Does it learn as well? The quickstart's GSPO stage through moepost and through TRL.

Per seed, the quickstart's own first stages build the inputs exactly as `moepost quickstart
--seed S` does (`moepost.tools.quickstart`): the random tiny Qwen3-MoE, the seeded arithmetic
data with its held-out split, and the SFT stage (`configs/quickstart/sft.yaml`). From that SFT
checkpoint both sides then run GSPO with `configs/quickstart/gspo.yaml`'s settings:

- moepost: `moepost train configs/quickstart/gspo.yaml` (only steps, eval interval and paths
  set), which evaluates the held-out split every `--eval-every` steps and at the end.
- TRL: `GRPOTrainer` with `importance_sampling_level="sequence"`, the same 32 prompts x 8
  samples, 24 new tokens, temperature 1, lr 1.5e-4 constant, AdamW (0.9, 0.999), no weight
  decay, grad clip 1.0, KL 0 (the gspo preset's; no reference model), clip 3e-4 / 4e-4, group
  std-normalised advantages, one update per batch in micro-batches of 128 rows, the same
  strict GSM8K reward and seed. A checkpoint every `--eval-every` steps is scored afterwards by
  `moepost eval configs/quickstart/gspo.yaml`: the same evaluator moepost's in-run eval calls.

Step 0 is the SFT checkpoint, scored the same way. Each side runs in its own process.

    python bench/learning_vs_trl.py --seeds 0 1 2 --steps 300 --eval-every 10
    python bench/learning_vs_trl.py --dry          # a few steps on a few rows (the test)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CACHE,
    child_entry,
    fmt,
    machine_line,
    markdown_table,
    median,
    resolve_threads,
    run_child,
)
from bench.workload import trl_gsm8k_dataset, trl_gsm8k_reward  # noqa: E402

SCRIPT = Path(__file__).resolve()
# --dry: the quickstart's fast mode for data and SFT, and a GSPO of a couple of small steps.
DRY_GSPO = ["train.prompts_per_step=2", "train.micro_batch_size=16"]


def _moepost(args: list[str]) -> None:
    """Run one `moepost` command in this process (the CLI's code path)."""
    from moepost.cli import main

    code = main(args)
    if code != 0:
        raise RuntimeError(f"`moepost {' '.join(args[:2])}` failed with exit code {code}")


def _log_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _accuracy(run_dir: Path) -> float:
    rows = [r for r in _log_rows(run_dir / "eval_log.jsonl") if "eval/accuracy" in r]
    if not rows:
        raise RuntimeError(f"no eval/accuracy in {run_dir / 'eval_log.jsonl'}")
    return float(rows[-1]["eval/accuracy"])


def _paths(p: dict[str, Any]) -> list[str]:
    return [f"data.train_file={p['train_file']}", f"data.eval_file={p['eval_file']}"]


def _evaluate(p: dict[str, Any], model_dir: Path, out_dir: Path) -> float:
    """Held-out accuracy of `model_dir` by `moepost eval` on the quickstart's GSPO config."""
    _moepost(
        [
            "eval",
            p["gspo_cfg"],
            *_paths(p),
            f"model.policy_name_or_path={model_dir}",
            f"logging.output_dir={out_dir}",
        ]
    )
    return _accuracy(out_dir)


# ---------------------------------------------------------------- inputs (a child)


def prepare(p: dict[str, Any]) -> dict[str, Any]:
    """The quickstart's model, data and SFT stage for one seed, and the SFT model's accuracy."""
    from moepost.tools import quickstart as qs
    from moepost.tools.quickstart_data import write_dataset
    from moepost.tools.tiny_model import build_tiny_model

    out, seed, dry = Path(p["out"]), p["seed"], p["dry"]
    model_dir = build_tiny_model(out / "model", "qwen3_moe", seed=seed, **qs.MODEL)
    train, held_out = write_dataset(out / "data", seed=seed, **(qs.FAST_DATA if dry else {}))
    cfgs = qs.config_dir()
    sft_dir = out / "sft"
    _moepost(
        [
            "train",
            str(cfgs / "sft.yaml"),
            f"data.train_file={train}",
            f"data.eval_file={held_out}",
            f"train.seed={seed}",
            f"model.policy_name_or_path={model_dir}",
            f"logging.output_dir={sft_dir}",
            "logging.write_report=false",
            *(qs.FAST_SFT if dry else []),
        ]
    )
    inputs = {
        "train_file": str(train),
        "eval_file": str(held_out),
        "gspo_cfg": str(cfgs / "gspo.yaml"),
        "sft_model": str(sft_dir / "final"),
    }
    return {**inputs, "sft_accuracy": _evaluate(inputs, sft_dir / "final", out / "sft_eval")}


# ---------------------------------------------------------------- the two sides (children)


def moepost_side(p: dict[str, Any]) -> dict[str, Any]:
    run_dir = Path(p["out"]) / "moepost_gspo"
    _moepost(
        [
            "train",
            p["gspo_cfg"],
            *_paths(p),
            f"model.policy_name_or_path={p['sft_model']}",
            f"logging.output_dir={run_dir}",
            f"train.seed={p['seed']}",
            f"train.max_steps={p['steps']}",
            f"train.eval_every={p['eval_every']}",
            "train.save_every=0",
            f"misc.num_threads={p['threads']}",
            *(DRY_GSPO if p["dry"] else []),
        ]
    )
    rows = _log_rows(run_dir / "train_log.jsonl")
    rewards = {int(r["step"]): float(r["reward/mean"]) for r in rows if "reward/mean" in r}
    acc = {int(r["step"]): float(r["eval/accuracy"]) for r in rows if "eval/accuracy" in r}
    return {"reward": rewards, "accuracy": acc}


def trl_side(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from moepost.config.load import load_config

    # The quickstart GSPO config as moepost resolves it (gspo preset filled in), so the TRL
    # side reads the very numbers moepost runs with.
    cfg = load_config(p["gspo_cfg"], DRY_GSPO if p["dry"] else [])
    data = trl_gsm8k_dataset(Path(p["train_file"]))

    rewards: dict[int, float] = {}

    class Rewards(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                rewards[state.global_step] = float(logs["reward"])

    t, g, rl = cfg.train, cfg.generation, cfg.rl
    rows_per_step = t.prompts_per_step * g.num_samples_per_prompt
    out = Path(p["out"]) / "trl_gspo"
    args = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=rows_per_step // t.micro_batch_size,
        num_generations=g.num_samples_per_prompt,
        max_completion_length=g.max_new_tokens,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=g.top_k,
        beta=rl.kl_coef,
        importance_sampling_level="sequence",
        loss_type="grpo",  # per-sequence token mean, then the mean: seq_mean_token_mean
        scale_rewards="group",
        epsilon=rl.clip_eps_low,
        epsilon_high=rl.clip_eps_high,
        num_iterations=rl.num_policy_updates,
        learning_rate=cfg.optim.learning_rate,
        lr_scheduler_type=cfg.optim.lr_scheduler,
        warmup_steps=0,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.max_grad_norm,
        max_steps=p["steps"],
        logging_steps=1,
        save_strategy="steps",
        save_steps=p["eval_every"],
        save_only_model=True,
        report_to="none",
        seed=p["seed"],
        use_cpu=True,
        activation_checkpointing=False,
        model_init_kwargs={"dtype": torch.float32},
        dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(
        model=p["sft_model"],
        reward_funcs=[trl_gsm8k_reward("strict")],
        args=args,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(p["sft_model"]),
        callbacks=[Rewards()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    trainer.save_model(str(out / f"checkpoint-{p['steps']}"))  # the end, as moepost evals it
    acc = {}
    for step in sorted({*range(p["eval_every"], p["steps"] + 1, p["eval_every"]), p["steps"]}):
        acc[step] = _evaluate(p, out / f"checkpoint-{step}", out / f"eval-{step}")
        shutil.rmtree(out / f"checkpoint-{step}")  # scored: its weights are not needed again
    return {"reward": rewards, "accuracy": acc}


CHILDREN = {"prepare": prepare, "moepost": moepost_side, "trl": trl_side}


# ---------------------------------------------------------------- tables


def curve(side: dict[str, Any], sft_accuracy: float, every: int, steps: int) -> list[dict]:
    """Per `every` steps: held-out accuracy at its end, mean training reward over its steps."""
    reward = {int(k): v for k, v in side["reward"].items()}
    acc = {int(k): v for k, v in side["accuracy"].items()}
    out = [{"step": 0, "accuracy": sft_accuracy, "reward": float("nan")}]
    for end in sorted({*range(every, steps + 1, every), steps}):
        window = [v for s, v in reward.items() if end - every < s <= end]
        mean = sum(window) / len(window) if window else float("nan")
        out.append({"step": end, "accuracy": acc.get(end, float("nan")), "reward": mean})
    return out


def curve_table(curves: dict[str, list[dict]], title: str) -> str:
    a, b = curves["moepost"], curves["trl"]
    rows = [
        [x["step"], _pct(x["accuracy"]), _pct(y["accuracy"]), fmt(x["reward"]), fmt(y["reward"])]
        for x, y in zip(a, b)
    ]
    head = ["step", "held-out acc moepost", "held-out acc TRL", "reward moepost", "reward TRL"]
    return f"{title}\n" + markdown_table(head, rows)


def _pct(v: float) -> str:
    return "n/a" if v != v else f"{100 * v:.1f}%"


def median_curves(per_seed: list[dict[str, list[dict]]]) -> dict[str, list[dict]]:
    """Point by point, the median over seeds of accuracy and of windowed reward."""
    out: dict[str, list[dict]] = {}
    for side in ("moepost", "trl"):
        columns = zip(*(c[side] for c in per_seed))
        out[side] = [
            {
                "step": col[0]["step"],
                "accuracy": median([x["accuracy"] for x in col]),
                "reward": median([x["reward"] for x in col]),
            }
            for col in columns
        ]
    return out


# ---------------------------------------------------------------- driver


def run_seed(seed: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    here = work / f"seed{seed}"
    shutil.rmtree(here, ignore_errors=True)  # this benchmark's own scratch folder
    base = {"seed": seed, "dry": args.dry, "threads": args.threads}
    prep = run_child(SCRIPT, "prepare", {**base, "out": str(here)}, here / "logs").result
    p = {**base, **prep, "steps": args.steps, "eval_every": args.eval_every, "out": str(here)}
    sides = {}
    for name in ("moepost", "trl"):
        res = run_child(SCRIPT, name, p, here / "logs", timeout_s=args.timeout)
        sides[name] = res.result
        print(f"  seed {seed} {name}: {res.wall_s:.0f} s, peak RSS {res.peak_rss_mb:.0f} MB")
    curves = {
        n: curve(s, prep["sft_accuracy"], args.eval_every, args.steps) for n, s in sides.items()
    }
    print(curve_table(curves, f"seed {seed} (SFT held-out accuracy {_pct(prep['sft_accuracy'])})"))
    return {"seed": seed, "sft_accuracy": prep["sft_accuracy"], "curves": curves}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="GSPO steps (300; --dry: 4)")
    parser.add_argument("--eval-every", type=int, default=None, help="(10; --dry: 2)")
    parser.add_argument("--dry", action="store_true", help="quickstart fast data/SFT, tiny GSPO")
    parser.add_argument("--threads", default="auto", help="torch threads per job")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per side")
    parser.add_argument("--json", type=Path, default=None, help="write the curves here")
    args = parser.parse_args(argv)
    args.steps = args.steps or (4 if args.dry else 300)
    args.eval_every = args.eval_every or (2 if args.dry else 10)
    if args.steps < 1 or args.eval_every < 1:
        parser.error("--steps and --eval-every must be positive")
    args.threads = resolve_threads(args.threads)
    machine = machine_line(args.threads)
    print(machine)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    work = CACHE / "work" / ("learning_dry" if args.dry else "learning")
    seeds = [run_seed(s, args, work) for s in args.seeds]
    medians = median_curves([s["curves"] for s in seeds])
    print(curve_table(medians, f"median over seeds {' '.join(map(str, args.seeds))}"))
    if args.json:
        report = {
            "date": date,
            "machine": machine.replace("\n", " "),
            "command": shlex.join(["python", "bench/learning_vs_trl.py", *(argv or sys.argv[1:])]),
            "steps": args.steps,
            "eval_every": args.eval_every,
            "seeds": seeds,
            "median": medians,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if not child_entry(CHILDREN):
        sys.exit(main())
