"""`moepost report`: plots and a self-contained report.html from a (possibly interrupted) run."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from moepost.components.training.report import write_report
from moepost.components.training.run_log import as_float, load_jsonl, series
from moepost.errors import UserError

ROLLOUT_TEXT = "The answer is <b>42</b> & done"
RL_PLOTS = [
    "loss.png", "reward.png", "kl.png", "entropy.png", "clip_frac.png", "grad_norm.png",
    "lr.png", "eval.png", "expert_load_heatmap.png", "load_entropy.png", "route_flip.png",
    "throughput.png", "completion_length.png",
]  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")


def _rl_run(root: Path) -> Path:
    run = root / "rl_run"
    run.mkdir()
    (run / "resolved_config.yaml").write_text(
        "stage: rl\nmodel:\n  policy_name_or_path: /models/tiny-moe\nrl:\n  algorithm: gspo\n"
    )
    train = []
    for step in (1, 2, 3):
        train.append(
            {
                "step": step, "loss": 1.0 / step, "lr": 1e-6 * step, "grad_norm": 0.5 + step,
                "reward/mean": 0.2 * step, "reward/std": 0.1, "reward/gsm8k": 0.25 * step,
                "reward/format": 1.0, "kl": 0.01 * step, "entropy": 2.0 - 0.1 * step,
                "clip_frac": 0.05 * step, "completion_length/mean": 30.0 + step,
                "throughput/tokens_per_s": 100.0 * step, "moe/load_entropy": 0.9,
                "moe/route_flip_rate_rollout_train": 0.02 * step,
                "moe/route_flip_rate_update": 0.01 * step, "stability/skipped": 0.0,
            }
        )  # fmt: skip
    train[1]["kl"] = "nan"  # a non-finite value logged as a string
    train.append({"step": 2, "eval/accuracy": 0.75, "eval/reward_mean": 0.6})
    train.append({"step": 3, "eval/accuracy": 0.5, "eval/reward_mean": 0.7})
    _write_jsonl(run / "train_log.jsonl", train, tail='{"step": 4, "loss": 0.2')  # killed run
    loads = []
    for step, skew in ((1, 0.0), (2, 0.1), (3, 0.2)):
        frac = [0.25 + skew, 0.25 - skew, 0.25, 0.25]  # 2 layers x 4 experts
        loads.append({"step": step, "load_fraction": [frac, frac[::-1]], "entropy": [0.99 - skew, 0.95 - skew], "dead": [0, 0]})  # fmt: skip
    _write_jsonl(run / "expert_load.jsonl", loads)
    rollouts = [
        {"step": 2, "prompt": "old prompt", "completion": "old completion", "reward": 0.0},
        {"step": 3, "prompt": "What is 6*7?", "completion": ROLLOUT_TEXT, "reference": "42",
         "reward": 1.0, "reward/gsm8k": 1.0, "advantage": 0.5, "finish_reason": "stop"},
    ]  # fmt: skip
    _write_jsonl(run / "train_rollouts.jsonl", rollouts)
    evals = [{"step": 3, "prompt": "eval prompt", "completion": "eval says 7", "reward": 0.0}]
    _write_jsonl(run / "eval_outputs.jsonl", evals)
    return run


@pytest.fixture(scope="module")
def rl_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run = _rl_run(tmp_path_factory.mktemp("report"))
    path = write_report(run)
    return run, path.read_text(encoding="utf-8")


def test_load_jsonl_skips_truncated_line_and_keeps_nan_strings(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    _write_jsonl(path, [{"step": 1, "kl": "nan"}, {"step": 2, "kl": 0.5}], tail='{"step": 3, "k')
    rows = load_jsonl(path)
    assert rows == [{"step": 1, "kl": "nan"}, {"step": 2, "kl": 0.5}]
    assert load_jsonl(tmp_path / "missing.jsonl") == []
    steps, values = series(rows, "kl")
    assert steps == [1.0, 2.0] and np.isnan(values[0]) and values[1] == 0.5
    assert (
        as_float("-inf") == float("-inf") and as_float("hello") is None and as_float(True) is None
    )


def test_series_keeps_last_value_of_a_relogged_step() -> None:
    rows = [{"step": 2, "loss": 9.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 3.0}]
    assert series(rows, "loss") == ([1.0, 2.0], [1.0, 3.0])


def test_every_expected_plot_is_a_real_png(rl_report: tuple[Path, str]) -> None:
    run, _ = rl_report
    for name in RL_PLOTS:
        path = run / "plots" / name
        data = path.read_bytes()
        assert data.startswith(b"\x89PNG"), name
        assert len(data) > 5000, name  # a 700x400 figure with axes and text, not a blank
        image = imread(path)
        assert image.shape[:2] == (400, 700), name  # figsize (7, 4) at dpi 100
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 1, name
    # leftover keys get a figure per group; no temporary file is left behind
    assert (run / "plots" / "stability.png").is_file()
    assert not list(run.rglob("*.tmp"))


def test_html_is_self_contained_with_summary_and_escaped_samples(
    rl_report: tuple[Path, str],
) -> None:
    run, text = rl_report
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) >= len(RL_PLOTS)
    assert all(base64.b64decode(b).startswith(b"\x89PNG") for b in images)
    assert "<img" in text and 'src="plots/' not in text  # nothing linked from outside
    # escaped rollout of the last step; the step-2 rollout is not a sample any more
    assert "The answer is &lt;b&gt;42&lt;/b&gt; &amp; done" in text
    assert ROLLOUT_TEXT not in text and "old completion" not in text
    assert "eval says 7" in text
    assert "gspo" in text and "/models/tiny-moe" in text and str(run.resolve()) in text
    # last loss is step 3's 1/3 (the truncated step-4 line is dropped); kl's last value is 0.03
    assert "<td>loss</td><td>0.3333</td><td>3</td>" in text
    assert "<td>kl</td><td>0.03</td><td>3</td>" in text
    # best eval/accuracy is 0.75 at step 2, best eval/reward_mean 0.7 at step 3
    assert "<td>best eval/accuracy</td><td>0.75</td><td>2</td>" in text
    assert "<td>best eval/reward_mean</td><td>0.7</td><td>3</td>" in text


def test_sft_run_with_only_a_train_log_renders(tmp_path: Path) -> None:
    rows = [{"step": s, "loss": 2.0 - 0.3 * s, "lr": 1e-5, "grad_norm": 1.0, "token_accuracy": 0.1 * s} for s in range(1, 5)]  # fmt: skip
    rows.append({"step": 4, "eval/loss": 1.1, "eval/token_accuracy": 0.35})
    _write_jsonl(tmp_path / "train_log.jsonl", rows)
    text = write_report(tmp_path).read_text(encoding="utf-8")
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert made == ["eval.png", "grad_norm.png", "loss.png", "lr.png", "token_accuracy.png"]
    assert text.count("data:image/png;base64,") == 5
    assert "<td>best eval/loss</td><td>1.1</td><td>4</td>" in text
    assert "Sample rollouts" not in text


def test_missing_or_empty_run_dir_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a folder"):
        write_report(tmp_path / "nope")
    with pytest.raises(UserError, match="no logged steps"):
        write_report(tmp_path)
    (tmp_path / "train_log.jsonl").write_text('{"step": 1, "lo')  # only a half line
    with pytest.raises(UserError, match="no logged steps"):
        write_report(tmp_path)


def test_expert_load_alone_draws_the_two_load_figures(tmp_path: Path) -> None:
    rows = [{"step": 5, "load_fraction": [[0.5, 0.5, 0.0, 0.0]], "entropy": [0.5], "dead": [2]}]
    _write_jsonl(tmp_path / "expert_load.jsonl", rows)
    write_report(tmp_path)
    made = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert made == ["expert_load_heatmap.png", "load_entropy.png"]


def test_reward_fault_counts_get_their_own_figure_only_when_nonzero() -> None:
    from moepost.components.training.report import _summary
    from moepost.components.training.report_figures import plan_figures

    rows = [
        {"step": s, "reward/mean": 0.5, "reward/f": 0.5, "reward/f_errors": float(s == 2),
         "reward/f_timeouts": 0.0}
        for s in (1, 2)
    ]  # fmt: skip
    made = [name for name, _ in plan_figures(rows, [])]
    assert "reward_faults.png" in made and "reward.png" in made
    summary = [key for key, _, _ in _summary(rows)]
    assert "reward/f_errors" in summary and "reward/f_timeouts" not in summary
    quiet = [{**r, "reward/f_errors": 0.0} for r in rows]
    assert "reward_faults.png" not in [name for name, _ in plan_figures(quiet, [])]
