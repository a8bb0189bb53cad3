"""What a GGUF conversion does, as tables: the per-type choice after converting, and
`mer info FILE.gguf`'s plan of every tensor before. Presentation only: the decisions are
made in mer.store.convert_gguf."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mer.store.convert_gguf import plan
from mer.store.gguf_source import GGUFSource
from mer.units import fmt_bytes


def print_choices(rows: list[tuple[str, str, int, tuple | None]]) -> None:
    """After a conversion, on stderr: what each GGUF type became and the error measured."""
    t = Table(title="GGUF tensor types: what the store holds")
    for col in ("type", "stored as", "tensors", "expert error vs GGUF: max/max|w|, rms/rms"):
        t.add_column(col)
    for kind, action, n, err in rows:
        t.add_row(kind, action, str(n), f"{err[0]:.2e}, {err[1]:.2e}" if err else "")
    console = Console(file=sys.stderr, highlight=False, soft_wrap=True, emoji=False)
    console.print(t)
    int4_ = ("int4 g", "int4-sym g")
    lossy = sorted({kind for kind, action, _, _ in rows if action.startswith(int4_) and
                    "requantized" in action})  # fmt: skip
    if lossy:
        console.print(
            f"note: {', '.join(lossy)} experts were requantized to int4; --quant int8 keeps "
            "them within about 7e-3 RMS of the file, at 1.6x the bytes read per expert"
        )


def describe(src: str | Path, quant: str = "int4", group_size: int | None = None) -> None:
    """`mer info FILE.gguf`: the model the file holds and what convert does with each tensor
    (tensors of every layer alike are one row, with the layers they cover)."""

    with GGUFSource(src) as source:
        p = plan(source, quant, group_size)
        meta, nbytes = source.meta, sum(t.nbytes for t in source.tensors.values())
    cfg = p.cfg
    console = Console(highlight=False, soft_wrap=True, emoji=False)
    if not console.is_terminal:  # piped: whole tensor names rather than 80 columns
        console = Console(highlight=False, soft_wrap=True, emoji=False, width=120)
    t = Table(title=str(src), show_header=False)
    t.add_row("architecture", f"{meta['general.architecture']} -> {cfg.model_type}")
    t.add_row("files", f"{len(source.parts)}, {fmt_bytes(nbytes)} of tensors")
    t.add_row("layers", f"{cfg.num_hidden_layers} ({len(cfg.moe_layers)} MoE)")
    t.add_row("experts", f"{cfg.num_local_experts} per layer, top-{cfg.num_experts_per_tok}")
    t.add_row("hidden / ffn", f"{cfg.hidden_size} / {cfg.intermediate_size}")
    t.add_row("vocab", str(cfg.vocab_size))
    t.add_row("tokenizer", str(meta.get("tokenizer.ggml.model", "none")) + (
        ", chat template" if "tokenizer.chat_template" in meta else ""))  # fmt: skip
    t.add_row(
        "store", f"experts {p.expert_format.scheme}, extent {fmt_bytes(p.expert_format.nbytes)}"
    )
    console.print(t)
    groups: dict[tuple[str, str, str, str], list[int]] = {}
    for g, kind, shape, _, action in p.rows:
        m = re.match(r"blk\.(\d+)\.(.*)", g)
        # blk.7.ffn_up.3.weight (one tensor per expert) groups as blk.*.ffn_up.*.weight
        name = "blk.*." + re.sub(r"[.]\d+[.]", ".*.", m[2]) if m else g
        key = (name, kind, "x".join(map(str, shape)), action)
        groups.setdefault(key, []).append(int(m[1]) if m else -1)
    rows = Table(title="what convert does with each tensor")
    for col in ("tensor", "type", "shape", "layers", "becomes"):
        rows.add_column(col)
    for (name, kind, shape, action), layers in groups.items():
        where = "" if layers == [-1] else _ranges(layers)
        rows.add_row(name, kind, shape, where, action)
    console.print(rows)


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    out, start = [], None
    xs = sorted(set(xs))
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}" if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
