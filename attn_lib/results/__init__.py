"""Recorded runs that ship with the package, so a reader without a GPU still sees real results.

Each ``*.json`` here was written by ``python -m attn_lib train`` or ``python -m attn_lib bench``
and records the command, git commit, hardware and seed that produced it; each ``weights/*.pt``
is a float16 copy of the final model of one such run, loadable with
``torch.load(weights_only=True)`` (float16 can flip a prediction whose logit margin is tiny, so
its accuracy may differ from the recorded one by an image or two).

    histories = load_histories("cifar10-cpu-w16")     # {"none": {...}, "se": {...}, ...}
    runs = load_runs("cifar10-h200-r18")              # {"none": {0: {...}, 1: ..., 2: ...}, ...}
    model = load_trained("cifar10-cpu-w16", "se")      # the trained ResNet-18, eval mode

Groups: ``cifar10-cpu-w16`` are width-16 ResNet-18s trained for 5 epochs on a CPU (with weights,
for the chapters' visualisations); ``cifar10-h200-r18`` are full-width ResNet-18s trained for 20
epochs on an NVIDIA H200, several seeds (``{group}--{attention}--s{seed}.json``, histories only),
copied unchanged from the runs' own output: their ``meta`` says how each was made;
``cifar10-cpu-n5k-w16``, ``cifar10-cpu-n5k-w8`` and ``cifar10-cpu-n20k-w8`` are the comparison
chapter's experiments (a plain and an SE ResNet-18 of width 16 or 8, trained for 15 epochs on
5,000 or 20,000 images, three seeds each; histories only, see ``attn_lib.compare.EXPERIMENTS``).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

__all__ = ["available", "commit_label", "load", "load_histories", "load_runs", "load_trained", "summarise"]


def available() -> list[str]:
    """Names of the recorded results files (without ``.json``)."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def _expect_name(value, what: str, example: str) -> None:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected {what} such as {example!r}, got {value!r} ({type(value).__name__})")


def load(name: str) -> dict:
    """One recorded results file, by name (see :func:`available`)."""
    _expect_name(name, "the name of a recorded result", "bench-train-gpu")
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded result {name!r}; available: {', '.join(available()) or 'none'}")
    return json.loads(path.read_text())


def load_histories(group: str) -> dict[str, dict]:
    """Histories of a group of one-seed runs (``{group}--{attention}.json``), keyed by attention name.

    For a group with several seeds per attention use :func:`load_runs`.
    """
    _expect_name(group, "a group name", "cifar10-cpu-w16")
    runs = load_runs(group)
    several = sorted(name for name, seeds in runs.items() if len(seeds) > 1)
    if several:
        raise ValueError(f"{group!r} has several seeds for {', '.join(several)}: use load_runs({group!r})")
    return {name: next(iter(seeds.values())) for name, seeds in runs.items()}


def load_runs(group: str) -> dict[str, dict[int, dict]]:
    """Histories of a group of runs, ``{attention: {seed: history}}``.

    Reads ``{group}--{attention}.json`` (the seed is taken from the history) and
    ``{group}--{attention}--s{seed}.json``.
    """
    _expect_name(group, "a group name", "cifar10-cpu-w16")
    found: dict[str, dict[int, dict]] = {}
    for path in sorted(HERE.glob(f"{group}--*.json")):
        parts = path.stem[len(group) + 2:].split("--")
        history = json.loads(path.read_text())
        seed = int(parts[1][1:]) if len(parts) > 1 else int(history["meta"].get("seed") or 0)
        found.setdefault(parts[0], {})[seed] = history
    if not found:
        groups = sorted({name.split("--")[0] for name in available() if "--" in name})
        raise FileNotFoundError(f"no recorded runs for {group!r}; groups: {', '.join(groups) or 'none'}")
    return {name: dict(sorted(seeds.items())) for name, seeds in sorted(found.items())}


def commit_label(meta: dict) -> str:
    """The commit a result came from, short, with ``-dirty`` kept when the tree had changes."""
    if not isinstance(meta, dict):
        raise TypeError(f"expected a history's meta dict (history['meta']), got {type(meta).__name__}")
    commit = meta.get("git_commit") or "unknown"
    return commit[:10] + ("-dirty" if commit.endswith("-dirty") else "")


def load_trained(group: str, attention: str, map_location: str = "cpu") -> torch.nn.Module:
    """The trained model of run ``{group}--{attention}``, rebuilt from its own config, in eval mode."""
    from ..models import build_model

    _expect_name(group, "a group name", "cifar10-cpu-w16")
    _expect_name(attention, "an attention name", "se")
    weighted = sorted(p.stem[len(group) + 2:] for p in (HERE / "weights").glob(f"{group}--*.pt"))
    if not weighted:
        load_runs(group)  # raises for an unknown group
        with_weights = sorted({p.stem.split("--")[0] for p in (HERE / "weights").glob("*.pt")})
        raise FileNotFoundError(f"no weights are recorded for {group!r} (histories only); groups with "
                                f"weights: {', '.join(with_weights)}")
    if attention not in weighted:
        raise FileNotFoundError(f"no trained {attention!r} model recorded for {group}: {', '.join(weighted)}")
    history = load(f"{group}--{attention}")
    cfg = history["config"]
    path = HERE / "weights" / f"{group}--{attention}.pt"
    state = torch.load(path, map_location=map_location, weights_only=True)
    num_classes = state["fc.bias"].shape[0] if "fc.bias" in state else 10
    model = build_model(cfg["model"], num_classes, cfg["attention"], **cfg["model_kwargs"])
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.eval()


def summarise(history: dict) -> dict:
    """The final epoch's figures of one history, plus its provenance in one line."""
    if not isinstance(history, dict) or not history.get("epochs") or not isinstance(history.get("meta"), dict):
        raise ValueError("expected a training history (a dict with 'meta' and at least one of 'epochs', as "
                         f"load_runs or fit return), got {type(history).__name__} "
                         f"{sorted(history) if isinstance(history, dict) else ''}".rstrip())
    last = history["epochs"][-1]
    meta = history["meta"]
    return {"val_top1": last.get("val_top1"), "test_top1": last.get("test_top1"),
            "epochs": len(history["epochs"]), "train_seconds": meta.get("train_seconds"),
            "parameters": meta.get("parameters"), "device": meta.get("device_name"),
            "commit": commit_label(meta), "command": meta.get("command"), "seed": meta.get("seed")}


def record(run_dir: str | Path, group: str, name: str, weights: bool = True, dest: str | Path = HERE) -> list[Path]:
    """Copy the run in ``run_dir`` (written by ``fit``) into the recorded results.

    Writes ``{group}--{name}.json`` (the history, unchanged) and, with ``weights=True``, a float16
    copy of the final model's state as ``weights/{group}--{name}.pt`` (half the size; a float16
    copy can flip a prediction whose logit margin is below its rounding, about 1e-3). Refuses a
    run from a working tree with uncommitted changes: a record must name the code that made it.
    """
    run = Path(run_dir)
    history_path, ckpt_path = run / "history.json", run / "checkpoint.pt"
    if not history_path.is_file():
        raise FileNotFoundError(f"{history_path} not found: expected a run directory written by "
                                f"`python -m attn_lib train --out {run}`")
    history = json.loads(history_path.read_text())
    commit = history["meta"].get("git_commit") or ""
    if not commit or commit.endswith("-dirty"):
        raise ValueError(f"{history_path} was made from {commit or 'an unknown commit'}: record runs made "
                         f"from a clean, committed tree")
    dest = Path(dest)
    written = [dest / f"{group}--{name}.json"]
    written[0].write_text(history_path.read_text())
    if weights:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["model"]
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        (dest / "weights").mkdir(exist_ok=True)
        written.append(dest / "weights" / f"{group}--{name}.pt")
        torch.save(half, written[1])
    return written
