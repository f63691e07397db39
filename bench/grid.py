"""A grid of moepost-vs-TRL points: GSPO at several batch / group / length sizes, SFT at several
sequence lengths and two vocabularies (project issue 16).

RL points `rl:PxGxN`: P prompts per step x G completions each, at most N new tokens, on the
bench model (`bench/workload.py`, char-level tokenizer). TRL runs `GRPOTrainer` with
`importance_sampling_level="sequence"` (GSPO), configured as in `bench/rl_vs_trl.py`.
SFT points `sft:L:TOK`: max length L, batch 16, on the bench model with TOK = `char` (its
97-character tokenizer) or `v152k` (the same body with a 151,936-entry vocabulary and a BPE
tokenizer built here, see `big_vocab_model`). Conversations have enough turns to fill L tokens.

moepost runs with its user defaults for everything the grid does not set: micro-batches of
the default token budget (`config.schema.DEFAULT_MICRO_BATCH_TOKENS`, what a config without
micro-batch keys gets), final save and report on. TRL runs micro-batches of 8 rows
(its own default), gradient accumulation for the rest, and saves the final model too, so the
whole-process times cover the same work. Per point, runs alternate moepost, TRL, ... (`--runs`),
each in its own process; the first step of a run is warm-up and left out of the step medians.

    python bench/grid.py --points rl:2x4x32,sft:128:char --runs 3 --markdown
    python bench/grid.py --points 'rl:*x*x32' --json grid.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import rl_vs_trl, sft_vs_trl  # noqa: E402
from bench.common import (  # noqa: E402
    CACHE,
    ChildResult,
    aggregate,
    alternate,
    child_entry,
    machine_line,
    markdown_table,
    median,
    resolve_threads,
    run_child,
)
from bench.workload import bench_model, big_vocab_model, chat_file, gsm8k_file  # noqa: E402

SCRIPT = Path(__file__).resolve()
TOKENIZERS = ("char", "v152k")
RL_PROMPTS, RL_GROUPS, RL_NEW_TOKENS = (2, 8, 16), (4, 8, 16), (32, 128, 256)
SFT_LENGTHS = (128, 512, 2048)
SFT_BATCH = 16
TRL_MICRO_BATCH = 8  # TRL's per_device_train_batch_size default
WARMUP = 1  # steps per run left out of the step-time medians


@dataclass(frozen=True)
class Point:
    """One grid point; `rl` uses prompts / group / new_tokens, `sft` max_length / tokenizer."""

    kind: str
    prompts: int = 0
    group: int = 0
    new_tokens: int = 0
    max_length: int = 0
    tokenizer: str = "char"

    @property
    def id(self) -> str:
        if self.kind == "rl":
            return f"rl:{self.prompts}x{self.group}x{self.new_tokens}"
        return f"sft:{self.max_length}:{self.tokenizer}"


GRID: tuple[Point, ...] = tuple(
    Point("rl", prompts=p, group=g, new_tokens=n)
    for p in RL_PROMPTS
    for g in RL_GROUPS
    for n in RL_NEW_TOKENS
) + tuple(Point("sft", max_length=n, tokenizer=t) for t in TOKENIZERS for n in SFT_LENGTHS)


def _exact_point(item: str) -> Point | None:
    """`rl:PxGxN` or `sft:L:TOK` with concrete values (off-grid sizes allowed), else None."""
    parts = item.split(":")
    try:
        if parts[0] == "rl" and len(parts) == 2:
            p, g, n = (int(x) for x in parts[1].split("x"))
            if min(p, g, n) >= 1:
                return Point("rl", prompts=p, group=g, new_tokens=n)
        if parts[0] == "sft" and len(parts) == 3 and parts[2] in TOKENIZERS:
            length = int(parts[1])
            if length >= 16:
                return Point("sft", max_length=length, tokenizer=parts[2])
    except ValueError:
        return None
    return None


def parse_points(spec: str | None) -> list[Point]:
    """The points a `--points` filter selects, item by item (grid order within one), no repeats.

    Items are comma-separated: `rl` / `sft` (every point of that kind), a glob over point ids
    (`rl:*x8x32`, `sft:*:char`), or a concrete id (`rl:2x8x32`, `sft:128:v152k`), which may lie
    off the grid. None or "" selects the whole grid. An item that selects nothing is an error.
    """
    if not spec:
        return list(GRID)
    chosen: list[Point] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        pattern = f"{item}:*" if item in ("rl", "sft") else item
        hits = [p for p in GRID if fnmatch.fnmatchcase(p.id, pattern)]
        exact = _exact_point(item) if not hits else None
        if exact is not None:
            hits = [exact]
        if not hits:
            raise ValueError(
                f"--points item {item!r} selects no point; use rl:PxGxN, sft:L:TOK with TOK in "
                f"{'/'.join(TOKENIZERS)}, globs over those, or rl / sft"
            )
        chosen += [p for p in hits if p not in chosen]
    return chosen


# ---------------------------------------------------------------- inputs


def model_for(point: Point) -> Path:
    return big_vocab_model() if point.tokenizer == "v152k" else bench_model()


def sft_turns(model_dir: Path, max_length: int) -> int:
    """User/assistant turns per conversation so that rows reach `max_length` tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = json.loads(chat_file(n=8, turns=4).read_text().splitlines()[0])["messages"]
    per_turn = len(tok.apply_chat_template(rows, tokenize=True, return_dict=True)["input_ids"]) / 4
    return max(1, math.ceil(max_length / per_turn))


# ---------------------------------------------------------------- children


def _save_after_train(cls: Any) -> None:
    """Make `cls.train` save the final model, as moepost's `logging.save_final` does."""
    original = cls.train

    def train(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        self.save_model()  # to args.output_dir
        return out

    cls.train = train


def trl_rl(p: dict[str, Any]) -> dict[str, Any]:
    # the clock starts before TRL's imports, as moepost's job times its own: first_step_s
    p = {**p, "t_start": time.perf_counter()}
    import trl

    _save_after_train(trl.GRPOTrainer)
    return rl_vs_trl.trl_job(p)


def trl_sft(p: dict[str, Any]) -> dict[str, Any]:
    p = {**p, "t_start": time.perf_counter()}  # before TRL's imports (see trl_rl)
    import trl

    _save_after_train(trl.SFTTrainer)
    return sft_vs_trl.trl_job(p)


CHILDREN = {
    "moepost_rl": rl_vs_trl.moepost_job,
    "trl_rl": trl_rl,
    "moepost_sft": sft_vs_trl.moepost_job,
    "trl_sft": trl_sft,
}


def payloads(point: Point, steps: int, threads: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(moepost payload, TRL payload) of one point."""
    from moepost.config.schema import DEFAULT_MICRO_BATCH_TOKENS, LoggingConfig

    model_dir = model_for(point)
    # moepost's user defaults: the rl/sft jobs pin save_final off and a micro-batch size, so
    # hand them back the defaults (the overrides come last on their command lines).
    defaults = [f"logging.save_final={str(LoggingConfig().save_final).lower()}"]
    micro = DEFAULT_MICRO_BATCH_TOKENS  # what a config that sets no micro-batch key gets
    common: dict[str, Any] = {
        "steps": steps,
        "seed": 42,
        "device": "cpu",
        "dtype": "float32",
        "threads": threads,
        "model_dir": str(model_dir),
    }
    if point.kind == "rl":
        rows = point.prompts * point.group
        p = {
            **rl_vs_trl.settings(),
            **common,
            "prompts_per_step": point.prompts,
            "group_size": point.group,
            "max_new_tokens": point.new_tokens,
            "data_file": str(gsm8k_file()),
        }
        trl = {**p, "micro_batch_size": math.gcd(TRL_MICRO_BATCH, rows)}  # must split rows
        return {**p, "micro_batch_tokens": micro, "overrides": defaults}, trl
    turns = sft_turns(model_dir, point.max_length)
    p = {
        **sft_vs_trl.settings(),
        **common,
        "batch_size": SFT_BATCH,
        "max_length": point.max_length,
        "data_file": str(chat_file(n=max(64, steps * SFT_BATCH), turns=turns)),
    }
    return {**p, "micro_batch_tokens": micro, "overrides": defaults}, {
        **p,
        "micro_batch_size": TRL_MICRO_BATCH,
    }


# ---------------------------------------------------------------- one point


def run_figures(res: ChildResult) -> dict[str, float]:
    """Steady-state and whole-process figures of one run."""
    all_steps = res.result["steps"]
    steps = all_steps[WARMUP:]
    if not steps:
        raise RuntimeError(f"run {res.log_path} logged no step after the warm-up")
    total = sum(s["interval_s"] for s in steps)
    return {
        "step_s": median([s["interval_s"] for s in steps]),
        "tokens_per_s": sum(s["tokens"] for s in steps) / total,
        "process_s": res.wall_s,  # fork to exit: imports, load, every step, final save, report
        "first_step_s": all_steps[0]["interval_s"],  # process start-up + first step
        "peak_rss_mb": res.peak_rss_mb,
        "load1": res.load1,
    }


FIGURES = ("step_s", "process_s", "tokens_per_s", "peak_rss_mb")
HIGHER_IS_BETTER = ("tokens_per_s",)


def _advantage(key: str, ours: float, theirs: float) -> float:
    """moepost's advantage, > 1 when moepost is better: TRL/moepost for times and memory,
    moepost/TRL for tokens/s; NaN when a side has no figure."""
    num, den = (ours, theirs) if key in HIGHER_IS_BETTER else (theirs, ours)
    return num / den if den and den == den else float("nan")


def run_point(
    point: Point, runs: int, steps: int, threads: int, workdir: Path, say: Any = print
) -> dict[str, Any]:
    """Both sides of one point, alternating; medians, per-run values and moepost's advantage
    per figure (`_advantage`)."""
    ours, theirs = payloads(point, steps, threads)
    kind = point.kind
    here = workdir / point.id.replace(":", "_")
    shutil.rmtree(here, ignore_errors=True)  # this point's own scratch files only
    jobs = {
        "moepost": lambda i: run_child(SCRIPT, f"moepost_{kind}", ours, here / f"moepost_{i}"),
        "trl": lambda i: run_child(SCRIPT, f"trl_{kind}", theirs, here / f"trl_{i}"),
    }
    say(f"{point.id}: {runs} alternating runs x {steps} steps")
    results = alternate(jobs, runs, say)
    agg = {name: aggregate(res, run_figures) for name, res in results.items()}
    a, b = agg["moepost"]["median"], agg["trl"]["median"]
    ratios = {k: _advantage(k, a[k], b[k]) for k in FIGURES}
    micro = {"moepost": f"{ours['micro_batch_tokens']} tokens", "trl": theirs["micro_batch_size"]}
    return {"point": point.id, **asdict(point), "micro_batches": micro, **agg, "ratio": ratios}


# ---------------------------------------------------------------- output

HEAD = [
    "point",
    "step s moepost",
    "step s TRL",
    "TRL/moepost",
    "process s moepost",
    "process s TRL",
    "TRL/moepost",
    "tok/s moepost",
    "tok/s TRL",
    "moepost/TRL",
    "RSS MB moepost",
    "RSS MB TRL",
    "TRL/moepost",
]


def table(points: list[dict[str, Any]]) -> str:
    rows = []
    for r in points:
        row: list[Any] = [r["point"]]
        for key in FIGURES:
            row += [r["moepost"]["median"][key], r["trl"]["median"][key], f"{r['ratio'][key]:.2f}x"]
        rows.append(row)
    return markdown_table(HEAD, rows)


def markdown(report: dict[str, Any]) -> str:
    """The table with what a reader needs to trust it: when, where, versions, command."""
    return "\n".join(
        [
            f"{report['date']}; {report['machine']}",
            f"Command: `{report['command']}`",
            f"{report['runs']} alternating runs per side, {report['steps']} steps per run, "
            f"first step left out of the step medians; medians over runs. Micro-batches: moepost "
            f"its default ({report['points'][0]['micro_batches']['moepost']}), TRL "
            f"{TRL_MICRO_BATCH} rows (fewer when a step has fewer) with gradient accumulation.",
            "",
            table(report["points"]),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", default="", help="filter, e.g. rl:2x8x32,sft:128:char")
    parser.add_argument("--runs", type=int, default=None, help="alternating runs per side (3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run (4)")
    parser.add_argument("--quick", action="store_true", help="2 steps and 1 run per side")
    parser.add_argument(
        "--threads", default="auto", help="torch threads per job (auto: 2, or 1 when busy)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument("--markdown", action="store_true", help="print a docs-ready table")
    args = parser.parse_args(argv)
    try:
        points = parse_points(args.points)
    except ValueError as err:
        parser.error(str(err))
    runs = args.runs or (1 if args.quick else 3)
    steps = args.steps or (2 if args.quick else 4)
    if steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up step")
    threads = resolve_threads(args.threads)
    machine = machine_line(threads)
    print(machine)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    workdir = CACHE / "work" / "grid"
    done = [run_point(p, runs, steps, threads, workdir) for p in points]
    report = {
        "date": date,
        "machine": machine.replace("\n", " "),
        "command": shlex.join(
            ["python", "bench/grid.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "runs": runs,
        "steps": steps,
        "threads": threads,
        "points": done,
    }
    print(table(done))
    if args.markdown:
        print("\n" + markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if not child_entry(CHILDREN):
        sys.exit(main())
