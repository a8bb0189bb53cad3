"""The on-disk store: file names, format version, the manifest's shape, checksums.

A store is a directory:

    manifest.json   format version, model config, dense tensor table, expert table
    dense.bin       resident weights (embeddings, attention, norms, routers, head)
    experts.bin     every expert as one contiguous extent, 4096-aligned
    tokenizer.json, tokenizer_config.json, ...  copied from the source checkpoint

The manifest is written last and the directory appears by rename, so a store
that has a manifest is complete. docs/store-format.md describes every field.
"""

from __future__ import annotations

import xxhash

FORMAT_NAME = "mer-store"
# 2: experts may carry biases (`experts.format.bias`). 3: dense matrices may be stored
# quantized (`dense.quant`, entries with `parts`). A store needing neither is still written
# as 1, so an older mer reads every store it can run right and refuses the others.
FORMAT_VERSION = 3


def version_for(expert_format: dict, dense_quant: str = "bf16") -> int:
    """The oldest format version that describes a store with these experts and dense weights."""
    if dense_quant != "bf16":
        return 3
    return 2 if expert_format.get("bias") else 1


MANIFEST = "manifest.json"
DENSE_FILE = "dense.bin"
EXPERT_FILE = "experts.bin"
DENSE_ALIGN = 64
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def checksum(data) -> str:
    """xxh3-64 of a bytes-like object, as 16 hex digits: fast enough for every read."""
    return xxhash.xxh3_64_hexdigest(data)


def expert_name(layer: int, expert: int) -> str:
    return f"expert (layer {layer}, expert {expert})"
