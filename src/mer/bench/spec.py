"""`mer bench spec`: plain, draft-model and self-speculative decoding of the same prompts.

Each mode runs at each RAM budget on a freshly opened model (a cold expert
cache), greedy by default so every mode emits the same tokens. The table gives
decode tok/s, SSD bytes per generated token, the acceptance rate and tokens per
verification pass, the draft/verify time split, and the ratios to plain
decoding at the same budget.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

import mer.api
from mer.options import ROUTINGS, count, number, positive_size
from mer.progress import progress_bar
from mer.units import fmt_bytes, fmt_decimal

PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\n\n\ndef walk_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    for key, value in sorted(mapping.items()):\n",
    "def read_config(path):\n    with open(path) as f:\n",
]


def add_arguments(b: argparse.ArgumentParser) -> None:
    b.add_argument("--store", help="target store (default: the bundled trained model)")
    b.add_argument("--draft", help="draft store (default with the bundled model: its draft)")
    b.add_argument("--budgets", type=positive_size, nargs="+", default=[1 << 20, 4 << 20],
                   help="RAM budgets (default 1MiB 4MiB)")  # fmt: skip
    b.add_argument("--draft-ram-budget", type=positive_size, default="64MiB")
    b.add_argument("--prompts", type=count, default=4)
    b.add_argument("--max-tokens", type=count, default=64)
    b.add_argument("--temperature", type=number(0, 2), default=0.0)
    b.add_argument("--spec-k", type=count, default=4)
    b.add_argument("--io-threads", type=count, default=4)
    b.add_argument("--routing", choices=ROUTINGS, default="exact",
                   help="the target's routing in every mode (see mer bench quality)")  # fmt: skip
    b.add_argument("--routing-slack", type=number(0, 1), default=0.1)


@dataclass(frozen=True)
class SpecRun:
    """What every mode of one benchmark run shares."""

    store: str
    draft: str | None
    draft_ram_budget: int
    prompts: int
    max_tokens: int
    temperature: float
    spec_k: int
    io_threads: int
    routing: str = "exact"
    routing_slack: float = 0.1


def run_mode(setup: SpecRun, budget: int, mode: str) -> dict:
    model = mer.api.open(setup.store, budget, io_threads=setup.io_threads,
                         routing=setup.routing, routing_slack=setup.routing_slack)  # fmt: skip
    draft = None
    if mode == "draft":
        draft = mer.api.open(setup.draft, setup.draft_ram_budget)
        model.speculate(draft, k=setup.spec_k)
    elif mode == "self":
        model.speculate("self", k=setup.spec_k)
    outputs = []
    for i, prompt in enumerate(PROMPTS[: setup.prompts]):
        sampling = dict(max_tokens=setup.max_tokens, temperature=setup.temperature, seed=i)
        outputs.append(model.generate(prompt, **sampling).token_ids)
    stats = model.stats()
    model.close()
    if draft is not None:
        draft.close()
    g = stats.generation
    return {
        "outputs": outputs,
        "tps": g.decode_tps,
        "tokens": g.generated_tokens,
        "ssd": stats.cache.bytes_read / max(1, g.generated_tokens),
        "spec": stats.speculation,
    }


def run(
    *,
    store: str | None,
    draft: str | None,
    budgets: list[int],
    draft_ram_budget: int,
    prompts: int,
    max_tokens: int,
    temperature: float,
    spec_k: int,
    io_threads: int,
    routing: str = "exact",
    routing_slack: float = 0.1,
) -> None:
    if store is None:  # the bundled model and its bundled draft
        from mer.data import draft_store, trained_store

        store, draft = str(trained_store()), draft or str(draft_store())
    setup = SpecRun(store, draft, draft_ram_budget, prompts, max_tokens, temperature, spec_k,
                   io_threads, routing, routing_slack)  # fmt: skip
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    modes = ["plain", "draft", "self"] if setup.draft else ["plain", "self"]
    console.print(
        f"target {setup.store}, draft {setup.draft or '(none)'}; {setup.prompts} prompts x "
        f"{setup.max_tokens} tokens, temperature {setup.temperature}, k from {setup.spec_k} "
        "(adaptive)"
    )
    table = Table(title="speculative decoding vs plain, same prompts")
    for col in ("budget", "mode", "tokens", "decode tok/s", "SSD/token", "accepted",
                "tokens/pass", "plain tokens", "draft s", "verify s", "tok/s", "SSD"):  # fmt: skip
        table.add_column(col, justify="right")
    with progress_bar(len(budgets) * len(modes), "decoding", unit="runs") as bar:
        for budget in budgets:
            results = {}
            for mode in modes:
                results[mode] = run_mode(setup, budget, mode)
                bar.advance()
            base = results["plain"]
            for mode, r in results.items():
                s = r["spec"]
                same = "" if r["outputs"] == base["outputs"] or setup.temperature else " (differs!)"
                table.add_row(
                    fmt_bytes(budget),
                    mode + same,
                    str(r["tokens"]),
                    f"{r['tps']:.1f}",
                    fmt_decimal(r["ssd"]),
                    f"{100 * s.acceptance_rate:.0f}%" if s else "",
                    f"{s.mean_accepted:.2f}" if s else "",
                    str(s.plain_tokens) if s else "",
                    f"{s.draft_seconds:.2f}" if s else "",
                    f"{s.verify_seconds:.2f}" if s else "",
                    f"x{r['tps'] / base['tps']:.2f}" if s else "",
                    f"/{base['ssd'] / r['ssd']:.2f}" if s else "",
                )
    console.print(table)
    console.print(
        "accepted: share of drafted tokens kept; tokens/pass: tokens emitted per verification "
        "pass; plain tokens: decoded without speculation (adaptive k turned it off); last two "
        "columns: decode tok/s over plain's (x) and by what SSD bytes per token are divided (/)."
    )
