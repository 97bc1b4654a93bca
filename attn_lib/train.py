"""Training and evaluation: two presets, an exact resume, and a history a reader can trust.

``seed`` reproduces the recipe of the training script the course started from: SGD with momentum
0.9, lr 0.1 with one linear warm-up epoch, ×0.1 at epochs 80 and 120 of 160, batch 128, weight
decay 5e-4 (the issue's figure; the circulating script itself used 1e-4), torchvision transforms in
DataLoader workers, float32.

``fast`` aims at the same accuracy in a fraction of the time: the dataset lives on the GPU
(:class:`attn_lib.data.GPULoader`), batch 512, bf16 autocast, channels_last, a one-cycle schedule
(linear up to a peak lr 0.2 for the first 20% of steps, then linearly down to 0), Nesterov
momentum, label smoothing 0.1, no weight decay on norms and biases, horizontal-flip test-time
augmentation, 50 epochs, and optionally ``torch.compile``.

Every epoch writes ``history.json`` (config, git commit, versions, device, seed and per-epoch
losses, accuracies, lr and seconds) and ``checkpoint.pt`` (model, optimiser, scheduler, grad
scaler and RNG states; loadable with ``torch.load(weights_only=True)``). ``resume=True`` continues
from the last completed epoch and gives exactly the result of an uninterrupted run, because every
epoch's shuffling and augmentation are drawn from a generator seeded by ``(seed, epoch)``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import GPULoader, dataloader, load_cifar, stratified_split
from .models import build_model
from .provenance import provenance

__all__ = ["PRESETS", "TrainConfig", "TrainingDiverged", "accuracy", "evaluate", "fit", "lr_factor",
           "resolve_device", "load_checkpoint"]

HISTORY, CHECKPOINT = "history.json", "checkpoint.pt"

PRESETS: dict[str, dict] = {
    "seed": dict(epochs=160, batch_size=128, lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4,
                 decay_norm_and_bias=True, schedule="multistep", milestones=(80, 120), gamma=0.1,
                 warmup_epochs=1.0, label_smoothing=0.0, amp=False, channels_last=False, compile=False,
                 pipeline="dataloader", tta=False),
    "fast": dict(epochs=50, batch_size=512, lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 decay_norm_and_bias=False, schedule="onecycle", warmup_fraction=0.2,
                 label_smoothing=0.1, amp=True, channels_last=True, compile=False, pipeline="gpu", tta=True),
}


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
    amp: bool = True  # bf16 autocast on CUDA (fp16 + GradScaler where bf16 is missing)
    channels_last: bool = True
    compile: bool = False
    pipeline: str = "gpu"  # "gpu" (GPULoader, on any device) | "dataloader" (CPU workers)
    workers: int = 2
    tta: bool = True
    val_size: int = 5000
    split_seed: int = 0
    train_subset: int | None = None  # use only the first N training images (quick mode)
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_preset(cls, preset: str = "fast", **overrides) -> "TrainConfig":
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - fields
        if unknown:
            raise ValueError(f"unknown config fields {sorted(unknown)}; expected some of {sorted(fields)}")
        return cls(**{**PRESETS[preset], "preset": preset, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["milestones"] = list(d["milestones"])
        return d


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[float]:
    """Percentage of samples whose target is among the ``k`` highest logits, for each ``k``.

    The seed script's ``accuracy()`` counted ``wrong_k`` and returned the *error* rate, printed as
    "Prec"; this returns accuracy (a test pins it).
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
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' requested but MPS is not available")
    if device.split(":")[0] not in ("cpu", "cuda", "mps"):
        raise ValueError(f"expected device cpu, cuda, mps or auto, got {device!r}")
    return torch.device(device)


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


def _amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None  # autocast on CPU/MPS is slower than float32 for these models
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


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


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`fit` safely (``weights_only=True``)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _build_data(cfg: TrainConfig, device: torch.device):
    full = load_cifar(cfg.dataset, "train", cfg.data_dir, cfg.download)
    test = load_cifar(cfg.dataset, "test", cfg.data_dir, cfg.download)
    if cfg.train_subset:
        full = full.subset(range(min(cfg.train_subset, len(full))))
    val_size = min(cfg.val_size, len(full) // 5)
    train_idx, val_idx = stratified_split(full.y, val_size, cfg.split_seed) if val_size else (range(len(full)), [])
    return full.subset(train_idx), (full.subset(val_idx) if val_size else None), test


def fit(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True,
        stop_after: int | None = None, log: Callable[[str], None] = print, command: str | None = None) -> dict:
    """Train ``cfg`` and write ``out_dir/history.json`` and ``out_dir/checkpoint.pt`` every epoch.

    ``resume=True`` continues from ``checkpoint.pt`` if it exists (the config must match);
    ``stop_after=N`` ends the call after epoch N (resume later): long runs in short sessions.
    Returns the history dict. Raises :class:`TrainingDiverged` on a NaN/inf loss.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    amp_dtype = _amp_dtype(device, cfg.amp)
    torch.manual_seed(cfg.seed)
    train_set, val_set, test_set = _build_data(cfg, device)
    model = build_model(cfg.model, train_set.num_classes, cfg.attention, **cfg.model_kwargs).to(device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(_param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias), lr=cfg.lr,
                                momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.pipeline == "gpu":
        train_loader = GPULoader(train_set, cfg.batch_size, True, device, cfg.channels_last, drop_last=True)
        make_eval = lambda ds: GPULoader(ds, 1024, False, device, cfg.channels_last)  # noqa: E731
    elif cfg.pipeline == "dataloader":
        train_loader = dataloader(train_set, cfg.batch_size, True, cfg.workers, pin_memory=device.type == "cuda")
        make_eval = lambda ds: dataloader(ds, 1024, False, cfg.workers, pin_memory=device.type == "cuda")  # noqa: E731
    else:
        raise ValueError(f"unknown pipeline {cfg.pipeline!r}; expected 'gpu' or 'dataloader'")
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {cfg.batch_size} is larger than the {len(train_set)} training images")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    aux_weight = float(getattr(model, "auxiliary_loss_weight", 0.0))
    runner = torch.compile(model) if cfg.compile else model

    history = {
        "config": cfg.to_dict(),
        "meta": {**provenance(device, cfg.seed, command), "amp_dtype": str(amp_dtype) if amp_dtype else None,
                 "train_images": len(train_set), "val_images": len(val_set or []),
                 "test_images": len(test_set), "data_source": train_set.source if train_set.name != "synthetic"
                 else "synthetic (generated)", "parameters": sum(p.numel() for p in model.parameters())},
        "epochs": [],
    }
    start_epoch = 0
    ckpt_path = out / CHECKPOINT
    if resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        if ckpt["config"] != cfg.to_dict():
            diff = sorted(k for k in ckpt["config"] if ckpt["config"][k] != cfg.to_dict().get(k))
            raise ValueError(f"cannot resume {ckpt_path}: its config differs in {diff}; use the same options or another --out")
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
    elif resume:
        log(f"no checkpoint in {out}; starting from scratch")

    check_every = 1 if device.type == "cpu" else 25  # a host sync per step costs GPU time
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        gen_device = device if cfg.pipeline == "gpu" else torch.device("cpu")
        generator = torch.Generator(gen_device).manual_seed(cfg.seed * 100_003 + epoch)
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
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                if aux_weight > 0:
                    logits, aux = runner(x, return_aux=True)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing) + \
                        aux_weight * F.cross_entropy(aux, y, label_smoothing=cfg.label_smoothing)
                else:
                    logits = runner(x)
                    loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
            if (step + 1) % check_every == 0 or step + 1 == steps_per_epoch:
                running = loss_sum.item() / seen
                if not math.isfinite(running):
                    raise TrainingDiverged(
                        f"the training loss became {running} at epoch {epoch + 1}, step {step + 1} "
                        f"(lr {scheduler.get_last_lr()[0]:.4g}); lower --lr or check the data. "
                        f"The last good checkpoint is {ckpt_path if ckpt_path.exists() else 'not written yet'}."
                    )
                bar.set_postfix(loss=f"{running:.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "train_loss": loss_sum.item() / seen,
                  "train_top1": correct.item() / seen * 100, "seconds": seconds}
        if val_set is not None:
            v = evaluate(runner, make_eval(val_set), device, amp_dtype, cfg.tta, cfg.label_smoothing)
            record.update(val_loss=v["loss"], val_top1=v["top1"], val_top5=v["top5"])
        if epoch + 1 == cfg.epochs:  # the test set is looked at once, at the end, never to choose
            t = evaluate(runner, make_eval(test_set), device, amp_dtype, cfg.tta, cfg.label_smoothing)
            record.update(test_loss=t["loss"], test_top1=t["top1"], test_top5=t["top5"])
        history["epochs"].append(record)
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "epoch": epoch + 1, "config": cfg.to_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
            "history_epochs": history["epochs"],
        }, ckpt_path.with_suffix(".tmp"))
        os.replace(ckpt_path.with_suffix(".tmp"), ckpt_path)
        history["meta"]["train_seconds"] = sum(e["seconds"] for e in history["epochs"])
        _write_json_atomic(out / HISTORY, history)
        if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
            log(f"stopped after epoch {epoch + 1} as asked; continue with --resume")
            break
    return history
