"""`moepost quickstart --fast` end to end: every DESIGN.md section 4 output of both training
stages, a rendered report with embedded PNGs, and the summary file in the documented shape."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
import yaml

from moepost.cli import main
from moepost.tools.quickstart import run_quickstart
from moepost.tools.quickstart_data import make_problems, write_dataset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a valid PNG has right after its signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _check_run_dir(run: Path, *, rl: bool) -> None:
    cfg = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert cfg["stage"] == ("rl" if rl else "sft")
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in log) and any(k.startswith("eval/") for r in log for k in r)
    outputs = [json.loads(x) for x in (run / "eval_outputs.jsonl").read_text().splitlines()]
    assert outputs and {"prompt", "completion", "reference", "reward"} <= set(outputs[0])
    if rl:
        rollouts = (run / "train_rollouts.jsonl").read_text().splitlines()
        # fast GSPO: 2 steps x 2 prompts x 8 samples
        assert len(rollouts) == 2 * 2 * 8
        assert {"prompt", "completion", "reward", "advantage"} <= set(json.loads(rollouts[0]))
    checkpoints = sorted(run.glob("checkpoint-*"))
    assert checkpoints, run
    for folder in [*checkpoints, run / "best", run / "final"]:
        assert (folder / "config.json").is_file(), folder
        assert list(folder.glob("*.safetensors")), folder
    pngs = sorted((run / "plots").glob("*.png"))
    assert len(pngs) >= 3, pngs
    for png in pngs:
        width, height = _png_size(png)
        assert width > 0 and height > 0 and png.stat().st_size > 1000, png
    html = (run / "report.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and html.rstrip().endswith("</html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) >= 3


@pytest.mark.slow
def test_fast_quickstart_writes_every_output(tmp_path: Path) -> None:
    summary = run_quickstart(tmp_path, command=main, seed=0, fast=True)
    for name in ("sft", "gspo"):
        _check_run_dir(tmp_path / name, rl=name == "gspo")
    on_disk = json.loads((tmp_path / "quickstart_summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert set(on_disk["stages"]) == {"base", "sft", "gspo"}
    for stage in on_disk["stages"].values():
        assert 0.0 <= stage["accuracy"] <= 1.0
        assert 0.0 <= stage["load_entropy"] <= 1.0
        assert stage["wall_s"] > 0
    assert on_disk["wall_s"] >= sum(s["wall_s"] for s in on_disk["stages"].values())
    # The table is printed with the report paths; the test's stdout is not a terminal.
    assert (tmp_path / "sft" / "report.html").is_file()


def test_dataset_is_seeded_and_eval_is_held_out(tmp_path: Path) -> None:
    a_train, a_eval = write_dataset(tmp_path / "a", seed=3, num_train=50, num_eval=10)
    b_train, b_eval = write_dataset(tmp_path / "b", seed=3, num_train=50, num_eval=10)
    c_train, _ = write_dataset(tmp_path / "c", seed=4, num_train=50, num_eval=10)
    assert a_train.read_text() == b_train.read_text() and a_eval.read_text() == b_eval.read_text()
    assert a_train.read_text() != c_train.read_text()
    train = [json.loads(x) for x in a_train.read_text().splitlines()]
    evals = [json.loads(x) for x in a_eval.read_text().splitlines()]
    assert len(train) == 50 and len(evals) == 10
    assert not {r["question"] for r in train} & {r["question"] for r in evals}
    for row in train + evals:
        # The worked solution's last line is the GSM8K answer and every equation is true.
        *steps, final = row["answer"].split("\n")
        for step in steps:
            lhs, rhs = step.split("=")
            assert eval(lhs) == int(rhs), step  # noqa: S307 - digits and +/- only
        assert final == f"#### {steps[-1].split('=')[1]}"


def test_problem_pool_too_small_is_an_error() -> None:
    import random

    # max_number=2 allows a handful of distinct questions; 10_000 cannot be drawn.
    with pytest.raises(ValueError, match="distinct problems"):
        make_problems(10_000, random.Random(0), max_number=2, two_step_frac=0.5, exclude=set())
