"""`moepost report RUN_DIR`: plots (`plots/*.png`) and one self-contained `report.html`.

Reads what a run leaves behind (DESIGN.md section 4) and tolerates a run that is still going or was
killed (`run_log`): a missing file draws nothing and a half-written last JSONL line is skipped.
The figures are `report_figures`; this module writes them and the HTML page around them.
"""

from __future__ import annotations

import base64
import html
import math
import os
import time
from pathlib import Path
from typing import Any

from moepost.components.training.report_figures import plan_figures
from moepost.components.training.run_log import (
    as_float,
    load_jsonl,
    match_keys,
    numeric_keys,
    series,
)
from moepost.errors import UserError

_LOG_FILES = ("train_log.jsonl", "eval_log.jsonl")

# Metrics shown in the summary table (last logged value) when present.
_SUMMARY_KEYS = [
    "loss", "token_accuracy", "reward/mean", "reward/std", "kl", "entropy", "clip_frac",
    "grad_norm", "lr", "aux_loss", "completion_length/mean", "truncated_frac", "zero_std_frac",
    "moe/load_entropy", "moe/load_entropy_min", "moe/max_violation", "moe/dead_experts",
    "moe/route_flip_rate_rollout_train", "moe/route_flip_rate_update",
    "throughput/tokens_per_s", "time/step_s",
]  # fmt: skip
_MAX_ROLLOUTS, _MAX_EVAL, _MAX_CHARS = 8, 6, 3000
_FAULT_COUNTS = ("_errors", "_timeouts", "_nonfinite", "_none")


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def _summary(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(metric, value, step) rows: last values of the key metrics, then the best of each eval."""
    keys = numeric_keys(rows)
    out: list[tuple[str, str, str]] = []
    for key in [k for k in _SUMMARY_KEYS if k in keys] + match_keys(keys, ["reward/*"]):
        steps, values = series(rows, key)
        if key.endswith(_FAULT_COUNTS) and not any(values):  # reward fault counts, all 0
            continue
        if key not in [o[0] for o in out] and steps:
            out.append((key, _fmt(values[-1]), _fmt(steps[-1])))
    for key in match_keys(keys, ["eval/*"]):
        pts = [(v, s) for s, v in zip(*series(rows, key)) if math.isfinite(v)]
        if pts:
            v, s = (min if key.endswith("loss") else max)(pts, key=lambda p: (p[0], -p[1]))
            out.append((f"best {key}", _fmt(v), _fmt(s)))
    return out


def _samples(rows: list[dict[str, Any]], limit: int, title: str) -> str:
    """The last logged step's samples as HTML blocks, text escaped and shortened."""
    if not rows:
        return ""
    last = rows[-1].get("step")
    picked = [r for r in rows if r.get("step") == last][:limit]
    blocks = []
    for r in picked:
        scores = {k: v for k, v in r.items() if k.startswith("reward") or k == "advantage"}
        meta = "  ".join(f"{k} = {_fmt(as_float(v)) or html.escape(str(v))}" for k, v in scores.items())  # fmt: skip
        if r.get("finish_reason"):
            meta += f"  finish = {html.escape(str(r['finish_reason']))}"
        parts = [f'<div class="meta">{meta}</div>']
        for field in ("prompt", "completion", "reference"):
            if r.get(field) is not None:
                text = str(r[field])
                text = text if len(text) <= _MAX_CHARS else text[:_MAX_CHARS] + " […]"
                parts.append(f"<b>{field}</b><pre>{html.escape(text)}</pre>")
        blocks.append('<div class="sample">' + "".join(parts) + "</div>")
    header = f"<h2>{title} (step {html.escape(str(last))}, {len(picked)} shown)</h2>"
    return header + "".join(blocks)


def _config_header(run: Path) -> dict[str, str]:
    cfg: dict[str, Any] = {}
    try:  # a damaged or missing config thins the header out; it never stops the report
        import yaml

        loaded = yaml.safe_load((run / "resolved_config.yaml").read_text(encoding="utf-8"))
        cfg = loaded if isinstance(loaded, dict) else {}
    except Exception:
        pass
    model, rl = cfg.get("model") or {}, cfg.get("rl") or {}
    stage = str(cfg.get("stage", "?"))
    algorithm = rl.get("algorithm", "?") if stage == "rl" and isinstance(rl, dict) else stage
    path = model.get("policy_name_or_path", "?") if isinstance(model, dict) else "?"
    return {"run dir": str(run.resolve()), "stage": stage, "algorithm": str(algorithm), "model": str(path)}  # fmt: skip


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1500px;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 10px;text-align:left}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(640px,1fr));gap:12px}
.plots img{width:100%}.sample{border:1px solid #ddd;padding:8px;margin:8px 0;border-radius:4px}
pre{white-space:pre-wrap;background:#f6f6f6;padding:6px;max-height:18em;overflow:auto}
.meta{font-family:monospace;color:#555}"""


def _html(run: Path, rows: list[dict[str, Any]], plots: list[Path]) -> str:
    esc = html.escape
    head = [(k, esc(v)) for k, v in _config_header(run).items()]
    head.append(("generated", time.strftime("%Y-%m-%d %H:%M:%S")))
    parts = [
        "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in head) + "</table>"
    ]
    if summary := _summary(rows):
        cells = "".join(
            f"<tr><td>{esc(k)}</td><td>{v}</td><td>{s}</td></tr>" for k, v, s in summary
        )
        parts.append(f"<h2>Summary</h2><table><tr><th>metric</th><th>value</th><th>step</th></tr>{cells}</table>")  # fmt: skip
    if plots:
        images = [(p, base64.b64encode(p.read_bytes()).decode("ascii")) for p in plots]
        figures = "".join(
            f'<figure><img alt="{p.stem}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{p.name}</figcaption></figure>"
            for p, b64 in images
        )
        parts.append(f'<h2>Plots</h2><div class="plots">{figures}</div>')
    parts.append(
        _samples(load_jsonl(run / "train_rollouts.jsonl"), _MAX_ROLLOUTS, "Sample rollouts")
    )
    parts.append(_samples(load_jsonl(run / "eval_outputs.jsonl"), _MAX_EVAL, "Eval outputs"))
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>moepost report: {esc(run.name)}"
        f"</title><style>{_CSS}</style></head><body><h1>moepost report</h1>"
        + "\n".join(parts) + "</body></html>\n"
    )  # fmt: skip


def write_report(run_dir: str | Path) -> Path:
    """Draw `RUN_DIR/plots/*.png` and write `RUN_DIR/report.html`; returns the HTML's path."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"report: '{run}' is not a folder (expected a run's logging.output_dir)")
    rows = [r for name in _LOG_FILES for r in load_jsonl(run / name)]
    load_rows = load_jsonl(run / "expert_load.jsonl")
    if not rows and not load_rows:
        raise UserError(
            f"report: '{run}' has no logged steps (expected train_log.jsonl or expert_load.jsonl "
            "with at least one complete line)"
        )
    out = run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for name, draw in plan_figures(rows, load_rows):
        draw().savefig(out / f"{name}.tmp", format="png", dpi=100)  # rename: never a half PNG
        os.replace(out / f"{name}.tmp", out / name)
        plots.append(out / name)
    path = run / "report.html"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(_html(run, rows, plots), encoding="utf-8")
    os.replace(tmp, path)
    return path
