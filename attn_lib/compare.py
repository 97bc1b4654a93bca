"""Every mechanism side by side (chapter 9): one table from the recorded files, the statistics
of seed noise, the experiments on when attention helps, and a gallery of what each trained
network attends to.

    rows = mechanism_table()                          # one row per mechanism, each cell sourced
    print(format_table(rows))
    seeds_needed(std=0.3, difference=0.2)             # seeds per network for a paired t-test
    views = attention_views(models["cbam"], "cbam", x)  # what the mechanism did, per image

Every figure comes from a committed file in :mod:`attn_lib.results`; a mechanism without a
recorded file gets ``None`` in that cell (and :func:`missing` says which), never a stand-in.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import results

__all__ = ["MECHANISMS", "EXPERIMENTS", "mechanism_table", "format_table", "missing",
           "seeds_needed", "paired_power", "experiment_group", "difference_by_epoch", "gallery_models",
           "attention_views", "experiments_estimate"]

#: The mechanisms in course order: ``(name, label, backbone)``.
MECHANISMS = (("se", "SE", "resnet18"), ("eca", "ECA", "resnet18"), ("sk", "SK", "resnet18"),
              ("cbam", "CBAM", "resnet18"), ("danet", "DANet", "resnet18"),
              ("nonlocal", "Non-local", "resnet18"), ("dia", "DIA", "resnet18"),
              ("triple", "Triple", "densenet121"))
LABELS = {"none": "plain", **{name: label for name, label, _ in MECHANISMS}}

#: The "when does attention help?" experiments: a plain and an SE ResNet-18, trained from
#: scratch on part of CIFAR-10's training set for 15 epochs. ``train_subset`` images are taken,
#: 5,000 of them held out for validation. At width 8 the SE reduction is 8, so that every SE
#: gate keeps as many hidden units (1, 2, 4, 8 by stage) as at width 16 with the paper's 16.
EXPERIMENTS = {
    "n5k-w16": {"label": "5,000 images, width 16", "width": 16, "train_subset": 10_000,
                "reduction": 16},
    "n5k-w8": {"label": "5,000 images, width 8", "width": 8, "train_subset": 10_000,
               "reduction": 8},
    "n20k-w8": {"label": "20,000 images, width 8", "width": 8, "train_subset": 25_000,
                "reduction": 8},
}
EXPERIMENT_EPOCHS, EXPERIMENT_VAL_SIZE = 15, 5000


def experiment_group(key: str) -> str:
    """The recorded group of one experiment: ``cifar10-cpu-{key}``."""
    if key not in EXPERIMENTS:
        raise ValueError(f"expected an experiment of {', '.join(EXPERIMENTS)}, got {key!r}")
    return f"cifar10-cpu-{key}"


def experiments_estimate(seeds: Sequence[int] = (0, 1, 2)) -> dict[str, float | str]:
    """Full mode's estimated GPU minutes for the whole experiment grid (plain and SE, ``seeds``).

    :func:`attn_lib.course.full_mode_estimate` per experiment, at its epochs and training images.
    Its speed per image is the full-width ResNet-18's, so for these narrower networks it should
    overstate the time; an estimate, not a measurement.
    """
    from .course import full_mode_estimate

    total = {"H100-class minutes": 0.0, "T4-class minutes": 0.0}
    for spec in EXPERIMENTS.values():
        got = full_mode_estimate(["none", "se"], seeds, epochs=EXPERIMENT_EPOCHS,
                                 train_images=spec["train_subset"] - EXPERIMENT_VAL_SIZE)
        for key in total:
            total[key] += got[key]
    return {**total, "basis": got["basis"] + ", at full width"}


# ----------------------------------------------------------------------------- the table
def _bench_rows(name: str, kind: str = "mechanism") -> dict[str, dict]:
    bench = results.load(name)
    return {r["attention"]: r for r in bench["rows"] if r.get("kind") == kind}


def _accuracy(runs: dict, name: str, metric: str) -> dict:
    from .course import paired_seed_difference, seed_summary

    summary = seed_summary({name: runs[name]}, metric)[name]
    out = {"n": summary["n"], "mean": summary["mean"], "std": summary["std"],
           "seeds": summary["seeds"]}
    if name != "none" and "none" in runs:
        paired = paired_seed_difference(runs, name, "none", metric)
        out.update(difference=paired["mean"], low=paired["low"], high=paired["high"],
                   p_value=paired["p_value"], paired_seeds=paired["seeds"])
    return out


def mechanism_table(gpu_runs: str = "cifar10-h200-r18", gpu_bench: str = "bench-modules-gpu",
                    cpu_bench: str = "bench-modules-cpu", densenet_bench: str = "bench-densenet-cpu",
                    metric: str = "val_top1") -> list[dict]:
    """One row per network (the plain ResNet-18 first, then :data:`MECHANISMS`).

    Costs are those of the full-width network on 32x32 images: parameters and forward FLOPs added
    (% of the plain backbone), and the training-step time and peak-memory ratios to the plain
    backbone measured in the same run, on the GPU and on the CPU (parameters and FLOPs, which
    are counted, from the CPU file when both have them). Accuracy: mean and sample std
    over the seeds of ``gpu_runs``, and the paired difference to the plain network with a 95%
    confidence interval (``scipy.stats.ttest_rel``). ``sources`` names each file a row reads.
    Triple attention lives on a DenseNet-121: its costs are relative to the plain DenseNet-121.
    """
    runs = results.load_runs(gpu_runs)
    benches = {(file, kind): _bench_rows(file, kind) for file in (gpu_bench, cpu_bench)
               for kind in ("mechanism", "densenet")}
    rows = []
    for name, label, backbone in (("none", "plain", "resnet18"),) + MECHANISMS:
        row = {"name": name, "label": label, "backbone": backbone, "sources": []}
        kind = "mechanism" if backbone == "resnet18" else "densenet"
        for prefix, file in (("gpu", gpu_bench), ("cpu", cpu_bench)):  # the CPU file's counts last
            r = benches[file, kind].get(name)
            if r is None:
                continue
            row.update({"params_added_pct": r["params_added_pct"],
                        "flops_added_pct": r["flops_added_pct"],
                        f"{prefix}_step_ratio": r["step_time_ratio"],
                        f"{prefix}_memory_ratio": r.get("peak_memory_ratio")})
            row["sources"].append(file)
        if backbone != "resnet18" and not row["sources"]:  # an older file without DenseNet rows
            dense = {r["name"]: r for r in results.load(densenet_bench)["rows"]}
            r, base = dense.get(name), dense.get("none")
            if r is not None and base is not None:
                row.update({"params_added_pct": 100 * (r["params"] / base["params"] - 1),
                            "flops_added_pct": 100 * (r["flops"] / base["flops"] - 1),
                            "cpu_step_ratio": r["step_time_ratio"],
                            "cpu_memory_ratio": r["peak_mib"] / base["peak_mib"]})
                row["sources"].append(densenet_bench)
        if backbone == "resnet18" and name in runs:
            row["accuracy"] = _accuracy(runs, name, metric)
            row["sources"] += [f"{gpu_runs}--{name}--s{s}" for s in row["accuracy"]["seeds"]]
        rows.append(row)
    return rows


def missing(rows: Sequence[dict]) -> dict[str, list[str]]:
    """Which cells of :func:`mechanism_table` no recorded file fills, by mechanism."""
    wanted = {"GPU step time": "gpu_step_ratio", "GPU memory": "gpu_memory_ratio",
              "CPU step time": "cpu_step_ratio", "GPU accuracy": "accuracy"}
    out = {}
    for row in rows:
        gaps = [what for what, key in wanted.items() if row.get(key) is None]
        if gaps:
            out[row["label"]] = gaps
    return out


def _cell(value, width: int) -> str:
    """A cost figure right-aligned in ``width`` columns: two decimals, ``<0.01`` for a tiny
    positive one, ``—`` for none recorded."""
    if value is None:
        text = "—"
    elif 0 < value < 0.005:
        text = "<0.01"
    else:
        text = f"{value:.2f}"
    return f"{text:>{width}s}"


def format_table(rows: Sequence[dict]) -> str:
    """:func:`mechanism_table` as fixed-width text, 88 columns at most."""
    head = (f"{'':10s}{'params':>8s}{'FLOPs':>8s}{'GPU':>7s}{'GPU':>7s}{'CPU':>7s}"
            f"{'val top-1 (%)':>17s}{'paired diff., 95% CI':>24s}")
    sub = (f"{'':10s}{'+%':>8s}{'+%':>8s}{'step×':>7s}{'mem×':>7s}{'step×':>7s}"
           f"{'mean ± std (n)':>17s}{'(points)':>24s}")
    lines = [head, sub]
    for r in rows:
        acc = r.get("accuracy")
        accuracy = diff = "—"
        if acc:
            spread = f"± {acc['std']:.2f} " if acc["n"] > 1 else ""
            accuracy = f"{acc['mean']:.2f} {spread}({acc['n']})"
            if "difference" in acc:
                ci = (f"[{acc['low']:+.2f}, {acc['high']:+.2f}]" if acc["low"] == acc["low"]
                      else "(one seed)")
                diff = f"{acc['difference']:+.2f} {ci}"
        label = r["label"] + ("*" if r["backbone"] != "resnet18" else "")
        lines.append(f"{label:10s}{_cell(r.get('params_added_pct'), 8)}"
                     f"{_cell(r.get('flops_added_pct'), 8)}{_cell(r.get('gpu_step_ratio'), 7)}"
                     f"{_cell(r.get('gpu_memory_ratio'), 7)}{_cell(r.get('cpu_step_ratio'), 7)}"
                     f"{accuracy:>17s}{diff:>24s}")
    if any(r["backbone"] != "resnet18" for r in rows):
        lines.append("* on a DenseNet-121, relative to the plain DenseNet-121")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- statistics
def paired_power(n: int, difference: float, std: float, alpha: float = 0.05) -> float:
    """Power of a two-sided paired t-test with ``n`` pairs, when the true mean difference is
    ``difference`` and the pairs' differences have standard deviation ``std``: the probability
    that ``scipy.stats.ttest_rel`` rejects at level ``alpha`` (from the noncentral t
    distribution, ``scipy.stats.nct``)."""
    from scipy import stats

    if n < 2:
        raise ValueError(f"expected at least 2 pairs, got n={n}")
    if std <= 0:
        raise ValueError(f"expected a positive standard deviation, got {std}")
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    shift = difference / (std / n ** 0.5)
    return float(stats.nct.sf(critical, df, shift) + stats.nct.cdf(-critical, df, shift))


def seeds_needed(std: float, difference: float, alpha: float = 0.05, power: float = 0.8,
                 most: int = 10_000) -> int:
    """The fewest seeds per network (pairs) for a paired t-test at level ``alpha`` to detect a
    true difference ``difference`` with probability ``power``, when the per-seed differences have
    standard deviation ``std`` (see :func:`paired_power`)."""
    if difference == 0:
        raise ValueError("a difference of 0 cannot be detected: expected a non-zero difference")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"expected alpha and power in (0, 1), got {alpha} and {power}")
    for n in range(2, most + 1):
        if paired_power(n, difference, std, alpha) >= power:
            return n
    raise ValueError(f"more than {most} seeds would be needed (difference {difference}, std {std})")


def difference_by_epoch(runs: dict, name: str = "se", base: str = "none",
                        metric: str = "val_top1", confidence: float = 0.95) -> dict:
    """``name - base`` epoch by epoch, paired by seed: ``{"epochs", "mean", "low", "high",
    "seeds"}`` (lists), each epoch's figures from
    :func:`attn_lib.course.paired_seed_difference` on the runs cut after that epoch."""
    from .course import paired_seed_difference

    pair = {n: runs[n] for n in (name, base)}
    epochs = sorted(set.intersection(*({e["epoch"] for e in h["epochs"] if metric in e}
                                       for seeds in pair.values() for h in seeds.values())))
    out = {"epochs": epochs, "mean": [], "low": [], "high": [], "seeds": []}
    for epoch in epochs:
        upto = {n: {s: {"epochs": [e for e in h["epochs"] if e["epoch"] <= epoch]}
                    for s, h in seeds.items()} for n, seeds in pair.items()}
        d = paired_seed_difference(upto, name, base, metric, confidence)
        for key in ("mean", "low", "high"):
            out[key].append(d[key])
        out["seeds"] = d["seeds"]
    return out


# ----------------------------------------------------------------------------- the gallery
def gallery_models(group: str = "cifar10-cpu-w16",
                   triple_group: str = "cifar10-cpu-densenet-k12") -> dict[str, torch.nn.Module]:
    """The recorded trained networks, by mechanism (``"none"`` first); those without recorded
    weights are left out (:func:`attention_views` needs a trained network)."""
    models = {}
    for name, _, backbone in (("none", "none", "resnet18"),) + MECHANISMS:
        try:
            models[name] = results.load_trained(triple_group if backbone != "resnet18" else group,
                                                name)
        except FileNotFoundError:
            continue
    return models


def _centre_query(attention: torch.Tensor, side: int, key_side: int) -> torch.Tensor:
    """The weights ``[B, key_side, key_side]`` that the centre position gives every key."""
    query = (side // 2) * side + side // 2
    return attention[:, query].reshape(-1, key_side, key_side)


@torch.no_grad()
def attention_views(model: torch.nn.Module, name: str, x: torch.Tensor) -> dict:
    """What mechanism ``name`` did for each image of ``x``, as one picture per image.

    Returns ``{"kind", "values", "title"}``: ``"map"`` (``[B, h, w]``, laid over the image),
    ``"grid"`` (``[B, rows, cols]``, a vector of channel gates shown as a grid) or ``"curve"``
    (``[B, blocks]``, one value per block, in depth order).

    * SE, ECA: the 128 channel gates of the last block;
    * SK: the weight of the dilated branch (3x3, dilation 2: a 5x5 window), averaged over
      channels, in each of the 8 blocks;
    * CBAM: the spatial gate of block ``layer3.1`` (8x8);
    * DANet, non-local: the weights of the centre position (the query) over every position;
    * DIA: the mean gate of each block of the shared LSTM, in depth order;
    * triple: the element-wise attention map of the predicted class.
    """
    from .inspect import collect_attention

    model.eval()
    if name in ("se", "eca"):
        gates = collect_attention(model, x)["layer4.1.gate"].flatten(1)  # [B, C]
        return {"kind": "grid", "values": gates.reshape(len(x), 8, -1),
                "title": f"{LABELS[name]}: last block's {gates.shape[1]} gates"}
    if name == "sk":
        weights = collect_attention(model, x)  # {block: [B, 2, C, 1, 1]}
        per_block = torch.stack([w[:, 1].mean((1, 2, 3)) for w in weights.values()], 1)
        return {"kind": "curve", "values": per_block, "title": "SK: dilated-branch weight"}
    if name == "cbam":
        spatial = collect_attention(model, x)["layer3.1.gate"]["spatial"][:, 0]
        return {"kind": "map", "values": spatial, "title": "CBAM: spatial gate"}
    if name in ("danet", "nonlocal"):
        attention = collect_attention(model, x)["layer3.1"]
        if name == "danet":
            attention = attention["position"]
        side, key_side = (round(attention.shape[1] ** 0.5), round(attention.shape[2] ** 0.5))
        return {"kind": "map", "values": _centre_query(attention, side, key_side),
                "title": f"{LABELS[name]}: centre query"}
    if name == "dia":
        from .modules.dia import collect_dia

        stages = collect_dia(model, x)  # {stage: {"gates": [B, T, C]}}
        per_block = torch.cat([s["gates"].mean(2) for s in stages.values()], 1)
        return {"kind": "curve", "values": per_block, "title": "DIA: mean gate"}
    if name == "triple":
        logits, attention = model(x, return_attention=True)
        element = attention["element"]  # [B, K, h, w]
        chosen = element[torch.arange(len(x)), logits.argmax(1)]
        return {"kind": "map", "values": chosen, "title": "Triple: class map"}
    raise ValueError(f"no view for {name!r}; expected one of {', '.join(LABELS)}")


def cam_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The layer Grad-CAM reads: the last stage of a ResNet, the last norm of a DenseNet."""
    return model.layer4 if hasattr(model, "layer4") else model.norm


def upsample(maps: torch.Tensor, size: int = 32) -> torch.Tensor:
    """``[B, h, w] -> [B, size, size]``, nearest neighbour (each cell stays a visible square)."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="nearest")[:, 0]
