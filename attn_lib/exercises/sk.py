"""Checkers for the exercises of the Selective Kernel chapter (``notebooks/03_sk``).

    from attn_lib.exercises import sk
    report = sk.check_select(select)                  # the select step alone
    report = sk.check_selective_kernel(StudentSK)     # a whole SK unit

Each checker runs the student's code on small random inputs next to a reference computed from
the paper's equations (Li, Wang, Hu, Yang, "Selective Kernel Networks", CVPR 2019) and returns a
:class:`~attn_lib.exercises.report.Report`. When an output is wrong, the checker recomputes the
reference with the usual mistakes (softmax over the channels or over the batch, a sigmoid in
place of the softmax, no dilation, no batch norm in the fuse step) and names the one the student's
output matches. A checker never raises because the student's code is wrong.
"""
from __future__ import annotations

import contextlib
import io
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.sk import SelectiveKernel
from .report import validate_checkers
from .report import Report, compare

__all__ = ["reference_select", "check_select", "check_selective_kernel"]


# ----------------------------------------------------------------------------- the select step
def reference_select(z: torch.Tensor, A: torch.Tensor, features: torch.Tensor,
                     normalise: str = "branches") -> tuple[torch.Tensor, torch.Tensor]:
    """The select step of an SK unit (paper, Eq. 5-6), and the usual ways of getting it wrong.

    ``z: [B, d]`` (the fused descriptor), ``A: [M, C, d]`` (one matrix per branch),
    ``features: [B, M, C, H, W]`` (the branch outputs ``U_m``). Returns ``V: [B, C, H, W]`` and
    the branch weights ``a: [B, M, C]``, where ``a[b, m, c] = exp(A_m z)_c / sum_k exp(A_k z)_c``
    and ``V = sum_m a_m * U_m``.

    ``normalise`` picks how the logits become weights: ``"branches"`` (the paper: a softmax over
    dim 1, so that every channel's weights sum to 1 over the branches), ``"channels"`` (softmax
    over dim 2), ``"batch"`` (softmax over dim 0, what ``dim=0`` does on a batch-first stack) or
    ``"sigmoid"`` (an independent gate per branch, as in SE).
    """
    logits = torch.einsum("mcd,bd->bmc", A, z)  # A_m z for every branch: [B, M, C]
    if normalise == "branches":
        a = torch.softmax(logits, dim=1)
    elif normalise == "channels":
        a = torch.softmax(logits, dim=2)
    elif normalise == "batch":
        a = torch.softmax(logits, dim=0)
    elif normalise == "sigmoid":
        a = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown normalise {normalise!r}; expected branches, channels, batch or sigmoid")
    return (a[..., None, None] * features).sum(dim=1), a


_SELECT_MISTAKES = {
    "channels": "a softmax over the channels (dim 2 of [B, M, C]): each branch's weights sum to 1 "
                "across channels, instead of each channel's weights summing to 1 across branches",
    "batch": "a softmax over the batch (dim 0): one image's weights then depend on the other images",
    "sigmoid": "a sigmoid per branch: the weights no longer compete, nothing makes them sum to 1",
}


def _select_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # B, M, C, d all different so that a wrong axis cannot hide behind equal sizes
    g = torch.Generator().manual_seed(seed)
    batch, branches, channels, d, size = 3, 2, 6, 5, 4
    z = torch.relu(torch.randn(batch, d, generator=g, dtype=torch.float64))
    A = torch.randn(branches, channels, d, generator=g, dtype=torch.float64)
    features = torch.relu(torch.randn(batch, branches, channels, size, size, generator=g, dtype=torch.float64))
    return z, A, features


def _diagnose_weights(a: torch.Tensor, z, A, features) -> str:
    for mistake, why in _SELECT_MISTAKES.items():
        _, wrong = reference_select(z, A, features, mistake)
        if a.shape == wrong.shape and torch.allclose(a.double(), wrong, atol=1e-6):
            return f"; your weights are {why}"
    return ""


def check_select(select: Callable) -> Report:
    """Check ``select(z, A, features) -> (V, a)`` against :func:`reference_select`.

    ``z: [B, d]``, ``A: [M, C, d]``, ``features: [B, M, C, H, W]``; expects
    ``V: [B, C, H, W]`` and ``a: [B, M, C]`` (the branch weights that were applied).
    """
    report = Report("Select step: a_m = softmax over branches of A_m z, V = sum_m a_m * U_m")
    z, A, features = _select_inputs()
    expected_v, expected_a = reference_select(z, A, features)
    got: dict = {}

    def runs():
        out = select(z.clone(), A.clone(), features.clone())
        assert isinstance(out, tuple) and len(out) == 2, \
            f"expected select to return a tuple (V, a), got {type(out).__name__}"
        got["v"], got["a"] = out
        assert isinstance(got["v"], torch.Tensor) and isinstance(got["a"], torch.Tensor), \
            "expected V and a to be tensors"
        return "returns (V, a)"

    if not report.run("runs on z [3, 5], A [2, 6, 5], features [3, 2, 6, 4, 4]", runs):
        return report

    def weights_shape():
        assert list(got["a"].shape) == [3, 2, 6], \
            f"expected a of shape [B, M, C] = [3, 2, 6], got {list(got['a'].shape)}"
        return ""

    def sums_over_branches():
        a = got["a"].double()
        sums = a.sum(dim=1)
        worst = (sums - 1).abs().max().item()
        assert worst < 1e-6, (
            f"for each image and channel the weights must sum to 1 over the M branches (dim 1); "
            f"the sums are off by up to {worst:.3g}" + _diagnose_weights(a, z, A, features))
        return "every channel's weights sum to 1 over the branches"

    def weights_match():
        return compare(got["a"], expected_a, "a")

    def output_matches():
        return compare(got["v"], expected_v, "V")

    def output_uses_own_weights():
        # V must be the weighted sum of the branches with the weights that were returned
        v_from_a = (got["a"].double()[..., None, None] * features).sum(dim=1)
        assert got["v"].shape == v_from_a.shape, \
            f"expected V of shape [B, C, H, W] = {list(v_from_a.shape)}, got {list(got['v'].shape)}"
        assert torch.allclose(got["v"].double(), v_from_a, atol=1e-6), \
            "V is not sum_m a[:, m, :, None, None] * features[:, m]: multiply each branch by its " \
            "weights and sum over the branch axis (dim 1)"
        return "V = sum_m a_m * U_m"

    if report.run("weights have shape [B, M, C]", weights_shape):
        report.run("weights sum to 1 over the branches", sums_over_branches)
        report.run("weights equal softmax over branches of A_m z", weights_match)
    report.run("V is the weighted sum of the branches", output_uses_own_weights)
    report.run("V matches the reference", output_matches)
    return report


# ----------------------------------------------------------------------------- a whole SK unit
def _reference_forward(ref: SelectiveKernel, x: torch.Tensor, training: bool, dilations=None,
                       normalise: str = "branches", fuse_bn: bool = True) -> torch.Tensor:
    """The SK unit of the paper (Eq. 1-6) with ``ref``'s weights, in float64; the keyword
    arguments recompute it with a mistake, to tell the student which one they made."""
    def bn(t, layer):
        return F.batch_norm(t, layer.running_mean.double(), layer.running_var.double(), layer.weight.double(),
                            layer.bias.double(), training=training, eps=layer.eps)

    x = x.double()
    dilations = dilations or list(range(1, ref.branches + 1))
    features = [torch.relu(bn(F.conv2d(x, branch.conv.weight.double(), padding=d, dilation=d), branch.bn))
                for branch, d in zip(ref.split, dilations)]
    s = sum(features).mean(dim=(2, 3), keepdim=True)
    z = F.conv2d(s, ref.fuse.fc.weight.double())
    z = torch.relu(bn(z, ref.fuse.bn) if fuse_bn else z)
    A = ref.select.weight.double()[:, :, 0, 0].reshape(ref.branches, ref.out_channels, ref.hidden)
    v, _ = reference_select(z[:, :, 0, 0], A, torch.stack(features, dim=1), normalise)
    return v


_SK_MISTAKES = [
    (dict(normalise="channels"), "the softmax runs over the channels, not over the branches: for each "
                                 "channel the M weights must sum to 1 (softmax over the branch axis)"),
    (dict(normalise="batch"), "the softmax runs over the batch (dim 0 of a batch-first tensor); "
                              "it must run over the branch axis"),
    (dict(normalise="sigmoid"), "a sigmoid replaces the softmax: the branches must compete, their "
                                "weights summing to 1 for every channel"),
    (dict(dilations="ones"), "every branch has dilation 1, so both see the same 3x3 window; branch m "
                             "needs dilation m (and padding m)"),
    (dict(fuse_bn=False), "the fuse step has no batch norm: z = ReLU(BN(W s))"),
]


def _diagnose_sk(ref: SelectiveKernel, x: torch.Tensor, y: torch.Tensor, training: bool) -> str:
    for kwargs, why in _SK_MISTAKES:
        kwargs = dict(kwargs)
        if kwargs.get("dilations") == "ones":
            kwargs["dilations"] = [1] * ref.branches
        with torch.no_grad():
            wrong = _reference_forward(ref, x, training, **kwargs)
        if wrong.shape == y.shape and torch.allclose(y.double(), wrong, rtol=1e-4, atol=1e-5):
            return f"; it matches an SK unit in which {why}"
    return ""


def _randomised_reference(channels: int, branches: int, reduction: float, min_dim: int,
                          seed: int) -> SelectiveKernel:
    """A reference unit with random weights and batch-norm statistics, so that no step is an
    identity and the branch weights are far from 1/M."""
    g = torch.Generator().manual_seed(seed)
    ref = SelectiveKernel(channels, branches=branches, groups=1, reduction=reduction, min_dim=min_dim)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        ref.select.weight.mul_(0.5)
        for layer in ref.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.add_(1.0)
                layer.running_mean.copy_(torch.randn(layer.num_features, generator=g) * 0.2)
                layer.running_var.copy_(torch.rand(layer.num_features, generator=g) + 0.5)
    return ref


def _layers(module: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The weight layers (Conv2d, Linear) and the batch norms of ``module``, in registration order."""
    weights = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norms = [m for m in module.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    return weights, norms


def _is_1x1(layer: nn.Module, c_in: int, c_out: int) -> bool:
    if isinstance(layer, nn.Linear):
        return (layer.in_features, layer.out_features) == (c_in, c_out)
    return layer.kernel_size == (1, 1) and (layer.in_channels, layer.out_channels) == (c_in, c_out)


def _find_parts(student: nn.Module, channels: int, branches: int, hidden: int) -> dict:
    """Locate the layers of an SK unit by their role, whatever their attribute names."""
    weights, norms = _layers(student)
    convs = [w for w in weights if isinstance(w, nn.Conv2d) and w.kernel_size != (1, 1)]
    other = [k for w in convs if w.kernel_size != (3, 3) for k in [w.kernel_size]]
    assert not other, (
        f"found a convolution with kernel {other[0]}: every branch is a 3x3 convolution; the paper's "
        f"5x5 branch is a 3x3 with dilation 2 (same window, 9 weights instead of 25)")
    assert len(convs) == branches, f"expected {branches} 3x3 convolutions (one per branch), found {len(convs)}"
    for conv in convs:
        assert (conv.in_channels, conv.out_channels, conv.groups) == (channels, channels, 1), (
            f"expected each branch to be a dense 3x3 convolution {channels} -> {channels} (groups=1), "
            f"got {conv.in_channels} -> {conv.out_channels} with groups={conv.groups}")
    split_norms = [n for n in norms if n.num_features == channels]
    fuse_norms = [n for n in norms if n.num_features == hidden]
    assert len(split_norms) == branches, (
        f"expected {branches} batch norms of {channels} channels (one after each branch convolution), "
        f"found {len(split_norms)}")
    W = [w for w in weights if _is_1x1(w, channels, hidden)]
    assert len(W) == 1, (
        f"expected one layer W: {channels} -> d = {hidden} (a Linear or a 1x1 Conv2d) in the fuse step, "
        f"found {len(W)}")
    A_one = [w for w in weights if _is_1x1(w, hidden, branches * channels)]
    A_many = [w for w in weights if _is_1x1(w, hidden, channels)]
    assert len(A_one) == 1 or len(A_many) == branches, (
        f"expected the select step's A as one layer d -> M*C = {hidden} -> {branches * channels} or as "
        f"{branches} layers d -> C = {hidden} -> {channels}; found {len(A_one)} and {len(A_many)}")
    return {"convs": convs, "split_norms": split_norms, "fuse_norm": fuse_norms[0] if fuse_norms else None,
            "W": W[0], "A": A_one if len(A_one) == 1 else A_many}


def _copy_weights(parts: dict, ref: SelectiveKernel) -> None:
    """Give the student's layers the reference's weights (biases, where present, are zeroed)."""
    def put(layer: nn.Module, weight: torch.Tensor) -> None:
        layer.weight.copy_(weight.reshape(layer.weight.shape))
        if getattr(layer, "bias", None) is not None:
            layer.bias.zero_()

    def put_norm(norm: nn.Module, source: nn.BatchNorm2d) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            target = getattr(norm, name)
            if target is not None:
                target.copy_(getattr(source, name))
        norm.eps = source.eps

    with torch.no_grad():
        for conv, norm, branch in zip(parts["convs"], parts["split_norms"], ref.split):
            put(conv, branch.conv.weight)
            put_norm(norm, branch.bn)
        put(parts["W"], ref.fuse.fc.weight)
        if parts["fuse_norm"] is not None:
            put_norm(parts["fuse_norm"], ref.fuse.bn)
        select = ref.select.weight  # [M*C, d, 1, 1], branch-major
        if len(parts["A"]) == 1:
            put(parts["A"][0], select)
        else:
            for m, layer in enumerate(parts["A"]):
                put(layer, select[m * ref.out_channels:(m + 1) * ref.out_channels])


def check_selective_kernel(cls: Callable[..., nn.Module], channels: int = 24, branches: int = 2) -> Report:
    """Check a student's SK unit, built as ``cls(channels, branches=M, reduction=r, min_dim=L)``.

    Expected: M dense 3x3 convolutions ``C -> C``, branch ``m`` with dilation ``m`` and padding
    ``m``, each followed by a batch norm and a ReLU; the fuse step ``z = ReLU(BN(W s))`` with ``W``
    a ``Linear`` or 1x1 ``Conv2d`` ``C -> d = max(C // r, L)``; the select step's matrices as one
    layer ``d -> M*C`` (outputs read as ``[M, C]``, branch-major) or as M layers ``d -> C``.
    Attribute names are free: the checker finds the layers by their shapes, in the order they are
    registered, and copies the reference's weights into them.
    ``forward(x: [B, C, H, W]) -> V: [B, C, H, W]``.
    """
    report = Report(f"SK unit ({branches} branches) against the paper's equations")
    reduction, min_dim = 16, 32
    hidden = max(channels // reduction, min_dim)
    built: dict = {}

    def builds():
        built["student"] = cls(channels, branches=branches, reduction=reduction, min_dim=min_dim)
        assert isinstance(built["student"], nn.Module), \
            f"expected an nn.Module, got {type(built['student']).__name__}"
        return f"{type(built['student']).__name__}({channels}, branches={branches})"

    if not report.run("builds", builds):
        return report
    student = built["student"]

    def hidden_width():
        cases = [(channels, reduction, min_dim), (80, 2, 32), (64, 16, 8)]
        found = []
        for c, r, floor in cases:
            module = cls(c, branches=branches, reduction=r, min_dim=floor)
            expected = max(c // r, floor)
            outs = [w for w in _layers(module)[0]
                    if getattr(w, "in_features", getattr(w, "in_channels", None)) == c
                    and (isinstance(w, nn.Linear) or w.kernel_size == (1, 1))]
            widths = [getattr(w, "out_features", getattr(w, "out_channels", None)) for w in outs]
            assert widths == [expected], (
                f"for C={c}, r={r}, L={floor} expected W to map {c} -> d = max({c} // {r}, {floor}) = "
                f"{expected}, found layers reading {c} values with outputs {widths}")
            found.append(f"C={c}, r={r}, L={floor}: d={expected}")
        return "; ".join(found)

    report.run("d = max(C // r, L)", hidden_width)

    def structure():
        built["parts"] = _find_parts(student, channels, branches, hidden)
        return f"{branches} 3x3 branches, W: {channels} -> {hidden}, A: {hidden} -> {branches} x {channels}"

    if not report.run("layers: M 3x3 convolutions, W: C -> d, A: d -> M*C", structure):
        return report
    parts = built["parts"]

    def dilations():
        got = [(conv.dilation, conv.padding) for conv in parts["convs"]]
        want = [((m, m), (m, m)) for m in range(1, branches + 1)]
        assert got == want, (
            f"expected branch m to have dilation m and padding m, i.e. (dilation, padding) = "
            f"{[(w[0][0], w[1][0]) for w in want]}, got {[(g[0][0], g[1][0]) for g in got]}")
        return "dilations " + ", ".join(str(m) for m in range(1, branches + 1))

    report.run("branch m is dilated by m", dilations)

    def batch_norms():
        assert parts["fuse_norm"] is not None, \
            f"the fuse step has no batch norm: expected z = ReLU(BN(W s)) with a BatchNorm of {hidden} features"
        return f"{branches} in the split, 1 in the fuse step"

    report.run("batch norms after each branch and on z", batch_norms)

    ref = _randomised_reference(channels, branches, reduction, min_dim, seed=0)
    copied = report.run("reference weights copied in", lambda: _copy_weights(parts, ref) or "by layer role")
    x = torch.randn(4, channels, 7, 6, generator=torch.Generator().manual_seed(1))

    def output(training: bool):
        def check():
            student.train(training)
            before = {k: v.clone() for k, v in student.state_dict().items()}
            with torch.no_grad():
                y = student(x.clone())
            student.load_state_dict(before)  # training mode updates running stats: undo
            assert isinstance(y, torch.Tensor), f"expected forward to return a tensor, got {type(y).__name__}"
            assert y.shape == x.shape, f"expected V of shape {list(x.shape)}, got {list(y.shape)}"
            expected = _reference_forward(ref, x, training)
            diff = (y.double() - expected).abs().max().item()
            assert torch.allclose(y.double(), expected, rtol=1e-4, atol=1e-5), (
                f"V differs from the reference (max abs difference {diff:.3g})"
                + _diagnose_sk(ref, x, y, training))
            return f"matches (max abs difference {diff:.1e})"
        return check

    if copied:
        report.run("same output as the reference (eval mode)", output(False))
        report.run("same output as the reference (training mode)", output(True))

    def silent():
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer), torch.no_grad():
            student.eval()(x.clone())
        assert buffer.getvalue() == "", \
            f"forward printed {buffer.getvalue()[:60]!r}: remove debug prints (they run on every step)"
        return ""

    report.run("forward prints nothing", silent)

    def gradients():
        student.train()
        student.zero_grad(set_to_none=True)
        student(x.clone()).square().mean().backward()
        missing = [name for name, p in student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, f"no gradient reaches {missing}: is every layer used in forward?"
        return f"all {sum(1 for _ in student.parameters())} parameter tensors"

    report.run("gradients reach every parameter", gradients)
    return report


validate_checkers(globals())
