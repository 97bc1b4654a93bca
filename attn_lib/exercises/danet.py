"""Checkers for the exercises of the DANet chapter (``notebooks/05_danet``).

    from attn_lib.exercises.danet import (check_position_attention, check_map_memory,
                                          check_fused_position)
    report = check_position_attention(StudentPAM)   # the position attention module
    report = check_map_memory(predict_mib)          # the size of the N x N map at S x S
    report = check_fused_position(fused)            # softmax(Q K^T) V through one fused call

:func:`check_position_attention` copies the weights of
:class:`attn_lib.modules.danet.PositionAttention` into the student's three 1x1 convolutions (found
by their shapes) and compares the outputs on maps of two sizes; when they differ it recomputes the
reference with the usual mistakes (softmax over the wrong axis, the map transposed, a ``1/sqrt(d)``
scale DANet does not have, no residual, no ``alpha``) and names the one the student's output
matches. :func:`check_map_memory` compares a function with the size of the N x N map and names
the usual slips (N for N^2, no batch, 10^6 for 2^20). :func:`check_fused_position` checks the
result against the explicit form and that a fused kernel, not PyTorch's math fallback, ran. All
return a :class:`~attn_lib.exercises.report.Report` and never raise because the student's code is
wrong.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..bench_modules import _AttentionKernels
from ..modules.danet import PositionAttention
from .cbam import _build, _gradients_reach
from .report import Report, call_module, compare

__all__ = ["check_fused_position", "check_map_memory", "check_position_attention", "map_mib"]

RTOL, ATOL = 1e-4, 1e-5
NOT_RUN = "not run: the layout check failed (see above)"
MIB = 2**20


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL)


def _conv1x1(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1)]


def _scalars(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.numel() == 1]


# ----------------------------------------------------------------------------- the position module
def _position_variant(ref: PositionAttention, x: torch.Tensor, mistake: str = "") -> torch.Tensor:
    """``ref``'s output, or what it would be with one of the usual mistakes."""
    b, c, h, w = x.shape
    q = ref.query(x).flatten(2).transpose(1, 2)  # [B, N, C/r]
    k = ref.key(x).flatten(2).transpose(1, 2)
    v = ref.value(x).flatten(2).transpose(1, 2)  # [B, N, C]
    energy = q @ k.transpose(1, 2)
    if mistake == "scaled":
        energy = energy / math.sqrt(q.shape[-1])
    s = torch.softmax(energy, dim=1 if mistake == "query axis" else -1)
    if mistake == "transposed":
        s = s.transpose(1, 2)
    context = (s @ v).transpose(1, 2).reshape(b, c, h, w)
    if mistake == "no residual":
        return ref.alpha * context
    if mistake == "no alpha":
        return x + context
    return x + ref.alpha * context


_POSITION_MISTAKES = {
    "query axis": "the softmax runs over the query positions (dim 1): each row of S must sum to 1 over "
                  "the positions a pixel reads from (the last axis)",
    "transposed": "the map is applied transposed (S^T V): position i must gather sum_j S_ij V_j",
    "scaled": "the energies are divided by sqrt(C/r): DANet uses the plain dot product (no scale)",
    "no residual": "the input is not added back: E = alpha * (V S^T) + A",
    "no alpha": "the attention term is not multiplied by alpha",
}


def _diagnose(ref: PositionAttention, x: torch.Tensor, y: torch.Tensor) -> str:
    with torch.no_grad():
        for mistake, message in _POSITION_MISTAKES.items():
            if _close(y, _position_variant(ref, x, mistake)):
                return " — it matches the reference with one mistake: " + message
    return ""


def check_position_attention(cls: Callable[..., nn.Module], channels: int = 32, reduction: int = 8) -> Report:
    """Check a position attention module ``cls(channels, reduction=8)`` (DANet's PAM).

    Expected layout: three ``nn.Conv2d`` with 1x1 kernels (bias optional), two ``C -> C/r``
    (query and key; named ``query`` and ``key``, or registered in that order) and one ``C -> C``
    (value), and one scalar parameter ``alpha`` that starts at 0. ``forward(x)`` takes
    ``x: [B, C, H, W]`` for any ``H, W`` and returns ``x + alpha * context``, where position i's
    context is ``sum_j softmax_j(q_i . k_j) v_j`` (no ``1/sqrt(d)``). Returning ``(y, S)`` is allowed.

    The reference's weights are copied into the student's convolutions, ``alpha`` is set to 0.5,
    and outputs are compared on two map sizes (a module hard-wired to one size fails the second).
    """
    report = Report(f"DANet position attention: E = x + alpha * softmax(Q K^T) V, C = {channels}, r = {reduction}")
    got: dict = {}
    if not report.run(f"builds with channels={channels}, reduction={reduction}",
                      lambda: _build(cls, (channels,), {"reduction": reduction}, got)):
        return report
    student = got["module"]
    hidden = channels // reduction
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    ref = PositionAttention(channels, reduction, implementation="explicit")
    with torch.no_grad():
        for conv in (ref.query, ref.key, ref.value):  # clearly non-zero, differing weights
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)

    def layout():
        convs = _conv1x1(student)
        reduced = [m for m in convs if (m.in_channels, m.out_channels) == (channels, hidden)]
        full = [m for m in convs if (m.in_channels, m.out_channels) == (channels, channels)]
        found = ", ".join(f"Conv2d({m.in_channels}, {m.out_channels}, 1)" for m in convs) or "none"
        assert len(reduced) == 2 and len(full) == 1 and len(convs) == 3, (
            f"expected three 1x1 convolutions, Conv2d({channels}, {hidden}, 1) twice (query, key) and "
            f"Conv2d({channels}, {channels}, 1) once (value); found {found}")
        named = dict(student.named_modules())
        if isinstance(named.get("query"), nn.Conv2d) and isinstance(named.get("key"), nn.Conv2d):
            reduced = [named["query"], named["key"]]
        scalars = _scalars(student)
        assert len(scalars) == 1, (f"expected one scalar parameter (alpha), found "
                                   f"{[n for n, _ in scalars] or 'none'}")
        got.update(query=reduced[0], key=reduced[1], value=full[0], alpha=scalars[0])
        for conv, ref_conv in ((reduced[0], ref.query), (reduced[1], ref.key), (full[0], ref.value)):
            with torch.no_grad():
                conv.weight.copy_(ref_conv.weight)
                if conv.bias is not None:
                    conv.bias.copy_(ref_conv.bias)
                else:
                    ref_conv.bias.zero_()
        return f"query/key Conv2d({channels}, {hidden}, 1), value Conv2d({channels}, {channels}, 1), " \
               f"scalar {scalars[0][0]!r}"

    layout_ok = report.run("layout: three 1x1 convolutions and a scalar alpha", layout)
    x = torch.randn(2, channels, 5, 3, generator=generator)
    if not layout_ok:
        report.add("starts as the identity (alpha = 0)", False, NOT_RUN)
        report.add("matches the reference", False, NOT_RUN)
        return report

    def identity():
        name, alpha = got["alpha"]
        assert alpha.item() == 0.0, f"{name} starts at {alpha.item():g}: it must start at 0, so the " \
                                    f"module begins as the identity"
        y = call_module(student, x)
        assert isinstance(y, torch.Tensor) and y.shape == x.shape, \
            f"expected an output of shape {list(x.shape)}, got {getattr(y, 'shape', type(y).__name__)}"
        assert torch.equal(y, x), "with alpha = 0 the output must equal the input exactly"
        return f"{name} = 0 and y == x"

    report.run("starts as the identity (alpha = 0)", identity)
    with torch.no_grad():
        got["alpha"][1].fill_(0.5)
        ref.alpha.fill_(0.5)

    def matches(shape):
        def check():
            xs = torch.randn(*shape, generator=generator)
            with torch.no_grad():
                y, expected = call_module(student, xs), ref(xs)
            try:
                return compare(y, expected, "output", RTOL, ATOL)
            except AssertionError as err:
                swapped = _swap_query_key(got, ref, xs)
                if swapped is not None:
                    return swapped
                raise AssertionError(str(err) + (_diagnose(ref, xs, y) if y.shape == expected.shape else "")) \
                    from None
        return check

    for shape in ((2, channels, 5, 3), (1, channels, 4, 4)):
        report.run(f"matches the reference on x: {list(shape)}", matches(shape))
    report.run("gradients reach every parameter", lambda: _gradients_reach(student, x))
    return report


def _swap_query_key(got: dict, ref: PositionAttention, x: torch.Tensor) -> str | None:
    """The two C/r convolutions play symmetric parts in the layout: if the student's module matches
    with the reference's query and key weights exchanged, that is the same module, named the other
    way round. Returns a detail line when it matches (weights left exchanged), else ``None``."""
    query, key = got["query"], got["key"]
    with torch.no_grad():
        for conv, source in ((query, ref.key), (key, ref.query)):
            conv.weight.copy_(source.weight)
            if conv.bias is not None:
                conv.bias.copy_(source.bias)
        if _close(call_module(got["module"], x), ref(x)):
            return "matches, with your first C/r convolution used as the key (name them query and key " \
                   "to make the roles explicit)"
        for conv, source in ((query, ref.query), (key, ref.key)):
            conv.weight.copy_(source.weight)
            if conv.bias is not None:
                conv.bias.copy_(source.bias)
    return None


# ----------------------------------------------------------------------------- memory of the map
def map_mib(size: int, batch: int = 8, bytes_per_entry: int = 4) -> float:
    """MiB of one ``[batch, N, N]`` attention map for a ``size x size`` feature map (N = size^2)."""
    positions = size * size
    return batch * positions * positions * bytes_per_entry / MIB


def check_map_memory(fn: Callable[..., float]) -> Report:
    """Check ``fn(size, batch=8, bytes_per_entry=4)``: MiB (2^20 bytes) of the ``[B, N, N]`` map of a
    ``size x size`` feature map, N = size^2 positions."""
    report = Report("DANet: memory of the position map, B * (S^2)^2 * bytes / 2^20 MiB")
    cases = [(8, 8, 4), (32, 8, 4), (64, 8, 2), (128, 1, 4), (7, 3, 4)]

    def one(size, batch, nbytes):
        def check():
            value = fn(size, batch=batch, bytes_per_entry=nbytes)
            assert isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1), \
                f"expected a number, got {type(value).__name__}"
            value = float(value)
            expected = map_mib(size, batch, nbytes)
            if math.isclose(value, expected, rel_tol=1e-6):
                return f"{value:,.4g} MiB"
            slips = {
                "that counts N = S^2 entries per image: the map has N x N = S^4": batch * size ** 2 * nbytes / MIB,
                "the batch is missing": map_mib(size, 1, nbytes),
                "the bytes per entry are missing": map_mib(size, batch, 1),
                "1 MiB is 2^20 bytes, not 10^6": batch * size ** 4 * nbytes / 1e6,
                "that is in bytes: divide by 2^20 for MiB": batch * size ** 4 * nbytes,
            }
            hint = next((m for m, v in slips.items() if math.isclose(value, v, rel_tol=1e-6)), "")
            raise AssertionError(f"expected {expected:,.6g} MiB, got {value:,.6g}" + (f" — {hint}" if hint else ""))
        return check

    for size, batch, nbytes in cases:
        report.run(f"S = {size}, batch {batch}, {nbytes} bytes per entry", one(size, batch, nbytes))
    return report


# ----------------------------------------------------------------------------- the fused call
def check_fused_position(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Report:
    """Check ``fn(query, key, value) -> softmax(Q K^T) V`` with ``query, key: [B, N, d]``,
    ``value: [B, N, C]``, ``d < C``: the result (float64, against the explicit form), the gradients,
    and that ``F.scaled_dot_product_attention`` ran a fused kernel (on the CPU:
    ``_scaled_dot_product_flash_attention_for_cpu``), not its math fallback, with no ``N x N``
    tensor built by the function itself."""
    report = Report("DANet: softmax(Q K^T) V (d < C) through one fused attention kernel")
    generator = torch.Generator().manual_seed(0)

    def inputs(d, c, n=12, batch=2):
        q, k = (torch.randn(batch, n, d, generator=generator, dtype=torch.float64) for _ in range(2))
        v = torch.randn(batch, n, c, generator=generator, dtype=torch.float64)
        return q, k, v

    def exact(d, c):
        def check():
            q, k, v = inputs(d, c)
            expected = torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v
            got = fn(q, k, v)
            try:
                return compare(got, expected, "output", 1e-10, 1e-10)
            except AssertionError as err:
                energy = q @ k.transpose(1, 2)
                hint = ""
                for width in sorted({d, c}):
                    if got.shape == expected.shape and torch.allclose(
                            got, torch.softmax(energy / math.sqrt(width), -1) @ v):
                        hint = (f" — the scores were divided by sqrt({width}), the default scale of "
                                f"scaled_dot_product_attention: pass scale=1.0 (DANet does not scale)")
                raise AssertionError(str(err) + hint) from None
        return check

    for d, c in ((4, 32), (3, 10), (8, 8)):
        report.run(f"equals softmax(Q K^T) V for d = {d}, C = {c}", exact(d, c))

    def gradients():
        q, k, v = (t.requires_grad_() for t in inputs(4, 16))
        expected = torch.autograd.grad((torch.softmax(q @ k.transpose(1, 2), -1) @ v).square().sum(), (q, k, v))
        got = torch.autograd.grad(fn(q, k, v).square().sum(), (q, k, v))
        for name, g, e in zip("qkv", got, expected):
            compare(g, e, f"gradient for {name}", 1e-10, 1e-10)
        return "gradients for Q, K and V match"

    report.run("gradients", gradients)

    def fused():
        q, k, v = (t.float() for t in inputs(4, 32, n=64))
        big: list[list[int]] = []

        class Watch(_AttentionKernels):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = super().__torch_dispatch__(func, types, args, kwargs)
                if isinstance(out, torch.Tensor) and "scaled_dot_product" not in str(func) \
                        and out.shape[-2:] == (64, 64):
                    big.append(list(out.shape))
                return out

        with Watch() as seen:
            fn(q, k, v)
        assert seen.kernels, ("no fused kernel ran: scaled_dot_product_attention fell back to its math path "
                              "(were the query, key and value widths equal, per head?)")
        assert not big, f"an N x N tensor {big[0]} was built outside the fused kernel"
        return ", ".join(sorted(seen.kernels))

    report.run("runs a fused kernel (no N x N map stored)", fused)
    return report
