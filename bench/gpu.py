"""GPU scale: the MoE layer, SFT and GSPO benchmarks on a ~1 B-parameter Qwen3-MoE in bf16, with MFU.

MFU = achieved model FLOP/s / the device's bf16 matmul rate measured here with a large
`torch.matmul` (not the data-sheet peak). Model FLOPs per token count the active parameters
(attention, router, top_k experts, LM head; the embedding lookup is free):
  training (fwd+bwd)  6 N_active + 6 L d_attn T      (causal attention, mean context T/2)
  forward only        2 N_active + 2 L d_attn T
An RL step is counted as generation (fwd) + reference pass (fwd) + update (fwd+bwd) over its
prompt + completion tokens, i.e. only the useful work: a framework that skips work (shared
prompt prefill, no old-policy pass) shows a higher MFU for it.

`--dry` runs the same code at toy scale on CPU in fp32, every job in this process, in well
under a minute, and prints the same table (MFU against the CPU's fp32 matmul rate).

    python bench/gpu.py            # needs CUDA
    python bench/gpu.py --dry      # anywhere
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import moe_layer, rl_vs_trl, sft_vs_trl  # noqa: E402
from bench.common import (  # noqa: E402
    CACHE,
    NUM_THREADS,
    fmt,
    machine_line,
    markdown_table,
    median,
    run_child,
)
from bench.workload import (  # noqa: E402
    ModelSpec,
    bench_model,
    chat_file,
    gsm8k_file,
    longest_prompt_tokens,
    parameter_counts,
)

GPU_MODEL = ModelSpec(
    hidden_size=1024,
    num_layers=12,
    num_experts=64,
    top_k=8,
    moe_intermediate_size=416,  # 12 x 64 x 3 x 1024 x 416 = 981 M expert parameters
    num_heads=16,
    num_kv_heads=4,
    dtype="bfloat16",
)
DRY_MODEL = ModelSpec(
    hidden_size=64, num_layers=2, num_experts=4, top_k=2, moe_intermediate_size=32, seed=0
)


def matmul_tflops(device: str, dtype_name: str, n: int, iters: int) -> float:
    """Sustained dense matmul rate (TFLOP/s) of an n x n x n product."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        torch.matmul(a, b)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    sync()
    return 2.0 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def scale_settings(dry: bool) -> dict[str, Any]:
    if dry:
        return {
            "device": "cpu",
            "dtype": "float32",
            "spec": DRY_MODEL,
            "matmul": (512, 5),
            "sft": {"batch_size": 4, "micro_batch_size": 2, "max_length": 128, "steps": 2,
                    "warmup": 1, "turns": 1},
            "rl": {"prompts_per_step": 2, "group_size": 2, "micro_batch_size": 2,
                   "max_new_tokens": 8, "steps": 2},
        }  # fmt: skip
    return {
        "device": "cuda",
        "dtype": "bfloat16",
        "spec": GPU_MODEL,
        "matmul": (8192, 50),
        "sft": {"batch_size": 16, "micro_batch_size": 8, "max_length": 1024, "steps": 8,
                "warmup": 2, "turns": 16},
        "rl": {"prompts_per_step": 8, "group_size": 8, "micro_batch_size": 16,
               "max_new_tokens": 256, "steps": 4},
    }  # fmt: skip


def model_flops(counts: dict[str, int], cfg: Any) -> Callable[[float, float], float]:
    """flops(tokens, mean_seq_len) for one forward; multiply by 3 for forward + backward."""
    n = counts["active"] - counts["embedding"]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    layers = cfg.num_hidden_layers
    return lambda tokens, seq_len: tokens * (2.0 * n + 2.0 * layers * d_attn * seq_len)


class Runner:
    """Runs a job in a child process (GPU) or in this process (dry) and returns its result."""

    def __init__(self, in_process: bool, workdir: Path) -> None:
        self.in_process, self.workdir = in_process, workdir

    def __call__(self, script: Path, name: str, fn: Callable, p: dict[str, Any]) -> dict:
        out_dir = self.workdir / name
        out_dir.mkdir(parents=True, exist_ok=True)
        p = {**p, "out_dir": str(out_dir)}
        if self.in_process:
            import contextlib
            import resource

            with (out_dir / "job.log").open("w") as log:  # keep the table readable
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    result = fn(p)
            result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            return result
        res = run_child(script, fn.__name__.replace("_job", ""), p, out_dir)
        return {**res.result, "peak_rss_mb": res.peak_rss_mb}


def memory(result: dict[str, Any]) -> str:
    gpu = result.get("peak_gpu_mb")
    return f"{gpu:.0f} GPU" if gpu else f"{result['peak_rss_mb']:.0f} RSS"


def layer_rows(s: dict[str, Any], peak: float, dry: bool, run: Runner) -> list[list[Any]]:
    p = moe_layer.settings(quick=dry, device=s["device"], scale="dry" if dry else "gpu")
    p["dtype"] = s["dtype"]
    flops = moe_layer.layer_flops(p)
    rows = []
    for impl in moe_layer.registered_implementations():
        try:
            res = run(moe_layer.SCRIPT, f"layer_{impl}", moe_layer.layer_job, {**p, "impl": impl})
        except RuntimeError as err:
            res = {"sizes": [{"tokens": t, "skipped": str(err).splitlines()[-1][:80]}
                             for t in p["tokens"]], "peak_rss_mb": float("nan")}  # fmt: skip
        for size in res["sizes"]:
            name = f"MoE layer {impl}, {size['tokens']} tok"
            if "skipped" in size:
                rows.append([name, "-", "-", "-", "-", "-", size["skipped"]])
                continue
            tps = size["tokens"] / size["fwd_bwd_s"]
            tflops = 3 * flops * tps / 1e12
            rows.append([name, tps, size["fwd_bwd_s"], tflops, f"{100 * tflops / peak:.1f}%",
                         memory(res), f"fwd {size['tokens'] / size['fwd_s']:.0f} tok/s"])  # fmt: skip
    return rows


def sft_rows(s: dict[str, Any], base: dict, flops: Callable, peak: float, run: Runner) -> list:
    p = {**sft_vs_trl.settings(), **s["sft"], **base}
    p["data_file"] = str(chat_file(256, 0, turns=s["sft"]["turns"], cache=run.workdir))
    rows = []
    for name, fn in (("moepost", sft_vs_trl.moepost_job), ("TRL", sft_vs_trl.trl_job)):
        res = _guarded(run, sft_vs_trl.SCRIPT, f"sft_{name}", fn, p)
        if isinstance(res, str):
            rows.append([f"SFT {name}", "-", "-", "-", "-", "-", res])
            continue
        steps = res["steps"][p["warmup"] :] or res["steps"]
        tokens = sum(x["tokens"] for x in steps)
        wall = sum(x["interval_s"] for x in steps)
        seq = tokens / (len(steps) * p["batch_size"])  # mean real length of a row
        tflops = 3 * flops(tokens, seq) / wall / 1e12
        rows.append([f"SFT {name}", tokens / wall, median([x["interval_s"] for x in steps]),
                     tflops, f"{100 * tflops / peak:.1f}%", memory(res),
                     f"loss {res['steps'][-1]['loss']:.3f} at step {p['steps']}"])  # fmt: skip
    return rows


def rl_rows(s: dict[str, Any], base: dict, flops: Callable, peak: float, run: Runner) -> list:
    p = {**rl_vs_trl.settings(), **s["rl"], **base}
    p["data_file"] = str(gsm8k_file(cache=run.workdir))
    # as in rl_vs_trl: moepost's budget is the most a TRL micro-batch can hold
    longest = longest_prompt_tokens(Path(p["model_dir"]), Path(p["data_file"]))
    p["micro_batch_tokens"] = p["micro_batch_size"] * (longest + p["max_new_tokens"])
    rows = []
    for name, fn in (("moepost", rl_vs_trl.moepost_job), ("TRL", rl_vs_trl.trl_job)):
        res = _guarded(run, rl_vs_trl.SCRIPT, f"rl_{name}", fn, p)
        if isinstance(res, str):
            rows.append([f"GSPO {name}", "-", "-", "-", "-", "-", res])
            continue
        steps = res["steps"][1:] or res["steps"]
        tokens = sum(x["tokens"] for x in steps)
        wall = sum(x["interval_s"] for x in steps)
        seq = tokens / (len(steps) * p["prompts_per_step"] * p["group_size"])
        # generation (fwd) + reference pass (fwd) + update (fwd + bwd) = 5 forwards' worth
        tflops = 5 * flops(tokens, seq) / wall / 1e12
        gen = sum(x["gen_s"] for x in steps)
        upd = sum(x["update_s"] for x in steps)
        rows.append([f"GSPO {name}", tokens / wall, median([x["interval_s"] for x in steps]),
                     tflops, f"{100 * tflops / peak:.1f}%", memory(res),
                     f"gen {100 * gen / wall:.0f}% / update {100 * upd / wall:.0f}% of step, "
                     f"update MFU {100 * 3 * flops(tokens, seq) / upd / 1e12 / peak:.1f}%"])  # fmt: skip
    return rows


def _guarded(run: Runner, script: Path, name: str, fn: Callable, p: dict) -> dict | str:
    """The job's result, or one line saying why it could not run (TRL missing, OOM, ...)."""
    try:
        return run(script, name, fn, p)
    except (ImportError, RuntimeError) as err:
        return f"not run: {str(err).strip().splitlines()[-1][:90]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="toy scale on CPU, in-process")
    args = parser.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device; use --dry for the CPU toy run", file=sys.stderr)
        return 2
    s = scale_settings(args.dry)
    threads = 1 if args.dry else NUM_THREADS  # dry is a smoke run: one thread stays quick when busy
    if args.dry:
        torch.set_num_threads(threads)
        for key, value in (("TQDM_DISABLE", "1"), ("HF_HUB_OFFLINE", "1")):
            os.environ.setdefault(key, value)
    if not args.dry:
        CACHE.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="gpu_", dir=CACHE)) if not args.dry else None
    with tempfile.TemporaryDirectory(prefix="moepost_gpu_dry_") as tmp:
        root = workdir or Path(tmp)
        run = Runner(in_process=args.dry, workdir=root)
        # the dry model and data live in the temporary folder so `--dry` leaves nothing behind
        model_dir = bench_model(s["spec"], cache=root if args.dry else CACHE)
        counts = parameter_counts(model_dir)
        from transformers import AutoConfig

        flops = model_flops(counts, AutoConfig.from_pretrained(model_dir))
        peak = matmul_tflops(s["device"], s["dtype"], *s["matmul"])
        print(machine_line(threads))
        print(
            f"model {s['spec'].key}: {counts['total'] / 1e6:.1f} M params, "
            f"{counts['active'] / 1e6:.1f} M active; {s['dtype']} matmul "
            f"{fmt(peak)} TFLOP/s measured (the MFU denominator)"
        )
        base = {
            "model_dir": str(model_dir),
            "device": s["device"],
            "dtype": s["dtype"],
            "threads": threads,
        }
        rows = layer_rows(s, peak, args.dry, run)
        rows += sft_rows(s, base, flops, peak, run)
        rows += rl_rows(s, base, flops, peak, run)
    head = ["benchmark", "tokens/s", "step s", "TFLOP/s", "MFU", "peak MB", "note"]
    print(markdown_table(head, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
