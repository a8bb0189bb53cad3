"""The token embedding read from the store row by row as tokens need it, not held whole.

A forward pass needs one embedding row per token, a few thousand distinct rows over a
long session, of a table of vocabulary x hidden (Mixtral: 32,000 x 4096 in bf16, 250 MiB;
Qwen3-30B-A3B: 151,936 rows, 593 MiB). `EmbeddingRows` keeps a fixed cache of recently
used rows (allocated once, so its size is known when memory is planned) and reads a
missing row with one `pread` from the dense file. The whole table is checked against its
checksum once, streamed through the hash at open, never held.

An embedding tied to the output head cannot be read this way: the head multiplies every
row at every step, so a tied table stays resident (the caller decides; see `mer.api`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
import xxhash

from mer.errors import StoreError

CHUNK = 16 << 20  # bytes hashed at a time while checking the table at open


class EmbeddingRows:
    """`rows[tokens]` -> [T, H] in `dtype`, like indexing the table; `tensors()` is its cache."""

    def __init__(self, path: Path, entry: dict, dtype: torch.dtype, cached_rows: int = 1024):
        self.path, self.dtype = Path(path), dtype
        self.stored = getattr(torch, entry["dtype"])
        self.vocab, self.hidden = entry["shape"]
        self.offset = entry["offset"]
        self.row_bytes = self.hidden * self.stored.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        self._check(entry)
        self._buf = torch.empty(min(cached_rows, self.vocab), self.hidden, dtype=dtype)
        self._raw = torch.empty(self.row_bytes, dtype=torch.uint8)
        self._slot: OrderedDict[int, int] = OrderedDict()  # token -> row of _buf, LRU first
        self.reads = 0  # rows read from the file

    def _check(self, entry: dict) -> None:
        h, left, pos = xxhash.xxh3_64(), entry["nbytes"], self.offset
        while left:
            data = os.pread(self._fd, min(CHUNK, left), pos)
            if not data:
                break
            h.update(data)
            left, pos = left - len(data), pos + len(data)
        os.posix_fadvise(self._fd, self.offset, entry["nbytes"], os.POSIX_FADV_DONTNEED)
        if left or h.hexdigest() != entry["checksum"]:
            raise StoreError(
                f"{self.path}: tensor embed at offset {self.offset} fails its checksum; the "
                "store is corrupted (re-convert it)"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.vocab, self.hidden))

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        ids = tokens.tolist()
        out = torch.empty(len(ids), self.hidden, dtype=self.dtype)
        for j, t in enumerate(ids):
            if not 0 <= t < self.vocab:
                raise IndexError(f"token {t} is out of the vocabulary (0..{self.vocab - 1})")
            slot = self._slot.get(t)
            if slot is None:
                slot = self._load(t)
            else:
                self._slot.move_to_end(t)
            out[j] = self._buf[slot]
        return out

    def _load(self, token: int) -> int:
        """Read `token`'s row into a free slot, or the least recently used one's."""
        if len(self._slot) < len(self._buf):
            slot = len(self._slot)
        else:
            slot = self._slot.popitem(last=False)[1]
        at = self.offset + token * self.row_bytes
        if os.preadv(self._fd, [self._raw.numpy()], at) != self.row_bytes:
            raise StoreError(f"{self.path}: embedding row {token} at offset {at} is cut off")
        self._buf[slot] = self._raw.view(self.stored).to(self.dtype)
        self._slot[token] = slot
        self.reads += 1
        return slot

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What it holds: the row cache (for memory accounting)."""
        return (self._buf,)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)
