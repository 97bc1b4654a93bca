"""A Sphinx extension that makes the built book readable offline.

* MathJax is served by the site itself: the build copies MathJax 3 (the ``es5`` bundle that
  renders TeX to HTML, its fonts, its TeX extensions and its licence) from the
  ``django-static-mathjax`` package, which ``requirements.txt`` installs, into
  ``_static/mathjax/``, and points Sphinx's ``mathjax_path`` at it.
* No page loads a script from elsewhere: the live-code scripts that ``sphinx-thebe`` adds to
  every page are dropped by disconnecting its page handlers (the course runs its chapters in
  Colab or Jupyter, not in the page; the scripts pointed at a CDN and were declared twice, an
  error in every page's console), and the
  ipywidgets scripts are switched off in ``_config.yml`` (``nb_ipywidgets_js: {}``): a widget
  lives only in a kernel, and the chapters show a static figure beside it.
"""
from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

#: the package that carries MathJax, as ``requirements.txt`` names it
MATHJAX_DISTRIBUTION = "django-static-mathjax"
#: where the copy lands, relative to the site's ``_static`` folder
MATHJAX_DIR = "mathjax"
#: the combined component Sphinx loads (the same one it would take from a CDN)
MATHJAX_ENTRY = "tex-mml-chtml.js"
#: what the entry loads at run time, relative to MathJax's ``es5`` folder: TeX extensions
#: (autoloaded by macro), the HTML output's fonts, the menu and its accessibility tools
MATHJAX_PARTS = ("input", "output/chtml.js", "output/chtml", "ui", "a11y", "sre", "adaptors")


def mathjax_root() -> Path:
    """The installed MathJax folder (holding ``LICENSE`` and ``es5/``), or a clear error."""
    try:
        dist = importlib.metadata.distribution(MATHJAX_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ExtensionError(
            f"MathJax is missing: the book serves its own copy, from the Python package "
            f"{MATHJAX_DISTRIBUTION!r}. Run `pip install -r requirements.txt`.") from None
    root = Path(dist.locate_file("mathjax/static/mathjax"))
    if not (root / "es5" / MATHJAX_ENTRY).is_file() or not (root / "LICENSE").is_file():
        raise ExtensionError(f"{MATHJAX_DISTRIBUTION} is installed but {root} has no "
                             f"es5/{MATHJAX_ENTRY} or LICENSE: reinstall it.")
    return root


def _use_local_mathjax(app: Sphinx, config) -> None:
    mathjax_root()  # fail early, before reading any page, when the package is missing
    # a relative mathjax_path is taken relative to the site's _static folder
    config.mathjax_path = f"{MATHJAX_DIR}/{MATHJAX_ENTRY}"


def _drop_thebe(app: Sphinx, config) -> None:
    """Disconnect sphinx-thebe's page handlers (Jupyter Book loads the extension whatever the
    configuration): they add a script pointing at a CDN to every page, declared twice, and a
    kernel configuration that nothing uses."""
    for event in ("env-before-read-docs", "doctree-resolved"):
        for listener in list(app.events.listeners.get(event, [])):
            if getattr(listener.handler, "__module__", "").startswith("sphinx_thebe"):
                app.disconnect(listener.id)


def _copy_mathjax(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    root = mathjax_root()
    dest = Path(app.outdir) / "_static" / MATHJAX_DIR
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(root / "LICENSE", dest / "LICENSE")
    shutil.copy2(root / "es5" / MATHJAX_ENTRY, dest / MATHJAX_ENTRY)
    for part in MATHJAX_PARTS:
        src = root / "es5" / part
        (dest / part).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / part)


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _use_local_mathjax)
    app.connect("config-inited", _drop_thebe)  # every extension is set up by then
    app.connect("build-finished", _copy_mathjax)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
