"""Checkers for the exercises of the non-local chapter (``notebooks/06_nonlocal``).

    from attn_lib.exercises import non_local
    report = non_local.check_embedded_gaussian_block(MyNonLocal)   # a whole block
    report = non_local.check_map_memory(attention_map_mib)          # predict the N x N' map's size
    report = non_local.check_dot_form(dot_aggregate)                # the dot form, re-associated

(The module is called ``non_local`` because ``nonlocal`` is a Python keyword.)

Each checker runs the student's code next to a reference written from the paper's equations
(Wang, Girshick, Gupta, He, "Non-local Neural Networks", CVPR 2018) and returns a
:class:`~attn_lib.exercises.report.Report`. When a result is wrong, the checker recomputes the
reference with the usual mistakes (softmax over the queries, no softmax, the 1/sqrt(d) scale,
the residual forgotten, the wrong normaliser) and names the one the student's result matches.
A checker never raises because the student's code is wrong.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..modules.nonlocal_block import NonLocalBlock
from .report import Report, call_module, compare

__all__ = ["reference_embedded", "check_embedded_gaussian_block", "map_mib", "check_map_memory",
           "reference_dot", "check_dot_form"]

MIB = 2**20


# ----------------------------------------------------------------------------- the whole block
def reference_embedded(block: NonLocalBlock, x: torch.Tensor, mistake: str = "") -> torch.Tensor:
    """The embedded-gaussian block without sub-sampling (Eqs. 1, 3, 6), with ``block``'s weights,
    in float64, eval mode; ``mistake`` recomputes it with a known error.

    ``x: [B, C, H, W]``; θ, φ, g: ``[B, N, d]``; f = θφᵀ: ``[B, N, N]``; returns ``z: [B, C, H, W]``.
    Mistakes: ``"queries"`` (softmax over dim 1, the queries), ``"no softmax"`` (f / N, the dot
    form), ``"scaled"`` (θφᵀ / sqrt(d) before the softmax), ``"no residual"`` (z = BN(W_z y)).
    """
    def embed(conv: nn.Conv2d) -> torch.Tensor:
        w = conv.weight.double().flatten(1)  # [d, C]
        return torch.einsum("dc,bcn->bnd", w, x.double().flatten(2)) + conv.bias.double()

    theta, phi, g = embed(block.theta), embed(block.phi), embed(block.g)
    f = theta @ phi.transpose(1, 2)  # [B, N, N]
    if mistake == "scaled":
        f = f / math.sqrt(theta.shape[-1])
    if mistake == "queries":
        weights = torch.softmax(f, dim=1)
    elif mistake == "no softmax":
        weights = f / f.shape[-1]
    else:
        weights = torch.softmax(f, dim=-1)
    y = weights @ g  # [B, N, d]
    w_y = torch.einsum("cd,bnd->bcn", block.w_z.weight.double().flatten(1), y)
    w_y = w_y + block.w_z.bias.double()[:, None]
    bn = block.bn
    w_y = (w_y - bn.running_mean.double()[:, None]) / torch.sqrt(bn.running_var.double()[:, None] + bn.eps)
    w_y = w_y * bn.weight.double()[:, None] + bn.bias.double()[:, None]
    z = w_y.reshape(x.shape)
    return z if mistake == "no residual" else z + x.double()


_BLOCK_MISTAKES = {
    "queries": "the softmax runs over the queries (dim 1 of the [B, N, N] map): each position's "
               "weights over the keys j must sum to 1, so take the softmax over the last axis",
    "no softmax": "there is no softmax: that is the dot-product form, f / N; the embedded "
                  "gaussian normalises exp(θᵢᵀφⱼ) by its sum over j",
    "scaled": "θᵀφ is divided by sqrt(d) before the softmax: that is the official code's "
              "USE_SCALE option (and F.scaled_dot_product_attention's default), not the paper's "
              "equation; pass scale=1.0 or leave the scale out",
    "no residual": "the residual is missing: z = W_z y + x",
}


def _randomised_reference(channels: int, seed: int) -> NonLocalBlock:
    """A reference block whose every parameter (BN γ and β too) and BN statistic is random, so
    that no term hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    block = NonLocalBlock(channels, sub_sample=False)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
        block.bn.running_mean.copy_(0.1 * torch.randn(channels, generator=g))
        block.bn.running_var.copy_(0.5 + torch.rand(channels, generator=g))
    return block.eval()


_PARTS = {"theta": "θ", "phi": "φ", "g": "g"}


def _find_parts(student: nn.Module, channels: int, inter: int) -> dict:
    """The student's θ, φ, g, W_z and BN, by the paper's names."""
    parts = {}
    for name, symbol in _PARTS.items():
        layer = getattr(student, name, None)
        assert isinstance(layer, nn.Conv2d), (
            f"expected an attribute {name!r} (the paper's {symbol}), an nn.Conv2d({channels}, "
            f"{inter}, 1); got {type(layer).__name__ if layer is not None else 'nothing'}")
        assert (layer.in_channels, layer.out_channels, layer.kernel_size) == (channels, inter, (1, 1)), (
            f"expected {name} to be a 1x1 convolution {channels} -> {inter} (C -> C/2), got "
            f"{layer.in_channels} -> {layer.out_channels} with kernel {layer.kernel_size}")
        assert layer.bias is not None, f"expected {name} to have a bias, as in the official code"
        parts[name] = layer
    w_z = getattr(student, "w_z", None)
    assert isinstance(w_z, nn.Conv2d) and (w_z.in_channels, w_z.out_channels) == (inter, channels) \
        and w_z.kernel_size == (1, 1) and w_z.bias is not None, (
        f"expected an attribute 'w_z', an nn.Conv2d({inter}, {channels}, 1) with bias (W_z, back to "
        f"C channels)")
    bn = getattr(student, "bn", None)
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == channels, (
        f"expected an attribute 'bn', an nn.BatchNorm2d({channels}) applied after W_z")
    parts.update(w_z=w_z, bn=bn)
    return parts


def _copy_weights(parts: dict, ref: NonLocalBlock) -> None:
    with torch.no_grad():
        for name in ("theta", "phi", "g", "w_z"):
            parts[name].weight.copy_(getattr(ref, name).weight)
            parts[name].bias.copy_(getattr(ref, name).bias)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(parts["bn"], name).copy_(getattr(ref.bn, name))
        parts["bn"].eps = ref.bn.eps


def check_embedded_gaussian_block(cls: Callable[..., nn.Module], channels: int = 12) -> Report:
    """Check a student's embedded-gaussian non-local block, built as ``cls(channels)``.

    Expected, by the paper's names: ``theta``, ``phi``, ``g`` (``nn.Conv2d(C, C // 2, 1)``),
    ``w_z`` (``nn.Conv2d(C // 2, C, 1)``) and ``bn`` (``nn.BatchNorm2d(C)``, γ and β starting
    at 0); no sub-sampling. ``forward(x: [B, C, H, W]) -> z: [B, C, H, W]`` (a tuple whose first
    item is ``z`` is accepted), ``z = BN(W_z y) + x`` with ``y_i = sum_j softmax_j(θᵢᵀφⱼ) g_j``.
    """
    report = Report("Embedded-gaussian non-local block against the paper's equations")
    inter = channels // 2
    built: dict = {}

    def builds():
        built["student"] = cls(channels)
        assert isinstance(built["student"], nn.Module), \
            f"expected an nn.Module, got {type(built['student']).__name__}"
        return f"{type(built['student']).__name__}({channels})"

    if not report.run("builds", builds):
        return report
    student = built["student"]

    def layers():
        built["parts"] = _find_parts(student, channels, inter)
        return f"θ, φ, g: {channels} -> {inter}; W_z: {inter} -> {channels}; BN({channels})"

    if not report.run("layers θ, φ, g, W_z, BN", layers):
        return report
    parts = built["parts"]
    x = torch.randn(2, channels, 5, 6, generator=torch.Generator().manual_seed(1))

    def identity_at_init():
        assert torch.all(parts["bn"].weight == 0) and torch.all(parts["bn"].bias == 0), (
            "expected the BN's weight γ and bias β to start at 0, so that the block starts as the "
            "identity (z = x) and can be inserted into a trained network without changing it")
        for training in (True, False):
            student.train(training)
            with torch.no_grad():
                z = call_module(student, x.clone())
            assert z.shape == x.shape, f"expected z of shape {list(x.shape)}, got {list(z.shape)}"
            assert torch.allclose(z, x, atol=1e-6), (
                f"at initialisation z should equal x ({'training' if training else 'eval'} mode); "
                f"max |z - x| = {(z - x).abs().max().item():.3g}")
        return "z = x in training and eval mode"

    report.run("starts as the identity", identity_at_init)

    ref = _randomised_reference(channels, seed=0)
    copied = report.run("reference weights copied in", lambda: _copy_weights(parts, ref) or "by name")

    def output(shape: tuple[int, int]):
        def check():
            student.eval()
            xs = torch.randn(3, channels, *shape, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                z = call_module(student, xs.clone())
            assert z.shape == xs.shape, f"expected z of shape {list(xs.shape)}, got {list(z.shape)}"
            expected = reference_embedded(ref, xs)
            diff = (z.double() - expected).abs().max().item()
            if not torch.allclose(z.double(), expected, rtol=1e-4, atol=1e-5):
                why = ""
                for mistake, reason in _BLOCK_MISTAKES.items():
                    wrong = reference_embedded(ref, xs, mistake)
                    if torch.allclose(z.double(), wrong, rtol=1e-4, atol=1e-5):
                        why = f"; it matches a block in which {reason}"
                        break
                raise AssertionError(f"z differs from the reference (max abs difference {diff:.3g}){why}")
            return f"max difference {diff:.1e}"
        return check

    if copied:
        report.run("same z as the reference, H·W = 30", output((5, 6)))
        # An odd number of positions: the widely copied view(b, c, -1) of a C/2-channel tensor fails
        report.run("same z with an odd number of positions, H·W = 15", output((3, 5)))

    def gradients():
        student.train()
        student.zero_grad(set_to_none=True)
        call_module(student, x.clone()).square().mean().backward()
        missing = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient reaches {missing}: is every layer used in forward?"
        return f"all {sum(1 for _ in student.parameters())} parameter tensors"

    if copied:
        report.run("gradients reach every parameter (γ ≠ 0)", gradients)
    return report


# ----------------------------------------------------------------------------- memory of the map
def map_mib(size: int, batch: int = 8, bytes_per_value: int = 4, sub_sample: bool = False) -> float:
    """MiB of the ``[B, N, N']`` map of weights for an ``size x size`` feature map:
    ``N = size²`` queries, ``N' = N`` keys, or ``(size // 2)²`` with 2x2 sub-sampling."""
    n = size * size
    n_keys = (size // 2) ** 2 if sub_sample else n
    return batch * n * n_keys * bytes_per_value / MIB


_MEMORY_MISTAKES = [
    (lambda s, b, k, sub: b * s * s * k / MIB,
     "your figure grows like S², the size of a feature map: the map has N x N' entries with "
     "N = S², so it grows like S⁴"),
    (lambda s, b, k, sub: map_mib(s, 1, k, sub),
     "your figure is for one image: multiply by the batch"),
    (lambda s, b, k, sub: map_mib(s, b, 1, sub),
     "your figure counts values, not bytes: multiply by bytes_per_value"),
    (lambda s, b, k, sub: map_mib(s, b, k, False),
     "you ignore sub_sample: 2x2 max-pooling leaves N' = (S // 2)² keys, a quarter"),
    (lambda s, b, k, sub: b * (s * s) ** 2 * k / 1e6,
     "you divided by 10⁶ (MB); a MiB is 2²⁰ = 1,048,576 bytes"),
]


def check_map_memory(fn: Callable[..., float]) -> Report:
    """Check ``fn(size, batch, bytes_per_value, sub_sample) -> MiB`` of the ``[B, N, N']`` map.

    The figures are compared with :func:`map_mib` and with the size of the map that
    ``NonLocalBlock(..., return_attention=True)`` actually returns.
    """
    report = Report("Predicting the memory of the N x N' map")
    cases = [(8, 2, 4, False), (16, 8, 4, False), (16, 8, 2, True), (64, 8, 4, False), (9, 3, 4, True)]

    def formula():
        for s, b, k, sub in cases:
            got = fn(s, b, k, sub)
            assert isinstance(got, (int, float)), f"expected a number of MiB, got {type(got).__name__}"
            want = map_mib(s, b, k, sub)
            if not math.isclose(got, want, rel_tol=1e-6):
                why = next((reason for wrong, reason in _MEMORY_MISTAKES
                            if math.isclose(got, wrong(s, b, k, sub), rel_tol=1e-6)), "")
                raise AssertionError(
                    f"for S={s}, batch={b}, {k} bytes, sub_sample={sub}: expected {want:.4g} MiB, "
                    f"got {got:.4g}" + (f"; {why}" if why else ""))
        return f"{len(cases)} cases, e.g. S=64, batch 8, float32: {map_mib(64, 8):,.0f} MiB"

    report.run("matches B·N·N'·bytes / 2²⁰", formula)

    def measured():
        found = []
        for s, sub in ((6, False), (7, True)):
            block = NonLocalBlock(4, sub_sample=sub).eval()
            with torch.no_grad():
                _, attention = block(torch.randn(2, 4, s, s), return_attention=True)
            real = attention.numel() * attention.element_size() / MIB
            got = fn(s, 2, attention.element_size(), sub)
            assert math.isclose(got, real, rel_tol=1e-6), (
                f"the map NonLocalBlock returns for S={s}, sub_sample={sub} has "
                f"{list(attention.shape)} float32 values = {real:.4g} MiB; you predict {got:.4g}")
            found.append(f"{list(attention.shape)}")
        return "maps " + ", ".join(found)

    report.run("size of the maps the block builds", measured)
    return report


# ----------------------------------------------------------------------------- the dot form
def reference_dot(theta: torch.Tensor, phi: torch.Tensor, g: torch.Tensor, mistake: str = "") -> torch.Tensor:
    """``y_i = (1/N') sum_j (θᵢᵀφⱼ) g_j`` (Eqs. 1 and 4), ``[B, N, d]``, in float64.

    ``theta: [B, N, d]``, ``phi, g: [B, N', d]``. Mistakes: ``"queries"`` (divided by N, the
    number of queries), ``"none"`` (no normaliser), ``"row sum"`` (divided by sum_j f, as if it
    were a softmax), ``"softmax"`` (the embedded gaussian), ``"scaled"`` (also / sqrt(d)).
    """
    theta, phi, g = theta.double(), phi.double(), g.double()
    f = theta @ phi.transpose(1, 2)
    normaliser = {"queries": theta.shape[1], "none": 1.0, "row sum": f.sum(-1, keepdim=True),
                  "scaled": phi.shape[1] * math.sqrt(theta.shape[-1])}.get(mistake, phi.shape[1])
    if mistake == "softmax":
        return torch.softmax(f, dim=-1) @ g
    return (f / normaliser) @ g


_DOT_MISTAKES = {
    "queries": "you divided by N, the number of queries; C(x) = N' is the number of keys j that "
               "are summed over (they differ when the keys are sub-sampled)",
    "none": "there is no normaliser: divide by N', so that the output's scale does not grow with "
            "the size of the feature map",
    "row sum": "you divided by sum_j θᵢᵀφⱼ, as a softmax would: the dot products can be negative "
               "and that sum can be near zero; the dot form's normaliser is the constant N'",
    "softmax": "that is the embedded gaussian (a softmax); the dot form has no exponential",
    "scaled": "you also divided by sqrt(d): the dot form is never scaled",
}


class _LargestTensor(TorchFunctionMode):
    """Records the largest number of elements of any tensor a torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def check_dot_form(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> Report:
    """Check ``fn(theta [B, N, d], phi [B, N', d], g [B, N', d]) -> y [B, N, d]``, the dot-product
    form ``y = (θ φᵀ / N') g``, and that it is computed as ``θ (φᵀ g) / N'``, building no
    ``[B, N, N']`` tensor."""
    report = Report("Dot-product form: y = θ (φᵀ g) / N'")
    gen = torch.Generator().manual_seed(0)
    batch, n, n_keys, d = 2, 48, 12, 5  # N != N' (sub-sampled keys) and d small
    theta, phi, g = (torch.randn(batch, m, d, generator=gen) for m in (n, n_keys, n_keys))
    got: dict = {}

    def runs():
        y = fn(theta.clone(), phi.clone(), g.clone())
        assert isinstance(y, torch.Tensor), f"expected a tensor y, got {type(y).__name__}"
        assert list(y.shape) == [batch, n, d], f"expected y of shape [B, N, d] = {[batch, n, d]}, got {list(y.shape)}"
        got["y"] = y
        return f"y: {list(y.shape)}"

    if not report.run(f"runs (θ {[batch, n, d]}, φ and g {[batch, n_keys, d]})", runs):
        return report

    def values():
        expected = reference_dot(theta, phi, g)
        try:
            return compare(got["y"], expected, "y", rtol=1e-4, atol=1e-5)
        except AssertionError as err:
            why = next((f"; {reason}" for mistake, reason in _DOT_MISTAKES.items()
                        if torch.allclose(got["y"].double(), reference_dot(theta, phi, g, mistake),
                                          rtol=1e-4, atol=1e-5)), "")
            raise AssertionError(f"{err}{why}") from None

    report.run("y = (1/N') Σ_j (θᵢᵀφⱼ) g_j", values)

    def linear_in_n():
        big_n, big_keys = 1024, 256
        t, p, v = (torch.randn(1, m, d, generator=gen) for m in (big_n, big_keys, big_keys))
        with torch.no_grad(), _LargestTensor() as seen:
            fn(t, p, v)
        assert seen.largest < big_n * big_keys, (
            f"a tensor of {seen.largest:,} elements was built (the N x N' map has "
            f"{big_n * big_keys:,}): compute φᵀg first, a [B, d, d] matrix, then θ (φᵀg) / N'")
        return f"largest tensor {seen.largest:,} values (the map: {big_n * big_keys:,})"

    report.run("no N x N' map built", linear_in_n)
    return report
