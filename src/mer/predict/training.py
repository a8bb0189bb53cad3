"""`mer train-speculator`: train the learned predictor on the training part of traces.

Each trace is split as `mer bench predict` splits it (the last `--held-out` share of
its sequences is left out), so the benchmark judges the speculator on sequences it
never saw; the file records which traces and split it was trained on.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console

from mer.errors import ConfigError
from mer.predict.evaluate import evaluate
from mer.predict.frequency import FrequencyPredictor
from mer.predict.speculator import train_speculator
from mer.trace.format import load_trace, split_trace


def train_from_traces(args) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    for flag in ("epochs", "hidden", "window", "max_distance", "batch", "train_tokens"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.held_out < 1:
        raise ConfigError(f"--held-out must be at least 0 and below 1, got {args.held_out}")
    parts, held, trained_on = [], [], []
    for path in args.trace:
        trace = load_trace(path)
        if parts and (trace.n_layers, trace.n_experts) != (parts[0].n_layers, parts[0].n_experts):
            raise ConfigError(
                f"{path}: {trace.n_layers} MoE layers x {trace.n_experts} experts, but "
                f"{args.trace[0]} has {parts[0].n_layers} x {parts[0].n_experts}"
            )
        train, test = split_trace(trace, args.held_out) if args.held_out else (trace, None)
        train = train.head(args.train_tokens)
        parts.append(train)
        held.append(test)
        trained_on.append({"path": str(path), "fingerprint": trace.fingerprint(),
                           "held_out": args.held_out, "tokens": train.n_tokens,
                           "sequences": train.n_sequences})  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    spec = train_speculator(
        parts, args.epochs, args.hidden, args.window, args.max_distance, args.batch,
        seed=args.seed, info={"trained_on": trained_on},
    )  # fmt: skip
    spec.save(args.out)
    params = sum(p.numel() for p in spec.net.parameters())
    console.print(
        f"wrote {args.out}: {params / 1e6:.2f}M parameters, trained on "
        f"{sum(p.n_tokens for p in parts)} tokens in {time.perf_counter() - t0:.0f} s; "
        f"loss per epoch {', '.join(f'{x:.4f}' for x in spec.info['epoch_losses'])}"
    )
    if held[0] is not None:  # a first look; mer bench predict has the full table
        test = held[0].head(2000)
        mine = evaluate(spec, test, 1).recall
        base = evaluate(FrequencyPredictor().fit(parts[0]), test, 1).recall
        console.print(
            f"held-out recall@{test.top_k} one layer ahead on {test.n_tokens} tokens of "
            f"{args.trace[0]}: {100 * mine:.1f}% (frequency baseline {100 * base:.1f}%)"
        )
