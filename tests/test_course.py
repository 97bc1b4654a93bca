"""The helpers every chapter shares: the toy switch, recorded-or-fresh runs, data, comparisons."""
from __future__ import annotations

import pytest
import torch

from attn_lib import course, data, results


@pytest.mark.parametrize("value, expected", [("", False), ("0", False), ("1", True), ("true", True)])
def test_toy_switch(monkeypatch, value, expected):
    monkeypatch.setenv(course.TOY_ENV, value)
    assert course.toy() is expected


def test_toy_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(course.TOY_ENV, "maybe")
    with pytest.raises(ValueError, match="ATTN_LIB_TOY='maybe': expected 1"):
        course.toy()


def test_full_mode_config_is_the_recorded_runs_recipe_and_shrinks_under_toy(monkeypatch):
    monkeypatch.delenv(course.TOY_ENV, raising=False)
    cfg = course.full_mode_config("se", seed=2)
    recorded = results.load_runs("cifar10-h200-r18")["se"][2]["config"]
    for key in ("dataset", "model", "attention", "epochs", "batch_size", "lr", "preset", "seed"):
        assert getattr(cfg, key) == recorded[key], key
    monkeypatch.setenv(course.TOY_ENV, "1")
    toy = course.full_mode_config("se", seed=2, model_kwargs={"reduction": 8})
    assert (toy.dataset, toy.epochs, toy.device) == ("synthetic", 1, "cpu")
    assert toy.model_kwargs == {"reduction": 8, "width": 16}


def test_train_or_load_reads_recorded_seeds_and_reports_missing_names(capsys):
    runs = course.train_or_load("02_se", ["none", "se", "nothing"], full=False, recorded="cifar10-h200-r18",
                                seeds=(0, 1, 2))
    assert set(runs) == {"none", "se"} and sorted(runs["se"]) == [0, 1, 2]
    assert "not in the recorded runs 'cifar10-h200-r18': nothing" in capsys.readouterr().out
    assert course.run_label(runs["se"][1]).startswith("recorded: NVIDIA H200, commit a4d04bebb2, seed 1")
    with pytest.raises(TypeError, match="list of attention names"):
        course.train_or_load("02_se", "se", full=False, recorded="cifar10-h200-r18")


def test_train_or_load_trains_in_full_mode_and_marks_the_runs(monkeypatch, tmp_path):
    monkeypatch.setenv(course.TOY_ENV, "1")
    monkeypatch.setenv(course.RUNS_ENV, str(tmp_path))
    runs = course.train_or_load("99_toy", ["none", "se"], full=True, recorded="cifar10-h200-r18", progress=False)
    assert sorted(runs) == ["none", "se"]
    assert (tmp_path / "99_toy" / "se-s0" / "history.json").is_file()
    assert course.run_label(runs["se"][0]).startswith("trained in this session")


def test_chapter_data_falls_back_loudly(monkeypatch, tmp_path, capsys):
    def offline(*args, **kwargs):
        if args[0] == "cifar10":
            raise data.DataNotFoundError("offline")
        return data.make_synthetic(64)

    monkeypatch.setattr(course, "load_cifar", offline)
    got = course.chapter_data("test", tmp_path)
    assert got.name == "synthetic"
    out = capsys.readouterr().out
    assert "CIFAR-10 is not in" in out and "SYNTHETIC" in out


def test_cmp_prints_and_asserts(capsys):
    a = torch.arange(6.0).view(2, 3)
    course.cmp("same", a, a.clone())
    assert "exact: True" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        course.cmp("off", a, a + 1)
    with pytest.raises(AssertionError, match="shapes differ"):
        course.cmp("shape", a, a.view(3, 2))


def test_full_mode_estimate_scales_with_runs_and_is_slower_on_a_t4():
    one = course.full_mode_estimate(["none"])
    three = course.full_mode_estimate(["none"], seeds=(0, 1, 2))
    assert three["H100-class minutes"] == pytest.approx(3 * one["H100-class minutes"])
    assert one["T4-class minutes"] > 10 * one["H100-class minutes"]
    assert course.full_mode_estimate(["se"])["H100-class minutes"] > one["H100-class minutes"]
    assert one["basis"] == "measured step-time ratios"
    dense = course.full_mode_estimate(["none", "triple"], model="densenet121")
    assert dense["basis"] == "forward FLOPs relative to ResNet-18" and dense["H100-class minutes"] > 0


def test_train_or_load_notes_every_run_it_delivers():
    del course.DELIVERED_RUNS[:]
    course.train_or_load("04_cbam", ["none", "cbam"], full=False, recorded="cifar10-h200-r18",
                         seeds=(0, 1))
    got = sorted((r["name"], r["seed"], r["trained_now"]) for r in course.DELIVERED_RUNS)
    assert got == [("cbam", 0, False), ("cbam", 1, False), ("none", 0, False), ("none", 1, False)]
    assert {r["chapter"] for r in course.DELIVERED_RUNS} == {"04_cbam"}
    assert all(r["epochs"] == 20 and r["dataset"] == "cifar10" for r in course.DELIVERED_RUNS)
    del course.DELIVERED_RUNS[:]


def _runs_with(values: dict[str, list[float]]) -> dict:
    return {name: {seed: {"epochs": [{"val_top1": v}]} for seed, v in enumerate(vals)}
            for name, vals in values.items()}


def test_seed_comparison_one_seed_gets_the_prediction_interval_written_out():
    import math

    from scipy import stats

    plain = [92.66, 93.06, 92.80]
    got = course.seed_comparison(_runs_with({"none": plain, "dia": [91.94]}), "dia")
    n, mean, sd = 3, sum(plain) / 3, stats.tstd(plain)
    half = stats.t.ppf(0.975, n - 1) * sd * math.sqrt(1 + 1 / n)   # one more plain seed
    assert got["test"] == "prediction" and got["value"] == 91.94
    assert got["low"] == pytest.approx(mean - half) and got["high"] == pytest.approx(mean + half)
    assert got["inside"] is bool(mean - half <= 91.94 <= mean + half)
    assert course.seed_comparison(_runs_with({"none": plain, "x": [95.0]}), "x")["inside"] is False


def test_seed_comparison_several_seeds_is_welch_and_one_base_seed_is_refused():
    from scipy import stats

    a, b = [92.66, 93.06, 92.80], [92.1, 92.4, 91.9]
    got = course.seed_comparison(_runs_with({"none": a, "se": b}), "se")
    want = stats.ttest_ind(b, a, equal_var=False)
    assert got["test"] == "welch" and got["p_value"] == pytest.approx(want.pvalue)
    with pytest.raises(ValueError, match="at least two"):
        course.seed_comparison(_runs_with({"none": [92.0], "se": b}), "se")


def test_full_mode_note_sums_the_plan_and_says_it_is_an_estimate():
    plan = {"none": (0, 1, 2), "se": (0,)}
    note = course.full_mode_note(plan)
    parts = [course.full_mode_estimate([n], s) for n, s in plan.items()]
    t4 = sum(p["T4-class minutes"] for p in parts)
    assert note.startswith("full mode trains 4 runs of 20 epochs; estimated training time (not measured)")
    assert f"about {t4:.0f} min on a T4" in note
    with pytest.raises(TypeError, match="expected plan as a dict"):
        course.full_mode_note(["none"])
