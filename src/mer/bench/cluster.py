"""`mer bench cluster`: experts on 1, 2, 3 Ray workers against the single process, one run.

Every mode gets the same per-machine expert budget (by default a third of the store's
experts, so three workers hold them all) and decodes the same prompt greedily: a warm-up,
then the measured tokens. Printed: decode tok/s and its ratio to the single process, the
MoE dispatch time per layer and where it goes (the head's splitting and serialising, the
wait for the answers less the slowest worker's own time: Ray's round trip, the worker's
compute and reads, the head's merge), bytes over the link and SSD bytes per token. The bare
Ray actor round trip (an echo of one hidden row, one actor and three in parallel) is
measured in the same run as the floor a dispatch cannot beat. Last, a projection, labelled
as one: decode tok/s of one sequence on N machines over a link of given bandwidth and
latency, from the measured per-layer overhead, worker compute and bytes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mer.options import count, number, positive_size
from mer.units import fmt_bytes, fmt_decimal

PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
PRESET = "demo"  # 8 layers x 8 experts of 4.6 MB int4: 280 MiB of experts


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help=f"store (default: a synthetic `{PRESET}`-shape store, "
                   "made once under the cache directory)")  # fmt: skip
    b.add_argument("--workers", type=count, nargs="+", default=[1, 2, 3])
    b.add_argument(
        "--budget",
        type=positive_size,
        help="expert cache per machine (default: a third of the store's experts)",
    )
    b.add_argument("--tokens", type=count, default=32, help="decode tokens measured")
    b.add_argument("--warmup", type=count, default=24, help="tokens decoded first, unmeasured")
    b.add_argument("--ray-address", default="local",
                   help="local (a private Ray instance), or a Ray cluster's address")  # fmt: skip
    b.add_argument("--rtt-calls", type=count, default=300, help="bare Ray round trips timed")
    b.add_argument("--link-gbps", type=number(0, lo_open=True), default=10.0,
                   help="projection: link bandwidth in Gbit/s (default 10 GbE)")  # fmt: skip
    b.add_argument("--link-latency-us", type=number(0), default=50.0,
                   help="projection: added network round trip per call, in µs")  # fmt: skip
    b.add_argument("--machines", type=count, nargs="+", default=[1, 2, 3, 8, 32],
                   help="projection: machine counts")  # fmt: skip


def default_store() -> Path:
    """The synthetic benchmark store, written on first use."""
    from mer.data import cache_dir
    from mer.synth.checkpoint import hf_config
    from mer.synth.store import write_random_store

    path = cache_dir() / "bench" / f"cluster-{PRESET}-int4"
    if not (path / "manifest.json").is_file():
        write_random_store(path, hf_config(PRESET), "int4", seed=0)
    return path


class Echo:
    """The bare actor: answers a call with its argument, after keeping its CPU busy for
    `busy_ms` (a worker's compute time: on a machine with few cores, a busy worker slows
    the round trip of the processes it shares them with)."""

    def run(self, x, busy_ms: float = 0.0):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < busy_ms / 1e3:
            pass
        return x


def bare_round_trip(actors: list, hidden: int, calls: int, n: int, busy_ms: float = 0.0):
    """Median ms, less `busy_ms`, of a call echoing one float32 hidden row to `n` of the
    `actors` (`Echo`) in parallel, as `bytes` (`mer.cluster.wire`: Ray's cheapest form)."""
    import ray

    x = bytes(4 * hidden)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        ray.get([a.run.remote(x, busy_ms) for a in actors[:n]])
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times) - busy_ms


def decode(model, prompt: str, warmup: int, tokens: int) -> dict:
    """Warm up, then decode `tokens` tokens; what the decode steps alone cost."""
    from mer.engine.generate import GenerationStats

    ids = model.tokenizer.encode(prompt)
    forever = dict(stop_token_ids=[-1])  # nothing stops it but max_tokens
    list(model.tokens(ids, max_tokens=warmup, **forever))
    model.generation_stats = GenerationStats()
    cluster = getattr(model.cache, "dispatch", None)
    out, before = [], None
    for t in model.tokens(ids, max_tokens=tokens + 1, **forever):
        out.append(t)
        if before is None:  # prefill done: measure the decode steps from here
            before = (model.cache.stats.bytes_read, replace(cluster) if cluster else None)
    g = model.generation_stats
    steps = max(1, g.generated_tokens - 1)
    r = {
        "tokens": out,
        "tps": g.decode_tps,
        "ssd": (model.cache.stats.bytes_read - before[0]) / steps,
        "slots": model.cache.n_slots,
    }
    if cluster is not None:
        d0, d = before[1], model.cache.dispatch
        layers = max(1, d.layers - d0.layers)

        def per_layer(name: str) -> float:
            return 1e3 * (getattr(d, name) - getattr(d0, name)) / layers

        wait, worker = per_layer("wait_seconds"), per_layer("worker_seconds")
        r.update(
            dispatch=per_layer("seconds"),
            overhead=per_layer("seconds") - worker,
            prepare=per_layer("prepare_seconds"),
            ray=wait - worker,
            worker=worker,
            merge=per_layer("merge_seconds"),
            calls=(d.calls - d0.calls) / layers,
            link=(d.bytes_sent + d.bytes_received - d0.bytes_sent - d0.bytes_received) / steps,
            layers_per_token=layers / steps,
        )
    return r


def run(
    *,
    store: str | None,
    workers: list[int],
    budget: int | None,
    tokens: int,
    warmup: int,
    ray_address: str,
    rtt_calls: int,
    link_gbps: float,
    link_latency_us: float,
    machines: list[int],
) -> None:
    import mer.api
    from mer.cluster.session import connect, parse_cluster
    from mer.store.reader import Store

    path = Path(store) if store else default_store()
    s = Store(path)
    cfg, nbytes = s.config, s.expert_format.nbytes
    total = cfg.num_experts_total
    if budget is None:
        budget = -(-total // 3) * nbytes
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    console.print(
        f"store {path}: {len(cfg.moe_layers)} MoE layers x {cfg.num_local_experts} experts "
        f"(top-{cfg.num_experts_per_tok}) of {fmt_bytes(nbytes)} = {fmt_bytes(total * nbytes)}; "
        f"expert budget per machine {fmt_bytes(budget)} ({budget // nbytes} experts, "
        f"{budget / (total * nbytes):.0%} of them); {warmup} warm-up + {tokens} measured tokens"
    )
    address, _ = parse_cluster(ray_address)
    started = connect(address)
    try:
        import ray

        echo = [ray.remote(Echo).options(num_cpus=0).remote() for _ in range(3)]
        ray.get([a.run.remote(None) for a in echo])  # started
        rtt = {n: bare_round_trip(echo, cfg.hidden_size, rtt_calls, n) for n in (1, 3)}
        console.print(
            f"bare Ray actor round trip (one hidden row, echoed): {rtt[1]:.2f} ms to one actor, "
            f"{rtt[3]:.2f} ms to three in parallel"
        )
        results = {}
        base = mer.api.open(path, budget)
        results["single"] = decode(base, PROMPT, warmup, tokens)
        base.close()
        for n in workers:
            m = mer.api.open(path, budget, cluster=ray_address, workers=n)
            results[n] = decode(m, PROMPT, warmup, tokens)
            m.close()
        busy = {n: results[n]["worker"] for n in (1, 3) if n in results}
        floors = {n: bare_round_trip(echo, cfg.hidden_size, rtt_calls, n, ms)
                  for n, ms in busy.items()}  # fmt: skip
        for a in echo:
            ray.kill(a)
    finally:
        if started:
            import ray

            ray.shutdown()
    one = results["single"]
    table = Table(title=f"experts on Ray workers vs one process, {fmt_bytes(budget)} per machine")
    for col in ("mode", "decode tok/s", "vs single", "SSD/token", "link/token", "calls/layer",
                "dispatch ms/layer", "overhead", "prepare", "Ray RT", "worker", "merge",
                "same tokens"):  # fmt: skip
        table.add_column(col, justify="right")
    for key, r in results.items():
        c = key != "single"
        table.add_row(
            "single process" if not c else f"{key} worker" + ("s" if key > 1 else ""),
            f"{r['tps']:.1f}",
            f"x{r['tps'] / one['tps']:.2f}" if one["tps"] else "",
            fmt_decimal(r["ssd"]),
            fmt_decimal(r["link"]) if c else "",
            f"{r['calls']:.2f}" if c else "",
            *(
                (
                    f"{r[k]:.2f}"
                    for k in ("dispatch", "overhead", "prepare", "ray", "worker", "merge")
                )
                if c
                else [""] * 6
            ),  # fmt: skip
            "yes" if r["tokens"] == one["tokens"] else "NO",
        )
    console.print(table)
    console.print(
        "per MoE layer of one decoding token, in ms: dispatch = the whole routed block; "
        "overhead = dispatch less the slowest called worker's own time; prepare = splitting "
        "and serialising at the head; Ray RT = waiting for answers less the worker's time; "
        "worker = the slowest called worker's compute and reads; merge = the head's sum. "
        "link = hidden rows, indices and weights sent plus outputs received."
    )
    for n, target in ((1, 1.5), (3, 2.5)):
        if n in results:
            r = results[n]
            console.print(
                f"dispatch overhead, {n} worker{'s' if n > 1 else ''}: {r['overhead']:.2f} ms per "
                f"layer (target <= {target} ms); the bare Ray round trip {rtt[n]:.2f} ms idle "
                f"(ratio {r['overhead'] / rtt[n]:.2f}), {floors[n]:.2f} ms with the actor busy "
                f"for the workers' {r['worker']:.2f} ms (ratio {r['overhead'] / floors[n]:.2f})"
            )
    project(console, results, cfg, budget, nbytes, link_gbps, link_latency_us, machines)


def project(console, results, cfg, budget, nbytes, gbps, latency_us, machines) -> None:
    """Decode tok/s of one sequence on N machines: the head's own time per token plus, per
    MoE layer, the measured overhead of one worker call (loopback), the link's latency and
    transfer time of the measured bytes, and the measured warm worker compute."""
    measured = [k for k in results if k != "single"]
    if not measured:
        return
    r1 = results[min(measured)]  # least contention on this machine: its overhead
    warm = min(measured, key=lambda k: results[k]["ssd"])  # its workers read least
    layers = r1["layers_per_token"]
    head = 1e3 / r1["tps"] - layers * r1["dispatch"]  # ms per token outside the MoE blocks
    per_layer = (
        r1["overhead"]
        + latency_us / 1e3
        + r1["link"] / layers * 8 / (gbps * 1e9) * 1e3
        + results[warm]["worker"]
    )
    total = cfg.num_experts_total * nbytes
    table = Table(
        title=f"PROJECTION (not measured): one sequence decoding, {gbps:g} Gbit/s link, "
        f"+{latency_us:g} µs per call"
    )
    for col in ("machines", "experts RAM", "holds", "model in RAM", "ms/token", "decode tok/s"):
        table.add_column(col, justify="right")
    for n in machines:
        ram = n * budget
        fits = ram >= total
        table.add_row(
            str(n),
            fmt_bytes(ram),
            f"{min(1.0, ram / total):.0%} of this store",
            "yes" if fits else "no: SSD reads on top",
            f"{head + layers * per_layer:.1f}",
            f"{1e3 / (head + layers * per_layer):.1f}" if fits else "",
        )
    console.print(table)
    console.print(
        f"from: head {head:.2f} ms per token outside the MoE blocks and {r1['overhead']:.2f} ms "
        f"overhead per layer (the {min(measured)}-worker run), warm worker compute "
        f"{results[warm]['worker']:.2f} ms per layer (the {warm}-worker run), "
        f"{fmt_decimal(r1['link'] / layers)} per layer over the link; a token calls at most "
        f"top-{cfg.num_experts_per_tok} workers per layer, in parallel, so more machines hold "
        "a larger model in RAM rather than decode one sequence faster."
    )
