"""The book builds from the stored chapters with every Sphinx warning treated as an error."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_book_builds_with_warnings_as_errors():
    exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
    if not Path(exe).exists():
        pytest.fail("jupyter-book is not installed: pip install -r requirements.txt")
    out = subprocess.run([exe, "build", "-W", "-n", "--keep-going", "."], cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    html = REPO / "_build" / "html"
    for page in ["book/intro.html", "book/bibliography.html"] + \
            [f"notebooks/{p.stem}.html" for p in sorted((REPO / "notebooks").glob("*.ipynb"))]:
        assert (html / page).is_file(), page
    chapter = (html / "notebooks" / "02_se.html").read_text()
    assert "colab.research.google.com" in chapter  # the launch button
    assert "MathJax" in chapter or "mathjax" in chapter
