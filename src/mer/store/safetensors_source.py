"""Reads tensors from a Hugging Face checkpoint's safetensors shards, one at a time.

Reads are plain positional reads into a fresh buffer, with the file's pages
dropped from the page cache after, rather than a memory map: converting a
checkpoint larger than RAM then holds one tensor in memory and leaves the
page cache as it found it. The format is an 8-byte little-endian header
length, a JSON header (dtype, shape, byte range per tensor), then the data.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mer.errors import ConvertError

# U8: MXFP4 blocks and scales (gpt-oss), read as bytes and kept so.
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8}
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorEntry:
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offsets
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(MAX_HEADER, size - 8):
            raise ConvertError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: not a safetensors file (header: {e})") from None
    if not isinstance(header, dict):
        raise ConvertError(f"{path}: not a safetensors file (header is not a JSON object)")
    entries = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            offsets, shape = e["data_offsets"], e["shape"]
            if len(offsets) != 2 or not all(_is_count(x) for x in [*offsets, *shape]):
                raise ValueError
            start, end = (8 + n + x for x in offsets)
            if end < start:
                raise ValueError
            entry = TensorEntry(path, str(e["dtype"]), tuple(shape), start, end)
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: malformed header entry for tensor {name}") from None
        if end > size:
            raise ConvertError(
                f"{path}: truncated; tensor {name} ends at byte {end} but the file has {size}"
            )
        entries[name] = entry
    return entries


class SafetensorsSource:
    """Tensor lookup over a checkpoint's shards (single file, or sharded with an index)."""

    def __init__(self, src: Path) -> None:
        index = src / "model.safetensors.index.json"
        self.entries: dict[str, TensorEntry] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_bytes().decode("utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: malformed index ({e!r})") from None
            _check_weight_map(weight_map, index)
            headers = {}
            for f in sorted(set(weight_map.values())):
                if not (src / f).is_file():
                    raise ConvertError(f"{src / f}: shard named in {index.name} is missing")
                headers[f] = read_header(src / f)
            for name, f in weight_map.items():
                if name not in headers[f]:
                    raise ConvertError(f"{src / f}: tensor {name} listed in {index.name} is absent")
                self.entries[name] = headers[f][name]
        else:
            shards = sorted(src.glob("*.safetensors"))
            if not shards:
                raise ConvertError(f"{src}: no *.safetensors weights found")
            for shard in shards:
                self.entries.update(read_header(shard))
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def where(self, name: str) -> Path:
        return self.entries[name].path

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        e = self.entries[name]
        return e.shape, e.dtype

    def get(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        return self._read(name, e.start, e.end - e.start).reshape(e.shape)

    def get_row(self, name: str, index: int) -> torch.Tensor:
        """t[index] of a stacked tensor t (e.g. one expert of gpt-oss's [E, ...] experts),
        reading only that row's bytes."""
        e = self.entries[name]
        if not e.shape or not 0 <= index < e.shape[0]:
            raise ConvertError(f"{e.path}: tensor {name} {list(e.shape)} has no row {index}")
        row = (e.end - e.start) // e.shape[0]
        return self._read(name, e.start + index * row, row).reshape(e.shape[1:])

    def _read(self, name: str, start: int, nbytes: int) -> torch.Tensor:
        """nbytes of tensor `name` from file offset `start`, as its dtype (flat)."""
        e = self.entries[name]
        if e.dtype not in DTYPES:
            raise ConvertError(f"{e.path}: tensor {name} has unsupported dtype {e.dtype}")
        if (e.end - e.start) != _numel(e.shape) * DTYPES[e.dtype].itemsize:
            raise ConvertError(f"{e.path}: tensor {name} byte range does not match its shape")
        fd = self._fds.get(e.path)
        if fd is None:
            fd = self._fds[e.path] = os.open(e.path, os.O_RDONLY)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise ConvertError(f"{e.path}: tensor {name} cut short at byte {start + done}")
            done += n
        os.posix_fadvise(fd, start, nbytes, os.POSIX_FADV_DONTNEED)
        return buf.view(DTYPES[e.dtype])

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_weight_map(weight_map, index: Path) -> None:
    """Tensor name -> shard file name, each a file beside the index."""
    if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: weight_map is not a JSON object")
    for name, f in weight_map.items():
        if not isinstance(f, str) or not f or Path(f).is_absolute() or ".." in Path(f).parts:
            raise ConvertError(
                f"{index}: weight_map gives tensor {name} the shard {f!r}, "
                "not a file name beside the index"
            )
