"""The models shipped inside mer, and where their converted stores are kept.

`stdlib-moe` is a small Mixtral-architecture MoE trained by
scripts/train_tiny_moe.py on Python's standard library; `stdlib-moe-draft` is
its draft for speculative decoding (2 layers x 4 experts, 128 wide, the same
tokenizer). Both are converted to int4 stores on first use, in child processes
(so a caller's peak RSS stays its own).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from mer.errors import MerError

TRAINED_MODEL = Path(__file__).parent / "stdlib-moe"
DRAFT_MODEL = Path(__file__).parent / "stdlib-moe-draft"


def cache_dir() -> Path:
    """Where converted models live: $MER_CACHE_DIR, else ~/.cache/mer."""
    return Path(os.environ.get("MER_CACHE_DIR", Path.home() / ".cache" / "mer"))


def run_mer(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "mer.cli", *map(str, args)])
    if proc.returncode != 0:
        raise MerError(f"mer {args[0]} failed (exit {proc.returncode}); see the message above")


def convert_once(checkpoint: Path, store: Path) -> Path:
    if not store.exists():
        sys.stderr.write(f"converting to an int4 store: mer convert {checkpoint} {store}\n")
        run_mer("convert", checkpoint, store, "--quant", "int4")
    return store


def trained_store(workdir: Path | None = None) -> Path:
    """The bundled trained model as an int4 store, converted on first use."""
    workdir = workdir or cache_dir() / "demo"
    return convert_once(TRAINED_MODEL, workdir / f"{TRAINED_MODEL.name}-int4")


def draft_store(workdir: Path | None = None) -> Path:
    """The bundled draft model as an int4 store, converted on first use."""
    workdir = workdir or cache_dir() / "demo"
    return convert_once(DRAFT_MODEL, workdir / f"{DRAFT_MODEL.name}-int4")


def held_out_ids(limit: int) -> list[int]:
    """Up to `limit` tokens of the files the bundled model's training held out, laid out as
    training laid them out (each file, then EOS); fewer where this Python's stdlib lacks
    some of them."""
    from mer.tokenizer import Tokenizer

    meta = json.loads((TRAINED_MODEL / "training.json").read_text())
    tok = Tokenizer.from_dir(TRAINED_MODEL)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in meta["held_out_files"]:
        for path in sorted(stdlib.rglob(name)):
            ids += tok.encode(path.read_text(errors="replace")) + [2]
            break
        if len(ids) >= limit:
            break
    return ids[:limit]
