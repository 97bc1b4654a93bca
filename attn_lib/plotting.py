"""Figures the chapters share: images, attention overlays, training curves, bars with spread."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

__all__ = ["denormalise", "show_images", "show_overlays", "plot_histories", "bar_with_spread"]


def denormalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[B, 3, H, W]`` normalised tensor -> ``[B, H, W, 3]`` floats in [0, 1] for imshow."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x.detach().cpu() * s + m).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def show_images(images: np.ndarray, titles: Sequence[str] | None = None, ncols: int = 8, size: float = 1.4):
    """A grid of ``[B, H, W, 3]`` images; returns the figure."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows + 0.3 * (titles is not None)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(images[i], interpolation="nearest")
        if titles is not None:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def show_overlays(images: np.ndarray, rows: Mapping[str, np.ndarray], titles: Sequence[str] | None = None,
                  cmap: str = "jet", alpha: float = 0.5, size: float = 1.5):
    """First row: the images; then one row per named ``[B, H, W]`` map, overlaid on the images."""
    n = len(images)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(size * n, size * (1 + len(rows))), squeeze=False)
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        if titles is not None:
            axes[0, j].set_title(titles[j], fontsize=8)
        for i, (name, maps) in enumerate(rows.items(), start=1):
            axes[i, j].imshow(images[j], interpolation="nearest")
            axes[i, j].imshow(maps[j], cmap=cmap, alpha=alpha, interpolation="bilinear",
                              extent=(-0.5, images[j].shape[1] - 0.5, images[j].shape[0] - 0.5, -0.5))
            if j == 0:
                axes[i, j].set_ylabel(name, fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return fig


def plot_histories(histories: Mapping[str, dict], metric: str = "val_top1", ax=None):
    """One curve per run of ``metric`` against epoch (from ``history.json`` dicts)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for name, h in histories.items():
        epochs = [e["epoch"] for e in h["epochs"] if metric in e]
        ax.plot(epochs, [e[metric] for e in h["epochs"] if metric in e], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend()
    return ax


def bar_with_spread(values: Mapping[str, Sequence[float]], ylabel: str, ax=None):
    """Mean ± std bars, one per key, with the individual values as dots."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.5))
    names = list(values)
    means = [float(np.mean(values[k])) for k in names]
    stds = [float(np.std(values[k], ddof=1)) if len(values[k]) > 1 else 0.0 for k in names]
    ax.bar(names, means, yerr=stds, capsize=4, alpha=0.7)
    for i, k in enumerate(names):
        ax.scatter([i] * len(values[k]), values[k], color="k", s=10, zorder=3)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return ax


# ----------------------------------------------------------------------------- several seeds
def plot_seed_curves(runs: Mapping[str, Mapping[int, dict]], metric: str = "val_top1", ax=None,
                     band: str = "std"):
    """Per-epoch ``metric`` of runs with several seeds: the mean over seeds as a line, the spread
    as a band (``band="std"``: mean ± sample std; ``"range"``: min to max), each seed faintly.

    ``runs`` is ``{name: {seed: history}}`` as :func:`attn_lib.course.train_or_load` returns it.
    Epochs are those every seed of a run has. Returns the axes.
    """
    if band not in ("std", "range"):
        raise ValueError(f"expected band 'std' or 'range', got {band!r}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    for i, (name, seeds) in enumerate(runs.items()):
        color = f"C{i}"
        curves = [{e["epoch"]: e[metric] for e in h["epochs"] if metric in e} for h in seeds.values()]
        epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not epochs:
            raise ValueError(f"run {name!r} has no epoch with {metric!r}")
        values = np.array([[c[e] for e in epochs] for c in curves])  # [seeds, epochs]
        for row in values:
            ax.plot(epochs, row, color=color, lw=0.6, alpha=0.35)
        mean = values.mean(0)
        if band == "std" and len(values) > 1:
            spread = values.std(0, ddof=1)
            low, high = mean - spread, mean + spread
        else:
            low, high = values.min(0), values.max(0)
        what = "± std" if band == "std" and len(values) > 1 else "range"
        ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)
        ax.plot(epochs, mean, color=color, lw=1.6, label=f"{name} (mean of {len(values)}, {what})")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


# ----------------------------------------------------------------------------- diagrams
def _diagram_box(ax, x, y, text, w=1.2, h=0.9, color="#dbe9f6", fontsize=9):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                fc=color, ec="0.35", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _diagram_arrow(ax, x0, y0, x1, y1, label=None):
    ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", color="0.25", lw=1.2))
    if label:
        ax.text((x0 + x1) / 2, y0 + 0.08, label, ha="center", va="bottom", fontsize=8, color="0.2")


def _diagram_detour(ax, x0, x1, y_from, y_to, level, label):
    """A path that leaves (x0, y_from), runs at height ``level`` and enters (x1, y_to)."""
    ax.plot([x0, x0, x1], [y_from, level, level], color="0.25", lw=1.2)
    _diagram_arrow(ax, x1, level, x1, y_to)
    ax.text((x0 + x1) / 2, level + (0.08 if level > 0 else -0.08), label, ha="center",
            va="bottom" if level > 0 else "top", fontsize=8, color="0.2")


def draw_se_block(ax=None):
    """The Squeeze-and-Excitation block as a diagram: squeeze, excitation, scale. Returns the axes."""
    from matplotlib.patches import FancyBboxPatch

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 3.2))
    steps = [("U\n[C, H, W]", "#f3e3c3"), ("squeeze\nGAP", "#dbe9f6"), ("FC\nC → C/r", "#e2f0d9"),
             ("ReLU δ", "#e2f0d9"), ("FC\nC/r → C", "#e2f0d9"), ("sigmoid σ", "#e2f0d9"),
             ("scale\nu_c · s_c", "#dbe9f6"), ("X̃\n[C, H, W]", "#f3e3c3")]
    between = ["", "z: [C]", "[C/r]", "[C/r]", "[C]", "s: [C]", ""]
    xs = np.arange(len(steps)) * 1.9
    for (text, color), x in zip(steps, xs):
        _diagram_box(ax, x, 0, text, color=color)
    for i in range(len(steps) - 1):
        _diagram_arrow(ax, xs[i] + 0.64, 0, xs[i + 1] - 0.64, 0, between[i])
    _diagram_detour(ax, xs[0], xs[6], 0.49, 0.49, 1.05,
                    "U itself: every pixel of channel c is multiplied by s_c")
    ax.add_patch(FancyBboxPatch((xs[2] - 0.68, -0.72), xs[5] - xs[2] + 1.36, 1.44,
                                boxstyle="round,pad=0.02", fc="none", ec="#5b9a3c", ls="--"))
    ax.text((xs[2] + xs[5]) / 2, -0.85, "excitation: s = σ(W₂ δ(W₁ z))", ha="center", va="top",
            fontsize=9, color="#3d6b27")
    ax.set_xlim(-0.8, xs[-1] + 0.8)
    ax.set_ylim(-1.2, 1.5)
    ax.axis("off")
    ax.set_title("The Squeeze-and-Excitation block", fontsize=11)
    return ax


def draw_gate_placement(gate: str = "SE", axes=None):
    """Two residual blocks: the gate on the branch before the addition (as the papers place SE,
    ECA and CBAM) and the gate after the addition (where it scales the shortcut too).
    Returns the two axes."""
    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(11, 3.6))
    layouts = [
        (f"{gate} on the residual branch, before the addition (the paper; attn_lib)",
         ["x", "conv3×3\nBN, ReLU", "conv3×3\nBN", gate, "+", "ReLU", "out"], 3),
        (f"{gate} after the addition: the shortcut is gated too",
         ["x", "conv3×3\nBN, ReLU", "conv3×3\nBN", "+", gate, "ReLU", "out"], 4),
    ]
    for ax, (title, names, gate_at) in zip(axes, layouts):
        xs = np.arange(len(names)) * 1.55
        plus = names.index("+")
        for i, (name, x) in enumerate(zip(names, xs)):
            color = "#f8cbad" if i == gate_at else "#f3e3c3" if name in ("x", "out") else "#dbe9f6"
            small = name == "+"
            _diagram_box(ax, x, 0, name, w=0.55 if small else 1.1, h=0.55 if small else 0.8,
                         color=color)
        for i in range(len(names) - 1):
            left = 0.3 if names[i] == "+" else 0.57
            right = 0.3 if names[i + 1] == "+" else 0.57
            _diagram_arrow(ax, xs[i] + left, 0, xs[i + 1] - right, 0)
        _diagram_detour(ax, xs[0], xs[plus], -0.41, -0.28, -0.75, "shortcut (identity)")
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.7, xs[-1] + 0.7)
        ax.set_ylim(-1.1, 0.6)
        ax.axis("off")
    axes[0].figure.tight_layout()
    return axes


__all__ += ["plot_seed_curves", "draw_se_block", "draw_gate_placement"]
