"""Shared benchmark plumbing: the cached bench model, deterministic data, child processes, tables.

Every measured job runs in its own Python process (started by `run_child`) so that its peak RSS
is that job's alone (`os.wait4` returns the rusage of exactly that child) and one framework's
caches, threads and allocator state never leak into the other's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MOEPOST_BENCH_CACHE", REPO / "bench" / ".cache"))
NUM_THREADS = 2

# Children must never reach the network, print progress bars, or oversubscribe the 2 cores.
CHILD_ENV = {
    "OMP_NUM_THREADS": str(NUM_THREADS),
    "MKL_NUM_THREADS": str(NUM_THREADS),
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TQDM_DISABLE": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
    "PYTHONWARNINGS": "ignore",
    "WANDB_DISABLED": "true",
}


# ---------------------------------------------------------------- child processes


@dataclass
class ChildResult:
    """What one measured child process returned, plus the OS's view of it."""

    result: dict[str, Any]
    peak_rss_mb: float  # ru_maxrss of this child (Linux reports KiB)
    wall_s: float
    cpu_s: float  # user + system CPU seconds of this child
    log_path: Path
    load1: float  # 1-minute load average when the child started (other jobs on the machine)
    steal_pct: float  # share of all CPU time the hypervisor gave to others while it ran


def run_child(
    script: Path, func: str, payload: dict[str, Any], workdir: Path, timeout_s: float = 900.0
) -> ChildResult:
    """Run `func(payload) -> dict` of `script` in a fresh interpreter and collect its result.

    The child is `python script --child func spec.json`; its stdout/stderr go to a log file
    (shown on failure). Raises RuntimeError when the child fails or times out.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stamp = f"{func}_{time.time_ns()}"
    spec = workdir / f"{stamp}.spec.json"
    result_path = workdir / f"{stamp}.result.json"
    log_path = workdir / f"{stamp}.log"
    spec.write_text(json.dumps({"payload": payload, "result_path": str(result_path)}))
    threads = str(payload.get("threads", NUM_THREADS))
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    load1 = os.getloadavg()[0]
    stat0 = _cpu_ticks()
    t0 = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--child", func, str(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(workdir),
            env=env,
        )
        try:
            status, usage = _wait(proc.pid, timeout_s)
        except BaseException:  # Ctrl-C or an error here: never leave the child running
            proc.kill()
            os.wait4(proc.pid, 0)
            raise
    wall = time.perf_counter() - t0
    stat1 = _cpu_ticks()
    code = os.waitstatus_to_exitcode(status) if status is not None else None
    if code != 0 or not result_path.is_file():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        why = "timed out" if code is None else f"exit code {code}"
        raise RuntimeError(f"{script.name}:{func} {why}; log {log_path}:\n{tail}")
    return ChildResult(
        result=json.loads(result_path.read_text()),
        peak_rss_mb=usage.ru_maxrss / 1024.0,
        wall_s=wall,
        cpu_s=usage.ru_utime + usage.ru_stime,
        log_path=log_path,
        load1=load1,
        steal_pct=_steal_pct(stat0, stat1),
    )


def _cpu_ticks() -> list[int]:
    """The aggregate 'cpu' line of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        with open("/proc/stat") as f:
            return [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def _steal_pct(before: list[int], after: list[int]) -> float:
    if len(before) < 8 or len(after) < 8:
        return float("nan")
    total = sum(after[:8]) - sum(before[:8])
    return 100.0 * (after[7] - before[7]) / total if total > 0 else float("nan")


def _wait(pid: int, timeout_s: float) -> tuple[int | None, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done == pid:
            return status, usage
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # our own child only
            _, _, usage = os.wait4(pid, 0)
            return None, usage
        time.sleep(0.1)


def peak_gpu_mb() -> float | None:
    """Peak CUDA memory allocated by this process (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def child_entry(functions: dict[str, Callable[[dict[str, Any]], dict[str, Any]]]) -> bool:
    """Handle `--child func spec.json` in a bench script's `__main__`; False when not a child."""
    if len(sys.argv) != 4 or sys.argv[1] != "--child":
        return False
    spec = json.loads(Path(sys.argv[3]).read_text())
    import torch

    torch.set_num_threads(int(spec["payload"].get("threads", NUM_THREADS)))
    out = functions[sys.argv[2]](spec["payload"])
    Path(spec["result_path"]).write_text(json.dumps(out))
    return True


def alternate(
    jobs: dict[str, Callable[[int], ChildResult]], runs: int, say: Callable[[str], None] = print
) -> dict[str, list[ChildResult]]:
    """Run the jobs A B A B ... `runs` times each; returns each job's results in run order.

    Alternating spreads any slow phase of a shared machine over both sides instead of one.
    """
    out: dict[str, list[ChildResult]] = {name: [] for name in jobs}
    for i in range(runs):
        for name, job in jobs.items():
            res = job(i)
            out[name].append(res)
            say(
                f"  {name} run {i + 1}/{runs}: {res.wall_s:.1f} s, peak RSS "
                f"{res.peak_rss_mb:.0f} MB, load {res.load1:.1f}, steal {res.steal_pct:.0f}%"
            )
    return out


# ---------------------------------------------------------------- statistics and tables


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def spread(values: Sequence[float]) -> str:
    """'min-max' of the values, for showing run-to-run noise next to a median."""
    vals = [v for v in values if v == v]
    if not vals:
        return "-"
    return f"{fmt(min(vals))}-{fmt(max(vals))}"


def fmt(value: Any, digits: int = 3) -> str:
    """Compact figure: 3 significant digits, thousands as 12.3k."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    v = float(value)
    if v != v:
        return "n/a"
    if abs(v) >= 10_000:
        return f"{v / 1000:.1f}k"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def ratio(a: float, b: float) -> str:
    """a / b as 'x.xx' (n/a when either side is missing or zero, e.g. a reward of 0)."""
    if not (a == a and b == b) or a == 0 or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def resolve_threads(value: str | int) -> int:
    """'auto': NUM_THREADS on a quiet machine, 1 when other work already holds the cores.

    Both frameworks always get the same count; 'auto' only keeps a busy shared machine from
    turning every OpenMP barrier into a scheduler wait (see `load_warning`).
    """
    if str(value) != "auto":
        return max(1, int(value))
    return NUM_THREADS if load_warning(NUM_THREADS) is None else 1


def load_warning(threads: int = NUM_THREADS) -> str | None:
    """A warning when other work already occupies the cores the jobs' threads need.

    With more runnable threads than cores, every OpenMP region of a multi-threaded torch op waits
    for its descheduled sibling, so step times grow far more than the load ratio (measured here:
    25x at load 4 on 2 cores with 2 threads, 2x with 1 thread).
    """
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load + threads <= cores + 0.5:
        return None
    if threads == 1:
        return (
            f"note: load average {load:.1f} on {cores} cores; 1-thread jobs share a core now and "
            "then, so absolute times are inflated (ratios between alternating runs hold better)"
        )
    return (
        f"WARNING: load average {load:.1f} on {cores} cores before starting {threads}-thread jobs; "
        "times will mostly measure the scheduler (use --threads 1, or a quiet machine)"
    )


def machine_line(threads: int = NUM_THREADS) -> str:
    """One line naming the machine and the library versions the figures were taken with."""
    import torch
    import transformers

    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    warning = load_warning(threads)
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {mem_gb:.0f} GiB RAM, {gpu}; "
        f"load avg {load:.1f} at start; python {platform.python_version()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, trl {trl_v}; "
        f"{threads} torch thread(s) per job" + (f"\n{warning}" if warning else "")
    )


# ---------------------------------------------------------------- the `--before` side

BEFORE = "moepost_before"
BEFORE_HELP = (
    "also run moepost with its latest optimisation for this job switched off, as a third "
    "alternating side (GSPO: rl.shared_prefix=false; SFT: transformers' grouped_mm experts)"
)


def before_head(label: str) -> list[str]:
    """Table heads of the `--before` columns; `label` says what that side switches off."""
    return [f"moepost, {label}", "moepost/that"]


def side_jobs(
    script: Path, p: dict[str, Any], workdir: Path, before: dict[str, Any] | None
) -> dict[str, Callable[[int], ChildResult]]:
    """The alternating sides of a moepost-vs-TRL benchmark, run i of each in its own folder;
    with `before` (payload changes), also moepost without its latest optimisation."""
    jobs = {
        "moepost": lambda i: run_child(script, "moepost", p, workdir / f"moepost_{i}"),
        "trl": lambda i: run_child(script, "trl", p, workdir / f"trl_{i}"),
    }
    if before is not None:
        old = {**p, **before}
        jobs[BEFORE] = lambda i: run_child(script, "moepost", old, workdir / f"before_{i}")
    return jobs


def aggregate(
    runs: list[ChildResult], figures: Callable[[ChildResult], dict[str, float]]
) -> dict[str, Any]:
    """Median over runs of each per-run figure, plus each figure's per-run values."""
    per_run = [figures(r) for r in runs]
    keys = per_run[0].keys()
    return {
        "median": {k: median([f[k] for f in per_run]) for k in keys},
        "runs": {k: [f[k] for f in per_run] for k in keys},
    }


def bench_parser(
    doc: str, quick_help: str, *, runs: int | None = 3, before: bool = True
) -> argparse.ArgumentParser:
    """--runs, --quick, --threads and (with `before`) --before, as every benchmark reads them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs, help="alternating runs per side")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument(
        "--threads",
        default="auto",
        help=f"torch threads per job (default auto: {NUM_THREADS}, or 1 on a busy machine)",
    )
    if before:
        parser.add_argument("--before", action="store_true", help=BEFORE_HELP)
    return parser


def parse_side_args(
    doc: str, quick_help: str, argv: list[str] | None, *, before: bool = True
) -> argparse.Namespace:
    """The command line of one benchmark (threads resolved, machine line printed)."""
    args = bench_parser(doc, quick_help, before=before).parse_args(argv)
    args.threads = resolve_threads(args.threads)
    print(machine_line(args.threads))
    return args


def before_cells(agg: dict[str, dict[str, Any]], key: str) -> list[Any]:
    """The `--before` columns of one table row (none when that side did not run)."""
    if BEFORE not in agg:
        return []
    mc = agg[BEFORE]["median"][key]
    return [mc, ratio(agg["moepost"]["median"][key], mc)]
