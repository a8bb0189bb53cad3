"""`mer info`: what is in a store, or what convert would make of a GGUF file."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from mer.units import fmt_bytes


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="a store directory, or a .gguf file")


def run(*, store: str) -> None:
    from mer.store.reader import Store

    if store.endswith(".gguf"):
        from mer.store.gguf_report import describe

        return describe(store)
    s = Store(store)
    cfg, ef = s.config, s.expert_format
    t = Table(title=str(s.path), show_header=False)
    t.add_row("architecture", cfg.model_type)
    t.add_row("layers", str(cfg.num_hidden_layers))
    t.add_row("experts", f"{cfg.num_local_experts} per layer, top-{cfg.num_experts_per_tok}")
    t.add_row("hidden / ffn", f"{cfg.hidden_size} / {cfg.intermediate_size}")
    t.add_row("heads", f"{cfg.num_attention_heads} query, {cfg.num_key_value_heads} key/value")
    t.add_row("vocab", str(cfg.vocab_size))
    t.add_row("context", str(cfg.max_position_embeddings))
    t.add_row("KV cache", f"{fmt_bytes(cfg.family.kv_bytes_per_token(cfg))} per token (bf16)")
    scheme = ef.scheme
    if ef.scheme in ("int4", "int4-sym"):
        scheme += f", group {ef.group_size}, {ef.layout}"
    t.add_row("expert quantization", scheme)
    t.add_row("expert extent", fmt_bytes(ef.nbytes))
    t.add_row("experts total", f"{len(s.extents)} = {fmt_bytes(s.expert_bytes_total)}")
    dense = s.manifest["dense"]
    held = s.dense_quant
    if held != "bf16":
        held += " (norms, routers, embedding exact)"
    t.add_row("dense weights", f"{fmt_bytes(dense['nbytes'])}, {held}")
    t.add_row("format version", str(s.manifest["format_version"]))
    if s.shard is not None:
        t.add_row("shard", f"worker {s.shard['index']} of {s.shard['workers']} (mer store split)")
    Console(highlight=False, soft_wrap=True, emoji=False).print(t)
