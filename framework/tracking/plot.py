"""The loss curve sent to MLflow (``plots/loss_curve.png``), drawn by the courier from the step
records with matplotlib's Agg canvas.

Left: the training loss against tokens as the record's window means (each step's own loss faint
behind them), each held-out set's bound on the same axes, the learning rate on a second axis.
Right: the training loss by mask ratio, one line per tenth of t, coloured by t (a colour bar, not
a legend). A long run reads the same: past MAX_POINTS records a curve is drawn as the means of
equal runs of records (the single steps as the band of their range), so a million steps neither
overplot nor slow the courier down.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

MAX_POINTS = 1500  # per curve


def draw_curve(steps: List[dict], path: Path, spec: Dict[str, Optional[str]]) -> bool:
    """The curve of ``spec`` (``x``, ``y``, ``raw``, ``lr``, ``by``, ``val``: metric names and
    prefixes, see framework/training/metrics.PLOT) from the step records; False when there is
    nothing to draw."""
    from matplotlib import cm, colormaps, colors
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    if not steps:
        return False
    x, y, raw, by, val = spec["x"], spec["y"], spec.get("raw"), spec["by"], spec.get("val")
    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[3, 2])
    names = {k for r in steps for k in r["metrics"]}

    def points(key: str) -> Tuple[np.ndarray, np.ndarray]:
        pts = [(r["metrics"].get(x, r["step"]), r["metrics"][key]) for r in steps
               if key in r["metrics"] and math.isfinite(r["metrics"][key])]
        return (np.array([p[0] for p in pts], dtype=float),
                np.array([p[1] for p in pts], dtype=float))

    shown: List[np.ndarray] = []  # the loss values on the left axes: its y range
    xs, ys = points(y)
    if raw and raw in names and len(xs):
        rx, ry = points(raw)
        if len(rx) <= MAX_POINTS:
            left.plot(rx, ry, color="C0", alpha=0.3, linewidth=0.8,
                      label="train loss, the recorded step's own")
            shown.append(ry)
        else:
            bx, _, low, high = _binned(rx, ry)
            left.fill_between(bx, low, high, color="C0", alpha=0.15, linewidth=0,
                              label="train loss, range of the single steps")
            shown += [low, high]
    if len(xs):
        bx, means, _, _ = _binned(xs, ys)
        left.plot(bx, means, color="C0", linewidth=1.8,
                  label="train loss (mean over each record's steps)")
        shown.append(means)
    vals = sorted(k for k in names if val and k.startswith(val) and k.endswith("/loss"))
    for i, key in enumerate(vals):
        vx, vy = points(key)
        bx, vm, _, _ = _binned(vx, vy)
        left.plot(bx, vm, color=f"C{i + 1}", marker="o" if len(bx) <= 60 else None,
                  markersize=3.5, linewidth=1.4,
                  label=f"held-out {key.removeprefix(val).removesuffix('/loss')} (bound)")
        shown.append(vm)
    _clip(left, shown)
    handles, labels = left.get_legend_handles_labels()
    lr = spec.get("lr")
    if lr and lr in names:
        twin = left.twinx()
        lx, ly = points(lr)
        bx, lm, _, _ = _binned(lx, ly)
        twin.plot(bx, lm, color="0.45", linestyle="--", linewidth=1.0, label="learning rate")
        twin.set_ylabel("learning rate")
        twin.set_ylim(bottom=0)
        twin.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2g}"))
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    if handles:  # below the axes: over them it would hide a curve
        left.legend(handles, labels, fontsize="small", loc="upper center", ncols=2,
                    bbox_to_anchor=(0.5, -0.13), frameon=False)
    left.set(xlabel="tokens", ylabel="loss (nats per token)",
             title="training loss and held-out bound" if vals else "training loss")

    buckets = sorted((k for k in names if k.startswith(by)), key=_bucket_start)
    cmap, norm = colormaps["viridis"], colors.Normalize(0.0, 1.0)
    shown = []
    for key in buckets:
        bx, bm, _, _ = _binned(*points(key))
        right.plot(bx, bm, color=cmap(norm(_bucket_start(key) + 0.05)), linewidth=1.2)
        shown.append(bm)
    _clip(right, shown)
    if buckets:
        bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=right, pad=0.01)
        bar.set_label("mask ratio t (tenths)")
    right.set(xlabel="tokens", ylabel="loss (nats per token)",
              title="training loss by mask ratio (means over each record's steps)")
    tokens = FuncFormatter(lambda v, _: _si(v))
    for ax in (left, right):
        ax.xaxis.set_major_formatter(tokens)
        ax.grid(alpha=0.3)
    tmp = path.with_name(f"tmp-{path.name}")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return True


def _clip(ax, shown: List[np.ndarray]) -> None:
    """The y range of the values drawn, from the 0.5th to the 99.5th percentile: a long run's
    first steps (and the rare spike of a noisy curve) do not squash the rest."""
    if not shown or not sum(len(v) for v in shown):
        return
    every = np.concatenate(shown)
    low, high = (float(v) for v in np.percentile(every, [0.5, 99.5]))
    pad = 0.05 * max(high - low, 1e-3)
    ax.set_ylim(low - pad, high + pad)


def _binned(xs: np.ndarray, ys: np.ndarray):
    """(x, mean, min, max) per run of records: the points themselves up to MAX_POINTS."""
    if len(xs) <= MAX_POINTS:
        return xs, ys, ys, ys
    parts = np.array_split(np.arange(len(xs)), MAX_POINTS)
    return (np.array([xs[p].mean() for p in parts]), np.array([ys[p].mean() for p in parts]),
            np.array([ys[p].min() for p in parts]), np.array([ys[p].max() for p in parts]))


def _bucket_start(key: str) -> float:
    """``train/loss_by_t/0.3-0.4`` -> 0.3."""
    try:
        return float(key.rsplit("/", 1)[-1].split("-")[0])
    except ValueError:
        return 0.0


def _si(value: float) -> str:
    """Tokens as 0, 512, 12K, 1.5M, 2B, 1.2T."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.0f}"
