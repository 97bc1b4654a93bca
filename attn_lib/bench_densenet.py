"""What triple attention costs on the CIFAR DenseNet-121: each part alone, and all three.

    python -m attn_lib.bench_densenet --device cpu --out attn_lib/results/bench-densenet-cpu.json

Rows for the plain DenseNet-121 (10 classes, 32x32 images) and for the network with the
channel-wise, the element-wise or the scale-wise part alone and with all three
(``densenet121(attention="triple", parts=...)``):

* ``params``: trainable parameters;
* ``flops``: FLOPs of one training forward pass of one image (with the element-wise branch, which
  a training step runs for its loss), counted by :class:`torch.utils.flop_counter.FlopCounterMode`
  at 2 FLOPs per multiply-add (convolutions and matrix products only, as in ``bench modules``);
* ``step_seconds`` and ``step_time_ratio``: the median time of one training step (forward with
  the auxiliary head where there is one, both losses, backward, SGD) and its median ratio to the
  plain network's time in the same round; rounds are interleaved in a rotated order so that slow
  drift of a shared machine cancels, as in :mod:`attn_lib.bench_modules`;
* ``peak_mib``: what one training step adds to the memory in use (see
  :func:`attn_lib.bench_modules._peak_mib`; ``None`` where it cannot be measured).

A benchmark, not a test: timings depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from .bench_modules import _peak_mib
from .models.densenet import PARTS, densenet121
from .provenance import provenance

__all__ = ["VARIANTS", "bench_densenet", "build_variant", "training_flops"]

#: name -> parts (None: the plain network).
VARIANTS = {"none": None, "channel": ("channel",), "element": ("element",), "scale": ("scale",),
            "triple": PARTS}


_TRIPLE_OPTIONS = ("aux_weight", "hidden", "reduction", "scale_blocks", "scale_reduction")


def build_variant(name: str, num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    """The DenseNet-121 of row ``name`` (see :data:`VARIANTS`); triple-attention options in
    ``kwargs`` are left out for the plain network."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {', '.join(VARIANTS)}")
    torch.manual_seed(seed)
    parts = VARIANTS[name]
    if parts is None:
        backbone = {k: v for k, v in kwargs.items() if k not in _TRIPLE_OPTIONS}
        return densenet121(num_classes, **backbone)
    return densenet121(num_classes, "triple", parts=list(parts), **kwargs)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if model.auxiliary_loss_weight > 0:
        logits, aux = model(x, return_aux=True)
        return F.cross_entropy(logits, y) + model.auxiliary_loss_weight * F.cross_entropy(aux, y)
    return F.cross_entropy(model(x), y)


def training_flops(model: torch.nn.Module, image_size: int = 32) -> int:
    """FLOPs of one training forward pass of one image (with the auxiliary head), float32, CPU."""
    model = model.to("cpu", torch.float32).eval()
    x = torch.zeros(1, model.in_channels, image_size, image_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        if model.auxiliary_loss_weight > 0:
            model(x, return_aux=True)
        else:
            model(x)
    return int(counter.get_total_flops())


def bench_densenet(device: str = "cpu", batch: int = 16, rounds: int = 3, seed: int = 0,
                   command: str | None = None, **model_kwargs) -> dict:
    """Measure every variant (see the module docstring); returns the results file's content.

    ``model_kwargs`` go to :func:`densenet121` (a smaller network for tests)."""
    dev = torch.device(device)
    facts = provenance(dev, seed, command)  # taken first: the code that ran is the code at start
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        models = {name: build_variant(name, seed=seed, **model_kwargs) for name in VARIANTS}
        rows = {name: {"name": name, "parts": list(VARIANTS[name] or ()),
                       "params": sum(p.numel() for p in m.parameters()),
                       "flops": training_flops(m)} for name, m in models.items()}
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, 32, 32, generator=g).to(dev)
        y = torch.randint(0, 10, (batch,), generator=g).to(dev)
        optims = {}
        for name, m in models.items():
            m.to(dev).train()
            optims[name] = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)

        def step(name: str) -> None:
            loss = _loss(models[name], x, y)
            optims[name].zero_grad(set_to_none=True)
            loss.backward()
            optims[name].step()
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

        for name in models:  # warm-up, and the memory of one step
            step(name)
            rows[name]["peak_mib"] = _peak_mib(lambda name=name: step(name), dev)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                step(name)
                times[name].append(time.perf_counter() - t0)
        for name in names:
            rows[name]["step_seconds"] = statistics.median(times[name])
            rows[name]["step_time_ratio"] = statistics.median(t / b for t, b in zip(times[name], times["none"]))
    finally:
        torch.set_num_threads(threads)
    return {"benchmark": "DenseNet-121 (CIFAR, 10 classes) with and without triple attention",
            **facts, "cpu_threads": 1 if dev.type == "cpu" else None,
            "batch": batch, "rounds": rounds, "dtype": "float32", "model_kwargs": model_kwargs,
            "rows": list(rows.values())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m attn_lib.bench_densenet", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the results file to write (JSON)")
    args = p.parse_args(argv)
    command = "python -m attn_lib.bench_densenet " + " ".join(argv if argv is not None else sys.argv[1:])
    result = bench_densenet(args.device, args.batch, args.rounds, args.seed, command)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for row in result["rows"]:
        print(f"{row['name']:<8} params {row['params']:>11,} | {row['flops'] / 1e9:6.2f} GFLOPs | "
              f"step x{row['step_time_ratio']:.2f} ({row['step_seconds']:.2f} s)")


if __name__ == "__main__":
    main()
