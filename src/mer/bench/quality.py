"""`mer bench quality`: what cache-aware routing costs in quality and saves in reads.

On held-out text of the bundled trained model (or any store with `--tokens-file`), each
setting decodes the same token stream one token at a time (teacher forced, in windows of
`--window` tokens, a fresh KV cache per window and one cold expert cache per run), with
demand reads only, through the real expert cache of `--residency` x all experts. Exact
routing runs first at each residency, in the same run, and is the baseline:

- loss: mean negative log-likelihood of the next token (nats/token) and its change;
- agree: share of positions whose greedy (argmax) token equals exact routing's;
- reads/token: experts read from the store per token (the cache's misses), and the
  ratio to exact routing's reads at that residency;
- Belady: the fewest reads any cache of that size could make on exact routing's
  stream, replayed from the trace the exact run recorded (`mer.trace.replay`).
Every figure is computed from what the runs did.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import mer.api
from mer.data import held_out_ids
from mer.errors import ConfigError
from mer.options import POLICIES, count, number
from mer.progress import progress_bar
from mer.store.reader import Store
from mer.trace.replay import accesses, simulate


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="store (default: the bundled trained model, int4)")
    b.add_argument("--tokens-file",
                   help="JSON list of token ids to judge on (default: the bundled model's "
                   "held-out files)")  # fmt: skip
    b.add_argument("--tokens", type=count, default=2048, help="positions judged (default 2048)")
    b.add_argument("--window", type=count, default=256, help="tokens per sequence")
    b.add_argument("--residency", type=number(0, 1, lo_open=True), nargs="+",
                   default=[0.25, 0.5], help="cache size as a share of all experts")  # fmt: skip
    b.add_argument("--slacks", type=number(0, 1), nargs="+", default=[0.05, 0.1, 0.2, 0.3],
                   help="cache-aware routing slacks to measure")  # fmt: skip
    b.add_argument("--cache-policy", choices=POLICIES, default="ours")
    b.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])


def run_setting(store, ids, window, slots, policy, dtype, routing, slack, trace=False) -> dict:
    """Decode `ids` token by token under one routing setting; what happened."""
    budget = slots * Store(store).expert_format.nbytes
    model = mer.api.open(
        store, budget, dtype=dtype, prefetch=False, cache_policy=policy, routing=routing,
        routing_slack=slack,
    )  # fmt: skip
    recorder = model.record_trace() if trace else None
    m = model.transformer
    nll, argmax = [], []
    for a in range(0, len(ids) - 1, window):
        x = torch.tensor(ids[a : a + window + 1])
        if recorder is not None:
            recorder.begin_sequence()
        kv = m.new_kv_cache(len(x) - 1)
        for t in range(len(x) - 1):
            logits = m.forward(x[t : t + 1], kv)[0]  # [V]
            nll.append(-torch.log_softmax(logits, -1)[x[t + 1]].item())
            argmax.append(int(logits.argmax()))
    stats = model.stats()
    model.close()
    n = len(nll)
    out = {
        "loss": sum(nll) / n,
        "argmax": argmax,
        "reads": stats.cache.misses / n,
        "slots": stats.slots,
        "routing": stats.routing,
    }
    if recorder is not None:
        out["belady"] = simulate(accesses(recorder.trace(), "token"), "belady", slots) / n
    return out


def run(
    *,
    store: str | None,
    tokens_file: str | None,
    tokens: int,
    window: int,
    residency: list[float],
    slacks: list[float],
    cache_policy: str,
    dtype: str,
) -> None:
    if store is None:
        from mer.data import trained_store

        store = str(trained_store())
    if tokens_file:
        try:
            ids = [int(t) for t in json.loads(Path(tokens_file).read_text())]
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"--tokens-file {tokens_file}: {e}") from None
    else:
        ids = held_out_ids(tokens + 1)
    ids = ids[: tokens + 1]
    if len(ids) < 2:
        raise ConfigError("--tokens: fewer than 2 held-out tokens to judge on")
    cfg = Store(store).config
    n_experts = len(cfg.moe_layers) * cfg.num_local_experts
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    console.print(
        f"{store}: {len(ids) - 1} held-out positions in windows of {window}, one token at a "
        f"time, {dtype}, cache policy {cache_policy}, demand reads only; {n_experts} experts"
    )
    table = Table(title="cache-aware routing: quality against expert reads (exact = baseline)")
    for col in ("residency", "slots", "routing", "slack", "loss", "Δ loss", "agree",
                "reads/token", "vs exact", "vs Belady", "substituted", "dropped"):  # fmt: skip
        table.add_column(col, justify="right")
    runs = len(residency) * (1 + len(slacks))
    exact_argmax = None
    with progress_bar(runs, "decoding", unit="runs") as bar:
        for share in residency:
            slots = max(cfg.num_experts_per_tok, round(share * n_experts))
            base = run_setting(store, ids, window, slots, cache_policy, dtype, "exact", 0, True)
            bar.advance()
            exact_argmax = exact_argmax or base["argmax"]
            rows = [("exact", "", base)]
            for slack in slacks:
                r = run_setting(store, ids, window, slots, cache_policy, dtype, "cache-aware",
                                slack)  # fmt: skip
                rows.append(("cache-aware", f"{slack:g}", r))
                bar.advance()
            for routing, slack, r in rows:
                agree = sum(a == b for a, b in zip(r["argmax"], exact_argmax, strict=True))
                st = r["routing"]
                table.add_row(
                    f"{100 * share:g}%",
                    str(r["slots"]),
                    routing,
                    slack,
                    f"{r['loss']:.4f}",
                    f"{r['loss'] - base['loss']:+.4f}",
                    f"{100 * agree / len(exact_argmax):.1f}%",
                    f"{r['reads']:.3f}",
                    f"x{r['reads'] / base['reads']:.2f}" if base["reads"] else "",
                    f"x{r['reads'] / base['belady']:.2f}" if base["belady"] else "",
                    f"{100 * st.substituted / st.picks:.1f}%" if st else "",
                    f"{100 * st.dropped / st.picks:.1f}%" if st else "",
                )
            table.add_row(f"{100 * share:g}%", str(base["slots"]), "exact, Belady", "", "", "",
                          "", f"{base['belady']:.3f}", f"x{base['belady'] / base['reads']:.2f}",
                          "x1.00", "", "", end_section=True)  # fmt: skip
    console.print(table)
    console.print(
        "loss: nats/token on the held-out positions; agree: greedy token equal to exact "
        "routing's; reads/token: experts read from the store per token; vs exact / vs Belady: "
        "reads over exact routing's with the same cache, and over the fewest any cache of that "
        "size could read on exact routing's stream; substituted, dropped: shares of the picks."
    )
