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
