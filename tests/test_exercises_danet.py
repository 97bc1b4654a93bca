"""The DANet chapter's checkers pass correct answers and name the usual mistakes in wrong ones."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attn_lib.exercises.danet import check_fused_position, check_map_memory, check_position_attention, map_mib


def failed(report) -> dict[str, str]:
    return {name: detail for name, ok, detail in report.checks if not ok}


# ----------------------------------------------------------------------------- the position module
def make_position(mistake: str = "", names=("query", "key")):
    """A from-scratch position attention module, correct unless ``mistake`` names a bug."""

    class StudentPAM(nn.Module):
        def __init__(self, channels: int, reduction: int = 8):
            super().__init__()
            hidden = channels // reduction
            setattr(self, names[0], nn.Conv2d(channels, hidden, 1))
            setattr(self, names[1], nn.Conv2d(channels, hidden, 1))
            self.value = nn.Conv2d(channels, channels, 1, bias=mistake != "no value bias")
            self.alpha = nn.Parameter(torch.full((1,), 0.1 if mistake == "alpha nonzero" else 0.0))

        def forward(self, x):
            b, c, h, w = x.shape
            n = 15 if mistake == "hard-coded size" else h * w
            q = getattr(self, names[0])(x).reshape(b, -1, n).transpose(1, 2)
            k = getattr(self, names[1])(x).reshape(b, -1, n)
            v = self.value(x).reshape(b, c, n)
            energy = q @ k
            if mistake == "scaled":
                energy = energy / math.sqrt(q.shape[-1])
            s = torch.softmax(energy, dim=1 if mistake == "query axis" else -1)
            context = (v @ s.transpose(1, 2)).reshape(b, c, h, w)  # the paper's D S^T
            if mistake == "no residual":
                return self.alpha * context
            return x + self.alpha * context

    return StudentPAM


@pytest.mark.parametrize("variant", ["", "no value bias"])
def test_position_checker_accepts_a_correct_module(variant):
    report = check_position_attention(make_position(variant))
    assert report.passed, str(report)


def test_position_checker_accepts_query_and_key_named_the_other_way():
    report = check_position_attention(make_position(names=("theta", "phi")))
    assert report.passed, str(report)


def test_position_checker_accepts_the_library_module():
    from attn_lib.modules.danet import PositionAttention

    assert check_position_attention(lambda c, reduction: PositionAttention(c, reduction)).passed


@pytest.mark.parametrize("mistake, expected", [
    ("query axis", "softmax runs over the query positions"),
    ("scaled", "divided by sqrt(C/r)"),
    ("no residual", "input is not added back"),
    ("alpha nonzero", "must start at 0"),
    ("hard-coded size", "x: [1, 32, 4, 4]"),
])
def test_position_checker_names_the_mistake(mistake, expected):
    report = check_position_attention(make_position(mistake))
    assert not report.passed
    details = failed(report)
    assert any(expected in name or expected in detail for name, detail in details.items()), str(report)


def test_position_checker_rejects_a_wrong_layout_and_a_stub():
    class NoValue(nn.Module):
        def __init__(self, channels, reduction=8):
            super().__init__()
            self.query = nn.Conv2d(channels, channels // reduction, 1)
            self.key = nn.Conv2d(channels, channels // reduction, 1)
            self.alpha = nn.Parameter(torch.zeros(1))

    class Stub(nn.Module):
        def __init__(self, channels, reduction=8):
            super().__init__()
            raise NotImplementedError("build it")

    report = check_position_attention(NoValue)
    assert not report.passed and "Conv2d(32, 32, 1) once (value)" in str(report)
    report = check_position_attention(Stub)
    assert not report.passed and "not implemented yet: build it" in str(report)


# ----------------------------------------------------------------------------- memory
def test_memory_checker_accepts_the_formula():
    def predict(size, batch=8, bytes_per_entry=4):
        return batch * (size * size) ** 2 * bytes_per_entry / 2**20

    assert check_map_memory(predict).passed
    assert map_mib(64) == 512.0 and map_mib(128, batch=8) == 8192.0


@pytest.mark.parametrize("wrong, expected", [
    (lambda size, batch=8, bytes_per_entry=4: batch * size**2 * bytes_per_entry / 2**20, "N x N = S^4"),
    (lambda size, batch=8, bytes_per_entry=4: size**4 * bytes_per_entry / 2**20, "batch is missing"),
    (lambda size, batch=8, bytes_per_entry=4: batch * size**4 * bytes_per_entry / 1e6, "not 10^6"),
    (lambda size, batch=8, bytes_per_entry=4: batch * size**4 * bytes_per_entry, "in bytes"),
    (lambda size, batch=8, bytes_per_entry=4: "a lot", "expected a number"),
])
def test_memory_checker_names_the_slip(wrong, expected):
    report = check_map_memory(wrong)
    assert not report.passed and expected in str(report), str(report)


# ----------------------------------------------------------------------------- the fused call
def fused_by_padding(q, k, v):
    c = v.shape[-1]
    return F.scaled_dot_product_attention(F.pad(q, (0, c - q.shape[-1])), F.pad(k, (0, c - k.shape[-1])), v,
                                          scale=1.0)


def test_fused_checker_accepts_padding_and_the_library():
    from attn_lib.modules.danet import fused_position_attention

    assert check_fused_position(fused_by_padding).passed
    assert check_fused_position(fused_position_attention).passed


def test_fused_checker_rejects_the_math_fallback_an_explicit_map_and_the_default_scale():
    direct = check_fused_position(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=1.0))
    assert not direct.passed and "fell back to its math path" in str(direct)

    def explicit(q, k, v):
        F.scaled_dot_product_attention(q, q, q)  # a fused call that does not do the work
        return torch.softmax(q @ k.transpose(1, 2), -1) @ v

    report = check_fused_position(explicit)
    assert not report.passed and "was built outside the fused kernel" in str(report)

    def unscaled(q, k, v):
        c = v.shape[-1]
        return F.scaled_dot_product_attention(F.pad(q, (0, c - q.shape[-1])), F.pad(k, (0, c - k.shape[-1])), v)

    report = check_fused_position(unscaled)
    assert not report.passed and "pass scale=1.0" in str(report)
