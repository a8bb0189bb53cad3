"""The models shipped inside mer, and where their converted stores are kept.

`stdlib-moe` is a small Mixtral-architecture MoE trained by
scripts/train_tiny_moe.py on Python's standard library; `stdlib-moe-draft` is
its draft for speculative decoding (2 layers x 4 experts, 128 wide, the same
tokenizer). Both are converted to int4 stores on first use, in child processes
(so a caller's peak RSS stays its own).
"""

from __future__ import annotations

import os
import subprocess
import sys
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
