"""Opens a store and checks it before anything runs: every manifest field, file sizes.

`Store` answers where each expert lives and loads the dense weights; it reads
no expert bytes itself (that is the I/O layer's job) but it is the one that
judges them: `verify_expert` compares a read extent with its checksum. Dense
matrices stored quantized (`dense.quant`) load as the quantized weights they are
(`mer.quant.dense`), straight from their parts: no full-width copy is ever made.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mer.config import ModelConfig
from mer.errors import ConfigError, StoreError
from mer.quant import dense as qdense
from mer.store import format as fmt
from mer.store.manifest import check_manifest


@dataclass(frozen=True)
class ExpertExtent:
    layer: int
    expert: int
    offset: int
    length: int
    checksum: str


class Store:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = self._read_manifest()
        m = self.manifest
        self.expert_format = check_manifest(m, self.manifest_path)
        try:
            self.config = ModelConfig.from_hf(m["model_config"], where=str(self.manifest_path))
        except ConfigError as e:
            raise StoreError(f"{e} (field model_config)") from None
        self.dense_table: dict[str, dict] = m["dense"]["tensors"]
        self.extents = {(row[0], row[1]): ExpertExtent(*row) for row in m["experts"]["table"]}
        # A shard (`mer store split`) holds the experts of one cluster worker, not all.
        self.shard: dict | None = m.get("shard")
        self.dense_path = self.path / m["dense"]["file"]
        self.expert_path = self.path / m["experts"]["file"]
        self._check_files()

    @property
    def dense_quant(self) -> str:
        """How the quantizable dense matrices are stored: "bf16" (as given), "int8", "int4"."""
        return self.manifest["dense"].get("quant", "bf16")

    @property
    def manifest_path(self) -> Path:
        return self.path / fmt.MANIFEST

    def _read_manifest(self) -> dict:
        if self.path.exists() and not self.path.is_dir():
            hint = " (a GGUF file converts with mer convert)" if self.path.suffix == ".gguf" else ""
            raise StoreError(f"{self.path}: a file, not a store directory{hint}")
        if not self.path.is_dir():
            raise StoreError(f"{self.path}: no such store directory")
        try:
            m = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise StoreError(
                f"{self.manifest_path}: missing; {self.path} is not a mer store "
                "(or its conversion did not finish)"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{self.manifest_path}: not valid JSON ({e})") from None
        except OSError as e:
            raise StoreError(f"{self.manifest_path}: cannot read it ({e.strerror})") from None
        return m

    def _check_files(self) -> None:
        want = set(self.config.expert_keys())
        if self.shard is not None:
            held = {tuple(k) for k in self.shard["experts"]}
            if stray := sorted(held - want):
                raise StoreError(
                    f"{self.manifest_path}: field shard.experts names {stray[0]}, not an expert "
                    "of this model"
                )
            want = held
        if set(self.extents) != want:
            missing = sorted(want - set(self.extents))
            raise StoreError(
                f"{self.manifest_path}: expert table incomplete, missing {missing[:3]}"
            )
        for path, key in ((self.dense_path, "dense"), (self.expert_path, "experts")):
            if not path.is_file():
                raise StoreError(f"{path}: missing")
            size, expected = path.stat().st_size, self.manifest[key]["nbytes"]
            if size < expected:
                detail = ""
                if key == "experts":
                    cut = [x for x in self.extents.values() if x.offset + x.length > size]
                    first = min(cut, key=lambda x: x.offset)
                    detail = f"; {fmt.expert_name(first.layer, first.expert)} and after are cut off"
                raise StoreError(
                    f"{path}: truncated, {size} bytes where the manifest says {expected}{detail}"
                )

    def extent(self, layer: int, expert: int) -> ExpertExtent:
        return self.extents[(layer, expert)]

    def verify_expert(self, layer: int, expert: int, data) -> None:
        """Raise StoreError unless `data` (bytes-like, the extent) matches its checksum."""
        x = self.extents[(layer, expert)]
        if fmt.checksum(data) != x.checksum:
            raise StoreError(
                f"{self.expert_path}: {fmt.expert_name(layer, expert)} at offset {x.offset} "
                "fails its checksum; the store is corrupted (re-convert it)"
            )

    def load_dense(self, dtype: torch.dtype | None = None, names=None) -> dict[str, torch.Tensor]:
        """All resident tensors (or those in `names`), checksummed, optionally cast to `dtype`;
        a matrix stored quantized comes as its quantized weight, whatever `dtype`."""
        out: dict[str, torch.Tensor] = {}
        table = self.dense_table
        if names is not None:
            if missing := [n for n in names if n not in table]:
                raise StoreError(f"{self.manifest_path}: no tensor {missing[0]}")
            table = {n: table[n] for n in names}
        # Read each tensor straight into its own buffer: no second copy of the dense weights.
        with open(self.dense_path, "rb", buffering=0) as f:
            for name, t in table.items():
                if "parts" in t:
                    parts = {p: self._read(f, f"{name}.{p}", e) for p, e in t["parts"].items()}
                    out[name] = qdense.SCHEMES[t["scheme"]].from_parts(t, parts)
                    continue
                tensor = self._read(f, name, t)
                out[name] = tensor if dtype is None else tensor.to(dtype)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return out

    def _read(self, f, name: str, t: dict) -> torch.Tensor:
        """One stored tensor, read into its own buffer and checked against its checksum."""
        buf = torch.empty(t["nbytes"], dtype=torch.uint8)
        f.seek(t["offset"])
        if f.readinto(buf.numpy()) != t["nbytes"] or fmt.checksum(buf.numpy()) != t["checksum"]:
            raise StoreError(
                f"{self.dense_path}: tensor {name} at offset {t['offset']} fails its "
                "checksum; the store is corrupted (re-convert it)"
            )
        return buf.view(getattr(torch, t["dtype"])).reshape(t["shape"])

    @property
    def expert_bytes_total(self) -> int:
        return len(self.extents) * self.expert_format.nbytes
