"""`mer synth`: a synthetic checkpoint in the real Hugging Face layout, a random store, or a
GGUF file of random valid blocks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mer.errors import ConfigError
from mer.options import count, natural


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to create (with --gguf: the .gguf file)")
    from mer.synth.checkpoint import OVERRIDE_FLAGS

    p.add_argument("--preset", default="tiny", help="a shape from mer.synth.checkpoint.presets()")
    for flag in OVERRIDE_FLAGS:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=count)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--seed", type=natural, default=0)
    p.add_argument("--store", action="store_true", help="write a random int4 store directly")
    p.add_argument("--quant", default="int4", choices=["int4", "int4-sym"],
                   help="with --store: the experts' format (as for convert)")  # fmt: skip
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="with --store (default as for convert)")  # fmt: skip
    p.add_argument("--dense-quant", default="bf16", choices=["bf16", "int8", "int4"],
                   help="with --store: the dense matrices' width (as for convert)")  # fmt: skip
    p.add_argument("--gguf", action="store_true",
                   help="write a GGUF file laid out as llama.cpp does (random blocks)")  # fmt: skip
    p.add_argument("--gguf-type", default="Q4_K", choices=["Q4_0", "Q4_K", "Q8_0"],
                   help="with --gguf: the matrices' type (Q4_K falls back to Q8_0 for rows "
                   "not a multiple of 256, as llama.cpp does)")  # fmt: skip


def run(
    *,
    out: str,
    preset: str,
    dtype: str,
    seed: int,
    store: bool,
    quant: str,
    group_size: int | None,
    dense_quant: str,
    gguf: bool,
    gguf_type: str,
    layers: int | None,
    experts: int | None,
    top_k: int | None,
    hidden: int | None,
    ffn: int | None,
    heads: int | None,
    kv_heads: int | None,
    vocab: int | None,
) -> None:
    from mer.synth.checkpoint import OVERRIDE_FLAGS, hf_config
    from mer.synth.tokenizer import MIN_VOCAB

    given = dict(layers=layers, experts=experts, top_k=top_k, hidden=hidden, ffn=ffn,
                 heads=heads, kv_heads=kv_heads, vocab=vocab)  # fmt: skip
    cfg = hf_config(preset, **{OVERRIDE_FLAGS[k]: v for k, v in given.items() if v is not None})
    if cfg["vocab_size"] < MIN_VOCAB:  # checked before anything is written
        raise ConfigError(
            f"--vocab must be at least {MIN_VOCAB} (the byte-level tokenizer's bytes and "
            f"special tokens), got {cfg['vocab_size']}"
        )
    if gguf:
        from mer.synth.gguf import write_synthetic_gguf

        if not out.endswith(".gguf"):
            raise ConfigError(f"--gguf writes a file named *.gguf, got {out!r}")
        path = write_synthetic_gguf(out, cfg, gguf_type, seed=seed)[0]
    elif store:
        from mer.synth.store import write_random_store

        path = write_random_store(out, cfg, quant, group_size, seed=seed, dense_quant=dense_quant)
    else:
        import torch

        from mer.synth.checkpoint import write_hf_checkpoint

        torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
        path = write_hf_checkpoint(Path(out), cfg, dtype=torch_dtype[dtype], seed=seed)
    sys.stderr.write(f"wrote {path}\n")
