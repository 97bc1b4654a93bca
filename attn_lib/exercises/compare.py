"""Checkers for the exercises of the comparison chapter (``notebooks/09_comparison``).

    from attn_lib.exercises import compare
    report = compare.check_paired_interval(paired_interval)  # mean difference and its 95% CI
    report = compare.check_seeds_needed(my_seeds_needed)     # seeds for a paired t-test
    report = compare.check_faster_than_pixels(my_answer)     # whose cost outgrows the image

:func:`check_paired_interval` compares the student's interval with ``scipy.stats.ttest_rel`` on
the recorded GPU runs and on made-up ones; when it differs it recomputes the interval with the
usual mistakes (unpaired, a normal quantile instead of Student's t, the population standard
deviation, the difference the wrong way round) and names the one the student's matches.
:func:`check_seeds_needed` compares with :func:`attn_lib.compare.seeds_needed` (a simulation
may be off by one seed). :func:`check_faster_than_pixels` counts the multiply-adds each mechanism
adds to a width-16 ResNet-18 at 32x32 and 64x64 pixels. Each returns a
:class:`~attn_lib.exercises.report.Report` and never raises because the answer is wrong.
"""
from __future__ import annotations

import numbers

import numpy as np

from .report import Report, validate_checkers

__all__ = ["check_paired_interval", "check_seeds_needed", "check_faster_than_pixels",
           "growth_when_doubled"]

#: The mechanisms :func:`check_faster_than_pixels` asks about.
CANDIDATES = ("se", "eca", "sk", "cbam", "danet", "nonlocal", "dia")


# ----------------------------------------------------------------------------- paired interval
def _intervals(plain: np.ndarray, attention: np.ndarray, confidence: float) -> dict:
    """The right interval and the usual wrong ones, each as (mean, low, high)."""
    from scipy import stats

    d = attention - plain
    n = len(d)
    right = stats.ttest_rel(attention, plain).confidence_interval(confidence)
    unpaired = stats.ttest_ind(attention, plain).confidence_interval(confidence)
    z = stats.norm.ppf(0.5 + confidence / 2) * stats.sem(d)
    ddof0 = stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(d) / np.sqrt(n)
    mean = float(d.mean())
    return {"right": (mean, right.low, right.high),
            "unpaired (ttest_ind: the seeds' pairing is thrown away)":
                (mean, unpaired.low, unpaired.high),
            "a normal quantile (1.96) instead of Student's t with n - 1 degrees of freedom":
                (mean, mean - z, mean + z),
            "the population standard deviation (ddof=0) instead of the sample one":
                (mean, mean - ddof0, mean + ddof0),
            "plain minus attention: the difference the wrong way round":
                (-mean, -right.high, -right.low)}


def _paired_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    from .. import results
    from ..course import final_values

    cases = []
    try:
        values = final_values(results.load_runs("cifar10-h200-r18"))
        seeds = sorted(set(values["none"]) & set(values["se"]))
        cases.append(("the recorded GPU runs, SE against plain",
                      np.array([values["none"][s] for s in seeds]),
                      np.array([values["se"][s] for s in seeds])))
    except (FileNotFoundError, KeyError):
        pass
    rng = np.random.default_rng(0)
    for n in (3, 5, 10):
        plain = 90 + rng.normal(0, 0.3, n)
        cases.append((f"{n} made-up seeds", plain, plain + 0.2 + rng.normal(0, 0.25, n)))
    return cases


def check_paired_interval(fn, confidence: float = 0.95) -> Report:
    """``fn(plain, attention, confidence)`` -> ``(mean, low, high)``: the mean of
    ``attention - plain`` over seeds and its confidence interval from a paired t-test."""
    report = Report("paired_interval(plain, attention, confidence): the mean difference and its CI")
    for what, plain, attention in _paired_cases():
        def one(plain=plain, attention=attention):
            got = fn(plain.copy(), attention.copy(), confidence)
            assert isinstance(got, (tuple, list)) and len(got) == 3, (
                f"expected (mean, low, high), got {got!r}")
            got = tuple(float(v) for v in got)
            options = _intervals(plain, attention, confidence)
            if np.allclose(got, options["right"], rtol=0, atol=1e-6):
                mean, low, high = got
                return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"
            for mistake, values in options.items():
                if mistake != "right" and np.allclose(got, values, rtol=0, atol=1e-6):
                    raise AssertionError(f"your interval matches {mistake}")
            mean, low, high = options["right"]
            raise AssertionError(f"expected {mean:+.3f} [{low:+.3f}, {high:+.3f}], got "
                                 f"{got[0]:+.3f} [{got[1]:+.3f}, {got[2]:+.3f}]")
        report.run(what, one)
    return report


# ----------------------------------------------------------------------------- seeds needed
def check_seeds_needed(fn) -> Report:
    """``fn(std, difference)`` -> the fewest seeds per network for a two-sided paired t-test at
    the 5% level to detect ``difference`` with 80% power, per-seed differences of spread ``std``."""
    from ..compare import seeds_needed

    report = Report("my_seeds_needed(std, difference): seeds for 80% power at the 5% level")
    for std, difference in ((0.3, 0.2), (0.3, 0.5), (0.2, 0.5), (0.5, 0.2), (1.0, 2.0)):
        def one(std=std, difference=difference):
            got = fn(std, difference)
            assert isinstance(got, numbers.Integral) and not isinstance(got, bool), (
                f"expected a whole number of seeds, got {got!r}")
            expected = seeds_needed(std, difference)
            normal = int(np.ceil(((1.959964 + 0.841621) * std / difference) ** 2))
            if got == expected:
                return f"{expected} seeds"
            if abs(got - expected) == 1:
                return f"{got} seeds (exact: {expected}; within one seed, as a simulation may be)"
            if got == normal:
                raise AssertionError(f"{got} is the normal approximation ((z_a + z_b) std / d)^2; "
                                     f"with few seeds Student's t needs more: {expected}")
            raise AssertionError(f"expected {expected} seeds, got {got}")
        report.run(f"std {std}, difference {difference}", one)
    return report


# ----------------------------------------------------------------------------- cost growth
def growth_when_doubled(names=CANDIDATES, width: int = 16) -> dict[str, float]:
    """How much each mechanism's added multiply-adds grow when a ResNet-18 (``width``) gets
    images of 64x64 pixels instead of 32x32 (4 times the pixels), counted by
    :func:`attn_lib.course.count_macs`."""
    from ..course import count_macs
    from ..models import resnet18

    def macs(attention, side):
        return count_macs(resnet18(10, attention, width=width).eval(), (1, 3, side, side))

    base = {side: macs(None, side) for side in (32, 64)}
    return {name: (macs(name, 64) - base[64]) / (macs(name, 32) - base[32]) for name in names}


def check_faster_than_pixels(answer) -> Report:
    """``answer()`` -> the set of mechanisms (of :data:`CANDIDATES`) whose added multiply-adds grow
    by more than 4x when the image side doubles from 32 to 64 pixels."""
    report = Report("which mechanisms' added cost grows faster than the number of pixels?")
    chosen = {}

    def form():
        got = answer() if callable(answer) else answer
        assert isinstance(got, (set, list, tuple, frozenset)) and all(
            isinstance(n, str) for n in got), f"expected a set of names such as {{'se'}}, got {got!r}"
        unknown = sorted(set(got) - set(CANDIDATES))
        assert not unknown, f"unknown names {unknown}; choose among {', '.join(CANDIDATES)}"
        chosen["names"] = set(got)
        return ", ".join(sorted(got)) or "none of them"

    if not report.run("answer", form):
        return report
    growth = growth_when_doubled()
    for name in CANDIDATES:
        def one(name=name):
            faster = growth[name] > 4 * 1.01
            said = name in chosen["names"]
            reason = {True: "every position is compared with every other: N^2 grows 16x",
                      False: "its cost is per pixel (4x) or per channel (1x)"}[faster]
            assert said == faster, (f"{name} grows {growth[name]:.2f}x: "
                                    f"{'more' if faster else 'not more'} than 4x ({reason})")
            return f"{growth[name]:.2f}x"
        report.run(name, one)
    return report


validate_checkers(globals())
