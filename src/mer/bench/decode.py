"""`mer bench decode --store DIR --routing-trace FILE`: the real engine on a real model's routing.

The store's model decodes held-out sequences of the trace token by token with forced
routing (`mer.trace.forced`): the router runs, but each token takes the experts the
trace recorded, so every read, cache decision, prefetch and expert FFN is the engine's
own on a real model's routing (outputs are text from random weights and never shown).
Pins and predictors learn from the trace's other sequences; live prefetch also learns
online (`mer.predict.live`). Every run starts from a cold cache and reads from the SSD
with O_DIRECT.

First two measurements that the replay simulator is given: the device's read time of
one expert at the engine's concurrency (experts read together by the read engine), and
the compute time per MoE layer (a decode at 100% residency, once every expert is in).
Then, at each residency, decodes with `lru`, `lfu`, `ours`, `ours` with pins, and `ours`
(with and without pins) with each live prefetcher, each printed beside the simulator's
prediction for the same trace, slots, device and step time (`mer.trace.replay`,
`mer.trace.prefetch`) and the prediction's error.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from mer.cache.expert_cache import ExpertCache
from mer.cache.pinning import Pins, pin_capacity
from mer.errors import ConfigError
from mer.io.direct import DirectReader, aligned_buffer
from mer.io.engine import DEMAND, ReadEngine
from mer.models.transformer import MoETransformer
from mer.options import count, natural, number, positive_size
from mer.predict import catalog
from mer.predict.live import LIVE, LivePrefetcher, live_predictor
from mer.progress import progress_bar
from mer.store.reader import Store
from mer.trace.forced import TraceRouting, check_trace_shape, decode_sequences
from mer.trace.format import Trace, load_trace, split_trace
from mer.trace.prefetch import Device, no_plan, plan, simulate_prefetch
from mer.trace.replay import accesses, frequent_keys, grouped_accesses, simulate
from mer.trace.stats import batch_dedup
from mer.units import fmt_decimal


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", required=True, help="store whose shape matches the trace")
    b.add_argument("--routing-trace", required=True, help="routing trace (.npz) to decode")
    b.add_argument("--fractions", type=number(0, 1, lo_open=True), nargs="*", default=[0.25, 0.5],
                   help="cache sizes as shares of all experts (none: batching only)")  # fmt: skip
    b.add_argument("--tokens", type=count, default=200,
                   help="decode the held-out sequences that fit in N tokens, per run")  # fmt: skip
    b.add_argument("--prefetch", nargs="*", choices=[*LIVE, "lookahead"], default=["markov"],
                   help="live prefetchers (speculator, ensemble: need --speculator)")  # fmt: skip
    b.add_argument("--speculator", help="a trained speculator (mer train-speculator)")
    b.add_argument("--pin-share", type=number(0, 0.9), default=0.25,
                   help="share of the slots pinned to the experts most frequent in the "
                   "training part, for the +pin runs")  # fmt: skip
    b.add_argument("--guesses", type=count,
                   help="experts prefetched per layer (default: as many as the measured read "
                   "time fits in the measured layer time)")  # fmt: skip
    b.add_argument("--held-out", type=number(0, 1, lo_open=True), default=0.5,
                   help="share of the sequences held out for decoding, the last")  # fmt: skip
    b.add_argument("--train-tokens", type=count, default=20000,
                   help="pins and predictors learn from the first N other tokens")  # fmt: skip
    b.add_argument("--batch", type=natural, default=8,
                   help="also decode this many held-out sequences together and one at a "
                   "time (0: skip)")  # fmt: skip
    b.add_argument("--batch-tokens", type=count, default=24,
                   help="tokens of each sequence in the batching runs")  # fmt: skip
    b.add_argument("--batch-fraction", type=number(0, 1, lo_open=True), default=0.25,
                   help="expert cache of the batching runs, as a share of all experts")  # fmt: skip
    b.add_argument("--io-threads", type=count, default=4, help="expert reader threads")
    b.add_argument("--threads", type=count, help="compute threads (default: every core)")
    b.add_argument("--memory", type=positive_size,
                   help="also run at the expert cache this whole-process target leaves, "
                   "measured as mer generate --memory does (the split is printed)")  # fmt: skip
    b.add_argument("--dense-quant", choices=["bf16", "int8", "int4"],
                   help="the dense weights' width (default: as stored)")  # fmt: skip
    b.add_argument("--repeats", type=count, default=1,
                   help="rounds of every run, interleaved (order reversed every other round); "
                   "each row shows its median run and the median of its tok/s over lru's in "
                   "the same round")  # fmt: skip
    b.add_argument("--no-full", action="store_true",
                   help="skip the 100%% residency run (then give --step-ms)")  # fmt: skip
    b.add_argument("--step-ms", type=number(0, lo_open=True),
                   help="compute per MoE layer for the simulator (not measured)")  # fmt: skip


@dataclass
class Result:
    name: str
    tokens: int
    seconds: float  # in forward passes
    stall: float  # seconds acquire() waited for reads
    hits: int
    misses: int
    bytes_read: int
    prefetches: int
    used: int
    read_busy: float = 0.0  # seconds with a read in flight
    expert_bytes: int = 1
    layers: int = 1

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def read_s(self) -> float | None:
        """Measured device time per expert read: busy time over reads (None: no reads)."""
        reads = self.bytes_read / self.expert_bytes
        return self.read_busy / reads if reads else None

    @property
    def step_s(self) -> float:
        """Measured compute per MoE layer step: forward time less stall, per step."""
        return (self.seconds - self.stall) / (self.tokens * self.layers)


def run(
    *,
    store: str,
    routing_trace: str,
    fractions: list[float],
    tokens: int,
    prefetch: list[str],
    speculator: str | None,
    pin_share: float,
    guesses: int | None,
    held_out: float,
    train_tokens: int,
    io_threads: int,
    threads: int | None,
    no_full: bool,
    step_ms: float | None,
    batch: int = 0,
    batch_tokens: int = 24,
    batch_fraction: float = 0.25,
    memory: int | None = None,
    dense_quant: str | None = None,
    repeats: int = 1,
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 320)
    s = Store(store)
    cfg = s.config
    trace = load_trace(routing_trace)
    check_trace_shape(trace, cfg, routing_trace, store)
    if no_full and step_ms is None:
        raise ConfigError("--no-full needs --step-ms (the compute time the simulator assumes)")
    if "lookahead" in prefetch:
        raise ConfigError(
            "--prefetch lookahead: router lookahead cannot predict forced routing (the trace "
            "has no hidden states of this store's random weights); use markov, speculator "
            "or ensemble"
        )
    if any(p != "markov" for p in prefetch) and speculator is None:
        raise ConfigError("--prefetch speculator and ensemble need --speculator FILE.pt")
    train, replay = split_trace(trace, held_out)
    train, replay = train.head(train_tokens), replay.head(tokens)
    torch.set_num_threads(threads or torch.get_num_threads())
    nbytes, total = s.expert_format.nbytes, cfg.num_experts_total
    console.print(
        f"{routing_trace}: decoding {replay.n_tokens} held-out tokens ({replay.n_sequences} "
        f"sequences) per run on {store} ({len(cfg.moe_layers)} MoE layers x "
        f"{cfg.num_local_experts} experts of {fmt_decimal(nbytes)}, top-"
        f"{cfg.num_experts_per_tok}); pins and predictors learned from {train.n_tokens} "
        "other tokens; outputs are from random weights and not shown"
    )
    from mer.api import dense_weights, fit_memory, resolve_dense_quant

    weights = dense_weights(s, resolve_dense_quant(s, dense_quant))
    model = MoETransformer(cfg, weights, None, torch.bfloat16)
    del weights
    if memory is not None:  # this process's target: what it holds now is measured
        split = fit_memory(s, model, memory, None, None, max(1, batch), torch.bfloat16)
        console.print(split.line())
        fractions = [*fractions, split.cache / nbytes / total]
    routing = TraceRouting.for_model(replay, model, routing_trace, store)
    model.routing_override = routing
    read_s = measure_read(s, io_threads)
    layers = len(cfg.moe_layers)
    full = None
    runs = _runs(fractions, prefetch)
    n_runs = repeats * len(runs) + (0 if no_full else 2)
    with progress_bar(n_runs * replay.n_tokens, "bench decode", unit="tokens") as bar:
        if not no_full:  # once to read every expert used, once to time compute alone
            whole = Decoder(model, s, routing, replay, total * nbytes, io_threads, bar)
            whole.run("lru", warm=True)
            full = whole.run("lru", warm=True, name="lru (all in RAM, warm)")
            kernels = kernel_time(model, routing, bar)
            expert_s = expert_time(model, whole.cache)
            whole.cache.engine.close()
            whole.cache = model.experts = None  # its slots go back before the next runs
            gc.collect()  # the cache's reference cycles hold its slots until collected
            step_s = (full.seconds - full.stall) / (full.tokens * layers)
        else:
            step_s, kernels = step_ms / 1e3, None
            # The FFN time the simulator overlaps with reads, on experts read for it.
            few = ExpertCache(s, 24 * nbytes, threads=io_threads)
            expert_s = expert_time(model, few, load=True)
            few.engine.close()
            del few
        top_k = cfg.num_experts_per_tok
        spare = guesses or max(1, min(top_k, math.floor(step_s / read_s)))
        sims = Simulator(train, replay, cfg.moe_layers, pin_share, speculator)
        rows = []
        for rnd in range(repeats):
            # Interleaved rounds, every other one reversed, so that a drift in the device's
            # or the machine's speed falls on every run alike.
            for fraction, policy, pinned, pf in runs if rnd % 2 == 0 else runs[::-1]:
                slots = max(round(fraction * total), top_k)
                pins = sims.pins(slots) if pinned else None
                dec = Decoder(model, s, routing, replay, slots * nbytes, io_threads, bar, pins)
                live = (pf, train, speculator, spare) if pf else None
                name = policy + "+pin" * pinned + f"+{pf}" * bool(pf)
                got = dec.run(policy, live=live, name=name)
                # The simulator gets this run's own measured read time and step compute.
                run_read = got.read_s or read_s
                if policy == "lru" and not pinned and not pf and guesses is None:
                    spare = max(1, min(top_k, math.floor(got.step_s / run_read)))  # as seen
                sim = sims.predict(policy, slots, pinned, pf, run_read, got.step_s, expert_s, spare)
                rows.append(Row(rnd, fraction, slots, got, sim))
    if rows or full is not None:
        show(console, rows, full, read_s, expert_s, replay.n_tokens, layers, top_k)
    if kernels is not None:
        wall, dense, experts, n = kernels
        inside = dense + experts
        plain = full.seconds / full.tokens
        console.print(
            f"100% residency, warm, under the profiler ({n} tokens): {1e3 * wall / n:.1f} ms "
            f"per token, of which {1e3 * inside / n:.1f} ms in kernels: dense "
            f"{1e3 * dense / n:.1f} ms (PyTorch ops' self times and mer's C dense kernels) + "
            f"expert FFNs {1e3 * experts / n:.1f} ms: {wall / inside:.2f}x (the engine's own "
            f"time is the rest); without the profiler {1e3 * plain:.1f} ms per token, "
            f"{plain / (inside / n):.2f}x its kernels"
        )
    if batch > 1:
        slots = max(round(batch_fraction * total), batch * cfg.num_experts_per_tok)
        batching(console, model, s, trace, split_trace(trace, held_out)[1], batch,
                 batch_tokens, slots, io_threads)  # fmt: skip


def batching(console, model, store, trace, held, n, length, slots, io_threads) -> None:
    """`n` held-out sequences (their first `length` tokens) decoded one at a time, then
    together, each time from a cold cache (no prefetch): SSD bytes per token, beside the
    most batching can divide reads by on this trace (`mer.trace.stats.batch_dedup`, what
    `mer bench routing` prints). That bound assumes no cache, every expert chosen a read,
    so the first pair runs with no cache to speak of (slots for one step); then pairs with
    `slots` under lru and ours, each beside the replay of the same two access streams
    through the same policy and through Belady's (the most any policy could cut there)."""
    long = [i for i, (a, b) in enumerate(held.sequences()) if b - a >= length][:n]
    if len(long) < n:
        console.print(f"batching: only {len(long)} held-out sequences of {length} tokens")
        return
    rows = np.concatenate([np.arange(held.seq_starts[i], held.seq_starts[i] + length)
                           for i in long])  # fmt: skip
    starts = np.arange(n + 1, dtype=np.int64) * length
    cut = Trace(held.experts[rows], starts, held.phase[rows], held.meta)
    model.routing_override = routing = TraceRouting.for_model(cut, model)
    groups = {"one at a time": [[i] for i in range(n)], f"{n} together": [list(range(n))]}
    streams = {name: grouped_accesses(cut, g) for name, g in groups.items()}
    least = max(a.max_step for a in streams.values())  # one batched step's experts
    # No cache: each run's slots hold one of its steps, nothing across layers.
    configs = [("no cache", None, "lru"), (f"{slots}", max(slots, least), "lru"),
               (f"{slots}", max(slots, least), "ours")]  # fmt: skip
    nbytes = store.expert_format.nbytes
    got = {}
    with progress_bar(len(configs) * 2 * n * length, "bench decode: batching",
                      unit="tokens") as bar:  # fmt: skip
        for config in configs:
            _, size, policy = config
            for name, group in groups.items():
                size = size or streams[name].max_step
                cache = ExpertCache(store, size * nbytes, threads=io_threads, policy=policy)
                model.experts = cache
                model.routing_hooks = (
                    [] if policy == "lru" else [lambda m, h, ids, w, c=cache: c.observe(m, ids)]
                )
                seconds = decode_sequences(model, routing, group, lambda g, k: bar.advance(k))
                got[config, name] = (seconds, cache.stats.bytes_read, cache.stats.misses)
                cache.engine.close()
                model.experts = None
                gc.collect()  # free this run's slots before the next run allocates its own
    model.routing_hooks = []
    bound = batch_dedup(trace, n)
    table = Table(title=f"batching {n} trace sequences x {length} tokens, cold cache each run")
    for c in ("run", "tok/s", "SSD read/token", "expert reads", "÷ one at a time (bytes)",
              "dedup bound", "share of bound", "cache (slots)", "policy", "replay ÷",
              "belady replay ÷"):  # fmt: skip
        table.add_column(c, justify="right")
    for config in configs:
        label, size, policy = config
        sizes = {name: size or acc.max_step for name, acc in streams.items()}
        replay = {name: simulate(acc, policy, sizes[name]) for name, acc in streams.items()}
        best = {name: simulate(acc, "belady", sizes[name]) for name, acc in streams.items()}
        alone_bytes = got[config, "one at a time"][1]
        for name in groups:
            seconds, nb, misses = got[config, name]
            cut_by = alone_bytes / nb if nb else float("inf")
            first = name == "one at a time"
            table.add_row(
                name, f"{n * length / seconds:.2f}", fmt_decimal(nb / (n * length)),
                str(misses), f"{cut_by:.2f}", f"{bound:.2f}",
                f"{(cut_by - 1) / (bound - 1):.2f}" if bound > 1 else "",
                f"{label} ({sizes[name]})", policy if first else "",
                f"{replay['one at a time'] / replay[name]:.2f}",
                f"{best['one at a time'] / best[name]:.2f}",
            )  # fmt: skip
        table.add_section()
    console.print(table)
    console.print(
        "dedup bound: experts chosen per distinct expert when these many sequences decode "
        "one token each (random tokens of the whole trace, mer bench routing): what batching "
        "saves with no cache; share of bound: the measured cut in SSD bytes less 1, over the "
        "bound less 1; replay ÷: the same cut replayed through the same policy and slots, "
        "and through Belady's (what any policy could save with that cache: a cache already "
        "keeps much of what batching shares)."
    )


def expert_time(model, cache: ExpertCache, n: int = 24, reps: int = 5, load=False) -> float:
    """Seconds one expert FFN takes on one token (a decode step's), the median over up to
    `n` experts in RAM (with `load`, over `n` experts read for it): the compute of a layer
    that overlaps its reads."""
    cfg = model.config
    every = max(1, cfg.num_experts_total // n)
    keys = [(m, e) for m in cfg.moe_layers for e in range(cfg.num_local_experts)
            if load or cache.is_resident(m, e)][::every][:n]  # fmt: skip
    x = torch.randn(1, cfg.hidden_size, dtype=model.dtype)
    times = []
    with torch.inference_mode():
        for m, e in keys:
            with cache.use(m, e) as ffn:
                ffn(x)  # once untimed: the first call of a shape may choose its kernel
                t0 = time.perf_counter()
                for _ in range(reps):
                    ffn(x)
                times.append((time.perf_counter() - t0) / reps)
    return float(np.median(times)) if times else 0.0


def kernel_time(model, routing: TraceRouting, bar) -> tuple[float, float, float, int]:
    """(wall seconds, seconds in dense kernels, seconds in expert FFNs, tokens) of decoding
    the trace's first sequence again on the warm cache under the profiler: how far a
    token's time is from the sum of its kernels. Dense: the self times of every PyTorch
    op outside expert FFNs; experts: the whole time of each FFN call (their C kernels are
    no PyTorch op)."""
    from torch.profiler import ProfilerActivity, profile

    cache = model.experts
    model.experts = _TimedExperts(cache)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof, _native_kernels_ranged():
            wall = decode_sequences(model, routing, [[0]], lambda g, n: bar.advance(0))
    finally:
        model.experts = cache
    events = prof.events()
    covered = sum(e.self_cpu_time_total for e in events) / 1e6
    experts = sum(e.cpu_time_total for e in events if e.name == EXPERT_RANGE) / 1e6
    n = int(routing.trace.seq_starts[1])
    return wall, covered - experts, experts, n


EXPERT_RANGE = "mer.expert_ffn"

# mer's own C kernels for dense matrices (the bf16 one-token GEMV, the int4 linear) are no
# PyTorch op, so the profiler would count their time as the engine's: while profiling,
# each runs inside a range of its own, whose self time is the kernel's.
_NATIVE_DENSE = (
    ("mer.quant.bf16_gemv", "_gemv"),
    ("mer.quant.int4_paths", "c_linear"),
    ("mer.quant.int4_paths", "c_linear_i8"),
)


@contextmanager
def _native_kernels_ranged():
    import importlib

    from torch.profiler import record_function

    def ranged(name, fn):
        def call(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)

        return call

    saved = []
    for module_name, attr in _NATIVE_DENSE:
        module = importlib.import_module(module_name)
        fn = getattr(module, attr, None)
        if fn is not None:
            saved.append((module, attr, fn))
            setattr(module, attr, ranged(f"mer.{attr}", fn))
    try:
        yield
    finally:
        for module, attr, fn in saved:
            setattr(module, attr, fn)


class _TimedExperts:
    """The expert cache, its FFN calls each marked as one profiler range."""

    def __init__(self, cache) -> None:
        self._cache = cache

    def __getattr__(self, name):
        return getattr(self._cache, name)

    @contextmanager
    def use(self, layer: int, expert: int):
        from torch.profiler import record_function

        with self._cache.use(layer, expert) as ffn:

            def timed(x):
                with record_function(EXPERT_RANGE):
                    return ffn(x)

            yield timed


class Decoder:
    """Decodes the replay trace through a fresh expert cache of `budget` bytes per run."""

    def __init__(self, model, store, routing, replay, budget, io_threads, bar, pins=None):
        self.model, self.store, self.routing, self.replay = model, store, routing, replay
        self.budget, self.io_threads, self.bar, self.pins = budget, io_threads, bar, pins
        self.cache: ExpertCache | None = None

    def _advance(self, group, n: int) -> None:
        self.bar.advance(n)

    def run(self, policy: str, warm: bool = False, live=None, name: str = "") -> Result:
        model, cfg = self.model, self.store.config
        if self.cache is None or not warm and self.cache.policy != policy:
            self.cache = ExpertCache(self.store, self.budget, threads=self.io_threads,
                                     policy=policy, pins=self.pins,
                                     pin_share=0.9 if self.pins else 0.0)  # fmt: skip
        cache = self.cache
        model.experts = cache
        hooks = [] if policy == "lru" else [lambda m, h, ids, w: cache.observe(m, ids)]
        prefetcher = None
        if live is not None:
            pf, train, speculator, spare = live
            prefetcher = LivePrefetcher(
                live_predictor(pf, cfg, train, speculator),
                cache,
                cfg,
                guesses=spare,
                min_precision=None,  # the bar the device's busy share sets, as simulated
            )
            hooks.append(prefetcher)
        model.routing_hooks = hooks
        before = _snapshot(cache)

        seconds = 0.0
        for i in range(self.replay.n_sequences):
            if prefetcher is not None:
                prefetcher.begin_sequence()
            seconds += decode_sequences(model, self.routing, [[i]], self._advance)
        after = _snapshot(cache)
        d = {k: after[k] - before[k] for k in after}
        result = Result(name or policy, self.replay.n_tokens, seconds, d["stall"], d["hits"],
                        d["misses"], d["bytes"], d["prefetches"], d["used"], d["busy"],
                        self.store.expert_format.nbytes, len(cfg.moe_layers))  # fmt: skip
        if not warm:
            cache.engine.close()
            self.cache = model.experts = None
            model.routing_hooks = []
            del cache, prefetcher, hooks
            gc.collect()  # the cache's reference cycles hold its slots until collected
        return result


def _snapshot(cache: ExpertCache) -> dict:
    st = cache.stats
    return dict(stall=st.stall_seconds, hits=st.hits, misses=st.misses, bytes=st.bytes_read,
                prefetches=st.prefetches, used=st.prefetches_used,
                busy=st.read_seconds)  # fmt: skip


class Simulator:
    """The replay simulator's prediction of a run: misses, stall and tok/s on a device that
    reads one expert in `read_s`, with `step_s` of compute per MoE layer."""

    def __init__(self, train, replay, layers, pin_share, speculator):
        self.train, self.replay, self.pin_share = train, replay, pin_share
        self.layers = layers  # the model's MoE layers, for the keys of pins
        self.acc = accesses(replay, "token")
        self.speculator = speculator
        self._plans: dict[str, object] = {}

    def pins(self, slots: int) -> Pins:
        """The experts most frequent in the training part, as many as the share allows."""
        n = pin_capacity(slots, self.pin_share, self.replay.top_k)
        keys = frequent_keys(accesses(self.train, "token"), n)
        return Pins(tuple(self._key(int(k)) for k in keys))

    def _key(self, k: int) -> tuple[int, int]:
        n = self.replay.n_experts
        return self.layers[k // n], k % n

    def predict(self, policy, slots, pinned, pf, read_s, step_s, expert_s, guesses):
        """The prediction for a run on a device reading an expert in `read_s`, computing
        `step_s` per MoE layer of which `expert_s` per expert FFN (overlapping the layer's
        reads), prefetching `guesses` per layer with `pf`."""
        device = Device(read_s, step_s, min(expert_s, step_s / self.replay.top_k))
        pins = ()
        if pinned:
            n = pin_capacity(slots, self.pin_share, self.replay.top_k)
            pins = frequent_keys(accesses(self.train, "token"), n)
        steps = len(self.acc.step_layer)
        # Live prefetch: ranked candidates, of which the engine's rule picks (its precision
        # bar, at most `guesses` not in the cache).
        todo = no_plan(self.acc) if pf is None else self._plan(pf)
        live = None if pf is None else (guesses, None)
        r = simulate_prefetch(self.acc, policy, slots, todo, pins, device, live)
        misses, stall, prefetched, used = r.misses, r.stall_s, r.prefetches, r.useful
        wall = steps * step_s + stall
        return dict(misses=misses, stall=stall, tok_s=self.replay.n_tokens / wall,
                    prefetched=prefetched, used=used, read_s=read_s, step_s=step_s,
                    expert_s=device.expert_s, guesses=guesses if pf else 0)  # fmt: skip

    def _plan(self, pf: str):
        """The predictor's 2 x top-k best guesses one layer ahead, best first (what the live
        prefetcher ranks)."""
        if pf not in self._plans:
            predictor = catalog.one(pf, self.train, self.speculator, None, 1)
            scorer = partial(predictor.scores, self.replay)
            ranks = 2 * self.replay.top_k
            self._plans[pf] = plan(self.replay, "token", scorer, 1, ranks, ranked=True)
        return self._plans[pf]


def measure_read(store: Store, threads: int, n: int = 48, rounds: int = 3) -> float:
    """Seconds per expert when `n` random experts are read together by the read engine (its
    concurrency, O_DIRECT): the median of `rounds`."""
    nbytes = store.expert_format.nbytes
    keys = list(store.extents)
    n = min(n, len(keys))
    mm, _ = aligned_buffer(n * nbytes)
    view = memoryview(mm)
    engine = ReadEngine(DirectReader(store.expert_path), threads)
    rng = random.Random(0)
    times = []
    try:
        for _ in range(rounds):
            picks = rng.sample(keys, n)
            t0 = time.perf_counter()
            reqs = [engine.submit(view[i * nbytes : i * nbytes + store.extent(*k).length],
                                  store.extent(*k).offset, DEMAND)
                    for i, k in enumerate(picks)]  # fmt: skip
            for r in reqs:
                r.wait()
            times.append((time.perf_counter() - t0) / n)
    finally:
        engine.close()
        view.release()
    return float(np.median(times))


def _runs(fractions, prefetch):
    """(fraction, policy, pinned, live prefetcher) of every run, residency by residency."""
    out = []
    for f in fractions:
        out += [(f, "lru", False, None), (f, "lfu", False, None), (f, "ours", False, None),
                (f, "ours", True, None)]  # fmt: skip
        for pf in prefetch:
            out += [(f, "ours", False, pf), (f, "ours", True, pf)]
    return out


@dataclass
class Row:
    round: int
    fraction: float
    slots: int
    result: Result
    sim: dict

    def __iter__(self):
        return iter((self.round, self.fraction, self.slots, self.result, self.sim))


def lru_ratios(rows: list[Row]) -> dict[tuple[float, str], list[float]]:
    """Each run's tok/s over the lru run's at its residency in the same round."""
    lru = {(r.round, r.fraction): r.result.tok_s for r in rows if r.result.name == "lru"}
    out: dict[tuple[float, str], list[float]] = {}
    for r in rows:
        out.setdefault((r.fraction, r.result.name), []).append(
            r.result.tok_s / lru[r.round, r.fraction]
        )
    return out


def show(console, rows, full, read_s, expert_s, tokens, layers, top_k) -> None:
    table = Table(title="decode with real routing: engine (measured) vs replay simulator")
    cols = ["residency", "run", "tok/s", "stall ms/tok", "hits", "MB/tok", "prefetch used",
            "read ms", "step ms", "sim hits", "sim stall ms/tok", "stall err", "sim tok/s",
            "tok/s ÷ sim", "÷ lru tok/s", "sim MB/tok", "sim prefetch used"]  # fmt: skip
    for c in cols:
        table.add_column(c, justify="right")
    if full is not None:
        cells = [f"{full.tok_s:.2f}", f"{1e3 * full.stall / full.tokens:.1f}", _hit(full),
                 f"{full.bytes_read / full.tokens / 1e6:.1f}"]  # fmt: skip
        step = f"{1e3 * full.step_s:.2f}"
        table.add_row("100%", full.name, *cells, "", "", step, *[""] * (len(cols) - 9))
        table.add_section()
    ratios = lru_ratios(rows)
    groups: dict[tuple[float, str], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.fraction, row.result.name), []).append(row)
    repeats = max(row.round for row in rows) + 1 if rows else 1
    last = None
    for (fraction, name), runs in groups.items():
        # The run of median tok/s stands for its configuration; its simulator figures
        # are from that run's own read and step times.
        _, _, slots, r, sim = sorted(runs, key=lambda row: row.result.tok_s)[len(runs) // 2]
        if last is not None and fraction != last:
            table.add_section()
        first = fraction != last
        last = fraction
        paired = sorted(ratios[fraction, name])
        vs_lru = f"{float(np.median(paired)):.2f}"
        if repeats > 1:
            vs_lru += f" ({paired[0]:.2f}–{paired[-1]:.2f})"
        stall, sim_stall = r.stall / r.tokens, sim["stall"] / r.tokens
        err = (stall - sim_stall) / sim_stall if sim_stall else float("nan")
        accesses = r.tokens * layers * top_k
        pf = f"{r.used}/{r.prefetches} ({sim['guesses']}/layer)" if sim["guesses"] else ""
        table.add_row(
            f"{100 * fraction:.0f}% ({slots})" if first else "",
            r.name,
            f"{r.tok_s:.2f}",
            f"{1e3 * stall:.1f}",
            _hit(r),
            f"{r.bytes_read / r.tokens / 1e6:.1f}",
            pf,
            f"{1e3 * sim['read_s']:.2f}",
            f"{1e3 * sim['step_s']:.2f}",
            f"{100 * (1 - sim['misses'] / accesses):.1f}%",
            f"{1e3 * sim_stall:.1f}",
            f"{100 * err:+.0f}%",
            f"{sim['tok_s']:.2f}",
            f"{r.tok_s / sim['tok_s']:.2f}",
            vs_lru,
            f"{(sim['misses'] + sim['prefetched']) * r.expert_bytes / r.tokens / 1e6:.1f}",
            f"{sim['used']}/{sim['prefetched']}" if sim["guesses"] else "",
        )
    console.print(table)
    notes = [
        f"{tokens} tokens x {layers} MoE layers per run; the simulator replays each run with "
        "that run's measured read ms (device busy time per expert read; a run that read "
        f"nothing: {1e3 * read_s:.2f} ms, random experts read together before the runs) and "
        "step ms (forward time less stall, per MoE layer step), of which "
        f"{1e3 * expert_s:.2f} ms per expert FFN (one token, timed on experts in RAM) "
        "overlaps the layer's reads, as in the engine (its resident experts compute while "
        "its misses are read)",
        "live prefetch: the next MoE layer's best guesses not in RAM, at most as many per "
        "layer as the lru run's step ms over read ms (read while no demand read is in "
        "flight), from the ranks whose guesses were chosen often enough so far (at least "
        "b / (1 + b) on a device busy a share b of the time), in the engine and the "
        "simulator alike; prefetch used: used / issued (engine), used / read (simulator: a "
        "guess not started when its layer routes is cancelled)",
        "stall: time acquires waited for reads; stall err: engine over simulator, less 1",
    ]
    if repeats > 1:
        notes.append(
            f"{repeats} interleaved rounds: each row is its configuration's median run, and "
            "÷ lru the median (least–most) of its tok/s over lru's in the same round"
        )
    console.print("; ".join(notes) + ".")


def _hit(r: Result) -> str:
    n = r.hits + r.misses
    return f"{100 * r.hits / n:.1f}%" if n else ""
