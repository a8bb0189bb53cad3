"""Human sizes: parse what users type (`4GiB`) and print what they read."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def fmt_decimal(n: float) -> str:
    """Bytes in decimal units (kB, MB, GB), as device and bandwidth figures are quoted."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1.5G', '65536' -> bytes (K/M/G/T are binary, KB/MB/GB decimal)."""
    s = str(text).strip().replace(" ", "")
    units = {
        "": 1, "b": 1,
        "k": 2**10, "kib": 2**10, "kb": 10**3,
        "m": 2**20, "mib": 2**20, "mb": 10**6,
        "g": 2**30, "gib": 2**30, "gb": 10**9,
        "t": 2**40, "tib": 2**40, "tb": 10**12,
    }  # fmt: skip
    i = len(s)
    while i and s[i - 1].isalpha():
        i -= 1
    num, unit = s[:i], s[i:].lower()
    try:
        value = float(num)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (try 4GiB or 512MiB)") from None
    if unit not in units or not 0 <= value < 2**63 / units.get(unit, 1):  # also NaN, inf
        raise ValueError(f"not a size: {text!r} (try 4GiB or 512MiB)")
    return int(value * units[unit])
