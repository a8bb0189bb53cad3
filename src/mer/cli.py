"""`mer` command line: parses arguments and dispatches to each part's entry point.

Nothing here computes anything a Python user could not get from the same
functions; errors meant for users (MerError) print as one line and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mer.cache.policy import POLICIES
from mer.errors import ConfigError, MerError
from mer.units import fmt_bytes, fmt_decimal

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MER_CACHE_DIR", Path.home() / ".cache" / "mer"))


def stats_line(stats) -> str:
    g, c = stats.generation, stats.cache
    tokens = max(1, g.prompt_tokens + g.generated_tokens)
    return (
        f"prefill {g.prefill_tps:.1f} tok/s | decode {g.decode_tps:.1f} tok/s | "
        f"expert hits {100 * c.hit_rate:.1f}% ({c.hits}/{c.hits + c.misses}) | "
        f"prefetch used {c.prefetches_used}/{c.prefetches} | "
        f"read {fmt_decimal(c.bytes_read)} from SSD ({fmt_decimal(stats.bytes_read_per_token)}"
        f"/token) at {c.read_bandwidth / 1e9:.2f} GB/s | "
        f"I/O stall {1e3 * c.stall_seconds / tokens:.1f} ms/token | "
        f"cache {stats.slots} slots in {fmt_bytes(stats.budget_bytes)}"
        f"{f', {c.pinned} pinned' if c.pinned else ''} | "
        f"peak RSS {fmt_bytes(stats.peak_rss_bytes)}" + spec_segment(stats.speculation)
    )


def spec_segment(spec) -> str:
    if spec is None:
        return ""
    return (
        f" | speculative: {spec.rounds} passes, {100 * spec.acceptance_rate:.0f}% of "
        f"{spec.drafted} drafts accepted, {spec.mean_accepted:.2f} tokens/pass, "
        f"{spec.plain_tokens} plain tokens, draft {spec.draft_seconds:.2f} s / verify "
        f"{spec.verify_seconds:.2f} s"
    )


def run_generation(model, prompt: str, args) -> None:
    """Stream a completion to stdout, then the stats line to stderr."""
    sampling = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if getattr(args, "chat", False):
        ids = model.chat_prompt([{"role": "user", "content": prompt}])
    else:
        ids = prompt
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for piece in model.stream(ids, stop=args.stop, **sampling):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    err.print(stats_line(model.stats()), style="bold")


def open_with_io_options(store, ram_budget, args, **kw):
    """mer.open with the reader options every generating command takes (add_io_options)."""
    import mer.api

    return mer.api.open(
        store,
        ram_budget,
        direct_io=not args.no_direct_io,
        io_threads=args.io_threads,
        prefetch=not args.no_prefetch,
        cache_policy=args.cache_policy,
        pin_share=getattr(args, "pin_share", 0.0),
        pin_file=getattr(args, "pin_file", None),
        compute_threads=args.threads,
        **kw,
    )


def cmd_generate(args) -> None:
    model = open_with_io_options(args.store, args.ram_budget, args, dtype=args.dtype)
    draft = open_draft(args, args.dtype)
    if draft is not None:
        model.speculate(draft, k=args.spec_k, adaptive=not args.fixed_k)
    recorder = model.record_trace() if args.trace else None
    if recorder is not None and args.trace_hidden:
        recorder.watch_hidden(model.transformer)
    run_generation(model, args.prompt, args)
    if recorder is not None:
        trace = recorder.trace()
        trace.save(args.trace)
        err.print(f"wrote routing trace {args.trace} ({trace.n_tokens} tokens)")


def cmd_serve(args) -> None:
    from mer.serve.app import ServerSettings, serve
    from mer.units import parse_bytes

    try:
        max_body = parse_bytes(args.max_request_bytes)
    except ValueError as e:
        raise MerError(f"--max-request-bytes: {e}") from None
    name = args.model_name or Path(args.store).resolve().name
    settings = ServerSettings(
        name, args.api_key or os.environ.get("MER_API_KEY"), args.max_concurrent, max_body
    )
    model = open_with_io_options(args.store, args.ram_budget, args, dtype=args.dtype)
    scheduler = model.scheduler(
        args.kv_budget,
        max_batch_tokens=args.max_batch_tokens,
        max_running=args.max_running,
        draft=open_draft(args, args.dtype),
        spec_k=args.spec_k,
    ).start()
    pool = scheduler.pool
    kv_bytes = fmt_bytes(pool.n_blocks * pool.block_bytes)
    kv = f"{pool.n_blocks} blocks of {pool.block_size} tokens, {kv_bytes}"
    serve(
        model, scheduler, settings, args.host, args.port,
        announce=lambda url: err.print(f"serving {name} on {url} (KV pool {kv})"),
    )  # fmt: skip


def cmd_convert(args) -> None:
    from mer.store.convert import convert

    dst = convert(args.src, args.dst, args.quant, args.group_size, force=args.force)
    err.print(f"wrote {dst}")


def cmd_info(args) -> None:
    from mer.store.reader import Store

    s = Store(args.store)
    cfg, ef = s.config, s.expert_format
    t = Table(title=str(s.path), show_header=False)
    t.add_row("architecture", cfg.model_type)
    t.add_row("layers", str(cfg.num_hidden_layers))
    t.add_row("experts", f"{cfg.num_local_experts} per layer, top-{cfg.num_experts_per_tok}")
    t.add_row("hidden / ffn", f"{cfg.hidden_size} / {cfg.intermediate_size}")
    t.add_row("heads", f"{cfg.num_attention_heads} query, {cfg.num_key_value_heads} key/value")
    t.add_row("vocab", str(cfg.vocab_size))
    t.add_row("context", str(cfg.max_position_embeddings))
    scheme = ef.scheme + (f", group {ef.group_size}, {ef.layout}" if ef.scheme == "int4" else "")
    t.add_row("expert quantization", scheme)
    t.add_row("expert extent", fmt_bytes(ef.nbytes))
    t.add_row("experts total", f"{len(s.extents)} = {fmt_bytes(s.expert_bytes_total)}")
    t.add_row("dense weights", fmt_bytes(s.manifest["dense"]["nbytes"]))
    t.add_row("format version", str(s.manifest["format_version"]))
    out.print(t)


def cmd_synth(args) -> None:
    from mer.synth.checkpoint import OVERRIDE_FLAGS, hf_config, write_hf_checkpoint

    overrides = {
        hf: getattr(args, flag) for flag, hf in OVERRIDE_FLAGS.items() if getattr(args, flag)
    }
    cfg = hf_config(args.preset, **overrides)
    if args.store:
        from mer.synth.store import write_random_store

        path = write_random_store(args.out, cfg, args.quant, args.group_size, seed=args.seed)
    else:
        import torch

        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
        path = write_hf_checkpoint(Path(args.out), cfg, dtype=dtype, seed=args.seed)
    err.print(f"wrote {path}")


def cmd_train_speculator(args) -> None:
    from mer.predict.training import train_from_traces

    train_from_traces(args)


def cmd_demo(args) -> None:
    from mer.demo import run_demo

    run_demo(cache_dir() / "demo", args)


def cmd_bench(args) -> None:
    if args.what == "kernel":
        from mer.bench.kernel import run_kernel_bench

        run_kernel_bench(args)
    elif args.what == "io":
        from mer.bench.io import run_io_bench

        run_io_bench(args)
    elif args.what == "cache":
        from mer.bench.cache import run_cache_bench

        run_cache_bench(args)
    elif args.what == "routing":
        from mer.bench.routing import run_routing_stats

        run_routing_stats(args)
    elif args.what == "predict":
        from mer.bench.predict import run_predict_bench

        run_predict_bench(args)
    elif args.what == "spec":
        from mer.bench.spec import run_spec_bench
        from mer.demo import draft_store, trained_store

        if not args.store:
            args.store = trained_store(cache_dir() / "demo")
            args.draft = args.draft or draft_store(cache_dir() / "demo")
        run_spec_bench(args)
    elif args.what == "serve":
        from mer.bench.serve import run_serve_bench
        from mer.demo import trained_store

        if not args.url:
            args.store = args.store or trained_store(cache_dir() / "demo")
        run_serve_bench(args)


def add_io_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--io-threads", type=int, default=4, help="expert reader threads")
    p.add_argument("--threads", type=int,
                   help="compute threads (default: 1 below hidden 2048, else all)")  # fmt: skip
    p.add_argument("--no-prefetch", action="store_true", help="read experts only on demand")
    p.add_argument("--no-direct-io", action="store_true", help="read through the page cache")
    p.add_argument("--cache-policy", choices=POLICIES, default="lru",
                   help="eviction policy (see mer bench cache)")  # fmt: skip
    p.add_argument("--pin-share", type=float, default=0.0,
                   help="share of the budget (0..0.9) for experts pinned in RAM: the most used "
                   "so far, or those of --pin-file (default 0: no pinning)")  # fmt: skip
    p.add_argument("--pin-file",
                   help="experts to pin: JSON list of [layer, expert], or a trace .npz whose "
                   "most frequent experts fill --pin-share")  # fmt: skip


def add_split_options(p: argparse.ArgumentParser, max_tokens: int) -> None:
    """How a trace is split into a part to learn from and held-out sequences to judge on."""
    p.add_argument(
        "--held-out",
        type=float,
        default=0.5,
        help="share of the trace's sequences held out, the last ones (default 0.5)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=max_tokens,
        help="judge on the first N held-out tokens (whole sequences)",
    )
    p.add_argument("--train-tokens", type=int, default=20000,
                   help="learn from the first N tokens of the other part")  # fmt: skip


def add_speculation_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", action="store_true",
                   help="self-speculative decoding: drafts route to experts already in RAM")
    p.add_argument("--draft", help="speculative decoding with this smaller store as the draft")
    p.add_argument("--draft-ram-budget", default="256MiB", help="expert cache of the draft")
    p.add_argument("--spec-k", type=int, default=4, help="tokens drafted per verification")


def open_draft(args, dtype: str):
    """The draft the speculation options ask for: "self", an opened Model, or None."""
    if args.draft:
        import mer.api

        return mer.api.open(args.draft, args.draft_ram_budget, dtype=dtype)
    return "self" if args.speculate else None


def add_sampling(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mer", description="Run Mixture-of-Experts models with experts streamed from an SSD."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a store")
    p.add_argument("--store", required=True, help="store directory (from `mer convert`)")
    p.add_argument("--prompt", required=True)
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user turn in the chat template"
    )
    p.add_argument("--ram-budget", default="4GiB", help="RAM for cached experts, e.g. 4GiB")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--trace", help="record routing to this .npz file (see mer bench cache)")
    add_speculation_options(p)
    p.add_argument("--fixed-k", action="store_true", help="do not adapt --spec-k")
    p.add_argument("--trace-hidden", action="store_true",
                   help="with --trace, also record the hidden state entering each MoE block "
                   "(float16; for router lookahead in mer bench predict)")  # fmt: skip
    add_io_options(p)
    add_sampling(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    p.add_argument("--store", required=True, help="store directory (from `mer convert`)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="model id clients ask for (default: the store's name)")
    p.add_argument("--api-key", help="require this bearer key (or set MER_API_KEY)")
    p.add_argument("--ram-budget", default="4GiB", help="RAM for cached experts, e.g. 4GiB")
    p.add_argument("--kv-budget", default="512MiB", help="RAM for the paged KV cache")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=256,
        help="tokens per forward pass (decodes first, then prompt chunks)",
    )
    p.add_argument("--max-running", type=int, default=32, help="sequences decoding together")
    p.add_argument(
        "--max-concurrent",
        type=int,
        default=64,
        help="requests accepted at once (running and queued); more get 429",
    )
    p.add_argument("--max-request-bytes", default="1MiB", help="largest request body")
    add_speculation_options(p)  # used while a request runs alone; batching takes over after
    add_io_options(p)
    # A batch asks for several experts per layer at once, and small reads are bound by the
    # device's latency: more reads in flight (4 -> 16) took 8 agents from 1.5x to 1.8x.
    p.set_defaults(func=cmd_serve, io_threads=16)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to a store")
    p.add_argument("src", help="Hugging Face checkpoint directory")
    p.add_argument("dst", help="store directory to create")
    p.add_argument("--quant", default="int4", choices=["int4", "int8", "bf16"])
    p.add_argument(
        "--group-size",
        type=int,
        help="int4 group size: 32, 64, 128 or 256 (default 128 or the "
        "largest that divides the model's dims)",
    )
    p.add_argument("--force", action="store_true", help="replace dst if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("synth", help="write a synthetic Mixtral checkpoint (or store)")
    p.add_argument("out", help="directory to create")
    p.add_argument("--preset", default="tiny")
    for flag in ("layers", "experts", "top_k", "hidden", "ffn", "heads", "kv_heads", "vocab"):
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=int)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", action="store_true", help="write a random int4 store directly")
    p.add_argument("--quant", default="int4", choices=["int4"], help="with --store")
    p.add_argument("--group-size", type=int, help="with --store (default as for convert)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("demo", help="convert the bundled model and generate with experts on disk")
    p.add_argument("--ram-budget", help="default 1MiB (bundled model) or 96MiB (--preset)")
    p.add_argument(
        "--prompt", default='def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
    )
    p.add_argument("--preset", help="run a synthetic model of this shape instead (see mer synth)")
    add_io_options(p)
    add_sampling(p, max_tokens=48)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-speculator", help="train the learned expert predictor on traces")
    p.add_argument(
        "--trace",
        required=True,
        action="append",
        help="routing trace (.npz; repeatable, all of one model)",
    )
    p.add_argument("--out", required=True, help="file to write (.pt)")
    p.add_argument(
        "--held-out",
        type=float,
        default=0.5,
        help="share of each trace's sequences left out for mer bench predict, the "
        "last ones (default 0.5, as there; 0 trains on everything)",
    )
    p.add_argument(
        "--train-tokens",
        type=int,
        default=20000,
        help="train on the first N tokens of each trace's training part",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256, help="MLP width")
    p.add_argument("--window", type=int, default=3, help="MoE layers of routing it sees")
    p.add_argument("--max-distance", type=int, default=3, help="layers ahead it predicts")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_speculator)

    p = sub.add_parser("bench", help="benchmarks")
    bsub = p.add_subparsers(dest="what", required=True)
    b = bsub.add_parser("kernel", help="int4 expert FFN vs memory bandwidth")
    b.add_argument("--hidden", type=int, default=4096)
    b.add_argument("--ffn", type=int, default=14336)
    b.add_argument("--group-size", type=int, default=128)
    b.add_argument("--batch", type=int, action="append", help="token counts (repeatable)")
    b.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    b = bsub.add_parser("io", help="expert reads vs the device, and decode stall")
    b.add_argument("--store", required=True)
    b.add_argument("--seconds", type=float, default=3.0, help="time per bandwidth measurement")
    b.add_argument("--threads", type=int, action="append", help="engine threads (repeatable)")
    b.add_argument("--ram-budget", help="for the decode run (default: a third of the experts)")
    b.add_argument("--tokens", type=int, default=32, help="decode tokens per run")
    b.add_argument("--io-threads", type=int, default=4, help="reader threads for decoding")
    b = bsub.add_parser("cache", help="replay a routing trace through cache policies")
    b.add_argument("--trace", required=True, help="routing trace (.npz)")
    b.add_argument("--slots", type=int, action="append", help="cache sizes in experts")
    b.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                   help="cache sizes as fractions of all experts (without --slots)")  # fmt: skip
    b.add_argument("--mode", choices=["token", "prefill", "both"], default="both")
    b.add_argument("--max-tokens", type=int, default=5000, help="replay the first N tokens")
    b.add_argument("--expert-bytes", type=int,
                   help="bytes per expert read (default: the trace's own, recorded by mer; "
                   "else DeepSeek-V2-Lite's in int4)")  # fmt: skip
    b.add_argument(
        "--pin-share",
        type=float,
        default=0.0,
        help="also replay with this share of the slots pinned to the experts most "
        "frequent in the trace's first part (replay then runs on the rest)",
    )
    b.add_argument(
        "--prefetch",
        choices=["frequency", "markov", "speculator", "lookahead", "ensemble"],
        help="also replay with this predictor's guesses prefetched "
        "(learned on the trace's first part; replay then runs on the rest)",
    )
    b.add_argument(
        "--read-steps",
        type=int,
        help="read time of one expert in layer-steps: prefetches are guessed this "
        "many MoE layers ahead, the latest that still arrives in time (default 1, or "
        "with --device-gbps the read time over --step-ms)",
    )
    b.add_argument(
        "--device-gbps",
        type=float,
        help="also time the token replay on a device reading this many GB/s, one read at "
        "a time, with --step-ms of compute per MoE layer: stall per token and tok/s",
    )
    b.add_argument(
        "--step-ms",
        type=float,
        help="compute time of one MoE layer of one token, in ms (with --device-gbps)",
    )
    b.add_argument("--guesses", type=int, help="experts prefetched per step (default top-k)")
    b.add_argument("--speculator", help="a trained speculator, for --prefetch speculator")
    b.add_argument("--store", help="the traced model's store, for --prefetch lookahead")
    b.add_argument(
        "--held-out",
        type=float,
        default=0.5,
        help="with pins or prefetch: share of sequences replayed, the last ones",
    )
    b.add_argument(
        "--train-tokens",
        type=int,
        default=20000,
        help="with pins or prefetch: learn from the first N tokens of the rest",
    )
    b = bsub.add_parser("routing", help="routing statistics of a trace")
    b.add_argument("--trace", required=True, help="routing trace (.npz)")
    b = bsub.add_parser("predict", help="expert predictors' recall on held-out sequences")
    b.add_argument("--trace", required=True, help="routing trace (.npz)")
    b.add_argument("--speculator", help="a trained speculator (mer train-speculator)")
    b.add_argument("--store", help="the store the trace was recorded from, for lookahead "
                   "(the trace needs hidden states: mer generate --trace-hidden)")  # fmt: skip
    add_split_options(b, max_tokens=5000)
    b = bsub.add_parser("spec", help="speculative decoding (draft model, self) vs plain")
    b.add_argument("--store", help="target store (default: the bundled trained model)")
    b.add_argument("--draft", help="draft store (default with the bundled model: its draft)")
    b.add_argument("--budgets", nargs="+", default=["1MiB", "4MiB"], help="RAM budgets")
    b.add_argument("--draft-ram-budget", default="64MiB")
    b.add_argument("--prompts", type=int, default=4)
    b.add_argument("--max-tokens", type=int, default=64)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--spec-k", type=int, default=4)
    b.add_argument("--io-threads", type=int, default=4)
    b = bsub.add_parser("serve", help="simulated agents: batched serving vs one at a time")
    b.add_argument("--store", help="store to serve (default: the bundled trained model)")
    b.add_argument("--url", help="benchmark a running server (http://host:port) instead")
    b.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8],
                   help="agent counts to run (each against its own baseline)")  # fmt: skip
    b.add_argument("--turns", type=int, default=4, help="tool calls per agent")
    b.add_argument("--max-tokens", type=int, default=24, help="tokens per generated tool call")
    b.add_argument("--think", type=float, default=0.2, help="mean think time between turns (s)")
    b.add_argument("--ram-budget", default="1MiB", help="expert cache of the server")
    b.add_argument("--kv-budget", default="64MiB", help="KV cache of the server")
    b.add_argument("--max-batch-tokens", type=int, default=256)
    b.add_argument("--cache-policy", choices=POLICIES, default="lru",
                   help="expert cache policy of the server")  # fmt: skip
    b.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                   help="further `mer serve` options, passed as they are (last)")  # fmt: skip
    b.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_bench)
    return parser


# Options that count something (tokens, threads, agents, widths): wherever a command has
# one, zero or less is a mistake, refused before any work starts.
COUNTS = (
    "agents", "batch", "epochs", "ffn", "group_size", "hidden", "io_threads", "max_batch_tokens",
    "max_concurrent", "max_distance", "max_running", "max_tokens", "prompts", "spec_k",
    "threads", "tokens", "turns", "window",
)  # fmt: skip


def check_counts(args: argparse.Namespace) -> None:
    for name in COUNTS:
        value = getattr(args, name, None)
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v < 1:
                flag = "--" + name.replace("_", "-")
                raise ConfigError(f"{flag} must be at least 1, got {v}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_counts(args)
        args.func(args)
    except MerError as e:
        err.print(f"error: {e}", style="red", markup=False)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
