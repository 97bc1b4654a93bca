"""Full mode (``FULL = True``) of every chapter runs, at toy size, through ``python -m attn_lib chapter``.

With ``ATTN_LIB_TOY=1`` the runs that full mode trains shrink (synthetic data, one epoch, a narrow network);
the code that runs is the same as on a GPU. The chapters run two at a time in subprocesses. For each
chapter the test knows which runs full mode must train: every network and seed of every training call
the chapter makes, as recorded in quick mode (``attn_lib/results/chapters-cpu.json``, the runs its
full-mode time estimate counts); each must be trained afresh, and each training cell must get it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attn_lib import chapters

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted(p.stem for p in (REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _run(name: str, runs: Path, report: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTN_LIB_TOY": "1", "ATTN_LIB_RUNS_DIR": str(runs), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "attn_lib", "chapter", "run", name, "--full", "--json-out", str(report)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    root = tmp_path_factory.mktemp("full-mode")

    def one(name: str):
        runs, report = root / name, root / f"{name}.json"
        return name, (_run(name, runs, report), runs, report)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, CHAPTERS))


def _expected_runs(name: str) -> dict[tuple[str, str, int], str]:
    """``{(training call's chapter, network, seed): run folder}`` for every run full mode must train,
    from what quick mode recorded its training cells asking :func:`attn_lib.course.train_or_load` for."""
    from attn_lib import results

    rows = {row["chapter"]: row for row in results.load("chapters-cpu")["rows"]}
    assert name in rows, f"{name}: not in chapters-cpu.json; record it with python -m attn_lib chapter time"
    return {(plan["chapter"], net, seed): f"{plan['chapter']}/{net}-s{seed}"
            for plan in rows[name]["planned"] for net in plan["names"] for seed in plan["seeds"]}


def test_the_expected_runs_cover_every_training_call():
    """The reference the full-mode test checks against names every call, e.g. chapter 6's two and
    chapter 9's three experiment groups."""
    assert {k[0] for k in _expected_runs("06_nonlocal")} == {"06_nonlocal"}
    assert {k[1] for k in _expected_runs("06_nonlocal")} == {"none", "nonlocal"}
    assert len({k[0] for k in _expected_runs("09_comparison")}) == 3


@pytest.mark.parametrize("name", CHAPTERS)
def test_full_mode_trains_every_run_afresh_and_the_chapter_uses_them(full_runs, name):
    proc, runs, report = full_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads(report.read_text())
    expected = _expected_runs(name)
    planned = {(p["chapter"], net, seed) for p in done["planned"] for net in p["names"] for seed in p["seeds"]}
    assert planned == set(expected), (f"{name}: full mode asked for other runs than quick mode records; if the "
                                      f"chapter changed, record it again with python -m attn_lib chapter time")
    # every run folder, and nothing else, trained now: a toy run (synthetic data, one epoch)
    folders = {str(p.parent.relative_to(runs)) for p in runs.rglob("history.json")}
    assert folders == set(expected.values()), f"{name}: run folders {sorted(folders)}"
    for folder in folders:
        history = json.loads((runs / folder / "history.json").read_text())
        assert history["config"]["dataset"] == "synthetic" and history["config"]["epochs"] == 1, folder
        assert len(history["epochs"]) == 1, folder
    # every run each training cell got is one of those, freshly trained, never a recorded one
    got = {(r["chapter"], r["name"], r["seed"]): r for r in done["runs"]}
    assert set(got) == set(expected), f"{name}: the training cells got {sorted(got)}"
    stale = [key for key, r in got.items() if not (r["trained_now"] and r["dataset"] == "synthetic"
                                                   and r["epochs"] == 1)]
    assert not stale, f"{name}: recorded, not freshly trained: {stale}"
    assert len(done["runs"]) == len(got), f"{name}: a training call returned a run twice"


def test_chapter_command_finds_chapters_by_number_and_refuses_unknown_ones():
    assert chapters.chapter_path("1").stem == CHAPTERS[0]
    assert chapters.chapter_path(CHAPTERS[-1]).stem == CHAPTERS[-1]
    with pytest.raises(chapters.ChapterError, match="unknown chapter 'nope'; expected one of"):
        chapters.chapter_path("nope")


def test_code_cells_sets_the_switch_and_drops_magics(tmp_path):
    cells = [{"cell_type": "code", "source": ["FULL = False  # quick\n", "%pip install x\n", "a = 1\n"]},
             {"cell_type": "markdown", "source": ["FULL = False"]},
             {"cell_type": "code", "source": ["b = a + 1\n"]}]
    path = tmp_path / "99_toy.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert chapters.code_cells(path, full=True) == ["FULL = True  # quick\npass\na = 1", "b = a + 1"]
    path.write_text(json.dumps({"cells": cells[2:]}))
    with pytest.raises(chapters.ChapterError, match="first code cell must set FULL"):
        chapters.code_cells(path, full=True)
    path.write_text("{not json")
    with pytest.raises(chapters.ChapterError, match="cannot read"):
        chapters.code_cells(path, full=False)
