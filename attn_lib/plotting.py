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


# ----------------------------------------------------------------------------- SK and CBAM chapters
def plot_seed_spread(runs: Mapping[str, Mapping[int, dict]], metric: str = "val_top1", ax=None,
                     first_epoch: int = 1):
    """Per-epoch ``metric`` of several seeds per run: the mean as a line, the range over seeds
    (min to max) as a band, each seed as a thin line. ``runs`` is ``{name: {seed: history}}``."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.5))
    for name, seeds in runs.items():
        curves = [{e["epoch"]: e[metric] for e in h["epochs"] if metric in e} for h in seeds.values()]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        epochs = [e for e in epochs if e >= first_epoch]
        if not epochs:
            raise ValueError(f"no epoch >= {first_epoch} with {metric!r} in every run of {name!r}")
        values = np.array([[c[e] for e in epochs] for c in curves])
        line, = ax.plot(epochs, values.mean(0), marker="o", ms=3,
                        label=f"{name} (mean of {len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            ax.fill_between(epochs, values.min(0), values.max(0), color=line.get_color(), alpha=0.2,
                            lw=0)
            for v in values:
                ax.plot(epochs, v, color=line.get_color(), lw=0.6, alpha=0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def _diagram(ax):
    """``box(x, y, text, ...)`` and ``arrow(x0, y0, x1, y1, text=None)`` drawing on ``ax``."""
    from matplotlib.patches import FancyBboxPatch

    def box(x, y, text, w=1.25, h=0.55, colour="white", size=8.5):
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.03",
                                    fc=colour, ec="0.3", lw=1))
        ax.text(x, y, text, ha="center", va="center", fontsize=size)

    def arrow(x0, y0, x1, y1, text=None, colour="0.25", style=None):
        props = dict(arrowstyle="->", color=colour, lw=1.1)
        if style:
            props["connectionstyle"] = style
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=props)
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", fontsize=8, color="0.15")

    return box, arrow


def draw_sk_unit():
    """The Selective Kernel unit (Li et al., CVPR 2019) as boxes and arrows: split into two
    3x3 branches (dilation 1 and 2), fuse (sum, pool, squeeze to ``z``), select (a softmax over
    the branches for every channel) and sum. Returns the figure."""
    from matplotlib.patches import FancyBboxPatch

    fig, ax = plt.subplots(figsize=(11, 4.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 4.2)
    ax.axis("off")
    for name, x0, width, colour in [("Split", 0.85, 3.0, "#dbe9f6"), ("Fuse", 3.95, 3.25, "#fde9d9"),
                                    ("Select", 7.3, 3.55, "#e2f0d9")]:
        ax.add_patch(FancyBboxPatch((x0, 0.15), width, 3.8, boxstyle="round,pad=0.02", fc=colour,
                                    ec="none"))
        ax.text(x0 + width / 2, 3.75, name, ha="center", fontsize=12, weight="bold")
    box, arrow = _diagram(ax)
    box(0.45, 2.0, "X", w=0.5)
    box(2.35, 2.85, "3×3, dil. 1\nBN, ReLU", w=1.5, h=0.7)
    box(2.35, 1.15, "3×3, dil. 2\nBN, ReLU", w=1.5, h=0.7)
    arrow(0.7, 2.1, 1.6, 2.8)
    arrow(0.7, 1.9, 1.6, 1.2)
    box(4.4, 2.0, "+", w=0.45)
    arrow(3.1, 2.85, 4.17, 2.1, "$U_1$")
    arrow(3.1, 1.15, 4.17, 1.9, "$U_2$")
    box(5.4, 2.0, "GAP", w=0.7)
    arrow(4.62, 2.0, 5.05, 2.0, "$U$")
    box(6.55, 2.0, "W, BN, ReLU\n$C \\to d$", w=1.2, h=0.7)
    arrow(5.75, 2.0, 5.95, 2.0, "$s$")
    box(8.0, 2.0, "$A_1 z,\\ A_2 z$\nsoftmax over\nbranches", w=1.15, h=0.95)
    arrow(7.15, 2.0, 7.42, 2.0, "$z$")
    box(9.35, 2.85, "$a_1 \\odot U_1$", w=1.0)
    box(9.35, 1.15, "$a_2 \\odot U_2$", w=1.0)
    arrow(8.55, 2.2, 8.85, 2.75)
    arrow(8.55, 1.8, 8.85, 1.25)
    box(10.45, 2.0, "+  →  V", w=0.8)
    arrow(9.85, 2.85, 10.2, 2.15)
    arrow(9.85, 1.15, 10.2, 1.85)
    ax.text(5.5, 0.35, "$a_{1,c} + a_{2,c} = 1$ for every channel $c$: each channel chooses its "
            "receptive field", ha="center", fontsize=9, style="italic")
    fig.tight_layout()
    return fig


def draw_cbam():
    """CBAM (Woo et al., ECCV 2018) as boxes and arrows: the channel gate on top (average- and
    max-pooled descriptors, one shared MLP, sigmoid), the spatial gate below (mean and max over
    the channels, a 7x7 convolution, sigmoid), each multiplying its input. Returns the figure."""
    fig, ax = plt.subplots(figsize=(12, 4.4))
    ax.set_xlim(0, 12.4)
    ax.set_ylim(-0.15, 5.75)
    ax.axis("off")
    box, arrow = _diagram(ax)
    grey, blue, orange, green = "#f3f3f3", "#e8eef7", "#fde9c9", "#d9f0d9"
    for y, title in ((5.5, "channel gate: what"), (2.45, "spatial gate: where")):
        ax.text(0.1, y, title, fontsize=10, weight="bold")
    box(0.8, 3.8, "F\nC×H×W", h=0.62, colour=grey)
    box(2.6, 4.4, "AvgPool over H,W\nC", w=1.6, h=0.62, colour=blue)
    box(2.6, 3.2, "MaxPool over H,W\nC", w=1.6, h=0.62, colour=blue)
    box(4.8, 3.8, "shared MLP\nC → C/r → C", w=1.6, h=1.5, colour=orange)
    box(8.8, 3.8, "$M_c$\nC×1×1", h=0.62, colour=green)
    box(11.4, 3.8, "$F' = M_c \\otimes F$\nC×H×W", w=1.6, h=0.62, colour=grey)
    for y in (4.4, 3.2):
        arrow(1.45, 3.8, 1.8, y)
        arrow(3.4, y, 4.0, y)
        arrow(5.6, y, 6.35, 3.8)
    box(0.8, 1.1, "F'\nC×H×W", h=0.62, colour=grey)
    box(2.6, 1.7, "mean over C\n1×H×W", w=1.6, h=0.62, colour=blue)
    box(2.6, 0.5, "max over C\n1×H×W", w=1.6, h=0.62, colour=blue)
    box(4.8, 1.1, "concat\n2×H×W", w=1.3, h=0.62, colour=blue)
    box(6.4, 1.1, "conv 7×7\n2 → 1", w=1.3, h=0.62, colour=orange)
    box(8.8, 1.1, "$M_s$\n1×H×W", h=0.62, colour=green)
    box(11.4, 1.1, "$F'' = M_s \\otimes F'$\nC×H×W", w=1.6, h=0.62, colour=grey)
    for y in (1.7, 0.5):
        arrow(1.45, 1.1, 1.8, y)
        arrow(3.4, y, 4.15, 1.1)
    for y, plus in ((3.8, True), (1.1, False)):
        if plus:
            box(6.6, y, "+", w=0.5, h=0.62, colour=blue)
        box(7.6, y, "σ", w=0.5, h=0.62, colour=blue)
        box(10.1, y, "⊗", w=0.5, h=0.62, colour=blue)
        steps = ((6.85, 7.35), (7.85, 8.15), (9.45, 9.85), (10.35, 10.6)) if plus else \
            ((5.45, 5.75), (7.05, 7.35), (7.85, 8.15), (9.45, 9.85), (10.35, 10.6))
        for x0, x1 in steps:
            arrow(x0, y, x1, y)
    arrow(0.8, 4.11, 10.1, 4.05, colour="0.6", style="bar,fraction=-0.07")
    arrow(0.8, 0.79, 10.1, 0.85, colour="0.6", style="bar,fraction=0.07")
    fig.tight_layout()
    return fig


__all__ += ["draw_cbam", "draw_sk_unit", "plot_seed_spread"]


# ----------------------------------------------------------------------------- the comparison chapter
def plot_accuracy_vs_cost(rows: Sequence[dict], axes=None):
    """Accuracy (mean ± std over seeds) against two costs, for ``attn_lib.compare.mechanism_table``
    rows: added forward FLOPs (%, log scale) and the GPU training-step time ratio. The plain
    network is the grey band (its mean ± std); rows without a recorded accuracy are left out."""
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    base = next(r for r in rows if r["name"] == "none")["accuracy"]
    costs = (("flops_added_pct", "forward FLOPs added (%, log scale)"),
             ("gpu_step_ratio", "training-step time on the GPU (× plain)"))
    for ax, (key, xlabel) in zip(axes, costs):
        ax.axhspan(base["mean"] - base["std"], base["mean"] + base["std"], color="0.85",
                   label="plain ResNet-18, mean ± std")
        ax.axhline(base["mean"], color="0.5", lw=1)
        shown = [r for r in rows if r["name"] != "none" and r.get("accuracy")
                 and r.get(key) is not None]
        for i, r in enumerate(shown):
            acc = r["accuracy"]
            spread = acc["std"] if acc["n"] > 1 else 0.0
            ax.errorbar(r[key], acc["mean"], yerr=spread, fmt="o", capsize=3,
                        color=f"C{i}", mfc="white" if acc["n"] == 1 else f"C{i}")
            # labels alternate above and below their point, so that equal accuracies stay legible
            ax.annotate(f"{r['label']} ({acc['n']})", (r[key], acc["mean"]), fontsize=8,
                        xytext=(4, 4 if i % 2 == 0 else -11), textcoords="offset points")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_ylabel("val top-1 (%)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].figure.tight_layout()
    return axes


def plot_paired_differences(differences: Mapping[str, Mapping[str, float]], ax=None,
                            xlabel: str = "attention minus plain, val top-1 (points)"):
    """Paired differences with their confidence intervals, one row per label:
    ``{label: {"differences": [...], "mean", "low", "high"}}`` (as
    ``attn_lib.course.paired_seed_difference`` returns). Each seed is a dot, the mean a bar."""
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * len(differences)))
    for i, (label, d) in enumerate(differences.items()):
        y = len(differences) - 1 - i
        ax.plot(d["differences"], [y] * len(d["differences"]), "o", color="C0", alpha=0.6, ms=4)
        if d["low"] == d["low"]:  # not NaN
            ax.plot([d["low"], d["high"]], [y, y], color="C1", lw=2)
        ax.plot([d["mean"]], [y], "|", color="C1", ms=14, mew=2)
    ax.axvline(0, color="0.4", lw=1)
    ax.set_yticks(range(len(differences)))
    ax.set_yticklabels(list(differences)[::-1], fontsize=9)
    ax.set_xlabel(f"{xlabel}: seeds (dots), mean and 95% CI (orange)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.figure.tight_layout()
    return ax


def plot_gallery(image: np.ndarray, views: Mapping[str, dict], cams: Mapping[str, np.ndarray],
                 index: int = 0, title: str = "", size: float = 1.45,
                 labels: Mapping[str, str] | None = None):
    """One image through every trained network: the top row shows what each mechanism did
    (``attn_lib.compare.attention_views``: a map over the image, a grid of channel gates or a
    curve over depth), the bottom row each network's Grad-CAM. ``cams`` has a ``"none"`` entry
    for the plain network, shown under the image itself; ``labels`` names the networks
    (default: their keys)."""
    labels = {"none": "plain", **(labels or {})}
    names = ["none"] + [n for n in views]
    fig, axes = plt.subplots(2, len(names), figsize=(size * len(names), 2 * size + 0.5),
                             squeeze=False)
    extent = (-0.5, image.shape[1] - 0.5, image.shape[0] - 0.5, -0.5)
    for j, name in enumerate(names):
        top, bottom = axes[0, j], axes[1, j]
        if name == "none":
            top.imshow(image, interpolation="nearest")
            top.set_title(title, fontsize=8)
        else:
            view = views[name]
            values = view["values"][index].detach().float().cpu().numpy()
            if view["kind"] == "map":
                top.imshow(image, interpolation="nearest")
                top.imshow(values, cmap="viridis", alpha=0.6, interpolation="nearest",
                           extent=extent)
            elif view["kind"] == "grid":
                top.imshow(values, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            else:
                top.plot(range(1, len(values) + 1), values, marker="o", ms=3)
                top.set_ylim(0, 1)
                top.set_xlabel("block", fontsize=7, labelpad=1)
                top.tick_params(labelsize=6)
            top.set_title(view["title"], fontsize=7)
        if name in cams:
            bottom.imshow(image, interpolation="nearest")
            bottom.imshow(cams[name][index], cmap="jet", alpha=0.5, extent=extent)
        bottom.set_title(f"Grad-CAM, {labels.get(name, name)}", fontsize=7)
    for ax in axes.flat:
        if not ax.lines:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


__all__ += ["plot_accuracy_vs_cost", "plot_paired_differences", "plot_gallery"]


def figure_png(fig, dpi: float | None = None) -> bytes:
    """``fig`` as PNG bytes (trimmed to its contents), and closed: for an ``ipywidgets.Image``
    that a widget redraws (an image widget needs no output capture, so it also runs where an
    ``interact`` that draws a large figure would stall a notebook runner). ``dpi``: default
    matplotlib's."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


__all__ += ["figure_png"]
