"""`mer bench routing --trace FILE`: the routing statistics table of a trace."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from mer.trace.format import load_trace
from mer.trace.stats import (
    batch_dedup,
    random_dedup,
    random_overlap,
    random_same_first,
    routing_stats,
)

BATCHES = (2, 4, 8, 16, 32)


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--trace", dest="trace_path", required=True, help="routing trace (.npz)")


def run(*, trace_path: str) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    trace = load_trace(trace_path)
    e, k = trace.n_experts, trace.top_k
    stats = routing_stats(trace)
    t = Table(title=f"{trace_path}: {trace.n_tokens} tokens, {e} experts, top-{k}")
    for col in ("layer", "same 1st choice", "top-k overlap", "max load", "min load", "evenness"):
        t.add_column(col, justify="right")
    for s in stats:
        first = "n/a" if s.same_first is None else f"{100 * s.same_first:.1f}%"
        t.add_row(str(s.layer), first, f"{100 * s.overlap:.1f}%", f"{100 * s.max_share:.1f}%",
                  f"{100 * s.min_share:.1f}%", f"{s.entropy:.3f}")  # fmt: skip
    t.add_row("random", f"{100 * random_same_first(e):.1f}%", f"{100 * random_overlap(e, k):.1f}%",
              f"{100 / e:.1f}%", f"{100 / e:.1f}%", "1.000", style="dim")  # fmt: skip
    console.print(t)
    console.print(
        "same 1st choice: consecutive tokens of a sequence whose highest-weighted expert is the "
        "same (n/a where the trace does not order its choices); top-k overlap: consecutive "
        "tokens sharing at least one expert; load: share of all assignments; evenness: entropy "
        "of the load over log(experts)."
    )
    sizes = [n for n in BATCHES if n <= trace.n_sequences]
    if sizes:
        t = Table(title="sequences decoding together: experts chosen per expert read")
        t.add_column("", justify="left")
        for n in sizes:
            t.add_column(f"{n} seqs", justify="right")
        t.add_row("this trace", *(f"{batch_dedup(trace, n):.2f}" for n in sizes))
        t.add_row("random", *(f"{random_dedup(e, k, n):.2f}" for n in sizes), style="dim")
        console.print(t)
        console.print(
            "n sequences each decode one token (a random token of n different sequences) and "
            "every MoE layer reads the union of their experts once: the most continuous "
            "batching can divide decode reads by, before the cache."
        )
