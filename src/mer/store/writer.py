"""Writes a store atomically: everything goes into a hidden temp directory, the manifest
last, then one rename makes it visible. A crash or error leaves no half store behind.

Tensors are appended as they arrive, so a writer never holds more than the
tensor it is given: converting or synthesizing a model larger than RAM works.
The lock, the free-space check, the removal of dead writers' temp directories and
the rename are `Staging`'s; `--force` replaces only what `check_replaceable` accepts.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

import torch

import mer
from mer.config import ModelConfig
from mer.errors import StoreError
from mer.quant import dense as qdense
from mer.quant.expert import ExpertFormat
from mer.store import format as fmt
from mer.store.staging import Staging, is_disk_full

MANIFEST_SLACK = 256 << 10  # the manifest and file-system rounding, on top of the data


def dense_nbytes(shapes: Iterable[tuple[int, ...]], dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes that dense tensors of these shapes take in a store's dense file (padding included)."""
    return sum(math.prod(s) * dtype.itemsize + fmt.DENSE_ALIGN for s in shapes)


def check_replaceable(path: Path) -> None:
    """Raise StoreError unless `path` is a mer store holding nothing but store files.

    A store is recognised by its manifest's format name (its contents may be damaged:
    replacing a broken store is what --force is for). Anything else in it, a subdirectory
    or a file no store has, is the user's, and --force must not delete it.
    """
    manifest = path / fmt.MANIFEST
    try:
        is_store = json.loads(manifest.read_bytes()).get("format") == fmt.FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        is_store = False
    if not path.is_dir() or not is_store:
        raise StoreError(
            f"{path}: exists and is not a mer store (no {fmt.MANIFEST} of format "
            f"{fmt.FORMAT_NAME}); --force replaces only a store, so move it away yourself"
        )
    known = {fmt.MANIFEST, fmt.DENSE_FILE, fmt.EXPERT_FILE, *fmt.TOKENIZER_FILES}
    for entry in sorted(path.iterdir()):
        if entry.name not in known or not entry.is_file() or entry.is_symlink():
            raise StoreError(
                f"{path}: holds {entry.name}, which is not part of a mer store; --force "
                "replaces only a store, so move it away first"
            )


class StoreWriter:
    """Use as a context manager; `close()` on success publishes the store.

    `planned_bytes` are the bytes the caller will add besides the expert file (dense
    tensors: `dense_nbytes`; tokenizer files), for the free-space check made up front.
    `dense_quant` ("int8", "int4") stores the matrices `mer.quant.dense` may quantize in
    that scheme, quantized as they are added, so loading needs no bf16 copy of them.
    """

    def __init__(
        self,
        dst: str | Path,
        config: ModelConfig,
        hf_config: dict,
        expert_format: ExpertFormat,
        dense_dtype: torch.dtype = torch.bfloat16,
        overwrite: bool = False,
        planned_bytes: int = 0,
        dense_quant: str = "bf16",
    ) -> None:
        if dense_quant not in qdense.DENSE_QUANTS:
            raise StoreError(f"--dense-quant must be one of {', '.join(qdense.DENSE_QUANTS)}")
        self.dense_quant = dense_quant
        self.dst = Path(dst)
        self.config = config
        self.hf_config = hf_config
        self.expert_format = expert_format
        self.dense_dtype = dense_dtype
        n = config.num_experts_total * expert_format.nbytes
        needed = n + planned_bytes + MANIFEST_SLACK + 128 * config.num_experts_total
        self.staging = Staging(self.dst, needed, overwrite, check_replaceable)
        self.tmp = self.staging.tmp
        self._dense_table: dict[str, dict] = {}
        self._expert_table: dict[tuple[int, int], dict] = {}
        self._tokenizer_files: list[str] = []
        self._finished = False  # published or aborted
        self._index = {key: i for i, key in enumerate(config.expert_keys())}
        with self._failing():
            self._dense = open(self.tmp / fmt.DENSE_FILE, "wb")
            self._experts = open(self.tmp / fmt.EXPERT_FILE, "wb")
            self._experts.truncate(n)  # sparse until written; reserves the layout up front

    def add_dense(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        """Append a resident tensor, stored in `dtype`, by default the store's dense dtype."""
        if name in self._dense_table:
            raise StoreError(f"dense tensor {name} written twice")
        t = tensor.detach()
        if self.dense_quant != "bf16" and dtype is None and qdense.quantizable(name, t):
            q = qdense.quantize(t, self.dense_quant)
            if not isinstance(q, torch.Tensor):
                meta, parts = q.named_parts()
                entry = {**meta, "shape": list(t.shape)}
                entry["parts"] = {part: self._append(p) for part, p in parts.items()}
                self._dense_table[name] = entry
                return
        self._dense_table[name] = self._append(t.to(dtype or self.dense_dtype))

    def stored_as(self, name: str) -> str:
        """How dense tensor `name` went into the store: its quantization ("int4 g128",
        "int8") or its dtype ("bfloat16", "float32")."""
        entry = self._dense_table[name]
        if "scheme" in entry:
            g = entry.get("group_size")
            return entry["scheme"] + (f" g{g}" if g else "")
        return entry["dtype"]

    def _append(self, t: torch.Tensor) -> dict:
        """Write `t` at the next aligned offset of the dense file; its table entry."""
        t = t.contiguous()
        pos = self._dense.tell()
        pad = -pos % fmt.DENSE_ALIGN
        self._dense.write(b"\0" * pad)
        data = t.reshape(-1).view(torch.uint8).numpy()
        self._dense.write(data)
        return {
            "offset": pos + pad,
            "nbytes": data.nbytes,
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "checksum": fmt.checksum(data),
        }

    def add_expert(self, layer: int, expert: int, extent: torch.Tensor) -> None:
        """Place one expert's extent (uint8, `expert_format.nbytes`) at its fixed offset."""
        ef = self.expert_format
        if (layer, expert) not in self._index:
            raise StoreError(f"{fmt.expert_name(layer, expert)}: not a routed expert of this model")
        if extent.dtype != torch.uint8 or extent.numel() != ef.nbytes:
            raise StoreError(f"{fmt.expert_name(layer, expert)}: extent of wrong size")
        offset = self._index[(layer, expert)] * ef.nbytes
        data = extent.contiguous().numpy()
        self._experts.seek(offset)
        self._experts.write(data)
        self._expert_table[(layer, expert)] = {
            "offset": offset,
            "length": ef.nbytes,
            "checksum": fmt.checksum(data),
        }

    def add_tokenizer_file(self, src: Path) -> None:
        shutil.copyfile(src, self.tmp / src.name)
        self._tokenizer_files.append(src.name)

    def close(self) -> Path:
        """Check completeness, write the manifest, publish by rename."""
        cfg = self.config
        missing = [key for key in cfg.expert_keys() if key not in self._expert_table]
        if missing:
            raise StoreError(f"{len(missing)} experts were never written, first {missing[0]}")
        for f in (self._dense, self._experts):
            f.flush()
            os.fdatasync(f.fileno())
            # The written data is not needed in the page cache; reads go around it anyway.
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            f.close()
        table = [
            [layer, e, v["offset"], v["length"], v["checksum"]]
            for (layer, e), v in sorted(self._expert_table.items())
        ]
        manifest = {
            "format": fmt.FORMAT_NAME,
            "format_version": fmt.version_for(self.expert_format.to_dict(), self.dense_quant),
            "created_by": f"mer {mer.__version__}",
            "model_config": cfg.to_dict(),
            "hf_config": self.hf_config,
            "dense": {
                "file": fmt.DENSE_FILE,
                "dtype": str(self.dense_dtype).removeprefix("torch."),
                **({"quant": self.dense_quant} if self.dense_quant != "bf16" else {}),
                "nbytes": (self.tmp / fmt.DENSE_FILE).stat().st_size,
                "tensors": self._dense_table,
            },
            "experts": {
                "file": fmt.EXPERT_FILE,
                "nbytes": (self.tmp / fmt.EXPERT_FILE).stat().st_size,
                "format": self.expert_format.to_dict(),
                "columns": ["layer", "expert", "offset", "length", "checksum"],
                "table": table,
            },
            "tokenizer_files": sorted(self._tokenizer_files),
        }
        with open(self.tmp / fmt.MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        self.staging.publish()
        self._finished = True
        return self.dst

    def abort(self) -> None:
        """Drop everything written; the destination keeps its old state. Safe to repeat."""
        self._finished = True
        for f in (getattr(self, "_dense", None), getattr(self, "_experts", None)):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass  # a buffered write that cannot land: the file goes anyway
        self.staging.abort()

    def _fail(self, e: BaseException) -> None:
        """Abort after `e`; a full disk becomes a one-line StoreError saying what was needed."""
        self.abort()
        if is_disk_full(e):
            raise self.staging.disk_full_error(e) from None

    @contextmanager
    def _failing(self):
        try:
            yield
        except BaseException as e:
            self._fail(e)
            raise

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self._fail(exc)
        elif not self._finished:
            with self._failing():
                self.close()
