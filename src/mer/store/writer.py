"""Writes a store atomically: everything goes into a hidden temp directory, the manifest
last, then one rename makes it visible. A crash or error leaves no half store behind.

Tensors are appended as they arrive, so a writer never holds more than the
tensor it is given: converting or synthesizing a model larger than RAM works.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

import mer
from mer.config import ModelConfig
from mer.errors import StoreError
from mer.quant.expert import ExpertFormat
from mer.store import format as fmt


class StoreWriter:
    """Use as a context manager; `close()` on success publishes the store."""

    def __init__(
        self,
        dst: str | Path,
        config: ModelConfig,
        hf_config: dict,
        expert_format: ExpertFormat,
        dense_dtype: torch.dtype = torch.bfloat16,
        overwrite: bool = False,
    ) -> None:
        self.dst = Path(dst)
        if self.dst.exists() and not overwrite:
            raise StoreError(f"{self.dst}: already exists (pass --force to replace it)")
        self.config = config
        self.hf_config = hf_config
        self.expert_format = expert_format
        self.dense_dtype = dense_dtype
        self.tmp = self.dst.parent / f".{self.dst.name}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self._dense = open(self.tmp / fmt.DENSE_FILE, "wb")
        self._experts = open(self.tmp / fmt.EXPERT_FILE, "wb")
        self._dense_table: dict[str, dict] = {}
        self._expert_table: dict[tuple[int, int], dict] = {}
        self._tokenizer_files: list[str] = []
        self._overwrite = overwrite
        self._published = False
        self._index = {key: i for i, key in enumerate(config.expert_keys())}
        n = config.num_experts_total * expert_format.nbytes
        self._experts.truncate(n)  # sparse until written; reserves the layout up front

    def add_dense(self, name: str, tensor: torch.Tensor) -> None:
        """Append a resident tensor, stored in the store's dense dtype."""
        if name in self._dense_table:
            raise StoreError(f"dense tensor {name} written twice")
        t = tensor.detach().to(self.dense_dtype).contiguous()
        pos = self._dense.tell()
        pad = -pos % fmt.DENSE_ALIGN
        self._dense.write(b"\0" * pad)
        data = t.reshape(-1).view(torch.uint8).numpy()
        self._dense.write(data)
        self._dense_table[name] = {
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
            "format_version": fmt.FORMAT_VERSION,
            "created_by": f"mer {mer.__version__}",
            "model_config": cfg.to_dict(),
            "hf_config": self.hf_config,
            "dense": {
                "file": fmt.DENSE_FILE,
                "dtype": str(self.dense_dtype).removeprefix("torch."),
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
        if self.dst.exists() and self._overwrite:
            shutil.rmtree(self.dst)
        os.rename(self.tmp, self.dst)
        self._published = True
        return self.dst

    def abort(self) -> None:
        for f in (self._dense, self._experts):
            if not f.closed:
                f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._published:
            self.close()
