"""`mer bench memory --store DIR`: `mer generate --memory L` inside a memory cgroup of the
same limit L, with each dense width, in one run: does it fit, and what does it cost.

Every row is a fresh process in a fresh cgroup of exactly the target (`mer.bench.cgroup`),
the page cache dropped before it, so no run starts with the store in RAM and page cache
counts against the limit as RSS does. At each limit the bf16-dense row runs first: it is
the baseline, and the others' decode tok/s is printed as a ratio to it. Figures come from
the kernel (the cgroup's peak and OOM kills; the process's sampled VmHWM) and from the
run's own split line and stats line; nothing is estimated. Outputs are never shown (a
synthetic store's text is noise).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mer.bench import cgroup
from mer.errors import ConfigError
from mer.options import count, positive_size
from mer.progress import progress_bar
from mer.quant.dense import DENSE_QUANTS
from mer.units import fmt_bytes

PROMPT = "The"


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", required=True, help="the store every row runs")
    b.add_argument("--limits", type=positive_size, nargs="+", default=[4 << 30, 6 << 30, 8 << 30],
                   help="targets, each the cgroup limit too (default 4GiB 6GiB 8GiB)")  # fmt: skip
    b.add_argument("--dense", nargs="+", choices=DENSE_QUANTS, default=list(DENSE_QUANTS),
                   help="dense widths run at each limit (bf16, the baseline, first)")  # fmt: skip
    b.add_argument("--tokens", type=count, default=8, help="tokens decoded per run")
    b.add_argument("--threads", type=count, help="compute threads (default: mer's)")
    b.add_argument("--timeout", type=count, default=900, help="seconds per run")


@dataclass
class Row:
    limit: int
    dense: str
    run: cgroup.RunResult
    split: str | None  # the run's printed `memory ...` line
    cache: int | None  # bytes the split gave the expert cache
    tok_s: float | None
    hits: str | None
    stall: str | None  # I/O stall per token, from the stats line

    @property
    def note(self) -> str:
        if self.run.oom_killed:
            return "OOM-killed"
        if self.run.returncode != 0:
            err = self.run.stderr.strip().splitlines()
            return (err[-1] if err else f"exit {self.run.returncode}")[:120]
        return ""


def run(
    *,
    store: str,
    limits: list[int],
    dense: list[str],
    tokens: int,
    threads: int | None,
    timeout: int,
) -> None:
    from mer.store.reader import Store

    s = Store(store)  # checked before any run
    held = s.dense_quant
    if held != "bf16" and set(dense) != {held}:
        raise ConfigError(
            f"--dense {' '.join(dense)}: {s.path} holds {held} dense weights, which are "
            f"not requantized; give --dense {held}, or a bf16 store"
        )
    why = cgroup.available()
    if why:
        raise ConfigError(f"cannot run under memory limits: {why}")
    order = sorted(dict.fromkeys(dense), key=DENSE_QUANTS.index)  # bf16 first: the baseline
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    console.print(
        f"{s.path}: {s.config.num_hidden_layers} layers, experts "
        f"{fmt_bytes(s.expert_bytes_total)}, dense {fmt_bytes(s.manifest['dense']['nbytes'])} "
        f"({held}); {tokens} tokens decoded per run from {PROMPT!r}; each run in a cgroup of "
        "its --memory, page cache dropped before it"
    )
    rows: list[Row] = []
    with progress_bar(len(limits) * len(order), "runs", unit="runs") as bar:
        for limit in limits:
            for d in order:
                r = _run(s.path, limit, d, held, tokens, threads, timeout)
                rows.append(r)
                # Each row's split as it finishes: a long run stopped halfway keeps its rows.
                console.print(f"{fmt_bytes(r.limit)} {r.dense}: {r.split or r.note}")
                bar.advance()
    console.print(_table(rows, limits))
    console.print(
        "peak: the cgroup's (page cache included) and the process's own RSS high-water mark; "
        "x bf16: decode tok/s over the bf16-dense row's at the same limit. Each dense width "
        "rounds the hidden states its own way, so the routing, and with it the hits, differ "
        "from row to row (random weights route anywhere)."
    )


def _argv(store: Path, limit: int, dense: str, held: str, tokens: int, threads) -> list[str]:
    argv = [sys.executable, "-m", "mer.cli", "generate", "--store", str(store), "--prompt",
            PROMPT, "--max-tokens", str(tokens), "--memory", str(limit),
            "--ignore-eos"]  # fmt: skip
    if dense != held:
        argv += ["--dense-quant", dense]
    return argv + (["--threads", str(threads)] if threads else [])


def _run(store: Path, limit: int, dense: str, held: str, tokens: int, threads, timeout) -> Row:
    cgroup.drop_page_cache()
    with cgroup.MemoryLimit(limit) as group:
        r = group.run(_argv(store, limit, dense, held, tokens, threads), timeout=timeout)
    split = next((x for x in r.stderr.splitlines() if x.startswith("memory ")), None)
    cache = re.search(r"-> expert cache ([\d.]+) (\w+)", split or "")
    tok_s = re.search(r"decode ([\d.]+) tok/s", r.stderr)
    hits = re.search(r"expert hits ([\d.]+%)", r.stderr)
    stall = re.search(r"I/O stall ([\d.]+) ms/token", r.stderr)
    return Row(
        limit, dense, r, split,
        _bytes(cache[1], cache[2]) if cache else None,
        float(tok_s[1]) if tok_s and r.returncode == 0 else None,
        hits[1] if hits else None,
        stall[1] if stall else None,
    )  # fmt: skip


def _bytes(value: str, unit: str) -> int:
    from mer.units import parse_bytes

    return parse_bytes(value + unit)


def _table(rows: list[Row], limits: list[int]) -> Table:
    t = Table(title="mer generate --memory L inside a cgroup of L")
    for col in ("limit", "dense", "expert cache", "peak (group / RSS)", "OOM", "hits",
                "I/O stall ms/token", "decode tok/s", "x bf16", "note"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("dense", "note") else "right")
    for limit in limits:
        here = [r for r in rows if r.limit == limit]
        base = next((r.tok_s for r in here if r.dense == "bf16"), None)
        for r in here:
            run = r.run
            t.add_row(
                fmt_bytes(limit),
                r.dense,
                fmt_bytes(r.cache) if r.cache is not None else "-",
                f"{fmt_bytes(run.group_peak_bytes or 0)} / {fmt_bytes(run.peak_rss_bytes)}",
                "killed" if run.oom_killed else "no",
                r.hits or "-",
                r.stall or "-",
                f"{r.tok_s:.2f}" if r.tok_s is not None else "-",
                f"x{r.tok_s / base:.2f}" if r.tok_s and base else "",
                r.note,
            )
    return t
