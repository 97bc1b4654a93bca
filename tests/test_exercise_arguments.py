"""Every checker answers a wrong kind of argument with one clear exception, before any check runs."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from torch import nn

import attn_lib.exercises as exercises

MODULES = sorted(m.name for m in pkgutil.iter_modules(exercises.__path__) if m.name != "report")
CHECKERS = [(m, name, fn) for m in MODULES
            for name, fn in vars(importlib.import_module(f"attn_lib.exercises.{m}")).items()
            if name.startswith("check_") and callable(fn)]


def test_every_checker_module_is_covered():
    assert {"baseline", "se", "sk", "cbam", "danet", "non_local", "dia", "triple"} <= set(MODULES)
    assert all(hasattr(fn, "__wrapped__") for _, _, fn in CHECKERS), "a checker is not validated"


@pytest.mark.parametrize("module, name, checker", CHECKERS, ids=[f"{m}.{n}" for m, n, _ in CHECKERS])
def test_checker_refuses_the_wrong_kind_of_argument(module, name, checker):
    params = list(inspect.signature(checker).parameters.values())
    first = params[0].name
    if first == "cls":
        with pytest.raises(TypeError, match=f"{name}: expected the class itself, got an instance of Linear"):
            checker(nn.Linear(2, 2))
    elif first in ("fn", "select", "step"):
        with pytest.raises(TypeError, match=f"{name}: expected a function, got int 3"):
            checker(3)
    sizes = [p.name for p in params[1:] if p.annotation in (int, "int")]
    if sizes and first in ("cls", "fn", "select", "step"):
        with pytest.raises(ValueError, match=f"{name}: expected {sizes[0]} >= 1, got 0"):
            checker(nn.Module if first == "cls" else len, **{sizes[0]: 0})
    with pytest.raises(TypeError, match=name):
        checker(nn.Module, nn.Module, nn.Module, nn.Module, nn.Module, nn.Module, nn.Module)


def _typed(kind: str):
    return [(m, name, fn, p.name) for m, name, fn in CHECKERS
            for p in list(inspect.signature(fn).parameters.values())[1:] if p.annotation == kind]


REALS, FLAGS, SIZES = _typed("float"), _typed("bool"), _typed("int")


def _first_argument(checker):
    """A valid first argument of the right kind (it is never run: the arguments are refused first)."""
    first = next(iter(inspect.signature(checker).parameters))
    return nn.Module if first == "cls" else len if first in ("fn", "select", "step") else {}


def test_the_typed_arguments_are_found():
    assert {(name, param) for _, name, _, param in REALS} >= {("check_paired_interval", "confidence"),
                                                              ("check_training_step", "aux_weight")}
    assert ("check_cbam", "official") in {(name, param) for _, name, _, param in FLAGS}


@pytest.mark.parametrize("module, name, checker, param", REALS, ids=[f"{m}.{n}.{p}" for m, n, _, p in REALS])
def test_a_real_argument_must_be_a_finite_number(module, name, checker, param):
    first = _first_argument(checker)
    with pytest.raises(TypeError, match=f"{name}: expected {param} as a finite number.*got str 'x'"):
        checker(first, **{param: "x"})
    with pytest.raises(TypeError, match=f"{name}: expected {param} as a finite number.*got bool True"):
        checker(first, **{param: True})
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"{name}: expected {param} as a finite number.*got {bad}"):
            checker(first, **{param: bad})


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, -0.2])
def test_confidence_is_strictly_between_0_and_1(value):
    from attn_lib.exercises.compare import check_paired_interval

    with pytest.raises(ValueError, match=f"check_paired_interval: expected confidence as a finite number strictly "
                                         f"between 0 and 1, e.g. 0.95, got {value}"):
        check_paired_interval(len, confidence=value)


def test_a_negative_auxiliary_weight_is_refused():
    from attn_lib.exercises.triple import check_training_step

    with pytest.raises(ValueError, match="check_training_step: expected aux_weight as a finite number >= 0, got -1"):
        check_training_step(len, aux_weight=-1)


@pytest.mark.parametrize("module, name, checker, param", FLAGS, ids=[f"{m}.{n}.{p}" for m, n, _, p in FLAGS])
def test_a_flag_must_be_true_or_false(module, name, checker, param):
    first = _first_argument(checker)
    for bad, shown in (("yes", "str 'yes'"), (1, "int 1"), (None, "NoneType None")):
        with pytest.raises(TypeError, match=f"{name}: expected {param} as True or False, got {shown}"):
            checker(first, **{param: bad})


@pytest.mark.parametrize("module, name, checker, param", SIZES, ids=[f"{m}.{n}.{p}" for m, n, _, p in SIZES])
def test_a_size_is_not_a_bool(module, name, checker, param):
    with pytest.raises(TypeError, match=f"{name}: expected {param} as an integer, got bool True"):
        checker(_first_argument(checker), **{param: True})
