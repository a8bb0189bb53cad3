"""`mer bench grammar`: what constrained decoding (a JSON schema's token mask) costs per token.

The same prompts are decoded plainly and under a JSON schema in the same run, on the same
opened model (greedy), the two modes alternating prompt by prompt (each first every other
prompt, after an untimed warm-up decode). What the schema adds to choosing a token (the
masked copy of the logits, computing and applying the mask, advancing the grammar) is
measured around the steering itself, and reported per token and as a share of the
constrained decode time; a decode step's wall time is given both ways. The target: at most
10% on the bundled model and 2% on a Mixtral-shape store
(`--store /path/to/mixtral-store --ram-budget 2GiB`).
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

import mer.api
from mer.engine.generate import GenerationStats, generate
from mer.engine.steering import Steering
from mer.grammar import Grammars
from mer.options import count, positive_size

PROMPTS = [
    "Write the settings as JSON.\n",
    "def config():\n    return ",
    "# A list of the files to copy\n",
    "import json\n\ndata = ",
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string"}},
        "size": {"type": "integer"},
        "enabled": {"type": "boolean"},
    },
    "required": ["name", "files", "size", "enabled"],
}


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="store (default: the bundled trained model)")
    b.add_argument("--ram-budget", type=positive_size, default="64MiB")
    b.add_argument("--prompts", type=count, default=4)
    b.add_argument("--max-tokens", type=count, default=64)


class _TimedSteering(Steering):
    """A Steering with the seconds it adds to a token counted: the masked copy of the row,
    the mask itself, its all-forbidden check, and advancing the grammar."""

    seconds: float = 0.0

    def logits(self, row: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = super().logits(row)
        self.seconds += time.perf_counter() - t0
        return out

    def take(self, row: torch.Tensor, token: int) -> None:
        t0 = time.perf_counter()
        super().take(row, token)
        self.seconds += time.perf_counter() - t0


def run(*, store: str | None, ram_budget: int, prompts: int, max_tokens: int) -> None:
    if store is None:
        from mer.data import trained_store

        store = str(trained_store())
    console = Console(highlight=False, soft_wrap=True)
    model = mer.api.open(store, ram_budget)
    try:
        cfg = model.config
        t0 = time.perf_counter()
        grammars = Grammars(model.store.path / "tokenizer.json", cfg.vocab_size, cfg.eos_token_ids)
        setup = time.perf_counter() - t0
        grammar = grammars.json_schema(SCHEMA)
        modes = ("plain", "json schema")
        rows = {mode: [GenerationStats(), 0.0, 0.0] for mode in modes}  # stats, wall, mask
        # The modes alternate prompt by prompt, each going first every other prompt, after
        # one untimed decode that warms the expert cache: the cache and the machine's load
        # are then alike for both.
        params = model.sampling_params(max_tokens=max_tokens, temperature=0)
        list(generate(model.transformer, model.tokenizer.encode(PROMPTS[0]), params))
        for i, prompt in enumerate(PROMPTS[:prompts]):
            ids = model.tokenizer.encode(prompt)
            for mode in modes if i % 2 == 0 else modes[::-1]:
                stats = rows[mode][0]
                steer = None if mode == "plain" else _TimedSteering(grammars.constraint(grammar))
                before = stats.prefill_seconds
                t0 = time.perf_counter()
                list(generate(model.transformer, ids, params, stats, steer))
                rows[mode][1] += time.perf_counter() - t0 - (stats.prefill_seconds - before)
                if steer is not None:
                    rows[mode][2] += steer.seconds
    finally:
        model.close()
    table = Table(title=f"constrained decoding cost, {store} (vocab {cfg.vocab_size})")
    for col in ("mode", "tokens", "ms/token", "mask µs/token", "mask share", "vs plain"):
        table.add_column(col, justify="right")
    n = min(prompts, len(PROMPTS))
    plain_per = 0.0
    for mode, (stats, wall, mask_s) in rows.items():
        per = wall / max(1, stats.generated_tokens - n)  # decode steps: the first came from prefill
        mask = mask_s / max(1, stats.generated_tokens)
        plain_per = plain_per or per
        share = f"{100 * mask_s / wall:.2f}%" if mask_s else ""
        versus = f"{100 * (per / plain_per - 1):+.1f}%" if mask_s else ""
        table.add_row(
            mode,
            str(stats.generated_tokens),
            f"{1e3 * per:.2f}",
            f"{1e6 * mask:.0f}",
            share,
            versus,
        )
    console.print(table)
    console.print(
        f"tokenizer setup for the grammar engine (llguidance), once per server: {setup:.2f} s. "
        "ms/token: a decode step's wall time (forward and choosing the token). mask: what the "
        "schema adds to choosing a token (masked copy, mask, advance); mask share: its part of "
        "the constrained decode time (the figure the target is about); vs plain: the "
        "constrained step time against plain's, measured alternately prompt by prompt (noisy "
        "on a loaded machine)."
    )
