"""Peak memory of one SFT micro-batch forward + backward: chunked LM head vs full logits.

Each variant runs in a fresh interpreter. It builds a tiny random Qwen3-MoE with a large
vocabulary (`moepost.tools.tiny_model`), makes one row of T tokens with every position a
target, resets the process's peak RSS (`/proc/self/clear_refs`, Linux), runs
`recipes.sft.forward_loss` + backward, and reports VmHWM - VmRSS before the step in MB. Full
logits grow with T x V (the [T, V] logits, their float32 log-softmax work and their gradient);
the chunked head with T x H plus one [chunk, V] block.

    python bench/lm_head_memory.py                       # T = 2048 and 8192, V = 151936
    python bench/lm_head_memory.py --tokens 512 --vocab 32000 --variants chunked
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(tokens: int, vocab: int, hidden: int, chunk_rows: int, threads: int) -> dict:
    """One measured step in this process (call in a fresh interpreter)."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from moepost.recipes.sft import forward_loss
    from moepost.tools.tiny_model import build_tiny_model

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp) / "m", "qwen3_moe", vocab=vocab, hidden_size=hidden)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (1, tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _kb("VmRSS")
    t0 = time.perf_counter()
    loss, _ = forward_loss(model, batch, tokens - 1, chunk_rows=chunk_rows)
    loss.backward()
    seconds = time.perf_counter() - t0
    return {
        "peak_mb": (_kb("VmHWM") - before) / 1024,
        "loss": float(loss.detach()),
        "seconds": seconds,
    }


def measure(
    tokens: int, vocab: int, *, chunk_rows: int, hidden: int = 64, threads: int = 1
) -> dict:
    """`child` in a fresh interpreter; chunk_rows 0 = full logits."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    args = [str(tokens), str(vocab), str(hidden), str(chunk_rows), str(threads)]
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--chunk-rows", type=int, default=256)
    parser.add_argument("--variants", nargs="+", default=["full", "chunked"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=5, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs, "
        f"torch threads {args.threads}; V={args.vocab}, H={args.hidden}, "
        f"chunk {args.chunk_rows} rows, float32"
    )
    print("| T | variant | peak MB | loss | step s |")
    print("|---|---|---|---|---|")
    for tokens in args.tokens:
        for variant in args.variants:
            rows = 0 if variant == "full" else args.chunk_rows
            r = measure(
                tokens, args.vocab, chunk_rows=rows, hidden=args.hidden, threads=args.threads
            )
            print(
                f"| {tokens} | {variant} | {r['peak_mb']:.0f} | {r['loss']:.6f} | "
                f"{r['seconds']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
