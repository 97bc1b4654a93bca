"""The classroom kit: student versions without solutions, and grading that never stops on a bad notebook."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from attn_lib import classroom

REPO = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_marks_its_exercises(path):
    cells = _cells(path)
    tags = [t for c in cells for t in c.get("metadata", {}).get("tags", [])]
    assert "exercise-stub" in tags and "exercise-check" in tags, path.stem
    assert any(classroom.is_solution(c) for c in cells), path.stem
    for cell in cells:
        if classroom.is_solution(cell) and cell["cell_type"] == "code":
            assert "hide-cell" in cell["metadata"]["tags"], f"{path.stem}: a code solution is not collapsed"
    assert classroom.exercises(path), f"{path.stem}: no graded exercise"


def test_the_solution_box_pattern_finds_the_chapters_forms():
    for text in ["```{dropdown} Solution\nx", "```{dropdown} Solution: why the normal approximation",
                 ":::{dropdown} solution\n", "````{admonition} Answer\n"]:
        assert classroom.SOLUTION_BOX.search(text), text
    for text in ["```{admonition} What is reconstructed", "```{dropdown} Hint", "the solution below"]:
        assert not classroom.SOLUTION_BOX.search(text), text


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_solution_box_is_a_solution_cell(path):
    """A markdown "Solution" box without a solution tag would be handed to students by the export."""
    untagged = [i for i, cell in enumerate(_cells(path)) if cell["cell_type"] == "markdown"
                and classroom.SOLUTION_BOX.search("".join(cell["source"])) and not classroom.is_solution(cell)]
    assert not untagged, f"{path.stem}: cells {untagged} hold a solution box but no 'solution' tag"


def test_export_removes_every_solution_and_keeps_every_other_cell(tmp_path):
    written = classroom.export(tmp_path)
    assert [p.name for p in written] == [p.name for p in CHAPTERS]
    for original, exported in zip(CHAPTERS, written):
        cells = _cells(original)
        kept = [c for c in cells if not classroom.is_solution(c)]
        assert _cells(exported) == kept, original.stem  # unchanged, in order, outputs included
        text = "\n".join("".join(c["source"]) for c in kept)
        for cell in cells:
            if classroom.is_solution(cell):
                body = "".join(cell["source"]).strip()
                assert body not in text, f"{original.stem}: solution text left in the student version"
        meta = json.loads(exported.read_text())["metadata"]["attn_lib"]
        assert meta == {"chapter": original.stem, "version": "student"}
    teacher = classroom.export(tmp_path / "teacher", chapters=[CHAPTERS[0].stem], keep_solutions=True)
    assert _cells(teacher[0]) == _cells(CHAPTERS[0])


def _implementation_exercises(path: Path) -> list[str]:
    """Keys of the exercises whose stub raises NotImplementedError (the others ask for an answer)."""
    keys, stub, number = [], "", 0
    for cell in _cells(path):
        tags = cell.get("metadata", {}).get("tags", [])
        if "exercise-stub" in tags:
            stub = "".join(cell["source"])
        elif "exercise-check" in tags and not classroom.is_solution(cell):
            number += 1
            if "NotImplementedError" in stub:
                keys.append(f"{path.stem}:{number}")
            stub = ""
    return keys


def _wrong_answer(notebook: dict) -> tuple[dict, str]:
    """Chapter 2 with ECA's kernel-size solution replaced by a wrong one; the key of that exercise."""
    for cell in notebook["cells"]:
        if classroom.is_solution(cell) and "def kernel_size" in "".join(cell["source"]):
            cell["source"] = ["def kernel_size(channels, gamma=2, b=1):\n", "    return 3\n"]
            break
    else:
        raise AssertionError("chapter 2 has no kernel_size solution")
    key = next(ex.key for ex in classroom.exercises("02_se") if "kernel_size" in ex.check)
    return notebook, key


def test_grading_full_marks_zero_marks_one_wrong_answer_and_broken_notebooks(tmp_path):
    subs = tmp_path / "submissions"
    shutil.copytree(REPO / "notebooks", subs / "teacher", ignore=shutil.ignore_patterns("*.py", "runs"))
    classroom.export(subs / "student")
    se = json.loads((REPO / "notebooks" / "02_se.ipynb").read_text())
    wrong, wrong_key = _wrong_answer(json.loads(json.dumps(se)))
    (subs / "carol.ipynb").write_text(json.dumps(wrong))
    raises = json.loads(json.dumps(se))
    first = next(c for c in raises["cells"] if classroom.is_solution(c) and c["cell_type"] == "code")
    first["source"] = ["raise RuntimeError('my code is broken')\n"]
    (subs / "erin.ipynb").write_text(json.dumps(raises))
    loops = json.loads(json.dumps(se))
    stub = next(c for c in loops["cells"] if "exercise-stub" in c["metadata"].get("tags", []))
    stub["source"] = ["while True:\n", "    pass\n"]
    (subs / "dave.ipynb").write_text(json.dumps(loops))
    (subs / "bob.ipynb").write_text("{this is not json")
    (subs / "frank.ipynb").write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": [1]}]}))
    (subs / "gina.ipynb").write_text(json.dumps({"nbformat": 4, "metadata": {}}))  # no cells

    out = tmp_path / "grades.csv"
    done = subprocess.run([sys.executable, "-m", "attn_lib", "classroom", "grade", str(subs), "--out", str(out),
                           "--time-limit", "240", "--workers", "2"], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    by = lambda student: [r for r in rows if r["student"] == student]  # noqa: E731
    n_exercises = sum(len(classroom.exercises(p)) for p in CHAPTERS)
    assert len(by("teacher")) == n_exercises
    assert all(r["passed"] == "True" for r in by("teacher")), [r for r in by("teacher") if r["passed"] != "True"]
    assert len(by("student")) == n_exercises
    assert all(r["points"] == "0" for r in by("student"))
    stubbed = {key for p in CHAPTERS for key in _implementation_exercises(p)}
    assert stubbed and all("not implemented" in r["message"] for r in by("student") if r["exercise"] in stubbed)
    carol = {r["exercise"]: r for r in by("carol")}
    assert [k for k, r in carol.items() if r["passed"] != "True"] == [wrong_key]
    assert carol[wrong_key]["message"] and carol[wrong_key]["points"] == "0"
    assert sum(r["passed"] == "False" for r in by("erin")) == 1  # the exercise whose cell raised
    assert by("dave") and by("bob")[0]["message"].startswith(str(subs / "bob.ipynb"))
    for student in ("frank", "gina"):  # valid JSON, not a well-formed notebook: one error row each
        assert [(r["points"], r["passed"]) for r in by(student)] == [("0", "False")], by(student)
        assert "not a" in by(student)[0]["message"], by(student)
    report = out.with_suffix(".md").read_text()
    assert f"{len(CHAPTERS) * 2 + 6} notebooks graded, 8 students" in report


MALFORMED = {
    "source_is_a_number": {"cells": [{"cell_type": "markdown", "source": [1]}]},
    "no_cells": {"nbformat": 4, "metadata": {}},
    "cell_not_an_object": {"cells": [3]},
    "tags_not_a_list": {"cells": [{"cell_type": "code", "source": "x = 1", "metadata": {"tags": "solution"}}]},
    "metadata_not_an_object": {"cells": [], "metadata": []},
    "a_list": [],
}


def test_grading_turns_every_malformed_notebook_into_an_error_row(tmp_path, monkeypatch):
    subs = tmp_path / "submissions"
    subs.mkdir()
    for name, content in MALFORMED.items():
        (subs / f"{name}.ipynb").write_text(json.dumps(content))
    odd = json.loads((REPO / "notebooks" / "02_se.ipynb").read_text())  # well formed: fails later
    (subs / "odd.ipynb").write_text(json.dumps(odd))
    real = classroom._chapter_of

    def chapter_of(notebook, references):
        if len(notebook["cells"]) == len(odd["cells"]):
            raise RuntimeError("something nobody foresaw")
        return real(notebook, references)

    monkeypatch.setattr(classroom, "_chapter_of", chapter_of)
    rows = classroom.grade(subs, tmp_path / "grades.csv", progress=False)
    assert sorted(r["student"] for r in rows) == sorted([*MALFORMED, "odd"])  # one row each, none lost
    for row in rows:
        assert row["points"] == 0 and row["passed"] is False
        assert row["message"].startswith(str(subs / f"{row['student']}.ipynb")), row
    assert "could not be graded: RuntimeError: something nobody foresaw" in next(
        r["message"] for r in rows if r["student"] == "odd")
    report = (tmp_path / "grades.md").read_text()
    assert f"{len(MALFORMED) + 1} notebooks graded, {len(MALFORMED) + 1} students" in report


def test_grading_runs_in_quick_mode_on_the_cpu():
    """The student's ``FULL = True`` is run as ``FULL = False``, and the child sees no GPU."""
    notebook = {"cells": [
        {"cell_type": "code", "metadata": {}, "source": ["FULL = True  # the student's switch\n"]},
        {"cell_type": "markdown", "metadata": {}, "source": ["## Exercises\n", "### Exercise 1: x"]},
        {"cell_type": "code", "metadata": {}, "source": ["seen = FULL\n", "FULL = True\n"]},
        {"cell_type": "code", "metadata": {"tags": ["exercise-check"]}, "source": ["pass"]}]}
    check = ("import os\nimport torch\nfrom attn_lib.exercises.report import Report\n"
             "r = Report('mode')\n"
             "r.add('quick mode', seen is False and FULL is False, f'seen={seen}, FULL={FULL}')\n"
             "r.add('cpu', os.environ.get('CUDA_VISIBLE_DEVICES') == '' and not torch.cuda.is_available(),"
             " os.environ.get('CUDA_VISIBLE_DEVICES', 'unset'))\n")
    exercise = classroom.Exercise("99_toy", 1, "Exercise 1: x", check)
    planned = classroom._graded_cells(notebook, [exercise])
    assert planned[0][0].startswith("FULL = False  # the student's switch")
    got = classroom._execute(notebook, [exercise], time_limit=120)
    assert got[exercise.key]["passed"], got


def _first_stub_run(path: Path) -> subprocess.CompletedProcess:
    """Run a student's copy as a script (``attn_lib.chapters.run_chapter``), in the course's
    notebooks folder, up to its first exercise stub."""
    code = ("import sys; from attn_lib.chapters import run_chapter; "
            "run_chapter(sys.argv[1], until_tag='exercise-stub', workdir=sys.argv[2], log=lambda _: None)")
    env = {**os.environ, "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, str(path), str(REPO / "notebooks")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_student_version_runs_up_to_its_first_stub(tmp_path):
    """Each exported chapter's code cells before its first stub run without error (as a script,
    two chapters at a time; in a Jupyter kernel each would take several times longer)."""
    written = classroom.export(tmp_path)
    for path in written:
        cells = _cells(path)
        first = next(i for i, c in enumerate(cells) if "exercise-stub" in c.get("metadata", {}).get("tags", []))
        assert not any(classroom.is_solution(c) for c in cells[:first]), path.stem
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(written, pool.map(_first_stub_run, written)))
    failed = {p.stem: proc.stderr[-2000:] for p, proc in done.items() if proc.returncode != 0}
    assert not failed, failed


def test_teachers_page_lists_every_exercise():
    table = classroom.exercise_table()
    assert (REPO / "book" / "teaching-exercises.md").read_text() == table, (
        "regenerate it: python -m attn_lib.classroom --table book/teaching-exercises.md")
    assert "{include} teaching-exercises.md" in (REPO / "book" / "teaching.md").read_text()
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| 0")]
    for path in CHAPTERS:
        graded = [r for r in rows if r[0] == f"| {path.stem}" and not r[3].startswith("no checker")]
        assert [r[1] for r in graded] == [ex.title for ex in classroom.exercises(path)], path.stem
    assert rows and all(r[4] in ("homework |", "lab |") for r in rows), rows


def test_teachers_page_times_are_the_recorded_ones():
    from attn_lib import results
    from attn_lib.chapters import times_table

    record = results.load("chapters-cpu")
    assert [row["chapter"] for row in record["rows"]] == [p.stem for p in CHAPTERS]
    assert record["git_commit"] and not record["git_commit"].endswith("-dirty")
    assert (REPO / "book" / "teaching-times.md").read_text() == times_table(record)
    assert "{include} teaching-times.md" in (REPO / "book" / "teaching.md").read_text()
