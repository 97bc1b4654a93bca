"""Hand the chapters out without their solutions, and grade what comes back.

    python -m attn_lib classroom export handout/               # student versions of every chapter
    python -m attn_lib classroom export teacher/ --keep-solutions --chapters 02 05
    python -m attn_lib classroom grade submissions/ --out grades.csv

The chapters mark their exercises with cell tags (the convention of nbgrader's solution cells and
Neuromatch's stubs): ``exercise-stub`` is the cell a student fills in (it raises
``NotImplementedError`` until then), ``exercise-check`` calls a checker from
:mod:`attn_lib.exercises` on the student's code, and every cell whose tags contain ``solution``
(code or markdown) is the answer. Exporting removes the solution cells; nothing else changes.

Grading runs, for each submitted notebook and in a fresh Python process with a time limit, on the
CPU and in quick mode, the chapter's set-up cells (the code cells before its first section) and its
exercise section, in order, with each ``exercise-check`` cell replaced by the course's own version
of that check (editing or deleting a check cell changes nothing). Each exercise scores its points
when every check of the checker's report passes. The student's code runs in the same process as the
checks, so this is a check of honest work, not a sandbox: a cell that rebinds a checker's name or
patches the package can fake a pass. A notebook that raises, loops, exits, is not a notebook or is a
malformed one scores what it earned until then, and the run goes on with the next one.
"""
from __future__ import annotations

import copy
import csv
import html
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["Exercise", "exercise_table", "exercises", "export", "grade", "is_solution"]

SOLUTION_TAG, STUB_TAG, CHECK_TAG = "solution", "exercise-stub", "exercise-check"
METADATA_KEY = "attn_lib"
EXERCISES_HEADING = re.compile(r"^##\s+Exercises\b", re.M)
SECTION_HEADING = re.compile(r"^##\s", re.M)
HEADING = re.compile(r"^#{2,3}\s", re.M)


def _tags(cell: dict) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def is_solution(cell: dict) -> bool:
    """A solution cell: any of its tags contains the word ``solution``."""
    return any(SOLUTION_TAG in tag for tag in _tags(cell))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def _read(path: Path) -> dict:
    try:
        notebook = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable notebook: {err}") from err
    if not isinstance(notebook, dict) or not isinstance(notebook.get("cells"), list):
        raise ValueError(f"{path} is not a notebook: expected a JSON object with a 'cells' list")
    problem = _malformed(notebook)
    if problem:
        raise ValueError(f"{path} is not a well-formed notebook: {problem}")
    return notebook


def _malformed(notebook: dict) -> str | None:
    """What is wrong with the structure this module relies on, or None: valid JSON can still hold a
    number where a cell's source should be, a cell that is not an object, tags that are not a list."""
    if not isinstance(notebook.get("metadata", {}), dict):
        return "its metadata is not an object"
    for i, cell in enumerate(notebook["cells"]):
        if not isinstance(cell, dict):
            return f"cell {i} is not an object"
        if not isinstance(cell.get("cell_type"), str):
            return f"cell {i} has no cell_type"
        source = cell.get("source", "")
        if not (isinstance(source, str) or (isinstance(source, list)
                                            and all(isinstance(line, str) for line in source))):
            return f"cell {i}'s source is neither text nor a list of lines"
        metadata = cell.get("metadata", {})
        if not isinstance(metadata, dict):
            return f"cell {i}'s metadata is not an object"
        tags = metadata.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
            return f"cell {i}'s tags are not a list of names"
    return None


def _chapters_dir() -> Path:
    from .chapters import chapter_path

    return chapter_path("1").parent


def _select(chapters: Sequence[str] | None) -> list[Path]:
    from .chapters import chapter_path, list_chapters

    return [chapter_path(c) for c in (chapters or list_chapters())]


# ----------------------------------------------------------------------------- export
def export(out_dir: str | Path, chapters: Sequence[str] | None = None, keep_solutions: bool = False) -> list[Path]:
    """Write the student version of each chapter into ``out_dir``; returns the files written.

    Solution cells (code and markdown) are removed, with their outputs; every other cell is kept as
    it is. ``keep_solutions=True`` writes the teacher's copy instead (everything kept). Each
    notebook records its chapter in ``metadata["attn_lib"]["chapter"]``, which the grader reads.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in _select(chapters):
        notebook = _read(path)
        student = copy.deepcopy(notebook)
        if not keep_solutions:
            student["cells"] = [c for c in student["cells"] if not is_solution(c)]
        student.setdefault("metadata", {})[METADATA_KEY] = {
            "chapter": path.stem, "version": "teacher" if keep_solutions else "student"}
        target = out / path.name
        target.write_text(json.dumps(student, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(target)
    return written


# ----------------------------------------------------------------------------- the exercises
@dataclass(frozen=True)
class Exercise:
    chapter: str
    number: int  # order of the check among the chapter's checks, from 1
    title: str  # the "### Exercise N: ..." heading above the check
    check: str  # the course's source of the check cell
    points: int = 1

    @property
    def key(self) -> str:
        return f"{self.chapter}:{self.number}"


def exercises(chapter: str | Path) -> list[Exercise]:
    """The graded exercises of a chapter: one per ``exercise-check`` cell, in order."""
    path = Path(chapter) if str(chapter).endswith(".ipynb") else _select([str(chapter)])[0]
    found, title = [], ""
    for cell in _read(path)["cells"]:
        if cell.get("cell_type") == "markdown":
            heading = re.search(r"^###\s+(.+)$", _source(cell), re.M)
            title = heading.group(1).strip() if heading else title
        elif CHECK_TAG in _tags(cell) and not is_solution(cell):
            points = int(cell.get("metadata", {}).get("points", 1))
            found.append(Exercise(path.stem, len(found) + 1, title, _source(cell), points))
    return found


def _graded_cells(notebook: dict, checks: list[Exercise]) -> list[tuple[str, str | None]]:
    """``(source, exercise key or None)`` to run: the set-up cells, then the exercise section.

    The student's check cells are not run; the course's version of each check runs at the end of
    its exercise (before the next heading), after everything the student wrote for it. Grading is
    quick mode: a ``FULL = True`` line in the student's cells (the set-up cell's switch) is run as
    ``FULL = False``, and the child process resets ``FULL`` after every cell.
    """
    from .chapters import FULL_SWITCH

    cells = notebook["cells"]
    first_section = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown"
                          and SECTION_HEADING.search(_source(c))), len(cells))
    exercises_at = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown"
                         and EXERCISES_HEADING.search(_source(c))), len(cells))
    run: list[tuple[str, str | None]] = []
    pending: list[Exercise] = []
    n_checks = 0
    for i, cell in enumerate(cells):
        if not (i < first_section or i > exercises_at):
            continue
        if cell.get("cell_type") == "markdown":
            if HEADING.search(_source(cell)):
                run += [(ex.check, ex.key) for ex in pending]
                pending = []
        elif cell.get("cell_type") == "code":
            if CHECK_TAG in _tags(cell):
                if n_checks < len(checks):
                    pending.append(checks[n_checks])
                n_checks += 1
            else:
                run.append((FULL_SWITCH.sub("FULL = False", _source(cell)), None))
    pending += checks[n_checks:]  # a check cell the student deleted is still run, at the end
    return run + [(ex.check, ex.key) for ex in pending]


def _run_cells(plan_path: str, log_path: str) -> None:
    """Child process: run the planned cells; append one JSON line per graded check to the log."""
    import matplotlib

    matplotlib.use("Agg")
    from .chapters import strip_magics
    from .exercises.report import Report

    plan = json.loads(Path(plan_path).read_text())
    os.chdir(plan["cwd"])
    alarm = hasattr(signal, "setitimer")
    if alarm:
        def too_long(*_):
            raise TimeoutError(f"the cell ran for more than {plan['cell_limit']:.0f} s")
        signal.signal(signal.SIGALRM, too_long)
    namespace = {"__name__": "__main__", "display": lambda *a, **k: None}
    created: list = []  # every report the checkers build: a check cell may print it, not return it
    build = Report.__init__

    def recording_init(self, *args, **kwargs):
        build(self, *args, **kwargs)
        created.append(self)

    Report.__init__ = recording_init
    with open(log_path, "a", encoding="utf-8") as log:
        for source, key in plan["cells"]:
            record = {"key": key}
            del created[:]
            try:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, plan["cell_limit"])
                exec(compile(strip_magics(source), "<cell>", "exec"), namespace)
                if key is not None:
                    if created:
                        failed = [f"{name}: {detail}" for r in created for name, ok, detail in r.checks if not ok]
                        passed = all(r.passed for r in created)
                        record.update(passed=passed, message="; ".join(failed) or "all checks passed")
                    else:
                        record.update(passed=False, message="the check built no report")
            except BaseException as err:  # noqa: BLE001 - the student's code may raise anything, exit included
                if key is None:
                    continue
                where = traceback.format_exception_only(type(err), err)[-1].strip()
                record.update(passed=False, message=f"the check raised {where}")
            finally:
                if alarm:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                namespace["FULL"] = False  # quick mode, whatever a cell set
            if key is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()


#: A MyST box whose title starts with "Solution" or "Answer" (```{dropdown} Solution): the text of a
#: solution, which must carry a solution tag for the export to remove it.
SOLUTION_BOX = re.compile(r"^\s*(`{3,}|:{3,})\s*\{(dropdown|admonition|toggle)\}\s*(solution|answer)\b",
                          re.I | re.M)
#: A graded exercise whose solution defines more lines of code than this suits homework; a shorter
#: one, or a question without a checker, suits a lab session.
HOMEWORK_LINES = 8


def _exercise_blocks(path: Path) -> list[tuple[str, list[dict]]]:
    """``(heading, cells)`` of each ``###`` exercise of the chapter's ``## Exercises`` section."""
    cells = _read(path)["cells"]
    start = next((i for i, c in enumerate(cells) if c.get("cell_type") == "markdown"
                  and EXERCISES_HEADING.search(_source(c))), len(cells))
    blocks: list[tuple[str, list[dict]]] = []
    for cell in cells[start:]:
        heading = re.search(r"^###\s+(.+)$", _source(cell), re.M) if cell.get("cell_type") == "markdown" else None
        if heading:
            blocks.append((heading.group(1).strip(), []))
        if blocks:
            blocks[-1][1].append(cell)
    return blocks


def _code_lines(source: str) -> tuple[list[str], int]:
    """The names a cell defines (functions, classes, assigned names) and the lines of code of its
    function and class definitions (blank and comment lines not counted)."""
    import ast

    names, lines, text = [], 0, source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
            lines += sum(1 for ln in text[node.lineno - 1:node.end_lineno]
                         if ln.strip() and not ln.strip().startswith("#"))
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return names, lines


def _checkers(source: str) -> list[str]:
    """The checker calls of a check cell (``checks.check_accuracy``), in order."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name.rsplit(".", 1)[-1].startswith("check_") and name not in found:
                found.append(name)
    return found


def exercise_table(chapters: Sequence[str] | None = None) -> str:
    """The Markdown table of every exercise for the teachers' page, read from the chapters' cells:
    what a student hands in, which checker grades it (or that none does), and whether it suits
    homework or a lab session (the rule: :data:`HOMEWORK_LINES`)."""
    lines = ["| chapter | exercise | the student hands in | graded by | suits |", "|---|---|---|---|---|"]
    graded = homework = questions = 0
    for path in _select(chapters):
        for title, cells in _exercise_blocks(path):
            stubs = [_source(c) for c in cells if STUB_TAG in _tags(c)]
            checks = [_source(c) for c in cells if CHECK_TAG in _tags(c) and not is_solution(c)]
            solution_code = [_source(c) for c in cells if is_solution(c) and c.get("cell_type") == "code"]
            written = any(c.get("cell_type") == "markdown" and (is_solution(c) or SOLUTION_BOX.search(_source(c)))
                          for c in cells)
            if not checks:
                questions += 1
                handed = "a written answer (a prediction or an explanation)"
                by, suits = "no checker: the teacher reads it", "lab"
            else:
                graded += 1
                defined = [n for s in stubs for n in _code_lines(s)[0]]
                size = sum(_code_lines(s)[1] for s in solution_code)
                kind = "code" if any("NotImplementedError" in s for s in stubs) else "an answer"
                handed = f"{kind}: {', '.join(f'`{n}`' for n in defined)}"
                handed += f" ({size} lines in the solution)" if size else ""
                handed += "; and a written answer, not graded" if written else ""
                by = ", ".join(f"`{name}`" for s in checks for name in _checkers(s))
                suits = "homework" if size > HOMEWORK_LINES else "lab"
                homework += suits == "homework"
            lines.append(f"| {path.stem} | {title} | {handed} | {by} | {suits} |")
    summary = (f"{graded + questions} exercises: {graded} graded by a checker ({homework} of them "
               f"suited to homework, {graded - homework} to a lab session) and {questions} questions "
               f"without a checker. Read from the chapters' cells by "
               f"`python -m attn_lib.classroom --table book/teaching-exercises.md`: an exercise is "
               f"graded when it has a check cell (tag `exercise-check`); it suits homework when its "
               f"solution's functions and classes hold more than {HOMEWORK_LINES} lines of code, "
               f"a lab session otherwise; a question without a checker suits a lab session, where "
               f"the answers are discussed.")
    return "\n".join(lines + ["", textwrap.fill(summary, 88, break_on_hyphens=False)]) + "\n"


# ----------------------------------------------------------------------------- grade
def _chapter_of(notebook: dict, references: dict[str, dict]) -> str | None:
    stamp = notebook.get("metadata", {}).get(METADATA_KEY, {})
    stamped = stamp.get("chapter") if isinstance(stamp, dict) else None
    if isinstance(stamped, str) and stamped in references:
        return stamped
    first = next((_source(c).strip().splitlines()[0] for c in notebook["cells"]
                  if c.get("cell_type") == "markdown" and _source(c).strip()), None)
    for name, ref in references.items():
        ref_first = next((_source(c).strip().splitlines()[0] for c in ref["cells"]
                          if c.get("cell_type") == "markdown" and _source(c).strip()), None)
        if first and first == ref_first:
            return name
    return None


def _submissions(folder: Path) -> list[tuple[str, Path]]:
    """``(student, notebook)`` pairs: a file at the top is a student by its stem; a folder is a
    student by its name, with every notebook inside it (any depth)."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix == ".ipynb":
            found.append((entry.stem, entry))
        elif entry.is_dir() and not entry.name.startswith("."):
            found += [(entry.name, p) for p in sorted(entry.rglob("*.ipynb")) if ".ipynb_checkpoints" not in p.parts]
    return found


def grade(submissions: str | Path, out_csv: str | Path, time_limit: float = 300.0, progress: bool = True,
          workers: int = 1) -> list[dict]:
    """Grade every notebook under ``submissions``; write ``out_csv`` and a Markdown report beside it.

    One row per student, notebook and exercise: ``student, notebook, chapter, exercise, title,
    points, max_points, passed, message``. Returns the rows.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    folder = Path(submissions)
    if not folder.is_dir():
        raise ValueError(f"expected a folder of submitted notebooks, got {folder}")
    references = {p.stem: _read(p) for p in _select(None)}
    checks = {name: exercises(_chapters_dir() / f"{name}.ipynb") for name in references}
    jobs = _submissions(folder)

    def error(base: dict, message: str) -> list[dict]:
        return [{**base, "chapter": "", "exercise": "", "title": "", "points": 0, "max_points": 0,
                 "passed": False, "message": message}]

    def one(job: tuple[str, Path]) -> list[dict]:
        student, path = job
        base = {"student": student, "notebook": str(path.relative_to(folder))}
        try:
            return graded(base, path)
        except Exception as err:  # noqa: BLE001 - one odd notebook must never stop the run
            where = traceback.format_exception_only(type(err), err)[-1].strip()
            return error(base, f"{path} could not be graded: {where}")

    def graded(base: dict, path: Path) -> list[dict]:
        try:
            notebook = _read(path)
        except ValueError as err:  # not a notebook, or not a well-formed one
            return error(base, str(err))
        chapter = _chapter_of(notebook, references)
        if chapter is None:
            return error(base, "not one of the course's chapters")
        results = _execute(notebook, checks[chapter], time_limit)
        rows = []
        for ex in checks[chapter]:
            got = results.get(ex.key, {"passed": False, "message": "not reached (an earlier cell stopped "
                                                                    "the notebook or the time limit ran out)"})
            rows.append({**base, "chapter": chapter, "exercise": ex.key, "title": ex.title,
                         "points": ex.points if got["passed"] else 0, "max_points": ex.points,
                         "passed": bool(got["passed"]), "message": got["message"]})
        return rows

    rows: list[dict] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for got in tqdm(pool.map(one, jobs), total=len(jobs), desc="grading", disable=not progress):
            rows += got
    _write(rows, Path(out_csv), n_notebooks=len(jobs))
    return rows


def _execute(notebook: dict, checks: list[Exercise], time_limit: float) -> dict[str, dict]:
    with tempfile.TemporaryDirectory(prefix="attn-lib-grade-") as tmp:
        plan, log = Path(tmp) / "plan.json", Path(tmp) / "log.jsonl"
        plan.write_text(json.dumps({"cells": _graded_cells(notebook, checks), "cwd": str(_chapters_dir()),
                                    "cell_limit": max(1.0, min(60.0, time_limit / 2))}))
        log.touch()
        env = {**os.environ, "MPLBACKEND": "Agg", "CUDA_VISIBLE_DEVICES": ""}  # on the CPU
        try:
            subprocess.run([sys.executable, "-c", "import sys; from attn_lib.classroom import _run_cells; "
                            "_run_cells(sys.argv[1], sys.argv[2])", str(plan), str(log)],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=time_limit, env=env)
        except subprocess.TimeoutExpired:
            pass  # what was earned before the limit is in the log
        found = {}
        for line in log.read_text().splitlines():
            record = json.loads(line)
            found[record["key"]] = record
        return found


def _write(rows: list[dict], out_csv: Path, n_notebooks: int) -> None:
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    fields = ["student", "notebook", "chapter", "exercise", "title", "points", "max_points", "passed", "message"]
    with out_csv.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    totals: dict[str, list[int]] = {}
    for row in rows:
        got = totals.setdefault(row["student"], [0, 0])
        got[0] += row["points"]
        got[1] += row["max_points"]
    lines = [f"# Grades ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"{n_notebooks} notebooks graded, {len(totals)} students.", "",
             "| student | points | of |", "|---|---|---|"]
    lines += [f"| {html.escape(s)} | {p} | {m} |" for s, (p, m) in sorted(totals.items())]
    lines += ["", "## Every exercise", "", "| student | exercise | title | points | message |", "|---|---|---|---|---|"]
    lines += [f"| {html.escape(r['student'])} | {r['exercise'] or r['notebook']} | {html.escape(r['title'])} | "
              f"{r['points']}/{r['max_points']} | {html.escape(r['message']).replace('|', '/')[:300]} |" for r in rows]
    out_csv.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(args) -> int:
    """The ``classroom`` subcommand of the CLI."""
    from .chapters import ChapterError

    try:
        if args.action == "export":
            written = export(args.path, args.chapters, keep_solutions=args.keep_solutions)
            kind = "teacher's copies (with solutions)" if args.keep_solutions else "student versions"
            print(f"wrote {len(written)} {kind} to {args.path}")
            return 0
        rows = grade(args.path, args.out, time_limit=args.time_limit, workers=args.workers)
    except (ValueError, ChapterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    students = {r["student"] for r in rows}
    print(f"graded {len({(r['student'], r['notebook']) for r in rows})} notebooks of {len(students)} "
          f"students: {args.out} and {Path(args.out).with_suffix('.md')}")
    return 0


if __name__ == "__main__":  # python -m attn_lib.classroom --table book/teaching-exercises.md
    import argparse

    parser = argparse.ArgumentParser(description="write the teachers' table of every exercise")
    parser.add_argument("--table", required=True, help="the Markdown file to write")
    Path(parser.parse_args().table).write_text(exercise_table(), encoding="utf-8")
