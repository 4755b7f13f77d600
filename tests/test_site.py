"""The documentation site: a strict mkdocs build, then the home, a notebook and an API page in headless Chromium.

Chromium and its driver are Debian's (`chromium`, `chromium-driver`; .ci/run installs them): nothing here
downloads a browser. Screenshots go to runs/site_screenshots/ for a person to look at.
"""
import functools
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "runs" / "site_screenshots"
PAGES = {"home": "index.html", "notebook": "notebooks/05_retrieve_and_fuse_one_image.html",
         "api": "api/library.html"}
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built as `make site` builds it, strict: any warning (a broken link, a missing page) fails."""
    if importlib.util.find_spec("mkdocs") is None:
        message = "the docs extra is not installed: pip install -e '.[docs]' (make install does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], check=False,
                           cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    return out


@pytest.fixture(scope="module")
def served(site):
    """The built site on a free loopback port (as a reader's browser gets it: search needs http, not file:)."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        """A browser that drops a connection it no longer needs is not a failure of the site."""


def test_strict_build_has_every_page(site):
    for page in [*PAGES.values(), "results.html", "stand-ins.html", "cli.html", "robustness.html"]:
        assert (site / page).is_file(), page


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI needs Debian's chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("no system Chromium: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def internal_targets(driver, root: str) -> list[str]:
    """Every link and image of the page that stays on the site, without its fragment."""
    urls = driver.execute_script(
        "return [...document.querySelectorAll('a[href]')].map(a => a.href)"
        ".concat([...document.images].map(i => i.src))")
    return sorted({urldefrag(u).url for u in urls if u.startswith(root)})


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_in_chromium(served, browser, name):
    from selenium.webdriver.support.wait import WebDriverWait
    url = served + PAGES[name]
    browser.get(url)
    browser.execute_script("return document.fonts.ready")
    assert browser.title and "404" not in browser.title, browser.title
    if name == "notebook":          # the formulas typeset by the site's own MathJax (docs/hooks.py)
        WebDriverWait(browser, 30).until(lambda b: b.execute_script("return document.querySelectorAll('.MathJax').length"))
        assert "$\\tau$" not in browser.find_element("tag name", "article").text
    text = browser.find_element("tag name", "article").text
    assert len(text) > 500, f"{name}: the article holds {len(text)} characters"
    images = browser.execute_script(
        "return [...document.images].map(i => [i.src.slice(0, 80), i.complete && i.naturalWidth > 0])")
    broken = [src for src, ok in images if not ok]
    assert not broken, f"{name}: images that did not load: {broken}"
    missing = [u for u in internal_targets(browser, served) if status(u) != 200]
    assert not missing, f"{name}: links to missing pages: {missing}"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, json.dumps(errors, indent=1)
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / f"{name}.png"))
    if name == "notebook":
        assert images, "the notebook page shows its stored figures"
    if name == "api":
        assert "SemLAPredictor" in text and "from_assets" in text
