"""`mer convert`: a Hugging Face checkpoint or a GGUF file to a store."""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face checkpoint directory (or a Hub repository id), "
                   "or a .gguf file (the first of a split set)")  # fmt: skip
    p.add_argument("dst", help="store directory to create")
    p.add_argument("--quant", default="int4", choices=["int4", "int4-sym", "int8", "bf16", "mxfp4"],
                   help="experts' format: int4 (a scale and zero per group), int4-sym (a "
                   "float16 scale per group, as GGUF's Q4_0: what a GGUF of Q4_0 experts "
                   "becomes with int4), int8, bf16, mxfp4")  # fmt: skip
    p.add_argument("--group-size", type=int, choices=[32, 64, 128, 256],
                   help="int4 group size (default 128 or the largest that divides the "
                   "model's dims; 32 for GGUF, which keeps 4-bit blocks exact)")  # fmt: skip
    p.add_argument("--dense-quant", default="bf16", choices=["bf16", "int8", "int4"],
                   help="store attention, shared experts, dense layers and the output head "
                   "at this width (int8 per channel, int4 groups of 128)")  # fmt: skip
    p.add_argument(
        "--force",
        action="store_true",
        help="replace dst if it is a mer store (never the source or other files)",
    )


def run(
    *, src: str, dst: str, quant: str, group_size: int | None, force: bool, dense_quant: str
) -> None:
    from mer.store.convert import convert

    path = convert(src, dst, quant, group_size, force=force, dense_quant=dense_quant)
    sys.stderr.write(f"wrote {path}\n")
