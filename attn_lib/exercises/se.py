"""Checkers for the exercises of the Squeeze-and-Excitation chapter (``notebooks/02_se``).

    from attn_lib.exercises import se
    report = se.check_squeeze_excitation(StudentSE)   # a whole SE block
    report = se.check_eca_kernel_size(kernel_size)    # ECA's adaptive kernel size

:func:`check_squeeze_excitation` copies the weights of :class:`attn_lib.modules.SqueezeExcitation`
into the student's two fully connected layers (``nn.Linear`` or 1x1 ``nn.Conv2d``, with or
without bias) and compares the outputs; when they differ it recomputes the reference with the
usual mistakes (no sigmoid, a softmax, max pooling, no ReLU, the gate returned instead of the
gated input, ...) and names the one the student's output matches. :func:`check_eca_kernel_size`
compares a function with :func:`attn_lib.modules.eca.eca_kernel_size`. Both return a
:class:`~attn_lib.exercises.report.Report` and never raise because the student's code is wrong.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.eca import eca_kernel_size
from ..modules.se import SqueezeExcitation
from .report import validate_checkers
from .report import Report, call_module, compare

__all__ = ["check_squeeze_excitation", "check_eca_kernel_size", "fully_connected_layers"]


# ----------------------------------------------------------------------------- SE
def fully_connected_layers(module: nn.Module) -> list[nn.Module]:
    """The ``nn.Linear`` and 1x1 ``nn.Conv2d`` layers of ``module``, in order of registration."""
    return [m for m in module.modules()
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1))]


def _shape(layer: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear or 1x1 Conv2d layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels


def _describe(layer: nn.Module) -> str:
    n_in, n_out = _shape(layer)
    kind = "Linear" if isinstance(layer, nn.Linear) else "Conv2d 1x1"
    return f"{kind} {n_in} -> {n_out}" + ("" if layer.bias is not None else " (no bias)")


def _reference_variant(ref: SqueezeExcitation, x: torch.Tensor, mistake: str) -> torch.Tensor:
    """``ref``'s output, or what it would be with one of the usual mistakes."""
    z = x.amax(dim=(2, 3)) if mistake == "max pooling" else \
        x.sum(dim=(2, 3)) if mistake == "sum" else x.mean(dim=(2, 3))
    h = ref.fc1(z)
    h = h if mistake == "no relu" else F.relu(h)
    logits = ref.fc2(h)
    if mistake == "no sigmoid":
        s = logits
    elif mistake == "softmax":
        s = torch.softmax(logits, dim=1)
    elif mistake == "relu gate":
        s = F.relu(logits)
    else:
        s = torch.sigmoid(logits)
    s = s[:, :, None, None]
    if mistake == "gate only":
        return s.expand_as(x)
    if mistake == "added":
        return x + s
    return x * s


_SE_MISTAKES = {
    "no sigmoid": "no sigmoid at the end of the excitation (the gate must be in (0, 1))",
    "softmax": "a softmax over the channels instead of a sigmoid (SE's gates are independent; "
               "they need not sum to 1)",
    "relu gate": "a ReLU instead of the sigmoid at the end of the excitation",
    "no relu": "no ReLU between the two fully connected layers",
    "max pooling": "max pooling instead of average pooling in the squeeze",
    "sum": "a sum instead of a mean over H and W in the squeeze",
    "gate only": "the gate s (broadcast to x's shape) instead of the gated input x * s",
    "added": "x + s: the gate is added to the input instead of multiplying it",
}


def _diagnose_se(ref: SqueezeExcitation, x: torch.Tensor, y: torch.Tensor) -> str:
    for mistake, why in _SE_MISTAKES.items():
        wrong = _reference_variant(ref, x, mistake)
        if wrong.shape == y.shape and torch.allclose(y.double(), wrong.double(), rtol=1e-4, atol=1e-5):
            return f"; your output matches SE with {why}"
    return ""


def check_squeeze_excitation(cls: Callable[..., nn.Module], channels: int = 32, reduction: int = 8) -> Report:
    """Check an SE block ``cls(channels, reduction)`` against :class:`SqueezeExcitation`.

    The student's module must have two fully connected layers, ``W1: C -> C/r`` then
    ``W2: C/r -> C``, as ``nn.Linear`` or 1x1 ``nn.Conv2d``, with or without bias; they are
    found in order of registration (or by their shapes) and given the reference's weights.
    Checks: it builds; the two layers; the output keeps the input's shape; the output is the
    input scaled per channel (``y == x * s``) with gates in (0, 1); the output equals the
    reference's; ``cls(8, 16)`` (``C < r``) raises or keeps at least one hidden unit.
    """
    C, r = channels, reduction
    hidden = C // r
    report = Report(f"SE block: y = x * sigmoid(W2 relu(W1 mean_hw(x))), C = {C}, r = {r}")
    got: dict = {}

    def builds():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a zero-width layer warns; the guard check reports it
            got["module"] = cls(C, r)
        assert isinstance(got["module"], nn.Module), \
            f"expected an nn.Module, got {type(got['module']).__name__}"
        return f"{cls.__name__}({C}, {r})"

    if not report.run(f"builds with (channels={C}, reduction={r})", builds):
        return report
    student = got["module"]

    def two_layers():
        layers = fully_connected_layers(student)
        others = [m for m in student.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
                  and m not in layers]
        assert not others, "SE has no spatial convolution: the excitation is two fully connected " \
            f"layers on the pooled vector, found {', '.join(type(m).__name__ for m in others)} " \
            "with a kernel larger than 1x1"
        assert len(layers) == 2, (
            f"expected two fully connected layers (nn.Linear or 1x1 nn.Conv2d), W1: {C} -> {hidden} "
            f"then W2: {hidden} -> {C}; found {len(layers)}"
            + (f": {', '.join(_describe(m) for m in layers)}" if layers else ""))
        if _shape(layers[0]) == (hidden, C) and _shape(layers[1]) == (C, hidden) and hidden != C:
            layers.reverse()  # registered W2 first: match by shape
        want = [(C, hidden), (hidden, C)]
        shapes = [_shape(m) for m in layers]
        assert shapes == want, (
            f"expected W1: {C} -> {hidden} (C -> C // r) and W2: {hidden} -> {C}, got "
            f"{' and '.join(_describe(m) for m in layers)}")
        got["layers"] = layers
        return ", ".join(_describe(m) for m in layers)

    if not report.run(f"two fully connected layers {C} -> {hidden} -> {C}", two_layers):
        return report
    layers = got["layers"]

    # the reference, with the student's layers given its weights (a missing bias is a zero bias)
    torch.manual_seed(0)
    ref = SqueezeExcitation(C, r, bias=True).eval()
    with torch.no_grad():
        for mine, theirs in zip(layers, (ref.fc1, ref.fc2)):
            mine.weight.copy_(theirs.weight.view_as(mine.weight))
            if mine.bias is not None:
                mine.bias.copy_(theirs.bias)
            else:
                theirs.bias.zero_()
    student.eval()

    def biases():
        missing = [name for name, m in zip(("W1", "W2"), layers) if m.bias is None]
        if not missing:
            return "both layers have a bias, as in the original SENet"
        return (f"no bias in {' and '.join(missing)}: a valid choice (many ports drop them), but the "
                f"original SENet has one in both layers and so does attn_lib (bias=True); compared "
                f"with the reference's bias set to zero")

    report.run("biases", biases)

    g = torch.Generator().manual_seed(0)
    # positive inputs, away from 0, so that the gate can be read back as y / x
    x = torch.rand(2, C, 5, 7, generator=g) + 0.5

    def shape_kept():
        for size in ((5, 7), (1, 1), (9, 4)):
            xi = torch.rand(2, C, *size, generator=g) + 0.5
            with torch.no_grad():
                y = call_module(student, xi)
            hint = " (did you return the gate s instead of x * s?)" if list(y.shape) in ([2, C, 1, 1], [2, C]) else ""
            assert y.shape == xi.shape, f"expected the output to keep the shape {list(xi.shape)}, got {list(y.shape)}{hint}"
        with torch.no_grad():
            got["y"] = call_module(student, x)
        return "[B, C, H, W] -> [B, C, H, W] for H x W = 5x7, 1x1, 9x4"

    if not report.run("output keeps the input's shape", shape_kept):
        return report
    y = got["y"].double()

    def scaled_per_channel():
        s = y / x.double()  # the gate each pixel received
        spread = (s - s.mean(dim=(2, 3), keepdim=True)).abs().max().item()
        assert spread < 1e-5, (
            f"the output is not the input times one gate per channel: y / x varies across the "
            f"pixels of a channel by up to {spread:.3g}" + _diagnose_se(ref, x, got["y"]))
        got["s"] = s.mean(dim=(2, 3))
        return "y / x is constant over H and W for every channel"

    def gates_in_unit_interval():
        s = got["s"]
        lo, hi = s.min().item(), s.max().item()
        assert lo > 0 and hi < 1, f"expected gates in (0, 1), got values from {lo:.3g} to {hi:.3g}" + \
            _diagnose_se(ref, x, got["y"])
        return f"gates from {lo:.3f} to {hi:.3f}"

    if report.run("y == x * s: one gate per channel", scaled_per_channel):
        report.run("gates s in (0, 1)", gates_in_unit_interval)

    def matches():
        with torch.no_grad():
            expected = ref(x)
        try:
            return compare(got["y"], expected, "output", rtol=1e-4, atol=1e-5)
        except AssertionError as err:
            raise AssertionError(str(err) + _diagnose_se(ref, x, got["y"])) from None

    report.run("output equals attn_lib's SqueezeExcitation with the same weights", matches)

    def guards_small_channels():
        small, big = 8, 16
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = cls(small, big)
        except NotImplementedError:
            raise
        except Exception as err:  # noqa: BLE001 - raising is the right answer here
            kind = type(err).__name__
            better = "" if isinstance(err, ValueError) else " (a ValueError would say more clearly that the argument is wrong)"
            return f"cls({small}, {big}) raises {kind}: {err}{better}"
        widths = [n for m in fully_connected_layers(module) for n in _shape(m)]
        assert widths and min(widths) >= 1, (
            f"cls({small}, {big}) built a layer with 0 hidden units ({small} // {big} = 0): its gate is "
            f"then a constant, the same for every input, and nothing says so; raise a ValueError "
            f"(or keep at least one hidden unit) when channels // reduction == 0")
        with torch.no_grad():
            module.eval()
            xs = torch.rand(2, small, 3, 3, generator=g) + 0.5
            ys = call_module(module, xs)
        assert ys.shape == xs.shape, f"cls({small}, {big}) changed the shape {list(xs.shape)} to {list(ys.shape)}"
        return f"cls({small}, {big}) keeps {min(widths)} hidden unit(s)"

    report.run("C < r: raises, or keeps at least one hidden unit", guards_small_channels)
    return report


# ----------------------------------------------------------------------------- ECA kernel size
def _odd_rule_hint(channels: int, got, gamma: float, b: float) -> str:
    t = (math.log2(channels) + b) / gamma
    if isinstance(got, numbers.Integral) and got % 2 == 0:
        return f" (t = (log2 C + b) / gamma = {t:.3g}; k must be odd: take int(t), and add 1 if it is even)"
    if got == int(t) - 1 and int(t) % 2 == 0:
        return f" (t = {t:.3g}: an even int(t) goes up to the next odd number, not down)"
    if isinstance(got, numbers.Integral) and got == _odd_up(round(t)):
        return f" (t = {t:.3g}: truncate t with int(), do not round it)"
    return f" (t = (log2 C + b) / gamma = {t:.3g})"


def _odd_up(t: int) -> int:
    return t if t % 2 == 1 else t + 1


def check_eca_kernel_size(fn: Callable[..., int]) -> Report:
    """Check ``fn(channels, gamma=2, b=1) -> k`` against :func:`eca_kernel_size`.

    ECA's rule: ``k = |log2(C) / gamma + b / gamma|_odd``, where ``|t|_odd`` is ``int(t)`` if that
    is odd, else ``int(t) + 1``. Checks: returns an int; the rule's 3, 5, 5, 5 at a ResNet-18's
    64-512 channels; odd and equal to the rule for C from 1 to 4096; uses ``gamma`` and ``b``.
    """
    report = Report("ECA kernel size: k = |log2(C) / gamma + b / gamma|, made odd")
    got: dict = {}

    def returns_int():
        k = fn(64)
        assert isinstance(k, numbers.Integral) and not isinstance(k, bool), \
            f"expected an int (a kernel size), got {type(k).__name__} {k!r}: convert with int(...)"
        got["ok"] = True
        return f"fn(64) = {k}"

    if not report.run("returns an int", returns_int):
        return report

    def resnet18_stages():
        wrong = []
        ks = [fn(C) for C in (64, 128, 256, 512)]
        constant = len(set(ks)) == 1 and ks[0] != 5
        for C, k, want in zip((64, 128, 256, 512), ks, (3, 5, 5, 5)):
            if k != want:
                hint = "" if constant else _odd_rule_hint(C, k, 2, 1)
                wrong.append(f"C = {C}: expected {want}, got {k}{hint}")
        assert not wrong, ("k does not change with C (like the official code's k = 3 everywhere), but "
                           "the rule makes it grow with log2(C): " if constant else "") + "; ".join(wrong)
        return "3, 5, 5, 5 for 64, 128, 256, 512 channels"

    report.run("the rule at a ResNet-18's stages (64-512 channels)", resnet18_stages)

    def all_channels():
        wrong = []
        sizes = sorted({1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 96, 100, 192, 384, 768, 1000, 1024, 2048, 4096})
        for C in sizes:
            k, want = fn(C), eca_kernel_size(C)
            if k != want:
                wrong.append(f"C = {C}: expected {want}, got {k}{_odd_rule_hint(C, k, 2, 1)}")
        assert not wrong, f"{len(wrong)} of {len(sizes)} differ; " + "; ".join(wrong[:3])
        return f"{len(sizes)} channel counts from 1 to 4096"

    report.run("odd and equal to the rule for C from 1 to 4096", all_channels)

    def uses_gamma_and_b():
        wrong = []
        for C, gamma, b in ((64, 1, 0), (1024, 2, 3), (256, 3, 1), (48, 1.5, 0.5)):
            try:
                k = fn(C, gamma=gamma, b=b)
            except TypeError as err:
                raise AssertionError(f"expected fn(channels, gamma=..., b=...) to accept gamma and b "
                                     f"(defaults 2 and 1): {err}") from None
            want = eca_kernel_size(C, gamma, b)
            if k != want:
                wrong.append(f"C = {C}, gamma = {gamma}, b = {b}: expected {want}, got {k}"
                             f"{_odd_rule_hint(C, k, gamma, b)}")
        assert not wrong, "; ".join(wrong[:3])
        return "gamma and b change k as the rule says"

    report.run("uses gamma and b", uses_gamma_and_b)
    return report


validate_checkers(globals())
