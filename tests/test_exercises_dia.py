"""The DIA chapter's checkers pass correct answers and name the mistakes in wrong ones."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_lib.exercises.dia import (ZERO_STATE_STATEMENTS, check_dia_cell, check_parameter_counts,
                                    check_zero_state)
from attn_lib.modules.dia import DIALSTMCell


# ----------------------------------------------------------------------------- the cell
class Cell(nn.Module):
    """A correct DIA-LSTM cell, written without attn_lib; ``mistake`` switches one slip on."""

    mistake = None

    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = channels // reduction
        self.ih1, self.ih2 = nn.Linear(channels, hidden), nn.Linear(hidden, 4 * channels)
        self.hh1, self.hh2 = nn.Linear(channels, hidden), nn.Linear(hidden, 4 * channels)

    def forward(self, x, state=None):
        if state is None:
            zeros = torch.zeros(x.shape) if self.mistake == "torch.zeros" else x.new_zeros(x.shape)
            state = (zeros, zeros)
        h, c = state
        act = (lambda t: t) if self.mistake == "no relu" else F.relu
        gates = self.ih2(act(self.ih1(x))) + self.hh2(act(self.hh1(h)))
        i, f, g, o = gates.chunk(4, dim=1)
        if self.mistake == "order ifog":
            i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        squash = torch.tanh if self.mistake == "tanh output" else torch.sigmoid
        return torch.sigmoid(o) * squash(c), c


def with_mistake(name):
    return type(f"Cell_{name.replace(' ', '_').replace('.', '_')}", (Cell,), {"mistake": name})


def failed(report):
    return {name: detail for name, ok, detail in report.checks if not ok}


@pytest.mark.parametrize("cls", [Cell, DIALSTMCell])
def test_correct_cell_passes(cls):
    report = check_dia_cell(cls)
    assert report.passed, str(report)


@pytest.mark.parametrize("mistake, message", [
    ("tanh output", "h = o * tanh(c)"),
    ("order ifog", "order i, f, o, g"),
    ("no relu", "no ReLU between the two layers"),
])
def test_wrong_cell_is_named(mistake, message):
    report = check_dia_cell(with_mistake(mistake))
    assert not report.passed
    assert any(message in detail for detail in failed(report).values()), str(report)


def test_tanh_output_fails_the_unit_interval():
    assert "h is a gate in (0, 1)" in failed(check_dia_cell(with_mistake("tanh output")))


def test_cpu_float32_zero_state_is_caught():
    report = check_dia_cell(with_mistake("torch.zeros"))
    assert list(failed(report)) == ["the zero state follows the input's dtype"], str(report)
    assert "new_zeros" in failed(report)["the zero state follows the input's dtype"]


def test_plain_lstm_layers_are_named():
    class PlainLSTM(nn.Module):
        def __init__(self, channels, reduction=4):
            super().__init__()
            self.ih, self.hh = nn.Linear(channels, 4 * channels), nn.Linear(channels, 4 * channels)

    report = check_dia_cell(PlainLSTM)
    assert "a plain LSTM maps C -> 4C" in failed(report)["four bottleneck layers"]


def test_stub_is_reported_not_raised():
    class Stub(nn.Module):
        def __init__(self, channels, reduction=4):
            raise NotImplementedError("build the two bottlenecks")

    report = check_dia_cell(Stub)
    assert not report.passed and "not implemented yet" in str(report)


# ----------------------------------------------------------------------------- parameter counts
def count(channels, blocks, reduction=4):
    def cell(c):
        hidden = c // reduction
        return 2 * (c * hidden + hidden + hidden * 4 * c + 4 * c)

    return sum(cell(c) for c in channels), sum(n * cell(c) for c, n in zip(channels, blocks))


def test_correct_counts_pass():
    report = check_parameter_counts(count)
    assert report.passed, str(report)
    assert "shared 878,560" in str(report)


def test_counts_without_biases_are_named():
    def no_bias(channels, blocks, reduction=4):
        def cell(c):
            return 2 * (c * (c // reduction) + (c // reduction) * 4 * c)
        return sum(cell(c) for c in channels), sum(n * cell(c) for c, n in zip(channels, blocks))

    report = check_parameter_counts(no_bias)
    assert not report.passed and "without the biases" in str(report)


def test_per_block_forgotten_is_named():
    report = check_parameter_counts(lambda ch, bl, reduction=4: (count(ch, bl, reduction)[0],) * 2)
    assert not report.passed and "one cell in *every* block" in str(report)


def test_counts_must_be_ints():
    report = check_parameter_counts(lambda ch, bl, reduction=4: 3.5)
    assert not report.passed and "expected a pair of ints" in str(report)


# ----------------------------------------------------------------------------- the zero state
TRUE = {k for k, (_, true, _) in ZERO_STATE_STATEMENTS.items() if true}


@pytest.mark.parametrize("answer", [TRUE, sorted(TRUE), "".join(sorted(TRUE)).upper()])
def test_right_statements_pass(answer):
    report = check_zero_state(answer)
    assert report.passed, str(report)


def test_wrong_statements_are_explained():
    wrong = (TRUE - {"a"}) | {"d"}
    report = check_zero_state(wrong)
    bad = failed(report)
    assert len(bad) == 2
    assert any("true, but not chosen" in d for d in bad.values())
    assert any("chosen, but false" in d and "depends on the image" in d for d in bad.values())


@pytest.mark.parametrize("answer, message", [("", "choose at least one"), ({"z"}, "unknown letters"),
                                             (3, "expected letters")])
def test_bad_answers_are_reported(answer, message):
    report = check_zero_state(answer)
    assert not report.passed and message in str(report)
