"""`moepost export`: turn a run or checkpoint into a folder other tools load directly.

With `merge_lora`, a PEFT adapter (expert and router adapters included) is folded into its base
model, so `AutoModelForCausalLM.from_pretrained(out)` needs neither peft nor the base model.
Without it, the adapter or full weights are copied with the tokenizer, leaving the training state
(optimizer, RNG, trainer_state) behind. A sharded FSDP2 checkpoint (`dcp/` shards) is read on
one process and written as safetensors files of at most `max_shard_size` each.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from moepost.components.model.loading import ADAPTER_CONFIG, hub_kwargs
from moepost.config.schema import MiscConfig
from moepost.distributed.sharded_checkpoint import is_sharded
from moepost.errors import UserError

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# Files that make up a model or a tokenizer; everything else in a checkpoint is training state.
_MODEL_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".model", ".tiktoken", ".py", ".md")


def resolve_checkpoint(src: str | Path) -> Path:
    """The checkpoint folder of `src`: itself, the run's `final/`, or its newest `checkpoint-N/`."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(
            f"export: '{src}' is not a folder (expected a run directory or a checkpoint)"
        )
    if (src / "config.json").is_file() or (src / ADAPTER_CONFIG).is_file():
        return src
    if (src / "final").is_dir():
        return resolve_checkpoint(src / "final")
    steps = [
        (int(m.group(1)), p)
        for p in src.iterdir()
        if p.is_dir() and (m := _CHECKPOINT_RE.match(p.name))
    ]
    if steps:
        return resolve_checkpoint(max(steps)[1])
    raise UserError(
        f"export: '{src}' holds no model (no config.json or {ADAPTER_CONFIG}, no final/, no checkpoint-N/)"
    )


def _is_model_file(path: Path) -> bool:
    if not path.is_file() or path.suffix not in _MODEL_SUFFIXES:
        return False
    # trainer_state.json and the like; manifest.json describes the checkpoint's own files
    return "state" not in path.name and path.name != "manifest.json"


def _copy_model_files(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if _is_model_file(path):
            shutil.copy2(path, out / path.name)


def _adapter_base(ckpt: Path) -> str:
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{ckpt / ADAPTER_CONFIG}: base_model_name_or_path is missing")
    return base


def _save_tokenizer(ckpt: Path, base: str | None, out: Path, misc: MiscConfig, trust: bool) -> None:
    """The checkpoint's own tokenizer if it has one, else the base model's."""
    from transformers import AutoTokenizer

    for candidate in [str(ckpt)] + ([base] if base else []):
        try:
            kwargs = hub_kwargs(candidate, misc, "export tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(candidate, trust_remote_code=trust, **kwargs)
        except (OSError, ValueError, UserError):
            continue
        tokenizer.save_pretrained(out)
        return


def export_model(
    src: str | Path,
    out: str | Path,
    *,
    merge_lora: bool,
    cache_dir: str | None = None,
    trust_remote_code: bool = False,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the model of run / checkpoint `src` to `out` and return `out`.

    An adapter checkpoint is merged into its base (`merge_lora=True`) or copied as an adapter;
    a full-weight checkpoint is copied either way. The base model of an adapter is looked up in
    a local folder or the Hugging Face cache (`cache_dir`), never downloaded.
    """
    ckpt = resolve_checkpoint(src)
    out = Path(out)
    if out.resolve() == ckpt.resolve():
        raise UserError(f"export: the output folder '{out}' is the checkpoint itself")
    misc = MiscConfig(huggingface_cache_dir=cache_dir)
    is_adapter = (ckpt / ADAPTER_CONFIG).is_file()
    if is_sharded(ckpt):  # FSDP2 checkpoint: weights only in the DCP shards
        from moepost.tools.export_sharded import export_sharded

        base = _adapter_base(ckpt) if is_adapter else None
        export_sharded(
            ckpt, out, base=base, merge_lora=merge_lora, misc=misc,
            trust_remote_code=trust_remote_code, max_shard_size=max_shard_size,
        )  # fmt: skip
        _save_tokenizer(ckpt, base, out, misc, trust_remote_code)
        return out
    if not is_adapter or not merge_lora:
        _copy_model_files(ckpt, out)
        if not any(p.name.startswith("tokenizer") for p in out.iterdir()):
            base = _adapter_base(ckpt) if is_adapter else None
            _save_tokenizer(ckpt, base, out, misc, trust_remote_code)
        return out

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = _adapter_base(ckpt)
    key = f"{ckpt / ADAPTER_CONFIG} base_model_name_or_path"
    kwargs = hub_kwargs(base, misc, key)
    # dtype "auto" keeps the base checkpoint's own precision in the merged weights.
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype="auto", trust_remote_code=trust_remote_code, **kwargs
    )
    merged = PeftModel.from_pretrained(model, str(ckpt)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(ckpt, base, out, misc, trust_remote_code)
    return out
