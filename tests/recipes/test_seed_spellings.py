"""Spellings users bring from their seed pipelines (../shared/scenarios): `python -m X --config
C.yaml [--eval-only]` and AQN's `target_modules: '["experts","mlp"]'` written as a string."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from recipe_support import format_rows, make_config, read_log, write_jsonl
from test_rl_recipe import rl_config

from moepost.cli import _config_flag_argv, main
from moepost.errors import UserError

AQN_STRING = '["experts","mlp"]'  # the seed's exact value, a YAML string holding a JSON list


def _python_m_moepost(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "moepost", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def _seed_config(tiny_model: Path, tmp_path: Path) -> Path:
    """A GSPO config like the seed's configs/train_toy_gspo.yaml, with AQN in the seed's form."""
    data = write_jsonl(tmp_path / "gsm8k.jsonl", format_rows("gsm8k", n=12))
    noise = {"enabled": True, "num_stages": 3, "target_modules": AQN_STRING}
    cfg = rl_config(tiny_model, data, tmp_path / "run", noise_injection=noise)
    path = tmp_path / "configs" / "train_toy_gspo.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(cfg))
    assert f"target_modules: '{AQN_STRING}'" in path.read_text()  # really the string form
    return path


def test_seed_command_lines_train_then_eval_only(tiny_model: Path, tmp_path: Path) -> None:
    config = _seed_config(tiny_model, tmp_path)
    trained = _python_m_moepost(["--config", "configs/train_toy_gspo.yaml"], cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    steps = [r for r in read_log(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    # AQN ran with the string target_modules: stage 0 is noise-free, then sigma_start (1e-2).
    assert [r["noise/sigma"] for r in steps] == [0.0, pytest.approx(1e-2)]
    assert (tmp_path / "run" / "final").is_dir()

    evaluated = _python_m_moepost(
        ["--config", str(config), "--eval-only", "logging.output_dir=" + str(tmp_path / "ev")],
        cwd=tmp_path,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert len(read_log(tmp_path / "ev", "eval_outputs.jsonl")) == 4
    assert not (tmp_path / "ev" / "train_log.jsonl").exists()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--config", "c.yaml"], ["train", "c.yaml"]),
        (["--config=c.yaml", "--eval-only"], ["train", "c.yaml", "--eval-only"]),
        (["--local_rank=1", "--config", "c.yaml"], ["--local_rank=1", "train", "c.yaml"]),
        (["--local_rank", "1", "--config", "c.yaml"], ["--local_rank", "1", "train", "c.yaml"]),
        (["--config", "c.yaml", "k=v"], ["train", "c.yaml", "k=v"]),
        (["eval", "--config", "c.yaml", "k=v"], ["eval", "c.yaml", "k=v"]),
        (
            ["train", "--resume", "auto", "--config", "c.yaml"],
            ["train", "c.yaml", "--resume", "auto"],
        ),
        (["plan", "--config", "c.yaml", "--gpus", "8"], ["plan", "c.yaml", "--gpus", "8"]),
        (["train", "c.yaml"], ["train", "c.yaml"]),  # no --config: untouched
    ],
)
def test_config_flag_rewrites_to_the_positional(argv: list[str], expected: list[str]) -> None:
    assert _config_flag_argv(argv) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "a.yaml", "--config", "b.yaml"], "config given twice"),
        (["--config", "a.yaml", "--config", "b.yaml"], "more than once"),
        (["--config"], "--config needs a path"),
        (["--config", "--eval-only"], "--config needs a path"),
        (["report", "--config", "a.yaml"], "takes no config file"),
    ],
)
def test_config_flag_errors_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(UserError, match=message):
        _config_flag_argv(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moepost: error:") and message in err and "\n" not in err


def test_aqn_target_modules_string_is_a_json_list(tiny_model: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    noise = {"enabled": True, "num_stages": 3, "target_modules": AQN_STRING}
    cfg = make_config(rl_config(tiny_model, data, tmp_path / "run", noise_injection=noise))
    assert cfg.noise_injection.target_modules == ["experts", "mlp"]
    listed = {"enabled": True, "num_stages": 3, "target_modules": ["experts", "mlp"]}
    same = make_config(rl_config(tiny_model, data, tmp_path / "run", noise_injection=listed))
    assert same.noise_injection == cfg.noise_injection
    for bad in ('["experts", "mlp"', "[1, 2]", '["experts"] extra', "[experts]x"):
        noise["target_modules"] = bad
        with pytest.raises(UserError, match=r"noise_injection\.target_modules = .*list of str"):
            make_config(rl_config(tiny_model, data, tmp_path / "run", noise_injection=noise))


def test_json_list_strings_only_for_name_lists(tiny_model: Path, tmp_path: Path) -> None:
    """A stop string such as "[END]" stays one string; a LoRA target list string is parsed."""
    data = write_jsonl(tmp_path / "d.jsonl", format_rows("gsm8k", n=12))
    cfg = make_config(
        rl_config(
            tiny_model,
            data,
            tmp_path / "run",
            generation={"stop": "[END]"},
            model={"lora": {"target_modules": '["q_proj","v_proj"]'}},
        )
    )
    assert cfg.generation.stop == ["[END]"]
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
