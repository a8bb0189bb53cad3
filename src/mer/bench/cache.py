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
per token and the tokens per second it allows; with `--expert-ms` (compute per
expert, part of the step) a layer's reads overlap its resident experts' compute, as
in the engine. Without it every miss stalls for one read; with prefetching, reads
overlap compute only as far as the device has bandwidth to spare.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from functools import partial

from rich.console import Console
from rich.table import Table

from mer.cache.pinning import pin_capacity
from mer.errors import ConfigError
from mer.options import count, number
from mer.predict import catalog
from mer.progress import progress_bar
from mer.trace.format import load_trace, split_trace
from mer.trace.prefetch import PREFETCH_POLICIES, Device, no_plan, plan, simulate_prefetch
from mer.trace.replay import POLICIES, accesses, frequent_keys, simulate
from mer.units import fmt_decimal


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--trace", dest="trace_path", required=True, help="routing trace (.npz)")
    b.add_argument(
        "--slots", dest="slot_counts", type=count, action="append", help="cache sizes in experts"
    )
    b.add_argument("--fractions", type=number(0, 1, lo_open=True), nargs="+", default=[0.25, 0.5],
                   help="cache sizes as fractions of all experts (without --slots)")  # fmt: skip
    b.add_argument("--mode", choices=["token", "prefill", "both"], default="both")
    b.add_argument("--max-tokens", type=count, default=5000, help="replay the first N tokens")
    b.add_argument("--expert-bytes", type=count,
                   help="bytes per expert read (default: the trace's own, recorded by mer; "
                   "else DeepSeek-V2-Lite's in int4)")  # fmt: skip
    b.add_argument(
        "--pin-share",
        type=number(0, 0.9),
        default=0.0,
        help="also replay with this share of the slots pinned to the experts most "
        "frequent in the trace's first part (replay then runs on the rest)",
    )
    predictors = ["frequency", "markov", "speculator", "lookahead", "ensemble"]
    b.add_argument(
        "--prefetch",
        choices=predictors,
        help="also replay with this predictor's guesses prefetched "
        "(learned on the trace's first part; replay then runs on the rest)",
    )
    b.add_argument(
        "--read-steps",
        type=count,
        help="read time of one expert in layer-steps: prefetches are guessed this "
        "many MoE layers ahead, the latest that still arrives in time (default 1, or "
        "with --device-gbps the read time over --step-ms)",
    )
    b.add_argument(
        "--device-gbps",
        type=number(0, lo_open=True),
        help="also time the token replay on a device reading this many GB/s, one read "
        "at a time, with --step-ms of compute per MoE layer: stall per token and tok/s",
    )
    b.add_argument(
        "--step-ms",
        type=number(0),
        help="compute time of one MoE layer of one token, in ms (with --device-gbps)",
    )
    b.add_argument(
        "--expert-ms",
        type=number(0),
        default=0.0,
        help="of --step-ms, the compute of one expert FFN, which overlaps the layer's "
        "reads (as `mer bench decode` measures; default 0: reads before any compute)",
    )
    b.add_argument("--guesses", type=count, help="experts prefetched per step (default top-k)")
    b.add_argument("--speculator", help="a trained speculator, for --prefetch speculator")
    b.add_argument("--store", help="the traced model's store, for --prefetch lookahead")
    b.add_argument(
        "--held-out",
        type=number(0, 1, lo_open=True),
        default=0.5,
        help="with pins or prefetch: share of sequences replayed, the last ones",
    )
    b.add_argument(
        "--train-tokens",
        type=count,
        default=20000,
        help="with pins or prefetch: learn from the first N tokens of the rest",
    )


def run(
    *,
    trace_path: str,
    slot_counts: list[int] | None,
    fractions: list[float],
    mode: str,
    max_tokens: int,
    expert_bytes: int | None,
    pin_share: float,
    prefetch: str | None,
    read_steps: int | None,
    device_gbps: float | None,
    step_ms: float | None,
    expert_ms: float,
    guesses: int | None,
    speculator: str | None,
    store: str | None,
    held_out: float,
    train_tokens: int,
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    trace = load_trace(trace_path)
    expert_bytes, priced = _expert_bytes(expert_bytes, trace)
    learns = bool(pin_share or prefetch)
    total = trace.n_layers * trace.n_experts
    console.print(
        f"{trace_path}: {trace.meta.get('model', 'model?')}, {trace.n_tokens} tokens in "
        f"{trace.n_sequences} sequences, {trace.n_layers} MoE layers x "
        f"{trace.n_experts} experts, top-{trace.top_k}; "
        f"expert size {fmt_decimal(expert_bytes)} ({priced})"
    )
    if learns:
        train, replay = split_trace(trace, held_out)
        train, replay = train.head(train_tokens), replay.head(max_tokens)
        console.print(
            f"pins and predictor learned from the first {train.n_tokens} tokens; replaying "
            f"{replay.n_tokens} held-out tokens ({replay.n_sequences} sequences)"
        )
    else:
        train, replay = None, trace.head(max_tokens)
    predictor = None
    device = _device(device_gbps, step_ms, expert_ms, expert_bytes, trace.top_k)
    if read_steps is None:  # the latest a guess can be made and still arrive in time
        per_read = math.ceil(device.read_s / device.step_s) if device and device.step_s else 1
        read_steps = min(max(1, per_read), trace.n_layers - 1)
    if prefetch and not 1 <= read_steps < trace.n_layers:
        raise ConfigError(f"--read-steps must be 1..{trace.n_layers - 1} (the MoE layers "
                          f"less one), got {read_steps}")  # fmt: skip
    if guesses is not None and guesses < 1:
        raise ConfigError(f"--guesses must be at least 1, got {guesses}")
    if prefetch:
        predictor = catalog.one(prefetch, train, speculator, store, max(3, read_steps))
    guesses = guesses or trace.top_k
    modes = ["token", "prefill"] if mode == "both" else [mode]
    pinned_at: dict[tuple[str, int], int] = {}
    for mode in modes:
        acc = accesses(replay, mode)
        sizes = slot_counts or [max(acc.max_step, round(f * total)) for f in fractions]
        if min(sizes) < acc.max_step:
            raise ConfigError(
                f"--slots {min(sizes)} is below the {acc.max_step} experts one {mode} step "
                "uses at once; the cache must hold them all"
            )
        guess_plan = None
        if predictor is not None:
            scorer = partial(predictor.scores, replay)  # (layer, distance) -> scores
            guess_plan = plan(replay, mode, scorer, read_steps, guesses)
        runs = _runs(pin_share > 0, guess_plan is not None)
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
                if pin_share:
                    n = pin_capacity(slots, pin_share, acc.max_step)
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
                    elif timed and policy != "belady":
                        r = simulate_prefetch(acc, policy, slots, no_plan(acc), use, device)
                        got = (r.misses, 0, 0, r.stall_s)
                    else:
                        misses = simulate(acc, policy, slots, use)
                        # Belady's, timed: its misses' reads, none overlapped (an upper bound
                        # where --expert-ms is given).
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
            f"timed (token replay): one read at a time at {device_gbps:g} GB/s "
            f"({1e3 * device.read_s:.2f} ms per expert), {step_ms:g} ms of compute per MoE "
            f"layer step, {expert_ms:g} ms of it per expert FFN (overlapping the layer's "
            "reads); stall: time steps waited for reads; Belady's is its misses' reads, none "
            "overlapped, which prefetching can hide"
        )
    if predictor is not None:
        notes.append(
            f"+pf: prefetching the {guesses} best guesses of {prefetch}, {read_steps} "
            "MoE layer(s) ahead; used: prefetched experts used before eviction (the rest were "
            "wasted reads); reads: misses + prefetches"
        )
    console.print("; ".join(notes) + ".")


def _device(
    device_gbps: float | None, step_ms: float | None, expert_ms: float, expert_bytes: int, k: int
) -> Device | None:
    """The device and step time of --device-gbps, --step-ms and --expert-ms, if given."""
    if device_gbps is None and step_ms is None:
        return None
    if device_gbps is None or step_ms is None:
        raise ConfigError("--device-gbps and --step-ms go together (the device and the model)")
    if device_gbps <= 0 or step_ms < 0:
        raise ConfigError(
            f"--device-gbps must be positive and --step-ms not negative, got "
            f"{device_gbps:g} and {step_ms:g}"
        )
    if k * expert_ms > step_ms:
        raise ConfigError(
            f"--expert-ms {expert_ms:g} x top-{k} is more than the whole step (--step-ms "
            f"{step_ms:g})"
        )
    return Device(expert_bytes / (device_gbps * 1e9), step_ms / 1e3, expert_ms / 1e3)


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
