"""Run a chapter as a plain Python script, without Jupyter: ``python -m attn_lib chapter run 02_se``.

A GPU machine often has PyTorch but no Jupyter. This reads the chapter's ``.ipynb`` (it is JSON),
sets the first cell's switch (``FULL = True`` with ``--full``), and executes the code cells in order
in one namespace, in the ``notebooks/`` folder as a kernel would, with figures drawn off-screen.
Training cells write their runs where the chapter expects them (``runs/<chapter>/`` at the root of
the checkout), so a later run of the notebook itself resumes or reuses them.

    python -m attn_lib chapter list
    python -m attn_lib chapter time --out attn_lib/results/chapters-cpu.json   # quick mode, timed
    python -m attn_lib chapter run 05_danet --full          # full mode, on the GPU if there is one
    ATTN_LIB_TOY=1 python -m attn_lib chapter run 05_danet --full   # the same code at toy size

``--json-out FILE`` also writes the runs full mode planned (``planned``) and, for every network and
seed each training cell got, whether it was trained now or recorded (``runs``).
"""
from __future__ import annotations

import builtins
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path

__all__ = ["ChapterError", "chapter_path", "code_cells", "list_chapters", "run_chapter", "time_chapters"]

FULL_SWITCH = re.compile(r"^FULL\s*=\s*(True|False)\b", re.M)


class ChapterError(RuntimeError):
    """A chapter could not be found, read, or run; the message says which cell failed."""


def _notebooks_dir() -> Path:
    """``notebooks/`` of the course checkout that contains the working directory, else of the
    checkout this package is installed from (an editable install), else the working directory."""
    here = Path.cwd().resolve()
    package_root = Path(__file__).resolve().parents[1]
    for folder in (*[f / "notebooks" for f in (here, *here.parents) if (f / "_toc.yml").is_file()],
                   package_root / "notebooks", here):
        if any(folder.glob("[0-9][0-9]_*.ipynb")):
            return folder
    raise ChapterError("no chapters found: run this from the course's checkout (the folder with notebooks/)")


def list_chapters() -> list[str]:
    """The chapters' names (``01_baseline``, ``02_se``, ...), in course order."""
    return sorted(p.stem for p in _notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def chapter_path(name: str | Path) -> Path:
    """The notebook of chapter ``name``: its full name, its number (``5``), a unique prefix, or the
    path of a notebook file (a student's copy, say)."""
    if str(name).endswith(".ipynb") and Path(name).is_file():
        return Path(name)
    names = list_chapters()
    key = str(name).removesuffix(".ipynb")
    if key.isdigit():
        key = f"{int(key):02d}_"
    matches = [n for n in names if n == key] or [n for n in names if n.startswith(key)]
    if len(matches) != 1:
        raise ChapterError(f"unknown chapter {name!r}; expected one of {', '.join(names)}")
    return _notebooks_dir() / f"{matches[0]}.ipynb"


def code_cells(path: Path, full: bool, until_tag: str | None = None) -> list[str]:
    """The chapter's code cells as Python source, with the first cell's switch set to ``full``;
    with ``until_tag``, only those before the first cell carrying that tag (``"exercise-stub"``:
    what a student's copy runs before its first exercise).

    IPython-only lines (``%magic``, ``!shell``) become ``pass`` (the course's chapters need none of
    them outside Colab's install branch).
    """
    try:
        notebook = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ChapterError(f"cannot read {path}: {err}") from err
    every = notebook.get("cells", [])
    if until_tag is not None:
        stop = next((i for i, c in enumerate(every) if until_tag in c.get("metadata", {}).get("tags", [])), None)
        if stop is None:
            raise ChapterError(f"{path}: no cell is tagged {until_tag!r}")
        every = every[:stop]
    cells = ["".join(c["source"]) for c in every if c.get("cell_type") == "code"]
    if not cells or not FULL_SWITCH.search(cells[0]):
        raise ChapterError(f"{path}: the first code cell must set FULL = True/False")
    cells[0] = FULL_SWITCH.sub(f"FULL = {full}", cells[0], count=1)
    return [strip_magics(cell) for cell in cells]


def strip_magics(source: str) -> str:
    """``source`` with each IPython-only line (``%magic``, ``!shell``) replaced by ``pass``."""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        body = line.lstrip()
        if body.startswith(("%", "!")):
            lines[i] = line[: len(line) - len(body)] + "pass"
    return "\n".join(lines)


def run_chapter(name: str | Path, full: bool = False, log=print, until_tag: str | None = None,
                workdir: str | Path | None = None) -> dict:
    """Execute chapter ``name`` as a script; returns ``{"cells": n, "seconds": t, "runs": [...]}``.

    ``until_tag``: stop before the first cell with that tag (see :func:`code_cells`). ``workdir``:
    where the cells run (default: the notebook's folder, as a kernel would). ``runs`` lists what
    each call of :func:`attn_lib.course.train_or_load` gave the chapter, one entry per network and
    seed: ``{"chapter", "name", "seed", "trained_now", "dataset", "epochs"}``, so that a caller
    can check that full mode's cells got freshly trained runs, not recorded ones.

    Raises :class:`ChapterError` naming the cell (its number among the code cells and first line)
    when one fails.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import course

    path = chapter_path(name)
    cells = code_cells(path, full, until_tag=until_tag)
    namespace = {"__name__": "__main__", "display": _display}
    start, cwd = time.perf_counter(), Path.cwd()
    del course.DELIVERED_RUNS[:]
    os.chdir(workdir or path.parent)
    try:
        for i, source in enumerate(cells, start=1):
            first = next((ln for ln in source.splitlines() if ln.strip()), "")[:70]
            log(f"[{path.stem}] cell {i}/{len(cells)}: {first}")
            try:
                exec(compile(source, f"<{path.stem} cell {i}>", "exec"), namespace)
            except Exception as err:
                detail = "".join(traceback.format_exception_only(type(err), err)).strip()
                raise ChapterError(f"{path.stem}, code cell {i} ({first!r}) failed: {detail}") from err
            finally:
                plt.close("all")
    finally:
        os.chdir(cwd)
    return {"cells": len(cells), "seconds": time.perf_counter() - start,
            "runs": list(course.DELIVERED_RUNS)}


def _display(*objects, **_kwargs) -> None:
    """IPython's ``display`` outside IPython: print what can be printed."""
    for obj in objects:
        builtins.print(obj if isinstance(obj, str) else repr(obj))


def time_chapters(names: list[str] | None = None, command: str | None = None) -> dict:
    """Run each chapter in quick mode in a fresh process; record its time and what its full mode
    would train, with full mode's estimated time on H100- and T4-class GPUs."""
    import subprocess
    import tempfile

    import torch

    from .course import PLANNED_RUNS, full_mode_estimate
    from .provenance import provenance

    rows = []
    for name in names or list_chapters():
        stem = chapter_path(name).stem
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run.json"
            done = subprocess.run([sys.executable, "-m", "attn_lib", "chapter", "run", stem, "--json-out", str(out)],
                                  capture_output=True, text=True, env={**os.environ, "MPLBACKEND": "Agg"})
            if done.returncode != 0:
                raise ChapterError(f"{stem} failed in quick mode: {done.stderr.strip()[-1500:]}")
            row = json.loads(out.read_text())
            row.pop("runs", None)  # quick mode's recorded runs: not part of the timing record
        estimate = {"H100-class minutes": 0.0, "T4-class minutes": 0.0}
        for plan in row["planned"]:
            got = full_mode_estimate(plan["names"], plan["seeds"], model=plan["model"],
                                     epochs=plan.get("epochs"),
                                     train_images=plan.get("train_images", 45_000))
            for key in estimate:
                estimate[key] += got[key]
        row["full_mode_estimate"] = estimate
        rows.append(row)
    del PLANNED_RUNS[:]
    return {**provenance(torch.device("cpu"), None, command), "benchmark": "chapters",
            "what": "wall-clock seconds of each chapter's quick mode run as a script (python -m attn_lib "
                    "chapter run), one at a time; full mode's training time estimated by "
                    "attn_lib.course.full_mode_estimate from the recorded GPU benchmarks",
            "rows": rows}


def times_table(record: dict) -> str:
    """The Markdown table of a ``chapter time`` record, for the teachers' page."""
    from . import results
    from .classroom import exercises

    lines = ["| chapter | quick mode, CPU (measured) | full mode, H100-class GPU (estimated) | "
             "full mode, T4-class GPU (estimated) | graded exercises |", "|---|---|---|---|---|"]
    for row in record["rows"]:
        est = row["full_mode_estimate"]
        lines.append(f"| {row['chapter']} | {row['seconds']:.0f} s | {est['H100-class minutes']:.0f} min | "
                     f"{est['T4-class minutes']:.0f} min | {len(exercises(row['chapter']))} |")
    commit = results.commit_label(record)
    lines += ["", f"Quick mode: wall-clock time of each chapter run as a script, one at a time, on "
                  f"{record['device_name']} (torch {record['torch']}, commit {commit}), recorded in "
                  f"`attn_lib/results/chapters-cpu.json` by `{record['command']}`. Full mode: the training "
                  f"its runs need, estimated from the GPU benchmarks recorded on an NVIDIA H200 "
                  f"(`attn_lib.course.full_mode_estimate`: an H100 has the same compute; a T4 is scaled by "
                  f"data-sheet peak), without start-up and evaluation."]
    return "\n".join(lines) + "\n"


def main(args) -> int:
    """The ``chapter`` subcommand of the CLI."""
    if args.action == "list":
        print("\n".join(list_chapters()))
        return 0
    try:
        if args.action == "time":
            record = time_chapters([args.name] if args.name else None, command=args.command_line)
            text = json.dumps(record, indent=1) + "\n"
            if args.out:
                Path(args.out).write_text(text)
            if args.table:
                Path(args.table).write_text(times_table(record))
            for row in record["rows"]:
                est = row["full_mode_estimate"]
                print(f"{row['chapter']}: quick mode {row['seconds']:.0f} s; full mode about "
                      f"{est['H100-class minutes']:.0f} min (H100-class), {est['T4-class minutes']:.0f} min "
                      f"(T4-class), estimated")
            return 0
        done = run_chapter(args.name, full=args.full)
    except ChapterError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.json_out:
        from .course import PLANNED_RUNS

        Path(args.json_out).write_text(json.dumps({"chapter": chapter_path(args.name).stem, **done,
                                                   "planned": PLANNED_RUNS}))
    print(f"{args.name}: {done['cells']} code cells in {done['seconds']:.0f} s "
          f"({'full' if args.full else 'quick'} mode)")
    return 0
