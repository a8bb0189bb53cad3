"""`mer bench serve`: simulated agents against a real `mer serve`, batched and one at a time.

For each agent count N the same N agent sessions (think time included) run
twice, each against a fresh server process (cold expert cache, empty prefix
cache): once against a server that runs one request at a time
(`--max-running 1`: the others queue, as on a server without batching), and
once with continuous batching. The table gives aggregate tok/s, TTFT and time
per output token (p50/p99), SSD bytes per generated token, the dedup factor
(sequences served per expert acquisition) and the prefix-cache hit rate, with
the ratios of the batched run to the one-at-a-time run. With `--routing-trace` the
servers route every token as the trace did (`mer serve --routing-trace`): a store of
random weights then reads, caches and batches experts as the traced model would.

The agents call tools (`mer.bench.agents`): a store whose chat template takes no
tools (the bundled model's) is served with `TOOLS_TEMPLATE` (`--chat-template`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from mer.bench.agents import TOOLS_TEMPLATE, AgentResult, Session, make_sessions, run_agent
from mer.chat import ChatTemplate
from mer.errors import ConfigError, MerError
from mer.options import POLICIES, count, natural, number, size_text
from mer.progress import progress_bar
from mer.serve.local import LocalServer, connect, read_metrics
from mer.store.reader import Store
from mer.units import fmt_decimal

MODEL = "bench"


@dataclass
class RunResult:
    wall: float
    agents: list[AgentResult]
    metrics: dict[str, float]  # server counters accumulated during the run

    @property
    def timings(self):
        return [t for a in self.agents for t in a.timings]

    @property
    def generated(self) -> int:
        return sum(t.completion_tokens for t in self.timings)

    @property
    def tool_calls(self) -> int:
        return sum(a.tool_calls for a in self.agents)

    @property
    def tok_per_s(self) -> float:
        return self.generated / self.wall

    @property
    def dedup(self) -> float:
        m = self.metrics
        return m["mer_expert_demand_total"] / max(1.0, m["mer_expert_acquired_total"])

    @property
    def bytes_per_token(self) -> float:
        return self.metrics["mer_ssd_read_bytes_total"] / max(1, self.generated)

    def pct(self, what: str, q: float) -> float:
        values = [getattr(t, what) for t in self.timings if getattr(t, what) is not None]
        return float(np.percentile(values, q)) if values else float("nan")


class RunningServer:
    """A server someone else started (`--url`): nothing to start or stop."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")

    def metrics(self) -> dict[str, float]:
        return read_metrics(self.url)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        pass


def run_workload(server, model: str, context: int, sessions: list[Session], gate, bar):
    with server:
        before = server.metrics()
        results: list[AgentResult | None] = [None] * len(sessions)
        errors: list[BaseException] = []

        def play(i: int) -> None:
            try:
                results[i] = run_agent(server.url, model, sessions[i], context, gate)
            except BaseException as e:  # reported after the run
                errors.append(e)
            bar.advance(len(sessions[i].turns))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=play, args=(i,)) for i in range(len(sessions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        after = server.metrics()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    return RunResult(wall, results, delta)


def _remote_model(url: str) -> tuple[str, int]:
    conn = connect(url)
    conn.request("GET", "/v1/models")
    resp = conn.getresponse()
    body = resp.read()
    if resp.status != 200:
        raise MerError(f"{url}/v1/models answered {resp.status}: {body[:200]!r}")
    card = json.loads(body)["data"][0]
    return card["id"], int(card.get("max_model_len", 2048))


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="store to serve (default: the bundled trained model)")
    b.add_argument("--url", help="benchmark a running server (http://host:port) instead")
    b.add_argument("--agents", type=count, nargs="+", default=[1, 4, 8],
                   help="agent counts to run (each against its own baseline)")  # fmt: skip
    b.add_argument("--turns", type=count, default=4, help="tool calls per agent")
    b.add_argument("--max-tokens", type=count, default=48, help="tokens per generated tool call")
    b.add_argument("--think", type=number(0), default=0.2,
                   help="mean think time between turns (s)")  # fmt: skip
    b.add_argument("--ram-budget", type=size_text, default="1MiB",
                   help="expert cache of the server")  # fmt: skip
    b.add_argument("--memory", type=size_text,
                   help="the server's whole-process target instead of --ram-budget")  # fmt: skip
    b.add_argument("--kv-budget", type=size_text, default="64MiB", help="KV cache of the server")
    b.add_argument("--max-batch-tokens", type=count, default=256)
    b.add_argument("--cache-policy", choices=POLICIES, default="lru",
                   help="expert cache policy of the server")  # fmt: skip
    b.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="further `mer serve` options, passed as they are (last)")  # fmt: skip
    b.add_argument("--seed", type=natural, default=0)
    b.add_argument("--routing-trace",
                   help="the servers route every token as this trace (.npz) did (its shape "
                   "must be the store's)")  # fmt: skip


def run(
    *,
    store: str | None,
    url: str | None,
    agents: list[int],
    turns: int,
    max_tokens: int,
    think: float,
    ram_budget: str,
    kv_budget: str,
    max_batch_tokens: int,
    cache_policy: str,
    server_args: list[str],
    seed: int,
    memory: str | None = None,
    routing_trace: str | None = None,
) -> None:
    if not url and not store:
        from mer.data import trained_store

        store = str(trained_store())
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
    budget = ["--memory", memory] if memory else ["--ram-budget", ram_budget]
    options = [*budget, "--kv-budget", kv_budget]
    options += ["--max-batch-tokens", str(max_batch_tokens)]
    options += ["--cache-policy", cache_policy, "--model-name", MODEL, *server_args]
    if routing_trace is not None:
        from mer.trace.forced import check_trace_shape  # torch: only when asked for
        from mer.trace.format import load_trace

        if url:
            raise ConfigError("--routing-trace with --url: start that server with "
                              "`mer serve --routing-trace` instead")  # fmt: skip
        check_trace_shape(load_trace(routing_trace), Store(store).config, routing_trace, store)
        options = ["--routing-trace", str(routing_trace), *options]
    if url:
        model, context = _remote_model(url)
        console.print(
            f"server {url} ({model}): one at a time = the agents' requests take turns "
            f"client-side; the server's caches stay warm between runs"
        )
    else:
        opened = Store(store)
        model, context = MODEL, opened.config.max_position_embeddings
        if not ChatTemplate.from_dir(opened.path).takes_tools:
            scratch = tempfile.TemporaryDirectory(prefix="mer-bench-")
            template = Path(scratch.name) / "tools.jinja"  # removed with `scratch` as run() returns
            template.write_text(TOOLS_TEMPLATE)
            options += ["--chat-template", str(template)]
        console.print(
            f"store {store}: experts {fmt_decimal(opened.expert_bytes_total)} on disk, "
            f"{f'memory {memory}' if memory else f'RAM budget {ram_budget}'} ({cache_policy}), "
            f"KV budget {kv_budget}" + (f", routing from {routing_trace}" if routing_trace else "")
        )
    console.print(
        f"{turns} turns per agent, {max_tokens} tokens per tool call, think "
        f"{think:.2f} s on average"
    )

    def server(one_at_a_time: bool):
        if url:
            return RunningServer(url)
        return LocalServer(store, *options, *(["--max-running", "1"] * one_at_a_time))

    table = Table(title="agent workload: one request at a time vs continuous batching")
    cols = ["agents", "mode", "reqs", "calls", "tokens", "wall s", "tok/s", "TTFT ms p50/p99"]
    cols += ["TPOT ms p50/p99", "prefill/tok", "busy", "reads/tok", "SSD/tok", "dedup"]
    cols += ["prefix hit", "tok/s", "SSD"]
    for col in cols:
        table.add_column(col, justify="right")
    total = sum(2 * n * turns for n in agents)
    with progress_bar(total, "agent turns", unit="requests") as bar:
        for n in agents:
            sessions = make_sessions(n, turns, seed=seed, max_tokens=max_tokens, think=think)
            gate = threading.Lock() if url else None  # one at a time, client-side
            base = run_workload(server(True), model, context, sessions, gate, bar)
            conc = run_workload(server(False), model, context, sessions, None, bar)
            for mode, r in (("1 at a time", base), ("batched", conc)):
                m = r.metrics
                queried = m["mer_prefix_cache_query_tokens_total"]
                reused = m["mer_prefix_cache_hit_tokens_total"]
                hit = reused / max(1, queried)
                is_conc = r is conc
                table.add_row(
                    str(n),
                    mode,
                    str(len(r.timings)),
                    str(r.tool_calls),
                    str(r.generated),
                    f"{r.wall:.1f}",
                    f"{r.tok_per_s:.1f}",
                    f"{1e3 * r.pct('ttft', 50):.0f}/{1e3 * r.pct('ttft', 99):.0f}",
                    f"{1e3 * r.pct('tpot', 50):.0f}/{1e3 * r.pct('tpot', 99):.0f}",
                    f"{(queried - reused) / max(1, r.generated):.1f}",
                    f"{100 * m['mer_engine_busy_seconds_total'] / r.wall:.0f}%",
                    f"{m['mer_expert_reads_total'] / max(1, r.generated):.2f}",
                    fmt_decimal(r.bytes_per_token),
                    f"{r.dedup:.2f}",
                    f"{100 * hit:.0f}%",
                    f"x{conc.tok_per_s / base.tok_per_s:.2f}" if is_conc else "",
                    f"/{base.bytes_per_token / conc.bytes_per_token:.2f}" if is_conc else "",
                )
    console.print(table)
    console.print(
        "Each request carries three tool schemas with tool_choice required; calls: the "
        "turns answered with a whole call (its result goes back as a tool message). "
        "1 at a time: one request runs at a time (the server's --max-running 1, or with "
        "--url client-side turns), the others queue; batched: continuous batching. Both serve "
        "the same N agents, think time included. prefill/tok: prompt tokens computed (not "
        "reused from the prefix cache) per generated token; busy: share of the wall time the "
        "engine spent in forward passes. reads/tok and SSD/tok: expert reads (demand "
        "and prefetch) and their bytes per generated token, prefill included; dedup: "
        "sequences served per expert acquisition. Last two columns: the batched run's tok/s "
        "over the 1-at-a-time run's (x), and by what it divides SSD bytes per token (/)."
    )
