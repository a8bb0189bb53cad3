"""`mer bench grammar`: what constrained decoding (a JSON schema's token mask) costs per token.

The same prompts are decoded plainly and under a JSON schema in the same run, on the same
opened model (greedy). The mask's own time (computing it, applying it, advancing the
grammar) is measured around the constraint itself, and reported per token and as a
share of the constrained decode time; decode time per token is given both ways. The
target: at most 10% on the bundled model and 2% on a Mixtral-shape store.
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


class _Timed:
    """A constraint with its seconds counted."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds, self.calls = inner, 0.0, 0

    def mask(self, logits: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.inner.mask(logits)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def advance(self, token: int) -> None:
        t0 = time.perf_counter()
        self.inner.advance(token)
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
        rows = {}
        for mode in ("plain", "json schema"):
            stats, mask_s, masks = GenerationStats(), 0.0, 0
            for prompt in PROMPTS[:prompts]:
                ids = model.tokenizer.encode(prompt)
                params = model.sampling_params(max_tokens=max_tokens, temperature=0)
                steer = None
                if mode != "plain":
                    timed = _Timed(grammars.constraint(grammar))
                    steer = Steering(timed)
                list(generate(model.transformer, ids, params, stats, steer))
                if steer is not None:
                    mask_s, masks = mask_s + timed.seconds, masks + timed.calls
            steps = stats.generated_tokens - min(prompts, len(PROMPTS))  # decode steps
            rows[mode] = (stats, steps, mask_s, masks)
    finally:
        model.close()
    table = Table(title=f"constrained decoding cost, {store} (vocab {cfg.vocab_size})")
    for col in ("mode", "tokens", "decode ms/token", "mask µs/token", "mask share"):
        table.add_column(col, justify="right")
    for mode, (stats, steps, mask_s, masks) in rows.items():
        per = stats.decode_seconds / max(1, steps)
        mask = mask_s / masks if masks else 0.0
        share = f"{100 * mask / (per + mask):.2f}%" if masks else ""
        table.add_row(
            mode, str(stats.generated_tokens), f"{1e3 * per:.2f}", f"{1e6 * mask:.0f}", share
        )
    console.print(table)
    console.print(
        f"tokenizer setup for the grammar engine (llguidance), once per server: {setup:.2f} s. "
        "mask share: the mask's time over a constrained token's (decode + mask)."
    )
