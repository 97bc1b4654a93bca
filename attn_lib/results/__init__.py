"""Recorded runs that ship with the package, so a reader without a GPU still sees real results.

Each ``*.json`` here was written by ``python -m attn_lib train`` or ``python -m attn_lib bench``
and records the command, git commit, hardware and seed that produced it; each ``weights/*.pt``
is the final model of one such run, loadable with ``torch.load(weights_only=True)``.

    histories = load_histories("cifar10-cpu-w16")     # {"none": {...}, "se": {...}, ...}
    model = load_trained("cifar10-cpu-w16", "se")      # the trained ResNet-18, eval mode
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent

__all__ = ["available", "load", "load_histories", "load_trained", "summarise"]


def available() -> list[str]:
    """Names of the recorded results files (without ``.json``)."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def load(name: str) -> dict:
    """One recorded results file, by name (see :func:`available`)."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no recorded result {name!r}; available: {', '.join(available()) or 'none'}")
    return json.loads(path.read_text())


def load_histories(group: str) -> dict[str, dict]:
    """Histories of a group of runs (``{group}--{attention}.json``), keyed by attention name."""
    found = {p.stem.split("--", 1)[1]: json.loads(p.read_text()) for p in sorted(HERE.glob(f"{group}--*.json"))}
    if not found:
        raise FileNotFoundError(f"no recorded runs for {group!r}; available: {', '.join(available()) or 'none'}")
    return found


def load_trained(group: str, attention: str, map_location: str = "cpu") -> torch.nn.Module:
    """The trained model of run ``{group}--{attention}``, rebuilt from its own config, in eval mode."""
    from ..models import build_model

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
    last = history["epochs"][-1]
    meta = history["meta"]
    return {"val_top1": last.get("val_top1"), "test_top1": last.get("test_top1"),
            "epochs": len(history["epochs"]), "train_seconds": meta.get("train_seconds"),
            "parameters": meta.get("parameters"), "device": meta.get("device_name"),
            "commit": (meta.get("git_commit") or "")[:10], "command": meta.get("command"), "seed": meta.get("seed")}
