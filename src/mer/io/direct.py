"""O_DIRECT reads into page-aligned buffers: the only code that reads experts from the SSD.

O_DIRECT keeps expert bytes out of the kernel page cache, so every byte mer
reports as read came from the device and the page cache does not quietly eat
the user's RAM budget. It requires the buffer, offset and length to be
aligned (4096 covers every common device); the store pads extents to that.
Where the filesystem refuses O_DIRECT (tmpfs, some network filesystems) we
say so once and read through the page cache, dropping the pages after.
"""

from __future__ import annotations

import mmap
import os
import warnings
from pathlib import Path

import torch

from mer.errors import ExpertReadError

ALIGN = 4096
_warned_paths: set[str] = set()


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    """Anonymous page-aligned memory as (mmap, uint8 tensor view). Keep the mmap alive."""
    size = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
    mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


class DirectReader:
    """Positional reads of one file, O_DIRECT when the filesystem allows it."""

    def __init__(self, path: str | Path, direct: bool = True) -> None:
        self.path = Path(path)
        self.direct = False
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
            except OSError as e:
                if e.errno not in (22, 95):  # EINVAL / EOPNOTSUPP: filesystem says no
                    raise ExpertReadError(f"{self.path}: cannot open ({e.strerror})") from None
                self._warn_fallback(e.strerror)
        if not self.direct:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise ExpertReadError(f"{self.path}: cannot open ({e.strerror})") from None

    def _warn_fallback(self, why: str) -> None:
        key = str(self.path.parent)
        if key not in _warned_paths:
            _warned_paths.add(key)
            warnings.warn(
                f"{key}: filesystem refuses O_DIRECT ({why}); reading through the page cache",
                stacklevel=3,
            )

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` (aligned, whole multiple of ALIGN) from `offset`; short reads continue."""
        want = len(buf)
        done = 0
        while done < want:
            try:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
            except OSError as e:
                raise ExpertReadError(
                    f"{self.path}: read of {want} bytes at offset {offset} failed ({e.strerror})"
                ) from None
            if n == 0:
                raise ExpertReadError(
                    f"{self.path}: unexpected end of file at offset {offset + done} "
                    f"(wanted {want} bytes from {offset}); the store is truncated"
                )
            done += n
        if not self.direct:
            os.posix_fadvise(self.fd, offset, want, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
