"""`mer bench fits`: the whole model in RAM, decode and prefill tok/s against llama.cpp on
the same GGUF, or against the memory-bandwidth bound, in one run.

When the machine holds every expert, speed is the kernels' (no read waits), so this is
where mer must match llama.cpp. mer opens the store with an expert cache of every expert,
reads them all before timing (a warm-up: no read happens while timing, which the table
checks), then times a `--prompt-tokens` prefill and a `--tokens` decode from one token,
as llama-bench times its `pp` and `tg` tests; each is the median of `--repeats` runs.
With `--gguf FILE --llama-bench PATH`, llama-bench runs the same file with the same
threads before and after mer (the mean of the two is the baseline, so a machine whose
load drifts during the run weighs on both engines alike; mer runs the store converted from
that file, once). Always, the bound: the
bytes a token touches (dense weights but the embedding table, plus the experts it was
routed to, counted from the routing that happened) over the memory-copy rate measured in
the same run; prefill's bound counts each distinct expert of the prompt once, so it says
how far prefill is from the point where reuse would make it bandwidth-bound, not what it
can reach (it is compute-bound long before).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mer.bench import llamacpp
from mer.bench.kernel import memory_bandwidth
from mer.errors import ConfigError, MerError
from mer.options import count
from mer.procfs import kib_field
from mer.progress import progress_bar
from mer.units import fmt_bytes, fmt_decimal


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="the store to run (default: converted from --gguf, once)")
    b.add_argument("--gguf", help="the GGUF file llama.cpp runs (and mer's store comes from)")
    b.add_argument("--llama-bench", help="llama.cpp's llama-bench: time it on --gguf too")
    b.add_argument("--threads", type=count, default=os.cpu_count() or 1)
    b.add_argument("--prompt-tokens", type=count, default=256, help="prefill length (256)")
    b.add_argument("--tokens", type=count, default=32, help="tokens decoded per run (32)")
    b.add_argument("--repeats", type=count, default=3, help="runs of each, median kept (3)")
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    b.add_argument("--dense-quant", choices=["bf16", "int8", "int4"], default="bf16",
                   help="width of mer's dense matrices (llama.cpp keeps the GGUF's)")  # fmt: skip


def run(
    *,
    store: str | None,
    gguf: str | None,
    llama_bench: str | None,
    threads: int,
    prompt_tokens: int,
    tokens: int,
    repeats: int,
    dtype: str,
    dense_quant: str = "bf16",
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    if store is None and gguf is None:
        raise ConfigError("give --store DIR or --gguf FILE (or both)")
    if llama_bench is not None and gguf is None:
        raise ConfigError("--llama-bench needs --gguf FILE: llama.cpp runs the GGUF")
    model = llamacpp.gguf_file(gguf) if gguf else None
    bench = llamacpp.find_llama_bench(llama_bench) if llama_bench else None
    store_path = Path(store) if store else llamacpp.converted_store(model, console.print)
    from mer.store.reader import Store

    s = Store(store_path)
    need = s.expert_bytes_total + s.manifest["dense"]["nbytes"]
    have = kib_field("/proc/meminfo", "MemAvailable")
    if have is not None and need > have:
        raise ConfigError(
            f"{store_path}: experts and dense weights take {fmt_bytes(need)}, more than the "
            f"{fmt_bytes(have)} of memory available: the model does not fit in RAM here"
        )
    console.print(
        f"{store_path}: {fmt_bytes(s.expert_bytes_total)} of experts, all held in RAM; "
        f"{threads} threads, {dtype}, dense weights {dense_quant}; prefill {prompt_tokens} "
        f"tokens, decode {tokens} tokens, median of {repeats}; load average {_load()} at start"
    )
    llama, runs = {}, []
    if bench is not None:
        console.print("llama.cpp: " + " ".join(llamacpp.bench_argv(
            bench, model, prompt_tokens, tokens, threads, repeats)))  # fmt: skip
        runs.append(_llama(bench, model, prompt_tokens, tokens, threads, repeats))
    bw = memory_bandwidth(512 << 20, 1.0)
    mer_res = measure_mer(store_path, threads, prompt_tokens, tokens, repeats, dtype, dense_quant)
    if bench is not None:  # before and after mer: a machine whose load drifts hits both
        runs.append(_llama(bench, model, prompt_tokens, tokens, threads, repeats))
        llama = {k: statistics.mean(r[k] for r in runs) for k in runs[0]}
        console.print("llama.cpp before and after mer: " + "; ".join(
            f"{k} {runs[0][k]:.2f} and {runs[1][k]:.2f} tok/s" for k in runs[0]))  # fmt: skip
    console.print(_table(mer_res, llama, bw, prompt_tokens))
    console.print(
        f"memory copy {bw / 1e9:.1f} GB/s (read + written, this run); bytes/token: dense "
        f"weights but the embedding table, plus {fmt_bytes(s.expert_format.nbytes)} per expert "
        f"routed to ({mer_res['experts_per_token']:.1f} per decode token, "
        f"{mer_res['prompt_experts']} distinct in the prompt); bound: copy rate / bytes per "
        f"token; expert reads while timing: {mer_res['reads_while_timing']}; load average "
        f"{_load()} at end"
    )


def measure_mer(
    store: Path,
    threads: int,
    prompt_tokens: int,
    tokens: int,
    repeats: int,
    dtype: str,
    dense_quant: str = "bf16",
) -> dict:
    """mer's prefill and decode tok/s (medians) with every expert in RAM, and what a token
    touched: the dense bytes and the experts routed to, counted by a routing hook."""
    import mer
    from mer.engine.generate import GenerationStats, generate
    from mer.memory import tensor_bytes
    from mer.store.reader import Store

    budget = Store(store).expert_bytes_total
    m = mer.open(store, budget, dtype=dtype, prefetch=False, compute_threads=threads,
                 dense_quant=dense_quant)  # fmt: skip
    try:
        cfg, cache = m.config, m.cache
        if cache.n_slots < cfg.num_experts_total:
            raise MerError(f"the expert cache took {cache.n_slots} slots of "
                           f"{cfg.num_experts_total}: not every expert fits")  # fmt: skip
        keys = list(cfg.expert_keys())
        with progress_bar(len(keys), "reading every expert into RAM", unit="experts") as bar:
            for layer, e in keys:
                with cache.use(layer, e):
                    bar.advance()
        routed: list[torch.Tensor] = []  # each MoE layer call's routing, counted after
        m.transformer.routing_hooks.append(lambda layer, hidden, ids, weights: routed.append(ids))

        def distinct() -> int:  # not in the hook: two tensor ops a layer would be timed too
            return sum(int(ids.unique().numel()) for ids in routed)

        gen = torch.Generator().manual_seed(0)
        prompt = torch.randint(3, cfg.vocab_size, (prompt_tokens,), generator=gen).tolist()

        def once(ids: list[int], n: int) -> GenerationStats:
            stats = GenerationStats()
            params = m.sampling_params(max_tokens=n, stop_token_ids=[-1])  # no stop but n
            for _ in generate(m.transformer, ids, params, stats):
                pass
            return stats

        once(prompt[:8], 3)  # warm-up: first calls allocate
        misses = cache.stats.misses
        routed.clear()
        prefill = [once(prompt, 1).prefill_tps for _ in range(repeats)]
        prompt_experts = distinct() // repeats
        routed.clear()
        runs = [once(prompt[:1], tokens + 1) for _ in range(repeats)]
        dense = tensor_bytes(v for k, v in m.transformer.w.items() if k != "embed")
        return {
            "prefill": statistics.median(prefill),
            "decode": statistics.median(r.decode_tps for r in runs),
            "dense_bytes": dense,
            "expert_bytes": m.store.expert_format.nbytes,
            # every pass of these runs is one token's: a 1-token prefill, then decode steps
            "experts_per_token": distinct() / (repeats * (tokens + 1)),
            "prompt_experts": prompt_experts,
            "reads_while_timing": cache.stats.misses - misses,
        }
    finally:
        m.close()


def _llama(bench: str, model: Path, prompt: int, tokens: int, threads: int, repeats: int):
    argv = llamacpp.bench_argv(bench, model, prompt, tokens, threads, repeats)
    r = subprocess.run(argv, capture_output=True, text=True)
    rates = llamacpp.bench_rates(r.stdout) if r.returncode == 0 else {}
    if not rates:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise MerError(f"llama-bench failed (exit {r.returncode}): {last[:200]}")
    return rates


def _table(res: dict, llama: dict, bw: float, prompt_tokens: int) -> Table:
    t = Table(title="the whole model in RAM: mer against llama.cpp and the bandwidth bound")
    cols = ["phase", "mer tok/s", "llama.cpp tok/s", "x llama.cpp", "bytes/token", "bound tok/s",
            "x bound"]  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "phase" else "right")
    decode_bytes = res["dense_bytes"] + res["experts_per_token"] * res["expert_bytes"]
    prompt_bytes = res["dense_bytes"] + res["prompt_experts"] * res["expert_bytes"]
    for phase, label, nbytes in (
        ("decode", "decode", decode_bytes),
        ("prefill", f"prefill ({prompt_tokens} tokens)", prompt_bytes / prompt_tokens),
    ):
        ours, theirs, bound = res[phase], llama.get(phase), bw / nbytes
        t.add_row(
            label,
            f"{ours:.2f}",
            f"{theirs:.2f}" if theirs else "-",
            f"x{ours / theirs:.2f}" if theirs else "-",
            fmt_decimal(nbytes),
            f"{bound:.2f}",
            f"x{ours / bound:.2f}",
        )
    return t


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
