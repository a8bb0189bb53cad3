"""Record a routing trace, with hidden states, from the bundled trained model (stdlib-moe).

    .venv/bin/python scripts/record_trace.py --out stdlib-moe.npz [--prompts 150]

Prompts are windows of the standard-library files the model's training held out
(its training.json), so this is the model's routing on code it never saw: each
prompt is prefilled, then `--max-tokens` tokens are decoded greedily, all recorded
(prefill phase 0, decode phase 1) with the hidden state entering each MoE block.
The result feeds `mer bench cache`, `mer bench predict --store` (router lookahead)
and `mer train-speculator`. `mer generate --trace` records one prompt at a time;
this records many, so a trace can be split into training and held-out sequences.
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import tempfile
from pathlib import Path

import mer
from mer.data import TRAINED_MODEL
from mer.progress import progress_bar
from mer.store.convert import convert
from mer.tokenizer import Tokenizer


def held_out_ids(tok: Tokenizer) -> list[int]:
    """The held-out files' tokens, one after another (a file missing here is skipped)."""
    meta = json.loads((TRAINED_MODEL / "training.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for name in dict.fromkeys(meta["held_out_files"]):
        for path in sorted(stdlib.rglob(name)):
            ids += tok.encode(path.read_text(errors="replace"))
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="trace file to write (.npz)")
    ap.add_argument("--prompts", type=int, default=150)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--max-tokens", type=int, default=32, help="decoded per prompt")
    ap.add_argument("--store", help="an int4 store of the bundled model (default: convert it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or convert(TRAINED_MODEL, Path(tmp) / "int4", "int4", progress=False)
        model = mer.open(store, ram_budget="64MiB")
        ids = held_out_ids(model.tokenizer)
        stride = max(1, (len(ids) - args.prompt_tokens) // args.prompts)
        recorder = model.record_trace()
        recorder.watch_hidden()
        with progress_bar(args.prompts, "recording", unit="prompts") as bar:
            for i in range(args.prompts):
                prompt = ids[i * stride : i * stride + args.prompt_tokens]
                for _ in model.tokens(prompt, max_tokens=args.max_tokens, stop_token_ids=[-1]):
                    pass
                bar.advance()
        model.close()
    trace = recorder.trace()
    trace.meta["recorded"] = (
        f"scripts/record_trace.py: {args.prompts} windows of {args.prompt_tokens} tokens of the "
        f"held-out stdlib files, each prefilled then {args.max_tokens} tokens decoded greedily"
    )
    trace.save(args.out)
    print(f"wrote {args.out}: {trace.n_tokens} tokens in {trace.n_sequences} sequences")


if __name__ == "__main__":
    main()
