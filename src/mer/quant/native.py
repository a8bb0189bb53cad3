"""Builds a C kernel that ships as source with mer for this CPU, once, and loads it.

`gcc -O3 -march=native` into the cache directory (`$MER_CACHE_DIR/kernels`, by
default `~/.cache/mer/kernels`), under a name that hashes the source, the
flags, the compiler's version and this CPU's model and flags: a copy built for
another CPU or from older source is never loaded. The build writes a temporary
file and renames it, so concurrent first uses never load a half-written
library. Building says nothing about correctness: callers probe what they load
against their reference before choosing it.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


class BuildError(Exception):
    """The kernel could not be compiled or loaded here (no compiler, a compile error)."""


def cache_dir() -> Path:
    return Path(os.environ.get("MER_CACHE_DIR", Path.home() / ".cache" / "mer")) / "kernels"


def _cpu_identity() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return platform.machine() + "\n".join(sorted(set(keep)))


def build(source: Path, extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compile `source` for this CPU (or reuse an earlier build) and load it. `extra_flags`
    (e.g. "-mno-avx512f") build a variant, such as the path other CPUs take."""
    flags = (*FLAGS, *extra_flags)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BuildError("no C compiler (gcc or cc) on PATH")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as e:
        raise BuildError(f"cannot run {cc}: {e}") from None
    key = hashlib.sha256(
        "\0".join([source.read_text(), " ".join(flags), version, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if not out.exists():
        try:
            _compile(cc, flags, source, out)
        except OSError as e:  # a cache directory we cannot write, a full disk
            raise BuildError(f"cannot build {out}: {e}") from None
    try:
        return ctypes.CDLL(str(out))
    except OSError as e:
        raise BuildError(f"cannot load {out}: {e}") from None


def build_avx512(
    source: Path, what: str, simd: str, extra_flags: tuple[str, ...] = ()
) -> ctypes.CDLL | None:
    """`build(source, extra_flags)` where it builds as its AVX-512 path (its function `simd`
    returns 512); None otherwise, with a warning naming `what` if it did not build at all."""
    try:
        lib = build(source, extra_flags)
    except BuildError as e:
        warnings.warn(f"{what} unavailable ({e})", stacklevel=4)
        return None
    return lib if getattr(lib, simd)() == 512 else None


def save_choice(path: Path, data: dict) -> None:
    """Write a measured choice as JSON next to the kernels, atomically (a concurrent reader
    sees the old file or the new); a cache that cannot be written is skipped: the choice
    still holds for this process."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def _compile(cc: str, flags: tuple[str, ...], source: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *flags, str(source), "-o", tmp, "-lm"], capture_output=True)
        if r.returncode:
            err = r.stderr.decode(errors="replace").strip().splitlines()
            raise BuildError(f"{cc} failed on {source.name}: {err[0] if err else r.returncode}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
