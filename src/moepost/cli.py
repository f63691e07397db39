"""The `moepost` command (also `python -m moepost`).

Bad input (`UserError`, a full disk too) is printed as one line on stderr with exit code 2, no
traceback. A training run stopped by SIGTERM / SIGINT exits with 143 / 130 (docs/outputs.md).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

from moepost.errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML or JSON run config (or --config PATH)")
    p.add_argument(
        "overrides", nargs="*", help="dotted key=value overrides, e.g. rl.algorithm=grpo"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moepost", description=__doc__.splitlines()[0])
    # The deepspeed launcher appends --local_rank; the rank is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run the stage named in the config (sft or rl)")
    _add_config_args(p)
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint) or a path")
    p.add_argument("--eval-only", action="store_true", help="evaluate only, no optimizer")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though config keys changed since the checkpoint (they are listed)",
    )

    p = sub.add_parser("eval", help="evaluate only (same as train --eval-only)")
    _add_config_args(p)

    p = sub.add_parser("quickstart", help="the embedded default: SFT then GSPO on a tiny MoE")
    p.add_argument("--output", default="quickstart_out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps per stage (smoke test)")

    p = sub.add_parser("tiny-model", help="write a tiny random MoE checkpoint + tokenizer")
    p.add_argument("output_dir")
    p.add_argument("--arch", default="qwen3_moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)

    p = sub.add_parser("data", help="dataset utilities")
    dsub = p.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("convert", help="convert a dataset to chat-format rows")
    c.add_argument("--format", required=True, dest="fmt")
    c.add_argument("input")
    c.add_argument("output")

    p = sub.add_parser("export", help="export a run or checkpoint to a plain HF folder")
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--merge-lora", action="store_true")
    p.add_argument(
        "--max-shard-size", default="5GB", help="largest safetensors file (sharded checkpoints)"
    )

    p = sub.add_parser("report", help="plots + report.html from a run's logs")
    p.add_argument("run_dir")

    p = sub.add_parser("plan", help="memory estimate per device")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument(
        "--gpu-memory-gb", type=float, default=None, help="WARN when the peak per rank exceeds it"
    )

    p = sub.add_parser("doctor", help="pre-flight MoE checks for a config")
    _add_config_args(p)
    return parser


def _train(args: argparse.Namespace) -> int:
    from moepost.config.load import load_config
    from moepost.recipes.signals import handle_stop_signals

    cfg = load_config(args.config, args.overrides)
    eval_only = getattr(args, "eval_only", False) or args.command == "eval"
    resume: str | None = getattr(args, "resume", None)
    allow_change = bool(getattr(args, "allow_config_change", False))
    with handle_stop_signals():
        if cfg.stage == "sft":
            from moepost.recipes.sft import run_sft as run
        else:
            from moepost.recipes.rl import run_rl as run
        run(cfg, resume=resume, eval_only=eval_only, allow_config_change=allow_change)
    return 0


def _tiny_model(args: argparse.Namespace) -> int:
    from moepost.tools.tiny_model import ARCHS, build_tiny_model

    if args.arch not in ARCHS:
        raise UserError(f"--arch {args.arch}: unknown (choose from {', '.join(ARCHS)})")
    path = build_tiny_model(
        args.output_dir,
        args.arch,
        seed=args.seed,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_experts=args.num_experts,
        top_k=args.top_k,
    )
    print(f"wrote tiny {args.arch} checkpoint and tokenizer to {path}")
    return 0


def _data(args: argparse.Namespace) -> int:
    from moepost.components.data.files import FORMAT_CONVERTERS

    if args.fmt not in FORMAT_CONVERTERS:
        raise UserError(
            f"--format {args.fmt}: unknown (choose from {', '.join(FORMAT_CONVERTERS)})"
        )
    n = FORMAT_CONVERTERS[args.fmt](args.input, args.output)
    print(f"wrote {n} rows to {args.output}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from moepost.tools.export import export_model

    out = export_model(
        args.source, args.output, merge_lora=args.merge_lora, max_shard_size=args.max_shard_size
    )
    print(f"exported to {out}")
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from moepost.tools.quickstart import run_quickstart

    run_quickstart(args.output, command=main, seed=args.seed, fast=args.fast)
    return 0


def _report(args: argparse.Namespace) -> int:
    from moepost.components.training.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from moepost.tools.plan import run_plan

    return run_plan(args.config, args.overrides, gpus=args.gpus, gpu_memory_gb=args.gpu_memory_gb)


def _doctor(args: argparse.Namespace) -> int:
    from moepost.tools.doctor import run_doctor

    return run_doctor(args.config, args.overrides)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": _train,
    "eval": _train,
    "tiny-model": _tiny_model,
    "data": _data,
    "export": _export,
    "quickstart": _quickstart,
    "report": _report,
    "plan": _plan,
    "doctor": _doctor,
}


# Commands whose positional `config` may be given as `--config PATH` instead.
_CONFIG_COMMANDS = ("train", "eval", "doctor", "plan")


def _config_flag_argv(argv: list[str]) -> list[str]:
    """Rewrite the seed pipelines' `[CMD] --config PATH [...]` to `CMD PATH [...]`.

    Without a command, `--config PATH` means `train` (`--eval-only` then evaluates), which is
    how `python -m <pipeline> --config X.yaml [--eval-only]` behaves in those pipelines.
    """
    flags = [i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config=")]
    if not flags:
        return argv
    if len(flags) > 1:
        raise UserError("--config is given more than once; give one config file")
    i = flags[0]
    if argv[i] == "--config":
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            raise UserError("--config needs a path: --config PATH.yaml")
        path, rest = argv[i + 1], [*argv[:i], *argv[i + 2 :]]
    else:
        path, rest = argv[i].split("=", 1)[1], [*argv[:i], *argv[i + 1 :]]
    # Skip the launcher's leading --local_rank (deepspeed puts it first); then the command.
    pos = 0
    while pos < len(rest) and rest[pos].startswith(("--local_rank", "--local-rank")):
        pos += 1 if "=" in rest[pos] else 2
    if pos >= len(rest) or rest[pos] not in COMMANDS:
        rest = [*rest[:pos], "train", *rest[pos:]]
    elif rest[pos] not in _CONFIG_COMMANDS:
        raise UserError(f"--config: `moepost {rest[pos]}` takes no config file")
    following = rest[pos + 1 :]
    if following and not following[0].startswith("-") and "=" not in following[0]:
        raise UserError(f"config given twice: --config {path} and {following[0]}; give one of them")
    return [*rest[: pos + 1], path, *following]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = _config_flag_argv(list(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"moepost: error: {e}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    # argparse assigns `overrides` before options: `plan C --gpus 8 k=v` leaves k=v over.
    if (
        extra
        and hasattr(args, "overrides")
        and all("=" in e and not e.startswith("-") for e in extra)
    ):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from moepost.recipes.signals import Stopped

    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"moepost: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(f"moepost: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("moepost: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"moepost: error: disk full writing {e.filename or 'a file'} ({e})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
