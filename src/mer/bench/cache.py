"""`mer bench cache --trace FILE`: replacement policies replayed over a routing trace.

Prints, per replay mode and cache size, each policy's misses, the bytes they
would read, and the ratios to Belady's optimum (the lower bound, computed in
the same run) and to LRU. With `--pin-share` the policies also run with the
most frequent experts pinned, and with `--prefetch PREDICTOR` they also read
that predictor's guesses `--read-steps` layers ahead (`mer.trace.prefetch`).
Pins and predictors are learned from the first part of the trace and the
replay runs on held-out sequences only (all rows, so they compare): nothing is
judged on what it learned from. With `--device-gbps` and `--step-ms` the token
replay also keeps time on such a device (`mer.trace.prefetch.Device`): the stall
per token and the tokens per second it allows. Without prefetching every miss
stalls for one read; with it, reads overlap compute only as far as the device
has bandwidth to spare.
"""

from __future__ import annotations

import math
import sys
import time
from functools import partial

from rich.console import Console
from rich.table import Table

from mer.cache.pinning import pin_capacity
from mer.errors import ConfigError
from mer.predict import catalog
from mer.progress import progress_bar
from mer.trace.format import load_trace, split_trace
from mer.trace.prefetch import PREFETCH_POLICIES, Device, plan, simulate_prefetch
from mer.trace.replay import POLICIES, accesses, frequent_keys, simulate
from mer.units import fmt_decimal


def run_cache_bench(args) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    trace = load_trace(args.trace)
    expert_bytes, priced = _expert_bytes(args.expert_bytes, trace)
    learns = bool(args.pin_share or args.prefetch)
    total = trace.n_layers * trace.n_experts
    console.print(
        f"{args.trace}: {trace.meta.get('model', 'model?')}, {trace.n_tokens} tokens in "
        f"{trace.n_sequences} sequences, {trace.n_layers} MoE layers x "
        f"{trace.n_experts} experts, top-{trace.top_k}; "
        f"expert size {fmt_decimal(expert_bytes)} ({priced})"
    )
    if learns:
        train, replay = split_trace(trace, args.held_out)
        train, replay = train.head(args.train_tokens), replay.head(args.max_tokens)
        console.print(
            f"pins and predictor learned from the first {train.n_tokens} tokens; replaying "
            f"{replay.n_tokens} held-out tokens ({replay.n_sequences} sequences)"
        )
    else:
        train, replay = None, trace.head(args.max_tokens)
    predictor = None
    device = _device(args, expert_bytes)
    read_steps = args.read_steps
    if read_steps is None:  # the latest a guess can be made and still arrive in time
        per_read = math.ceil(device.read_s / device.step_s) if device and device.step_s else 1
        read_steps = min(max(1, per_read), trace.n_layers - 1)
    if args.prefetch and not 1 <= read_steps < trace.n_layers:
        raise ConfigError(f"--read-steps must be 1..{trace.n_layers - 1} (the MoE layers "
                          f"less one), got {read_steps}")  # fmt: skip
    if args.guesses is not None and args.guesses < 1:
        raise ConfigError(f"--guesses must be at least 1, got {args.guesses}")
    if args.prefetch:
        predictor = catalog.one(
            args.prefetch, train, args.speculator, args.store, max(3, read_steps)
        )
    guesses = args.guesses or trace.top_k
    modes = ["token", "prefill"] if args.mode == "both" else [args.mode]
    pinned_at: dict[tuple[str, int], int] = {}
    for mode in modes:
        acc = accesses(replay, mode)
        sizes = args.slots or [max(acc.max_step, round(f * total)) for f in args.fractions]
        if min(sizes) < acc.max_step:
            raise ConfigError(
                f"--slots {min(sizes)} is below the {acc.max_step} experts one {mode} step "
                "uses at once; the cache must hold them all"
            )
        guess_plan = None
        if predictor is not None:
            scorer = partial(predictor.scores, replay)  # (layer, distance) -> scores
            guess_plan = plan(replay, mode, scorer, read_steps, guesses)
        runs = _runs(args.pin_share > 0, guess_plan is not None)
        table = Table(title=f"replay by {mode}: {len(acc.keys)} expert accesses")
        prefetching = guess_plan is not None
        timed = device is not None and mode == "token"  # a prefill step's compute varies
        cols = ["slots", "policy", "misses", "prefetched", "used", "reads", "read", "÷belady",
                "reads÷belady", "÷lru", "stall ms/tok", "tok/s", "s"]  # fmt: skip
        if not prefetching:  # every read is a miss: the prefetch columns would say nothing
            cols = [c for c in cols if c not in ("prefetched", "used", "reads", "reads÷belady")]
        if not timed:
            cols = [c for c in cols if c not in ("stall ms/tok", "tok/s")]
        for col in cols:
            table.add_column(col, justify="right")
        with progress_bar(len(sizes) * len(runs), f"replay {mode}", unit="runs") as bar:
            for slots in sizes:
                pins = ()
                if args.pin_share:
                    n = pin_capacity(slots, args.pin_share, acc.max_step)
                    pins = frequent_keys(accesses(train, mode), n)
                    pinned_at[mode, slots] = len(pins)
                results = {}
                for policy, pinned, prefetching in runs:
                    t0 = time.perf_counter()
                    use = pins if pinned else ()
                    if prefetching:
                        timer = device if timed else None
                        r = simulate_prefetch(acc, policy, slots, guess_plan, use, timer)
                        got = (r.misses, r.prefetches, r.useful, r.stall_s)
                    else:
                        misses = simulate(acc, policy, slots, use)
                        # No prefetching: each miss waits for its read on an idle device.
                        got = (misses, 0, 0, misses * device.read_s if timed else None)
                    name = policy + "+pin" * pinned + "+pf" * prefetching
                    results[name] = (*got, time.perf_counter() - t0)
                    bar.advance()
                best, lru = results["belady"][0], results["lru"][0]
                tokens = replay.n_tokens
                for i, (name, result) in enumerate(results.items()):
                    misses, prefetched, used, stall, secs = result
                    reads = misses + prefetched
                    wall = len(acc.step_layer) * device.step_s + stall if timed else 0.0
                    pf = "+pf" in name
                    cells = {
                        "slots": f"{slots} ({100 * slots / total:.0f}%)" if i == 0 else "",
                        "policy": name,
                        "misses": str(misses),
                        "prefetched": str(prefetched) if pf else "",
                        "used": str(used) if pf else "",
                        "reads": str(reads),
                        "read": fmt_decimal(reads * expert_bytes),
                        "÷belady": f"{misses / best:.2f}",
                        "reads÷belady": f"{reads / best:.2f}",
                        "÷lru": f"{misses / lru:.2f}",
                        "stall ms/tok": f"{1e3 * stall / tokens:.1f}" if timed else "",
                        "tok/s": f"{tokens / wall:.2f}" if timed and wall else "",
                        "s": f"{secs:.1f}",
                    }
                    table.add_row(*(cells[c] for c in cols))
                table.add_section()
        console.print(table)
    notes = [
        "misses: demand misses (the step waits for the read); read: the bytes of all reads; "
        "÷belady: misses over Belady's (the fewest reads possible)"
    ]
    if pinned_at:
        at = ", ".join(f"{n} at {slots} slots by {mode}" for (mode, slots), n in pinned_at.items())
        notes.append(f"+pin: the most frequent experts of the first part pinned ({at})")
    if device is not None:
        notes.append(
            f"timed (token replay): one read at a time at {args.device_gbps:g} GB/s "
            f"({1e3 * device.read_s:.2f} ms per expert), {args.step_ms:g} ms of compute per MoE "
            "layer step; stall: time steps waited for reads; Belady's is its misses' reads, "
            "which prefetching can hide"
        )
    if predictor is not None:
        notes.append(
            f"+pf: prefetching the {guesses} best guesses of {args.prefetch}, {read_steps} "
            "MoE layer(s) ahead; used: prefetched experts used before eviction (the rest were "
            "wasted reads); reads: misses + prefetches"
        )
    console.print("; ".join(notes) + ".")


def _device(args, expert_bytes: int) -> Device | None:
    """The device and step time of --device-gbps and --step-ms, if given."""
    if args.device_gbps is None and args.step_ms is None:
        return None
    if args.device_gbps is None or args.step_ms is None:
        raise ConfigError("--device-gbps and --step-ms go together (the device and the model)")
    if args.device_gbps <= 0 or args.step_ms < 0:
        raise ConfigError(
            f"--device-gbps must be positive and --step-ms not negative, got "
            f"{args.device_gbps:g} and {args.step_ms:g}"
        )
    return Device(expert_bytes / (args.device_gbps * 1e9), args.step_ms / 1e3)


# One int4 expert of DeepSeek-V2-Lite (the shared trace's model): 3 x 2048 x 1408 weights.
DEEPSEEK_V2_LITE_EXPERT = 4_595_712


def _expert_bytes(given: int | None, trace) -> tuple[int, str]:
    """Bytes one expert read costs, and where the figure comes from."""
    if given is not None:
        if given < 1:
            raise ConfigError(f"--expert-bytes must be positive, got {given}")
        return given, "--expert-bytes"
    if recorded := trace.meta.get("expert_bytes"):
        return int(recorded), "recorded with the trace"
    return DEEPSEEK_V2_LITE_EXPERT, "DeepSeek-V2-Lite's in int4; --expert-bytes to change"


def _runs(pin: bool, prefetch: bool) -> list[tuple[str, bool, bool]]:
    """(policy, pinned, prefetching) to replay: every policy plain, then the variants."""
    runs = [(p, False, False) for p in POLICIES]
    if pin:
        runs += [(p, True, False) for p in POLICIES if p != "belady"]
    if prefetch:
        runs += [(p, False, True) for p in PREFETCH_POLICIES]
        if pin:
            runs += [(p, True, True) for p in PREFETCH_POLICIES]
    return runs
