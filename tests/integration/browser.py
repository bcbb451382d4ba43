"""Headless Chromium for the tests, driven over the DevTools protocol on a pipe (Chromium's
`--remote-debugging-pipe`: JSON messages ended by NUL on fds 3 and 4), so a test reads the
live layout of a page, its network requests and its pixels without a websocket library.

A missing `chromium` is a failure saying what to install (`make test` installs it).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest

# Chromium reads commands on fd 3 and writes on fd 4; the pipe ends may have any number in
# this process, so a tiny launcher moves them there (above 10 first, in case they are 3 or 4).
_LAUNCH = ("import fcntl, os, sys; a, b = (fcntl.fcntl(int(f), fcntl.F_DUPFD, 10) for f in "
           "sys.argv[1:3]); os.dup2(a, 3); os.dup2(b, 4); os.execv(sys.argv[3], sys.argv[3:])")


def chromium_binary() -> str:
    found = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(found, os.X_OK):
        pytest.fail("chromium is not installed: apt-get install --no-install-recommends "
                    "chromium (`make test` installs it)")
    return found


class Browser:
    """One headless Chromium; `open(url)` gives a page session."""

    def __init__(self, profile: Path, log: Path, width: int = 1280) -> None:
        self.width = width
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()
        self._log = log.open("wb")
        # We run as root in the test containers: Chromium refuses its sandbox there.
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, str(commands), str(answers), chromium_binary(),
             "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(commands, answers), stdout=self._log, stderr=self._log)
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._next:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            self.events.append(self._read(deadline, method))

    def _read(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready = select.select([self._from_browser], [], [], max(left, 0))[0]
            if not ready:
                raise AssertionError(f"chromium did not answer {waiting_for} in time "
                                     f"(log: {self._log.name})")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise AssertionError(f"chromium exited (code {self.proc.poll()}); log: "
                                     f"{self._log.name}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(raw))

    def open(self, url: str) -> str:
        """Load `url` in a new tab sized to its whole content; return the tab's session."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = str(self.send("Target.attachToTarget", {"targetId": target,
                                                           "flatten": True})["sessionId"])
        for domain in ("Network", "Page", "Runtime"):
            self.send(f"{domain}.enable", session=session)
        self._viewport(session, 1000)
        self.send("Page.navigate", {"url": url}, session)
        self.wait_event("Page.loadEventFired")
        # The whole page in the viewport: hit tests and the screenshot then see every chart.
        height = self.send("Page.getLayoutMetrics", session=session)["cssContentSize"]["height"]
        self._viewport(session, int(height) + 1)
        return session

    def _viewport(self, session: str, height: int) -> None:
        self.send("Emulation.setDeviceMetricsOverride", {
            "width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session)

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression,
                                                "returnByValue": True}, session)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"]["value"]

    def screenshot(self, session: str, clip: dict[str, float] | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png"}
        if clip:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode(self.send("Page.captureScreenshot", params, session)["data"])

    def pixel(self, session: str, x: float, y: float) -> tuple[int, int, int]:
        """The colour painted at (x, y) in CSS pixels."""
        return rgb_of_1x1_png(self.screenshot(session, {"x": x, "y": y, "width": 1,
                                                        "height": 1}))

    def requested(self) -> list[str]:
        """Every URL the pages asked for so far."""
        return [e["params"]["request"]["url"] for e in self.events
                if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        # It closes its pipe as it exits: the answer may never come.
        with contextlib.suppress(AssertionError):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()


def rgb_of_1x1_png(data: bytes) -> tuple[int, int, int]:
    """The pixel of a one-pixel PNG (8-bit RGB or RGBA). With a single pixel every PNG row
    filter predicts 0, so the decompressed bytes after the filter byte are the pixel."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, colour_type = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", body[:10])
            assert (width, height, depth) == (1, 1, 8)
            assert colour_type in (2, 6)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    return raw[1], raw[2], raw[3]
