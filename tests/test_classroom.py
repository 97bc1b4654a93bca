"""The classroom kit: student versions without solutions, and grading that never stops on a bad notebook."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
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
    report = out.with_suffix(".md").read_text()
    assert f"{len(CHAPTERS) * 2 + 4} notebooks graded, 6 students" in report


def test_teachers_page_times_are_the_recorded_ones():
    from attn_lib import results
    from attn_lib.chapters import times_table

    record = results.load("chapters-cpu")
    assert [row["chapter"] for row in record["rows"]] == [p.stem for p in CHAPTERS]
    assert record["git_commit"] and not record["git_commit"].endswith("-dirty")
    assert (REPO / "book" / "teaching-times.md").read_text() == times_table(record)
    assert "{include} teaching-times.md" in (REPO / "book" / "teaching.md").read_text()
