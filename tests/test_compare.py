"""The comparison chapter's helpers: the table of every mechanism read from the recorded files,
the power of a paired t-test checked by simulation, the gallery's views, and the checkers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from attn_lib import compare, results
from attn_lib.course import paired_seed_difference, seed_summary
from attn_lib.exercises import compare as ex
from attn_lib.exercises.triple import small_triple_densenet
from attn_lib.models import resnet18


@pytest.fixture(scope="module")
def rows():
    return compare.mechanism_table()


def test_the_table_has_every_mechanism_each_cell_from_a_recorded_file(rows):
    assert [r["name"] for r in rows] == ["none"] + [m[0] for m in compare.MECHANISMS]
    recorded = set(results.available())
    for r in rows:
        assert r["sources"] and set(r["sources"]) <= recorded, r["label"]
    gpu = {r["attention"]: r for r in results.load("bench-modules-gpu")["rows"]
           if r["kind"] == "mechanism"}
    se = next(r for r in rows if r["name"] == "se")
    assert se["gpu_step_ratio"] == gpu["se"]["step_time_ratio"]
    runs = results.load_runs("cifar10-h200-r18")
    summary = seed_summary({"se": runs["se"]})["se"]
    assert se["accuracy"]["mean"] == summary["mean"] and se["accuracy"]["n"] == summary["n"]
    paired = paired_seed_difference(runs, "se", "none")
    assert (se["accuracy"]["low"], se["accuracy"]["high"]) == (paired["low"], paired["high"])


def test_the_paired_interval_is_scipys(rows):
    runs = results.load_runs("cifar10-h200-r18")
    seeds = sorted(runs["none"])
    plain = [runs["none"][s]["epochs"][-1]["val_top1"] for s in seeds]
    se = [runs["se"][s]["epochs"][-1]["val_top1"] for s in seeds]
    ci = stats.ttest_rel(se, plain).confidence_interval(0.95)
    row = next(r for r in rows if r["name"] == "se")["accuracy"]
    assert row["low"] == pytest.approx(ci.low) and row["high"] == pytest.approx(ci.high)


def test_what_is_missing_is_said_not_invented(rows):
    gaps = compare.missing(rows)
    triple = next(r for r in rows if r["name"] == "triple")
    assert "accuracy" not in triple and "GPU accuracy" in gaps["Triple"]
    text = compare.format_table(rows)
    assert all(len(line) <= 88 for line in text.splitlines())
    assert "—" in text and "DenseNet-121" in text


def test_paired_power_matches_a_simulation_of_scipys_test():
    rng = np.random.default_rng(0)
    n, difference, std, trials = 5, 0.3, 0.25, 4000
    d = rng.normal(difference, std, (trials, n))
    rejected = stats.ttest_1samp(d, 0, axis=1).pvalue < 0.05
    assert compare.paired_power(n, difference, std) == pytest.approx(rejected.mean(), abs=0.03)
    assert compare.paired_power(8, 0.0, 1.0) == pytest.approx(0.05, abs=1e-9)


def test_seeds_needed_is_the_first_n_with_enough_power():
    n = compare.seeds_needed(0.3, 0.2)
    assert compare.paired_power(n, 0.2, 0.3) >= 0.8 > compare.paired_power(n - 1, 0.2, 0.3)
    assert compare.seeds_needed(0.3, 0.5) < n < compare.seeds_needed(0.5, 0.2)
    with pytest.raises(ValueError, match="non-zero difference"):
        compare.seeds_needed(0.3, 0)
    with pytest.raises(ValueError, match="positive standard deviation"):
        compare.paired_power(3, 0.2, 0)


@pytest.mark.parametrize("name", [m[0] for m in compare.MECHANISMS])
def test_every_mechanism_has_a_view_of_one_picture_per_image(name):
    torch.manual_seed(0)
    model = small_triple_densenet(10) if name == "triple" else resnet18(10, name, width=16)
    x = torch.randn(3, 3, 32, 32)
    view = compare.attention_views(model.eval(), name, x)
    assert view["kind"] in ("map", "grid", "curve") and len(view["values"]) == 3
    assert view["values"].dim() == (2 if view["kind"] == "curve" else 3)
    if name in ("danet", "nonlocal"):  # the centre query's weights sum to one over the keys
        torch.testing.assert_close(view["values"].sum((1, 2)), torch.ones(3))
    if name == "sk":
        assert view["values"].shape == (3, 8) and ((0 < view["values"]) & (view["values"] < 1)).all()


def test_the_gallery_plots_every_recorded_network():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attn_lib.plotting import plot_gallery
    from attn_lib.inspect import grad_cam

    models = compare.gallery_models()
    assert {"none", "se", "sk", "cbam", "danet", "nonlocal", "dia", "triple"} <= set(models)
    x = torch.randn(2, 3, 32, 32)
    views = {n: compare.attention_views(m, n, x) for n, m in models.items() if n != "none"}
    cams = {n: grad_cam(m, x, compare.cam_layer(m)).numpy() for n, m in models.items()}
    fig = plot_gallery(np.zeros((32, 32, 3)), views, cams, index=1, title="t")
    assert len(fig.axes) == 2 * len(models)
    from attn_lib.plotting import figure_png

    png = figure_png(fig, dpi=50)   # what the chapter's image widget shows
    assert png.startswith(b"\x89PNG") and not plt.fignum_exists(fig.number)


def test_checkers_pass_the_reference_and_name_the_usual_mistakes():
    def right(plain, attention, confidence):
        ci = stats.ttest_rel(attention, plain).confidence_interval(confidence)
        return float(np.mean(attention - plain)), ci.low, ci.high

    def unpaired(plain, attention, confidence):
        ci = stats.ttest_ind(attention, plain).confidence_interval(confidence)
        return float(np.mean(attention - plain)), ci.low, ci.high

    assert ex.check_paired_interval(right).passed
    report = ex.check_paired_interval(unpaired)
    assert not report.passed and "unpaired" in str(report)
    assert ex.check_seeds_needed(lambda s, d: compare.seeds_needed(s, d)).passed
    normal = ex.check_seeds_needed(
        lambda s, d: int(np.ceil(((1.959964 + 0.841621) * s / d) ** 2)))
    assert not normal.passed and "normal approximation" in str(normal)
    assert ex.check_faster_than_pixels({"danet", "nonlocal"}).passed
    assert not ex.check_faster_than_pixels({"danet", "sk"}).passed
    assert not ex.check_faster_than_pixels("danet").passed
    with pytest.raises(TypeError, match="expected a function"):
        ex.check_seeds_needed(3)


def test_attention_options_and_overrides_reach_full_mode(monkeypatch, tmp_path):
    from attn_lib import course

    monkeypatch.setenv("ATTN_LIB_TOY", "1")
    monkeypatch.setenv("ATTN_LIB_RUNS_DIR", str(tmp_path))
    runs = course.train_or_load("09_test", ["none", "se"], full=True, recorded="unused",
                                model_kwargs={"width": 8}, attention_kwargs={"reduction": 8},
                                overrides={"epochs": 15, "train_subset": 10000, "val_size": 5000},
                                progress=False)
    assert runs["none"][0]["config"]["model_kwargs"] == {"width": 16}  # toy width wins
    assert runs["se"][0]["config"]["model_kwargs"]["reduction"] == 8
    assert "-o reduction=8" in runs["se"][0]["meta"]["command"]
    assert "--epochs 1 " in runs["se"][0]["meta"]["command"]  # the toy run's own settings
    assert "--train-subset" not in runs["se"][0]["meta"]["command"]
    assert "reduction" not in runs["none"][0]["meta"]["command"]
    plan = course.PLANNED_RUNS[-1]
    assert plan["epochs"] == 15 and plan["train_images"] == 5000


@pytest.mark.parametrize("key", list(compare.EXPERIMENTS))
def test_the_recorded_experiments_are_the_declared_design(key):
    """Each experiment the chapter reads has both networks on the same three seeds, trained with
    the settings :data:`attn_lib.compare.EXPERIMENTS` declares, from a clean commit."""
    spec = compare.EXPERIMENTS[key]
    runs = results.load_runs(compare.experiment_group(key))
    assert set(runs) == {"none", "se"} and set(runs["none"]) == set(runs["se"]) == {0, 1, 2}
    for name, seeds in runs.items():
        for seed, history in seeds.items():
            cfg, meta = history["config"], history["meta"]
            assert cfg["model_kwargs"]["width"] == spec["width"]
            assert cfg["train_subset"] == spec["train_subset"] and cfg["seed"] == seed
            assert cfg["val_size"] == compare.EXPERIMENT_VAL_SIZE
            assert len(history["epochs"]) == cfg["epochs"] == compare.EXPERIMENT_EPOCHS
            assert cfg["model_kwargs"].get("reduction", 16) == (
                spec["reduction"] if name == "se" else 16)
            assert not results.commit_label(meta).endswith("-dirty")


def test_experiments_estimate_sums_the_grid_and_scales_with_seeds():
    from attn_lib.course import full_mode_estimate

    one, three = compare.experiments_estimate((0,)), compare.experiments_estimate((0, 1, 2))
    parts = [full_mode_estimate(["none", "se"], (0,), epochs=compare.EXPERIMENT_EPOCHS,
                                train_images=spec["train_subset"] - compare.EXPERIMENT_VAL_SIZE)
             for spec in compare.EXPERIMENTS.values()]
    for key in ("H100-class minutes", "T4-class minutes"):
        assert one[key] == pytest.approx(sum(p[key] for p in parts))
        assert three[key] == pytest.approx(3 * one[key])
    assert one["H100-class minutes"] < one["T4-class minutes"]
    assert "full width" in one["basis"]
