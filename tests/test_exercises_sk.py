"""The SK chapter's checkers pass correct solutions and name the mistakes of wrong ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_lib.exercises.sk import check_select, check_selective_kernel, reference_select
from attn_lib.modules.sk import SelectiveKernel


def failed(report) -> dict[str, str]:
    return {name: detail for name, ok, detail in report.checks if not ok}


# ----------------------------------------------------------------------------- select(z, A, U)

def select_correct(z, A, features):
    logits = torch.einsum("mcd,bd->bmc", A, z)
    a = torch.softmax(logits, dim=1)
    return (a[..., None, None] * features).sum(dim=1), a


def select_with(normalise):
    def select(z, A, features):
        logits = torch.einsum("mcd,bd->bmc", A, z)
        a = {"channels": lambda t: torch.softmax(t, dim=2),
             "batch": lambda t: torch.softmax(t, dim=0),
             "sigmoid": torch.sigmoid}[normalise](logits)
        return (a[..., None, None] * features).sum(dim=1), a
    return select


def test_select_checker_passes_a_correct_select():
    report = check_select(select_correct)
    assert report.passed, str(report)


def test_reference_select_weights_sum_to_one_over_branches_only():
    z, A = torch.rand(2, 3), torch.randn(4, 5, 3)
    features = torch.randn(2, 4, 5, 2, 2)
    v, a = reference_select(z, A, features)
    torch.testing.assert_close(a.sum(dim=1), torch.ones(2, 5))
    assert (a.sum(dim=2) - 1).abs().max() > 0.1
    torch.testing.assert_close(v, torch.einsum("bmc,bmchw->bchw", a, features))


@pytest.mark.parametrize("normalise, named", [
    ("channels", "softmax over the channels"),
    ("batch", "softmax over the batch"),
    ("sigmoid", "a sigmoid per branch"),
])
def test_select_checker_names_the_wrong_normalisation(normalise, named):
    report = check_select(select_with(normalise))
    assert not report.passed
    wrong = failed(report)
    assert named in wrong["weights sum to 1 over the branches"]
    assert "V matches the reference" in wrong


def test_select_checker_catches_weights_applied_to_the_wrong_branch():
    def select(z, A, features):
        _, a = select_correct(z, A, features)
        return (a.flip(1)[..., None, None] * features).sum(dim=1), a  # a_1 on U_2, a_2 on U_1

    wrong = failed(check_select(select))
    assert set(wrong) == {"V is the weighted sum of the branches", "V matches the reference"}


def test_select_checker_reports_a_stub_and_a_wrong_return_without_raising():
    def stub(z, A, features):
        raise NotImplementedError("compute the branch weights and V")

    report = check_select(stub)
    assert not report.passed and "not implemented yet" in str(report)
    report = check_select(lambda z, A, features: select_correct(z, A, features)[0])
    assert not report.passed and "tuple (V, a)" in str(report)


# ----------------------------------------------------------------------------- a whole SK unit

class StudentSK(nn.Module):
    """A correct SK unit laid out differently from the library's: Linear layers, one A per branch,
    biases in the branch convolutions and a BatchNorm1d on z."""

    def __init__(self, channels, branches=2, reduction=16, min_dim=32, kernel=None, dilation=None,
                 fuse_bn=True, softmax_dim=1, debug=False):
        super().__init__()
        d = max(channels // reduction, min_dim)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, channels, kernel or 3, padding=(dilation or m) if kernel is None
                                    else kernel // 2, dilation=dilation or m if kernel is None else 1),
                          nn.BatchNorm2d(channels), nn.ReLU())
            for m in range(1, branches + 1))
        self.W = nn.Linear(channels, d, bias=False)
        self.bn = nn.BatchNorm1d(d) if fuse_bn else nn.Identity()
        self.A = nn.ModuleList(nn.Linear(d, channels, bias=False) for _ in range(branches))
        self.softmax_dim, self.debug = softmax_dim, debug

    def forward(self, x):
        features = torch.stack([branch(x) for branch in self.branches], dim=1)  # [B, M, C, H, W]
        s = features.sum(dim=1).mean(dim=(2, 3))
        z = torch.relu(self.bn(self.W(s)))
        if self.debug:
            print("z", z.shape)
        a = torch.softmax(torch.stack([A(z) for A in self.A], dim=1), dim=self.softmax_dim)
        return (a[..., None, None] * features).sum(dim=1)


def test_sk_checker_passes_the_library_module():
    report = check_selective_kernel(lambda c, **kw: SelectiveKernel(c, groups=1, **kw))
    assert report.passed, str(report)


@pytest.mark.parametrize("branches", [2, 3])
def test_sk_checker_passes_a_correct_unit_with_another_layout(branches):
    report = check_selective_kernel(StudentSK, branches=branches)
    assert report.passed, str(report)


@pytest.mark.parametrize("kwargs, check, named", [
    (dict(softmax_dim=2), "same output as the reference (eval mode)", "softmax runs over the channels"),
    (dict(softmax_dim=0), "same output as the reference (eval mode)", "softmax runs over the batch"),
    (dict(dilation=1), "branch m is dilated by m", "dilation m and padding m"),
    (dict(dilation=1), "same output as the reference (eval mode)", "every branch has dilation 1"),
    (dict(fuse_bn=False), "batch norms after each branch and on z", "fuse step has no batch norm"),
    (dict(fuse_bn=False), "same output as the reference (training mode)", "fuse step has no batch norm"),
    (dict(debug=True), "forward prints nothing", "remove debug prints"),
])
def test_sk_checker_names_each_mistake(kwargs, check, named):
    report = check_selective_kernel(lambda c, **kw: StudentSK(c, **kw, **kwargs))
    wrong = failed(report)
    assert check in wrong, str(report)
    assert named in wrong[check], str(report)


def test_sk_checker_rejects_an_undilated_5x5_branch_and_a_d_without_the_floor():
    five = failed(check_selective_kernel(lambda c, **kw: StudentSK(c, **kw, kernel=5)))
    assert "3x3 with dilation 2" in five["layers: M 3x3 convolutions, W: C -> d, A: d -> M*C"]

    class NoFloor(StudentSK):
        def __init__(self, channels, branches=2, reduction=16, min_dim=32):
            super().__init__(channels, branches, reduction, min_dim=1)  # d = C // r only

    wrong = failed(check_selective_kernel(NoFloor))
    assert "d = max(24 // 16, 32) = 32" in wrong["d = max(C // r, L)"]


def test_sk_checker_reports_a_stub_without_raising():
    class Stub(nn.Module):
        def __init__(self, channels, **kwargs):
            raise NotImplementedError("build the split, fuse and select layers")

    report = check_selective_kernel(Stub)
    assert not report.passed and "not implemented yet: build the split" in str(report)
