"""`mer bench vs-llamacpp --gguf FILE`: mer and llama.cpp on the same GGUF file, each inside
the same memory limit, in one run.

llama.cpp is never a dependency: the benchmark uses a `llama-bench` the user has (on PATH,
or `--llama-bench PATH`) and says how to build one when there is none. mer runs the store
converted from the same file (Q4_0 and Q4_K experts convert exactly, up to the rounding of
scales), so both engines compute with the same weights.

Each run gets a fresh memory cgroup of the limit (`mer.bench.cgroup`), with the page cache
dropped before it, so neither starts with the file in RAM and page cache counts against the
limit as RSS does. llama.cpp runs with its defaults (which copy the weights into RAM) and,
for the memory-limited regime it can serve, mmap without repacking (weights paged in from
the file on demand); mer runs with `--memory` equal to the limit, so it sizes its expert
cache itself from what it measures at start (dense weights, runtime, KV cache, workspace)
and prints the split, and with `--dense-quant` if given. Figures come from the
kernel (wait4: peak RSS and bytes read; the cgroup's peak and OOM kills) and from each
engine's own token rate.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mer.bench import cgroup, llamacpp
from mer.errors import ConfigError
from mer.options import count, positive_size
from mer.progress import progress_bar
from mer.units import fmt_bytes, fmt_decimal


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--gguf", required=True, help="the GGUF file both engines run")
    b.add_argument("--store", help="mer's store of that file (default: convert it, once)")
    b.add_argument(
        "--limits",
        type=positive_size,
        nargs="+",
        default=[2 << 30, 4 << 30, 8 << 30],
        help="memory limits, each run in its own cgroup (default 2GiB 4GiB 8GiB)",
    )
    b.add_argument("--tokens", type=count, default=32, help="tokens decoded per run")
    b.add_argument("--threads", type=count, default=2)
    b.add_argument("--llama-bench", help="path of llama.cpp's llama-bench")
    b.add_argument("--dense-quant", choices=["bf16", "int8", "int4"],
                   help="mer's dense weights (default: as its store holds them)")  # fmt: skip
    b.add_argument("--timeout", type=count, default=1800, help="seconds per run")  # fmt: skip


@dataclass
class Row:
    engine: str
    limit: int
    tok_s: float | None
    tokens: int
    run: cgroup.RunResult | None
    note: str = ""


def run(
    *,
    gguf: str,
    store: str | None,
    limits: list[int],
    tokens: int,
    threads: int,
    llama_bench: str | None,
    timeout: int,
    dense_quant: str | None = None,
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 180)
    why = cgroup.available()
    if why:
        raise ConfigError(f"cannot compare under memory limits: {why}")
    model = llamacpp.gguf_file(gguf)
    bench = llamacpp.find_llama_bench(llama_bench)
    store_path = Path(store) if store else llamacpp.converted_store(model, console.print)
    console.print(
        f"{model.name}: {fmt_decimal(model.stat().st_size)}; mer store {store_path} "
        f"(--memory the limit, dense {dense_quant or 'as stored'}); {tokens} tokens "
        f"decoded per run, {threads} threads; page cache dropped before each run"
    )
    rows: list[Row] = []
    with progress_bar(3 * len(limits), "runs", unit="runs") as bar:
        for limit in limits:
            for label, flags in (("llama.cpp default", []), ("llama.cpp mmap", ["--repack", "0",
                                 "-lm", "mmap"])):  # fmt: skip
                rows.append(_llama(bench, model, limit, tokens, threads, flags, label, timeout))
                bar.advance()
            rows.append(_mer(store_path, limit, dense_quant, tokens, threads, timeout))
            bar.advance()
    console.print(_table(rows, limits))
    console.print(
        "read/token: bytes the process read from the device (page-cache misses and O_DIRECT "
        "alike, loading included) over tokens decoded; peak: the cgroup's peak (page cache "
        "included) and the process's peak RSS; x: mer's decode tok/s over the best llama.cpp "
        "run at that limit that was not OOM-killed."
    )


def _mer_argv(store: Path, limit: int, dense_quant, tokens: int, threads: int) -> list[str]:
    argv = [
        sys.executable, "-m", "mer.cli", "generate", "--store", str(store), "--prompt",
        "The", "--max-tokens", str(tokens), "--memory", str(limit), "--threads",
        str(threads), "--ignore-eos",
    ]  # fmt: skip
    return argv + (["--dense-quant", dense_quant] if dense_quant else [])


def _mer(store: Path, limit: int, dense_quant, tokens: int, threads: int, timeout) -> Row:
    """mer with `--memory` the limit: its own split decides the expert cache."""
    cgroup.drop_page_cache()
    with cgroup.MemoryLimit(limit) as group:
        r = group.run(_mer_argv(store, limit, dense_quant, tokens, threads), timeout=timeout)
    m = re.search(r"decode ([\d.]+) tok/s", r.stderr)
    split = re.search(r"-> (expert cache [\d.]+ \w+)", r.stderr)
    note = split[1] if split else ""
    if r.returncode != 0 and not r.oom_killed:
        note = r.stderr.strip().splitlines()[-1][:120] if r.stderr.strip() else "failed"
    return Row("mer", limit, float(m[1]) if m and r.returncode == 0 else None, tokens, r, note)


def _llama(bench, model, limit, tokens, threads, flags, label, timeout) -> Row:
    argv = llamacpp.bench_argv(bench, model, 0, tokens, threads, flags=flags)
    cgroup.drop_page_cache()
    with cgroup.MemoryLimit(limit) as group:
        r = group.run(argv, timeout=timeout)
    tok_s = llamacpp.bench_rates(r.stdout).get("decode") if r.returncode == 0 else None
    note = (
        ""
        if tok_s is not None or r.oom_killed
        else (r.stderr.strip()[-120:] or llamacpp.exit_status(r.returncode))
    )
    # warm-up decodes one token more than the measured run
    return Row(label, limit, tok_s, tokens + 1, r, note)


def _table(rows: list[Row], limits: list[int]) -> Table:
    t = Table(title="decode on the same GGUF under the same memory limit")
    for col in ("limit", "engine", "decode tok/s", "read/token", "peak (group / RSS)", "OOM",
                "x llama.cpp", "note"):  # fmt: skip
        t.add_column(col, justify="left" if col in ("engine", "note") else "right")
    for limit in limits:
        here = [r for r in rows if r.limit == limit]
        best = max((r.tok_s for r in here if r.engine != "mer" and r.tok_s), default=None)
        for r in here:
            run = r.run
            ratio = ""
            if r.engine == "mer" and r.tok_s and best:
                ratio = f"x{r.tok_s / best:.2f}"
            t.add_row(
                fmt_bytes(limit),
                r.engine,
                f"{r.tok_s:.2f}" if r.tok_s else "-",
                fmt_decimal(run.bytes_read / r.tokens) if run else "-",
                f"{fmt_bytes(run.group_peak_bytes or 0)} / {fmt_bytes(run.peak_rss_bytes)}"
                if run
                else "-",
                "killed" if run and run.oom_killed else "",
                ratio,
                r.note,
            )
    return t
