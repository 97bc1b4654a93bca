"""What every chapter shares: the mode switch, the data, recorded-or-fresh runs, comparisons.

A chapter's first cell sets ``FULL`` (quick mode on a CPU, or full mode on a GPU) and its cells call
these helpers, so that every chapter behaves the same way and each helper is written once:

    data = chapter_data("test")                       # real CIFAR-10, or a loudly labelled stand-in
    runs = train_or_load("02_se", ["none", "se"], full=FULL, recorded="cifar10-h200-r18")
    cmp("gates", mine, theirs)                        # exact / close / max diff, then assert_close

Full mode at toy size (for tests): with the environment variable ``ATTN_LIB_TOY=1`` the runs that
full mode trains shrink to one short epoch of a narrow network (width 16) on the synthetic stand-in, on the
CPU. The same code runs; only the size changes. Quick mode and real full mode ignore the variable.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

import torch

from . import results
from .data import ArrayDataset, DataNotFoundError, default_data_dir, load_cifar

__all__ = ["RUNS_ENV", "TOY_ENV", "runs_dir", "chapter_data", "cmp", "full_mode_config", "full_mode_estimate", "run_label", "toy",
           "train_or_load"]

#: Set to 1 to run full mode at toy size (see the module docstring). Read in one place: :func:`toy`.
TOY_ENV = "ATTN_LIB_TOY"
#: Where full mode writes its runs, if set (default: ``runs/`` beside ``data/``).
RUNS_ENV = "ATTN_LIB_RUNS_DIR"
#: What full mode shrinks to under ``ATTN_LIB_TOY=1``.
TOY_OVERRIDES = dict(dataset="synthetic", epochs=1, batch_size=64, val_size=128, device="cpu",
                     amp=False, compile=False)
#: Toy size of each backbone: the narrowest that every mechanism accepts (r = 16 needs 16 channels).
TOY_MODEL_KWARGS = {"resnet18": {"width": 16}, "resnet34": {"width": 16},
                    "densenet121": {"growth_rate": 8, "num_init_features": 16, "block_config": (2, 2, 2, 2)}}
#: Full mode trains as long as the recorded GPU runs it is compared with (``cifar10-h200-r18``).
FULL_MODE_EPOCHS = 20


def toy() -> bool:
    """True when full mode should run at toy size (``ATTN_LIB_TOY=1``)."""
    value = os.environ.get(TOY_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise ValueError(f"{TOY_ENV}={value!r}: expected 1 (toy-size full mode) or 0")


def runs_dir() -> Path:
    """Where full mode's runs go: ``$ATTN_LIB_RUNS_DIR``, else ``runs/`` at the checkout's root
    (beside ``data/``; both are ignored by git), else ``./runs``."""
    if os.environ.get(RUNS_ENV):
        return Path(os.environ[RUNS_ENV])
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "_toc.yml").is_file() and (folder / "attn_lib").is_dir():
            return folder / "runs"
    return Path("runs")


def full_mode_config(attention: str | None = None, *, seed: int = 0, model: str = "resnet18",
                     model_kwargs: dict | None = None, **overrides):
    """The :class:`~attn_lib.train.TrainConfig` full mode trains: the fast preset on CIFAR-10 for
    :data:`FULL_MODE_EPOCHS` epochs, like the recorded GPU runs it is compared with.

    Under ``ATTN_LIB_TOY=1`` the same run shrinks (synthetic data, one epoch, a narrow network, CPU).
    """
    from .train import TrainConfig

    model_kwargs = dict(model_kwargs or {})
    fields = dict(dataset="cifar10", data_dir=str(default_data_dir()), download=True, model=model,
                  attention=attention, model_kwargs=model_kwargs, seed=seed,
                  epochs=FULL_MODE_EPOCHS)
    fields.update(overrides)
    if toy():
        fields.update(TOY_OVERRIDES)
        fields["model_kwargs"] = {**model_kwargs, **TOY_MODEL_KWARGS.get(model, {})}
    return TrainConfig.from_preset("fast", **fields)


#: What the chapters' training cells asked :func:`train_or_load` for, in this process (quick mode
#: included): ``python -m attn_lib chapter time`` turns it into full mode's time estimates.
PLANNED_RUNS: list[dict] = []


def run_label(history: dict) -> str:
    """One line that says where a history came from: trained now or recorded, device, commit."""
    meta = history["meta"]
    where = "trained in this session" if meta.get("trained_now") else "recorded"
    return (f"{where}: {meta.get('device_name')}, commit {results.commit_label(meta)}, seed {meta.get('seed')}, "
            f"{len(history['epochs'])} epochs")


def train_or_load(chapter: str, names: Sequence[str], *, full: bool, recorded: str,
                  seeds: Sequence[int] = (0,), model: str = "resnet18", model_kwargs: dict | None = None,
                  progress: bool = True) -> dict[str, dict[int, dict]]:
    """``{name: {seed: history}}`` for each attention ``name`` (``"none"`` for the plain network).

    Full mode trains each run with :func:`full_mode_config` into ``runs/{chapter}/{name}-s{seed}``
    (resuming a run that was cut off) and marks its history ``meta["trained_now"] = True``. Quick mode
    reads the recorded group ``recorded`` (see :mod:`attn_lib.results`) and keeps the seeds it has; a
    name it lacks is reported and left out, never invented.
    """
    from .train import fit

    if isinstance(names, str):
        raise TypeError(f"expected a list of attention names, got the string {names!r}")
    PLANNED_RUNS.append({"chapter": chapter, "names": list(names), "seeds": list(seeds), "model": model})
    if not full:
        stored = results.load_runs(recorded)
        missing = [n for n in names if n not in stored]
        if missing:
            print(f"not in the recorded runs {recorded!r}: {', '.join(missing)}")
        return {n: {s: h for s, h in stored[n].items() if s in seeds} or stored[n]
                for n in names if n in stored}
    out_root = runs_dir() / chapter
    trained: dict[str, dict[int, dict]] = {}
    for name in names:
        attention = None if name == "none" else name
        for seed in seeds:
            cfg = full_mode_config(attention, seed=seed, model=model, model_kwargs=model_kwargs)
            option = "" if attention is None else f" --attention {attention}"
            command = (f"python -m attn_lib train --dataset {cfg.dataset} --model {model}{option} "
                       f"--seed {seed} --out runs/{chapter}/{name}-s{seed}")
            history = fit(cfg, out_root / f"{name}-s{seed}", resume=True, progress=progress,
                          command=command, log=lambda _line: None)
            history["meta"]["trained_now"] = True
            trained.setdefault(name, {})[seed] = history
    return trained


def chapter_data(split: str = "test", data_dir: str | Path | None = None) -> ArrayDataset:
    """CIFAR-10 for a chapter's analyses: from ``data/``, else downloaded, else a labelled stand-in.

    Downloads wherever the network allows (torchvision, about 170 MB, once). When CIFAR-10 cannot be
    had, prints what is missing and the one command that fetches it, and returns the synthetic
    stand-in (its ``name`` is ``"synthetic"``): cells that need real images check ``data.name``.
    """
    data_dir = default_data_dir() if data_dir is None else Path(data_dir)
    try:
        return load_cifar("cifar10", split, data_dir, download=True)
    except DataNotFoundError:
        bar = "!" * 88
        print(f"{bar}\nCIFAR-10 is not in {data_dir} and could not be downloaded (no network?).\n"
              f"The analyses below that need real photographs are skipped or marked SYNTHETIC.\n"
              f"Fetch it once with:  python -c \"import attn_lib.data as d; d.load_cifar('cifar10', "
              f"'{split}', '{data_dir}')\"\n{bar}", file=sys.stdout)
        return load_cifar("synthetic", split)


def cmp(what: str, got: torch.Tensor, expected: torch.Tensor, **tolerance) -> None:
    """Print whether ``got`` equals ``expected`` exactly, closely, or not; then ``assert_close``.

    In the manner of nn-zero-to-hero's ``cmp``: ``what | exact: True | close: True | max diff 0``.
    """
    if got.shape != expected.shape:
        raise AssertionError(f"{what}: shapes differ, {list(got.shape)} vs {list(expected.shape)}")
    exact = torch.equal(got, expected)
    diff = (got.detach().double() - expected.detach().double()).abs().max().item() if got.numel() else 0.0
    close = exact or torch.allclose(got.double(), expected.double(), rtol=tolerance.get("rtol", 1e-5),
                                    atol=tolerance.get("atol", 1e-6))
    print(f"{what:28s} | exact: {str(exact):5s} | close: {str(close):5s} | max diff {diff:.2g}")
    torch.testing.assert_close(got, expected, **tolerance)


#: Dense bf16/fp16 tensor-core peaks from the vendors' data sheets (FLOP/s), for estimates only.
DATASHEET_PEAK = {"NVIDIA H200": 989e12, "H100-class": 989e12, "T4-class (fp16)": 65e12}


def full_mode_estimate(names: Sequence[str], seeds: Sequence[int] = (0,), epochs: int | None = None,
                       train_images: int = 45_000, model: str = "resnet18") -> dict[str, float | str]:
    """Estimated minutes of training for full mode's runs on an H100-class and a T4-class GPU.

    From the recorded H200 benchmarks: the fast pipeline's images/s for the plain ResNet-18
    (``bench-train-gpu.json``) divided by each mechanism's measured step-time ratio
    (``bench-modules-gpu.json``), times the epochs. A network with no GPU benchmark (another
    backbone) is scaled by its forward FLOPs relative to the plain ResNet-18 instead, at the same
    throughput per FLOP; ``"basis"`` says which was used. An H100 has the H200's compute (the same
    data-sheet bf16 peak), so the H200 time stands for it; a T4 is scaled by the ratio of data-sheet
    peaks (fp16, 65 TFLOP/s) at the same utilisation. Estimates, not measurements: evaluation and
    start-up (compilation, data loading) are not included.
    """
    if isinstance(names, str):
        raise TypeError(f"expected a list of attention names, got the string {names!r}")
    epochs = FULL_MODE_EPOCHS if epochs is None else epochs
    fast = next(r for r in results.load("bench-train-gpu")["rows"] if r["name"] == "fast")
    ratios = {r["attention"]: r["step_time_ratio"] for r in results.load("bench-modules-gpu")["rows"]
              if r["kind"] == "mechanism"}
    measured = model == "resnet18" and all(n in ratios for n in names)
    if measured:
        cost = [ratios[n] for n in names]
    else:
        from .bench_modules import forward_flops
        from .models import build_model

        base = forward_flops(build_model("resnet18", 10))
        cost = [forward_flops(build_model(model, 10, None if n == "none" else n)) / base for n in names]
    seconds = sum(epochs * train_images * c / fast["images_per_second"] for c in cost) * len(seeds)
    t4 = seconds * DATASHEET_PEAK["NVIDIA H200"] / DATASHEET_PEAK["T4-class (fp16)"]
    return {"H100-class minutes": seconds / 60, "T4-class minutes": t4 / 60,
            "basis": "measured step-time ratios" if measured else "forward FLOPs relative to ResNet-18"}
