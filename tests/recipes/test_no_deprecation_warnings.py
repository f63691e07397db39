"""A quickstart-sized SFT + GSPO run calls transformers / peft / torch through current APIs only:
no DeprecationWarning or FutureWarning (and no deprecation message on transformers' logger)."""

from __future__ import annotations

import logging
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from recipe_support import format_rows, make_config, write_jsonl
from test_rl_recipe import rl_config
from test_sft_recipe import sft_config

from moepost.recipes import rl_passes
from moepost.recipes.rl import run_rl
from moepost.recipes.sft import run_sft

# Library-internal, not caused by how moepost calls the library (each one checked by its stack):
# peft 0.21 reads the deprecated `is_gradient_checkpointing` property in PeftModel.__init__.
KNOWN = [("`is_gradient_checkpointing` is deprecated", "peft/peft_model.py")]


@contextmanager
def deprecations() -> Iterator[list[str]]:
    """Collect every Deprecation/FutureWarning (with the frame that triggered it) and every
    deprecation message transformers logs, as readable lines."""
    found: list[str] = []
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def show(message: Any, category: type, filename: str, lineno: int, *args: Any) -> None:
        if not issubclass(category, (DeprecationWarning, FutureWarning)):
            return
        stack = traceback.extract_stack()[:-1]  # up to the frame that called warnings.warn
        text = str(message)
        for start, caller in KNOWN:
            if text.startswith(start) and any(caller in f.filename for f in stack[-3:-1]):
                return
        ours = [f for f in stack if "/moepost/" in f.filename and "/tests/" not in f.filename]
        caller = f"{Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else "?"
        found.append(f"{category.__name__}: {text} ({filename}:{lineno}, from moepost {caller})")

    hf_logger = logging.getLogger("transformers")
    handler = Collect(logging.WARNING)
    hf_logger.addHandler(handler)
    logging.Logger.warning_once.cache_clear()  # type: ignore[attr-defined]  # transformers' once-only cache
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            yield found
    finally:
        hf_logger.removeHandler(handler)
    found += [f"log: {r.getMessage()}" for r in records if "deprecat" in r.getMessage().lower()]


def test_sft_and_gspo_with_lora_use_current_apis(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_jsonl(tmp_path / "gsm8k.jsonl", format_rows("gsm8k", n=12))
    shared_calls: list[int] = []  # the shared-prefix forwards must run, not just be allowed
    original = rl_passes.shared_prefix_logits

    def counted(*args: Any, **kwargs: Any) -> Any:
        shared_calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(rl_passes, "shared_prefix_logits", counted)
    lora = {"lora": {"enabled": True, "r": 4, "alpha": 8, "target_experts": True}}
    with deprecations() as found:
        # SFT with LoRA on attention and experts, gradient checkpointing on
        sft = sft_config(
            tiny_model, data, tmp_path / "sft", model={**lora, "gradient_checkpointing": True}
        )
        run_sft(make_config(sft))
        # GSPO from the SFT adapter: generation (KV cache), reference log-probs (kl_coef),
        # shared-prefix training forwards, evaluation
        rl = rl_config(
            tmp_path / "sft" / "final",
            data,
            tmp_path / "rl",
            model=lora,
            rl={"kl_coef": 0.01},
            train={"max_steps": 2, "eval_every": 2},
        )
        run_rl(make_config(rl))
    assert (tmp_path / "rl" / "train_log.jsonl").is_file() and shared_calls
    assert found == [], "\n".join(found)
