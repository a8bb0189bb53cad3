"""Run a command inside a memory limit of its own (a Linux memory cgroup), and measure it.

Both cgroup layouts exist on Linux machines: v2 (one unified tree, `memory.max`,
`memory.peak`) and v1 (a `memory` controller of its own, `memory.limit_in_bytes`,
`memory.max_usage_in_bytes`). As root the group is created directly under the
mounted tree; nothing else (systemd, cgexec) is needed. The limit counts page
cache too, which is the point: an engine that reads through the page cache must
live with the same limit as one that reads with O_DIRECT.

What a run reports comes from the kernel: the child's exit status and resource
usage (`wait4`: peak RSS, blocks read), the group's peak usage and its OOM kills.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mer.errors import ConfigError
from mer.procfs import kib_field

ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class RunResult:
    returncode: int  # negative: killed by that signal (-9 for the OOM killer)
    stdout: str
    stderr: str
    seconds: float
    peak_rss_bytes: int  # the child's own high-water mark (VmHWM, sampled every 50 ms)
    bytes_read: int  # from block devices, page cache misses and O_DIRECT alike (wait4)
    group_peak_bytes: int | None  # the whole group's peak, page cache included
    oom_kills: int | None

    @property
    def oom_killed(self) -> bool:
        return bool(self.oom_kills) or self.returncode == -9


def available() -> str | None:
    """Why a memory cgroup cannot be made here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root to create a memory cgroup"
    if _v2_root() is None and not (ROOT / "memory").is_dir():
        return f"no memory cgroup controller mounted under {ROOT}"
    return None


def _v2_root() -> Path | None:
    for path in (ROOT, ROOT / "unified"):
        controllers = path / "cgroup.controllers"
        if controllers.is_file() and "memory" in controllers.read_text().split():
            return path
    return None


class MemoryLimit:
    """A fresh memory cgroup of `limit` bytes, removed on exit (`with MemoryLimit(...)`)."""

    def __init__(self, limit: int, name: str = "mer-bench") -> None:
        why = available()
        if why:
            raise ConfigError(f"cannot limit memory: {why}")
        self.limit = limit
        v2 = _v2_root()
        self.v2 = v2 is not None
        base = v2 if v2 is not None else ROOT / "memory"
        self.path = base / f"{name}-{os.getpid()}-{time.monotonic_ns()}"

    def __enter__(self) -> MemoryLimit:
        self.path.mkdir()
        if self.v2:
            (self.path / "memory.max").write_text(str(self.limit))
            swap = self.path / "memory.swap.max"
            if swap.exists():  # a limit that swap could stretch would measure nothing
                swap.write_text("0")
        else:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        return self

    def __exit__(self, *exc) -> None:
        for _ in range(50):  # the group empties as its last process is reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)

    def run(self, argv: list[str], timeout: float | None = None, env=None) -> RunResult:
        """Run argv inside the group (it joins before exec) and wait for it."""
        # The child joins the group from a small shell that then execs the command: not from
        # a preexec_fn in a fork of this process, whose resident size would count in the
        # child's peak (Linux keeps ru_maxrss across exec) and in the group's charge.
        join = 'echo $$ > "$0" && exec "$@"'
        argv = ["/bin/sh", "-c", join, str(self.path / "cgroup.procs"), *argv]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            t0 = time.perf_counter()
            proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env)
            timer = threading.Timer(timeout, proc.kill) if timeout else None
            if timer:
                timer.start()
            hwm = _HighWater(proc.pid)
            try:
                _, status, usage = os.wait4(proc.pid, 0)  # wait4: the blocks it read
            finally:
                hwm.stop()
                if timer:
                    timer.cancel()
            seconds = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            return RunResult(
                proc.returncode, out.read(), err.read(), seconds,
                hwm.peak, usage.ru_inblock * 512, self._peak(), self._oom_kills(),
            )  # fmt: skip

    def _peak(self) -> int | None:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def _oom_kills(self) -> int | None:
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            for line in (self.path / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return None


class _HighWater:
    """The largest VmHWM a process shows while it runs. Not wait4's ru_maxrss: Linux carries
    the spawning process's high-water mark across exec into it, so a child of a large
    process (a test runner) would report the parent's size."""

    def __init__(self, pid: int, every: float = 0.05) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(every,), daemon=True)
        self._thread.start()

    def _watch(self, every: float) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._stop.is_set():
            self.peak = max(self.peak, kib_field(status, "VmHWM") or 0)
            self._stop.wait(every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def drop_page_cache() -> bool:
    """Write back and drop the page cache (root only); False where the kernel refuses."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False
