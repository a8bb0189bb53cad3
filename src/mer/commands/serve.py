"""`mer serve`: the OpenAI-compatible server over one continuous-batching scheduler."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mer.chat import ChatTemplate
from mer.commands import open_draft, open_model
from mer.errors import ConfigError
from mer.options import (
    ClusterOptions,
    IOOptions,
    SpeculationOptions,
    add_cluster_options,
    add_io_options,
    add_memory_option,
    add_speculation_options,
    count,
    port,
    positive_size,
    read_text_file,
    size,
)
from mer.units import fmt_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store directory (from `mer convert`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=port, default=8000, help="0 picks a free port")
    p.add_argument("--model-name", help="model id clients ask for (default: the store's name)")
    p.add_argument("--api-key", help="require this bearer key (or set MER_API_KEY)")
    p.add_argument("--ram-budget", type=size,
                   help="RAM for cached experts alone, e.g. 4GiB (default 4GiB)")  # fmt: skip
    add_memory_option(p)
    p.add_argument("--kv-budget", type=positive_size, default="512MiB",
                   help="RAM for the paged KV cache")  # fmt: skip
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--max-batch-tokens",
        type=count,
        default=256,
        help="tokens per forward pass (decodes first, then prompt chunks)",
    )
    p.add_argument("--max-running", type=count, default=32, help="sequences decoding together")
    p.add_argument(
        "--max-concurrent",
        type=count,
        default=64,
        help="requests accepted at once (running and queued); more get 429",
    )
    p.add_argument("--max-request-bytes", type=positive_size, default="1MiB",
                   help="largest request body")  # fmt: skip
    p.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template to use instead of the store's")  # fmt: skip
    p.add_argument("--routing-trace",
                   help="route every token as this trace (.npz) did, not by the router "
                   "(benchmarks of real routing on a store of random weights)")  # fmt: skip
    add_speculation_options(p)  # used while a request runs alone; batching takes over after
    # A batch asks for several experts per layer at once, and small reads are bound by the
    # device's latency: more reads in flight (4 -> 16) took 8 agents from 1.5x to 1.8x.
    add_io_options(p, io_threads=16)
    add_cluster_options(p)


def run(
    *,
    store: str,
    host: str,
    port: int,
    model_name: str | None,
    api_key: str | None,
    ram_budget: int | None,
    memory: int | None,
    dense_quant: str | None,
    kv_budget: int,
    dtype: str,
    max_batch_tokens: int,
    max_running: int,
    max_concurrent: int,
    max_request_bytes: int,
    io: IOOptions,
    speculation: SpeculationOptions,
    cluster: ClusterOptions,
    chat_template: str | None = None,
    routing_trace: str | None = None,
) -> None:
    from mer.serve.app import ServerSettings, serve
    from mer.trace.forced import BatchFeeder, TraceRouting
    from mer.trace.format import load_trace

    if routing_trace is not None and (speculation.draft or speculation.speculate):
        raise ConfigError(
            "--routing-trace cannot drive speculative decoding; drop --speculate and --draft"
        )

    template = None
    if chat_template is not None:  # checked before the model loads
        template = read_text_file(chat_template, "--chat-template")
        ChatTemplate(template)
    name = model_name or Path(store).resolve().name
    key = api_key or os.environ.get("MER_API_KEY")
    settings = ServerSettings(name, key, max_concurrent, max_request_bytes)
    fit = dict(kv_budget=kv_budget, pass_tokens=max_batch_tokens) if memory is not None else {}
    model = open_model(
        store, ram_budget, io, memory, dtype=dtype, dense_quant=dense_quant, **fit,
        **cluster.open_kwargs(),
    )  # fmt: skip
    if template is not None:
        model.use_chat_template(template)
    feeder = None
    if routing_trace is not None:
        routing = TraceRouting.for_model(load_trace(routing_trace), model.transformer,
                                         routing_trace, store)  # fmt: skip
        model.transformer.routing_override = routing
        feeder = BatchFeeder(routing)
    scheduler = model.scheduler(
        kv_budget,
        max_batch_tokens=max_batch_tokens,
        max_running=max_running,
        draft=open_draft(speculation, dtype),
        spec_k=speculation.spec_k,
        before_forward=feeder,
    ).start()
    pool = scheduler.pool
    kv_bytes = fmt_bytes(pool.n_blocks * pool.block_bytes)
    kv = f"{pool.n_blocks} blocks of {pool.block_size} tokens, {kv_bytes}"

    def announce(url: str) -> None:
        sys.stderr.write(f"serving {name} on {url} (KV pool {kv})\n")
        sys.stderr.flush()

    serve(model, scheduler, settings, host, port, announce=announce)
