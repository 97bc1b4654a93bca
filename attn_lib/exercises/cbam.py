"""Checkers for the exercises of the CBAM chapter (``notebooks/04_cbam``).

    from attn_lib.exercises.cbam import check_spatial_gate, check_cbam
    report = check_spatial_gate(StudentSpatialGate)      # M_s alone
    report = check_cbam(StudentCBAM)                     # the paper's form
    report = check_cbam(StudentCBAM, official=True)      # the official code's form

Both copy the weights of :class:`attn_lib.modules.cbam.CBAM` into the student's module *by
structure* (the layouts are documented on each function), compare the outputs, and, when they
differ, recompute the reference with the usual mistakes (spatial gate first, mean and max maps
swapped, a missing sigmoid, SE's average-only descriptor, the spatial gate computed from the
input instead of the channel-refined map, ...) and name the one the student's output matches.
They return a :class:`~attn_lib.exercises.report.Report` and never raise because the student's
code is wrong.
"""
from __future__ import annotations

import copy
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.cbam import CBAM
from .report import validate_checkers
from .report import Report, call_module, compare
from .se import fully_connected_layers

__all__ = ["check_cbam", "check_spatial_gate", "spatial_convolutions"]

RTOL, ATOL = 1e-4, 1e-5
NOT_RUN = "not run: the layout check failed (see above)"


def spatial_convolutions(module: nn.Module) -> list[nn.Conv2d]:
    """The ``nn.Conv2d`` layers of ``module`` that map 2 channels to 1 with a kernel larger than 1x1
    (CBAM's spatial convolution), in order of registration."""
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 2
            and m.out_channels == 1 and tuple(m.kernel_size) != (1, 1)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), rtol=RTOL, atol=ATOL)


def _build(cls: Callable[..., nn.Module], args: tuple, kwargs: dict, got: dict) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a zero-width layer warns; the layout check reports it
        try:
            module = cls(*args, **kwargs)
        except TypeError as err:  # a constructor without the keyword: try the positional form
            if "unexpected keyword" not in str(err):
                raise
            module = cls(*args, *kwargs.values())
    assert isinstance(module, nn.Module), f"expected an nn.Module, got {type(module).__name__}"
    got["module"] = module
    shown = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return f"{cls.__name__}({shown})"


def _gradients_reach(module: nn.Module, x: torch.Tensor) -> str:
    module.zero_grad(set_to_none=True)
    y = call_module(module, x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    assert params, "the module has no trainable parameters"
    dead = [n for n, p in params if p.grad is None or not p.grad.abs().sum() > 0]
    module.zero_grad(set_to_none=True)
    assert not dead, f"no gradient reaches {', '.join(dead)} (a detach, a no_grad, or a parameter never used?)"
    return f"all {len(params)} parameter tensors get a gradient"


# ----------------------------------------------------------------------------- functional forms
def _spatial_maps(x: torch.Tensor, order: tuple[str, str]) -> torch.Tensor:
    """``[B, C, H, W] -> [B, 2, H, W]``: the named channel-wise statistics, stacked in ``order``."""
    stats = {"mean": lambda: x.mean(dim=1, keepdim=True), "max": lambda: x.amax(dim=1, keepdim=True),
             "sum": lambda: x.sum(dim=1, keepdim=True)}
    return torch.cat([stats[name]() for name in order], dim=1)


def _spatial_logits(x: torch.Tensor, conv: nn.Conv2d, order: tuple[str, str]) -> torch.Tensor:
    return F.conv2d(_spatial_maps(x, order), conv.weight, conv.bias, padding=conv.kernel_size[0] // 2)


_PAPER_ORDER, _OFFICIAL_ORDER = ("mean", "max"), ("max", "mean")


def _cbam_variant(ref: CBAM, x: torch.Tensor, mistake: str = "") -> torch.Tensor:
    """``ref``'s output (its own weights, its mode), or what it would be with one mistake."""
    mlp, gate = ref.channel_gate.mlp, ref.spatial_gate
    order = _PAPER_ORDER if gate.pool_order == "mean_max" else _OFFICIAL_ORDER
    if mistake == "swapped order":
        order = order[::-1]

    def channel(t):
        pools = {"avg only": [t.mean(dim=(2, 3))], "max only": [t.amax(dim=(2, 3))]}.get(
            mistake, [t.mean(dim=(2, 3)), t.amax(dim=(2, 3))])
        logits = sum(mlp(p) for p in pools)
        gates = logits if mistake in ("no channel sigmoid", "no sigmoid") else torch.sigmoid(logits)
        return gates[:, :, None, None]

    def spatial(t):
        logits = gate.bn(_spatial_logits(t, gate.conv, order))
        return logits if mistake in ("no spatial sigmoid", "no sigmoid") else torch.sigmoid(logits)

    if mistake == "spatial first":
        refined = x * spatial(x)
        return refined * channel(refined)
    refined = x * channel(x)
    return refined * spatial(x if mistake == "spatial from input" else refined)


def _cbam_mistakes(official: bool) -> dict[str, str]:
    want, swapped = ("[max; mean]", "[mean; max]") if official else ("[mean; max]", "[max; mean]")
    return {
        "spatial first": "the spatial gate applied first and the channel gate second; CBAM applies "
                         "the channel gate first, then computes the spatial gate from F' = M_c * F",
        "swapped order": f"the two channel-pooled maps stacked as {swapped}; this form expects "
                         f"{want} (input channel 0 of the 7x7 convolution sees the "
                         f"{'max' if official else 'mean'} map)",
        "no channel sigmoid": "no sigmoid on the channel gate (M_c must be in (0, 1))",
        "no spatial sigmoid": "no sigmoid on the spatial gate (M_s must be in (0, 1))",
        "no sigmoid": "no sigmoid on either gate",
        "avg only": "a channel gate fed by the average-pooled descriptor only (that is SE's gate; "
                    "CBAM adds MLP(MaxPool(F)) to MLP(AvgPool(F)) before the sigmoid)",
        "max only": "a channel gate fed by the max-pooled descriptor only (CBAM sums the MLP's "
                    "outputs for the average- and the max-pooled descriptors)",
        "spatial from input": "the spatial gate computed from the input F instead of the "
                              "channel-refined map F' = M_c * F",
    }


def _diagnose(candidates: dict[str, str], variant: Callable[[str], torch.Tensor], y: torch.Tensor) -> str:
    for mistake, why in candidates.items():
        try:
            wrong = variant(mistake)
        except RuntimeError:
            continue
        if _close(y, wrong):
            return f"; your output matches CBAM with {why}"
    return ("; it matches none of the usual mistakes: check each step's shape against the "
            "derivation (pooling dims, the shared MLP, the order of the two maps, the sigmoids)")


# ----------------------------------------------------------------------------- the spatial gate
def _spatial_variant(conv: nn.Conv2d, x: torch.Tensor, mistake: str = "") -> torch.Tensor:
    order = {"swapped order": ("max", "mean"), "mean only": ("mean", "mean"), "max only": ("max", "max"),
             "sum": ("sum", "max")}.get(mistake, _PAPER_ORDER)
    logits = _spatial_logits(x, conv, order)
    return logits if mistake == "no sigmoid" else torch.sigmoid(logits)


_SPATIAL_MISTAKES = {
    "swapped order": "the maps stacked as [max; mean]; the paper's order is [mean; max] (input "
                     "channel 0 of the convolution sees the mean). The official code uses "
                     "[max; mean]: either is fine for a model trained that way, but with given "
                     "weights the order is part of the function",
    "no sigmoid": "no sigmoid after the convolution",
    "mean only": "the mean map fed to both input channels (the second should be the max)",
    "max only": "the max map fed to both input channels (the first should be the mean)",
    "sum": "a sum over the channels instead of their mean",
}


def check_spatial_gate(cls: Callable[..., nn.Module], kernel_size: int = 7) -> Report:
    """Check a spatial gate ``cls(kernel_size=7)`` whose ``forward(x)`` returns ``M_s``.

    Expected layout: exactly one ``nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)``,
    with or without bias, anywhere in the module; its input channel 0 sees the channel-wise
    mean, input channel 1 the channel-wise max (the paper's ``[mean; max]``). ``forward(x)``
    takes ``x: [B, C, H, W]`` (any ``C``) and returns the gate
    ``M_s = sigmoid(conv([mean_c x; max_c x]))`` of shape ``[B, 1, H, W]``, not the gated map.

    The convolution is given random weights, shared with the reference computed here.
    """
    report = Report(f"CBAM spatial gate: M_s = sigmoid(conv{kernel_size}x{kernel_size}([mean_c(x); max_c(x)]))")
    got: dict = {}
    if not report.run(f"builds with kernel_size={kernel_size}", lambda: _build(cls, (), {"kernel_size": kernel_size}, got)):
        return report
    student = got["module"]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 5, 7, generator=generator)

    def layout():
        convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
        spatial = spatial_convolutions(student)
        assert len(convs) == 1 and len(spatial) == 1, (
            f"expected exactly one nn.Conv2d(2, 1, {kernel_size}) (2 maps in, 1 gate out); found "
            + (", ".join(f"Conv2d({m.in_channels}, {m.out_channels}, {tuple(m.kernel_size)})" for m in convs)
               or "no Conv2d"))
        conv = spatial[0]
        assert tuple(conv.kernel_size) == (kernel_size, kernel_size), \
            f"expected a {kernel_size}x{kernel_size} kernel, got {tuple(conv.kernel_size)}"
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            if conv.bias is not None:
                conv.bias.fill_(0.1)
        got["conv"] = conv
        return f"Conv2d(2, 1, {kernel_size})" + ("" if conv.bias is not None else " (no bias)")

    laid_out = report.run("one 2 -> 1 convolution", layout)

    def shape():
        with torch.no_grad():
            m = call_module(student, x)
        want = [x.shape[0], 1, *x.shape[2:]]
        hint = ""
        if list(m.shape) == list(x.shape):
            hint = ": return the gate M_s itself, not M_s * x (the CBAM block multiplies)"
        elif m.dim() == 4 and m.shape[1] == 1 and m.shape[2:] != x.shape[2:]:
            hint = f": H x W changed, pad the convolution by {kernel_size // 2} on each side"
        assert list(m.shape) == want, f"expected M_s of shape {want} for x of shape {list(x.shape)}, " \
            f"got {list(m.shape)}{hint}"
        got["m"] = m
        return f"x {list(x.shape)} -> M_s {want}"

    def run_shape():
        try:
            return shape()
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            conv = got.get("conv")
            padding = None if conv is None else conv.padding  # a tuple, or "same" / "valid"
            if conv is not None and padding not in ((kernel_size // 2,) * 2, "same"):
                raise AssertionError(
                    f"forward fails on x of shape {list(x.shape)} ({first}): the convolution has "
                    f"padding={padding}, which shrinks H x W by {kernel_size - 1}; give it "
                    f"padding={kernel_size // 2} so that M_s keeps the input's H x W") from None
            raise AssertionError(
                f"forward fails on x of shape {list(x.shape)} ({first}): pool over "
                "the channel axis (dim 1, keepdim=True) to get two [B, 1, H, W] maps, and stack "
                "them along dim 1") from None

    shaped = report.run("returns M_s, [B, 1, H, W]", run_shape)

    def in_unit_interval():
        m = got["m"]
        assert ((m > 0) & (m < 1)).all(), \
            f"values from {m.min().item():.3g} to {m.max().item():.3g}: a gate lies in (0, 1); " \
            "did you forget the sigmoid?"
        return f"values from {m.min().item():.3f} to {m.max().item():.3f}"

    def matches():
        assert laid_out, NOT_RUN
        want = _spatial_variant(got["conv"], x)
        m = got["m"]
        if not _close(m, want):
            why = next((w for k, w in _SPATIAL_MISTAKES.items() if _close(m, _spatial_variant(got["conv"], x, k))),
                       None)
            diff = (m.double() - want.double()).abs().max().item()
            raise AssertionError(f"values differ from the reference (max abs difference {diff:.3g})"
                                 + (f"; your gate matches {why}" if why else
                                    "; check the pooling axis, the order [mean; max] and the padding"))
        return compare(m, want, "M_s", RTOL, ATOL)

    def per_image():
        with torch.no_grad():
            one_by_one = torch.cat([call_module(student, x[i:i + 1]) for i in range(len(x))])
        assert _close(got["m"], one_by_one), \
            "an image's gate depends on the other images in the batch: pool over the channels " \
            "(dim 1) of each image, never over the batch (dim 0)"
        return "each image's gate depends on that image only"

    def any_channels():
        assert laid_out, NOT_RUN
        other = torch.randn(2, 13, 4, 4, generator=generator)
        with torch.no_grad():
            m = call_module(student, other)
        return compare(m, _spatial_variant(got["conv"], other), "M_s for 13 channels", RTOL, ATOL)

    if not shaped:  # the remaining checks would fail the same way
        return report
    report.run("values in (0, 1)", in_unit_interval)
    if report.run("equals sigmoid(conv([mean; max])) with the same weights", matches):
        report.run("works for any number of channels (here 13)", any_channels)
    report.run("each image gated on its own", per_image)
    if laid_out:
        report.run("gradients reach the convolution", lambda: _gradients_reach(student, x))
    return report


# ----------------------------------------------------------------------------- the whole CBAM
def _reference(channels: int, reduction: int, official: bool, generator: torch.Generator) -> CBAM:
    ref = CBAM(channels, reduction, spatial_bn=official, pool_order="max_mean" if official else "mean_max")
    with torch.no_grad():
        for p in ref.channel_gate.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 4))
        ref.spatial_gate.conv.weight.copy_(torch.randn(ref.spatial_gate.conv.weight.shape, generator=generator) * 0.3)
        if ref.spatial_gate.conv.bias is not None:
            ref.spatial_gate.conv.bias.fill_(0.1)
        if official:  # non-trivial BatchNorm parameters and statistics (the zero init is checked apart)
            bn = ref.spatial_gate.bn
            bn.weight.fill_(0.8)
            bn.bias.fill_(-0.1)
            bn.running_mean.fill_(0.2)
            bn.running_var.fill_(1.5)
    return ref


def _copy_into(student_layers: dict, ref: CBAM) -> None:
    """Give the student's layers the reference's weights; a bias only one side has becomes 0."""
    ref_mlp = [ref.channel_gate.mlp[0], ref.channel_gate.mlp[2]]
    pairs = [*zip(student_layers["mlp"], ref_mlp), (student_layers["conv"], ref.spatial_gate.conv)]
    with torch.no_grad():
        for mine, theirs in pairs:
            mine.weight.copy_(theirs.weight.reshape(mine.weight.shape))
            if mine.bias is not None and theirs.bias is not None:
                mine.bias.copy_(theirs.bias)
            elif mine.bias is not None:
                mine.bias.zero_()
            elif theirs.bias is not None:
                theirs.bias.zero_()
        bn = student_layers.get("bn")
        if bn is not None:
            theirs = ref.spatial_gate.bn
            if bn.weight is not None:
                bn.weight.copy_(theirs.weight)
                bn.bias.copy_(theirs.bias)
            else:
                theirs.weight.fill_(1.0)
                theirs.bias.zero_()
            if bn.running_mean is not None:
                bn.running_mean.copy_(theirs.running_mean)
                bn.running_var.copy_(theirs.running_var)
            bn.eps = theirs.eps


def check_cbam(cls: Callable[..., nn.Module], official: bool = False, channels: int = 32,
               reduction: int = 16) -> Report:
    """Check a CBAM block ``cls(channels, reduction=16)`` against :class:`attn_lib.modules.cbam.CBAM`.

    Expected layout (found by structure, anywhere in the module, so any nesting works):

    * the channel gate's MLP: exactly **two** fully connected layers, ``nn.Linear`` or 1x1
      ``nn.Conv2d``, with or without bias: ``W0: C -> C // r`` then ``W1: C // r -> C``. One MLP
      serves both pooled descriptors (four layers means two MLPs: wrong);
    * the spatial gate: one ``nn.Conv2d(2, 1, 7, padding=3)``, with or without bias;
    * ``official=True`` only: one ``nn.BatchNorm2d(1)`` after that convolution, its weight and
      bias initialised to 0, and the maps stacked ``[max; mean]`` (the official code's form,
      ``CBAM(C, spatial_bn=True, pool_order="max_mean")``). Otherwise ``[mean; max]`` and no
      BatchNorm (the paper's form).

    ``forward(x)`` maps ``x: [B, C, H, W]`` to ``F'' = M_s(F') * F'`` with ``F' = M_c(F) * F``,
    same shape. The reference's weights are copied into the student's layers; a bias present on
    one side only is set to 0 on the other.
    """
    C, r = channels, reduction
    hidden = C // r
    form = "official code: BN after the 7x7 conv, [max; mean]" if official else "paper: [mean; max]"
    report = Report(f"CBAM ({form}), C = {C}, r = {r}: F' = M_c(F) * F, F'' = M_s(F') * F'")
    got: dict = {}
    if not report.run(f"builds with ({C}, reduction={r})", lambda: _build(cls, (C,), {"reduction": r}, got)):
        return report
    student = got["module"]
    generator = torch.Generator().manual_seed(0)
    ref = _reference(C, r, official, generator)
    x = torch.randn(4, C, 6, 5, generator=generator)

    def layout():
        mlp = fully_connected_layers(student)
        shapes = [(m.in_features, m.out_features) if isinstance(m, nn.Linear) else (m.in_channels, m.out_channels)
                  for m in mlp]
        if len(mlp) == 4:
            raise AssertionError(
                f"found four fully connected layers {shapes}: two MLPs, one for the average- and one "
                "for the max-pooled descriptor. CBAM passes both through ONE shared MLP (W0, W1), "
                "which is what keeps its channel gate as cheap as SE's")
        assert len(mlp) == 2, f"expected the shared MLP's two layers, {C} -> {hidden} and {hidden} -> {C} " \
            f"(nn.Linear or 1x1 nn.Conv2d); found {len(mlp)}: {shapes}"
        if shapes == [(hidden, C), (C, hidden)] and hidden != C:
            mlp.reverse()  # registered W1 first: match by shape
            shapes.reverse()
        assert shapes == [(C, hidden), (hidden, C)], \
            f"expected W0: {C} -> {hidden} (C // r) then W1: {hidden} -> {C}, got {shapes}"
        convs = spatial_convolutions(student)
        assert len(convs) == 1, f"expected one nn.Conv2d(2, 1, 7) for the spatial gate, found {len(convs)}"
        assert tuple(convs[0].kernel_size) == (7, 7), f"expected a 7x7 kernel, got {tuple(convs[0].kernel_size)}"
        bns = [m for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
        if official:
            assert len(bns) == 1 and bns[0].num_features == 1, \
                f"the official form has one nn.BatchNorm2d(1) after the 7x7 convolution; found {len(bns)}"
        else:
            assert not bns, "the paper's form has no BatchNorm in the spatial gate (use official=True " \
                "to check the official code's form)"
        got["layers"] = {"mlp": mlp, "conv": convs[0], "bn": bns[0] if bns else None}
        return f"MLP {shapes[0][0]} -> {shapes[0][1]} -> {shapes[1][1]}, one 7x7 conv" + \
            (", BatchNorm2d(1)" if official else "")

    laid_out = report.run("one shared MLP and one 7x7 convolution", layout)

    if official and laid_out:
        def zero_init():
            bn = got["layers"]["bn"]
            assert bn.weight is not None, "the BatchNorm needs affine parameters (affine=True)"
            assert torch.all(bn.weight == 0) and torch.all(bn.bias == 0), \
                f"BatchNorm weight {bn.weight.item():.3g} and bias {bn.bias.item():.3g} at construction: " \
                "the official code sets both to 0, so that M_s = sigmoid(0) = 0.5 everywhere at the start"
            return "BN weight and bias start at 0: M_s = 0.5 everywhere at the start"
        report.run("spatial gate starts at 0.5", zero_init)

    if laid_out:
        _copy_into(got["layers"], ref)
    student.eval()
    ref.eval()

    def shape():
        try:
            with torch.no_grad():
                y = call_module(student, x)
        except RuntimeError as err:
            raise AssertionError(
                f"forward fails on x of shape {list(x.shape)} ({str(err).splitlines()[0]}): the channel "
                "gate pools over H and W (dims 2, 3) to two [B, C] vectors; the spatial gate pools over "
                "the channels (dim 1, keepdim=True) to two [B, 1, H, W] maps") from None
        assert y.shape == x.shape, f"expected the input's shape {list(x.shape)}, got {list(y.shape)}"
        got["y"] = y
        return f"{list(x.shape)} -> {list(y.shape)}"

    shaped = report.run("keeps the shape [B, C, H, W]", shape)
    mistakes = _cbam_mistakes(official)

    def matches(mode: str):
        def check():
            assert laid_out, NOT_RUN
            # a forward in training mode updates BatchNorm statistics: put them back afterwards
            saved = [copy.deepcopy(m.state_dict()) for m in (student, ref)]
            student.train(mode == "train")
            ref.train(mode == "train")
            try:
                with torch.no_grad():
                    y = call_module(student, x) if mode == "train" else got["y"]
                    want = _cbam_variant(ref, x)
                    if not _close(y, want):
                        diff = (y.double() - want.double()).abs().max().item()
                        raise AssertionError(f"values differ from the reference (max abs difference {diff:.3g})"
                                             + _diagnose(mistakes, lambda k: _cbam_variant(ref, x, k), y))
            finally:
                for m, state in zip((student, ref), saved):
                    m.load_state_dict(state)
                    m.eval()
            return compare(y, want, "F''", RTOL, ATOL)
        return check

    def per_image():
        with torch.no_grad():
            one_by_one = torch.cat([call_module(student, x[i:i + 1]) for i in range(len(x))])
        assert _close(got["y"], one_by_one), \
            "in eval mode an image's output depends on the other images in the batch: pool over each " \
            "image's own H, W (channel gate) or channels (spatial gate), never over the batch (dim 0)"
        return "each image's output depends on that image only"

    if shaped:
        report.run("equals CBAM with the same weights" + (" (eval mode)" if official else ""), matches("eval"))
        if official:
            report.run("equals CBAM in training mode (BatchNorm on batch statistics)", matches("train"))
        report.run("each image gated on its own (eval mode)", per_image)
    if laid_out and shaped:
        student.train()
        report.run("gradients reach every parameter", lambda: _gradients_reach(student, x))
    return report


validate_checkers(globals())
