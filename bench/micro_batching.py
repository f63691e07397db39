"""SFT on rows of uneven length: micro-batches of a fixed row count against a token budget.

Same model, data (1-5 turn conversations, 100-500 tokens), batch, max length and lr; only
`train.micro_batch_size` vs `train.micro_batch_tokens` differs. The loss is normalised over the
whole step, so both sides log the same first-step loss; later steps differ only through the
router aux loss, which is computed per micro-batch. The budget changes how much padding the
forwards carry. Figures, not
pass/fail.

    python bench/micro_batching.py [--runs 3] [--quick] [--threads 2]
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import sft_vs_trl  # noqa: E402
from bench.common import (  # noqa: E402
    CACHE,
    NUM_THREADS,
    aggregate,
    alternate,
    child_entry,
    markdown_table,
    parse_side_args,
    ratio,
    run_child,
    spread,
)
from bench.workload import bench_model, mixed_chat_file  # noqa: E402

SCRIPT = Path(__file__).resolve()
ROWS = 4  # rows per micro-batch on the fixed side
MAX_LENGTH = 512


def sides() -> dict[str, list[str]]:
    """Overrides of each side. The budget equals the fixed side's worst case (ROWS rows at
    MAX_LENGTH), so neither side may hold more activations than the other."""
    return {
        "rows": [f"train.micro_batch_size={ROWS}"],
        "token budget": [f"train.micro_batch_tokens={ROWS * MAX_LENGTH}"],
    }


def run(
    runs: int = 3, quick: bool = False, say: Any = print, threads: int = NUM_THREADS
) -> dict[str, Any]:
    p = {**sft_vs_trl.settings(quick), "threads": threads, "max_length": MAX_LENGTH}
    p.update(model_dir=str(bench_model()), data_file=str(mixed_chat_file()))
    workdir = CACHE / "work" / "micro_batching"
    shutil.rmtree(workdir, ignore_errors=True)
    say(
        f"SFT micro-batching: batch {p['batch_size']}, max length {MAX_LENGTH}, rows of 1-5 turns; "
        f"{ROWS} rows per micro-batch vs a budget of {ROWS * MAX_LENGTH} padded tokens"
    )
    jobs = {
        name: (lambda i, o=o, n=name: run_child(
            SCRIPT, "moepost", {**p, "overrides": o}, workdir / f"{n.replace(' ', '_')}_{i}"
        ))
        for name, o in sides().items()
    }  # fmt: skip
    results = alternate(jobs, runs, say)
    agg = {
        name: aggregate(res, lambda r: sft_vs_trl.run_figures(r, p["warmup"]))
        for name, res in results.items()
    }
    losses = {name: [s["loss"] for s in res[0].result["steps"]] for name, res in results.items()}
    gaps = [abs(a - b) for a, b in zip(losses["rows"], losses["token budget"], strict=True)]
    a, b = agg["token budget"], agg["rows"]
    rows = []
    for key, label in (
        ("step_s", "step time, s (median)"),
        ("tokens_per_s", "real tokens/s"),
        ("peak_rss_mb", "peak RSS, MB"),
        ("final_loss", f"loss at step {p['steps']}"),
    ):
        ma, mb = a["median"][key], b["median"][key]
        rows.append([label, ma, mb, ratio(ma, mb), spread(a["runs"][key]), spread(b["runs"][key])])
    head = ["SFT step", "token budget", "rows", "budget/rows", "budget runs", "rows runs"]
    text = (
        f"{runs} alternating runs each, {p['steps']} steps, first {p['warmup']} left out\n"
        + markdown_table(head, rows)
        + f"\nloss difference (run 1 of each): {gaps[0]:.1e} at step 1, at most {max(gaps):.1e}"
        " (later steps differ by the router aux loss, which is per micro-batch)"
    )
    say(text)
    return {"settings": p, "figures": agg, "loss_gaps": gaps, "table": text}


def main(argv: list[str] | None = None) -> int:
    args = parse_side_args(__doc__, "5 steps per run instead of 10", argv, before=False)
    run(args.runs, args.quick, threads=args.threads)
    return 0


if __name__ == "__main__":
    if not child_entry({"moepost": sft_vs_trl.moepost_job}):
        sys.exit(main())
