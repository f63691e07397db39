"""One transformers v5 Qwen3-MoE sparse block, forward and forward+backward, per experts backend.

transformers v5 picks the routed-experts kernel from `config._experts_implementation` ("eager":
a Python loop over the experts hit; "grouped_mm": one `torch._grouped_mm` over tokens sorted by
expert; "batched_mm": every (token, expert) pair multiplied by a gathered copy of its expert's
weights; GPU-only kernels such as "deepgemm" / "sonicmoe"). It is set per model with
`from_pretrained(..., experts_implementation=...)` or `model.set_experts_implementation(...)`
(`model.experts_implementation` in a moepost config). Here the block is built directly from a
config so each backend sees identical weights and tokens.

Two shapes: a training / prefill micro-batch (many tokens) and a decode step (a few tokens).
batched_mm gathers [tokens x top_k, 2I, H] weight copies, so it is skipped where that would pass
a memory cap (and the row says why). Each backend runs in its own process (its peak RSS is its own).

    python bench/moe_layer.py [--quick]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (  # noqa: E402
    CACHE,
    NUM_THREADS,
    child_entry,
    machine_line,
    markdown_table,
    median,
    peak_gpu_mb,
    resolve_threads,
    run_child,
)

SCRIPT = Path(__file__).resolve()
IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm", "moepost_grouped")
# batched_mm's gathered weights (forward + their gradients) above this many GB: skipped
GATHER_CAP_GB = {"cpu": 3.0, "cuda": 20.0}


def settings(quick: bool = False, device: str = "cpu", scale: str = "cpu") -> dict[str, Any]:
    """Expert shapes: Qwen3-30B-A3B-like proportions (E=128, K=8, I=768, H=2048) scaled for CPU."""
    shapes = {
        "cpu": {"hidden": 1024, "experts": 32, "top_k": 4, "inter": 512, "tokens": [2048, 32]},
        "gpu": {"hidden": 2048, "experts": 128, "top_k": 8, "inter": 768, "tokens": [16384, 64]},
        "dry": {"hidden": 64, "experts": 8, "top_k": 2, "inter": 32, "tokens": [256, 8]},
    }[scale]
    return {
        **shapes,
        "iters": 2 if quick else 4,
        "device": device,
        "dtype": "bfloat16" if device == "cuda" else "float32",
        "seed": 0,
    }


def layer_flops(p: dict[str, Any]) -> float:
    """Forward FLOPs per token: router (2HE) + top_k experts x 3 matmuls of H x I (2 each)."""
    return 2.0 * p["hidden"] * p["experts"] + p["top_k"] * 3 * 2.0 * p["hidden"] * p["inter"]


def gathered_gb(p: dict[str, Any], tokens: int) -> float:
    """GB batched_mm materialises: selected gate_up + down weights and their gradients."""
    per_pair = 3 * p["hidden"] * p["inter"] * (2 if p["dtype"] == "bfloat16" else 4)
    return 2 * tokens * p["top_k"] * per_pair / 1e9


# ---------------------------------------------------------------- child


def build_block(p: dict[str, Any], impl: str) -> Any:
    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from moepost.components.moe import experts

    experts.register()  # moepost_grouped
    config = Qwen3MoeConfig(
        hidden_size=p["hidden"],
        num_experts=p["experts"],
        num_experts_per_tok=p["top_k"],
        moe_intermediate_size=p["inter"],
        norm_topk_prob=True,
    )
    config._experts_implementation = impl
    torch.manual_seed(p["seed"])
    block = Qwen3MoeSparseMoeBlock(config)
    # The block's parameters start as torch.empty (and a zero router, which would send every
    # token to the same experts); give them the usual N(0, 0.02) init.
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02)
    return block.to(device=p["device"], dtype=getattr(torch, p["dtype"]))


def _timed(fn: Any, iters: int, sync: Any) -> float:
    fn()  # warm-up (allocator, kernel selection)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return median(times)


def _forward(block: Any, x: Any) -> None:
    """x: [1, tokens, hidden]."""
    import torch

    with torch.no_grad():
        block(x)


def _train_pass(block: Any, x: Any) -> None:
    """Forward + backward to the weights and the input, x: [1, tokens, hidden]."""
    xg = x.detach().requires_grad_(True)
    block(xg).float().square().mean().backward()
    block.zero_grad(set_to_none=True)


def layer_job(p: dict[str, Any]) -> dict[str, Any]:
    """Time one backend at every token count; compare its output with eager's."""
    import torch

    impl = p["impl"]
    block = build_block(p, impl)
    dtype = getattr(torch, p["dtype"])
    sync = torch.cuda.synchronize if p["device"] == "cuda" else (lambda: None)
    out: dict[str, Any] = {"impl": impl, "sizes": []}
    for tokens in p["tokens"]:
        row: dict[str, Any] = {"tokens": tokens}
        if impl == "batched_mm" and gathered_gb(p, tokens) > GATHER_CAP_GB[p["device"]]:
            row["skipped"] = f"would gather {gathered_gb(p, tokens):.0f} GB of expert weights"
            out["sizes"].append(row)
            continue
        g = torch.Generator().manual_seed(tokens)
        x = torch.randn(1, tokens, p["hidden"], generator=g).to(p["device"], dtype)
        try:
            with torch.no_grad():
                y = block(x)
                block.experts.config._experts_implementation = "eager"
                ref = block(x)
                block.experts.config._experts_implementation = impl
            row["max_abs_diff_vs_eager"] = float((y.float() - ref.float()).abs().max())

            row["fwd_s"] = _timed(lambda x=x: _forward(block, x), p["iters"], sync)
            row["fwd_bwd_s"] = _timed(lambda x=x: _train_pass(block, x), p["iters"], sync)
        except Exception as err:  # an unavailable backend reports why instead of stopping the suite
            row["skipped"] = f"{type(err).__name__}: {str(err).splitlines()[0][:90]}"
        out["sizes"].append(row)
    out["peak_gpu_mb"] = peak_gpu_mb()
    return out


# ---------------------------------------------------------------- parent


def registered_implementations() -> list[str]:
    """'eager' plus every backend registered in the installed transformers' ExpertsInterface."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

        from moepost.components.moe import experts

        experts.register()

        extra = sorted(k for k in ALL_EXPERTS_FUNCTIONS.keys() if k not in IMPLEMENTATIONS)
    except ImportError:
        extra = []
    return list(IMPLEMENTATIONS) + extra


def rows_for(p: dict[str, Any], results: list[dict[str, Any]], peak: dict[str, float]) -> list:
    flops = layer_flops(p)
    rows = []
    for res in results:
        for size in res["sizes"]:
            if "skipped" in size:
                rows.append([res["impl"], size["tokens"], "-", "-", "-", "-", size["skipped"]])
                continue
            fwd_tps = size["tokens"] / size["fwd_s"]
            train_tps = size["tokens"] / size["fwd_bwd_s"]
            gflops = 3 * flops * train_tps / 1e9  # backward ~ 2x forward
            rows.append(
                [
                    res["impl"],
                    size["tokens"],
                    fwd_tps,
                    train_tps,
                    gflops,
                    peak.get(res["impl"], float("nan")),
                    f"max |diff| vs eager {size['max_abs_diff_vs_eager']:.1e}",
                ]
            )
    return rows


def run(
    quick: bool = False,
    workdir: Path | None = None,
    say: Any = print,
    device: str = "cpu",
    scale: str = "cpu",
    threads: int = NUM_THREADS,
) -> dict[str, Any]:
    p = {**settings(quick, device, scale), "threads": threads}
    workdir = workdir or CACHE / "work" / "moe_layer"
    shutil.rmtree(workdir, ignore_errors=True)  # only this benchmark's own scratch files
    say(
        f"MoE layer: Qwen3-MoE sparse block, hidden {p['hidden']}, {p['experts']} experts, "
        f"top-{p['top_k']}, moe_intermediate {p['inter']}, {p['dtype']}, "
        f"{layer_flops(p) / 1e6:.1f} MFLOP/token forward"
    )
    results, peak = [], {}
    for impl in registered_implementations():
        try:
            res = run_child(SCRIPT, "layer", {**p, "impl": impl}, workdir / impl)
            results.append(res.result)
            peak[impl] = res.peak_rss_mb
        except RuntimeError as err:
            last = str(err).strip().splitlines()[-1][:90]
            results.append(
                {"impl": impl, "sizes": [{"tokens": t, "skipped": last} for t in p["tokens"]]}
            )
    head = ["experts impl", "tokens", "fwd tok/s", "fwd+bwd tok/s", "fwd+bwd GFLOP/s",
            "peak RSS MB", "note"]  # fmt: skip
    text = markdown_table(head, rows_for(p, results, peak))
    say(text)
    return {"settings": p, "results": results, "peak_rss_mb": peak, "table": text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 timed iterations instead of 4")
    parser.add_argument(
        "--threads",
        default="auto",
        help=f"torch threads per job (default auto: {NUM_THREADS}, or 1 on a busy machine)",
    )
    args = parser.parse_args(argv)
    args.threads = resolve_threads(args.threads)
    print(machine_line(args.threads))
    run(args.quick, threads=args.threads)
    return 0


if __name__ == "__main__":
    if not child_entry({"layer": layer_job}):
        sys.exit(main())
