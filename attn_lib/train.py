"""Training and evaluation: two presets, an exact resume, and a history a reader can trust.

``reference`` reproduces the recipe of a widely reposted training script: SGD with momentum 0.9,
lr 0.1 with one linear warm-up epoch, ×0.1 at epochs 80 and 120 of 160, batch 128, weight decay
5e-4 (the script itself used 1e-4), torchvision transforms in DataLoader workers, float32. Its old
name ``seed`` is still accepted (deprecated; it is not a random seed).

``fast`` aims at the same accuracy in a fraction of the time: the dataset lives on the GPU
(:class:`attn_lib.data.GPULoader`), batch 512, bf16 autocast (float16 with a gradient scaler on
GPUs without native bf16, such as the T4), channels_last, a one-cycle schedule (linear up to a peak
lr 0.2 for the first 20% of steps, then linearly down to 0), Nesterov momentum, label smoothing
0.1, no weight decay on norms and biases, horizontal-flip test-time augmentation, 50 epochs, and
``torch.compile`` on CUDA (``compile="auto"``; a model that fails to compile trains eagerly, with
one warning). On CUDA the optimiser step is the fused SGD kernel, and the loop makes no per-step
host synchronisation (the loss is checked once per epoch there, every step on the CPU).

Before anything runs, :meth:`TrainConfig.check` validates every option (one line per problem,
naming the option, its value and what is allowed; :class:`ConfigError`), and :func:`fit` checks
the options that depend on the data (validation size, subset, batch size) before it writes a file.

Every epoch writes ``history.json`` (config, git commit, versions, device, seed and per-epoch
losses, accuracies, lr and seconds) and ``checkpoint.pt`` (model, optimiser, scheduler, grad
scaler and RNG states; loadable with ``torch.load(weights_only=True)``); the previous epoch's
checkpoint is kept as ``checkpoint-prev.pt``. The states are copied at the end of the epoch and
written by a background thread (atomically: a temporary file, then a rename), so the next epoch
does not wait for the disk. ``resume=True`` continues from the last completed epoch and gives
exactly the result of an uninterrupted run, because every epoch's shuffling and augmentation are
drawn from a generator seeded by ``(seed, epoch)``; when ``checkpoint.pt`` is damaged it falls back
to ``checkpoint-prev.pt`` with a warning (one epoch is repeated) and moves the damaged file aside to
``checkpoint.pt.damaged``, so that it never replaces the good previous checkpoint. After each epoch
the training loss, the validation loss and every weight are checked: a NaN or infinity stops the run with
:class:`TrainingDiverged`, leaving the last good checkpoint in place.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import DATASETS, GPULoader, dataloader, load_cifar, stratified_split
from .models import MODELS, build_model
from .provenance import provenance

__all__ = ["PRESETS", "CheckpointError", "ConfigError", "TrainConfig", "TrainingDiverged", "TrainingOutOfMemory",
           "accuracy", "amp_choice", "evaluate", "fit", "lr_factor", "resolve_device", "load_checkpoint"]

HISTORY, CHECKPOINT, PREVIOUS = "history.json", "checkpoint.pt", "checkpoint-prev.pt"
#: Where a damaged ``checkpoint.pt`` goes when ``resume`` falls back to the previous checkpoint.
DAMAGED = CHECKPOINT + ".damaged"
#: Epoch ``e`` of a run with seed ``s`` draws its shuffling and augmentation from a generator
#: seeded by ``s * EPOCH_SEED_STRIDE + e``.
EPOCH_SEED_STRIDE = 100_003
#: The largest seed: ``SEED_MAX * EPOCH_SEED_STRIDE`` plus any epoch count stays far below 2**64,
#: the range of a generator's seed.
SEED_MAX = 2**32 - 1
#: Images per batch when evaluating (validation and test), whatever the training batch size.
EVAL_BATCH_SIZE = 1024

class _Presets(dict):
    """The presets by name; an old name (:data:`PRESET_ALIASES`) still looks up its preset, but is
    not listed (``"seed" in PRESETS`` is False)."""

    def __missing__(self, key):
        if key in PRESET_ALIASES:
            return self[PRESET_ALIASES[key]]
        raise KeyError(key)


PRESETS: dict[str, dict] = _Presets({
    "reference": dict(epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
                      decay_norm_and_bias=True, schedule="multistep", milestones=(80, 120), gamma=0.1,
                      warmup_epochs=1.0, label_smoothing=0.0, amp=False, channels_last=False, compile=False,
                      pipeline="dataloader", tta=False),
    "fast": dict(epochs=50, batch_size=512, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 decay_norm_and_bias=False, schedule="onecycle", warmup_fraction=0.2,
                 label_smoothing=0.1, amp=True, channels_last=True, compile="auto", pipeline="gpu", tta=True),
})
#: Old preset names still accepted (deprecated): ``seed`` was the reference recipe's first name.
PRESET_ALIASES = {"seed": "reference"}
#: The synthetic stand-in has 640 training images: a smaller default batch and a gentler peak lr
#: give an epoch several steps, so that the two-epoch smoke run (``train --dataset synthetic
#: --epochs 2``) visibly learns (a test pins it; an explicit batch size or lr is kept). With the
#: fast preset's own batch 512 an epoch is one step, and lr 0.2 at batch 64 diverged.
SYNTHETIC_BATCH_SIZE = 64
SYNTHETIC_LR = 0.05
#: Validation images held out when ``val_size`` is not given: 5,000, or a fifth of a smaller set.
DEFAULT_VAL_SIZE = 5000

#: Command-line spelling of each config field, for messages about options given on the command line.
CLI_FLAGS = {"dataset": "--dataset", "data_dir": "--data-dir", "model": "--model", "attention": "--attention",
             "model_kwargs": "--option", "preset": "--preset", "epochs": "--epochs", "batch_size": "--batch-size",
             "lr": "--lr", "compile": "--compile", "val_size": "--val-size", "train_subset": "--train-subset",
             "seed": "--seed", "device": "--device"}


class ConfigError(ValueError):
    """One or more options are out of range; ``problems`` holds one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class CheckpointError(ValueError):
    """A run directory cannot be resumed (unreadable checkpoints, or files from different runs).

    ``path`` and ``reason`` (what is wrong with the file, without advice) are set when one file
    cannot be read."""

    def __init__(self, message: str, path: Path | None = None, reason: str | None = None):
        super().__init__(message)
        self.path, self.reason = path, reason


class TrainingDiverged(RuntimeError):
    """The loss, the validation loss or a weight became NaN or infinite."""


class TrainingOutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message says what was running (training, with its batch size
    and a smaller one to try; evaluation, whose batch is fixed; or moving the model and data onto it)."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v)


@dataclass
class TrainConfig:
    """Everything that defines a run; stored in the history and the checkpoint."""

    dataset: str = "cifar10"
    data_dir: str = "data"
    download: bool = True
    model: str = "resnet18"
    attention: str | None = None
    model_kwargs: dict = field(default_factory=dict)  # width=..., attention options
    preset: str = "fast"
    epochs: int = 50
    batch_size: int = 512
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False
    schedule: str = "onecycle"  # "onecycle" | "multistep" | "cosine"
    milestones: Sequence[int] = (80, 120)
    gamma: float = 0.1
    warmup_epochs: float = 0.0  # multistep / cosine: linear warm-up, per iteration
    warmup_fraction: float = 0.2  # onecycle: share of the steps spent rising to the peak
    label_smoothing: float = 0.1
    amp: bool = True  # bf16 autocast on CUDA (fp16 + GradScaler where bf16 is not native)
    channels_last: bool = True
    compile: bool | str = "auto"  # True | False | "auto" (compile on CUDA only)
    pipeline: str = "gpu"  # "gpu" (GPULoader, on any device) | "dataloader" (CPU workers)
    workers: int = 2
    tta: bool = True
    val_size: int | None = None  # None: 5,000, or a fifth of a smaller training set
    split_seed: int = 0
    train_subset: int | None = None  # use only the first N training images (quick mode)
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides) -> "TrainConfig":
        """The preset's recipe with ``overrides`` (``None`` values are ignored); see the module doc.

        On the synthetic stand-in the batch size and the lr default to :data:`SYNTHETIC_BATCH_SIZE`
        and :data:`SYNTHETIC_LR` unless given."""
        preset = PRESET_ALIASES.get(preset, preset)
        if preset not in PRESETS:
            raise ConfigError([f"preset {_show(preset)}: expected one of {', '.join(PRESETS)}"])
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ConfigError([f"unknown config fields {sorted(unknown)}; expected some of {sorted(fields)}"])
        given = {k: v for k, v in overrides.items() if v is not None}
        values = {**PRESETS[preset], "preset": preset, **given}
        if values.get("dataset") == "synthetic" and "batch_size" not in given:
            values["batch_size"] = SYNTHETIC_BATCH_SIZE
            if "lr" not in given:
                values["lr"] = SYNTHETIC_LR
        return cls(**values)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d

    def problems(self, cli: bool = False) -> list[str]:
        """Every option that is out of range, one line each (``[]`` when all is well).

        Checks what can be checked without the data; :func:`fit` adds the checks that need its size.
        ``cli=True`` names options as on the command line (``--batch-size``)."""
        from .registry import available_attentions

        out: list[str] = []

        def bad(name: str, allowed: str) -> None:
            label = CLI_FLAGS.get(name, name) if cli else name
            out.append(f"{label} {_show(getattr(self, name))}: expected {allowed}")

        def integer(name: str, low: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < low:
                bad(name, f"an integer >= {low}" + (" (or None)" if optional and not cli else ""))

        def real(name: str, low: float, high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
            v = getattr(self, name)
            ok = _is_real(v) and math.isfinite(v) and (v > low if low_open else v >= low)
            if ok and high is not None:
                ok = v < high if high_open else v <= high
            if not ok:
                lo = f"{'>' if low_open else '>='} {low:g}"
                hi = "" if high is None else f" and {'<' if high_open else '<='} {high:g}"
                bad(name, f"a finite number {lo}{hi}")

        for name, choices in (("dataset", DATASETS), ("model", tuple(MODELS)), ("preset", tuple(PRESETS)),
                              ("schedule", ("onecycle", "multistep", "cosine")), ("pipeline", ("gpu", "dataloader"))):
            if getattr(self, name) not in choices:
                bad(name, "one of " + ", ".join(choices))
        attentions = available_attentions() + ["triple"]
        if self.attention is not None and self.attention not in attentions:
            bad("attention", "none or one of " + ", ".join(attentions))
        if not isinstance(self.model_kwargs, dict) or not all(isinstance(k, str) for k in self.model_kwargs):
            bad("model_kwargs", "a dict of option names to values")
        if not isinstance(self.data_dir, (str, os.PathLike)) or not str(self.data_dir):
            bad("data_dir", "a folder path")
        integer("epochs", 1)
        integer("batch_size", 1)
        real("lr", 0, low_open=True)
        real("momentum", 0, 1, high_open=True)
        real("weight_decay", 0)
        real("gamma", 0, 1, low_open=True)
        real("warmup_epochs", 0)
        real("warmup_fraction", 0, 1)
        real("label_smoothing", 0, 1, high_open=True)
        integer("workers", 0)
        integer("val_size", 0, optional=True)
        integer("train_subset", 1, optional=True)
        if not _is_int(self.seed) or not 0 <= self.seed <= SEED_MAX:
            bad("seed", f"an integer from 0 to {SEED_MAX} (2**32 - 1)")
        integer("split_seed", 0)
        ms = self.milestones
        if not (isinstance(ms, (list, tuple)) and all(_is_int(m) and m >= 1 for m in ms)
                and list(ms) == sorted(ms)):
            bad("milestones", "increasing epochs >= 1")
        for name in ("download", "nesterov", "decay_norm_and_bias", "amp", "channels_last", "tta"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            bad("compile", "True, False or 'auto' (compile on CUDA only)")
        if not isinstance(self.device, str):
            bad("device", "cpu, cuda, cuda:N, mps or auto")
        else:
            try:
                resolve_device(self.device)
            except ValueError as err:
                label = CLI_FLAGS["device"] if cli else "device"
                out.append(f"{label} {_show(self.device)}: {err}")
        return out

    def check(self, cli: bool = False) -> "TrainConfig":
        """Raise :class:`ConfigError` listing every problem (see :meth:`problems`); else return self."""
        problems = self.problems(cli)
        if problems:
            raise ConfigError(problems)
        return self


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Percentage of samples whose target is among the ``k`` highest logits, for each ``k``.

    The widely reposted script's ``accuracy()`` counted ``wrong_k`` and returned the *error* rate,
    printed as "Prec"; this returns accuracy (a test pins it).
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"expected logits [B, K] and target [B], got {list(logits.shape)} and {list(target.shape)}")
    maxk = min(max(topk), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices  # [B, maxk]
    hit = top.eq(target[:, None])
    return [hit[:, :min(k, maxk)].any(dim=1).float().mean().item() * 100.0 for k in topk]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → CUDA, else MPS, else CPU; a named device that is absent is a clear error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"expected device cpu, cuda, mps or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"expected device cpu, cuda, cuda:N, mps or auto, got {device!r}") from err


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """The learning rate at optimiser step ``step``, as a multiple of ``cfg.lr``."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        peak = max(1, round(cfg.warmup_fraction * total))
        return (step + 1) / peak if step < peak else max(0.0, (total - step) / max(1, total - peak))
    warm = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "multistep":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    raise ValueError(f"unknown schedule {cfg.schedule!r}; expected onecycle, multistep or cosine")


def _param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)  # 1-D: norm scales/shifts, biases, gates
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _native_bf16() -> bool:
    """Whether the current CUDA GPU computes bf16 natively (Ampere and later; not a T4, which only
    emulates it, slowly)."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch: no emulation, so the plain answer is the native one
        return torch.cuda.is_bf16_supported()


def amp_choice(device: torch.device, enabled: bool) -> tuple[torch.dtype | None, bool]:
    """``(autocast dtype, use a GradScaler)`` for mixed precision on ``device``.

    CUDA with native bf16: ``(bfloat16, False)``. CUDA without it (a T4, Colab's free GPU):
    ``(float16, True)``: float16 needs the gradient scaler, emulated bf16 would be slower than
    float32. CPU and MPS, or ``enabled=False``: ``(None, False)`` (float32; autocast on a CPU is
    slower than float32 for these models)."""
    if not enabled or device.type != "cuda":
        return None, False
    return (torch.bfloat16, False) if _native_bf16() else (torch.float16, True)


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    return amp_choice(device, enabled)[0]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp_dtype: torch.dtype | None = None,
             tta: bool = False, label_smoothing: float = 0.0) -> dict:
    """Loss, top-1 and top-5 accuracy (%) over ``loader``; ``tta`` averages the horizontal flip."""
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros(2, device=device, dtype=torch.float64)
    n = 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(x).float()
            if tta:
                logits = 0.5 * (logits + model(torch.flip(x, dims=[3])).float())
        loss_sum += F.cross_entropy(logits, y, reduction="sum", label_smoothing=label_smoothing)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        correct += torch.stack([top[:, :1].any(1).sum(), top.any(1).sum()])
        n += len(y)
    loss, (top1, top5) = (loss_sum / n).item(), (correct / n * 100).tolist()
    return {"loss": loss, "top1": top1, "top5": top5}


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "config", "rng", "history_epochs")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`fit` safely (``weights_only=True``).

    A file that cannot be read (missing, truncated, not a checkpoint) raises :class:`CheckpointError`
    naming the file and what to do."""
    path = Path(path)
    advice = "delete it, or train into another --out"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file", path, "no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - zip, pickle and I/O errors all mean "unreadable"
        reason = _unreadable_reason(path, err)
        raise CheckpointError(f"{path}: cannot be read as a checkpoint: {reason}; {advice}", path, reason) from None
    if not isinstance(ckpt, dict) or not set(CHECKPOINT_KEYS) <= set(ckpt):
        reason = f"not a training checkpoint of attn_lib (expected the keys {', '.join(CHECKPOINT_KEYS)})"
        raise CheckpointError(f"{path}: {reason}; {advice}", path, reason)
    return ckpt


def _unreadable_reason(path: Path, err: Exception) -> str:
    """What is wrong with a file ``torch.load(weights_only=True)`` refused, in our own words (torch's
    message can advise ``weights_only=False``, which would run whatever code the file holds)."""
    import pickle

    if isinstance(err, OSError):
        return f"the file cannot be opened: {err.strerror or type(err).__name__}"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as os_err:
        return f"the file cannot be opened: {os_err.strerror or type(os_err).__name__}"
    if not head:
        return "the file is empty, as after a write that was cut off"
    if head != b"PK\x03\x04":
        return "not a checkpoint file, not even the zip archive that torch.save writes"
    if isinstance(err, pickle.UnpicklingError):
        return ("it holds Python objects other than tensors and plain values, so attn_lib did not write "
                "it, and it is not loaded: unpickling such objects can run any code")
    return "its zip archive is damaged or truncated, as after a write that was cut off"


def _data_problems(cfg: TrainConfig, n_full: int, cli: bool) -> tuple[list[str], int]:
    """The checks that need the training set's size; returns the problems and the validation size."""
    flag = (lambda name: CLI_FLAGS[name]) if cli else (lambda name: name)  # noqa: E731
    problems = []
    n = n_full
    what = f"the {cfg.dataset} training set has {n_full:,} images"
    if cfg.train_subset is not None:
        if cfg.train_subset > n_full:
            problems.append(f"{flag('train_subset')} {cfg.train_subset}: expected 1 to {n_full} ({what})")
        n = min(cfg.train_subset, n_full)
        what = f"{what}, {n:,} used" if cfg.train_subset <= n_full else what
    val = min(DEFAULT_VAL_SIZE, n // 5) if cfg.val_size is None else cfg.val_size
    if val > n - 1:
        problems.append(f"{flag('val_size')} {cfg.val_size}: expected 0 to {n - 1} ({what})")
    elif n - val < cfg.batch_size:
        problems.append(f"{flag('batch_size')} {cfg.batch_size}: expected at most {n - val}, the training "
                        f"images left after holding out {val} for validation")
    return problems, val


def _build_data(cfg: TrainConfig, cli: bool = False):
    full = load_cifar(cfg.dataset, "train", cfg.data_dir, cfg.download)
    problems, val_size = _data_problems(cfg, len(full), cli)
    if problems:
        raise ConfigError(problems)
    test = load_cifar(cfg.dataset, "test", cfg.data_dir, cfg.download)
    if cfg.train_subset:
        full = full.subset(range(cfg.train_subset))
    train_idx, val_idx = stratified_split(full.y, val_size, cfg.split_seed) if val_size else (range(len(full)), [])
    return full.subset(train_idx), (full.subset(val_idx) if val_size else None), test


def _snapshot(obj):
    """A CPU copy of every tensor in ``obj`` (nested dicts/lists), so training can go on changing
    the originals while a background thread writes the copy."""
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_snapshot(v) for v in obj)
    return obj


class _CheckpointWriter:
    """Writes checkpoint + history in a background thread, one job at a time, in order.

    ``submit`` copies the states (the only part on the training's critical path) and queues the
    write: ``checkpoint.pt.tmp`` → rename the latest to ``checkpoint-prev.pt`` → rename the new one
    to ``checkpoint.pt`` → ``history.json`` (atomically too). ``blocking`` and ``writing`` total the
    seconds spent on the critical path and in the background."""

    def __init__(self, out: Path):
        self.out = out
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: concurrent.futures.Future | None = None
        self.blocking = self.writing = 0.0
        self.writes = 0

    def _write(self, state: dict, history_text: str) -> None:
        t0 = time.perf_counter()
        latest, previous, tmp = self.out / CHECKPOINT, self.out / PREVIOUS, self.out / (CHECKPOINT + ".tmp")
        torch.save(state, tmp)
        if latest.exists():
            os.replace(latest, previous)
        os.replace(tmp, latest)
        hist_tmp = self.out / (HISTORY + ".tmp")
        hist_tmp.write_text(history_text)
        os.replace(hist_tmp, self.out / HISTORY)
        self.writing += time.perf_counter() - t0
        self.writes += 1

    def submit(self, state: dict, history: dict) -> None:
        t0 = time.perf_counter()
        self.wait()
        job = (_snapshot(state), json.dumps(history, indent=1))
        self.pending = self.pool.submit(self._write, *job)
        self.blocking += time.perf_counter() - t0

    def wait(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()  # re-raises a failed write here

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown(wait=True)


class _Runner:
    """The model, compiled when asked; a compilation failure falls back to eager mode, once, with
    one warning (the step is then redone eagerly, so the run's result does not change)."""

    def __init__(self, model: nn.Module, compile: bool):
        self.model, self.compiled, self.failure = model, None, None
        if compile:
            try:
                self.compiled = torch.compile(model)
            except Exception as err:  # noqa: BLE001 - e.g. an unsupported Python or platform
                self._fall_back(err)

    def _fall_back(self, err: BaseException) -> None:
        first = (str(err).strip().splitlines() or [""])[0][:200]
        self.failure = f"{type(err).__name__}: {first}"
        self.compiled = None
        warnings.warn(f"torch.compile failed ({self.failure}); training continues without compiling "
                      f"(eager mode, same results, slower). Pass --no-compile (compile=False) to skip it.",
                      RuntimeWarning, stacklevel=3)

    def __call__(self, fn: Callable[[nn.Module], object]):
        if self.compiled is not None:
            try:
                return fn(self.compiled)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as err:  # noqa: BLE001 - any compiler error; a real bug fails eagerly too
                self._fall_back(err)
        return fn(self.model)


def _finite_weights(model: nn.Module) -> bool:
    """One host sync: are all floating parameters and buffers finite?"""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()) if tensors else True


def _resume_state(out: Path, cfg: TrainConfig, device: torch.device,
                  log: Callable[[str], None]) -> tuple[dict | None, Path | None]:
    """The checkpoint to resume from and its file: the latest, else the previous one (with a
    warning); ``(None, None)`` when the directory has none. Refuses checkpoints and a history from
    another run. After a fallback the damaged latest is moved aside to :data:`DAMAGED`, so that
    the next epoch's rotation cannot turn it into the previous checkpoint."""
    latest, previous = out / CHECKPOINT, out / PREVIOUS
    if not latest.exists() and not previous.exists():
        return None, None
    ckpt, source, damaged = None, None, []
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            ckpt, source = load_checkpoint(path, device), path
            break
        except CheckpointError as err:
            damaged.append(err)
    if ckpt is None:
        raise CheckpointError(f"cannot resume {out}: " + "; ".join(str(err) for err in damaged))
    if ckpt["config"] != cfg.to_dict():
        diff = sorted(k for k in ckpt["config"] if ckpt["config"][k] != cfg.to_dict().get(k))
        raise CheckpointError(f"cannot resume {out}: {source.name}: config differs in {diff}; use the same "
                              f"options or another --out")
    hist_path = out / HISTORY
    if hist_path.exists():
        try:
            hist = json.loads(hist_path.read_text())
            epochs, hist_config = hist["epochs"], hist["config"]
        except (ValueError, KeyError, TypeError):
            log(f"warning: {hist_path} cannot be read; it is rewritten from the checkpoint")
        else:
            saved = ckpt["history_epochs"]
            n = min(len(epochs), len(saved))
            if hist_config != ckpt["config"] or epochs[:n] != saved[:n] or abs(len(epochs) - len(saved)) > 1:
                raise CheckpointError(
                    f"cannot resume {out}: {HISTORY} ({len(epochs)} epochs) and {source.name} "
                    f"(epoch {ckpt['epoch']}) come from different runs; train into another --out, or "
                    f"delete the file that does not belong")
    if damaged:  # only now, once the previous checkpoint is known to fit: nothing moves on a refusal
        aside = out / DAMAGED
        os.replace(latest, aside)
        warnings.warn(f"{latest} cannot be read: {damaged[0].reason}. It is moved aside to {aside.name}, and "
                      f"the run resumes from {source} instead (after epoch {ckpt['epoch']}): one epoch is "
                      f"trained again", RuntimeWarning, stacklevel=3)
    return ckpt, source


def fit(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, log: Callable[[str], None] = print, command: str | None = None,
        cli: bool = False) -> dict:
    """Train ``cfg`` and write ``out_dir/history.json`` and ``out_dir/checkpoint.pt`` every epoch.

    Every option is checked first (:class:`ConfigError`, one line per problem; ``cli=True`` names
    them as command-line flags); nothing is written before the data and the model are ready.
    ``resume=True`` continues from ``checkpoint.pt`` if it exists (the config must match), or from
    ``checkpoint-prev.pt`` when the latest is damaged (which is then moved aside to
    ``checkpoint.pt.damaged``, with a warning); ``stop_after=N`` ends the call after epoch N
    (resume later): long runs in short sessions. Returns the history dict. Raises
    :class:`TrainingDiverged` on a NaN/inf loss or weight, :class:`TrainingOutOfMemory` when the GPU
    runs out of memory, :class:`CheckpointError` when a run cannot be resumed.
    """
    from tqdm.auto import tqdm

    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"expected a TrainConfig, got {type(cfg).__name__}")
    cfg.check(cli)
    if stop_after is not None and (not _is_int(stop_after) or stop_after < 1):
        raise ConfigError([f"{'--stop-after' if cli else 'stop_after'} {_show(stop_after)}: expected an "
                           f"integer >= 1"])
    out = Path(out_dir)
    device = resolve_device(cfg.device)
    amp_dtype, use_scaler = amp_choice(device, cfg.amp)
    torch.manual_seed(cfg.seed)
    train_set, val_set, test_set = _build_data(cfg, cli)
    try:
        model = build_model(cfg.model, train_set.num_classes, cfg.attention, **cfg.model_kwargs)
    except (TypeError, ValueError) as err:
        given = " ".join(f"-o {k}={json.dumps(v)}" for k, v in cfg.model_kwargs.items()) if cli else \
            f"model_kwargs {cfg.model_kwargs}"
        raise ConfigError([f"{given or ('--model ' if cli else 'model ') + cfg.model}: {err}"]) from None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    fused = device.type == "cuda"
    try:
        model = model.to(device)
        model = model.to(memory_format=memory_format)
        if cfg.pipeline == "gpu":
            train_loader = GPULoader(train_set, cfg.batch_size, True, device, cfg.channels_last, drop_last=True)
            make_eval = lambda ds: GPULoader(ds, EVAL_BATCH_SIZE, False, device, cfg.channels_last)  # noqa: E731
        else:
            train_loader = dataloader(train_set, cfg.batch_size, True, cfg.workers,
                                      pin_memory=device.type == "cuda")
            make_eval = lambda ds: dataloader(ds, EVAL_BATCH_SIZE, False, cfg.workers,  # noqa: E731
                                              pin_memory=device.type == "cuda")
    except torch.cuda.OutOfMemoryError:
        where = f"the model and the {len(train_set):,} training images" if cfg.pipeline == "gpu" else "the model"
        raise TrainingOutOfMemory(
            f"the GPU ran out of memory while {where} were moved onto it, before training began (the batch "
            f"size plays no part yet): close what else uses the GPU; nothing was written.") from None
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias), lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov, **({"fused": True} if fused else {}))
    steps_per_epoch = len(train_loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
    aux_weight = float(getattr(model, "auxiliary_loss_weight", 0.0))
    ckpt, good_path = _resume_state(out, cfg, device, log) if resume else (None, None)
    if resume and ckpt is None:
        log(f"no checkpoint in {out}; starting from scratch")
    compile_now = cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda")

    history = {
        "config": cfg.to_dict(),
        "meta": {**provenance(device, cfg.seed, command), "amp_dtype": str(amp_dtype) if amp_dtype else None,
                 "grad_scaler": use_scaler, "compiled": compile_now,
                 "optimizer_step": "fused" if fused else "for-loop",
                 "train_images": len(train_set), "val_images": len(val_set or []),
                 "test_images": len(test_set), "data_source": train_set.source if train_set.name != "synthetic"
                 else "synthetic (generated)", "parameters": sum(p.numel() for p in model.parameters())},
        "epochs": [],
    }
    start_epoch = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"].cpu())
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"].cpu(), device)
        history["epochs"] = ckpt["history_epochs"]
        history["meta"]["resumed_from_epoch"] = ckpt["epoch"]
        start_epoch = ckpt["epoch"]
        log(f"resuming {out} after epoch {start_epoch}")
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(model, compile_now)
    writer = _CheckpointWriter(out)
    last_good = start_epoch
    good_path = good_path or out / CHECKPOINT  # after a fallback resume: checkpoint-prev.pt, until a write

    def good_checkpoint() -> str:
        return (f"the last good checkpoint, after epoch {last_good}, is kept in {good_path}" if last_good
                else "no checkpoint was written")

    def diverged(what: str, epoch: int) -> TrainingDiverged:
        return TrainingDiverged(f"{what} at epoch {epoch + 1} (lr {scheduler.get_last_lr()[0]:.4g}): lower --lr "
                                f"(e.g. {cfg.lr / 2:g}) or check the data; {good_checkpoint()}.")

    def train_step(module: nn.Module, x: torch.Tensor, y: torch.Tensor):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            if aux_weight > 0:
                logits, aux = module(x, return_aux=True)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing) + \
                    aux_weight * F.cross_entropy(aux, y, label_smoothing=cfg.label_smoothing)
            else:
                logits = module(x)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        scaler.scale(loss).backward()
        return logits, loss

    check_each_step = device.type == "cpu"  # elsewhere a host sync per step would stall the GPU
    epoch, phase = start_epoch, "training"
    try:
        for epoch in range(start_epoch, cfg.epochs):
            phase = "training"
            model.train()
            gen_device = device if cfg.pipeline == "gpu" else torch.device("cpu")
            generator = torch.Generator(gen_device).manual_seed(cfg.seed * EPOCH_SEED_STRIDE + epoch)
            if cfg.pipeline == "gpu":
                train_loader.generator = generator
                batches = train_loader
            else:
                batches = dataloader(train_set, cfg.batch_size, True, cfg.workers, generator, device.type == "cuda")
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device)
            seen = 0
            t0 = time.perf_counter()
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not progress, dynamic_ncols=True)
            for step, (x, y) in enumerate(bar):
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                y = y.to(device, non_blocking=True)
                logits, loss = runner(lambda m: train_step(m, x, y))  # noqa: B023 - called at once
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += loss.detach().float() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
                if check_each_step:
                    running = loss_sum.item() / seen
                    if not math.isfinite(running):
                        raise diverged(f"the training loss became {running} at step {step + 1}", epoch)
                    bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            train_loss = loss_sum.item() / seen
            if not math.isfinite(train_loss):
                raise diverged(f"the training loss became {train_loss}", epoch)
            if not _finite_weights(model):
                raise diverged("a weight became NaN or infinite", epoch)
            record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": train_loss,
                      "train_top1": correct.item() / seen * 100, "seconds": seconds}
            if val_set is not None:
                phase = "validation"
                v = runner(lambda m: evaluate(m, make_eval(val_set), device, amp_dtype, cfg.tta, cfg.label_smoothing))
                if not math.isfinite(v["loss"]):
                    raise diverged(f"the validation loss became {v['loss']}", epoch)
                record.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
            if epoch + 1 == cfg.epochs:  # the test set is looked at once, at the end, never to choose
                phase = "test"
                t = runner(lambda m: evaluate(m, make_eval(test_set), device, amp_dtype, cfg.tta, cfg.label_smoothing))
                record.update(test_loss=t["loss"], test_top1=t["top1"], test_top5=t["top5"])
            history["epochs"].append(record)
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            history["meta"]["train_seconds"] = sum(e["seconds"] for e in history["epochs"])
            history["meta"]["compiled"] = runner.compiled is not None
            if runner.failure:
                history["meta"]["compile_failure"] = runner.failure
            history["meta"]["checkpoint"] = {"writes": writer.writes, "blocking_seconds": writer.blocking,
                                             "background_write_seconds": writer.writing}
            writer.submit({
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict(),
                "rng": {"torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                "history_epochs": history["epochs"],
            }, history)
            last_good, good_path = epoch + 1, out / CHECKPOINT
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                log(f"stopped after epoch {epoch + 1} as asked; continue with --resume")
                break
    except torch.cuda.OutOfMemoryError:
        if phase != "training":
            raise TrainingOutOfMemory(
                f"the GPU ran out of memory evaluating the {phase} set at epoch {epoch + 1}, in batches of "
                f"{EVAL_BATCH_SIZE} images (fixed: --batch-size sets the training batch only): close what "
                f"else uses the GPU; {good_checkpoint()}.") from None
        half = max(1, cfg.batch_size // 2)
        raise TrainingOutOfMemory(
            f"the GPU ran out of memory training at batch size {cfg.batch_size} (epoch {epoch + 1}): try a "
            f"smaller one, e.g. --batch-size {half} (with --lr {cfg.lr * half / cfg.batch_size:g} to keep lr "
            f"per image), or close what else uses the GPU; {good_checkpoint()}.") from None
    finally:
        writer.close()
    history["meta"]["checkpoint"] = {"writes": writer.writes, "blocking_seconds": writer.blocking,
                                     "background_write_seconds": writer.writing}
    return history
