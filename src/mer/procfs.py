"""Linux's memory figures from /proc, read one way for the whole project."""

from __future__ import annotations

from pathlib import Path


def kib_field(path: str | Path, key: str) -> int | None:
    """The `key:` line of a /proc file given in kB (VmRSS, VmHWM in /proc/PID/status;
    MemAvailable in /proc/meminfo), in bytes; None where the file or the line is missing
    (not Linux, a process gone)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
