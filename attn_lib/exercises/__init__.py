"""Checkers for the chapters' exercises: run a student's code against the reference and say
what is right and what is wrong.

    from attn_lib.exercises import se
    report = se.check_squeeze_excitation(MySE)   # prints a report; report.passed is True/False

Each chapter has its own module here (``baseline``, ``se``, ``sk``, ``cbam``, ``danet``,
``non_local``, ``dia``, ``triple``, ``compare``). A checker never raises because the student's code is wrong: every failure becomes a line
in the report.
"""
from .report import Report

__all__ = ["Report"]
