"""The report a checker returns: named checks, each passed or failed with a reason."""
from __future__ import annotations

import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Report:
    title: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, bool(ok), detail))
        return bool(ok)

    def run(self, name: str, fn: Callable[[], str | None]) -> bool:
        """Run ``fn``; it passes unless it raises. An ``AssertionError``'s message (or any other
        exception's last line) becomes the reason; a returned string becomes the detail."""
        try:
            detail = fn()
            return self.add(name, True, detail or "")
        except AssertionError as err:
            return self.add(name, False, str(err) or "assertion failed")
        except NotImplementedError as err:
            return self.add(name, False, f"not implemented yet: {err}")
        except Exception as err:  # noqa: BLE001 - the student's code may raise anything
            where = traceback.extract_tb(err.__traceback__)[-1]
            return self.add(name, False, f"{type(err).__name__}: {err} (line {where.lineno} of {where.name})")

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(ok for _, ok, _ in self.checks)

    #: Reports are wrapped to this many columns, so that they read without scrolling in the book.
    WIDTH = 88

    def __str__(self) -> str:
        import textwrap

        lines = textwrap.wrap(self.title, self.WIDTH, subsequent_indent="  ", break_on_hyphens=False)
        for name, ok, detail in self.checks:
            line = f"  {'✓' if ok else '✗'} {name}" + (f": {detail}" if detail else "")
            lines += textwrap.wrap(line, self.WIDTH, subsequent_indent="      ", break_on_hyphens=False,
                                   break_long_words=False)
        n_ok = sum(ok for _, ok, _ in self.checks)
        lines.append(f"  {n_ok}/{len(self.checks)} checks passed" + (" — well done!" if self.passed else ""))
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle):  # IPython shows the report, not the dataclass
        p.text(str(self))


def call_module(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, taking ``y`` from a module that returns ``(y, attention)`` by default."""
    out = module(x)
    if isinstance(out, tuple):
        out = out[0]
    assert isinstance(out, torch.Tensor), f"expected forward to return a tensor, got {type(out).__name__}"
    return out


def compare(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6) -> str:
    """``assert_close`` with a message for students: the shapes, or the largest difference."""
    assert isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}"
    assert got.shape == expected.shape, f"{what}: expected shape {list(expected.shape)}, got {list(got.shape)}"
    diff = (got.double() - expected.double()).abs().max().item()
    assert torch.allclose(got.double(), expected.double(), rtol=rtol, atol=atol), \
        f"{what}: values differ from the reference (max abs difference {diff:.3g})"
    return f"matches (max abs difference {diff:.1e})"


#: Ranges of the real-valued checker arguments that have one (others: any finite number), as
#: ``name: (test, what is allowed)``.
REAL_RANGES = {
    "confidence": (lambda v: 0 < v < 1, "strictly between 0 and 1, e.g. 0.95"),
    "aux_weight": (lambda v: v >= 0, ">= 0"),
}


def expect_arguments(checker: str, *, cls=None, fn=None, reals: dict | None = None, flags: dict | None = None,
                     **numbers) -> None:
    """The arguments every checker takes, checked before any check runs: one clear exception.

    ``cls``: a class (or factory) the checker will build, not an instance; ``fn``: a function;
    ``numbers``: positive integers (``channels=32``; not ``True``, which Python counts as 1);
    ``reals``: finite real numbers (``confidence=0.95``), within
    :data:`REAL_RANGES` where their name has a range; ``flags``: ``True`` or ``False``
    (``official=True``). Raises ``TypeError`` for a wrong kind of argument, ``ValueError`` for a
    number out of range, each naming the checker, the argument, what was expected and what came."""
    import math
    import numbers as _numbers

    if cls is not None:
        if isinstance(cls, torch.nn.Module):
            name = type(cls).__name__
            raise TypeError(f"{checker}: expected the class itself, got an instance of {name}: pass {name}, "
                            f"not {name}(...); the checker builds it with its own sizes")
        if not callable(cls):
            raise TypeError(f"{checker}: expected a class to build (an nn.Module subclass), got "
                            f"{type(cls).__name__} {cls!r}")
    if fn is not None and not callable(fn):
        raise TypeError(f"{checker}: expected a function, got {type(fn).__name__} {fn!r}")
    for name, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{checker}: expected {name} as an integer, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{checker}: expected {name} >= 1, got {value}")
    for name, value in (reals or {}).items():
        test, allowed = REAL_RANGES.get(name, (lambda v: True, ""))
        wanted = f"{name} as a finite number" + (f" {allowed}" if allowed else "")
        if isinstance(value, bool) or not isinstance(value, _numbers.Real):
            raise TypeError(f"{checker}: expected {wanted}, got {type(value).__name__} {value!r}")
        if not math.isfinite(value) or not test(value):
            raise ValueError(f"{checker}: expected {wanted}, got {value!r}")
    for name, value in (flags or {}).items():
        if not isinstance(value, bool):
            raise TypeError(f"{checker}: expected {name} as True or False, got {type(value).__name__} {value!r}")


#: The first parameter of a checker that receives the student's class, or the student's function.
_CLASS_PARAMETERS, _FUNCTION_PARAMETERS = ("cls",), ("fn", "select", "step")


def validate_checkers(namespace: dict) -> None:
    """Wrap every ``check_*`` function of a checker module so that its arguments go through
    :func:`expect_arguments` first: a class where a class is expected (not an instance), a function
    where a function is expected, ``int`` parameters as positive integers (not ``True``),
    ``float`` parameters as finite numbers in their range, ``bool`` parameters as ``True`` or
    ``False``. Answers (a set of letters, a dict of shapes) are left to the checker, which reports
    on them."""
    import functools
    import inspect

    def of_type(params, kind) -> list[str]:
        return [p.name for p in params[1:] if p.annotation in (kind, kind.__name__)]

    for name, checker in list(namespace.items()):
        if not (name.startswith("check_") and inspect.isfunction(checker)) or hasattr(checker, "__wrapped__"):
            continue
        signature = inspect.signature(checker)
        params = list(signature.parameters.values())
        kinds_of = {"int": of_type(params, int), "float": of_type(params, float), "bool": of_type(params, bool)}

        @functools.wraps(checker)
        def wrapper(*args, _checker=checker, _signature=signature, _params=params, _kinds=kinds_of, **kwargs):
            try:
                bound = _signature.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{_checker.__name__}{_signature}: {err}") from None
            bound.apply_defaults()
            given = bound.arguments
            first = _params[0].name
            kinds = {"cls": given[first]} if first in _CLASS_PARAMETERS else \
                {"fn": given[first]} if first in _FUNCTION_PARAMETERS else {}
            expect_arguments(_checker.__name__, **kinds, reals={n: given[n] for n in _kinds["float"]},
                             flags={n: given[n] for n in _kinds["bool"]}, **{n: given[n] for n in _kinds["int"]})
            return _checker(*args, **kwargs)

        namespace[name] = wrapper
