"""`mer demo`: the whole path in one command, with nothing to download.

Converts the small MoE shipped with mer (trained here on Python's standard
library) to an int4 store, once, then completes a Python snippet with a RAM
budget a fraction of the experts' size, so experts really stream from disk.
`--preset` runs a synthetic Mixtral-shape model instead (random weights: its
text is noise, its sizes are real), for size and speed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from mer.cli import open_with_io_options, run_generation
from mer.errors import MerError
from mer.store.reader import Store
from mer.units import fmt_bytes, parse_bytes

# A small Mixtral-architecture MoE trained by scripts/train_tiny_moe.py, shipped in the package.
TRAINED_MODEL = Path(__file__).parent / "data" / "stdlib-moe"
# Its draft for speculative decoding: 2 layers x 4 experts, 128 wide, the same tokenizer.
DRAFT_MODEL = Path(__file__).parent / "data" / "stdlib-moe-draft"


def _mer(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "mer.cli", *map(str, args)])
    if proc.returncode != 0:
        raise MerError(f"mer {args[0]} failed (exit {proc.returncode}); see the message above")


def _convert_once(checkpoint: Path, store: Path) -> Path:
    if not store.exists():
        Console(stderr=True).print(f"converting to an int4 store: mer convert {checkpoint} {store}")
        _mer("convert", checkpoint, store, "--quant", "int4")
    return store


def trained_store(workdir: Path) -> Path:
    """The bundled trained model as an int4 store under `workdir`, converted on first use."""
    return _convert_once(TRAINED_MODEL, workdir / f"{TRAINED_MODEL.name}-int4")


def draft_store(workdir: Path) -> Path:
    """The bundled draft model (same tokenizer, a fraction of the size), as an int4 store."""
    return _convert_once(DRAFT_MODEL, workdir / f"{DRAFT_MODEL.name}-int4")


def run_demo(workdir: Path, args) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    # Preparation runs in child processes so the peak RSS reported below is generation's own.
    if args.preset:
        checkpoint, store = workdir / f"{args.preset}-hf", workdir / f"{args.preset}-int4"
        budget = parse_bytes(args.ram_budget or "96MiB")
        if not checkpoint.exists():
            console.print(f"synthesizing a Mixtral-architecture checkpoint: mer synth "
                          f"{checkpoint} --preset {args.preset}")  # fmt: skip
            _mer("synth", checkpoint, "--preset", args.preset)
        what = "random weights: the text is noise, the numbers are the point"
    else:
        checkpoint, store = TRAINED_MODEL, workdir / f"{TRAINED_MODEL.name}-int4"
        budget = parse_bytes(args.ram_budget or "1MiB")
        what = "trained here on Python's standard library (see its README.md)"
    _convert_once(checkpoint, store)
    s = Store(store)
    cfg = s.config
    console.print(
        f"model: {checkpoint.name}, {what}; {cfg.num_hidden_layers} layers x "
        f"{cfg.num_local_experts} experts (top-{cfg.num_experts_per_tok}), experts "
        f"{fmt_bytes(s.expert_bytes_total)} on disk in int4; RAM budget {fmt_bytes(budget)} "
        f"holds {budget // s.expert_format.nbytes} of {len(s.extents)} experts"
    )
    run_generation(open_with_io_options(store, budget, args), args.prompt, args)
