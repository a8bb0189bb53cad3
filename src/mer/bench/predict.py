"""`mer bench predict --trace FILE`: how well each predictor guesses the experts ahead.

The trace is split by whole sequences (`split_trace`): predictors learn from the
first part and are judged on the held-out rest, next to the frequency baseline and
random guessing, per layer distance (`mer.predict.evaluate`).
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from mer.options import add_split_options
from mer.predict.catalog import fitted, training_overlap
from mer.predict.evaluate import NEXT_TOKEN, chance, distances, evaluate
from mer.progress import progress_bar
from mer.trace.format import load_trace, split_trace


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--trace", dest="trace_path", required=True, help="routing trace (.npz)")
    b.add_argument("--speculator", help="a trained speculator (mer train-speculator)")
    b.add_argument("--store", help="the store the trace was recorded from, for lookahead "
                   "(the trace needs hidden states: mer generate --trace-hidden)")  # fmt: skip
    add_split_options(b, max_tokens=5000)


def run(
    *,
    trace_path: str,
    speculator: str | None,
    store: str | None,
    held_out: float,
    max_tokens: int,
    train_tokens: int,
) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    trace = load_trace(trace_path)
    train, test = split_trace(trace, held_out)
    train, test = train.head(train_tokens), test.head(max_tokens)
    k, e = trace.top_k, trace.n_experts
    console.print(
        f"{trace_path}: {trace.meta.get('model', 'model?')}, {trace.n_layers} MoE layers x {e} "
        f"experts, top-{k}; learning from {train.n_tokens} tokens ({train.n_sequences} "
        f"sequences), judged on {test.n_tokens} held-out tokens ({test.n_sequences} sequences)"
    )
    predictors = fitted(train, speculator, store, max_distance=3)
    spec = predictors.get("speculator")
    if spec is not None and training_overlap(spec, trace, held_out):
        console.print(
            f"warning: {speculator} was trained on sequences of this trace that are held "
            "out here; its figures are not held-out figures",
            style="yellow",
        )
    if store is None:
        console.print("lookahead: not measured (needs --store and a trace with hidden states)")
    dists = distances(trace.n_layers)
    results = {}
    with progress_bar(len(dists) * len(predictors), "predicting", unit="runs") as bar:
        for d in dists:
            for name, p in predictors.items():
                results[d, name] = evaluate(p, test, d)
                bar.advance()
    table = Table(title=f"top-k recall and precision on held-out sequences (k = {k} of {e})")
    for col in ("ahead", "predictor", f"recall@{k} (=prec.)", f"recall@{2 * k}",
                f"precision@{2 * k}", "vs freq.", "positions"):  # fmt: skip
        table.add_column(col, justify="right")
    rand = chance(e, k)
    for d in dists:
        base = results[d, "frequency"].recall if "frequency" in predictors else None
        table.add_row("next token" if d == NEXT_TOKEN else f"{d} layer{'s' * (d > 1)}",
                      "random", f"{100 * rand.recall:.1f}%", f"{100 * rand.recall_2k:.1f}%",
                      f"{100 * rand.precision_2k:.1f}%", "", "", style="dim")  # fmt: skip
        for name in predictors:
            s = results[d, name]
            table.add_row(
                "", name, f"{100 * s.recall:.1f}%", f"{100 * s.recall_2k:.1f}%",
                f"{100 * s.precision_2k:.1f}%", f"{s.recall / base:.2f}x" if base else "",
                str(s.positions),
            )  # fmt: skip
        table.add_section()
    console.print(table)
    ensemble = predictors.get("ensemble")
    members = f"; ensemble: {ensemble.description}" if ensemble is not None else ""
    console.print(
        f"ahead: MoE layers ahead within a token; next token: from a token's last MoE layer to "
        f"the next token's first. recall@n: share of the {k} chosen experts among the n best "
        f"guesses; precision@n: share of the n guesses that were chosen{members}."
    )
