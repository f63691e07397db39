"""The figures of `moepost report`: which keys go to which plot, and the drawing.

Figures are drawn with matplotlib's object API (no pyplot), so nothing global is switched and
nothing needs a display. Non-finite values become gaps in the curves.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from moepost.components.training.run_log import as_float, match_keys, numeric_keys, series
from moepost.errors import UserError

# One figure each, in this order: (file, title, y label, key patterns). A key goes to the first
# figure that matches it; reward, eval and the two expert-load figures have their own drawing.
_CURVES: list[tuple[str, str, str, list[str]]] = [
    ("loss.png", "Training loss", "loss", ["loss"]),
    # Before reward.png, so that the per-function fault counts get their own axis.
    (
        "reward_faults.png",
        "Completions a reward function could not score",
        "completions",
        [
            f"{g}reward/*_{kind}"
            for g in ("", "eval/")
            for kind in ("errors", "timeouts", "nonfinite", "none")
        ],
    ),
    ("reward.png", "Reward", "reward", ["reward/*"]),
    ("kl.png", "KL divergence", "KL", ["kl", "approx_kl"]),
    ("entropy.png", "Policy entropy", "entropy (nats / token)", ["entropy"]),
    ("clip_frac.png", "Clipped fraction", "fraction of tokens", ["clip_frac"]),
    ("grad_norm.png", "Gradient norm (before clipping)", "L2 norm", ["grad_norm"]),
    ("lr.png", "Learning rate", "learning rate", ["lr"]),
    ("eval.png", "Eval", "", ["eval/*"]),
    ("expert_load_heatmap.png", "", "", []),
    ("load_entropy.png", "", "", ["moe/load_entropy*"]),
    ("route_flip.png", "Routing flip rate", "fraction of top-k changed", ["moe/route_flip_rate*"]),
    ("aux_loss.png", "Router auxiliary losses", "loss", ["aux_loss", "z_loss"]),
    ("token_accuracy.png", "Token accuracy", "accuracy", ["token_accuracy"]),
    ("completion_length.png", "Completion length", "tokens", ["completion_length/*"]),
    ("throughput.png", "Throughput", "tokens / s", ["throughput/*"]),
    ("time.png", "Time per step", "seconds", ["time/*"]),
    ("moe_balance.png", "Expert load imbalance", "value", ["moe/max_violation", "moe/cv"]),
    ("dead_experts.png", "Dead experts", "count", ["moe/dead_experts", "moe/collapse_steps"]),
]
# Eval keys also drawn over the matching training curve.
_OVERLAY = {"loss.png": "eval/loss", "token_accuracy.png": "eval/token_accuracy"}


def _finite(values: list[float]) -> list[float]:
    # inf would wreck the autoscaled axis; a gap shows the bad step just as well
    return [v if math.isfinite(v) else math.nan for v in values]


def _figure(ncols: int = 1, *, constrained: bool = False) -> tuple[Any, list[Any]]:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(
            "moepost report needs matplotlib (a moepost dependency): pip install matplotlib"
        ) from None
    if ncols == 1 and not constrained:
        # Fixed margins: constrained layout measured every tick label again and took 37% of
        # the report (24 figures: 1.85 s instead of 2.95 s); one axes needs no solver.
        fig = Figure(figsize=(7, 4), dpi=100)
        fig.subplots_adjust(left=0.11, right=0.97, bottom=0.12, top=0.91)
    else:  # side-by-side axes, or a colour bar and a suptitle (the heat map)
        fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _lines(ax: Any, rows: list[dict[str, Any]], keys: list[str], title: str, ylabel: str) -> None:
    for key in keys:
        steps, values = series(rows, key)
        line = ax.plot(steps, _finite(values), label=key, linewidth=1.5, **_marks(steps, key))[0]
        bad = [s for s, v in zip(steps, values) if not math.isfinite(v)]
        if bad:  # a NaN / inf step would only be a gap; mark it at the bottom edge
            ax.plot(bad, [0.0] * len(bad), "x", color=line.get_color(), markersize=8,
                    transform=ax.get_xaxis_transform(), clip_on=False, label=f"{key} non-finite")  # fmt: skip
    _decorate(ax, title, ylabel, legend=len(keys) > 1)


def _marks(steps: list[float], key: str = "") -> dict[str, Any]:
    # sparse points (eval, short runs) need markers, or a lone point is invisible
    sparse = key.startswith("eval/") or len(steps) < 30
    return {"marker": "o", "markersize": 4} if sparse else {}


def _decorate(ax: Any, title: str, ylabel: str, *, legend: bool = True) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # no "step 1.25"
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if legend:
        ax.legend(fontsize=8)


def _reward_figure(rows: list[dict[str, Any]], keys: list[str]) -> Any:
    fig, (ax,) = _figure()
    steps, mean = series(rows, "reward/mean")
    if steps:
        std = dict(zip(*series(rows, "reward/std")))
        lo = [m - std.get(s, math.nan) for s, m in zip(steps, mean)]
        hi = [m + std.get(s, math.nan) for s, m in zip(steps, mean)]
        ax.plot(
            steps, _finite(mean), color="black", linewidth=2, label="reward/mean", **_marks(steps)
        )
        ax.fill_between(steps, _finite(lo), _finite(hi), color="grey", alpha=0.25, label="± std")
    for key in keys:
        if key not in ("reward/mean", "reward/std"):
            xs, ys = series(rows, key)
            ax.plot(xs, _finite(ys), label=key, linewidth=1.5, **_marks(xs))
    _decorate(ax, "Reward", "reward")
    return fig


def _eval_figure(rows: list[dict[str, Any]], keys: list[str]) -> Any:
    losses = [k for k in keys if k.endswith("loss")]
    scores = [k for k in keys if k not in losses]
    groups = [(g, t) for g, t in ((scores, "Eval score"), (losses, "Eval loss")) if g]
    fig, axes = _figure(len(groups))
    for ax, (group, title) in zip(axes, groups):
        _lines(ax, rows, group, title, "loss" if group is losses else "score")
        if len(group) == 1:
            ax.legend(fontsize=8)
    return fig


def _load_matrix(row: dict[str, Any]) -> Any:
    """[L, E] load fractions of an `expert_load.jsonl` row (None if it has none); bad cells NaN."""
    import numpy as np

    layers = row.get("load_fraction")
    if not isinstance(layers, list) or not any(isinstance(r, list) and r for r in layers):
        return None
    cells = [[as_float(x) for x in r] if isinstance(r, list) else [] for r in layers]
    width = max(len(r) for r in cells)  # a ragged layer is padded, not fatal
    return np.array([[math.nan if x is None else x for x in r] + [math.nan] * (width - len(r)) for r in cells])  # fmt: skip


def _heatmap_figure(load_rows: list[dict[str, Any]]) -> Any:
    import numpy as np

    picks = [load_rows[0], load_rows[-1]] if len(load_rows) > 1 else load_rows[:1]
    mats = [_load_matrix(r) for r in picks]
    num_layers, num_experts = mats[-1].shape
    uniform = 1.0 / num_experts
    # Colour is log2(load / uniform): 2x over- and 2x under-loaded look equally strong, and a
    # dead expert (-inf) saturates blue instead of one hot expert washing out the scale.
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = [np.log2(m / uniform) for m in mats]
    finite = np.concatenate([r[np.isfinite(r)] for r in ratios])
    bound = float(np.clip(math.ceil(np.abs(finite).max()) if finite.size else 1, 1, 3))
    fig, axes = _figure(len(picks), constrained=True)
    annotate = num_layers * num_experts <= 64
    for ax, row, mat, ratio in zip(axes, picks, mats, ratios):
        shown = np.clip(np.where(np.isneginf(ratio), -bound, ratio), -bound, bound)
        im = ax.imshow(shown, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")  # fmt: skip
        ax.set_title(f"step {row.get('step', '?')}")
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.get_major_locator().set_params(integer=True)
        if annotate:
            for (i, j), v in np.ndenumerate(mat):
                if math.isfinite(v):  # white on the saturated cells, black on the pale ones
                    color = "white" if abs(shown[i, j]) > 0.6 * bound else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=color)
    bar = fig.colorbar(im, ax=axes, shrink=0.9)
    ticks = np.arange(-bound, bound + 1)
    bar.set_ticks(ticks, labels=[f"{2.0**t:g}x" for t in ticks])
    bar.set_label(f"load / uniform (1/E = {uniform:.3g})")
    fig.suptitle("Expert load per MoE layer" + (" (numbers: load fraction)" if annotate else ""))
    return fig


def _load_entropy_figure(load_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> Any:
    fig, (ax,) = _figure()
    per_step: list[tuple[float, list[Any]]] = []
    for r in load_rows:
        step, entropy = as_float(r.get("step")), r.get("entropy")
        if step is not None and isinstance(entropy, list):
            per_step.append((step, entropy))
    num_layers = max((len(e) for _, e in per_step), default=0)
    if not num_layers:  # no expert_load.jsonl: the layer-averaged train-log keys are all there is
        _lines(ax, rows, match_keys(numeric_keys(rows), ["moe/load_entropy*"]), "", "")
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    norm, steps = Normalize(0, max(num_layers - 1, 1)), [s for s, _ in per_step]
    for layer in range(num_layers):
        values = [as_float(e[layer]) if layer < len(e) else None for _, e in per_step]
        ys = _finite([math.nan if v is None else v for v in values])
        color = colormaps["viridis"](norm(layer))
        ax.plot(steps, ys, color=color, label=f"layer {layer}", **_marks(steps))
    if num_layers > 8:  # dozens of layers: a colour scale reads better than a legend
        fig.colorbar(ScalarMappable(norm=norm, cmap="viridis"), ax=ax).set_label("MoE layer")
    title = "Normalised expert-load entropy" + (" per layer" if num_layers else "")
    _decorate(ax, title, "entropy / log E", legend=num_layers <= 8)
    ax.set_ylim(0.0, 1.02)
    return fig


def plan_figures(
    rows: list[dict[str, Any]], load_rows: list[dict[str, Any]]
) -> list[tuple[str, Any]]:
    """(file name, zero-argument drawing function) for every figure whose data exist."""
    keys = numeric_keys(rows)
    used: set[str] = set()
    jobs: list[tuple[str, Any]] = []
    special = {"reward.png": _reward_figure, "eval.png": _eval_figure}
    for name, title, ylabel, patterns in _CURVES:
        chosen = [k for k in match_keys(keys, patterns) if k not in used]
        used.update(chosen)
        if name == "reward_faults.png":  # counts that stayed 0 throughout are not drawn
            chosen = [k for k in chosen if any(series(rows, k)[1])]
        if name == "expert_load_heatmap.png":
            if good := [r for r in load_rows if _load_matrix(r) is not None]:
                jobs.append((name, partial(_heatmap_figure, good)))
        elif name == "load_entropy.png":
            if chosen or any(isinstance(r.get("entropy"), list) for r in load_rows):
                jobs.append((name, partial(_load_entropy_figure, load_rows, rows)))
        elif chosen and name in special:
            jobs.append((name, partial(special[name], rows, chosen)))
        elif chosen:
            chosen += [k for k in [_OVERLAY.get(name, "")] if k in keys]
            jobs.append((name, partial(_one_curve, rows, chosen, title, ylabel)))
    groups: dict[str, list[str]] = {}
    for k in keys:  # anything else that was logged: one figure per `group/`
        if k not in used:
            groups.setdefault(k.split("/")[0], []).append(k)
    for group, chosen in groups.items():
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in group) + ".png"
        name = name if name not in {n for n, _ in jobs} else f"extra_{name}"
        jobs.append((name, partial(_one_curve, rows, chosen, group, group)))
    return jobs


def _one_curve(rows: list[dict[str, Any]], keys: list[str], title: str, ylabel: str) -> Any:
    fig, (ax,) = _figure()
    _lines(ax, rows, keys, title, ylabel)
    if keys == ["grad_norm"] or keys == ["lr"]:
        values = [v for v in series(rows, keys[0])[1] if math.isfinite(v) and v > 0]
        if values and max(values) > 100 * min(values):  # spikes would flatten everything else
            ax.set_yscale("log")
    return fig
