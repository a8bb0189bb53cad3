"""`mer bench kernel`: the int4 expert FFN against the machine's memory bandwidth, in one run.

At one token an expert FFN is bound by reading its weights, so the figure
that matters is weight bytes per second against what a large memory copy
achieves on this machine right now. Batched tokens turn it compute-bound;
for those we also time the alternatives (dequantize to bf16 then matmul, and
a resident bf16 matmul) to show which path is faster.
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mer.bench.timing import median_seconds
from mer.quant.expert import ExpertFormat, ExpertWeights
from mer.quant.schemes.bf16 import DenseLinear
from mer.synth.store import random_int4_extent
from mer.units import fmt_bytes


def memory_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), seconds)


def dequantized(ef: ExpertFormat, buf: torch.Tensor) -> ExpertWeights:
    w = ef.view(buf)
    return ExpertWeights(
        DenseLinear(w.gate_up.dequantize().to(torch.bfloat16)),
        DenseLinear(w.down.dequantize().to(torch.bfloat16)),
        ef.ffn,
    )


def run_kernel_bench(args) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    batches = args.batch or [1, 4, 16, 64]
    ef = ExpertFormat.for_machine("int4", args.hidden, args.ffn, args.group_size)
    buf = random_int4_extent(ef, np.random.default_rng(0))
    expert = ef.view(buf)
    dense = dequantized(ef, buf)
    bw = memory_bandwidth(max(256 << 20, 4 * ef.nbytes), args.seconds)
    console.print(
        f"expert {args.hidden}x{args.ffn} int4 g{args.group_size} ({ef.layout}): "
        f"{fmt_bytes(ef.nbytes)} per expert; {torch.get_num_threads()} threads; "
        f"baseline: memory copy {bw / 1e9:.1f} GB/s (bytes read + written)"
    )
    t = Table(title="expert FFN (gate+up, SiLU, down), median times")
    for col in ("tokens", "int4 ms", "weights GB/s", "vs copy", "GFLOP/s", "bf16 ms", "bf16/int4"):
        t.add_column(col, justify="right")
    for m in batches:
        x = torch.randn(m, args.hidden, dtype=torch.bfloat16)
        t_int4 = median_seconds(lambda x=x: expert(x), args.seconds)
        t_bf16 = median_seconds(lambda x=x: dense(x), args.seconds)
        gbs = ef.nbytes / t_int4
        t.add_row(
            str(m),
            f"{t_int4 * 1e3:.2f}",
            f"{gbs / 1e9:.1f}",
            f"{gbs / bw:.2f}",
            f"{2 * m * 3 * args.hidden * args.ffn / t_int4 / 1e9:.0f}",
            f"{t_bf16 * 1e3:.2f}",
            f"{t_bf16 / t_int4:.1f}x",
        )
    console.print(t)
    console.print(
        "weights GB/s: int4 expert bytes / kernel time (one token reads every weight once); "
        "vs copy: that over the copy's rate. bf16: the same FFN on weights already dequantized "
        "to bf16, i.e. a lower bound for any dequantize-then-matmul path, at 4x the memory."
    )
