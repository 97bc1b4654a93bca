"""Helpers the baseline and SE chapters share: costs, step timing, several seeds, shipped weights,
wrapped commands, and their figures."""
import math

import matplotlib
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

matplotlib.use("Agg")

from attn_lib import course, plotting, results  # noqa: E402
from attn_lib.data import GPULoader, make_synthetic  # noqa: E402
from attn_lib.models import resnet18  # noqa: E402


# ----------------------------------------------------------------------------- costs
def test_count_parameters_counts_every_tensor_and_only_trainable_ones_on_request():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False))
    assert course.count_parameters(net) == 3 * 4 + 4 + 4 * 2
    net[0].weight.requires_grad_(False)
    assert course.count_parameters(net, trainable_only=True) == 4 + 4 * 2
    with pytest.raises(TypeError, match="nn.Module"):
        course.count_parameters([1, 2])


def test_model_cost_matches_the_hand_count_of_a_convolution_and_a_linear_layer():
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(5 * 8 * 8, 7))
    cost = course.model_cost(net, image_size=8)
    macs = 8 * 8 * 5 * 3 * 9 + 5 * 8 * 8 * 7  # every output pixel of every filter; the linear layer
    assert cost == {"parameters": 5 * 3 * 9 + 5 * 64 * 7 + 7, "flops": 2 * macs, "macs": macs}


def test_model_cost_on_the_meta_device_equals_the_cost_on_the_cpu():
    with torch.device("meta"):
        meta = resnet18(10, attention="se", width=16)
    real = resnet18(10, attention="se", width=16)
    assert course.model_cost(meta) == course.model_cost(real)
    with pytest.raises(ValueError, match="image size"):
        course.model_cost(real, image_size=0)


def test_step_time_ratios_gives_the_base_a_ratio_of_one_and_a_bigger_model_a_larger_time():
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    big = nn.Sequential(nn.Conv2d(3, 256, 3), nn.Conv2d(256, 256, 3), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(256, 10))
    timing = course.step_time_ratios({"small": small, "big": big}, batch=8, rounds=2)
    assert timing["small"]["ratio"] == 1.0
    assert timing["big"]["seconds"] > 0 and timing["big"]["ratio"] > 1.0
    with pytest.raises(ValueError, match="at least one model"):
        course.step_time_ratios({})


# ----------------------------------------------------------------------------- several seeds
def _history(values, metric="val_top1"):
    return {"epochs": [{"epoch": i + 1, metric: v} for i, v in enumerate(values)], "meta": {}, "config": {}}


def test_seed_summary_and_paired_difference_agree_with_scipy():
    runs = {"none": {0: _history([50, 90.0]), 1: _history([40, 91.0]), 2: _history([45, 92.5])},
            "se": {0: _history([50, 90.5]), 1: _history([40, 90.9]), 2: _history([45, 93.4]),
                   3: _history([45, 99.0])}}
    summary = course.seed_summary(runs)
    assert summary["none"]["values"] == [90.0, 91.0, 92.5]
    assert math.isclose(summary["none"]["mean"], 91.1666666, rel_tol=1e-6)
    assert math.isclose(summary["none"]["std"], stats.tstd([90.0, 91.0, 92.5]))
    assert summary["se"]["n"] == 4
    paired = course.paired_seed_difference(runs, "se")
    assert paired["seeds"] == [0, 1, 2]  # seed 3 has no partner
    assert np.allclose(paired["differences"], [0.5, -0.1, 0.9])
    test = stats.ttest_rel([90.5, 90.9, 93.4], [90.0, 91.0, 92.5])
    assert math.isclose(paired["p_value"], test.pvalue)
    assert paired["low"] < paired["mean"] < paired["high"]
    one = course.seed_summary({"x": {0: _history([1.0])}})
    assert math.isnan(one["x"]["std"])
    with pytest.raises(ValueError, match="no runs named"):
        course.paired_seed_difference(runs, "cbam")
    with pytest.raises(ValueError, match="has no 'test_top1'"):
        course.seed_summary(runs, "test_top1")


def test_the_recorded_gpu_runs_give_the_published_means():
    runs = results.load_runs("cifar10-h200-r18")
    summary = course.seed_summary({name: runs[name] for name in ("none", "se")})
    assert round(summary["none"]["mean"], 2) == 92.84 and round(summary["none"]["std"], 2) == 0.20
    assert round(summary["se"]["mean"], 2) == 92.65 and round(summary["se"]["std"], 2) == 0.12


# ----------------------------------------------------------------------------- shipped weights
def _recorded_run(model, data, test_top1, tta=False):
    return {"config": {"tta": tta}, "meta": {"test_images": len(data)},
            "epochs": [{"epoch": 1, "test_top1": test_top1}]}


class FixedLogits(nn.Module):
    """Given logits for each image of ``data``: recognises the image it is shown, returns its row."""

    def __init__(self, data, logits):
        super().__init__()
        self.images = torch.cat([x for x, _ in GPULoader(data, len(data), train=False)])
        self.logits = logits

    def forward(self, x):
        distance = (x[:, None] - self.images[None]).flatten(2).abs().sum(-1)  # [B, N]
        return self.logits[distance.argmin(1)]


def test_check_shipped_weights_tolerates_exactly_the_images_with_a_small_margin():
    data = make_synthetic(10, num_classes=3)
    logits = torch.full((10, 3), -5.0)
    logits[torch.arange(10), torch.from_numpy(data.y)] = 5.0  # all right, by a wide margin
    wrong_by_a_hair = (int(data.y[0]) + 1) % 3
    logits[0, wrong_by_a_hair] = 5.0005  # image 0: wrong, by a margin of 5e-4
    report = course.check_shipped_weights(FixedLogits(data, logits), _recorded_run(None, data, 100.0), data,
                                          batch_size=4)
    assert report["recomputed"] == 90.0 and report["fragile"] == 1 and report["allowed"] == 10.0
    assert report["full"] is None
    assert report["predicted"].tolist() == [wrong_by_a_hair] + data.y[1:].tolist()
    logits[0, wrong_by_a_hair] = 6.0  # now wrong by a wide margin: not a rounding effect
    with pytest.raises(AssertionError, match="float16"):
        course.check_shipped_weights(FixedLogits(data, logits), _recorded_run(None, data, 100.0), data)


def test_check_shipped_weights_evaluates_the_recorded_subset_and_the_whole_set():
    data = make_synthetic(12, num_classes=3)
    logits = torch.full((12, 3), -5.0)
    logits[torch.arange(12), torch.from_numpy(data.y)] = 5.0
    logits[10:, :] = torch.tensor([9.0, 0.0, 0.0]) - 100 * torch.nn.functional.one_hot(
        torch.from_numpy(data.y[10:]), 3)  # the last two images (outside the subset) are wrong
    run = _recorded_run(None, data.subset(range(10)), 100.0)
    report = course.check_shipped_weights(FixedLogits(data, logits), run, data, batch_size=12)
    assert report["images"] == 10 and report["recomputed"] == 100.0
    assert report["full"] == {"images": 12, "top1": pytest.approx(100 * 10 / 12)}
    with pytest.raises(ValueError, match="tested on 10 images"):
        course.check_shipped_weights(FixedLogits(data, logits), run, data.subset(range(5)))


def test_the_shipped_baseline_weights_reproduce_their_record_on_the_recorded_images():
    from attn_lib.data import load_cifar, DataNotFoundError, default_data_dir

    try:
        test_set = load_cifar("cifar10", "test", default_data_dir(), download=False)
    except DataNotFoundError:
        pytest.skip("CIFAR-10 is not on this machine")
    history = results.load("cifar10-cpu-w16--none")
    report = course.check_shipped_weights(results.load_trained("cifar10-cpu-w16", "none"), history,
                                          test_set)
    assert abs(report["recomputed"] - report["recorded"]) <= report["allowed"]


# ----------------------------------------------------------------------------- printing and figures
def test_wrap_command_keeps_lines_short_and_the_command_intact():
    command = ("python -m attn_lib train --dataset cifar10 --data-dir data --no-download --model resnet18 "
               "--attention se -o width=16 --epochs 5 --seed 0 --device cpu --out runs/cpu-w16/se --resume")
    wrapped = course.wrap_command(command, width=60)
    lines = wrapped.splitlines()
    assert len(lines) > 1 and all(len(line) <= 60 for line in lines)
    assert all(line.endswith(" \\") for line in lines[:-1])
    assert " ".join(wrapped.replace("\\\n", " ").split()) == command
    assert not any(line.rstrip(" \\").endswith(("--epochs", "--seed", "--out")) for line in lines)
    assert course.wrap_command("ls -l") == "ls -l"


def test_plot_seed_curves_draws_mean_band_and_every_seed():
    runs = {"none": {0: _history([50, 90.0]), 1: _history([40, 91.0])}, "se": {0: _history([45, 92.0])}}
    ax = plotting.plot_seed_curves(runs)
    lines = ax.get_lines()
    assert len(lines) == 2 + 1 + 1 + 1  # two seeds + mean, one seed + mean
    mean = [line for line in lines if line.get_label().startswith("none")][0]
    assert np.allclose(mean.get_ydata(), [45.0, 90.5])
    assert len(ax.collections) == 2  # one band per run
    with pytest.raises(ValueError, match="band"):
        plotting.plot_seed_curves(runs, band="iqr")
    with pytest.raises(ValueError, match="no epoch"):
        plotting.plot_seed_curves(runs, metric="test_top1")


def test_the_diagrams_draw_their_boxes():
    ax = plotting.draw_se_block()
    texts = [t.get_text() for t in ax.texts]
    assert any("squeeze" in t for t in texts) and any("excitation" in t for t in texts)
    top, bottom = plotting.draw_gate_placement("SE")
    order = [t.get_text() for t in top.texts]
    assert order.index("SE") < order.index("+")
    order = [t.get_text() for t in bottom.texts]
    assert order.index("+") < order.index("SE")


def test_a_checker_report_is_wrapped_to_88_columns_and_keeps_every_word():
    from attn_lib.exercises.report import Report

    report = Report("a title " * 20)
    report.add("a check", False, "because " * 30 + "a-very-long-unbreakable-token-" * 4)
    text = str(report)
    assert all(len(line) <= 88 for line in text.splitlines() if "unbreakable" not in line)
    assert text.split() == (str("a title " * 20).split() + ["✗", "a", "check:"] + ("because " * 30).split()
                            + ["a-very-long-unbreakable-token-" * 4] + ["0/1", "checks", "passed"])
