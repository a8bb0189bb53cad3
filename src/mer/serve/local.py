"""A `mer serve` child process on a free localhost port, for benchmarks and tests.

A real process, spoken to over real HTTP, so what is measured or tested is
what a user runs. It binds port 0 and announces the port it got, so no other
process can take the port between choosing it and binding it.
"""

from __future__ import annotations

import http.client
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mer.errors import MerError


def connect(url: str, timeout: float = 30) -> http.client.HTTPConnection:
    """A connection to the server at `url` (http://host[:port][/...])."""
    return http.client.HTTPConnection(url.removeprefix("http://").split("/")[0], timeout=timeout)


def read_metrics(url: str, api_key: str | None = None) -> dict[str, float]:
    """A server's /metrics as {name: value}."""
    conn = connect(url)
    conn.request(
        "GET", "/metrics", headers={"Authorization": f"Bearer {api_key}"} if api_key else {}
    )
    resp = conn.getresponse()
    text = resp.read().decode()
    conn.close()
    if resp.status != 200:
        raise MerError(f"{url}/metrics answered {resp.status}: {text[:200]}")
    rows = (line.split() for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in rows}


ANNOUNCED = re.compile(r"^serving .* on http://127\.0\.0\.1:(\d+)/v1", re.MULTILINE)


class LocalServer:
    def __init__(self, store: str | Path, *options: str, startup_seconds: float = 120) -> None:
        self.port: int | None = None
        self._log = tempfile.NamedTemporaryFile(mode="w+", suffix=".log")
        cmd = [sys.executable, "-m", "mer.cli", "serve", "--store", str(store), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, *options], stdout=self._log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + startup_seconds
        while self.port is None or not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self._output()
                self.close()
                raise MerError(f"mer serve did not start: {log.strip()[-2000:]}")
            if self.port is None and (found := ANNOUNCED.search(self._output())):
                self.port = int(found.group(1))
                continue
            time.sleep(0.2)
        self.url = f"http://127.0.0.1:{self.port}"

    def _output(self) -> str:
        """What the server printed so far (read through a handle of its own: the child's
        writes share the log's file offset)."""
        with open(self._log.name) as f:
            return f.read()

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
