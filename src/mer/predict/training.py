"""`mer train-speculator`: train the learned predictor on the training part of traces.

Each trace is split as `mer bench predict` splits it (the last `--held-out` share of
its sequences is left out), so the benchmark judges the speculator on sequences it
never saw; the file records which traces and split it was trained on.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console

from mer.errors import ConfigError
from mer.options import count, natural, number
from mer.predict.evaluate import evaluate
from mer.predict.frequency import FrequencyPredictor
from mer.predict.speculator import train_speculator
from mer.trace.format import load_trace, split_trace


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", dest="traces", required=True, action="append",
                   help="routing trace (.npz; repeatable, all of one model)")  # fmt: skip
    p.add_argument("--out", required=True, help="file to write (.pt)")
    p.add_argument(
        "--held-out",
        type=number(0, 1),
        default=0.5,
        help="share of each trace's sequences left out for mer bench predict, the "
        "last ones (default 0.5, as there; 0 trains on everything)",
    )
    p.add_argument(
        "--train-tokens",
        type=count,
        default=20000,
        help="train on the first N tokens of each trace's training part",
    )
    p.add_argument("--epochs", type=count, default=3)
    p.add_argument("--hidden", type=count, default=256, help="MLP width")
    p.add_argument("--window", type=count, default=3, help="MoE layers of routing it sees")
    p.add_argument("--max-distance", type=count, default=3, help="layers ahead it predicts")
    p.add_argument("--batch", type=count, default=1024)
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--threads", type=count, help="torch threads (default: torch's choice)")


def run(
    *,
    traces: list[str],
    out: str,
    held_out: float,
    train_tokens: int,
    epochs: int,
    hidden: int,
    window: int,
    max_distance: int,
    batch: int,
    seed: int,
    threads: int | None,
) -> None:
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    if not 0 <= held_out < 1:
        raise ConfigError(f"held_out must be at least 0 and below 1, got {held_out}")
    parts, held, trained_on = [], [], []
    for path in traces:
        trace = load_trace(path)
        if parts and (trace.n_layers, trace.n_experts) != (parts[0].n_layers, parts[0].n_experts):
            raise ConfigError(
                f"{path}: {trace.n_layers} MoE layers x {trace.n_experts} experts, but "
                f"{traces[0]} has {parts[0].n_layers} x {parts[0].n_experts}"
            )
        train, test = split_trace(trace, held_out) if held_out else (trace, None)
        train = train.head(train_tokens)
        parts.append(train)
        held.append(test)
        trained_on.append({"path": str(path), "fingerprint": trace.fingerprint(),
                           "held_out": held_out, "tokens": train.n_tokens,
                           "sequences": train.n_sequences})  # fmt: skip
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    spec = train_speculator(
        parts, epochs, hidden, window, max_distance, batch,
        seed=seed, info={"trained_on": trained_on},
    )  # fmt: skip
    spec.save(out)
    params = sum(p.numel() for p in spec.net.parameters())
    console.print(
        f"wrote {out}: {params / 1e6:.2f}M parameters, trained on "
        f"{sum(p.n_tokens for p in parts)} tokens in {time.perf_counter() - t0:.0f} s; "
        f"loss per epoch {', '.join(f'{x:.4f}' for x in spec.info['epoch_losses'])}"
    )
    if held[0] is not None:  # a first look; mer bench predict has the full table
        test = held[0].head(2000)
        mine = evaluate(spec, test, 1).recall
        base = evaluate(FrequencyPredictor().fit(parts[0]), test, 1).recall
        console.print(
            f"held-out recall@{test.top_k} one layer ahead on {test.n_tokens} tokens of "
            f"{traces[0]}: {100 * mine:.1f}% (frequency baseline {100 * base:.1f}%)"
        )
