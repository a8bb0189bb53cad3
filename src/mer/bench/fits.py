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
that file, once). `--rounds N` alternates them N times (llama.cpp, mer, llama.cpp, mer,
..., llama.cpp; mer's model stays open, so both must fit in RAM at once): each round's
ratio is mer's against the mean of the llama.cpp runs on either side of it, and the table
gives the median of the rounds' ratios, for a machine whose speed drifts by more than the
gap being measured. Always, the bound: the
bytes a token touches (dense weights but the embedding table, plus the experts it was
routed to, counted from the routing that happened) over the memory read rate measured in
the same run on the same threads (the higher of its figures before and after the engines:
a token's weights are read, not copied); prefill's bound counts each distinct expert of
the prompt once, so it says how far prefill is from the point where reuse would make it
bandwidth-bound, not what it can reach (it is compute-bound long before).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from mer.bench import llamacpp
from mer.bench.kernel import memory_bandwidth, memory_read_rate
from mer.errors import ConfigError, MerError
from mer.options import count, natural
from mer.procfs import cpu_summary, kib_field
from mer.progress import progress_bar
from mer.quant import stream_hint
from mer.units import fmt_bytes, fmt_decimal


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="the store to run (default: converted from --gguf, once)")
    b.add_argument("--gguf", help="the GGUF file llama.cpp runs (and mer's store comes from)")
    b.add_argument("--llama-bench", help="llama.cpp's llama-bench: time it on --gguf too")
    b.add_argument("--threads", type=count, default=os.cpu_count() or 1)
    b.add_argument("--prompt-tokens", type=count, default=256, help="prefill length (256)")
    b.add_argument("--tokens", type=count, default=32, help="tokens decoded per run (32)")
    b.add_argument("--repeats", type=count, default=3, help="runs of each, median kept (3)")
    b.add_argument("--rounds", type=count, default=1,
                   help="mer and llama.cpp alternated so many times; median ratio (1)")  # fmt: skip
    b.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    b.add_argument("--dense-quant", choices=["bf16", "int8", "int4"], default="bf16",
                   help="width of mer's dense matrices (llama.cpp keeps the GGUF's)")  # fmt: skip
    b.add_argument("--depth", type=natural, default=0,
                   help="tokens of context in the KV cache before each prefill and decode "
                   "(llama-bench's -d; 0)")  # fmt: skip


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
    rounds: int = 1,
    depth: int = 0,
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
    both = need + (model.stat().st_size if model and bench else 0)
    if rounds > 1 and bench is not None and have is not None and both > have:
        raise ConfigError(
            f"--rounds {rounds} keeps mer's model in RAM while llama.cpp runs: the two take "
            f"{fmt_bytes(both)}, more than the {fmt_bytes(have)} available; use --rounds 1"
        )
    console.print(
        f"{store_path}: {fmt_bytes(s.expert_bytes_total)} of experts, all held in RAM; "
        f"{cpu_summary()}, {threads} threads, {dtype}, dense weights {dense_quant}; prefill "
        f"{prompt_tokens} tokens, decode {tokens} tokens{_at(depth)}, median of {repeats}; "
        f"load average {_load()} at start"
    )
    runs: list[dict] = []  # llama.cpp's, before, between and after mer's rounds

    def llama() -> None:
        if bench is not None:
            runs.append(_llama(argv))

    if bench is not None:
        flags = ("-d", str(depth)) if depth else ()
        argv = llamacpp.bench_argv(bench, model, prompt_tokens, tokens, threads, repeats, flags)
        console.print("llama.cpp: " + " ".join(argv))
    llama()
    reads = [memory_read_rate(512 << 20, 0.5, threads)]
    copy = memory_bandwidth(512 << 20, 0.5)
    with MerFits(store_path, threads, prompt_tokens, dtype, dense_quant, depth) as fits:
        mer_rounds = []
        for r in range(rounds):
            if r:
                llama()
            mer_rounds.append(fits.measure(tokens, repeats))
        mer_res = fits.summary()
        hint = fits.hint()
    llama()  # before and after mer: a machine whose load drifts hits both
    reads.append(memory_read_rate(512 << 20, 0.5, threads))
    bw = max(reads)
    mer_res.update({k: statistics.median(m[k] for m in mer_rounds) for k in mer_rounds[0]})
    ratios = {}
    if runs:  # each round against the mean of the llama.cpp runs on either side of it
        around = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(runs, runs[1:], strict=False)]
        ratios = {
            k: [m[k] / ll[k] for m, ll in zip(mer_rounds, around, strict=True)] for k in runs[0]
        }
        console.print("llama.cpp tok/s, before, between and after mer's rounds: " + "; ".join(
            f"{k} " + ", ".join(f"{r[k]:.2f}" for r in runs) for k in runs[0]))  # fmt: skip
        if rounds > 1:
            console.print("mer / llama.cpp by round: " + "; ".join(f"{k} " + ", ".join(
                f"x{x:.2f}" for x in xs) for k, xs in ratios.items()))  # fmt: skip
    console.print(_table(mer_res, ratios, bw, prompt_tokens, depth))
    console.print(
        f"memory read {' and '.join(f'{r / 1e9:.1f}' for r in reads)} GB/s before and after "
        f"({threads} threads), copy {copy / 1e9:.1f} GB/s (read + written); bytes/token: dense "
        f"weights but the embedding table, plus {fmt_bytes(s.expert_format.nbytes)} per expert "
        f"routed to ({mer_res['experts_per_token']:.1f} per decode token, "
        f"{mer_res['prompt_experts']} distinct in the prompt); bound: the higher read rate / "
        f"bytes per token; expert reads while timing: {mer_res['reads_while_timing']}; int4 "
        f"prefetch hint {hint}; load average {_load()} at end"
    )


class MerFits:
    """mer with every expert in RAM: opened once, `measure` as often as asked (prefill and
    decode tok/s, medians of `repeats`), `summary` of what a token touched: the dense bytes
    and the experts routed to, counted by a routing hook."""

    def __init__(self, store: Path, threads: int, prompt_tokens: int, dtype: str,
                 dense_quant: str = "bf16", depth: int = 0) -> None:  # fmt: skip
        self.store, self.threads, self.prompt_tokens = store, threads, prompt_tokens
        self.dtype, self.dense_quant, self.depth = dtype, dense_quant, depth

    def __enter__(self) -> MerFits:
        import mer
        from mer.store.reader import Store

        budget = Store(self.store).expert_bytes_total
        self.m = m = mer.open(
            self.store, budget, dtype=self.dtype, prefetch=False,
            compute_threads=self.threads, dense_quant=self.dense_quant,
        )  # fmt: skip
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
            gen = torch.Generator().manual_seed(0)
            self.prompt = torch.randint(
                3, cfg.vocab_size, (self.prompt_tokens,), generator=gen
            ).tolist()
            self.context = torch.randint(3, cfg.vocab_size, (self.depth,), generator=gen).tolist()
            self._once(self.prompt[:8], 3)  # warm-up: first calls allocate
            self._settle_hint()
            self.misses = cache.stats.misses
            self.routed: list[torch.Tensor] = []  # each MoE layer call's routing, counted after
            self.prefill_routed: list[torch.Tensor] = []
            self.prompts = self.decode_passes = 0  # prefill runs, and passes of decode runs
            m.transformer.routing_hooks.append(
                lambda layer, hidden, ids, weights: self.routed.append(ids)
            )
        except BaseException:
            m.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.m.close()

    def _settle_hint(self) -> None:
        """Decode until the int4 prefetch hint's trial (`mer.quant.stream_hint`) has chosen,
        where this machine has not yet: every timed step then runs one hint."""
        trial = self.m.transformer.hint_trial
        if trial is None or trial.done:
            return
        total = stream_hint.WARMUP + 2 * stream_hint.PAIRS * stream_hint.ROUND
        what = "choosing the int4 prefetch hint (once per machine)"
        shown = 0
        with progress_bar(total, what, unit="steps") as bar:
            for _ in range(2 * total // 16):  # steps that read from the SSD do not count
                self._once(self.prompt[:1], 16)  # 16 lone passes
                step = total - shown if trial.done else min(16, total - 1 - shown)
                bar.advance(step)
                shown += step
                if trial.done:
                    break

    def hint(self) -> str:
        trial = self.m.transformer.hint_trial
        return trial.describe() if trial is not None else "none (no int4 kernel)"

    def _once(self, ids: list[int], n: int):
        from mer.engine.generate import GenerationStats, generate

        stats = GenerationStats()
        params = self.m.sampling_params(max_tokens=n, stop_token_ids=[-1])  # no stop but n
        for _ in generate(self.m.transformer, ids, params, stats):
            pass
        return stats

    def measure(self, tokens: int, repeats: int) -> dict:
        """Prefill and decode tok/s, each the median of `repeats` runs."""
        if self.depth:
            return self._measure_at_depth(tokens, repeats)
        before = len(self.routed)
        prefill = [self._once(self.prompt, 1).prefill_tps for _ in range(repeats)]
        self.prefill_routed += self.routed[before:]
        del self.routed[before:]
        self.prompts += repeats
        runs = [self._once(self.prompt[:1], tokens + 1) for _ in range(repeats)]
        # every pass of these runs is one token's: a 1-token prefill, then decode steps
        self.decode_passes += repeats * (tokens + 1)
        return {
            "prefill": statistics.median(prefill),
            "decode": statistics.median(r.decode_tps for r in runs),
        }

    def _measure_at_depth(self, tokens: int, repeats: int) -> dict:
        """`measure` with `depth` tokens of context in the KV cache first (untimed, their
        routing not counted), as llama-bench's -d: the prompt's prefill after it in one pass,
        and `tokens` greedy decode steps after it, each pass timed alone."""
        m, prefill, decode = self.m.transformer, [], []
        for _ in range(repeats):
            kv = m.new_kv_cache(self.depth + len(self.prompt))
            self._context(kv)
            before = len(self.routed)
            t0 = time.perf_counter()
            m.forward(torch.tensor(self.prompt), kv)
            prefill.append(len(self.prompt) / (time.perf_counter() - t0))
            self.prefill_routed += self.routed[before:]
            del self.routed[before:]
            kv = m.new_kv_cache(self.depth + tokens)
            logits, spent = self._context(kv), 0.0
            for _ in range(tokens):
                token = torch.tensor([int(torch.argmax(logits))])
                t0 = time.perf_counter()
                logits = m.forward(token, kv)[-1]
                spent += time.perf_counter() - t0
            decode.append(tokens / spent)
        self.prompts += repeats
        self.decode_passes += repeats * tokens
        return {"prefill": statistics.median(prefill), "decode": statistics.median(decode)}

    def _context(self, kv) -> torch.Tensor:
        """The `depth` context tokens into `kv` (their routing not counted): the last's logits."""
        before = len(self.routed)
        logits = self.m.transformer.forward(torch.tensor(self.context), kv)[-1]
        del self.routed[before:]
        return logits

    def summary(self) -> dict:
        from mer.memory import tensor_bytes

        def distinct(routed) -> int:  # not in the hook: two tensor ops a layer would be timed
            return sum(int(ids.unique().numel()) for ids in routed)

        m = self.m
        return {
            "dense_bytes": tensor_bytes(v for k, v in m.transformer.w.items() if k != "embed"),
            "expert_bytes": m.store.expert_format.nbytes,
            "experts_per_token": distinct(self.routed) / self.decode_passes,
            "prompt_experts": distinct(self.prefill_routed) // self.prompts,
            "reads_while_timing": m.cache.stats.misses - self.misses,
        }


def _llama(argv: list[str]) -> dict[str, float]:
    r = subprocess.run(argv, capture_output=True, text=True)
    rates = llamacpp.bench_rates(r.stdout) if r.returncode == 0 else {}
    if not rates:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise MerError(f"llama-bench failed ({llamacpp.exit_status(r.returncode)}): {last[:200]}")
    return rates


def _at(depth: int) -> str:
    return f" at depth {depth}" if depth else ""


def _table(res: dict, ratios: dict, bw: float, prompt_tokens: int, depth: int = 0) -> Table:
    """`ratios`: mer / llama.cpp per round, by phase (none without llama.cpp); the llama.cpp
    column is what the median ratio makes of mer's median."""
    t = Table(title="the whole model in RAM: mer against llama.cpp and the bandwidth bound")
    cols = ["phase", "mer tok/s", "llama.cpp tok/s", "x llama.cpp", "bytes/token", "bound tok/s",
            "x bound"]  # fmt: skip
    for col in cols:
        t.add_column(col, justify="left" if col == "phase" else "right")
    decode_bytes = res["dense_bytes"] + res["experts_per_token"] * res["expert_bytes"]
    prompt_bytes = res["dense_bytes"] + res["prompt_experts"] * res["expert_bytes"]
    for phase, label, nbytes in (
        ("decode", "decode" + _at(depth), decode_bytes),
        ("prefill", f"prefill ({prompt_tokens} tokens{_at(depth)})", prompt_bytes / prompt_tokens),
    ):
        ours, bound = res[phase], bw / nbytes
        x = statistics.median(ratios[phase]) if ratios else None
        t.add_row(
            label,
            f"{ours:.2f}",
            f"{ours / x:.2f}" if x else "-",
            f"x{x:.2f}" if x else "-",
            fmt_decimal(nbytes),
            f"{bound:.2f}",
            f"x{ours / bound:.2f}",
        )
    return t


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
