"""Headless Chromium for the tests that open a page (eval.html, the serve page): where Chromium is,
a proxy that records every request that would leave the machine, and a small DevTools-protocol
client over Chromium's debugging pipe (no websocket library, no browser download)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

# hosts Chromium itself calls (component updater, sign-in) even with background networking off
CHROMIUM_OWN = {"update.googleapis.com", "accounts.google.com", "clients2.google.com", "clients1.google.com",
                "redirector.gvt1.com", "edgedl.me.gvt1.com"}

# the flags that keep Chromium's own traffic down and its rendering reproducible
QUIET_FLAGS = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-domain-reliability", "--no-pings", "--hide-scrollbars",
               "--force-color-profile=srgb", "--force-device-scale-factor=1",
               "--disable-features=OptimizationHints,Translate,MediaRouter,NetworkTimeServiceQuerying,"
               "AutofillServerCommunication"]


def chromium() -> str:
    """The Chromium binary; under CI a missing one fails the test, elsewhere it skips it."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("CI is set and Chromium is missing: .ci/run installs it (apt-get install chromium)")
    pytest.skip("Chromium is not installed (apt-get install chromium); CI installs it and runs this test")


class RecordingProxy:
    """An HTTP proxy that answers nothing and records the first line of every request."""

    def __init__(self):
        self.requests: list[str] = []
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                self.requests.append(conn.recv(4096).split(b"\r\n")[0].decode("latin1"))
            except OSError:
                pass
            conn.close()

    def page_requests(self) -> list[str]:
        """The requests not made by Chromium for itself."""
        out = []
        for line in self.requests:
            m = re.match(r"(?:CONNECT\s+([^:/\s]+)|\w+\s+\w+://([^:/\s]+))", line)
            if not m or (m.group(1) or m.group(2)) not in CHROMIUM_OWN:
                out.append(line)
        return out

    def close(self):
        self.sock.close()


def _above_9(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return high


class DevTools:
    """Chromium driven through the DevTools protocol on its debugging pipe (--remote-debugging-pipe:
    JSON messages ended by NUL, Chromium reading on its fd 3 and writing on fd 4), one page attached.
    Every event is kept in `events`; `call` sends a command to the page and returns its result."""

    def __init__(self, binary: str, profile, *flags: str, timeout: float = 30):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # the child's ends above fd 9 (so that neither is already 3 or 4), then the shell puts them
        # on the fd numbers Chromium reads and writes
        to_chrome_r, from_chrome_w = (_above_9(fd) for fd in (to_chrome_r, from_chrome_w))
        script = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w} {to_chrome_r}<&- {from_chrome_w}>&-'
        self.proc = subprocess.Popen(["bash", "-c", script, binary, *QUIET_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-pipe", *flags, "about:blank"],
                                     pass_fds=(to_chrome_r, from_chrome_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self.timeout = timeout
        self.events: list[dict] = []
        self._replies: dict[int, dict] = {}
        self._next = 0
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]

    def _read(self):
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *messages, buf = buf.split(b"\0")
            with self._lock:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                    else:
                        self.events.append(msg)
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def call(self, method: str, session: bool = True, **params) -> dict:
        """Send `method` (to the page unless session=False) and wait for its result."""
        with self._lock:
            self._next += 1
            n = self._next
        msg = {"id": n, "method": method, "params": params, **({"sessionId": self.session} if session else {})}
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._lock:
            while n not in self._replies:
                left = deadline - time.monotonic()
                assert left > 0 and self.proc.poll() is None, f"Chromium gave no answer to {method}"
                self._lock.wait(left)
            reply = self._replies.pop(n)
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply["result"]

    def js(self, expression: str):
        """The value of a JavaScript expression in the page (awaited if it is a promise)."""
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in res, res["exceptionDetails"]
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float, what: str):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
            time.sleep(0.2)

    def close(self):
        try:
            os.write(self._to_chrome, json.dumps({"id": 0, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._to_chrome)
            os.close(self._from_chrome)
