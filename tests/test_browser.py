"""The built book, opened in a real browser with the network blocked for the page.

Every page of the book is opened in headless Chromium (the system's browser, driven by
Playwright's Python API), served from 127.0.0.1, and every request that leaves the site is
refused. Then: no console error, every image loaded, every formula typeset by MathJax with no raw
``\\(`` or ``$$`` left, each chapter's launch button points at its notebook in the configured
repository, and the search page finds each chapter by a word of its title.

The browser is the system's Chromium (Debian/Ubuntu: ``apt-get install chromium``; or set
``CHROMIUM`` to a Chromium or Chrome executable). Without one the test is skipped, except under
CI (``CI=true``), where it fails: ``.ci/run`` installs the browser.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urljoin

import pytest
import yaml

from test_book import REPO_ROOT, build_book, html_pages, toc_pages

HOW_TO_ENABLE = ("install Chromium (Debian/Ubuntu: apt-get install chromium) or set CHROMIUM to a "
                 "Chromium/Chrome executable, and pip install -r requirements.txt (Playwright)")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def no_browser(reason: str):
    if in_ci():
        pytest.fail(f"the browser test cannot run under CI: {reason}; {HOW_TO_ENABLE}")
    pytest.skip(f"browser test skipped: {reason}; to run it, {HOW_TO_ENABLE}")


def chromium_executable() -> str | None:
    candidates = [os.environ.get("CHROMIUM")] + [shutil.which(name) for name in (
        "chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")]
    return next((c for c in candidates if c and Path(c).is_file()), None)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site():
    """The built book served on 127.0.0.1 (a page served from disk cannot load its search index
    the way a reader's browser does)."""
    html = build_book()
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_QuietHandler, directory=str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield html, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        no_browser("Playwright is not installed")
    exe = chromium_executable()
    if exe is None:
        no_browser("no Chromium found")
    with sync_playwright() as p:
        # belt and braces: besides the per-request block below, the browser resolves no host name
        b = p.chromium.launch(executable_path=exe, headless=True,
                              args=["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
        yield b
        b.close()


class Page:
    """A browser page on which every request that leaves the site is refused and recorded, and
    every console error and uncaught exception is recorded."""

    def __init__(self, browser, site):
        self.root, self.base = site
        self.context = browser.new_context()
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(
            f"console: {m.text} ({m.location.get('url', '')})"))
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.on("requestfailed", self._failed)

    def _failed(self, request):
        # A request the page itself gave up on (net::ERR_ABORTED: the reader, or the test, went to
        # the next page while the search was still fetching result summaries) is not a fault of
        # the site; every other failure of a request to the site is.
        if request.url.startswith(self.base) and "ERR_ABORTED" not in (request.failure or ""):
            self.errors.append(f"failed: {request.url} ({request.failure})")

    def _route(self, route):
        if route.request.url.startswith(self.base) or route.request.url.startswith("data:"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("blockedbyclient")

    def open(self, path: str, until: str = "load"):
        response = self.page.goto(self.base + path, wait_until=until)
        assert response is not None and response.ok, f"{path}: {response and response.status}"
        served = self.root / path.split("?")[0]
        redirect = re.search(r'http-equiv="refresh" content="\d+;\s*url=([^"]+)"',
                             served.read_text(), flags=re.I)
        if redirect:  # the site's front page sends the reader on to the introduction
            self.page.wait_for_url(urljoin(self.base + path, redirect.group(1)))
            self.page.wait_for_load_state("load")
        return self.page

    def close(self):
        self.context.close()


MATHJAX_DONE = """async () => {
    const mathCount = document.querySelectorAll('.math').length;
    if (!mathCount) return {math: 0};
    const deadline = Date.now() + 30000;
    while (!(window.MathJax && MathJax.startup && MathJax.startup.promise)) {
        if (Date.now() > deadline) return {math: mathCount, loaded: false};
        await new Promise(r => setTimeout(r, 100));
    }
    await MathJax.startup.promise;
    await document.fonts.ready;  // MathJax's fonts are loaded (or have failed) by now
    const untypeset = Array.from(document.querySelectorAll('.math'))
        .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 80));
    return {math: mathCount, loaded: true, untypeset: untypeset};
}"""

RAW_TEXT = """() => {
    const body = document.body.cloneNode(true);
    body.querySelectorAll('pre, code, script, style, mjx-container, .highlight, textarea')
        .forEach(e => e.remove());
    return body.textContent;
}"""

IMAGES = """async () => {
    const images = Array.from(document.images);
    images.forEach(i => { i.loading = 'eager'; });
    await Promise.all(images.map(i => i.complete ? null
        : new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 20000); })));
    return images.filter(i => !(i.complete && i.naturalWidth > 0))
        .map(i => i.getAttribute('src'));
}"""


def test_every_page_works_offline(site, browser):
    html, base = site
    pages = [str(p.relative_to(html)) for p in html_pages(html)]
    assert len(pages) >= len(toc_pages()), pages
    problems, typeset = [], 0
    page = Page(browser, site)
    try:
        for path in pages:
            page.errors.clear()
            page.blocked.clear()
            p = page.open(path)
            math = p.evaluate(MATHJAX_DONE)
            if math["math"]:
                if not math["loaded"]:
                    problems.append(f"{path}: MathJax never loaded")
                elif math["untypeset"]:
                    problems.append(f"{path}: formulas left untypeset: {math['untypeset'][:3]}")
                typeset += math["math"]
            raw = re.findall(r".{0,30}(?:\\\(|\\\[|\$\$).{0,30}", p.evaluate(RAW_TEXT))
            if raw:
                problems.append(f"{path}: raw TeX left in the text: {raw[:3]}")
            broken = p.evaluate(IMAGES)
            if broken:
                problems.append(f"{path}: images not loaded: {broken[:5]}")
            problems += [f"{path}: {e}" for e in page.errors]
            problems += [f"{path}: tried to load from elsewhere: {u}" for u in page.blocked]
    finally:
        page.close()
    assert typeset > 0, "no formula anywhere in the book: the MathJax check checked nothing"
    assert not problems, "\n".join(problems)


def test_each_chapter_has_its_launch_button(site, browser):
    html, base = site
    config = yaml.safe_load((REPO_ROOT / "_config.yml").read_text())
    repo = config["repository"]["url"].removeprefix("https://github.com/").strip("/")
    colab = config["launch_buttons"]["colab_url"].rstrip("/")
    branch = config["repository"].get("branch", "main")
    chapters = [p for p in toc_pages() if p.startswith("notebooks/")]
    assert chapters
    page = Page(browser, site)
    try:
        for chapter in chapters:
            p = page.open(f"{chapter}.html", until="domcontentloaded")
            expected = f"{colab}/github/{repo}/blob/{branch}/{chapter}.ipynb"
            hrefs = p.eval_on_selector_all(".dropdown-launch-buttons a",
                                           "as => as.map(a => a.href)")
            assert expected in hrefs, f"{chapter}: launch buttons {hrefs}, expected {expected}"
    finally:
        page.close()


COMMON_WORDS = {"with", "what", "where", "when", "from", "that", "this", "into", "them", "their",
                "your", "how", "and", "the"}


def title_word(chapter: str, html: Path) -> str:
    """The longest uncommon word of the chapter's title: a term the search must find it by."""
    title = re.search(r"<h1>(.*?)<", (html / f"{chapter}.html").read_text(), flags=re.S)
    assert title, f"{chapter} has no title"
    words = [w for w in re.findall(r"[A-Za-z]{4,}", title.group(1))
             if w.lower() not in COMMON_WORDS]
    assert words, f"{chapter}: no word of its title to search for: {title.group(1)!r}"
    return max(words, key=len)


def test_search_finds_each_chapter(site, browser):
    html, base = site
    chapters = [p for p in toc_pages() if p.startswith("notebooks/")]
    page = Page(browser, site)
    try:
        for chapter in chapters:
            term = title_word(chapter, html)
            p = page.open(f"search.html?q={term}")
            p.wait_for_function(  # the search has finished (it also fetched each result page)
                "() => /search finished|did not match|no documents/i.test("
                "(document.querySelector('#search-results') || {}).textContent || '')",
                timeout=30000)
            p.wait_for_load_state("networkidle")  # and its fetches of result summaries are done
            hrefs = p.eval_on_selector_all("#search-results ul.search li a",
                                           "as => as.map(a => a.getAttribute('href'))")
            assert any(f"{chapter}.html" in h for h in hrefs), (
                f"searching {term!r} does not find {chapter}: {hrefs}")
            assert not page.errors and not page.blocked, page.errors + page.blocked
    finally:
        page.close()
