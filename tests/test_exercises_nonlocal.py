"""The non-local chapter's checkers pass correct answers and name the usual mistakes in wrong ones."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attn_lib.exercises.non_local import (check_dot_form, check_embedded_gaussian_block,
                                          check_map_memory, map_mib)
from attn_lib.results import load


def failed(report) -> dict[str, str]:
    return {name: detail for name, ok, detail in report.checks if not ok}


# ----------------------------------------------------------------------------- the block
def make_block(mistake: str = ""):
    """A from-scratch embedded-gaussian block, correct unless ``mistake`` names a bug."""

    class StudentNonLocal(nn.Module):
        def __init__(self, channels: int):
            super().__init__()
            d = channels // 2
            self.theta, self.phi, self.g = (nn.Conv2d(channels, d, 1) for _ in range(3))
            self.w_z = nn.Conv2d(d, channels, 1)
            self.bn = nn.BatchNorm2d(channels)
            if mistake != "bn not zeroed":
                nn.init.zeros_(self.bn.weight)
                nn.init.zeros_(self.bn.bias)

        def forward(self, x):
            b, c, h, w = x.shape
            if mistake == "seed view":  # the widely copied reshape with the input's C
                theta = self.theta(x).view(b, c, -1).transpose(1, 2)
                phi = self.phi(x).view(b, c, -1)
                g = self.g(x).view(b, c, -1).transpose(1, 2)
            else:
                theta = self.theta(x).flatten(2).transpose(1, 2)  # [B, N, d]
                phi = self.phi(x).flatten(2)  # [B, d, N]
                g = self.g(x).flatten(2).transpose(1, 2)  # [B, N, d]
            f = theta @ phi
            if mistake == "scaled":
                f = f / math.sqrt(theta.shape[-1])
            weights = torch.softmax(f, dim=1 if mistake == "queries" else -1)
            if mistake == "no softmax":
                weights = f / f.shape[-1]
            y = (weights @ g).transpose(1, 2).reshape(b, -1, h, w)
            z = self.bn(self.w_z(y))
            return (z if mistake == "no residual" else z + x), weights

    return StudentNonLocal


def test_block_checker_passes_a_correct_block():
    report = check_embedded_gaussian_block(make_block())
    assert report.passed, str(report)
    assert len(report.checks) == 7


@pytest.mark.parametrize("mistake, expected", [
    ("queries", "softmax runs over the queries"),
    ("no softmax", "there is no softmax"),
    ("scaled", "USE_SCALE"),
    ("no residual", "z = W_z y + x"),
    ("bn not zeroed", "start at 0"),
    ("seed view", "RuntimeError"),
])
def test_block_checker_names_the_mistake(mistake, expected):
    report = check_embedded_gaussian_block(make_block(mistake))
    assert not report.passed
    assert expected in " ".join(failed(report).values()), str(report)


def test_block_checker_reports_missing_layers_and_stubs():
    class Wrong(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.query = nn.Conv2d(channels, channels // 2, 1)

    report = check_embedded_gaussian_block(Wrong)
    assert "expected an attribute 'theta'" in " ".join(failed(report).values())

    class Stub(nn.Module):
        def __init__(self, channels):
            super().__init__()
            raise NotImplementedError("build θ, φ, g")

    report = check_embedded_gaussian_block(Stub)
    assert not report.passed and "not implemented yet" in str(report)


# ----------------------------------------------------------------------------- memory
def test_map_mib_matches_the_recorded_benchmark_rows():
    """The helper is the formula the benchmark records as attention_map_mib."""
    rows = [r for r in load("bench-modules-gpu")["rows"] if r["kind"] == "explicit_vs_fused"]
    assert rows
    for row in rows:
        assert math.isclose(map_mib(row["size"], row["batch"]), row["attention_map_mib"])


def test_memory_checker_passes_the_formula():
    def attention_map_mib(size, batch=8, bytes_per_value=4, sub_sample=False):
        n = size**2
        n_keys = (size // 2) ** 2 if sub_sample else n
        return batch * n * n_keys * bytes_per_value / 2**20

    report = check_map_memory(attention_map_mib)
    assert report.passed, str(report)


@pytest.mark.parametrize("wrong, expected", [
    (lambda s, b=8, k=4, sub=False: b * s * s * k / 2**20, "grows like S⁴"),
    (lambda s, b=8, k=4, sub=False: (s * s) ** 2 * k / 2**20, "multiply by the batch"),
    (lambda s, b=8, k=4, sub=False: b * (s * s) ** 2 / 2**20, "multiply by bytes_per_value"),
    (lambda s, b=8, k=4, sub=False: b * (s * s) ** 2 * k / 2**20, "ignore sub_sample"),
    (lambda s, b=8, k=4, sub=False: map_mib(s, b, k, sub) * 2**20 / 1e6, "2²⁰"),
])
def test_memory_checker_names_the_mistake(wrong, expected):
    report = check_map_memory(wrong)
    assert not report.passed
    assert expected in " ".join(failed(report).values()), str(report)


# ----------------------------------------------------------------------------- the dot form
def reassociated(theta, phi, g):
    return theta @ (phi.transpose(1, 2) @ g) / phi.shape[1]


def test_dot_checker_passes_the_reassociated_form():
    report = check_dot_form(reassociated)
    assert report.passed, str(report)


def test_dot_checker_accepts_the_explicit_values_but_not_the_n_by_n_map():
    report = check_dot_form(lambda t, p, g: (t @ p.transpose(1, 2) / p.shape[1]) @ g)
    assert [ok for _, ok, _ in report.checks] == [True, True, False]
    assert "compute φᵀg first" in str(report)


@pytest.mark.parametrize("wrong, expected", [
    (lambda t, p, g: t @ (p.transpose(1, 2) @ g) / t.shape[1], "number of keys"),
    (lambda t, p, g: t @ (p.transpose(1, 2) @ g), "no normaliser"),
    (lambda t, p, g: ((t @ p.transpose(1, 2)) / (t @ p.transpose(1, 2)).sum(-1, keepdim=True)) @ g,
     "as a softmax would"),
    (lambda t, p, g: torch.softmax(t @ p.transpose(1, 2), -1) @ g, "embedded gaussian"),
    (lambda t, p, g: reassociated(t, p, g) / math.sqrt(t.shape[-1]), "never scaled"),
])
def test_dot_checker_names_the_mistake(wrong, expected):
    report = check_dot_form(wrong)
    assert not report.passed
    assert expected in " ".join(failed(report).values()), str(report)
