"""`mer bench kernel`: expert FFN kernels against int4 and the machine's memory bandwidth.

At one token an expert FFN is bound by reading its weights, so the figure
that matters is weight bytes per second against what a large memory copy
achieves on this machine right now. Batched tokens turn it compute-bound;
for those we also time the alternatives (dequantize to bf16 then matmul, and
a resident bf16 matmul) to show which path is faster. Each expert is timed over
copies of it that together outrun the last-level cache, one a call, so that its weights
come from RAM as in decode. Every other scheme asked
for (by default mxfp4) runs the same FFN from its own random extents, each
token count measured in alternating rounds with int4 and reported as a ratio
to it: the baseline always comes from the same run. A second table times each
path the int4 expert can take here (quant/int4_paths.py) in the same rounds, with
the path this machine's measurement chose for the token count's class. A last table times
one token through dense matrices (hidden x hidden, and the output head's vocab x hidden) by
each int4, int8 and bf16 path, against a memory copy timed in the same rounds.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from rich import box
from rich.console import Console
from rich.table import Table

from mer.bench.timing import median_seconds
from mer.errors import ConfigError
from mer.options import count, number
from mer.procfs import cpu_summary
from mer.quant import bf16_gemv, dense_paths, int4, int4_paths, int8_gemv, mxfp4
from mer.quant.dense import Int4Weight, Int8Weight
from mer.quant.expert import SCHEMES, ExpertFormat, ExpertWeights
from mer.quant.schemes.bf16 import DenseLinear
from mer.synth.store import random_int4_extent
from mer.units import fmt_bytes

DEFAULT_SCHEMES = ("int4", "int4-sym", "mxfp4")
ROUNDS = 3  # alternating measurements per token count: noise from other processes hits all
# Each scheme's expert is timed from copies of it that together exceed this, a call on the
# next copy each time, so that its weights come from RAM as a decode step's do: one expert
# timed again and again stayed partly in a large last-level cache (105 MiB on a 2-core
# Xeon here, against a 94.5 MiB Mixtral expert), where a kernel that streams its weights
# with non-temporal prefetches runs slower than from RAM (a 4096x14336 int4 expert at one
# token on c-int8: 11.6-11.8 ms called on the same copy, 7.3 ms over three copies).
FROM_RAM = 256 << 20
MAX_COPIES = 64  # a tiny expert's copies: enough to leave the private caches


def memory_bandwidth(nbytes: int, seconds: float) -> float:
    """Bytes moved per second (read + write) by a large tensor copy."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), seconds)


def memory_read_rate(nbytes: int, seconds: float, threads: int | None = None) -> float:
    """Bytes read per second by a sum over a large tensor, on `threads` (default: PyTorch's):
    what bounds a decode step, whose weights are read and not written. On the 2-core
    machine it ran up to ~1.1x the copy's read + write figure (26-51 GB/s, as the machine
    drifted, against 44-48 in the same minute)."""
    src = torch.ones(nbytes // 8, dtype=torch.int64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return src.nbytes / median_seconds(src.sum, seconds)
    finally:
        torch.set_num_threads(before)


def copies_for(nbytes: int) -> int:
    """How many copies of something of `nbytes` FROM_RAM takes (MAX_COPIES at most)."""
    return min(MAX_COPIES, max(1, -(-FROM_RAM // nbytes)))


def copies(ef: ExpertFormat, rng: np.random.Generator, first=None) -> list[ExpertWeights]:
    """Random experts of `ef` (`random_extent`; `first`, if given, is the first), as many as
    `copies_for` their size."""
    n = copies_for(ef.nbytes)
    made = [] if first is None else [first]
    return made + [ef.view(random_extent(ef, rng)) for _ in range(n - len(made))]


def in_turn(run, items: list):
    """x -> run(item, x) on the next of `items` (experts or matrices) each call."""
    turn = itertools.cycle(items)
    return lambda x: run(next(turn), x)


def _int8_c(lib, q: Int8Weight, x: torch.Tensor) -> torch.Tensor:
    return int8_gemv._gemv(lib, q.data, q.scales, x)


def _matrices(n: int, k: int, gen: torch.Generator):
    """Random [n, k] matrices as int4, int8 and bf16, each width in as many copies as FROM_RAM
    takes (`copies_for`): (int4s, int8s, bf16s)."""

    def random() -> torch.Tensor:
        return torch.randn(n, k, generator=gen).mul_(0.02).to(torch.bfloat16)

    w = random()
    q4s, q8s, ws = [Int4Weight.quantize(w)], [Int8Weight.quantize(w)], [w]
    q4 = q4s[0].linear
    sizes = (q4.packed.nbytes + q4.scales.nbytes, q8s[0].data.nbytes, w.nbytes)
    want = [copies_for(b) for b in sizes]
    for i in range(1, max(want)):
        w = random()
        if i < want[0]:
            q4s.append(Int4Weight.quantize(w))
        if i < want[1]:
            q8s.append(Int8Weight.quantize(w))
        if i < want[2]:
            ws.append(w)
    return q4s, q8s, ws


def dequantized(ef: ExpertFormat, buf: torch.Tensor) -> ExpertWeights:
    w = ef.view(buf)
    return ExpertWeights(
        DenseLinear(w.gate_up.dequantize().to(torch.bfloat16)),
        DenseLinear(w.down.dequantize().to(torch.bfloat16)),
        ef.ffn,
    )


def random_extent(ef: ExpertFormat, rng: np.random.Generator) -> torch.Tensor:
    """An extent of `ef` whose weights have a trained model's scale (timing only)."""
    if ef.scheme in ("int4", "int4-sym"):
        return random_int4_extent(ef, rng)
    if ef.scheme == "mxfp4":
        # Any byte is two valid codes; scales 2^-9..2^-6 put weights near N(0, 1/fan_in).
        buf = torch.from_numpy(rng.integers(0, 256, ef.nbytes, dtype=np.uint8))
        for p in ef.parts:
            if p.name.endswith(".scales"):
                buf[p.offset : p.offset + p.nbytes] = torch.from_numpy(
                    rng.integers(118, 122, p.nbytes, dtype=np.uint8)
                )
        return buf
    gen = torch.Generator().manual_seed(int(rng.integers(1 << 31)))
    h, f = ef.hidden, ef.ffn
    w1, w3 = (torch.randn(f, h, generator=gen) / h**0.5 for _ in range(2))
    return ef.encode(w1, torch.randn(h, f, generator=gen) / f**0.5, w3)


def expert_format(scheme: str, hidden: int, ffn: int, group_size: int) -> ExpertFormat:
    if scheme not in SCHEMES:
        raise ConfigError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")
    try:
        return ExpertFormat.for_machine(scheme, hidden, ffn, group_size)
    except ValueError as e:
        raise ConfigError(f"cannot hold a {hidden}x{ffn} expert as {scheme}: {e}") from None


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--hidden", type=count, default=4096)
    b.add_argument("--ffn", type=count, default=14336)
    b.add_argument(
        "--group-size",
        type=int,
        choices=[32, 64, 128, 256],
        default=128,
        help="int4 group (a smaller one is taken if it does not divide the shape)",
    )
    b.add_argument("--batch", type=count, action="append", help="token counts (repeatable)")
    b.add_argument("--seconds", type=number(0, lo_open=True), default=1.0,
                   help="time per measurement")  # fmt: skip
    b.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(DEFAULT_SCHEMES),
                   help="schemes timed next to int4 (default: int4 int4-sym mxfp4)")  # fmt: skip
    b.add_argument("--vocab", type=count, default=32000,
                   help="output head rows in the dense table (beside hidden x hidden)")  # fmt: skip
    b.add_argument("--no-dense", dest="dense", action="store_false",
                   help="skip the dense-matrix table")  # fmt: skip


def run(
    *,
    hidden: int,
    ffn: int,
    group_size: int,
    batch: list[int] | None,
    seconds: float,
    schemes: list[str],
    vocab: int = 32000,
    dense: bool = True,
) -> None:
    kernel_bench(hidden, ffn, batch or [1, 4, 16, 64], group_size, seconds, schemes,
                 vocab if dense else None)  # fmt: skip


def kernel_bench(
    hidden: int,
    ffn: int,
    batches: Sequence[int],
    group_size: int,
    seconds: float,
    schemes: Sequence[str] = DEFAULT_SCHEMES,
    vocab: int | None = None,
) -> None:
    """The expert tables; with `vocab`, the dense table too (`dense_bench`)."""
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    # The int4 group that fits (gpt-oss's 2880 takes 64, not the default 128).
    group = int4.default_group_size(hidden, ffn, preferred=group_size)
    ef = expert_format("int4", hidden, ffn, group)
    wanted = [s for s in dict.fromkeys(schemes) if s != "int4"]
    others = {s: expert_format(s, hidden, ffn, group) for s in wanted}
    rng = np.random.default_rng(0)
    buf = random_int4_extent(ef, rng)
    expert = ef.view(buf)
    paths = [p for p in int4_paths.eligible(expert) if p != "tinygemm"]
    choice = int4_paths.choose(expert) if isinstance(expert, int4_paths.Int4Expert) else None
    dense = dequantized(ef, buf)
    experts = copies(ef, rng, first=expert)
    runs = {s: in_turn(lambda e, x: e(x), copies(other, rng)) for s, other in others.items()}
    copy_bytes = max(256 << 20, 4 * ef.nbytes)
    bw = memory_bandwidth(copy_bytes, seconds)
    src = torch.ones(copy_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    console.print(
        f"expert {hidden}x{ffn} int4 g{group} ({ef.layout}): "
        f"{fmt_bytes(ef.nbytes)} per expert, timed over {len(experts)} copies (from RAM); "
        f"{cpu_summary()}, {torch.get_num_threads()} threads; "
        f"baseline: memory copy {bw / 1e9:.1f} GB/s (bytes read + written; timed again in "
        "each token count's rounds for its ratios)"
    )
    if choice is not None:
        how = ", ".join(
            f"{cls} ({int4_paths.CLASSES[cls]} tok) {p}" for cls, p in choice.paths.items()
        )
        console.print(f"int4 path per shape class, measured here at first use: {how}")
    for s, other in others.items():
        path = f", kernel: {mxfp4.kernel_description()}" if s == "mxfp4" else ""
        console.print(f"{s}: {fmt_bytes(other.nbytes)} per expert{path}")
    t = Table(title="expert FFN (gate+up, SiLU, down), median times")
    cols = ["tokens", "int4 ms", "weights GB/s", "vs copy", "GFLOP/s", "bf16 ms", "bf16/int4"]
    tp = Table(title="int4 expert FFN by path (same rounds), and the path chosen here",
               box=box.SIMPLE_HEAD)  # fmt: skip
    for col in ["tokens", "tinygemm ms", *(f"{p} ms" for p in paths), "chosen", "GB/s",
                "vs copy", "chosen/tinygemm"]:  # fmt: skip
        tp.add_column(col, justify="right")
    for s in others:
        cols += [f"{s} ms", f"{s}/int4"]
    for col in cols:
        t.add_column(col, justify="right")
    for m in batches:
        x = torch.randn(m, hidden, dtype=torch.bfloat16)
        fns = {"int4": in_turn(int4_paths.RUNNERS["tinygemm"], experts), "dequantized": dense}
        fns |= {p: in_turn(int4_paths.RUNNERS[p], experts) for p in paths}
        fns |= runs
        fns["copy"] = lambda x: dst.copy_(src)  # in the rounds: "vs copy" is this run's ratio
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(ROUNDS):
            for name, fn in fns.items():
                times[name].append(median_seconds(lambda x=x, fn=fn: fn(x), seconds / ROUNDS))
        med = {name: statistics.median(ts) for name, ts in times.items()}
        t_int4 = med["int4"]
        bw = 2 * copy_bytes / med["copy"]
        gbs = ef.nbytes / t_int4
        row = [
            str(m),
            f"{t_int4 * 1e3:.2f}",
            f"{gbs / 1e9:.1f}",
            f"{gbs / bw:.2f}",
            f"{2 * m * 3 * hidden * ffn / t_int4 / 1e9:.0f}",
            f"{med['dequantized'] * 1e3:.2f}",
            f"{med['dequantized'] / t_int4:.1f}x",
        ]
        best = choice.paths[int4_paths.shape_class(m)] if choice else "tinygemm"
        t_best = med["int4" if best == "tinygemm" else best]
        gb_best = ef.nbytes / t_best
        times_ms = [f"{med[p] * 1e3:.2f}" for p in ("int4", *paths)]
        tp.add_row(str(m), *times_ms, best, f"{gb_best / 1e9:.1f}", f"{gb_best / bw:.2f}",
                   f"{t_best / t_int4:.2f}x")  # fmt: skip
        for s in others:  # against int4 on the path chosen here, its best
            row += [f"{med[s] * 1e3:.2f}", f"{med[s] / t_best:.2f}x"]
        t.add_row(*row)
    console.print(t)
    console.print(tp)
    console.print(
        "weights GB/s: int4 expert bytes / kernel time (one token reads every weight once); "
        "vs copy: that over the rate of a copy timed in the same rounds. bf16: the same FFN "
        "on weights already dequantized to bf16, i.e. a lower bound for any "
        "dequantize-then-matmul path, at 4x the memory. "
        "int4 ms is PyTorch's tinygemm int4 kernel; c-fused our C FFN (c-bf16, c-int8: on bf16 or "
        "int8 activations with AVX512_BF16 or VNNI dot products), dequant-* a chunk of "
        "rows dequantized then a bf16/float32 GEMM (quant/int4_paths.py); chosen: the path "
        "this machine's measurement picked for the token count's class, timed in this run. "
        + "".join(
            f"{s}/int4: {s}'s time (its chosen path) over int4's on int4's chosen path, "
            "measured alternately. "
            for s in others
        )
    )
    if vocab:
        console.print(dense_bench([(hidden, hidden), (vocab, hidden)], seconds))


def dense_bench(shapes: Sequence[tuple[int, int]], seconds: float) -> Table:
    """One bf16 token through dense matrices of `shapes` ([n, k]: attention's, the output
    head's), by every path each width can take here (quant/dense_paths.py, quant/int8_gemv.py,
    quant/bf16_gemv.py), timed in alternating rounds with a memory copy, so each figure's
    rate is over the copy's of the same rounds."""
    t = Table(title="dense matrices, one bf16 token: ms by path (same rounds as the copy)",
              box=box.SIMPLE_HEAD)  # fmt: skip
    for col in ["matrix", "width", "path", "ms", "weights GB/s", "vs copy"]:
        t.add_column(col, justify="left" if col in ("width", "path") else "right")
    for n, k in shapes:
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(1, k, generator=gen).to(torch.bfloat16)
        q4s, q8s, ws = _matrices(n, k, gen)
        w = ws[0]
        fns: dict[tuple[str, str], tuple[int, object]] = {}
        for p in dense_paths.available(q4s[0].linear):
            nbytes = q4s[0].linear.packed.nbytes + q4s[0].linear.scales.nbytes
            run = in_turn(lambda q, x, p=p: dense_paths.RUNNERS[p](q.linear, x), q4s)
            fns["int4", p] = (nbytes, partial(run, x))
        int8_bytes = q8s[0].data.nbytes
        run = in_turn(lambda q, x: int8_gemv.torch_int8(x, q.data, q.scales), q8s)
        fns["int8", "torch"] = (int8_bytes, partial(run, x))
        if int8_gemv.available() and k % int8_gemv.GROUP == 0:
            run = in_turn(partial(_int8_c, int8_gemv._lib()), q8s)
            fns["int8", "c-vnni"] = (int8_bytes, partial(run, x))
        fns["bf16", "torch"] = (w.nbytes, partial(in_turn(lambda w, x: F.linear(x, w), ws), x))
        if bf16_gemv.applies(x, w) and bf16_gemv._lib() is not None:
            run = in_turn(partial(bf16_gemv._gemv, bf16_gemv._lib()), ws)
            fns["bf16", "c"] = (w.nbytes, partial(run, x))
        src = torch.ones(max(256 << 20, 2 * w.nbytes), dtype=torch.uint8)
        dst = torch.empty_like(src)
        copy = partial(dst.copy_, src)
        times: dict = {name: [] for name in [*fns, "copy"]}
        for _ in range(ROUNDS):
            for name in times:
                fn = copy if name == "copy" else fns[name][1]
                times[name].append(median_seconds(fn, seconds / ROUNDS / 4))
        bw = 2 * src.nbytes / statistics.median(times["copy"])
        for (width, path), (nbytes, _) in fns.items():
            sec = statistics.median(times[width, path])
            t.add_row(f"{n}x{k}", width, path, f"{sec * 1e3:.3g}", f"{nbytes / sec / 1e9:.3g}",
                      f"{nbytes / sec / bw:.3g}")  # fmt: skip
    return t
