"""A `mer serve` child process on a free localhost port, for benchmarks and tests.

A real process, spoken to over real HTTP, so what is measured or tested is
what a user runs.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mer.errors import MerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class LocalServer:
    def __init__(self, store: str | Path, *options: str, startup_seconds: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "mer.cli", "serve", "--store", str(store)]
        cmd += ["--port", str(self.port), *options]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + startup_seconds
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                self._log.seek(0)
                raise MerError(f"mer serve did not start: {self._log.read().strip()[-2000:]}")
            time.sleep(0.2)

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
