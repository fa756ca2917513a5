"""Browser test harness: serve folders on 127.0.0.1 and drive headless Debian Chromium against them.

Chromium's WebGPU runs on SwiftShader (CPU) with the flag set below (found in
shared/research/tvm_feasibility.md §5; plain --headless gives no adapter).  Pages report back by
POSTing JSON: ``/result`` ends a run, ``/log`` carries console output for failure messages.
Every response is ``no-store`` so the browser's HTTP cache never hides a request: when the server
sees no GET for a file, the page really got it from the Cache API.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic", "--enable-unsafe-webgpu"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class PageServer:
    """ThreadingHTTPServer over URL-prefix -> folder mounts, with COOP/COEP headers (so pages are
    cross-origin isolated, as a production deployment of the bundle would be)."""

    def __init__(self, mounts: dict[str, Path]):
        self.mounts = {("/" + k.strip("/") + "/").replace("//", "/"): Path(v) for k, v in mounts.items()}
        self.results: queue.Queue = queue.Queue()
        self.logs: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def translate_path(self, path):
                path = unquote(urlsplit(path).path)
                for prefix in sorted(server.mounts, key=len, reverse=True):
                    if path.startswith(prefix):
                        rel = Path(path[len(prefix):])
                        if ".." in rel.parts:
                            break
                        return str(server.mounts[prefix] / rel)
                return "/nonexistent"

            def end_headers(self):
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                self.send_header("Cache-Control", "no-store")
                super().end_headers()

            def do_GET(self):
                with server._lock:
                    server.requests.append(("GET", urlsplit(self.path).path))
                super().do_GET()

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = urlsplit(self.path).path
                if path == "/result":
                    server.results.put(json.loads(body))
                elif path == "/log":
                    server.logs.append(body.decode("utf-8", "replace"))
                self.send_response(HTTPStatus.NO_CONTENT)
                self.end_headers()

            def log_message(self, *args):
                pass

        Handler.extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".js": "text/javascript",
                                  ".mjs": "text/javascript", ".wasm": "application/wasm", ".json": "application/json"}
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def gets(self, prefix: str = "/") -> list[str]:
        with self._lock:
            return [p for m, p in self.requests if m == "GET" and p.startswith(prefix)]

    def reset_log(self):
        with self._lock:
            self.requests.clear()
        self.logs.clear()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _chromium_cmd(chromium: str, user_data_dir: Path, extra=(), flags=None) -> list[str]:
    return [chromium, *(CHROMIUM_FLAGS if flags is None else flags), f"--user-data-dir={user_data_dir}", *extra]


def run_page(server: PageServer, url: str, *, user_data_dir: Path | None = None, timeout: float = 180,
             chromium: str | None = None, flags: list[str] | None = None) -> dict:
    """Open ``url`` in headless Chromium and return the first JSON the page POSTs to /result.
    Reusing ``user_data_dir`` keeps the browser profile (and its Cache API storage) between runs.
    ``flags`` replaces CHROMIUM_FLAGS (e.g. without --enable-unsafe-webgpu: a browser with no GPU adapter)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    with contextlib.ExitStack() as stack:
        if user_data_dir is None:
            user_data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voxc-chromium-")))
        errlog = stack.enter_context(tempfile.TemporaryFile())
        proc = subprocess.Popen(_chromium_cmd(chromium, user_data_dir, [url], flags), stdout=errlog, stderr=errlog,
                                start_new_session=True)
        try:
            return server.results.get(timeout=timeout)
        except queue.Empty:
            errlog.seek(0)
            tail = errlog.read().decode("utf-8", "replace")[-3000:]
            raise TimeoutError(f"no result from {url} within {timeout} s\npage log:\n" + "\n".join(server.logs[-30:]) +
                               f"\nchromium output (tail):\n{tail}") from None
        finally:
            _stop(proc)


class _DevToolsPipe:
    """Chrome DevTools Protocol over ``--remote-debugging-pipe`` (Chromium reads commands on fd 3 and
    writes replies on fd 4, JSON messages ended by NUL): enough to screenshot a page on demand."""

    def __init__(self, read_fd: int, write_fd: int):
        self._read, self._write = read_fd, write_fd
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._reader, daemon=True)
        self._thread.start()

    def _reader(self):
        buf = b""
        while True:
            try:
                chunk = os.read(self._read, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._cond:
                    self._replies[-1] = {"error": "pipe closed"}
                    self._cond.notify_all()
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60):
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._write, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        with self._cond:
            while mid not in self._replies:
                if -1 in self._replies or not self._cond.wait(max(0.0, deadline - time.time())):
                    raise RuntimeError(f"DevTools: no reply to {method}")
            reply = self._replies.pop(mid)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error']}")
        return reply.get("result", {})


def run_page_with_screenshot(server: PageServer, url: str, out_png: Path, *, window_size=(1280, 900),
                             user_data_dir: Path | None = None, timeout: float = 180,
                             chromium: str | None = None) -> dict:
    """``run_page``, and once the page has POSTed its result, a PNG of it (DevTools
    Page.captureScreenshot): the screenshot shows the page in the state it reported."""
    import base64

    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    with contextlib.ExitStack() as stack:
        if user_data_dir is None:
            user_data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voxc-chromium-")))
        errlog = stack.enter_context(tempfile.TemporaryFile())
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()

        def child_fds():   # the pipe ends at the fds Chromium expects: 3 (commands in), 4 (replies out)
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        proc = subprocess.Popen(
            _chromium_cmd(chromium, user_data_dir, ["--remote-debugging-pipe",
                                                    f"--window-size={window_size[0]},{window_size[1]}",
                                                    "--hide-scrollbars", url]),
            stdout=errlog, stderr=errlog, start_new_session=True, preexec_fn=child_fds, pass_fds=(3, 4))
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        try:
            devtools = _DevToolsPipe(from_chrome_r, to_chrome_w)
            try:
                result = server.results.get(timeout=timeout)
            except queue.Empty:
                errlog.seek(0)
                tail = errlog.read().decode("utf-8", "replace")[-3000:]
                raise TimeoutError(f"no result from {url} within {timeout} s\npage log:\n"
                                   + "\n".join(server.logs[-30:]) + f"\nchromium output (tail):\n{tail}") from None
            pages = [t for t in devtools.call("Target.getTargets")["targetInfos"] if t["type"] == "page"]
            session = devtools.call("Target.attachToTarget", {"targetId": pages[0]["targetId"],
                                                              "flatten": True})["sessionId"]
            shot = devtools.call("Page.captureScreenshot", {"format": "png"}, session=session)
            Path(out_png).write_bytes(base64.b64decode(shot["data"]))
            return result
        finally:
            _stop(proc)
            for fd in (from_chrome_r, to_chrome_w):
                with contextlib.suppress(OSError):
                    os.close(fd)


def _stop(proc: subprocess.Popen) -> None:
    """Chromium forks helpers into its session: end the session we started, by its id."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            proc.wait()


def screenshot(url: str, out_png: Path, *, window_size=(1280, 800), wait_ms: int = 5000,
               user_data_dir: Path | None = None, chromium: str | None = None) -> Path:
    """PNG of ``url`` after ``wait_ms`` (Chromium's --screenshot; WebGPU flags on, so GPU pages render)."""
    chromium = chromium or find_chromium()
    if chromium is None:
        raise RuntimeError("chromium not found (apt-get install chromium)")
    out_png = Path(out_png).resolve()
    with tempfile.TemporaryDirectory(prefix="voxc-chromium-") as tmp:
        cmd = _chromium_cmd(chromium, Path(user_data_dir or tmp),
                            [f"--screenshot={out_png}", f"--window-size={window_size[0]},{window_size[1]}",
                             f"--timeout={wait_ms}", "--hide-scrollbars", url])
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=wait_ms / 1000 + 60)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise
        if not out_png.exists():
            raise RuntimeError(f"chromium wrote no screenshot after {time.time() - t0:.0f} s:\n"
                               + out.decode("utf-8", "replace")[-3000:])
    return out_png
