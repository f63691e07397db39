"""Every launch line in README.md and docs/*.md is run here at CPU scale, covered by a named
test, or marked GPU-only in the doc (convention: docs/cli.md#launch-lines-in-the-docs).

A launch line is a line in a fenced block that starts (after an optional `$ ` and `VAR=value`
prefixes) with moepost, python -m moepost, torchrun, accelerate launch, deepspeed or make;
backslash continuations are joined. A new line that is in none of the three sets fails
`test_every_launch_line_is_covered`, so the docs cannot drift from what is tested.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHER = r"(?:moepost|python -m moepost|torchrun|accelerate launch|deepspeed|make)"
COMMAND = re.compile(rf"^(?:\$ )?(?:[A-Z_]+=\S+ )*{LAUNCHER}(?=\s|$)")
GPU_ONLY = "[GPU only]"  # in the line's own comment or in the comment line just above it
SYNOPSIS = "<!-- launch: synopsis -->"  # before a block of usage lines (placeholders)


@dataclass(frozen=True)
class LaunchLine:
    where: str
    command: str  # "$ " and the comment dropped, continuations joined, spaces collapsed
    gpu_only: bool
    synopsis: bool


def _split_comment(line: str) -> tuple[str, str]:
    code, _, comment = line.partition(" #")
    return code.strip(), comment


def launch_lines(path: Path) -> list[LaunchLine]:
    lines = path.read_text().splitlines()
    out, fence, synopsis, i = [], False, False, 0
    while i < len(lines):
        text = lines[i].strip()
        if text.startswith("```"):
            if not fence:
                before = [x.strip() for x in lines[:i] if x.strip()]
                synopsis = bool(before) and before[-1] == SYNOPSIS
            fence = not fence
        elif fence and COMMAND.match(text):
            start = i
            while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.rstrip("\\").rstrip() + " " + lines[i].strip()
            code, comment = _split_comment(text.removeprefix("$ "))
            above = lines[start - 1].strip() if start else ""
            marked = GPU_ONLY in comment or (above.startswith("#") and GPU_ONLY in above)
            where = f"{path.relative_to(ROOT)}:{start + 1}"
            out.append(LaunchLine(where, " ".join(code.split()), marked, synopsis))
        i += 1
    return out


ALL = [line for path in DOCS for line in launch_lines(path)]

# Doc line -> its CPU-scale run: the same launcher and flags, only the model, data, sizes and
# process counts changed. Placeholders: {tiny} a tiny qwen3_moe, {alpaca} 8 alpaca rows,
# {rl} a tiny GSPO run config,
# {tmp} a scratch folder, {q3} a folder with Qwen3-30B-A3B's config.json only (plan needs no
# weights), {parquet} a 4-row GSM8K parquet, {py} this interpreter. Runs go in this order.
CPU_SCALE: dict[str, str] = {
    "moepost tiny-model /tmp/tiny_qwen3 --arch qwen3_moe": (
        "moepost tiny-model {tmp}/tiny_qwen3 --arch qwen3_moe"
    ),
    "moepost tiny-model /tmp/tiny_mixtral --arch mixtral --num-experts 8 --top-k 2": (
        "moepost tiny-model {tmp}/tiny_mixtral --arch mixtral --num-experts 8 --top-k 2"
    ),
    "moepost tiny-model model": "moepost tiny-model {tmp}/model",
    "moepost plan configs/rl/qwen3_30b_a3b_dapo_math.yaml --gpus 8": (
        "moepost plan configs/rl/qwen3_30b_a3b_dapo_math.yaml --gpus 8 "
        "model.policy_name_or_path={q3}"
    ),
    "moepost plan --gpus 8 --gpu-memory-gb 80 configs/rl/qwen3_30b_a3b_dapo_math.yaml "
    "model.policy_name_or_path=/models/qwen3_30b_a3b distributed.enabled=true "
    "distributed.backend=deepspeed distributed.zero_stage=3 generation.micro_batch_size=64": (
        "moepost plan --gpus 8 --gpu-memory-gb 80 configs/rl/qwen3_30b_a3b_dapo_math.yaml "
        "model.policy_name_or_path={q3} distributed.enabled=true "
        "distributed.backend=deepspeed distributed.zero_stage=3 generation.micro_batch_size=64"
    ),
    "moepost data convert --format gsm8k gsm8k/train.parquet data/gsm8k/train_chat.jsonl": (
        "moepost data convert --format gsm8k {parquet} {tmp}/train_chat.jsonl"
    ),
    "moepost data convert --format gsm8k gsm8k/main/train-00000-of-00001.parquet "
    "data/gsm8k/train_chat.jsonl": (
        "moepost data convert --format gsm8k {parquet} {tmp}/train_chat2.jsonl"
    ),
    "moepost data convert --format gsm8k gsm8k/main/test-00000-of-00001.parquet "
    "data/gsm8k/test_chat.parquet": (
        "moepost data convert --format gsm8k {parquet} {tmp}/test_chat.parquet"
    ),
    # README: SFT with LoRA on one device, then export and report of that run
    "moepost train configs/sft/qwen3_30b_a3b_lora.yaml": (
        "moepost train configs/sft/qwen3_30b_a3b_lora.yaml model.policy_name_or_path={tiny} "
        "data.train_file={alpaca} data.max_seq_length=32 data.test_size=2 train.max_steps=1 "
        "train.batch_size=2 train.gradient_accumulation_steps=2 train.eval_every=0 "
        "train.save_every=0 logging.output_dir={tmp}/sft_run 'logging.report_to=[]' "
        "logging.write_report=false misc.device=cpu"
    ),
    "moepost export runs/qwen3-30b-a3b-lora out/merged --merge-lora": (
        "moepost export {tmp}/sft_run {tmp}/merged --merge-lora"
    ),
    "moepost export runs/qwen3_30b_a3b_lora out/qwen3_lora_adapter": (
        "moepost export {tmp}/sft_run {tmp}/adapter"
    ),
    "moepost export runs/qwen3_30b_a3b_lora out/qwen3_merged --merge-lora": (
        "moepost export {tmp}/sft_run {tmp}/merged2 --merge-lora"
    ),
    # README: a GSPO config of one's own (my_gspo.yaml): doctor, train, resume, report
    "moepost doctor configs/rl/my_gspo.yaml": "moepost doctor {rl}",
    "moepost doctor rl.yaml": "moepost doctor {rl}",
    "moepost doctor gspo.yaml": "moepost doctor {rl}",
    "python -m moepost --config my_gspo.yaml": "python -m moepost --config {rl}",
    "moepost train my_gspo.yaml --resume auto": (
        "moepost train {rl} --resume auto train.max_steps=2"
    ),
    "python -m moepost --config my_gspo.yaml --eval-only": (
        "python -m moepost --config {rl} --eval-only"
    ),
    "moepost eval --config my_gspo.yaml data.max_eval_samples=2": (
        "moepost eval --config {rl} data.max_eval_samples=2"
    ),
    "moepost report runs/qwen3-30b-a3b-gspo": "moepost report {tmp}/rl_run",
    "torchrun --nproc_per_node 8 -m moepost train my_gspo.yaml": (
        "torchrun --standalone --nproc_per_node 2 -m moepost train {rl} misc.device=cpu "
        "logging.output_dir={tmp}/rl_ddp"
    ),
    "torchrun --standalone --nproc_per_node 2 -m moepost train CONFIG misc.device=cpu": (
        "torchrun --standalone --nproc_per_node 2 -m moepost train {rl} misc.device=cpu "
        "logging.output_dir={tmp}/rl_ddp"
    ),
    # `make` lines: the target exists and expands (make -n); what the targets run is tested
    # elsewhere (the quickstart below, the suite itself, bench/ by tests/bench)
    "make quickstart": "make -n quickstart",
    "make test": "make -n test",
    "make bench": "make -n bench",
}

# Doc line -> the test that already runs it at CPU scale (too slow to repeat here).
COVERED_BY: dict[str, str] = {
    "moepost quickstart --output quickstart_out": (
        "tests/recipes/test_quickstart.py::test_fast_quickstart_writes_every_output"
    ),
    "deepspeed --num_gpus 2 --no_local_rank --module moepost train CONFIG misc.device=cpu "
    "distributed.backend=deepspeed distributed.zero_stage=3": (
        "tests/distributed/test_deepspeed_gloo.py::test_deepspeed_kill_and_resume_equals_uninterrupted"
    ),
    "torchrun --standalone --nproc_per_node 2 -m moepost train CONFIG misc.device=cpu "
    "distributed.backend=fsdp distributed.expert_parallel_size=2": (
        "tests/distributed/test_expert_parallel.py::test_resume_under_expert_parallel_continues_exactly"
    ),
}

# README lines carry no GPU-only marker (README is edited by the lead): these are GPU scale.
README_GPU_ONLY: set[str] = set()


def _flags(command: str) -> set[str]:
    """Option names and override keys of a command line (values may change at CPU scale)."""
    out = set()
    for token in shlex.split(command):
        if token.startswith("-"):
            out.add(token.split("=", 1)[0])
        elif "=" in token and not token.startswith("{"):
            out.add(token.split("=", 1)[0] + "=")
    return out - {"--nproc_per_node", "--num_gpus", "--num_processes"} or out


def test_every_launch_line_is_covered() -> None:
    assert len(ALL) > 30, "the extractor found too few launch lines"
    missing = [
        f"{x.where}: {x.command}"
        for x in ALL
        if not (x.gpu_only or x.synopsis or x.command in CPU_SCALE or x.command in COVERED_BY)
        and x.command not in README_GPU_ONLY
    ]
    assert not missing, (
        "launch lines neither run by tests/recipes/test_launch_lines.py nor marked "
        f"'{GPU_ONLY}' (see docs/cli.md#launch-lines-in-the-docs):\n" + "\n".join(missing)
    )
    documented = {x.command for x in ALL}
    stale = [c for c in [*CPU_SCALE, *COVERED_BY] if c not in documented]
    assert not stale, f"table entries no doc has any more: {stale}"


def test_cpu_variants_keep_launcher_and_flags() -> None:
    for doc, cpu in CPU_SCALE.items():
        assert cpu.split()[0] == doc.split()[0], (doc, cpu)
        assert _flags(doc) - {"model.policy_name_or_path="} <= _flags(cpu), (doc, cpu)
    for doc, test in COVERED_BY.items():
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), (doc, test)


def test_synopsis_blocks_hold_only_usage_lines() -> None:
    for x in ALL:
        if x.synopsis:  # placeholders in capitals or [optional] parts: not a runnable line
            assert re.search(r"\[|\b[A-Z_]{3,}\b", x.command), x


def _ranks(argv: list[str]) -> int:
    for flag in ("--nproc_per_node", "--num_gpus", "--num_processes"):
        for i, token in enumerate(argv):
            if token == flag:
                return int(argv[i + 1])
            if token.startswith(flag + "="):
                return int(token.split("=", 1)[1])
    return 1


def test_documented_configs_are_not_refused_by_the_trainer() -> None:
    """Lines naming a repository config (GPU-only ones too) ask for nothing the trainer's own
    checks refuse at their process count (`moepost plan`'s WARN lines, same functions)."""
    from moepost.config.load import load_config
    from moepost.tools.plan_memory import ignored_settings, trainer_refusals

    checked = 0
    for x in ALL:
        argv = shlex.split(x.command)
        configs = [t for t in argv if t.startswith("configs/") and t.endswith(".yaml")]
        if x.synopsis or not configs or not {"train", "eval"} & set(argv):
            continue
        overrides = [t for t in argv if "=" in t and not t.startswith("-") and "/" not in t[:1]]
        overrides = [t for t in overrides if not re.match(r"^[A-Z_]+=", t)]
        cfg = load_config(str(ROOT / configs[0]), overrides)
        ranks = _ranks(argv) * (2 if "--nnodes 2" in x.command else 1)
        assert trainer_refusals(cfg, ranks) == [], x
        assert [m for m in ignored_settings(cfg, ranks) if "offload" in m] == [], x
        checked += 1
    assert checked >= 10


def _fill(command: str, env: dict[str, str]) -> list[str]:
    argv = shlex.split(command.format(**env))
    if argv[0] == "torchrun":  # the same launcher, as a module of this interpreter
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if argv[:3] == ["python", "-m", "moepost"]:
        return [sys.executable, *argv[1:]]
    if argv[0] == "moepost":
        return [sys.executable, "-m", "moepost", *argv[1:]]
    return argv


@pytest.fixture(scope="module")
def scale(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import json

    import pandas as pd
    import yaml
    from recipe_support import format_rows, write_jsonl

    from moepost.tools.tiny_model import build_tiny_model

    tmp = tmp_path_factory.mktemp("launch")
    tiny = build_tiny_model(tmp / "tiny", "qwen3_moe", seed=0)
    q3 = tmp / "q3"
    q3.mkdir()
    sys.path.insert(0, str(ROOT / "tests" / "components"))
    from test_plan import QWEN3_30B

    (q3 / "config.json").write_text(json.dumps(QWEN3_30B))
    parquet = tmp / "gsm8k.parquet"
    pd.DataFrame(format_rows("gsm8k", n=4)).to_parquet(parquet)
    common = {"misc": {"device": "cpu", "num_threads": 1}}
    rl = {
        "stage": "rl",
        "model": {"policy_name_or_path": str(tiny)},
        "data": {
            "train_file": str(write_jsonl(tmp / "rl.jsonl", format_rows("gsm8k", 8))),
            "test_size": 2,
        },
        "generation": {"num_samples_per_prompt": 2, "max_new_tokens": 4},
        "reward": {"functions": [{"name": "gsm8k"}]},
        "train": {"max_steps": 1, "prompts_per_step": 2, "micro_batch_size": 2, "save_every": 1},
        "logging": {"output_dir": str(tmp / "rl_run"), "write_report": False},
        **common,
    }
    write_jsonl(tmp / "alpaca.jsonl", format_rows("alpaca", 8))
    for name, body in (("rl", rl),):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(body))
    return {
        "tmp": str(tmp),
        "tiny": str(tiny),
        "q3": str(q3),
        "parquet": str(parquet),
        "alpaca": str(tmp / "alpaca.jsonl"),
        "rl": str(tmp / "rl.yaml"),
        "py": sys.executable,
    }


@pytest.mark.slow
def test_cpu_scale_launch_lines_run(scale: dict[str, str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done: set[str] = set()
    for doc, cpu in CPU_SCALE.items():
        if cpu in done:
            continue
        done.add(cpu)
        argv = _fill(cpu, scale)
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{doc}\n-> {argv}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    assert (Path(scale["tmp"]) / "merged" / "config.json").is_file()
    assert (Path(scale["tmp"]) / "test_chat.parquet").is_file()
