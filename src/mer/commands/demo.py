"""`mer demo`: the whole path in one command, with nothing to download.

Converts the small MoE shipped with mer (trained here on Python's standard
library) to an int4 store, once, then completes a Python snippet with a RAM
budget a fraction of the experts' size, so experts really stream from disk.
`--preset` runs a synthetic Mixtral-shape model instead (random weights: its
text is noise, its sizes are real), for size and speed.
"""

from __future__ import annotations

import argparse
import sys

from mer.commands import open_model
from mer.commands.generate import run_generation
from mer.data import TRAINED_MODEL, cache_dir, convert_once, run_mer
from mer.options import (
    IOOptions,
    SamplingOptions,
    add_io_options,
    add_memory_option,
    add_sampling,
    size,
    text_arg,
)
from mer.units import fmt_bytes

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram-budget", type=size,
                   help="default 1MiB (bundled model) or 96MiB (--preset)")  # fmt: skip
    add_memory_option(p)
    p.add_argument("--prompt", type=text_arg, default=PROMPT)
    p.add_argument("--preset", help="run a synthetic model of this shape instead (see mer synth)")
    add_io_options(p)
    add_sampling(p, max_tokens=48)


def run(
    *,
    ram_budget: int | None,
    memory: int | None,
    dense_quant: str | None,
    prompt: str,
    preset: str | None,
    io: IOOptions,
    sampling: SamplingOptions,
) -> None:
    from mer.store.reader import Store

    workdir = cache_dir() / "demo"
    say = sys.stderr.write
    # Preparation runs in child processes so the peak RSS reported below is generation's own.
    if preset:
        from mer.synth.checkpoint import hf_config

        hf_config(preset)  # an unknown preset is refused before anything is written
        checkpoint, store = workdir / f"{preset}-hf", workdir / f"{preset}-int4"
        budget = 96 << 20 if ram_budget is None else ram_budget
        if not checkpoint.exists():
            say(f"synthesizing a Mixtral-architecture checkpoint: mer synth {checkpoint} "
                f"--preset {preset}\n")  # fmt: skip
            run_mer("synth", checkpoint, "--preset", preset)
        what = "random weights: the text is noise, the numbers are the point"
    else:
        checkpoint, store = TRAINED_MODEL, workdir / f"{TRAINED_MODEL.name}-int4"
        budget = 1 << 20 if ram_budget is None else ram_budget
        what = "trained here on Python's standard library (see its README.md)"
    convert_once(checkpoint, store)
    s = Store(store)
    cfg = s.config
    held = "" if memory else (
        f"; RAM budget {fmt_bytes(budget)} holds {budget // s.expert_format.nbytes} of "
        f"{len(s.extents)} experts"
    )  # fmt: skip
    say(
        f"model: {checkpoint.name}, {what}; {cfg.num_hidden_layers} layers x "
        f"{cfg.num_local_experts} experts (top-{cfg.num_experts_per_tok}), experts "
        f"{fmt_bytes(s.expert_bytes_total)} on disk in int4{held}\n"
    )
    if memory is not None:
        budget = None
        context = len(prompt.encode("utf-8")) + 16
        fit = dict(context=context + sampling.max_tokens, pass_tokens=context)
    fit = fit if memory is not None else {}
    # Closed before the interpreter exits: a reader thread still finishing a prefetch while
    # the runtime tears down aborted the process once in ~15 runs (after the output).
    with open_model(store, budget, io, memory, dense_quant=dense_quant, **fit) as model:
        run_generation(model, prompt, sampling)
