"""The SE chapter's checkers pass correct solutions and name the mistakes in wrong ones."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_lib.exercises.se import check_eca_kernel_size, check_squeeze_excitation
from attn_lib.modules.se import SqueezeExcitation


# ----------------------------------------------------------------------------- correct SE blocks
class LinearSE(nn.Module):
    def __init__(self, channels, reduction=16, bias=True):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"reduction {reduction} leaves no hidden unit for {channels} channels")
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def gate(self, x):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))[:, :, None, None]

    def forward(self, x):
        return x * self.gate(x)


class LinearSENoBias(LinearSE):
    def __init__(self, channels, reduction=16):
        super().__init__(channels, reduction, bias=False)


class ConvSE(nn.Module):
    """1x1 convolutions on [B, C, 1, 1], a floor of one hidden unit, W2 registered first."""

    def __init__(self, channels, reduction=16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.expand = nn.Conv2d(hidden, channels, 1)
        self.reduce = nn.Conv2d(channels, hidden, 1)

    def forward(self, x):
        s = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * s


@pytest.mark.parametrize("cls", [LinearSE, LinearSENoBias, ConvSE, SqueezeExcitation])
def test_correct_se_passes(cls):
    report = check_squeeze_excitation(cls)
    assert report.passed, str(report)


def test_dropped_bias_passes_with_a_note():
    report = check_squeeze_excitation(LinearSENoBias)
    detail = dict((name, d) for name, _, d in report.checks)["biases"]
    assert "no bias in W1 and W2" in detail and "original SENet" in detail


def test_guard_by_floor_is_reported():
    report = check_squeeze_excitation(ConvSE)
    detail = dict((name, d) for name, _, d in report.checks)["C < r: raises, or keeps at least one hidden unit"]
    assert "keeps 1 hidden unit" in detail


# ----------------------------------------------------------------------------- wrong SE blocks
def _variant(gate_fn=None, out_fn=None, squeeze=None, relu=True, hidden_fn=None):
    class Wrong(LinearSE):
        def __init__(self, channels, reduction=16):
            nn.Module.__init__(self)
            hidden = hidden_fn(channels, reduction) if hidden_fn else channels // reduction
            self.fc1 = nn.Linear(channels, hidden)
            self.fc2 = nn.Linear(hidden, channels)

        def forward(self, x):
            z = squeeze(x) if squeeze else x.mean(dim=(2, 3))
            h = self.fc1(z)
            h = F.relu(h) if relu else h
            logits = self.fc2(h)
            s = (gate_fn or torch.sigmoid)(logits)[:, :, None, None]
            return out_fn(x, s) if out_fn else x * s
    return Wrong


def _failed(report):
    return {name: detail for name, ok, detail in report.checks if not ok}


@pytest.mark.parametrize("wrong, check, phrase", [
    (_variant(gate_fn=lambda t: t), "gates s in (0, 1)", "no sigmoid"),
    (_variant(gate_fn=lambda t: torch.softmax(t, dim=1)), "output equals attn_lib's SqueezeExcitation with the same weights", "softmax"),
    (_variant(relu=False), "output equals attn_lib's SqueezeExcitation with the same weights", "no ReLU"),
    (_variant(squeeze=lambda x: x.amax(dim=(2, 3))), "output equals attn_lib's SqueezeExcitation with the same weights", "max pooling"),
    (_variant(squeeze=lambda x: x.sum(dim=(2, 3))), "output equals attn_lib's SqueezeExcitation with the same weights", "sum instead of a mean"),
    (_variant(out_fn=lambda x, s: x + s), "y == x * s: one gate per channel", "added"),
    (_variant(out_fn=lambda x, s: s.expand_as(x)), "y == x * s: one gate per channel", "gated input"),
])
def test_wrong_se_is_caught_and_named(wrong, check, phrase):
    report = check_squeeze_excitation(wrong)
    assert not report.passed
    failed = _failed(report)
    assert check in failed, str(report)
    assert phrase in failed[check], str(report)


def test_returning_the_gate_is_caught_by_the_shape():
    report = check_squeeze_excitation(_variant(out_fn=lambda x, s: s))
    failed = _failed(report)
    assert "did you return the gate s instead of x * s?" in failed["output keeps the input's shape"]


def test_no_floor_on_the_hidden_width_is_caught():
    # the seed's C // 16 with no guard: 8 // 16 == 0 builds an empty layer and a constant gate
    report = check_squeeze_excitation(_variant(hidden_fn=lambda c, r: c // r))
    failed = _failed(report)
    assert list(failed) == ["C < r: raises, or keeps at least one hidden unit"], str(report)
    assert "0 hidden units" in failed["C < r: raises, or keeps at least one hidden unit"]


def test_wrong_layer_shapes_are_caught():
    report = check_squeeze_excitation(_variant(hidden_fn=lambda c, r: c * r))  # expands instead of reducing
    failed = _failed(report)
    assert "expected W1: 32 -> 4" in failed["two fully connected layers 32 -> 4 -> 32"]


def test_spatial_convolution_is_caught():
    class ConvGate(nn.Module):
        def __init__(self, channels, reduction=16):
            super().__init__()
            self.fc1 = nn.Conv2d(channels, channels // reduction, 3, padding=1)
            self.fc2 = nn.Conv2d(channels // reduction, channels, 3, padding=1)

        def forward(self, x):
            return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x))))

    failed = _failed(check_squeeze_excitation(ConvGate))
    assert "SE has no spatial convolution" in failed["two fully connected layers 32 -> 4 -> 32"]


def test_not_implemented_stub_is_reported_not_raised():
    class Stub(nn.Module):
        def __init__(self, channels, reduction=16):
            raise NotImplementedError("build W1 and W2")

    report = check_squeeze_excitation(Stub)
    assert not report.passed
    assert "not implemented yet: build W1 and W2" in str(report)


def test_a_forward_that_crashes_is_reported_not_raised():
    report = check_squeeze_excitation(_variant(squeeze=lambda x: x.mean(dim=1)))  # pools over channels
    assert not report.passed
    assert "RuntimeError" in str(report) or "expected" in str(report)


# ----------------------------------------------------------------------------- ECA kernel size
def eca_correct(channels, gamma=2, b=1):
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def test_correct_kernel_size_passes():
    report = check_eca_kernel_size(eca_correct)
    assert report.passed, str(report)


@pytest.mark.parametrize("wrong, check, phrase", [
    # even results kept: C = 128 gives t = 4
    (lambda c, gamma=2, b=1: int((math.log2(c) + b) / gamma), "the rule at a ResNet-18's stages (64-512 channels)", "k must be odd"),
    # an even t rounded down to the odd number below
    (lambda c, gamma=2, b=1: (lambda t: t if t % 2 else t - 1)(int((math.log2(c) + b) / gamma)),
     "the rule at a ResNet-18's stages (64-512 channels)", "goes up to the next odd number"),
    # rounding t instead of truncating it: 64 channels give round(3.5) = 4 -> 5
    (lambda c, gamma=2, b=1: (lambda t: t if t % 2 else t + 1)(round((math.log2(c) + b) / gamma)),
     "the rule at a ResNet-18's stages (64-512 channels)", "do not round it"),
    # the natural logarithm
    (lambda c, gamma=2, b=1: (lambda t: t if t % 2 else t + 1)(int((math.log(c) + b) / gamma)),
     "the rule at a ResNet-18's stages (64-512 channels)", "expected"),
    # gamma and b ignored (hard-coded)
    (lambda c, gamma=2, b=1: eca_correct(c), "uses gamma and b", "expected"),
    # the official code's k = 3 everywhere
    (lambda c, gamma=2, b=1: 3, "the rule at a ResNet-18's stages (64-512 channels)", "C = 128: expected 5, got 3"),
])
def test_wrong_kernel_size_is_caught(wrong, check, phrase):
    report = check_eca_kernel_size(wrong)
    assert not report.passed
    failed = _failed(report)
    assert check in failed, str(report)
    assert phrase in failed[check], str(report)


def test_float_kernel_size_is_caught():
    report = check_eca_kernel_size(lambda c, gamma=2, b=1: float(eca_correct(c, gamma, b)))
    assert "expected an int" in _failed(report)["returns an int"]


def test_kernel_size_without_gamma_and_b_arguments_is_caught():
    report = check_eca_kernel_size(lambda c: eca_correct(c))
    assert "accept gamma and b" in _failed(report)["uses gamma and b"]
