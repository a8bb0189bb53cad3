"""`mer generate`: stream a completion from a store, then one line of measured figures."""

from __future__ import annotations

import argparse
import sys

from mer.commands import open_draft, open_model
from mer.errors import ConfigError
from mer.options import (
    ClusterOptions,
    IOOptions,
    SamplingOptions,
    SpeculationOptions,
    add_cluster_options,
    add_io_options,
    add_memory_option,
    add_sampling,
    add_speculation_options,
    read_text_file,
    size,
    text_arg,
    writable_file,
)
from mer.units import fmt_bytes, fmt_decimal


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", required=True, help="store directory (from `mer convert`)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=text_arg)
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument(
        "--chat", action="store_true", help="send the prompt as a user turn in the chat template"
    )
    p.add_argument("--ram-budget", type=size,
                   help="RAM for cached experts alone, e.g. 4GiB (default 4GiB)")  # fmt: skip
    add_memory_option(p)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--trace", help="record routing to this .npz file (see mer bench cache)")
    p.add_argument("--trace-hidden", action="store_true",
                   help="with --trace, also record the hidden state entering each MoE block "
                   "(float16; for router lookahead in mer bench predict)")  # fmt: skip
    add_speculation_options(p)
    p.add_argument("--fixed-k", action="store_true", help="do not adapt --spec-k")
    p.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate --max-tokens tokens whatever the model says (benchmarks)",
    )
    add_io_options(p)
    add_sampling(p)
    add_cluster_options(p)


def run(
    *,
    store: str,
    prompt: str | None,
    prompt_file: str | None,
    chat: bool,
    ram_budget: int | None,
    memory: int | None,
    dense_quant: str | None,
    dtype: str,
    trace: str | None,
    trace_hidden: bool,
    fixed_k: bool,
    ignore_eos: bool,
    io: IOOptions,
    sampling: SamplingOptions,
    speculation: SpeculationOptions,
    cluster: ClusterOptions,
) -> None:
    if prompt_file is not None:
        prompt = read_text_file(prompt_file, "--prompt-file")
    if not prompt:
        raise ConfigError("the prompt is empty")
    if trace_hidden and not trace:
        raise ConfigError("--trace-hidden needs --trace FILE")
    if trace:
        writable_file(trace, "--trace")
    # KV and the largest pass: the prompt's UTF-8 bytes bound its tokens (a chat template
    # adds its own text), then every token generated.
    prompt_tokens = len(prompt.encode("utf-8")) + (1024 if chat else 16)
    context = dict(context=prompt_tokens + sampling.max_tokens, pass_tokens=prompt_tokens)
    model = open_model(
        store,
        ram_budget,
        io,
        memory,
        dtype=dtype,
        dense_quant=dense_quant,
        **(context if memory is not None else {}),
        **cluster.open_kwargs(),
    )
    with model:  # reader threads joined before the interpreter exits (see `demo`)
        draft = open_draft(speculation, dtype)
        if draft is not None:
            model.speculate(draft, k=speculation.spec_k, adaptive=not fixed_k)
        recorder = model.record_trace() if trace else None
        if recorder is not None and trace_hidden:
            recorder.watch_hidden()
        run_generation(model, prompt, sampling, chat, ignore_eos)
        if draft not in (None, "self"):  # a draft model of its own: its readers too
            draft.close()
    if recorder is not None:
        recorded = recorder.trace()
        recorded.save(trace)
        sys.stderr.write(f"wrote routing trace {trace} ({recorded.n_tokens} tokens)\n")


def run_generation(
    model, prompt: str, sampling: SamplingOptions, chat: bool = False, ignore_eos: bool = False
) -> None:
    """Stream a completion to stdout, then the stats line to stderr."""
    params = sampling.params()
    if ignore_eos:
        params["stop_token_ids"] = [-1]  # no token id is -1: nothing stops it but max_tokens
    if chat:
        ids = model.chat_prompt([{"role": "user", "content": prompt}])
    else:
        ids = prompt
        sys.stdout.write(prompt)
        sys.stdout.flush()
    for piece in model.stream(ids, stop=list(sampling.stop), **params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stderr.write(stats_line(model.stats()) + "\n")


def stats_line(stats) -> str:
    g, c = stats.generation, stats.cache
    tokens = max(1, g.prompt_tokens + g.generated_tokens)
    return (
        f"prefill {rate(g.prefill_tps)} tok/s | decode {rate(g.decode_tps)} tok/s | "
        f"expert hits {100 * c.hit_rate:.1f}% ({c.hits}/{c.hits + c.misses}) | "
        f"prefetch used {c.prefetches_used}/{c.prefetches} | "
        f"read {fmt_decimal(c.bytes_read)} from SSD ({fmt_decimal(stats.bytes_read_per_token)}"
        f"/token) at {c.read_bandwidth / 1e9:.2f} GB/s | "
        f"I/O stall {1e3 * c.stall_seconds / tokens:.1f} ms/token | "
        f"cache {stats.slots} slots in {fmt_bytes(stats.budget_bytes)}"
        f"{f', {c.pinned} pinned' if c.pinned else ''} | "
        f"peak RSS {fmt_bytes(stats.peak_rss_bytes)}{target_segment(stats)}"
        + spec_segment(stats.speculation)
        + routing_segment(stats.routing)
    )


def rate(tps: float) -> str:
    """Tokens per second with 3 significant digits below 100 (a slow machine's 0.13 would
    print as 0.1)."""
    return f"{tps:.1f}" if tps >= 100 else f"{tps:.3g}"


def routing_segment(routing) -> str:
    if routing is None:
        return ""
    return (
        f" | cache-aware routing: {routing.substituted} substituted, {routing.dropped} "
        f"dropped of {routing.picks} picks"
    )


def target_segment(stats) -> str:
    if stats.memory_target is None:
        return ""
    return f" of --memory {fmt_bytes(stats.memory_target)}"


def spec_segment(spec) -> str:
    if spec is None:
        return ""
    return (
        f" | speculative: {spec.rounds} passes, {100 * spec.acceptance_rate:.0f}% of "
        f"{spec.drafted} drafts accepted, {spec.mean_accepted:.2f} tokens/pass, "
        f"{spec.plain_tokens} plain tokens, draft {spec.draft_seconds:.2f} s / verify "
        f"{spec.verify_seconds:.2f} s"
    )
