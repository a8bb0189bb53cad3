"""The small MoE shipped with mer (scripts/train_tiny_moe.py): it converts, int4 keeps its
quality, and its completions do not depend on the RAM budget."""

from __future__ import annotations

import json
import math

import pytest
import torch

import mer
from mer.data import TRAINED_MODEL, held_out_ids
from mer.store.convert import convert

SNIPPET = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
# Stated margin: int4 (group 128) may cost at most this much held-out loss over bf16.
INT4_LOSS_MARGIN = 0.10  # nats per token
# And compact dense weights (`--dense-quant`, bf16 experts) at most this much.
DENSE_LOSS_MARGIN = {"int8": 0.02, "int4": 0.10}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    return {q: convert(TRAINED_MODEL, d / q, quant=q, progress=False) for q in ("bf16", "int4")}


def held_out_tokens(limit: int = 4 * 256 + 1) -> list[int]:
    """Tokens of the files the training held out, as the training script laid them out."""
    ids = held_out_ids(limit)
    if len(ids) < limit:
        pytest.skip("this Python's stdlib lacks the held-out files")
    return ids


def loss(store, ids: list[int], window: int = 256, dense_quant: str = "bf16") -> float:
    model = mer.open(store, ram_budget="64MiB", dtype="float32", dense_quant=dense_quant)
    total, count = 0.0, 0
    for a in range(0, len(ids) - 1, window):
        x = torch.tensor(ids[a : a + window + 1])
        kv = model.transformer.new_kv_cache(len(x) - 1)
        logits = model.transformer.forward(x[:-1], kv, all_logits=True)
        total += torch.nn.functional.cross_entropy(logits, x[1:], reduction="sum").item()
        count += len(x) - 1
    return total / count


def test_shipped_checkpoint_is_trained_and_int4_keeps_its_quality(stores):
    ids = held_out_tokens()
    bf16, int4 = loss(stores["bf16"], ids), loss(stores["int4"], ids)
    card = json.loads((TRAINED_MODEL / "training.json").read_text())
    assert math.exp(bf16) < 2 * card["held_out_perplexity"]  # trained, not random (ppl ~4096)
    assert int4 - bf16 < INT4_LOSS_MARGIN, f"int4 {int4:.3f} vs bf16 {bf16:.3f} nats/token"


@pytest.mark.parametrize("dense_quant", ["int8", "int4"])
def test_compact_dense_weights_keep_the_quality(stores, dense_quant):
    ids = held_out_tokens()
    bf16, compact = loss(stores["bf16"], ids), loss(stores["bf16"], ids, dense_quant=dense_quant)
    margin = DENSE_LOSS_MARGIN[dense_quant]
    assert compact - bf16 < margin, f"{dense_quant} dense {compact:.3f} vs {bf16:.3f} nats/token"


def test_greedy_completion_is_the_same_at_any_budget(stores):
    outs = []
    for budget, prefetch in (("64MiB", False), (2, True), (2, False)):
        if isinstance(budget, int):  # two experts: the least one token at one layer needs
            budget *= mer.open(stores["int4"], ram_budget="64MiB").store.expert_format.nbytes
        model = mer.open(stores["int4"], ram_budget=budget, prefetch=prefetch)
        outs.append(model.generate(SNIPPET, max_tokens=24).text)
    assert outs[0] == outs[1] == outs[2]
    assert outs[0].strip()
