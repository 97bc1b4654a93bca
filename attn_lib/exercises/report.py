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


def expect_arguments(checker: str, *, cls=None, fn=None, **numbers) -> None:
    """The arguments every checker takes, checked before any check runs: one clear exception.

    ``cls``: a class (or factory) the checker will build, not an instance; ``fn``: a function;
    ``numbers``: positive integers (``channels=32``) or booleans (a value that is already a
    ``bool``). Raises ``TypeError`` for a wrong kind of argument, ``ValueError`` for a number
    out of range, each naming the checker, the argument, what was expected and what came."""
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
        if isinstance(value, bool):
            continue
        if not isinstance(value, int):
            raise TypeError(f"{checker}: expected {name} as an integer, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{checker}: expected {name} >= 1, got {value}")
