"""Checkers for the exercises of the DIA-LSTM chapter (``notebooks/07_dia``).

    from attn_lib.exercises import dia
    report = dia.check_dia_cell(StudentCell)              # the modified LSTM cell
    report = dia.check_parameter_counts(count)            # shared vs one module per block
    report = dia.check_zero_state({"a", "c"})             # why the state starts at zero per stage

:func:`check_dia_cell` copies the weights of :class:`attn_lib.modules.dia.DIALSTMCell` into the
student's four ``nn.Linear`` layers and compares ``(h, c)``; when they differ it recomputes the
reference with the usual mistakes (``tanh`` on the output as in a plain LSTM, the gates taken in
another order, no ReLU in the bottlenecks, no forget path, ...) and names the one the student's
output matches. :func:`check_parameter_counts` compares a counting function with modules actually
built. :func:`check_zero_state` marks a choice among :data:`ZERO_STATE_STATEMENTS`. All return a
:class:`~attn_lib.exercises.report.Report` and never raise because the student's answer is wrong.
"""
from __future__ import annotations

import numbers
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..modules.dia import DIALSTMCell
from .report import Report, compare

__all__ = ["ZERO_STATE_STATEMENTS", "check_dia_cell", "check_parameter_counts", "check_zero_state"]

RTOL, ATOL = 1e-4, 1e-5


# ----------------------------------------------------------------------------- the cell
def _reference(ref: DIALSTMCell, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
               mistake: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of ``ref`` written out, or what it gives with one of the usual mistakes."""
    act = (lambda t: t) if mistake == "no relu" else F.relu

    def bottleneck(seq: nn.Sequential, v: torch.Tensor) -> torch.Tensor:
        return seq[2](act(seq[0](v)))

    gates = bottleneck(ref.w_ih, x) + (0 if mistake == "no hidden input" else bottleneck(ref.w_hh, h))
    order = "ifog" if mistake == "order ifog" else "ifgo"
    parts = dict(zip(order, gates.chunk(4, dim=1)))
    i, f, o = torch.sigmoid(parts["i"]), torch.sigmoid(parts["f"]), torch.sigmoid(parts["o"])
    g = torch.sigmoid(parts["g"]) if mistake == "sigmoid candidate" else torch.tanh(parts["g"])
    c_new = i * g if mistake == "no forget path" else f * c + i * g
    h_new = o * torch.tanh(c_new) if mistake == "tanh output" else o * torch.sigmoid(c_new)
    return h_new, c_new


_CELL_MISTAKES = {
    "tanh output": "h = o * tanh(c), the plain LSTM's output; DIA uses sigmoid(c) so that h is a "
                   "gate in (0, 1)",
    "order ifog": "the four gates taken in the order i, f, o, g; attn_lib and the official code "
                  "chunk the 4C pre-activations as i, f, g, o",
    "no relu": "no ReLU between the two layers of a bottleneck (C -> C/r -> 4C)",
    "sigmoid candidate": "a sigmoid on the candidate g where the LSTM has tanh (g must be able to "
                         "lower the cell state)",
    "no forget path": "c = i * g: the previous cell state (f * c) is dropped",
    "no hidden input": "the hidden-to-hidden bottleneck W_hh(h) left out of the gates",
}


def _diagnose_cell(ref: DIALSTMCell, x, h, c, got: tuple[torch.Tensor, torch.Tensor]) -> str:
    for mistake, why in _CELL_MISTAKES.items():
        wrong = _reference(ref, x, h, c, mistake)
        if all(g.shape == w.shape and torch.allclose(g.double(), w.double(), rtol=RTOL, atol=ATOL)
               for g, w in zip(got, wrong)):
            return f"; your cell matches DIA with {why}"
    return ""


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _as_state(out, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    assert isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out), (
        f"{what}: expected forward to return the new state (h, c), two tensors, got "
        f"{type(out).__name__}" + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    return out[0], out[1]


def check_dia_cell(cls: Callable[..., nn.Module], channels: int = 32, reduction: int = 4) -> Report:
    """Check a DIA-LSTM cell ``cls(channels, reduction)`` against :class:`DIALSTMCell`.

    The student's cell has ``forward(x, state=None) -> (h, c)`` with ``x: [B, C]`` and
    ``state = (h, c)`` (each ``[B, C]``) or ``None`` for the zero state, and four ``nn.Linear``
    layers registered in this order: the input bottleneck ``C -> C/r`` and ``C/r -> 4C``, then the
    hidden bottleneck ``C -> C/r`` and ``C/r -> 4C`` (with biases, as in the official code). The
    4C pre-activations are read as the gates i, f, g, o. Checks: it builds; the four layers;
    ``(h, c)`` of shape ``[B, C]``; ``h`` in (0, 1); equal to the reference from the zero state and
    from a given state; the zero state follows the input's dtype (float64).
    """
    C, r = channels, reduction
    hidden = C // r
    report = Report(f"DIA-LSTM cell: h = o * sigmoid(c), bottlenecks {C} -> {hidden} -> {4 * C}")
    got: dict = {}

    def builds():
        got["cell"] = cls(C, r)
        assert isinstance(got["cell"], nn.Module), f"expected an nn.Module, got {type(got['cell']).__name__}"
        return f"{cls.__name__}({C}, {r})"

    if not report.run(f"builds with (channels={C}, reduction={r})", builds):
        return report
    student = got["cell"]

    def four_layers():
        layers = _linears(student)
        shapes = [(m.in_features, m.out_features) for m in layers]
        want = [(C, hidden), (hidden, 4 * C)] * 2
        assert shapes == want, (
            f"expected four nn.Linear layers, in order {C} -> {hidden}, {hidden} -> {4 * C} (input "
            f"bottleneck) then {C} -> {hidden}, {hidden} -> {4 * C} (hidden bottleneck); got "
            + (", ".join(f"{a} -> {b}" for a, b in shapes) or "none")
            + (" (a plain LSTM maps C -> 4C in one layer; DIA puts a C/r bottleneck in between)"
               if (C, 4 * C) in shapes else ""))
        missing = [k for k, m in enumerate(layers) if m.bias is None]
        assert not missing, f"expected biases in every layer (as in attn_lib and the official code); " \
                            f"layers {missing} have none"
        got["layers"] = layers
        return ", ".join(f"{a} -> {b}" for a, b in shapes)

    if not report.run("four bottleneck layers", four_layers):
        return report

    torch.manual_seed(0)
    ref = DIALSTMCell(C, r).eval()
    sources = [ref.w_ih[0], ref.w_ih[2], ref.w_hh[0], ref.w_hh[2]]
    with torch.no_grad():
        for mine, theirs in zip(got["layers"], sources):
            mine.weight.copy_(theirs.weight)
            mine.bias.copy_(theirs.bias)
    student.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, C, generator=g)
    h0 = torch.rand(3, C, generator=g)
    c0 = 2 * torch.randn(3, C, generator=g)
    zeros = torch.zeros(3, C)

    def returns_state():
        with torch.no_grad():
            h, c = _as_state(student(x), "cell(x)")
        assert h.shape == c.shape == (3, C), f"expected h and c of shape [3, {C}], got " \
                                             f"{list(h.shape)} and {list(c.shape)}"
        got["zero"] = (h, c)
        return f"cell(x) with x [3, {C}] -> h, c [3, {C}]"

    if not report.run("returns (h, c), each [B, C]", returns_state):
        return report

    def unit_interval():
        with torch.no_grad():
            h, _ = _as_state(student(x, (h0, c0)), "cell(x, (h, c))")
        lo, hi = h.min().item(), h.max().item()
        assert lo > 0 and hi < 1, f"expected h in (0, 1) (it gates the channels), got values from " \
                                  f"{lo:.3g} to {hi:.3g}" + _diagnose_cell(ref, x, h0, c0, (h, _))
        return f"h from {lo:.3f} to {hi:.3f}"

    report.run("h is a gate in (0, 1)", unit_interval)

    def both_match(out, expected, h, c):
        try:
            for a, b, name in zip(out, expected, "hc"):
                compare(a, b, name, RTOL, ATOL)
        except AssertionError as err:
            raise AssertionError(str(err) + _diagnose_cell(ref, x, h, c, out)) from None
        diff = max((a.double() - b.double()).abs().max().item() for a, b in zip(out, expected))
        return f"h and c match (max abs difference {diff:.1e})"

    def matches_from_zero():
        return both_match(got["zero"], _reference(ref, x, zeros, zeros), zeros, zeros)

    report.run("equals attn_lib's cell, zero state", matches_from_zero)

    def matches_with_state():
        with torch.no_grad():
            out = _as_state(student(x, (h0, c0)), "cell(x, (h, c))")
        return both_match(out, _reference(ref, x, h0, c0), h0, c0)

    report.run("equals attn_lib's cell, given state", matches_with_state)

    def zero_state_dtype():
        cell64 = student.double()
        try:
            with torch.no_grad():
                h, c = _as_state(cell64(x.double()), "cell(x) in float64")
        except RuntimeError as err:
            raise AssertionError(
                f"in float64 the cell fails ({str(err).splitlines()[0]}): make the zero state with the "
                f"input's dtype and device, e.g. x.new_zeros(x.shape), not torch.zeros(...)") from None
        finally:
            student.float()
        assert h.dtype == c.dtype == torch.float64, \
            f"expected a float64 state from a float64 input, got {h.dtype} and {c.dtype}"
        return "a float64 input gives a float64 state"

    report.run("the zero state follows the input's dtype", zero_state_dtype)
    return report


# ----------------------------------------------------------------------------- parameter counts
def _cell_parameters(channels: int, reduction: int) -> int:
    return sum(p.numel() for p in DIALSTMCell(channels, reduction).parameters())


def _count_hints(channels: Sequence[int], blocks: Sequence[int], reduction: int, got) -> str:
    """Name the usual slips when ``got`` equals one of them."""
    def total(per_cell, per_block: bool) -> int:
        return sum(per_cell(c) * (n if per_block else 1) for c, n in zip(channels, blocks))

    def no_bias(c):
        return 2 * (c * (c // reduction) + (c // reduction) * 4 * c)

    def one_bottleneck(c):
        return _cell_parameters(c, reduction) // 2

    def plain_lstm(c):
        return 2 * (c * 4 * c + 4 * c)

    slips = {
        "without the biases (each bottleneck has two)": no_bias,
        "with one bottleneck only (the cell has two: W_ih for the input, W_hh for the hidden state)":
            one_bottleneck,
        "for a plain LSTM cell (C -> 4C maps, no bottleneck)": plain_lstm,
    }
    for why, per_cell in slips.items():
        if got in ((total(per_cell, False), total(per_cell, True)),):
            return f"; your counts are those {why}"
    return ""


def check_parameter_counts(fn: Callable[..., tuple[int, int]]) -> Report:
    """Check ``fn(channels, blocks, reduction=4) -> (shared, per_block)``.

    ``channels[k]`` is the width of stage ``k`` and ``blocks[k]`` its number of blocks; ``shared``
    is the number of parameters DIA adds with one :class:`DIALSTMCell` per stage, ``per_block``
    what the same cells would add with one per block. Compared with cells actually built, for
    ResNet-18 (full width and width 16), the official CIFAR ResNet-164 and another ratio.
    """
    report = Report("DIA parameters: one cell per stage vs one per block")
    cases = [
        ("ResNet-18", (64, 128, 256, 512), (2, 2, 2, 2), 4),
        ("ResNet-18, width 16", (16, 32, 64, 128), (2, 2, 2, 2), 4),
        ("ResNet-164 (Bottleneck, CIFAR)", (64, 128, 256), (18, 18, 18), 4),
        ("ResNet-164 (Bottleneck, CIFAR)", (64, 128, 256), (18, 18, 18), 8),
    ]
    for label, channels, blocks, reduction in cases:
        def check(channels=channels, blocks=blocks, reduction=reduction):
            out = fn(list(channels), list(blocks), reduction=reduction)
            assert isinstance(out, (tuple, list)) and len(out) == 2 and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in out), \
                f"expected a pair of ints (shared, per_block), got {out!r}"
            want = (sum(_cell_parameters(c, reduction) for c in channels),
                    sum(n * _cell_parameters(c, reduction) for c, n in zip(channels, blocks)))
            got = (int(out[0]), int(out[1]))
            wrong = [f"{name}: expected {w:,}, got {g:,}" for name, w, g in zip(("shared", "per_block"), want, got)
                     if w != g]
            hint = _count_hints(channels, blocks, reduction, got)
            if not hint and got[0] == want[0] and got[1] != want[1]:
                hint = "; per_block has one cell in *every* block of a stage"
            assert not wrong, "; ".join(wrong) + hint
            return f"shared {want[0]:,}, per block {want[1]:,} ({want[1] / want[0]:.1f}x)"

        report.run(f"{label}, r = {reduction}", check)
    return report


# ----------------------------------------------------------------------------- the zero state
#: Statements about why ``(h, c)`` starts at zero at the first block of every stage (and is not
#: carried over from the previous stage or the previous batch). Letter -> (statement, true?, why).
ZERO_STATE_STATEMENTS: dict[str, tuple[str, bool, str]] = {
    "a": ("The stages have different widths (64, 128, 256, 512 channels in ResNet-18), so the last "
          "state of a stage does not even have the size the next stage's cell expects.", True,
          "h and c have one entry per channel of their stage; the widths double from stage to stage"),
    "b": ("Each stage has its own cell with its own weights; a state made by another cell would not "
          "mean to it what its own states mean.", True,
          "the cell of stage 2 never saw, in training, a state written by the cell of stage 1"),
    "c": ("Carrying the state over from the previous batch would make an image's prediction depend on "
          "which images were seen before it, so evaluation would change with the order of the data.", True,
          "the state is per image and per forward pass: two calls on the same image must agree"),
    "d": ("Starting from zero makes the first block's gate exactly 0.5 for every channel.", False,
          "with h_0 = c_0 = 0 the first gate is sigmoid(o_1) * sigmoid(c_1) with c_1 = i_1 * g_1, "
          "all computed from the first block's pooled branch: it depends on the image"),
    "e": ("With a zero state, the hidden-to-hidden bottleneck contributes only a constant (its biases) "
          "to the first block's gates.", True,
          "W_hh(0) = W2 relu(b1) + b2, the same for every image"),
    "f": ("The zero state is what lets gradients flow from one stage to the next.", False,
          "gradients flow between stages through the feature maps, whatever the initial state"),
}


def check_zero_state(answer: Iterable[str] | str) -> Report:
    """Mark a choice of the true statements among :data:`ZERO_STATE_STATEMENTS`.

    ``answer``: the letters chosen, as a set, a list or a string (``{"a", "c"}``, ``"ac"``).
    Each statement is a check: chosen and true, or left out and false, passes.
    """
    report = Report("Why the DIA state starts at zero in every stage")
    letters = set(ZERO_STATE_STATEMENTS)

    def valid():
        chosen = {str(a).strip().lower() for a in answer if str(a).strip()} if not isinstance(answer, str) \
            else {ch.lower() for ch in answer if ch.isalnum()}
        unknown = sorted(chosen - letters)
        assert not unknown, f"unknown letters {unknown}; choose among {', '.join(sorted(letters))}"
        assert chosen, "choose at least one letter"
        report_state["chosen"] = chosen
        return "chose " + ", ".join(sorted(chosen))

    report_state: dict = {}
    try:
        iter(answer)
    except TypeError:
        report.add("an answer of letters", False, f"expected letters such as {{'a', 'c'}} or 'ac', "
                                                  f"got {type(answer).__name__}")
        return report
    if not report.run("an answer of letters", valid):
        return report
    chosen = report_state["chosen"]
    for letter, (statement, true, why) in ZERO_STATE_STATEMENTS.items():
        picked = letter in chosen
        short = statement if len(statement) <= 50 else statement[:47] + "..."
        if picked == true:
            report.add(f"({letter}) {short}", True, "true" if true else "false, and left out")
        else:
            report.add(f"({letter}) {short}", False,
                       ("true, but not chosen: " if true else "chosen, but false: ") + why)
    return report
