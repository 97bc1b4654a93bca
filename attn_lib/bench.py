"""Benchmarks: speed reported as a ratio against a baseline measured in the same run.

``python -m attn_lib bench train`` — images/s of one ResNet-18 training step under the reference
pipeline (DataLoader + CPU transforms, float32, batch 128; with as many loader workers as the
machine gives, up to 5, and with 2, as on a free Colab runtime) and the fast pipeline
(GPU-resident data, bf16 autocast, channels_last, batch 512, fused SGD; also compiled, by default
on CUDA or with ``--compile``), each row's speed-up over the reference pipeline, and
the model FLOPs utilisation: FLOPs of a training step from :mod:`torch.utils.flop_counter` divided
by a peak measured in the same run (a large bf16 matmul on CUDA, float32 on CPU).

``python -m attn_lib bench modules`` — for each mechanism in ResNet-18: parameters and FLOPs added,
the training step time relative to the plain ResNet-18 measured in the same run (eager, and
compiled on CUDA), and peak memory; DenseNet-121 with and without triple attention; and explicit
vs fused non-local / DANet position attention at growing feature-map sizes.
These are benchmarks, never tests: timings depend on the machine.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .data import ArrayDataset, GPULoader, dataloader
from .models import resnet18
from .provenance import provenance
from .train import resolve_device

__all__ = ["run", "summary", "measure_peak_flops", "training_step_flops"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak_flops(device: torch.device, n: int | None = None, repeats: int = 10, bursts: int = 5) -> float:
    """FLOP/s of a square matmul: bf16 on CUDA (the tensor-core peak MFU is quoted against).

    The best of ``bursts`` timings of ``repeats`` products: a peak is a maximum, and a single burst
    on a shared machine can be slowed by other jobs (which would inflate the MFU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    best = 0.0
    for _ in range(bursts):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - t0))
    return best


def training_step_flops(model: torch.nn.Module, batch: int, device: torch.device) -> float:
    """FLOPs of one forward + backward pass on ``batch`` CIFAR images, counted by torch."""
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _random_cifar(n: int, seed: int) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return ArrayDataset(x, rng.integers(0, 10, size=n), [str(k) for k in range(10)], "random",
                        "random CIFAR-shaped uint8", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))


def _time_steps(step: Callable[[torch.Tensor, torch.Tensor], None], batches, warmup: int, steps: int,
                device: torch.device) -> float:
    """Seconds per step over ``steps`` steps after ``warmup`` untimed ones (data loading included)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step(*next(it))
    _sync(device)
    return (time.perf_counter() - t0) / steps


def _make_step(model, optimizer, device, amp: bool, channels_last: bool):
    dtype = torch.bfloat16 if amp and device.type == "cuda" else None
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def step(x, y):
        x = x.to(device, non_blocking=True, memory_format=fmt)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def train_configs(device: torch.device, compile: bool | None, cpus: int) -> list[dict]:
    """The pipelines ``bench train`` measures: the reference pipeline with the machine's loader
    workers (up to 5) and with 2 (a free Colab runtime has 2 CPU cores), the fast pipeline, and the
    fast pipeline compiled (``compile=None``: on CUDA only)."""
    workers = min(5, cpus)
    reference = dict(pipeline="dataloader", batch=128, amp=False, channels_last=False, compile=False, fused=False)
    fast = dict(pipeline="gpu", batch=512, amp=True, channels_last=True, compile=False, fused=device.type == "cuda")
    configs = [dict(name="reference", workers=workers, **reference)]
    if workers != 2:
        configs.append(dict(name="reference-2-workers", workers=2, **reference))
    configs.append(dict(name="fast", workers=0, **fast))
    if compile or (compile is None and device.type == "cuda"):
        configs.append(dict(name="fast+compile", workers=0, **{**fast, "compile": True}))
    return configs


def bench_train(device: torch.device, steps: int | None, seed: int, compile: bool | None) -> dict:
    cpu = device.type == "cpu"
    steps = steps or (3 if cpu else 50)
    warmup = 1 if cpu else 10
    torch.manual_seed(seed)
    configs = train_configs(device, compile, len(__import__("os").sched_getaffinity(0)))
    peak = measure_peak_flops(device)
    flops_per_image = training_step_flops(resnet18(10).to(device), 8, device) / 8
    rows = []
    for c in configs:
        n_images = c["batch"] * (warmup + steps + 1)
        data = _random_cifar(n_images, seed)
        model = resnet18(10).to(device, memory_format=torch.channels_last if c["channels_last"] else torch.contiguous_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, **({"fused": True} if c["fused"] else {}))
        runner = torch.compile(model) if c["compile"] else model
        step = _make_step(runner, optimizer, device, c["amp"], c["channels_last"])
        if c["pipeline"] == "gpu":
            loader = GPULoader(data, c["batch"], True, device, c["channels_last"], drop_last=True)
            loader.generator = torch.Generator(device).manual_seed(seed)
        else:
            loader = dataloader(data, c["batch"], True, c["workers"], torch.Generator().manual_seed(seed),
                                pin_memory=device.type == "cuda")
        seconds = _time_steps(step, loader, warmup, steps, device)
        ips = c["batch"] / seconds
        rows.append({**c, "step_seconds": seconds, "images_per_second": ips, "mfu": ips * flops_per_image / peak})
    base = rows[0]["images_per_second"]
    two = next((r for r in rows if r["name"] == "reference-2-workers"), rows[0])["images_per_second"]
    for r in rows:
        r["speedup_vs_reference"] = r["images_per_second"] / base
        r["speedup_vs_reference_2_workers"] = r["images_per_second"] / two
    return {"benchmark": "train", "model": "resnet18 (CIFAR, 10 classes)", "data": "random CIFAR-shaped uint8",
            "timed_steps": steps, "warmup_steps": warmup, "peak_flops_measured": peak,
            "peak_dtype": "bfloat16" if device.type == "cuda" else "float32",
            "train_flops_per_image": flops_per_image, "rows": rows}


def run(what: str, device: str = "auto", steps: int | None = None, seed: int = 0, compile: bool | None = None,
        command: str | None = None) -> dict:
    """Run benchmark ``what`` (``train`` or ``modules``); ``compile=None``: compiled rows on CUDA only."""
    dev = resolve_device(device)
    if what == "train":
        body = bench_train(dev, steps, seed, compile)
    elif what == "modules":
        from .bench_modules import bench_modules

        body = bench_modules(dev, steps, seed, compile=compile)
    elif what == "danet":
        from .bench_modules import bench_danet_position

        body = bench_danet_position(dev, steps, seed)
    else:
        raise ValueError(f"unknown benchmark {what!r}; expected 'train', 'modules' or 'danet'")
    return {**provenance(dev, seed, command), **body}


def summary(results: dict) -> str:
    """A plain-text table of a results dict."""
    lines = [f"{results['benchmark']} benchmark on {results['device_name']} (torch {results['torch']}, "
             f"commit {results['git_commit']})"]
    for r in results["rows"]:
        lines.append("  " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
    return "\n".join(lines)
