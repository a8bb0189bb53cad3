"""`mer bench kernel`: the int4 expert FFN against the machine's memory bandwidth, in one run.

At one token an expert FFN is bound by reading its weights, so the figure
that matters is weight bytes per second against what a large memory copy
achieves on this machine right now. Batched tokens turn it compute-bound;
for those we also time the alternatives (dequantize to bf16 then matmul, and
a resident bf16 matmul) to show which path is faster.
"""

from __future__ import annotations

import torch
from rich.console import Console
from rich.table import Table

from mer.bench.timing import median_seconds
from mer.quant import int4
from mer.quant.expert import DenseLinear, ExpertFormat, ExpertWeights
from mer.units import fmt_bytes


def random_int4_expert(hidden: int, ffn: int, group_size: int, seed: int = 0):
    """An int4 expert with random nibbles and weight-like scales, without quantizing anything."""
    ef = ExpertFormat.for_machine("int4", hidden, ffn, group_size)
    gen = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 256, (ef.nbytes,), dtype=torch.uint8, generator=gen)
    for p in ef.parts:
        if p.name.endswith("scales_zeros"):
            n = p.nbytes // 2
            sz = torch.empty(n // 2, 2)
            sz[:, 0] = 0.02 * (0.5 + torch.rand(n // 2, generator=gen))  # scales
            sz[:, 1] = 0.002 * torch.randn(n // 2, generator=gen)  # zeros
            buf[p.offset : p.offset + p.nbytes] = sz.to(torch.bfloat16).view(-1).view(torch.uint8)
    return ef, buf


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
    console = Console(highlight=False, soft_wrap=True)
    batches = args.batch or [1, 4, 16, 64]
    ef, buf = random_int4_expert(args.hidden, args.ffn, args.group_size)
    expert = ef.view(buf)
    dense = dequantized(ef, buf)
    bw = memory_bandwidth(max(256 << 20, 4 * ef.nbytes), args.seconds)
    console.print(
        f"expert {args.hidden}x{args.ffn} int4 g{args.group_size} ({ef.layout}): "
        f"{fmt_bytes(ef.nbytes)} per expert; threads {torch.get_num_threads()}; "
        f"memory copy baseline {bw / 1e9:.1f} GB/s (read+write)"
    )
    t = Table(title="expert FFN (gate+up, SiLU, down)")
    for col in ("tokens", "int4 kernel", "int4 GB/s", "vs memcpy", "GFLOP/s",
                "dequant+bf16", "bf16 resident", "int4 speedup vs dequant"):  # fmt: skip
        t.add_column(col, justify="right")
    for m in batches:
        x = torch.randn(m, args.hidden, dtype=torch.bfloat16)
        t_int4 = median_seconds(lambda: expert(x), args.seconds)
        t_deq = median_seconds(lambda: dequantized(ef, buf)(x), args.seconds, min_runs=2)
        t_bf16 = median_seconds(lambda: dense(x), args.seconds)
        flops = 2 * m * 3 * args.hidden * args.ffn
        gbs = ef.nbytes / t_int4
        t.add_row(
            str(m),
            f"{t_int4 * 1e3:.2f} ms",
            f"{gbs / 1e9:.1f}",
            f"{gbs / bw:.2f}",
            f"{flops / t_int4 / 1e9:.0f}",
            f"{t_deq * 1e3:.1f} ms",
            f"{t_bf16 * 1e3:.2f} ms",
            f"{t_deq / t_int4:.1f}x",
        )
    console.print(t)
    console.print(
        "int4 GB/s = expert bytes / time; 'vs memcpy' compares it with the copy's read+write rate. "
        f"Kernel layout: {int4.kernel_layout()}."
    )
