"""`mer bench spec`: plain, draft-model and self-speculative decoding of the same prompts.

Each mode runs at each RAM budget on a freshly opened model (a cold expert
cache), greedy by default so every mode emits the same tokens. The table gives
decode tok/s, SSD bytes per generated token, the acceptance rate and tokens per
verification pass, the draft/verify time split, and the ratios to plain
decoding at the same budget.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

import mer.api
from mer.progress import progress_bar
from mer.units import fmt_decimal

PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "import os\n\n\ndef walk_files(root):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(",
    "    for key, value in sorted(mapping.items()):\n",
    "def read_config(path):\n    with open(path) as f:\n",
]


def run_mode(args, budget: str, mode: str) -> dict:
    model = mer.api.open(args.store, budget, io_threads=args.io_threads)
    draft = None
    if mode == "draft":
        draft = mer.api.open(args.draft, args.draft_ram_budget)
        model.speculate(draft, k=args.spec_k)
    elif mode == "self":
        model.speculate("self", k=args.spec_k)
    outputs = []
    for i, prompt in enumerate(PROMPTS[: args.prompts]):
        sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, seed=i)
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


def run_spec_bench(args) -> None:
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160)
    modes = ["plain", "draft", "self"] if args.draft else ["plain", "self"]
    console.print(
        f"target {args.store}, draft {args.draft or '(none)'}; {args.prompts} prompts x "
        f"{args.max_tokens} tokens, temperature {args.temperature}, k from {args.spec_k} "
        "(adaptive)"
    )
    table = Table(title="speculative decoding vs plain, same prompts")
    for col in ("budget", "mode", "tokens", "decode tok/s", "SSD/token", "accepted",
                "tokens/pass", "plain tokens", "draft s", "verify s", "tok/s", "SSD"):  # fmt: skip
        table.add_column(col, justify="right")
    with progress_bar(len(args.budgets) * len(modes), "decoding", unit="runs") as bar:
        for budget in args.budgets:
            results = {}
            for mode in modes:
                results[mode] = run_mode(args, budget, mode)
                bar.advance()
            base = results["plain"]
            for mode, r in results.items():
                s = r["spec"]
                same = "" if r["outputs"] == base["outputs"] or args.temperature else " (differs!)"
                table.add_row(
                    budget,
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
