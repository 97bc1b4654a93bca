"""Helpers the SK and CBAM chapters share: counts, predictions, paired statistics, figures."""
from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from attn_lib import course, plotting  # noqa: E402
from attn_lib.data import make_synthetic  # noqa: E402
from attn_lib.inspect import shared_layout  # noqa: E402
from attn_lib.models import resnet18  # noqa: E402


def test_count_parameters_and_macs_against_hand_counts():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert course.count_parameters(conv) == 8 * 3 * 9 + 8
    assert course.count_macs(conv, (1, 3, 8, 8)) == 8 * 3 * 9 * 8 * 8
    assert course.count_macs(nn.Linear(5, 7), (2, 5)) == 2 * 5 * 7
    with torch.device("meta"):
        model = resnet18(10)
    assert course.count_parameters(model) == 11_173_962
    assert course.count_macs(model) == pytest.approx(555.4e6, rel=1e-3)


def test_counts_refuse_bad_input():
    with pytest.raises(TypeError, match="nn.Module"):
        course.count_parameters("resnet18")
    with pytest.raises(ValueError, match="input shape"):
        course.count_macs(nn.Linear(2, 2), (0, 2))


def test_step_seconds_runs_a_training_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    before = model[1].weight.detach().clone()
    seconds = course.step_seconds(model, batch=4, steps=1, image_size=8)
    assert seconds > 0 and not torch.equal(before, model[1].weight)
    with pytest.raises(ValueError, match="steps"):
        course.step_seconds(model, steps=0)


def test_predict_averages_the_mirror_image():
    data = make_synthetic(40, seed=3)
    torch.manual_seed(0)
    model = resnet18(10, width=8).eval()
    x = course.normalised_images(data)
    with torch.no_grad():
        plain = model(x).argmax(1).numpy()
        mirrored = (model(x) + model(x.flip(3))).argmax(1).numpy()
    np.testing.assert_array_equal(course.predict(model, data, batch_size=7, tta=False), plain)
    np.testing.assert_array_equal(course.predict(model, data, batch_size=7), mirrored)
    assert not model.training


def _two_classifiers(n=1000, only_a=77, only_b=43, both=700):
    labels = np.zeros(n, dtype=int)
    a, b = np.ones(n, dtype=int), np.ones(n, dtype=int)   # wrong unless set below
    a[:both] = b[:both] = 0
    a[both:both + only_a] = 0
    b[both + only_a:both + only_a + only_b] = 0
    return labels, a, b


def test_paired_comparison_matches_the_exact_binomial_written_out():
    labels, a, b = _two_classifiers()
    out = course.paired_comparison(labels, a, b)
    assert (out["only_a"], out["only_b"], out["n"]) == (77, 43, 1000)
    assert out["acc_a"] == pytest.approx(77.7) and out["acc_b"] == pytest.approx(74.3)
    assert out["difference"] == pytest.approx(-3.4)
    k, m = 43, 120   # two-sided exact McNemar: twice the smaller tail of Binomial(120, 1/2)
    naive_p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    assert out["mcnemar_p"] == pytest.approx(naive_p, rel=1e-9)
    d = (b == labels).astype(float) - (a == labels).astype(float)
    naive_se = 100 * math.sqrt(((d - d.mean()) ** 2).sum() / (len(d) - 1) / len(d))
    assert out["paired_se"] == pytest.approx(naive_se)
    assert 0.001 < out["mcnemar_p"] < 0.003 and 1.0 < out["paired_se"] < 1.2


def test_paired_comparison_of_identical_predictions_and_bad_input():
    labels, a, _ = _two_classifiers()
    same = course.paired_comparison(labels, a, a)
    assert same["mcnemar_p"] == 1.0 and same["difference"] == 0 and same["paired_se"] == 0
    with pytest.raises(ValueError, match="same >= 2 images"):
        course.paired_comparison(labels, a, a[:10])


def _history(values):
    return {"epochs": [{"epoch": i + 1, "val_top1": v} for i, v in enumerate(values)], "meta": {}}


def test_seed_summary_and_paired_t_test_against_the_formula():
    runs = {"none": {0: _history([50, 90.0]), 1: _history([51, 91.0]), 2: _history([52, 92.5])},
            "sk": {0: _history([49, 90.4]), 1: _history([50, 91.1]), 2: _history([53, 93.5])}}
    summary = course.seed_summary(runs)
    assert summary["none"]["mean"] == pytest.approx(91.1667, abs=1e-4)
    assert summary["none"]["std"] == pytest.approx(np.std([90, 91, 92.5], ddof=1))
    diff = course.seed_difference(runs, "none", "sk")
    d = np.array([0.4, 0.1, 1.0])
    assert list(diff["per_seed"].values()) == pytest.approx(list(d))
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    from scipy import stats
    assert diff["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))
    one = course.seed_difference({"a": {0: _history([1])}, "b": {0: _history([2])}}, "a", "b")
    assert one["p"] is None and one["mean"] == 1
    with pytest.raises(ValueError, match="share no seed"):
        course.seed_difference({"a": {0: _history([1])}, "b": {1: _history([2])}}, "a", "b")


def test_recorded_runs_give_the_headline_figures():
    from attn_lib import results

    summary = course.seed_summary(results.load_runs("cifar10-h200-r18"))
    assert summary["none"]["mean"] == pytest.approx(92.84, abs=0.01)
    assert summary["sk"]["std"] == pytest.approx(0.27, abs=0.01)


def test_benchmark_rows_side_by_side():
    rows = course.benchmark_rows(["none", "cbam"])
    assert [(r["attention"], "H200" in r["device"]) for r in rows] == [
        ("none", False), ("cbam", False), ("none", True), ("cbam", True)]
    assert rows[0]["step_time_ratio"] == 1.0 and rows[3]["step_time_ratio"] > 1
    assert rows[0]["commit"].endswith("-dirty") or len(rows[0]["commit"]) == 10
    with pytest.raises(ValueError, match="no row"):
        course.benchmark_rows(["transformer"])
    with pytest.raises(TypeError):
        course.benchmark_rows("cbam")


def _naive_spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))   # no ties in these data
    return np.corrcoef(ra, rb)[0, 1]


def test_shared_layout_finds_a_common_map():
    g = torch.Generator().manual_seed(0)
    common = torch.linspace(0, 1, 16).view(4, 4)
    maps = common + 0.05 * torch.randn(30, 4, 4, generator=g)
    out = shared_layout(maps)
    others = (maps.sum(0) - maps[0]) / 29
    assert out["rho"][0] == pytest.approx(_naive_spearman(maps[0].flatten().numpy(),
                                                          others.flatten().numpy()))
    assert np.median(out["rho"]) > 0.9 and out["variance_explained"] > 0.9
    torch.testing.assert_close(out["mean_map"], maps.double().mean(0))
    noise = shared_layout(torch.randn(30, 4, 4, generator=g))
    assert abs(np.median(noise["rho"])) < 0.3 and noise["variance_explained"] < 0.2


def test_shared_layout_edge_cases():
    maps = torch.rand(5, 3, 3)
    maps[2] = 0.5
    assert np.isnan(shared_layout(maps)["rho"][2])
    with pytest.raises(ValueError, match=r"\[N, h, w\]"):
        shared_layout(torch.rand(3, 3))


def test_plot_seed_spread_draws_mean_band_and_seeds():
    runs = {"none": {0: _history([50, 60]), 1: _history([52, 61])}, "sk": {0: _history([49, 59])}}
    ax = plotting.plot_seed_spread(runs)
    assert len(ax.lines) == 1 + 2 + 1 and len(ax.collections) == 1
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [51, 60.5])
    with pytest.raises(ValueError, match="no epoch"):
        plotting.plot_seed_spread(runs, first_epoch=5)
    plt.close("all")


@pytest.mark.parametrize("draw, words", [
    (plotting.draw_sk_unit, ["Split", "Fuse", "Select", "GAP"]),
    (plotting.draw_cbam, ["channel gate: what", "spatial gate: where", "conv 7×7\n2 → 1"]),
])
def test_diagrams_draw_their_steps(draw, words):
    fig = draw()
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert all(w in texts for w in words), texts
    plt.close(fig)


def test_print_wrapped_keeps_every_word_within_the_width(capsys):
    text = "title\n  ✓ " + " ".join(f"word{i}" for i in range(60)) + "\nshort"
    assert course.print_wrapped(text, width=40) is text
    out = capsys.readouterr().out
    assert all(len(line) <= 40 for line in out.splitlines())
    assert out.split() == text.split()
    assert out.splitlines()[2].startswith("      word")   # 2 spaces of the line + 4 more
    with pytest.raises(ValueError, match="at least 20"):
        course.print_wrapped("x", width=5)


def test_count_macs_counts_attention_on_the_fused_path():
    """The fused CPU attention kernel has no formula in torch's flop counter: counted naively, a
    non-local block would cost its four 1x1 convolutions only. Hand count: theta, phi, g and W
    (N positions x C x C_i each) plus the two products theta phi^T and f g (N x N x C_i each)."""
    from attn_lib.modules.nonlocal_block import NonLocalBlock

    C, Ci, side = 16, 8, 6
    N = side * side
    block = NonLocalBlock(C, mode="embedded", sub_sample=False, bn_layer=False).eval()
    assert block.inter_channels == Ci
    expected = 4 * N * C * Ci + 2 * N * N * Ci
    assert course.count_macs(block, (1, C, side, side)) == expected
    # and the added cost of attention grows faster than the pixels: 4x the pixels, more than 4x
    small, large = (course.count_macs(block, (1, C, s, s)) for s in (side, 2 * side))
    assert large / small > 4
