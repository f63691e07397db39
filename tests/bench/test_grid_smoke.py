"""bench/grid.py: the --points parser, and one tiny grid point per side end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trl  # noqa: F401 - the [bench] / [dev] extras install trl; without it this must fail, not skip

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # `bench` is a folder of the checkout, not an installed package

from bench.grid import GRID, HEAD, Point, _advantage, parse_points  # noqa: E402


def test_points_parser_selects_filters_globs_and_off_grid_points() -> None:
    assert len(parse_points(None)) == len(GRID) == 27 + 6
    assert [p.id for p in parse_points("rl:2x8x32, sft:128:char")] == ["rl:2x8x32", "sft:128:char"]
    assert [p.id for p in parse_points("sft:*:v152k")] == [
        "sft:128:v152k",
        "sft:512:v152k",
        "sft:2048:v152k",
    ]
    assert len(parse_points("rl:*x*x32")) == 9
    assert len(parse_points("rl")) == 27
    # the items' order is kept (grid order within a glob), repeats collapse
    assert [p.id for p in parse_points("rl:16x16x256,rl:2x4x32,rl:2x4x32")] == [
        "rl:16x16x256",
        "rl:2x4x32",
    ]
    assert parse_points("rl:1x2x8") == [Point("rl", prompts=1, group=2, new_tokens=8)]
    for bad in ("rl:2x8", "sft:128:bytes", "ppo", "rl:0x2x8", "rl:3x*x32"):
        with pytest.raises(ValueError, match="selects no point"):
            parse_points(bad)


def test_every_ratio_reads_higher_is_better_for_moepost() -> None:
    # moepost 2 s vs TRL 3 s: 1.5x; 1000 vs 750 tok/s: 1.33x; 900 vs 1200 MB: 1.33x
    assert _advantage("process_s", 2.0, 3.0) == pytest.approx(1.5)
    assert _advantage("tokens_per_s", 1000.0, 750.0) == pytest.approx(4 / 3)
    assert _advantage("peak_rss_mb", 900.0, 1200.0) == pytest.approx(4 / 3)
    assert _advantage("step_s", 0.0, 1.0) != _advantage("step_s", 0.0, 1.0)  # NaN, no division
    assert HEAD[HEAD.index("tok/s TRL") + 1] == "moepost/TRL"
    assert HEAD[HEAD.index("process s TRL") + 1] == "TRL/moepost"


@pytest.mark.slow
def test_one_quick_point_per_side_writes_positive_figures(tmp_path: Path) -> None:
    out = tmp_path / "grid.json"
    cmd = [sys.executable, "bench/grid.py", "--points", "rl:2x4x32", "--quick", "--threads", "1"]
    result = subprocess.run(
        [*cmd, "--json", str(out), "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["runs"] == 1 and report["steps"] == 2 and report["threads"] == 1
    assert "trl 1." in report["machine"] and report["command"].startswith("python bench/grid.py")
    (point,) = report["points"]
    assert point["point"] == "rl:2x4x32"
    for side in ("moepost", "trl"):
        med = point[side]["median"]
        for key in ("step_s", "process_s", "tokens_per_s", "peak_rss_mb", "first_step_s"):
            assert med[key] > 0, (side, key, med)
        # the whole process holds every step, so it outlasts the steady-state step
        assert med["process_s"] > med["step_s"]
        assert len(point[side]["runs"]["step_s"]) == 1
    for key in ("step_s", "process_s", "tokens_per_s", "peak_rss_mb"):
        assert point["ratio"][key] > 0
    assert "| rl:2x4x32 |" in result.stdout and "Command: `python bench/grid.py" in result.stdout


@pytest.mark.slow
def test_learning_dry_run_scores_both_sides_on_the_same_steps(tmp_path: Path) -> None:
    out = tmp_path / "learning.json"
    cmd = [sys.executable, "bench/learning_vs_trl.py", "--dry", "--seeds", "0", "--threads", "1"]
    result = subprocess.run(
        [*cmd, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["steps"] == 4 and report["eval_every"] == 2
    (seed,) = report["seeds"]
    for side in ("moepost", "trl"):
        points = seed["curves"][side]
        assert [p["step"] for p in points] == [0, 2, 4]
        assert points[0]["accuracy"] == seed["sft_accuracy"]  # step 0: the SFT checkpoint
        for p in points:
            assert 0.0 <= p["accuracy"] <= 1.0, (side, p)  # NaN (never scored) fails here
        for p in points[1:]:
            assert 0.0 <= p["reward"] <= 1.0, (side, p)  # a training reward was logged
    assert "median over seeds 0" in result.stdout
