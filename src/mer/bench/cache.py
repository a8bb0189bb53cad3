"""`mer bench cache --trace FILE`: replacement policies replayed over a routing trace.

Prints, per replay mode and cache size, each policy's misses, the bytes they
would read, and the ratios to Belady's optimum (the lower bound, computed in
the same run) and to LRU.
"""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.table import Table

from mer.progress import progress_bar
from mer.trace.format import load_trace
from mer.trace.replay import POLICIES, accesses, simulate
from mer.units import fmt_decimal


def run_cache_bench(args) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    trace = load_trace(args.trace)
    if args.max_tokens and trace.n_tokens > args.max_tokens:
        trace = trace.head(args.max_tokens)
    total = trace.n_layers * trace.n_experts
    console.print(
        f"{args.trace}: {trace.meta.get('model', 'model?')}, {trace.n_tokens} tokens in "
        f"{len(trace.seq_starts) - 1} sequences, {trace.n_layers} MoE layers x "
        f"{trace.n_experts} experts, top-{trace.top_k}; "
        f"expert size {fmt_decimal(args.expert_bytes)}"
    )
    modes = ["token", "prefill"] if args.mode == "both" else [args.mode]
    for mode in modes:
        acc = accesses(trace, mode)
        sizes = args.slots or [max(acc.max_step, round(f * total)) for f in args.fractions]
        table = Table(title=f"replay by {mode}: {len(acc.keys)} expert accesses")
        for col in ("slots", "policy", "misses", "read", "vs belady", "vs lru", "seconds"):
            table.add_column(col, justify="right")
        with progress_bar(len(sizes) * len(POLICIES), f"replay {mode}", unit="runs") as bar:
            for slots in sizes:
                results = {}
                for policy in POLICIES:
                    t0 = time.perf_counter()
                    results[policy] = (simulate(acc, policy, slots), time.perf_counter() - t0)
                    bar.advance()
                best, lru = results["belady"][0], results["lru"][0]
                for policy, (misses, secs) in results.items():
                    table.add_row(
                        f"{slots} ({100 * slots / total:.0f}%)",
                        policy,
                        str(misses),
                        fmt_decimal(misses * args.expert_bytes),
                        f"{misses / best:.2f}",
                        f"{misses / lru:.2f}",
                        f"{secs:.1f}",
                    )
        console.print(table)
