"""Run the CPU benchmarks (GSPO vs TRL, SFT vs TRL, MoE layer backends) and print one summary.

Figures only: nothing here passes or fails on a time. Each measured job runs in its own process;
moepost and TRL runs alternate. On a shared machine the spread columns and the load / steal
figures printed per run say how much to trust a ratio.

    python bench/run_all.py            # ~3 alternating runs each (make bench)
    python bench/run_all.py --quick    # 2 runs each, fewer steps
    python bench/run_all.py --json results.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import moe_layer, rl_vs_trl, sft_vs_trl  # noqa: E402
from bench.common import (  # noqa: E402
    bench_parser,
    machine_line,
    markdown_table,
    ratio,
    resolve_threads,
)


def summary(rl: dict[str, Any], sft: dict[str, Any], layer: dict[str, Any]) -> str:
    rows: list[list[Any]] = []
    for label, res, keys in (
        ("GSPO", rl, ("step_s", "best_step_s", "tokens_per_s", "peak_rss_mb")),
        ("SFT", sft, ("step_s", "best_step_s", "tokens_per_s", "peak_rss_mb", "final_loss")),
    ):
        a, b = res["figures"]["moepost"]["median"], res["figures"]["trl"]["median"]
        for key in keys:
            rows.append([f"{label} {key}", a[key], b[key], ratio(a[key], b[key])])
    by_impl = {r["impl"]: r for r in layer["results"]}
    eager = by_impl.get("eager", {}).get("sizes", [])
    for impl in ("grouped_mm", "moepost_grouped", "batched_mm"):
        for i, size in enumerate(by_impl.get(impl, {}).get("sizes", [])):
            base = eager[i] if i < len(eager) else {}
            label = f"MoE layer {impl} vs eager, {size['tokens']} tok"
            if "skipped" in size or "skipped" in base:
                rows.append([f"{label} fwd+bwd tok/s", "-", "-", "skipped"])
                continue
            mine, ref = size["tokens"] / size["fwd_bwd_s"], size["tokens"] / base["fwd_bwd_s"]
            rows.append([f"{label} fwd+bwd tok/s", mine, ref, ratio(mine, ref)])
    return markdown_table(["figure (median)", "moepost / impl", "TRL / eager", "ratio"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(__doc__, "2 runs each and fewer steps", runs=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every figure here")
    args = parser.parse_args(argv)
    args.threads = resolve_threads(args.threads)
    runs = args.runs or (2 if args.quick else 3)
    t0 = time.perf_counter()
    print(machine_line(args.threads), flush=True)
    print("\n## GSPO: moepost vs TRL", flush=True)
    rl = rl_vs_trl.run(runs, args.quick, threads=args.threads, before=args.before)
    print("\n## SFT: moepost vs TRL", flush=True)
    sft = sft_vs_trl.run(runs, args.quick, threads=args.threads, before=args.before)
    print("\n## MoE layer: experts backends", flush=True)
    layer = moe_layer.run(args.quick, threads=args.threads)
    print(f"\n## Summary ({time.perf_counter() - t0:.0f} s in all)")
    print(summary(rl, sft, layer))
    if args.json:
        args.json.write_text(json.dumps({"rl": rl, "sft": sft, "moe_layer": layer}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
