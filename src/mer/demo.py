"""`mer demo`: the whole path in one command, with nothing to download.

Synthesizes a Mixtral-architecture checkpoint (once; cached), converts it to
an int4 store (once; cached), then generates with a RAM budget a fraction of
the experts' size, so experts really stream from disk. The model's weights
are random, so its text is noise: the point is the path and the numbers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

import mer.api
from mer.cli import run_generation
from mer.errors import MerError
from mer.store.reader import Store
from mer.units import fmt_bytes, parse_bytes


def _mer(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "mer.cli", *map(str, args)])
    if proc.returncode != 0:
        raise MerError(f"mer {args[0]} failed (exit {proc.returncode}); see the message above")


def run_demo(workdir: Path, args) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    preset = args.preset
    checkpoint, store = workdir / f"{preset}-hf", workdir / f"{preset}-int4"
    # Preparation runs in child processes so the peak RSS reported below is generation's own.
    if not checkpoint.exists():
        console.print(f"synthesizing a Mixtral-architecture checkpoint: mer synth {checkpoint} "
                      f"--preset {preset}")  # fmt: skip
        _mer("synth", checkpoint, "--preset", preset)
    if not store.exists():
        console.print(f"converting it to an int4 store: mer convert {checkpoint} {store}")
        _mer("convert", checkpoint, store, "--quant", "int4")
    s = Store(store)
    budget = parse_bytes(args.ram_budget)
    cfg = s.config
    console.print(
        f"model: {cfg.num_hidden_layers} layers x {cfg.num_local_experts} experts "
        f"(top-{cfg.num_experts_per_tok}), experts {fmt_bytes(s.expert_bytes_total)} on disk "
        f"in int4; RAM budget {fmt_bytes(budget)} holds "
        f"{budget // s.expert_format.nbytes} of {len(s.extents)} experts"
    )
    model = mer.api.open(
        store,
        ram_budget=budget,
        direct_io=not args.no_direct_io,
        io_threads=args.io_threads,
        prefetch=not args.no_prefetch,
    )
    run_generation(model, args.prompt, args)
