"""Every chapter follows the course's conventions for its first cell and its widgets.

* The first code cell is the course's set-up cell, word for word (only its opening comment may
  differ), with the repository URL that ``pyproject.toml`` keeps; run as Colab would run it with an
  install that fails, it stops with a message that says what went wrong and what to do.
* A widget lives only in a kernel: its cell is tagged ``remove-output`` (and
  ``nbval-ignore-output``), a static figure stands beside it, and no widget state is stored.
"""
from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def repository_url() -> str:
    """The course's repository URL, kept in one place: pyproject.toml's [project.urls]."""
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return meta["project"]["urls"]["Repository"]


#: the set-up cell after its opening comment, exactly as every chapter has it
SETUP_CELL = '''\
FULL = False  # False: quick mode (CPU, under a minute, recorded results). True: train for real (GPU).
REPO = "{repo}"

import subprocess
import sys

if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"attn-lib @ git+{{REPO}}"]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"Could not install the course package from {{REPO}}:\\n"
                         f"{{done.stderr[-1500:]}}\\nCheck that the runtime is online, then run "
                         f"this cell again (Runtime > Restart session first).")

import torch
import attn_lib

torch.manual_seed(0)
print(f"attn_lib {{attn_lib.__version__}} | torch {{torch.__version__}} | "
      f"{{'full' if FULL else 'quick'}} mode")
'''

WIDGET_MIMES = ("application/vnd.jupyter.widget-view+json",
                "application/vnd.jupyter.widget-state+json")
WIDGET_SOURCE = re.compile(r"\bipywidgets\b|\binteract(ive|_manual)?\s*\(")
FIGURE_MIMES = ("image/png", "image/svg+xml", "image/jpeg")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def tags(cell: dict) -> set[str]:
    return set(cell.get("metadata", {}).get("tags", []))


def first_code_cell(nb: dict) -> str:
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, "the chapter has no code cell"
    return source(code[0])


def split_comment(cell: str) -> tuple[list[str], str]:
    """The opening comment lines, and the rest of the cell."""
    lines = cell.splitlines()
    n = 0
    while n < len(lines) and lines[n].startswith("#"):
        n += 1
    return lines[:n], "\n".join(line.rstrip() for line in lines[n:]).strip("\n") + "\n"


def test_there_are_chapters():
    assert NOTEBOOKS, "no chapter found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_chapter_opens_with_its_title_and_only_one(path):
    """The first cell is Markdown with the chapter's one level-1 heading: the book takes the
    page title from it, and every other heading is level 2 or deeper."""
    cells = load(path)["cells"]
    first = source(cells[0]).lstrip()
    assert cells[0]["cell_type"] == "markdown" and first.startswith("# "), (
        f"{path.name}: the first cell must be Markdown starting with the title ('# ...'), got "
        f"a {cells[0]['cell_type']} cell: {first[:60]!r}")
    titles = [c for c in cells if c["cell_type"] == "markdown"
              and any(line.startswith("# ") for line in source(c).splitlines())]
    assert len(titles) == 1, f"{path.name}: {len(titles)} cells have a level-1 heading; expected 1"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_code_cell_is_the_course_setup_cell(path):
    comment, rest = split_comment(first_code_cell(load(path)))
    assert comment, f"{path.name}: the set-up cell starts with a comment saying what it does"
    expected = SETUP_CELL.format(repo=repository_url())
    if rest != expected:
        diff = "\n".join(difflib.unified_diff(expected.splitlines(), rest.splitlines(),
                                              "the course's set-up cell", path.name, lineterm=""))
        pytest.fail(f"{path.name}: the first code cell differs from the course's set-up cell "
                    f"(only its opening comment may differ):\n{diff}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_first_cell_repo_is_the_package_repository(path):
    found = re.findall(r'^REPO = "([^"]*)"', first_code_cell(load(path)), flags=re.M)
    assert found == [repository_url()], (
        f"{path.name}: REPO = {found} in the first cell; pyproject.toml's [project.urls] "
        f"Repository is {repository_url()!r}")


FAKE_PIP = '''\
import json, os, sys
with open(os.environ["FAKE_PIP_ARGS"], "w") as f:
    json.dump(sys.argv[1:], f)
sys.stderr.write("ERROR: fake pip for the test: no network\\n")
sys.exit(1)
'''

COLAB_RUNNER = '''\
import sys, types
sys.modules["google.colab"] = types.ModuleType("google.colab")  # what Colab has imported
cell = open(sys.argv[1]).read()
exec(compile(cell, "first cell", "exec"), {"__name__": "__main__"})
print("REACHED THE END OF THE CELL")
'''


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_colab_install_failure_says_what_to_do(path, tmp_path):
    """The Colab branch of the first cell, with a pip that fails: the cell must stop at once with
    the course's message (not run on into an ImportError) and ask pip for the package only,
    keeping Colab's own PyTorch."""
    (tmp_path / "fake" / "pip").mkdir(parents=True)
    (tmp_path / "fake" / "pip" / "__init__.py").write_text("")
    (tmp_path / "fake" / "pip" / "__main__.py").write_text(FAKE_PIP)
    (tmp_path / "cell.py").write_text(first_code_cell(load(path)))
    (tmp_path / "runner.py").write_text(COLAB_RUNNER)
    args_file = tmp_path / "pip-args.json"
    env = dict(os.environ, FAKE_PIP_ARGS=str(args_file),
               PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path / "fake"),
                                                        os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "cell.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    log = f"exit {done.returncode}\nstdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-2000:]}"
    assert args_file.is_file(), f"{path.name}: the Colab branch never ran pip\n{log}"
    repo = repository_url()
    assert json.loads(args_file.read_text()) == [
        "install", "--quiet", "--no-deps", f"attn-lib @ git+{repo}"], log
    assert done.returncode == 1 and "REACHED THE END" not in done.stdout, log
    assert f"Could not install the course package from {repo}:" in done.stderr, log
    assert "ERROR: fake pip for the test: no network" in done.stderr, log  # pip's own words
    assert "Runtime > Restart session" in done.stderr, log
    assert "Traceback" not in done.stderr and "ImportError" not in done.stderr, log


def is_widget_cell(cell: dict) -> bool:
    if cell["cell_type"] != "code":
        return False
    if WIDGET_SOURCE.search(source(cell)):
        return True
    return any(mime in out.get("data", {}) for out in cell.get("outputs", [])
               for mime in WIDGET_MIMES)


def shows_figure(cell: dict) -> bool:
    return (cell["cell_type"] == "code" and not tags(cell) & {"remove-output", "remove-cell"}
            and any(mime in out.get("data", {}) for out in cell.get("outputs", [])
                    for mime in FIGURE_MIMES))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_widget_state_is_stored(path):
    assert "widgets" not in load(path).get("metadata", {}), (
        f"{path.name}: metadata.widgets holds saved widget state; delete it after executing "
        f"(a saved widget renders in the HTML but does not respond)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_widget_cells_are_removed_from_the_html_with_a_static_figure_beside_them(path):
    cells = load(path)["cells"]
    code = [i for i, c in enumerate(cells) if c["cell_type"] == "code"]
    problems = []
    for i in code:
        cell = cells[i]
        if not is_widget_cell(cell):
            continue
        what = f"cell {i} ({source(cell).strip().splitlines()[0][:60]!r})"
        missing = {"remove-output", "nbval-ignore-output"} - tags(cell)
        if missing:
            problems.append(f"{what}: a widget cell needs the tags {sorted(missing)}")
        k = code.index(i)
        neighbours = [cells[j] for j in code[max(0, k - 1):k] + code[k + 1:k + 2]]
        if not any(shows_figure(c) and not is_widget_cell(c) for c in neighbours):
            problems.append(f"{what}: neither the code cell before nor the one after it shows a "
                            f"static figure of the same thing")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
