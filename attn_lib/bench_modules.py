"""The module benchmark: what each attention mechanism costs, and what fusing attention saves.

``python -m attn_lib bench modules`` calls :func:`bench_modules`, which returns two kinds of rows
(flat dicts, told apart by ``"kind"``):

* ``"mechanism"``: for each mechanism in the CIFAR ResNet-18 (10 classes, width 64, 32x32 inputs,
  each mechanism where its paper puts it, see :mod:`attn_lib.models.resnet`): parameters and
  forward FLOPs added to the plain network, the training-step time relative to the plain
  ResNet-18 *measured in the same run*, and the peak memory of a training step.
* with ``compile=True`` (the default on CUDA) every ``"mechanism"`` row also gets
  ``compiled_step_seconds`` and ``compiled_step_time_ratio``: the same models under
  ``torch.compile(fullgraph=True)`` (so a graph break is an error, recorded in ``compile_error``),
  timed in their own interleaved rounds against the compiled plain network.
* ``"densenet"``: DenseNet-121 (CIFAR stem) without and with triple attention, the network the
  triple-attention paper uses: parameters, FLOPs and the step-time ratio (eager, and compiled
  when ``compile=True``).
* ``"explicit_vs_fused"``: the non-local block (embedded gaussian, no sub-sampling, so the map is
  N x N) and the DANet position module at growing feature maps, the explicit N x N softmax against
  ``F.scaled_dot_product_attention``: forward + backward time and peak memory, with the ratios.

How the numbers are taken:

* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode`, one forward pass of one image, eval
  mode, on the CPU in float32 (so the count is the same whatever device runs the timings). It
  counts matrix products, convolutions and attention kernels at 2 FLOPs per multiply-add; it does
  not count element-wise work (pooling, sigmoid, softmax, the gating products), which is cheap in
  FLOPs but not in memory traffic: the step-time ratio shows that part.
* Time: the fast-pipeline style of :mod:`attn_lib.bench` (data resident on the device,
  channels_last, bf16 autocast on CUDA; float32 on the CPU; batch 512 on CUDA, 32 on the CPU).
  Measurements are *interleaved*: every round times each model once, in a rotated order, and a
  mechanism's ratio is the median over rounds of its time divided by the plain network's time in
  the same round, so slow drift (clocks, other jobs) cancels.
* Threads: on the CPU the benchmark runs single-threaded (``torch.set_num_threads(1)`` for its
  duration, restored afterwards; recorded as ``cpu_threads``, while the provenance's device name
  gives the process's own setting). On a shared machine a step with 2 threads waits whenever
  either thread is descheduled: with other jobs on a 2-core machine, 2-thread ResNet-18 steps ran
  2-3x *slower* than 1-thread ones and varied far more, which no amount of interleaving repairs.
* Memory: the peak of one untimed training step (one forward + backward for the attention
  modules) *above what was in use just before it*, so the weights, the optimizer state and the
  batch are not counted: what a step adds (activations, gradients, workspace). On CUDA it is
  ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the step. On the
  CPU (Linux) it is the peak resident set size, ``resource.getrusage().ru_maxrss``, after freed
  heap was returned to the system (``malloc_trim``) and the kernel's high-water mark was reset
  (``/proc/self/clear_refs``), minus the resident size before; without that reset ``ru_maxrss``
  is a high-water mark over the process's whole life, so elsewhere the CPU figure is ``None``.
  RSS counts pages, not tensors: small figures (a few MiB) are within its noise.
* Fused or not: ``F.scaled_dot_product_attention`` silently falls back to its math path (which
  builds the N x N map like the explicit form) when no fused kernel accepts its inputs; each
  explicit-vs-fused row records the kernel the "fused" module actually ran (``fused_kernel``).
  The explicit-vs-fused rows also give ``attention_map_mib``, the computed size of one float32
  N x N map.

These are benchmarks, not tests: timings depend on the machine and its load.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import itertools
import math
import statistics
import sys
import time
from typing import Callable, Sequence

try:
    import resource
except ImportError:  # not on Windows
    resource = None

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .bench import _make_step, _sync, _time_steps
from .models import resnet18
from .registry import attention_spec, create_attention

__all__ = ["MECHANISMS", "attention_kernels", "bench_danet_position", "bench_modules", "compiled_step_ratios",
           "densenet_rows", "mechanism_rows",
           "explicit_vs_fused_rows", "forward_flops"]

#: The mechanisms compared in ResNet-18 (``"none"`` is the plain network, the baseline).
MECHANISMS = ("none", "se", "eca", "cbam", "sk", "nonlocal", "danet", "dia")

#: The two N x N attention modules compared explicit vs fused: name -> (registry name, options).
ATTENTION_MODULES = {
    "nonlocal": ("nonlocal", {"mode": "embedded", "sub_sample": False}),
    "danet_position": ("danet", {"mode": "position"}),
}

#: The non-local forms that :func:`bench_nonlocal` compares (the non-local chapter): the embedded
#: gaussian, whose fused form is ``F.scaled_dot_product_attention``, and the dot form, whose
#: "fused" form is the re-associated θ (φᵀ g) / N', which builds no N x N map.
NONLOCAL_FORMS = {
    "nonlocal": ATTENTION_MODULES["nonlocal"],
    "nonlocal_dot": ("nonlocal", {"mode": "dot", "sub_sample": False}),
}
REASSOCIATED = "re-associated theta (phi^T g) / N' (no attention kernel)"

MIB = 2**20


def _settings(device: torch.device) -> dict:
    """Defaults per device: the CPU ones keep the whole benchmark to a few minutes on 2 cores."""
    if device.type == "cuda":
        return dict(steps=20, warmup=5, rounds=3, batch=512, attn_sizes=(32, 64, 128), attn_batch=8,
                    attn_channels=128, attn_rounds=5, min_seconds=0.05, threads=None, compile=True,
                    compile_backend="inductor", densenet=True, densenet_batch=128, densenet_growth=32)
    return dict(steps=1, warmup=1, rounds=5, batch=32, attn_sizes=(16, 32, 64), attn_batch=2,
                attn_channels=64, attn_rounds=5, min_seconds=0.25, threads=1, compile=False,
                compile_backend="inductor", densenet=True, densenet_batch=8, densenet_growth=32)


def _dtype_name(device: torch.device) -> str:
    return "bfloat16 autocast" if device.type == "cuda" else "float32"


def _random_batch(device: torch.device, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed random batch of 32x32 images (channels_last) and labels, the same for every model
    a benchmark compares."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device, memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    return x, y


def _baseline_first(mechanisms) -> list[str]:
    """The mechanisms as a list, checked to start with the plain network every ratio refers to."""
    mechanisms = list(mechanisms)
    if not mechanisms or mechanisms[0] != "none":
        raise ValueError(f"expected the mechanisms to start with the baseline 'none', got {mechanisms}")
    return mechanisms


def forward_flops(model: torch.nn.Module, image_size: int = 32) -> int:
    """FLOPs of one forward pass of one image, counted by torch (eval mode, CPU, float32).

    Attention runs on PyTorch's math path while counting: ``FlopCounterMode`` has no formula for
    the fused CPU attention kernel and would leave attention's two matrix products out."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = model.to("cpu", torch.float32).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(torch.zeros(1, model.in_channels, image_size, image_size))
    return int(counter.get_total_flops())


def _build(name: str, width: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return resnet18(10, attention=None if name == "none" else name, width=width)


def _median_ratio(times: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(t / b for t, b in zip(times[name], times[base]))


@functools.lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def _reset_cpu_peak() -> bool:
    """Return freed heap to the OS and reset the kernel's high-water mark of this process's RSS
    (Linux: ``/proc/self/clear_refs``), so that ``ru_maxrss`` then tracks a new peak. False where
    this is not possible (another OS), in which case no CPU peak is reported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        _libc().malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except (OSError, AttributeError):
        return False


def _peak_mib(run_once: Callable[[], None], device: torch.device) -> float | None:
    """Peak memory while ``run_once()`` runs, above what was in use just before it, in MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before.
    CPU (Linux): the peak resident set size, ``resource.getrusage(...).ru_maxrss`` after its
    high-water mark was reset, minus the resident set size before; ``None`` elsewhere."""
    if device.type == "cuda":
        gc.collect()  # (slow in a large process; on the CPU reference counting has freed what matters)
        torch.cuda.empty_cache()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        run_once()
        _sync(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    if device.type != "cpu" or resource is None or not _reset_cpu_peak():
        return None
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: the RSS right after the reset
    run_once()
    return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


class _AttentionKernels(TorchDispatchMode):
    """Records which ``scaled_dot_product`` kernels run (none when the math fallback runs)."""

    def __init__(self):
        super().__init__()
        self.kernels: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if "scaled_dot_product" in name:
            self.kernels.add(name.split(".")[0])
        return func(*args, **(kwargs or {}))


def attention_kernels(fn: Callable[[], object]) -> list[str]:
    """The fused ``scaled_dot_product`` kernels (aten ops) that ran inside ``fn()``, sorted.

    Empty when none ran: ``F.scaled_dot_product_attention`` then took its math path, which is
    made of ordinary operations (a matrix product, a softmax, another product) and builds the
    N x N map."""
    with _AttentionKernels() as seen:
        fn()
    return sorted(seen.kernels)


def mechanism_rows(device: torch.device, mechanisms: Sequence[str] = MECHANISMS, *, batch: int, steps: int,
                   warmup: int, rounds: int, seed: int = 0, width: int = 64) -> list[dict]:
    """One ``"mechanism"`` row per name (the first must be ``"none"``, the baseline).

    Parameters and FLOPs added are relative to the plain network; ``step_time_ratio`` is the
    median over ``rounds`` interleaved rounds of (this model's step time / the plain one's in the
    same round); each round times ``steps`` steps of each model. Before the first round every
    model takes ``warmup`` untimed steps (at least one) and one more whose peak memory is taken.
    """
    mechanisms = _baseline_first(mechanisms)
    fmt = torch.channels_last
    x, y = _random_batch(device, batch, seed)
    batches = itertools.repeat((x, y))

    static: dict[str, dict] = {}
    models, steps_fn = {}, {}
    for name in mechanisms:
        model = _build(name, width, seed)
        # Size and FLOPs on a CPU copy (the same count whatever device times the steps).
        static[name] = {"params": sum(p.numel() for p in model.parameters()), "flops_forward": forward_flops(model)}
        model = model.to(device, memory_format=fmt).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        models[name] = model
        steps_fn[name] = _make_step(model, optimizer, device, amp=True, channels_last=True)

    # Warm-up (at least one step: it creates the gradients and momentum buffers), then the memory
    # of one more untimed step above what is in use before it.
    for name in mechanisms:
        for _ in range(max(warmup, 1)):
            steps_fn[name](x, y)
        _sync(device)
        models[name].zero_grad(set_to_none=True)
        static[name]["peak_memory_mib"] = _peak_mib(lambda: steps_fn[name](x, y), device)

    # Interleaved timing: one measurement of each model per round, the order rotated each round.
    times: dict[str, list[float]] = {name: [] for name in mechanisms}
    for r in range(rounds):
        k = r % len(mechanisms)
        for name in mechanisms[k:] + mechanisms[:k]:
            times[name].append(_time_steps(steps_fn[name], batches, 0, steps, device))
    del steps_fn, models

    base = static["none"]
    rows = []
    for name in mechanisms:
        s = static[name]
        seconds = statistics.median(times[name])
        peak = s["peak_memory_mib"]
        rows.append({
            "kind": "mechanism",
            "attention": name,
            "placement": None if name == "none" else attention_spec(name).placement,
            "width": width,
            "params": s["params"],
            "params_added": s["params"] - base["params"],
            "params_added_pct": 100 * (s["params"] - base["params"]) / base["params"],
            "flops_forward": s["flops_forward"],
            "flops_added": s["flops_forward"] - base["flops_forward"],
            "flops_added_pct": 100 * (s["flops_forward"] - base["flops_forward"]) / base["flops_forward"],
            "batch": batch,
            "dtype": _dtype_name(device),
            "channels_last": True,
            "rounds": rounds,
            "steps_per_round": steps,
            "step_seconds": seconds,
            "images_per_second": batch / seconds,
            "step_time_ratio": _median_ratio(times, name, "none"),
            "peak_memory_mib": peak,
            "peak_memory_ratio": peak / base["peak_memory_mib"] if peak and base["peak_memory_mib"] else None,
        })
    return rows


def _attention_step(module: torch.nn.Module, x: torch.Tensor, device: torch.device):
    """``(step, clear)``: ``step()`` is forward + backward of ``module`` on ``x`` (gradients for
    the parameters and for ``x``, bf16 autocast on CUDA); ``clear()`` drops those gradients."""
    amp = device.type == "cuda"

    def clear() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None

    def step() -> None:
        clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = module(x)
        out.float().sum().backward()
    return step, clear


def _fused_kernel(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> str:
    """The attention kernel ``module`` runs on ``x`` (forward, as in a training step): the aten op
    of a fused kernel, or ``"math"`` when the call fell back to the math path, which builds the
    N x N map like the explicit form (``F.scaled_dot_product_attention`` falls back silently, e.g.
    for an input whose last dimension is not contiguous)."""
    with _AttentionKernels() as seen, torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=device.type == "cuda"):
        module(x)
    return ", ".join(sorted(seen.kernels)) or "math"


def explicit_vs_fused_rows(device: torch.device, sizes: Sequence[int], *, batch: int, channels: int, steps: int,
                           warmup: int, rounds: int, seed: int = 0, min_seconds: float = 0.0,
                           modules: Sequence[str] = tuple(ATTENTION_MODULES)) -> list[dict]:
    """One ``"explicit_vs_fused"`` row per feature-map size (``size`` x ``size``) and module.

    Both implementations get the same weights and the same input (channels_last, as in the fast
    pipeline). After ``warmup`` steps (at least one) a step is timed once to choose how many steps
    a measurement takes (at least ``steps``, enough for about ``min_seconds``), and the memory of
    one step is taken. Each round then times the two, in alternating order;
    ``explicit_over_fused_time`` is the median over rounds of the per-round ratio. On CUDA an
    out-of-memory error leaves that implementation's figures ``None`` (and says so in ``errors``).
    """
    rows = []
    impls = ("explicit", "fused")
    for size in sizes:
        for label in modules:
            name, options = {**ATTENTION_MODULES, **NONLOCAL_FORMS}[label]
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(batch, channels, size, size, generator=g)
            x = x.to(device, memory_format=torch.channels_last).requires_grad_(True)
            fns, peaks, n_steps, errors, kernel = {}, {}, {}, {}, None
            for impl in impls:
                torch.manual_seed(seed)
                module = create_attention(name, channels, implementation=impl, **options).to(device)
                step, clear = _attention_step(module, x, device)
                try:
                    if impl == "fused":
                        kernel = REASSOCIATED if options.get("mode") == "dot" else _fused_kernel(module, x, device)
                    for _ in range(max(warmup, 1)):
                        step()
                    t1 = _time_steps(step, itertools.repeat(()), 0, 1, device)
                    n_steps[impl] = max(steps, math.ceil(min_seconds / max(t1, 1e-9)))
                    clear()
                    peaks[impl] = _peak_mib(step, device)
                    fns[impl] = step
                except torch.cuda.OutOfMemoryError:
                    errors[impl] = "out of memory"
                    peaks[impl] = None
                clear()
                del module, step, clear
                if device.type == "cuda":
                    gc.collect()
                    torch.cuda.empty_cache()
            times: dict[str, list[float]] = {impl: [] for impl in fns}
            for r in range(rounds):
                for impl in (impls if r % 2 == 0 else impls[::-1]):
                    if impl in fns:
                        times[impl].append(_time_steps(fns[impl], itertools.repeat(()), 0, n_steps[impl], device))
            del fns
            seconds = {impl: statistics.median(times[impl]) if times.get(impl) else None for impl in impls}
            both = all(times.get(impl) for impl in impls)
            positions = size * size
            row = {
                "kind": "explicit_vs_fused",
                "module": label,
                "options": ", ".join(f"{k}={v}" for k, v in options.items()),
                "size": size,
                "positions": positions,
                "batch": batch,
                "channels": channels,
                "dtype": _dtype_name(device),
                "channels_last": True,
                "fused_kernel": kernel,
                "rounds": rounds,
                "explicit_steps_per_round": n_steps.get("explicit"),
                "fused_steps_per_round": n_steps.get("fused"),
                "explicit_seconds": seconds["explicit"],
                "fused_seconds": seconds["fused"],
                "explicit_over_fused_time": _median_ratio(times, "explicit", "fused") if both else None,
                "explicit_peak_mib": peaks["explicit"],
                "fused_peak_mib": peaks["fused"],
                "explicit_over_fused_memory": (peaks["explicit"] / peaks["fused"]
                                               if peaks["explicit"] and peaks["fused"] else None),
                "attention_map_mib": batch * positions * positions * 4 / MIB,
            }
            if errors:
                row["errors"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
            rows.append(row)
    return rows


def _interleaved(steps_fn: dict, batches, steps: int, rounds: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each entry of ``steps_fn``, one measurement each per round, the order
    rotated every round (see :func:`mechanism_rows`)."""
    names = list(steps_fn)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_time_steps(steps_fn[name], batches, 0, steps, device))
    return times


def compiled_step_ratios(device: torch.device, mechanisms: Sequence[str] = MECHANISMS, *, batch: int, steps: int,
                         warmup: int, rounds: int, seed: int = 0, width: int = 64,
                         backend: str = "inductor") -> dict[str, dict]:
    """``{name: {"compiled_step_seconds", "compiled_step_time_ratio", "compile_error"}}``.

    Each ResNet-18 is compiled with ``torch.compile(fullgraph=True, backend=backend)``: a graph
    break fails the compilation, which is recorded (``compile_error``, figures ``None``) rather than
    timed as a partly eager model. The ratio is against the compiled plain network, in interleaved
    rounds as for the eager rows; the first steps (compilation) are untimed warm-up."""
    mechanisms = _baseline_first(mechanisms)
    fmt = torch.channels_last
    x, y = _random_batch(device, batch, seed)
    steps_fn, errors = {}, {}
    for name in mechanisms:
        torch._dynamo.reset()  # a fresh cache per model: no recompilation limit shared across models
        model = _build(name, width, seed).to(device, memory_format=fmt).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = _make_step(torch.compile(model, fullgraph=True, backend=backend), optimizer, device, amp=True,
                          channels_last=True)
        try:
            for _ in range(max(warmup, 2)):  # compiles forward and backward
                step(x, y)
            _sync(device)
            steps_fn[name] = step
        except Exception as err:  # noqa: BLE001 - a graph break or a compiler failure, recorded
            errors[name] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    times = _interleaved(steps_fn, itertools.repeat((x, y)), steps, rounds, device) if steps_fn else {}
    out = {}
    for name in mechanisms:
        ok = name in times and "none" in times
        out[name] = {"compiled_step_seconds": statistics.median(times[name]) if name in times else None,
                     "compiled_step_time_ratio": _median_ratio(times, name, "none") if ok else None,
                     "compile_error": errors.get(name)}
    return out


def densenet_rows(device: torch.device, *, batch: int, steps: int, warmup: int, rounds: int, seed: int = 0,
                  growth_rate: int = 32, compile: bool = False, backend: str = "inductor") -> list[dict]:
    """Two ``"densenet"`` rows: DenseNet-121 without and with triple attention (parameters, FLOPs,
    step time and its ratio to the plain DenseNet in interleaved rounds; compiled too if asked)."""
    from .models import densenet121

    fmt = torch.channels_last
    x, y = _random_batch(device, batch, seed)
    static, eager, compiled, errors = {}, {}, {}, {}
    for name in ("none", "triple"):
        torch.manual_seed(seed)
        model = densenet121(10, attention=None if name == "none" else name, growth_rate=growth_rate)
        static[name] = {"params": sum(p.numel() for p in model.parameters()), "flops_forward": forward_flops(model)}
        model = model.to(device, memory_format=fmt).train()
        eager[name] = _make_step(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), device,
                                 amp=True, channels_last=True)
        for _ in range(max(warmup, 1)):
            eager[name](x, y)
        if compile:
            torch._dynamo.reset()
            twin = densenet121(10, attention=None if name == "none" else name, growth_rate=growth_rate)
            twin = twin.to(device, memory_format=fmt).train()
            step = _make_step(torch.compile(twin, fullgraph=True, backend=backend),
                              torch.optim.SGD(twin.parameters(), lr=0.01, momentum=0.9), device, amp=True,
                              channels_last=True)
            try:
                for _ in range(max(warmup, 2)):
                    step(x, y)
                compiled[name] = step
            except Exception as err:  # noqa: BLE001 - recorded, not timed
                errors[name] = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
    _sync(device)
    batches = itertools.repeat((x, y))
    eager_times = _interleaved(eager, batches, steps, rounds, device)
    compiled_times = _interleaved(compiled, batches, steps, rounds, device) if compiled else {}
    base = static["none"]
    rows = []
    for name in ("none", "triple"):
        s = static[name]
        both = name in compiled_times and "none" in compiled_times
        rows.append({
            "kind": "densenet",
            "model": f"densenet121 (CIFAR, growth rate {growth_rate})",
            "attention": name,
            "params": s["params"],
            "params_added_pct": 100 * (s["params"] - base["params"]) / base["params"],
            "flops_forward": s["flops_forward"],
            "flops_added_pct": 100 * (s["flops_forward"] - base["flops_forward"]) / base["flops_forward"],
            "batch": batch,
            "dtype": _dtype_name(device),
            "rounds": rounds,
            "steps_per_round": steps,
            "step_seconds": statistics.median(eager_times[name]),
            "step_time_ratio": _median_ratio(eager_times, name, "none"),
            "compiled_step_seconds": statistics.median(compiled_times[name]) if name in compiled_times else None,
            "compiled_step_time_ratio": _median_ratio(compiled_times, name, "none") if both else None,
            "compile_error": errors.get(name),
        })
    return rows


def _merge_settings(defaults: dict, overrides: dict, steps: int | None = None) -> dict:
    """``defaults`` with the given ``overrides`` (``None`` keeps a default); unknown names refused."""
    unknown = set(overrides) - set(defaults)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}; expected some of {sorted(defaults)}")
    merged = {**defaults, **{k: v for k, v in overrides.items() if v is not None}}
    if steps is not None:
        merged["steps"] = steps
    return merged


@contextlib.contextmanager
def _threads(settings: dict):
    """Run with ``settings["threads"]`` CPU threads (if set), record the count used, restore after."""
    before = torch.get_num_threads()
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    settings["threads"] = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bench_modules(device: torch.device, steps: int | None = None, seed: int = 0, **overrides) -> dict:
    """The module benchmark (see the module docstring); ``steps``: timed steps per measurement.

    ``overrides`` replace the per-device defaults (``batch``, ``warmup``, ``rounds``, ``width``,
    ``mechanisms``, ``attn_sizes``, ``attn_batch``, ``attn_channels``, ``attn_rounds``,
    ``min_seconds``, ``compile``, ``compile_backend``, ``densenet``, ``densenet_batch``,
    ``densenet_growth``; ``None`` keeps the default); the command line uses the defaults, tests use
    tiny settings.
    """
    device = torch.device(device)
    s = _merge_settings({**_settings(device), "width": 64, "mechanisms": MECHANISMS}, overrides, steps)
    with _threads(s):
        t0 = time.perf_counter()
        rows = mechanism_rows(device, s["mechanisms"], batch=s["batch"], steps=s["steps"], warmup=s["warmup"],
                              rounds=s["rounds"], seed=seed, width=s["width"])
        if s["compile"]:
            compiled = compiled_step_ratios(device, s["mechanisms"], batch=s["batch"], steps=s["steps"],
                                            warmup=s["warmup"], rounds=s["rounds"], seed=seed, width=s["width"],
                                            backend=s["compile_backend"])
            for row in rows:
                row.update(compiled[row["attention"]])
        if s["densenet"]:
            rows += densenet_rows(device, batch=s["densenet_batch"], steps=s["steps"], warmup=s["warmup"],
                                  rounds=s["rounds"], seed=seed, growth_rate=s["densenet_growth"],
                                  compile=s["compile"], backend=s["compile_backend"])
        rows += explicit_vs_fused_rows(device, s["attn_sizes"], batch=s["attn_batch"],
                                       channels=s["attn_channels"], steps=s["steps"], warmup=s["warmup"],
                                       rounds=s["attn_rounds"], seed=seed, min_seconds=s["min_seconds"])
        elapsed = time.perf_counter() - t0
    cuda = device.type == "cuda"
    return {
        "benchmark": "modules",
        "model": f"resnet18 (CIFAR, 10 classes, width {s['width']}, 32x32 inputs)",
        "data": "random tensors resident on the device",
        "timing": ("fast-pipeline style: channels_last, " + _dtype_name(device) + "; interleaved rounds, "
                   "ratios are medians of per-round ratios against a baseline timed in the same round"),
        "flops_note": ("torch.utils.flop_counter.FlopCounterMode, forward, batch 1, eval mode, CPU float32; "
                       "2 FLOPs per multiply-add; matrix products, convolutions and attention only"),
        "memory_note": ("peak of one untimed step above the memory in use just before it: "
                        + ("torch.cuda.max_memory_allocated minus torch.cuda.memory_allocated" if cuda else
                           "peak RSS (resource ru_maxrss after resetting the high-water mark through "
                           "/proc/self/clear_refs, Linux) minus the RSS before; None where it cannot be reset")),
        "cpu_threads": s["threads"],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "seconds_total": elapsed,
        "rows": rows,
    }


def _danet_settings(device: torch.device) -> dict:
    """Defaults of :func:`bench_danet_position` per device. CUDA: the module as the GPU targets
    state it (batch 8, 128 channels, bf16). CPU: batch 1 (at 128 x 128 one float32 N x N map is
    1 GiB, and the explicit step keeps several), one thread, one step per measurement."""
    sizes = (8, 16, 32, 64, 128)
    if device.type == "cuda":
        return dict(sizes=sizes, batch=8, channels=128, steps=10, warmup=3, rounds=5, min_seconds=0.05,
                    threads=None)
    return dict(sizes=sizes, batch=1, channels=128, steps=1, warmup=1, rounds=3, min_seconds=0.2, threads=1)


def bench_danet_position(device: torch.device, steps: int | None = None, seed: int = 0, **overrides) -> dict:
    """DANet's position module, explicit N x N softmax against the fused path, as the map grows.

    ``python -m attn_lib bench danet`` calls it: one ``"explicit_vs_fused"`` row per size (see
    :func:`explicit_vs_fused_rows`: forward + backward time, peak memory, the kernel the fused path
    ran), from 8 x 8 (CIFAR's stage 3) to 128 x 128 (segmentation-sized maps). ``overrides``
    replace the per-device defaults (``sizes``, ``batch``, ``channels``, ``warmup``, ``rounds``,
    ``min_seconds``, ``threads``).
    """
    device = torch.device(device)
    s = _merge_settings(_danet_settings(device), overrides, steps)
    with _threads(s):
        t0 = time.perf_counter()
        rows = explicit_vs_fused_rows(device, s["sizes"], batch=s["batch"], channels=s["channels"],
                                      steps=s["steps"], warmup=s["warmup"], rounds=s["rounds"], seed=seed,
                                      min_seconds=s["min_seconds"], modules=("danet_position",))
        elapsed = time.perf_counter() - t0
    cuda = device.type == "cuda"
    return {
        "benchmark": "danet_position",
        "model": f"DANet position module alone, {s['channels']} channels, batch {s['batch']}",
        "data": "random tensors resident on the device (channels_last)",
        "timing": ("forward + backward (gradients for the input and the parameters), "
                   + _dtype_name(device) + "; interleaved rounds, explicit_over_fused_time is the median "
                   "of per-round ratios"),
        "memory_note": ("peak of one untimed step above the memory in use just before it: "
                        + ("torch.cuda.max_memory_allocated minus torch.cuda.memory_allocated" if cuda else
                           "peak RSS (resource ru_maxrss after resetting the high-water mark through "
                           "/proc/self/clear_refs, Linux) minus the RSS before")),
        "cpu_threads": s["threads"],
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
        "seconds_total": elapsed,
        "rows": rows,
    }

def bench_nonlocal(device: torch.device | str, seed: int = 0, command: str | None = None,
                   **overrides) -> dict:
    """The non-local chapter's benchmark: :func:`explicit_vs_fused_rows` for the forms in
    :data:`NONLOCAL_FORMS` (embedded gaussian: explicit softmax vs ``F.scaled_dot_product_attention``;
    dot: explicit N x N map vs the re-associated product), with the module benchmark's per-device
    settings (``attn_sizes``, ``attn_batch``, ``attn_channels``, ``attn_rounds``, ``steps``,
    ``warmup``, ``min_seconds``, ``threads`` may be overridden) and the run's provenance.

    ``python -m attn_lib.bench_modules nonlocal --device cpu --out FILE`` writes it.
    """
    from .provenance import provenance

    device = torch.device(device)
    s = _merge_settings(_settings(device), overrides)
    with _threads(s):
        meta = provenance(device, seed, command)
        t0 = time.perf_counter()
        rows = explicit_vs_fused_rows(device, s["attn_sizes"], batch=s["attn_batch"], channels=s["attn_channels"],
                                      steps=s["steps"], warmup=s["warmup"], rounds=s["attn_rounds"], seed=seed,
                                      min_seconds=s["min_seconds"], modules=tuple(NONLOCAL_FORMS))
        elapsed = time.perf_counter() - t0
    return {**meta, "benchmark": "nonlocal explicit vs fused",
            "timing": "forward + backward of one block, " + _dtype_name(device) + ", channels_last; "
                      "medians over interleaved rounds",
            "cpu_threads": s["threads"],
            "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in s.items()},
            "seconds_total": elapsed, "rows": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m attn_lib.bench_modules nonlocal [--device D] [--out FILE]``."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser(prog="python -m attn_lib.bench_modules",
                                     description="the non-local block, explicit vs fused (a benchmark, not a test)")
    parser.add_argument("what", choices=["nonlocal"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="results file (default: printed only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    command = "python -m attn_lib.bench_modules " + " ".join(argv if argv is not None else sys.argv[1:])
    results = bench_nonlocal(args.device, seed=args.seed, command=command)
    text = json.dumps(results, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
