"""The demo page opened from disk (file://) says to serve the folder over http(s) instead of
waiting at "Checking WebGPU…" forever: Chrome runs no module scripts on file:// pages, so the
check is a classic inline script of index.html.  Headless Chromium's --dump-dom gives the DOM after
the page's scripts ran."""
from __future__ import annotations

import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "web"))
import browser_harness  # noqa: E402

WEB = Path(__file__).resolve().parents[1] / "web"
CHROMIUM = browser_harness.find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium)")


class _Element(HTMLParser):
    """The text of the element with id ``wanted`` and whether it has the ``hidden`` attribute."""

    def __init__(self, wanted: str):
        super().__init__()
        self.wanted, self.depth, self.text, self.hidden, self.found = wanted, 0, [], None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self.depth:
            self.depth += 1
        elif attrs.get("id") == self.wanted:
            self.found, self.depth, self.hidden = True, 1, "hidden" in attrs

    def handle_endtag(self, tag):
        if self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.text.append(data)


def element(dom: str, wanted: str) -> tuple[str, bool]:
    parser = _Element(wanted)
    parser.feed(dom)
    assert parser.found, f"no #{wanted} in the page"
    return "".join(parser.text), parser.hidden


def dump_dom(url: str, tmp_path: Path) -> str:
    cmd = [CHROMIUM, *browser_harness.CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
           "--virtual-time-budget=3000", "--dump-dom", url]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, result.stderr[-2000:]
    return result.stdout


def test_page_from_disk_says_to_serve_it(tmp_path):
    bundle = tmp_path / "my bundle"      # a space: the command shown must quote the folder
    bundle.mkdir()
    for name in ("index.html", "demo.js", "demo.css", "voxc.js", "capture-worklet.js"):
        shutil.copy2(WEB / name, bundle / name)
    dom = dump_dom((bundle / "index.html").as_uri(), tmp_path)
    text, hidden = element(dom, "error")
    assert not hidden, "the error box stayed hidden"
    assert "web server" in text and "python3 -m http.server 8000" in text and "http://localhost:8000/" in text
    assert f'cd "{bundle}/"' in text, text
    status, _ = element(dom, "status")
    assert status == "Not ready"


def test_page_over_http_shows_no_file_message(tmp_path):
    (tmp_path / "site").mkdir()
    for name in ("index.html", "demo.js", "demo.css", "voxc.js", "capture-worklet.js"):
        shutil.copy2(WEB / name, tmp_path / "site" / name)
    with browser_harness.PageServer({"/": tmp_path / "site"}) as server:
        dom = dump_dom(server.url("index.html"), tmp_path)
        assert "/demo.js" in server.gets()       # the module ran: it is served, not blocked
    text, _ = element(dom, "error")
    assert "file://" not in text and "http.server" not in text
