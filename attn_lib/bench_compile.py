"""What a mechanism costs in time, eager against ``torch.compile``, and how many operations it runs.

DIA adds 0.3% to ResNet-18's FLOPs but runs its LSTM cell once per block, one small operation
after another on ``[B, C]`` vectors: each is a separate kernel launch (or, on a CPU, a separate
trip through PyTorch's dispatcher) whose fixed cost does not shrink with its size. Two functions
measure that:

* :func:`dispatched_ops` counts the ATen operations of one training step (forward + backward),
  split by the size of what they produce: feature maps (4-D) or vectors (at most 2-D).
* :func:`bench_compile` times training steps of ResNet-18 with each mechanism, eagerly and
  compiled with ``torch.compile`` (which fuses chains of element-wise operations into fewer
  kernels), and reports each against the plain network in the same mode. Timings are
  interleaved as in :mod:`attn_lib.bench_modules` (each round times every configuration once;
  a ratio is the median over rounds of per-round ratios), so slow drift cancels.

Run ``python -m attn_lib.bench_compile --device cpu --out bench-compile-cpu.json``. These are
benchmarks, not tests: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .bench import _make_step, _sync, _time_steps
from .models import resnet18
from .provenance import provenance

__all__ = ["bench_compile", "dispatched_ops"]


class _CountOps(TorchDispatchMode):
    """Counts ATen operations by the largest number of dimensions among their tensor outputs."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = out if isinstance(out, (tuple, list)) else (out,)
        dims = [t.dim() for t in leaves if isinstance(t, torch.Tensor)]
        kind = "feature_map" if dims and max(dims) >= 4 else "vector" if dims and max(dims) <= 2 else "other"
        self.counts[kind] += 1
        return out


def dispatched_ops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """ATen operations of one training step (forward, loss, backward) of ``model`` on ``(x, y)``.

    Returns ``{"feature_map": n, "vector": n, "other": n, "total": n}``: operations whose largest
    tensor output is 4-D (work on feature maps), at most 2-D (work on vectors such as DIA's
    ``[B, C]`` states, the classifier, the loss), or neither (e.g. 1-D or 3-D). Eager mode; the
    model's gradients are set by the step and cleared afterwards.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images [B, C, H, W], got {got}")
    with _CountOps() as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    counts = dict(counter.counts)
    return {k: counts.get(k, 0) for k in ("feature_map", "vector", "other")} | {"total": sum(counts.values())}


def bench_compile(device: str | torch.device = "cpu", mechanisms: Sequence[str] = ("none", "dia"), *,
                  batch: int = 8, width: int = 64, rounds: int = 7, steps: int = 3, warmup: int = 2,
                  backend: str = "inductor", threads: int | None = 1, seed: int = 0) -> dict:
    """Training-step time of ResNet-18 with each mechanism, eager and compiled (see the module doc).

    ``mechanisms[0]`` must be ``"none"`` (the baseline). Each model is compiled once
    (``torch.compile(model, backend=backend)``; the first step's time, compilation included, is
    ``compile_seconds``), warmed up with ``warmup`` steps, then timed in ``rounds`` interleaved
    rounds of ``steps`` steps. On the CPU the run is single-threaded by default (``threads=1``;
    restored afterwards), as in :mod:`attn_lib.bench_modules`, because on a shared machine two
    threads wait for each other. Float32, channels_last, random data resident on the device.
    """
    device = torch.device(device)
    mechanisms = list(mechanisms)
    if not mechanisms or mechanisms[0] != "none":
        raise ValueError(f"expected the mechanisms to start with the baseline 'none', got {mechanisms}")
    threads_before = torch.get_num_threads()
    if threads and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(device, memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,), generator=g).to(device)
        configs, static = {}, {}
        for name in mechanisms:
            torch.manual_seed(seed)
            model = resnet18(10, attention=None if name == "none" else name, width=width)
            model = model.to(device, memory_format=torch.channels_last).train()
            static[name] = {"ops": dispatched_ops(model, x, y),
                            "params": sum(p.numel() for p in model.parameters())}
            for mode in ("eager", "compiled"):
                net = model if mode == "eager" else torch.compile(model, backend=backend)
                optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
                step = _make_step(net, optimizer, device, amp=False, channels_last=True)
                t0 = time.perf_counter()
                step(x, y)  # compiles, in compiled mode
                _sync(device)
                first = time.perf_counter() - t0
                for _ in range(warmup):
                    step(x, y)
                configs[name, mode] = {"step": step, "first_step_seconds": first}
        times: dict = {key: [] for key in configs}
        keys = list(configs)
        for r in range(rounds):
            k = r % len(keys)
            for key in keys[k:] + keys[:k]:
                times[key].append(_time_steps(configs[key]["step"], iter(lambda: (x, y), None), 0, steps, device))
        rows = []
        for (name, mode), cfg in configs.items():
            base = times["none", mode]
            rows.append({
                "attention": name, "mode": mode,
                "params": static[name]["params"],
                "ops_per_step": static[name]["ops"],
                "step_seconds": statistics.median(times[name, mode]),
                "ratio_to_plain_same_mode": statistics.median(t / b for t, b in zip(times[name, mode], base)),
                "ratio_to_eager_same_model": statistics.median(
                    t / e for t, e in zip(times[name, mode], times[name, "eager"])),
                "first_step_seconds": cfg["first_step_seconds"],
            })
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads_before)
    return {
        "benchmark": "compile",
        "model": f"resnet18 (CIFAR, 10 classes, width {width}, 32x32 inputs)",
        "data": "random tensors resident on the device",
        "timing": (f"training step (forward, loss, backward, SGD), float32, channels_last, batch {batch}; "
                   f"{rounds} interleaved rounds of {steps} steps, ratios are medians of per-round ratios"),
        "compile": f"torch.compile(model, backend={backend!r}), default mode",
        "ops_note": ("ATen operations dispatched in one eager training step, by the largest number of "
                     "dimensions of their tensor outputs: 4-D feature_map, at most 2-D vector, else other"),
        "cpu_threads": used_threads if device.type == "cpu" else None,
        "settings": dict(mechanisms=mechanisms, batch=batch, width=width, rounds=rounds, steps=steps,
                         warmup=warmup, backend=backend, seed=seed),
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attn_lib.bench_compile", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    command = "python -m attn_lib.bench_compile " + " ".join(sys.argv[1:] if argv is None else argv)
    # Provenance first: the commit is the one whose code was loaded, whatever changes later.
    meta = provenance(torch.device(args.device), seed=0, command=command)
    result = bench_compile(args.device, batch=args.batch, rounds=args.rounds)
    record = meta | result
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for row in result["rows"]:
        print(f"{row['attention']:5s} {row['mode']:8s} {1000 * row['step_seconds']:8.1f} ms/step | "
              f"x{row['ratio_to_plain_same_mode']:.2f} plain | first step {row['first_step_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
