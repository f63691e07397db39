"""Strict loading of YAML / JSON run configs into `schema.Config`.

Strict means: an unknown key is an error naming the key, its section and the closest valid
name; a value of the wrong type is an error naming the key and the expected type. Cross-field
checks run here, before any model is loaded, and name every field involved.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from moepost.config.schema import DEFAULT_MICRO_BATCH_TOKENS, MICRO_BATCH_KEYS, Config
from moepost.errors import UserError

# The Qwen3.5 pipeline puts router options under `rl:`; they mean the `moe.*` keys.
ALIASES: dict[tuple[str, str], tuple[str, str] | None] = {
    ("rl", "router_aux_loss_coef"): ("moe", "router_aux_loss_coef"),
    ("rl", "monitor_expert_utilization"): ("moe", "monitor_expert_utilization"),
    # moepost always captures router logits at the router itself, so this flag has nothing
    # left to switch; it is accepted (and dropped) so the pipeline's configs load unchanged.
    ("rl", "output_router_logits"): None,
}


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict; errors name the file (and line for YAML)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {p}")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise UserError(f"{p}: {where}invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping of sections at the top level")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (values parsed as YAML scalars / lists)."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}': expected key=value, e.g. rl.algorithm=grpo")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise UserError(f"override '{item}': '{part}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load, override, type-check and validate a run config."""
    data = read_config_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides or []))
    source = str(path) if path is not None else "<overrides>"
    _apply_aliases(data, source)
    cfg = _build(Config, data, source, "")
    _default_micro_batching(cfg, data.get("train"))
    validate(cfg)
    return cfg


def _default_micro_batching(cfg: Config, train: Any) -> None:
    """No micro-batch key given (`train.micro_batch_size`, `micro_batch_tokens`,
    `gradient_accumulation_steps`): micro-batches of up to DEFAULT_MICRO_BATCH_TOKENS tokens."""
    given = isinstance(train, dict) and any(k in train for k in MICRO_BATCH_KEYS)
    if not given:
        cfg.train.micro_batch_tokens = DEFAULT_MICRO_BATCH_TOKENS


def _apply_aliases(data: dict[str, Any], source: str) -> None:
    for (sec, key), target in ALIASES.items():
        section = data.get(sec)
        if isinstance(section, dict) and key in section:
            value = section.pop(key)
            if target is None:
                continue
            dst_sec, dst_key = target
            dst = data.setdefault(dst_sec, {})
            if dst_key in dst and dst[dst_key] != value:
                raise UserError(
                    f"{source}: {sec}.{key} (alias) and {dst_sec}.{dst_key} disagree; keep one"
                )
            dst[dst_key] = value


def _build(cls: type, data: Any, source: str, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            section = prefix.rstrip(".") or "top level"
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            valid = ", ".join(fields)
            raise UserError(
                f"{source}: unknown key '{prefix}{key}' in section '{section}'{hint} "
                f"(valid: {valid})"
            )
        kwargs[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(tp))
    return getattr(tp, "__name__", str(tp))


# Lists of names that pipelines write as a JSON string ('["experts","mlp"]'). Not every list:
# a generation.stop string such as "[END]" is one stop string, not JSON.
_JSON_LIST_KEYS = (
    "noise_injection.target_modules",
    "model.lora.target_modules",
    "logging.report_to",
)


def _json_string_list(value: str, source: str, key: str) -> list[str]:
    """'["experts","mlp"]' (a list written as a quoted string, as some pipelines do) -> list.

    Parsed strictly as JSON: anything else starting with "[" is an error, never one name.
    """
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise UserError(
            f"{source}: {key} = {value!r}: expected a list of strings, e.g. [experts, mlp] "
            'or the JSON string \'["experts","mlp"]\''
        )
    return parsed


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting only lossless cases."""
    origin = get_origin(tp)
    bad = UserError(f"{source}: {key} = {value!r}: expected {_type_name(tp)}")
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):  # a dataclass field type
        return _build(tp, value, source, key + ".")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source, key)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise bad
    if origin is list:
        (item_tp,) = get_args(tp) or (Any,)
        if isinstance(value, str) and item_tp is str:
            if key in _JSON_LIST_KEYS and value.lstrip().startswith("["):
                value = _json_string_list(value, source, key)
            else:
                return [value]  # a single name where a list is expected is unambiguous
        if not isinstance(value, list):
            raise bad
        return [_coerce(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    return value


def validate(cfg: Config) -> None:
    """Cross-field checks that must fail before any model or data is loaded."""
    from moepost.config.validate import check_all

    check_all(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def write_resolved_config(
    cfg: Config, output_dir: str | Path, name: str = "resolved_config.yaml"
) -> Path:
    """Write every value the run uses (defaults included) next to its outputs."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    tmp.replace(path)
    return path
