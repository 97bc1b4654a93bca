"""The CBAM chapter's checkers pass correct modules and name the usual mistakes in wrong ones."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from attn_lib.exercises.cbam import check_cbam, check_spatial_gate
from attn_lib.modules.cbam import CBAM


# ----------------------------------------------------------------------------- spatial gates
def make_spatial_gate(mistake: str = ""):
    """A from-scratch spatial gate returning M_s, correct unless ``mistake`` names a bug."""

    class StudentSpatialGate(nn.Module):
        def __init__(self, kernel_size: int = 7):
            super().__init__()
            padding = {"no padding": 0, "padding 1": 1}.get(mistake, kernel_size // 2)
            self.conv = nn.Conv2d(2, 1, kernel_size, padding=padding, bias=mistake != "no bias")

        def forward(self, x):
            if mistake == "wrong dim":  # NHWC habit: "channels are the last axis"
                mean, peak = x.mean(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
            elif mistake == "batch":  # statistics over the batch as well as the channels
                mean = x.mean(dim=(0, 1), keepdim=True).expand(x.shape[0], 1, *x.shape[2:])
                peak = x.amax(dim=1, keepdim=True)
            else:
                mean, peak = x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
            maps = [peak, mean] if mistake == "swapped order" else [mean, peak]
            logits = self.conv(torch.cat(maps, dim=1))
            gate = logits if mistake == "no sigmoid" else torch.sigmoid(logits)
            return x * gate if mistake == "gated map" else gate

    return StudentSpatialGate


def failed(report) -> dict[str, str]:
    return {name: detail for name, ok, detail in report.checks if not ok}


@pytest.mark.parametrize("mistake", ["", "no bias"])
def test_spatial_checker_passes_correct_gates(mistake):
    report = check_spatial_gate(make_spatial_gate(mistake))
    assert report.passed, str(report)
    assert len(report.checks) == 8


@pytest.mark.parametrize("mistake, expected", [
    ("no sigmoid", "forget the sigmoid"),
    ("swapped order", "[max; mean]"),
    ("wrong dim", "pool over the channel axis"),
    ("batch", "never over the batch"),
    ("gated map", "not M_s * x"),
    ("no padding", "give it padding=3"),
    ("padding 1", "pad the convolution by 3"),
])
def test_spatial_checker_names_the_mistake(mistake, expected):
    report = check_spatial_gate(make_spatial_gate(mistake))
    assert not report.passed
    assert expected in " ".join(failed(report).values()), str(report)


def test_spatial_checker_reports_the_unfinished_stub():
    class Stub(nn.Module):
        def __init__(self, kernel_size: int = 7):
            super().__init__()
            raise NotImplementedError("build the 2 -> 1 convolution")

    report = check_spatial_gate(Stub)
    assert not report.passed and "not implemented yet" in str(report)


def test_spatial_checker_wants_one_two_to_one_convolution():
    class TwoConvs(nn.Module):
        def __init__(self, kernel_size: int = 7):
            super().__init__()
            self.mean_conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2)
            self.max_conv = nn.Conv2d(1, 1, kernel_size, padding=kernel_size // 2)

        def forward(self, x):
            return torch.sigmoid(self.mean_conv(x.mean(1, keepdim=True)) + self.max_conv(x.amax(1, keepdim=True)))

    report = check_spatial_gate(TwoConvs)
    assert not report.passed and "expected exactly one nn.Conv2d(2, 1, 7)" in str(report)


# ----------------------------------------------------------------------------- whole CBAM blocks
def make_cbam(mistake: str = "", official: bool = False, conv_mlp: bool = False):
    """A from-scratch CBAM, correct unless ``mistake`` names a bug; ``conv_mlp`` builds the MLP
    from 1x1 convolutions without biases (the layout of much circulating code) instead of nn.Linear."""

    class StudentCBAM(nn.Module):
        def __init__(self, channels: int, reduction: int = 16):
            super().__init__()
            hidden = channels // reduction

            def mlp():
                if conv_mlp:
                    return nn.Sequential(nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(),
                                         nn.Conv2d(hidden, channels, 1, bias=False), nn.Flatten())
                return nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))

            self.mlp = mlp()
            self.mlp_max = mlp() if mistake == "separate MLPs" else self.mlp
            self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=not official)
            self.bn = nn.BatchNorm2d(1, momentum=0.01) if official else nn.Identity()
            if official and mistake != "bn not zeroed":
                nn.init.zeros_(self.bn.weight)
                nn.init.zeros_(self.bn.bias)

        def channel(self, f):
            if mistake == "wrong dim":  # NHWC habit: pools over dims 1, 2 as if they were H, W
                avg, peak = f.mean(dim=(1, 2)), f.amax(dim=(1, 2))
            else:
                avg, peak = f.mean(dim=(2, 3)), f.amax(dim=(2, 3))
            if conv_mlp:
                avg, peak = avg[:, :, None, None], peak[:, :, None, None]
            logits = self.mlp(avg) if mistake == "avg only" else self.mlp(avg) + self.mlp_max(peak)
            gate = logits if mistake == "no channel sigmoid" else torch.sigmoid(logits)
            return gate[:, :, None, None]

        def spatial(self, f):
            mean, peak = f.mean(dim=1, keepdim=True), f.amax(dim=1, keepdim=True)
            first_max = official != (mistake == "swapped order")
            logits = self.bn(self.conv(torch.cat([peak, mean] if first_max else [mean, peak], dim=1)))
            return logits if mistake == "no spatial sigmoid" else torch.sigmoid(logits)

        def forward(self, f):
            if mistake == "spatial first":
                f1 = f * self.spatial(f)
                return f1 * self.channel(f1)
            f1 = f * self.channel(f)
            return f1 * self.spatial(f if mistake == "spatial from input" else f1)

    return StudentCBAM


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("conv_mlp", [False, True])
def test_cbam_checker_passes_correct_blocks(official, conv_mlp):
    report = check_cbam(make_cbam(official=official, conv_mlp=conv_mlp), official=official)
    assert report.passed, str(report)


def test_cbam_checker_passes_the_library_module_in_both_forms():
    assert check_cbam(CBAM).passed
    official = lambda channels, reduction=16: CBAM(channels, reduction, spatial_bn=True,  # noqa: E731
                                                   pool_order="max_mean")
    report = check_cbam(official, official=True)
    assert report.passed, str(report)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("mistake, expected", [
    ("separate MLPs", "ONE shared MLP"),
    ("spatial first", "spatial gate applied first"),
    ("swapped order", "maps stacked as"),
    ("no channel sigmoid", "no sigmoid on the channel gate"),
    ("no spatial sigmoid", "no sigmoid on the spatial gate"),
    ("avg only", "that is SE's gate"),
    ("spatial from input", "computed from the input F"),
    ("wrong dim", "pools over H and W (dims 2, 3)"),
])
def test_cbam_checker_names_the_mistake(mistake, expected, official):
    report = check_cbam(make_cbam(mistake, official=official), official=official)
    assert not report.passed
    assert expected in " ".join(failed(report).values()), str(report)


def test_swapped_order_message_follows_the_form():
    paper = " ".join(failed(check_cbam(make_cbam("swapped order"))).values())
    official = " ".join(failed(check_cbam(make_cbam("swapped order", official=True), official=True)).values())
    assert "stacked as [max; mean]; this form expects [mean; max]" in paper
    assert "stacked as [mean; max]; this form expects [max; mean]" in official


def test_official_checker_wants_the_zero_initialised_batchnorm():
    report = check_cbam(make_cbam("bn not zeroed", official=True), official=True)
    assert set(failed(report)) == {"spatial gate starts at 0.5"}, str(report)


def test_paper_and_official_forms_are_told_apart():
    assert "no BatchNorm" in str(check_cbam(make_cbam(official=True)))
    assert "one nn.BatchNorm2d(1)" in str(check_cbam(make_cbam(), official=True))


def test_cbam_checker_never_raises_on_a_stub():
    class Stub(nn.Module):
        def __init__(self, channels: int, reduction: int = 16):
            super().__init__()

        def forward(self, x):
            raise NotImplementedError("compute M_c, then M_s")

    report = check_cbam(Stub)
    assert not report.passed
    assert "expected the shared MLP's two layers" in str(report)


def test_spatial_checker_does_not_blame_the_pooling_for_a_missing_padding():
    report = check_spatial_gate(make_spatial_gate("no padding"))
    assert "pool over the channel axis" not in " ".join(failed(report).values()), str(report)
