"""Linux's memory figures and CPU name from /proc, read one way for the whole project."""

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


# The CPU features that decide which kernels win here, named in benchmark headers: results
# from machines with and without them are not comparable (AMX drives oneDNN's bf16 GEMM).
KERNEL_FLAGS = ("avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_summary(path: str | Path = "/proc/cpuinfo") -> str:
    """The CPU's model name and which of KERNEL_FLAGS it has, for a benchmark's header
    ("AMD EPYC 9R14 (avx512_bf16 avx512_vnni)"); "unknown CPU" where /proc says nothing."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return "unknown CPU"
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = " ".join(fields.get("model name", "unknown CPU").split())
    flags = set(fields.get("flags", "").split())
    have = [f for f in KERNEL_FLAGS if f in flags]
    return f"{name} ({' '.join(have)})" if have else name
