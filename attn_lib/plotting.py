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
