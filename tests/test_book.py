"""The book: it builds from the stored chapters with every Sphinx warning treated as an error, it
loads nothing from elsewhere (MathJax is served by the site itself), its configuration agrees with
the package, and the README says what is true.

The book is built once per test session, into a temporary folder; tests/test_browser.py opens
the same build in a browser.
"""
from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

_BUILD: dict = {}


def build_book() -> Path:
    """Build the book once per session (``jupyter-book build -W -n --keep-going``, into a temporary
    folder so that no earlier build in ``_build/`` hides a warning) and return its HTML folder;
    fail the calling test, with the build's log, when the build fails."""
    if "done" not in _BUILD:
        exe = shutil.which("jupyter-book") or str(Path(sys.executable).parent / "jupyter-book")
        if not Path(exe).exists():
            pytest.fail("jupyter-book is not installed: pip install -r requirements.txt")
        out = Path(tempfile.mkdtemp(prefix="attn-book-"))
        atexit.register(shutil.rmtree, out, True)
        _BUILD["done"] = subprocess.run(
            [exe, "build", "-W", "-n", "--keep-going", "--path-output", str(out), str(REPO_ROOT)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
        _BUILD["html"] = out / "_build" / "html"
    done = _BUILD["done"]
    if done.returncode != 0:
        pytest.fail("the book does not build with warnings as errors:\n"
                    + done.stdout[-4000:] + done.stderr[-4000:])
    return _BUILD["html"]


def repository_url() -> str:
    """The course's repository URL, kept in one place: pyproject.toml's [project.urls]."""
    meta = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    return meta["project"]["urls"]["Repository"]


def book_config() -> dict:
    """The Sphinx configuration Jupyter Book makes from _config.yml (defaults included)."""
    from jupyter_book.config import get_final_config

    config, _ = get_final_config(user_yaml=REPO_ROOT / "_config.yml",
                                 cli_config={"latex_individualpages": False},
                                 sourcedir=REPO_ROOT, raise_on_invalid=True)
    return config


def toc_pages() -> list[str]:
    """Every page of the table of contents, as a path without suffix (``notebooks/02_se``)."""
    toc = yaml.safe_load((REPO_ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                pages.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts", []):
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return pages


def html_pages(html: Path) -> list[Path]:
    return sorted(p for p in html.rglob("*.html") if p.relative_to(html).parts[0] != "_static")


class _Refs(HTMLParser):
    """Every address a page loads by itself (scripts, styles, images, frames, media)."""

    LOADS = {"script": "src", "img": "src", "iframe": "src", "source": "src", "video": "src",
             "audio": "src", "embed": "src", "object": "data"}

    def __init__(self):
        super().__init__()
        self.loads: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.LOADS and attrs.get(self.LOADS[tag]):
            self.loads.append(attrs[self.LOADS[tag]])
        if tag == "link" and attrs.get("href") and (attrs.get("rel") or "") in (
                "stylesheet", "preload", "icon", "shortcut icon", "modulepreload", "prefetch"):
            self.loads.append(attrs["href"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def refs(page: Path) -> _Refs:
    parser = _Refs()
    parser.feed(page.read_text())
    return parser


# --- the build -----------------------------------------------------------------------------


def test_book_builds_with_warnings_as_errors():
    html = build_book()
    for page in toc_pages():
        assert (html / f"{page}.html").is_file(), f"{page}.html is missing from the build"
    chapter = (html / "notebooks" / "02_se.html").read_text()
    assert "colab.research.google.com" in chapter  # the launch button


def test_pages_load_nothing_from_elsewhere():
    """Offline, a page that loads a script, a style or an image from another site breaks: every
    page loads only files of the site itself."""
    html = build_book()
    outside = {f"{page.relative_to(html)}: {ref}" for page in html_pages(html)
               for ref in refs(page).loads if re.match(r"^(https?:)?//", ref)}
    assert not outside, "pages load from elsewhere:\n" + "\n".join(sorted(outside))
    for page in html_pages(html):
        text = page.read_text()
        assert "THEBE_JS_URL" not in text and "thebe-config" not in text, page.name


def test_mathjax_is_served_by_the_site_with_its_licence():
    html = build_book()
    mathjax = html / "_static" / "mathjax"
    assert (mathjax / "tex-mml-chtml.js").is_file()
    assert "Apache License" in (mathjax / "LICENSE").read_text()
    assert list((mathjax / "output" / "chtml" / "fonts" / "woff-v2").glob("*.woff"))
    assert (mathjax / "input" / "tex" / "extensions").is_dir()  # autoloaded TeX extensions
    with_math = [p for p in html_pages(html) if 'class="math' in p.read_text()]
    assert with_math, "no page has a formula: the check below would be empty"
    for page in with_math:
        scripts = [s.split("?")[0] for s in refs(page).loads]
        local = [s for s in scripts if s.endswith("_static/mathjax/tex-mml-chtml.js")]
        assert local, f"{page.relative_to(html)} has formulas but does not load the site's MathJax"
        assert (page.parent / local[0]).resolve() == (mathjax / "tex-mml-chtml.js").resolve()


def test_no_widget_output_or_state_reaches_the_html():
    """A widget needs a kernel: the HTML shows the static figure beside it instead (see
    tests/test_notebook_conventions.py), never a saved widget that does not respond."""
    html = build_book()
    pages = [str(p.relative_to(html)) for p in html_pages(html)
             if "application/vnd.jupyter.widget" in p.read_text()]
    assert not pages, f"widget views or saved widget state in {pages}"


def test_no_empty_general_index():
    html = build_book()
    assert not (html / "genindex.html").exists(), "the general index is built but has no entry"
    linking = [str(p.relative_to(html)) for p in html_pages(html)
               if any("genindex" in a for a in refs(p).links)]
    assert not linking, f"pages link to the general index: {linking}"


# --- the configuration ---------------------------------------------------------------------


def test_repository_url_is_the_package_repository():
    """pyproject.toml keeps the URL; the book's repository (and so its launch buttons) agree."""
    url = repository_url()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url), url
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == url, (
        f"_config.yml repository.url is {config['repository']['url']!r}; "
        f"pyproject.toml's [project.urls] Repository is {url!r}")
    assert book_config()["html_theme_options"]["repository_url"] == url


def test_repository_url_is_written_nowhere_else():
    """Besides pyproject.toml, only _config.yml and each chapter's first cell (``REPO = ...``,
    checked by tests/test_notebook_conventions.py) may spell the URL out; code that needs it reads
    the package metadata."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    url = repository_url().encode()
    counts = {f: (REPO_ROOT / f).read_bytes().count(url)
              for f in files if (REPO_ROOT / f).is_file()}
    assert counts.get("pyproject.toml") == 1 and counts.get("_config.yml") == 1, counts
    elsewhere = {f: n for f, n in counts.items() if n and f not in ("pyproject.toml", "_config.yml")
                 and not (f.startswith("notebooks/") and f.endswith(".ipynb") and n == 1)}
    assert not elsewhere, f"the repository URL is written out in {elsewhere}"


def test_virtual_environments_are_kept_out_of_the_book_and_of_git(tmp_path):
    """A virtual environment in the repository root (README: python -m venv .venv) holds pages
    Sphinx would read; the book's exclude patterns and .gitignore keep it out."""
    from sphinx.util.matching import get_matching_files

    for name in (".venv/lib/python3.11/site-packages/pkg/README.md", "venv/share/doc/x.ipynb",
                 "env/lib/site-packages/a.md", ".tox/py/lib/README.rst", "notebooks/01_x.ipynb"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("# a page\n")
    found = list(get_matching_files(tmp_path, exclude_patterns=book_config()["exclude_patterns"]))
    assert found == ["notebooks/01_x.ipynb"], found

    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [".venv/bin/python", "venv/bin/python", "env/bin/python", "_build/html/index.html"]
    done = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=REPO_ROOT,
                          capture_output=True, text=True)
    assert done.stdout.split() == paths, f"git does not ignore all of {paths}: {done.stdout}"


# --- the README ----------------------------------------------------------------------------


def readme() -> str:
    return (REPO_ROOT / "README.md").read_text()


def test_readme_requires_the_python_that_is_tested():
    requires = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "requires-python"]
    minimum = re.fullmatch(r">=\s*3\.(\d+)", requires)
    assert minimum, f"requires-python should be a plain lower bound, not {requires!r}"
    minor = int(minimum.group(1))
    assert sys.version_info[:2] >= (3, minor), "the tests run on a Python the package refuses"
    claims = set(re.findall(r"Python 3\.(\d+)", readme()))
    assert claims == {str(minor)}, (
        f"README names Python 3.{sorted(claims)}; pyproject.toml requires {requires}")
    assert f"Python 3.{minor} or newer" in readme()


def test_readme_lists_the_chapters_as_the_book_has_them():
    """A chapter in the table of contents is listed with its notebook; any other is marked
    'in preparation' until it lands."""
    chapters = {p for p in toc_pages() if p.startswith("notebooks/")}
    section = readme().split("## Chapters", 1)
    assert len(section) == 2, "README has no '## Chapters' section"
    items = re.findall(r"^(\d+)\. (.+)$", section[1].split("\n## ", 1)[0], flags=re.M)
    assert items, "README's chapter list is empty"
    named = set()
    for number, text in items:
        landed = {c for c in chapters if Path(c).name.startswith(f"{int(number):02d}_")}
        if landed:
            paths = set(re.findall(r"`(notebooks/[\w.-]+)\.ipynb`", text))
            assert paths == landed, f"README chapter {number} should name {sorted(landed)}: {text}"
            assert "in preparation" not in text, f"chapter {number} has landed: {text}"
            named |= paths
        else:
            assert "in preparation" in text, f"chapter {number} is not in the book yet: {text}"
    assert named == chapters, f"chapters of the book missing from README: {chapters - named}"


def test_readme_commands_are_what_ci_runs():
    text = readme()
    assert "pip install -r requirements.txt && jupyter-book build ." in text
    assert "python -m pytest" in text
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "pip install" in ci and "-r requirements.txt" in ci and "-m pytest" in ci
