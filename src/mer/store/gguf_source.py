"""Reads a GGUF file (or a split set) one tensor at a time, with positional reads.

The `gguf` package parses the header (metadata and the tensor table); tensor
data is then read with `preadv` into a fresh buffer and the pages dropped from
the page cache after, as the safetensors source does, so a file larger than
RAM converts holding one tensor (or one expert of a stacked tensor) at a time.

Every structural problem is found when the source is opened, before anything is
written: a wrong magic or version, a truncated file (a tensor ending past the
end), a tensor type `gguf` does not know, a missing part of a split set.
Shapes are reported in Hugging Face order (GGUF writes dimensions reversed:
its ne[0] is the row length).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mer.errors import ConvertError

GGUF_MAGIC = b"GGUF"
VERSIONS = (2, 3)
SPLIT_RE = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    path: Path
    type_name: str  # the ggml type's name: Q4_K, F16, ...
    type_id: int
    shape: tuple[int, ...]  # Hugging Face order: the last dim is the row GGUF blocks run along
    offset: int  # absolute, in `path`
    nbytes: int


def _split_parts(path: Path) -> list[Path]:
    """The files of a split set named by its first part, or [path] for a single file."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    if int(m["no"]) != 1:
        first = path.with_name(f"{m['prefix']}-00001-of-{m['count']}.gguf")
        raise ConvertError(f"{path}: part {int(m['no'])} of a split GGUF; pass {first.name}")
    parts = [
        path.with_name(f"{m['prefix']}-{i:05d}-of-{m['count']}.gguf") for i in range(1, count + 1)
    ]
    for p in parts:
        if not p.is_file():
            raise ConvertError(f"{p}: part of split GGUF {path.name} is missing")
    return parts


def _check_preamble(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ConvertError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in VERSIONS:
        raise ConvertError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")


def _field_value(field) -> Any:
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return field.contents()
    v = field.contents()
    if field.types[0] == GGUFValueType.FLOAT32:  # 1e-06 as config.json says, not 9.99999997e-07
        return float(str(np.float32(v)))
    return v.item() if isinstance(v, np.generic) else v


class GGUFSource:
    """Metadata and tensors of one GGUF model, tensor data read on demand."""

    def __init__(self, path: str | Path) -> None:
        from gguf import GGML_QUANT_SIZES, GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise ConvertError(f"{self.path}: no such GGUF file")
        self.parts = _split_parts(self.path)
        self.meta: dict[str, Any] = {}
        self.tensors: dict[str, GGUFTensor] = {}
        for part in self.parts:
            _check_preamble(part)
            try:
                reader = GGUFReader(part)
            except ValueError as e:
                msg = str(e)
                if "is not a valid GGMLQuantizationType" in msg:
                    raise ConvertError(f"{part}: unknown tensor type ({msg})") from None
                if "cannot reshape array" in msg:  # a tensor's data runs past the end
                    raise ConvertError(
                        f"{part}: truncated; the tensor data ends before the header says "
                        f"(the file has {part.stat().st_size} bytes)"
                    ) from None
                raise ConvertError(f"{part}: truncated or malformed GGUF header ({msg})") from None
            except (IndexError, KeyError, OverflowError, UnicodeDecodeError) as e:
                raise ConvertError(f"{part}: truncated or malformed GGUF header ({e!r})") from None
            size = part.stat().st_size
            if part == self.parts[0]:
                for key, f in reader.fields.items():
                    if not key.startswith("GGUF."):
                        self.meta[key] = _field_value(f)
            for t in reader.tensors:
                block, type_size = GGML_QUANT_SIZES[t.tensor_type]
                dims = [int(d) for d in t.shape]  # ne order
                if dims[0] % block:
                    raise ConvertError(
                        f"{part}: tensor {t.name} rows of {dims[0]} are not whole "
                        f"{t.tensor_type.name} blocks of {block}"
                    )
                n = int(np.prod(dims)) * type_size // block
                if t.data_offset + n > size:
                    raise ConvertError(
                        f"{part}: truncated; tensor {t.name} ends at byte {t.data_offset + n} "
                        f"but the file has {size}"
                    )
                if t.name in self.tensors:
                    raise ConvertError(f"{part}: tensor {t.name} appears twice in the split set")
                self.tensors[t.name] = GGUFTensor(
                    t.name, part, t.tensor_type.name, int(t.tensor_type),
                    tuple(reversed(dims)), int(t.data_offset), n,
                )  # fmt: skip
            del reader  # drops the header's memory map
        count = self.meta.get("split.count")
        if count is not None and int(count) != len(self.parts):
            raise ConvertError(
                f"{self.path}: says split.count {count} but {len(self.parts)} file(s) were found"
            )
        self._fds: dict[Path, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: t.shape for n, t in self.tensors.items()}

    def raw(self, name: str, index: int | None = None, count: int = 1) -> np.ndarray:
        """The bytes of tensor `name` as uint8 [rows, row_bytes]; with `index`, only the
        index-th of `count` equal slices along the first dim (one expert of a stack)."""
        t = self.tensors[name]
        start, n = t.offset, t.nbytes
        if index is not None:
            n //= count
            start += index * n
        fd = self._fds.get(t.path)
        if fd is None:
            fd = self._fds[t.path] = os.open(t.path, os.O_RDONLY)
        buf = np.empty(n, dtype=np.uint8)
        view, done = memoryview(buf), 0
        while done < n:
            got = os.preadv(fd, [view[done:]], start + done)
            if got == 0:
                raise ConvertError(f"{t.path}: tensor {name} cut short at byte {start + done}")
            done += got
        os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)
        rows = int(np.prod(t.shape[:-1])) // (count if index is not None else 1)
        return buf.reshape(rows, -1)

    def floats(self, name: str, index: int | None = None, count: int = 1):
        """Tensor `name` (or one slice of a stack) dequantized by `gguf`: float32, HF shape."""
        import torch
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        t = self.tensors[name]
        data = self.raw(name, index, count)
        if t.type_name == "BF16":  # gguf widens bf16 exactly; torch does it faster
            w = torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16).float()
        else:
            w = torch.from_numpy(dequantize(data, GGMLQuantizationType(t.type_id)).copy())
        shape = t.shape if index is None else t.shape[1:]
        return w.reshape(shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> GGUFSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
