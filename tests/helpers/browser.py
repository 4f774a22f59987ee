"""Headless Chromium driven over the DevTools protocol, for the tests that check rendered report pages.

Chromium speaks the DevTools protocol on a pipe (--remote-debugging-pipe: it reads commands from fd 3 and writes
replies and events to fd 4, NUL-separated JSON), so no websocket client and no port are needed.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-extensions", "--mute-audio", "--hide-scrollbars", "--window-size=1280,1024")


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsError(RuntimeError):
    pass


class Chromium:
    """One headless Chromium process with a fresh profile; `render` loads a page and reports what the browser saw."""

    def __init__(self, binary: str, workdir: Path):
        self.workdir = Path(workdir)
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=self.workdir)
        self.log_path = self.workdir / "chromium.log"
        self._log = open(self.log_path, "wb")
        # fd 3 <- our stdin pipe, fd 4 -> our stdout pipe; Chromium's own stdout goes to the log.
        command = ["sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2', "sh", binary, *CHROMIUM_FLAGS,
                   f"--user-data-dir={self.profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._messages: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._next_id = 0
        self.events: list[dict] = []

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                self._messages.put(None)
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                self._messages.put(json.loads(raw))

    def _next(self, deadline: float) -> dict:
        try:
            message = self._messages.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            raise DevToolsError(f"no answer from Chromium (log: {self.log_path})") from None
        if message is None:
            raise DevToolsError(f"Chromium exited (log tail: {self.log_path.read_text(errors='replace')[-800:]})")
        return message

    def call(self, method: str, params: dict | None = None, *, session: str | None = None,
             timeout: float = 120.0) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.proc.stdin.write(json.dumps(message).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise DevToolsError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, *, session: str | None = None, timeout: float = 120.0) -> dict:
        for event in self.events:
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                self.events.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            event = self._next(deadline)
            if event.get("method") == method and (session is None or event.get("sessionId") == session):
                return event
            self.events.append(event)

    def render(self, page: Path, screenshot: Path) -> Rendered:
        """Load `page`, wait for its load event, and return its images, console errors and a full-page screenshot."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Log.enable"):
            self.call(method, session=session)
        self.call("Page.navigate", {"url": Path(page).resolve().as_uri()}, session=session)
        self.wait_event("Page.loadEventFired", session=session)
        script = ("JSON.stringify(Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, "
                  "width: i.naturalWidth, height: i.naturalHeight})))")
        value = self.call("Runtime.evaluate", {"expression": script, "returnByValue": True},
                          session=session)["result"]["value"]
        text = self.call("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True},
                         session=session)["result"]["value"]
        size = self.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1}
        shot = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip},
                         session=session)["data"]
        screenshot.write_bytes(base64.b64decode(shot))
        # Console messages and exceptions arrive as events, possibly after the load event: drain briefly.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                message = self._messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if message is not None:
                self.events.append(message)
        errors = [describe_error(e) for e in self.events if e.get("sessionId") == session and is_error(e)]
        return Rendered(images=json.loads(value), errors=errors, screenshot=screenshot, text=text)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=10)
        except (DevToolsError, BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()


def is_error(event: dict) -> bool:
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        return True
    if method == "Runtime.consoleAPICalled":
        return params.get("type") in ("error", "assert")
    if method == "Log.entryAdded":
        return params.get("entry", {}).get("level") == "error"
    return False


def describe_error(event: dict) -> str:
    params = event.get("params", {})
    if event.get("method") == "Log.entryAdded":
        entry = params.get("entry", {})
        return f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip()
    if event.get("method") == "Runtime.exceptionThrown":
        return json.dumps(params.get("exceptionDetails", {}))[:300]
    return " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))


@dataclass
class Rendered:
    images: list[dict]
    errors: list[str]
    screenshot: Path
    text: str = ""

    def blank(self) -> bool:
        """A screenshot that is one colour (or nearly): nothing was drawn."""
        pixels = np.asarray(Image.open(io.BytesIO(self.screenshot.read_bytes())).convert("RGB"), dtype=np.float64)
        not_white = (pixels.min(axis=-1) < 245).mean()
        return pixels.std() < 5.0 or not_white < 0.01
