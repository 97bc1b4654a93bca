"""Full mode (``FULL = True``) of every chapter runs, at toy size, through ``python -m attn_lib chapter``.

With ``ATTN_LIB_TOY=1`` the runs that full mode trains shrink (synthetic data, one epoch, a narrow network);
the code that runs is the same as on a GPU. The chapters run two at a time in subprocesses.
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


def _run(name: str, runs: Path, full: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "ATTN_LIB_TOY": "1", "ATTN_LIB_RUNS_DIR": str(runs), "MPLBACKEND": "Agg",
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "attn_lib", "chapter", "run", name] + (["--full"] if full else [])
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    root = tmp_path_factory.mktemp("full-mode")
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = pool.map(lambda name: (name, _run(name, root)), CHAPTERS)
        return {name: (proc, root / name) for name, proc in done}


@pytest.mark.parametrize("name", CHAPTERS)
def test_full_mode_runs_and_uses_the_fresh_runs(full_runs, name):
    proc, runs = full_runs[name]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    histories = sorted(runs.rglob("history.json"))
    assert histories, f"{name}: full mode trained nothing under {runs}"
    for path in histories:
        history = json.loads(path.read_text())
        assert history["config"]["dataset"] == "synthetic" and history["config"]["epochs"] == 1, path
    assert "trained in this session" in proc.stdout, f"{name}: no cell showed the freshly trained runs"


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
