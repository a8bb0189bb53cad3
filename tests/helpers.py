"""Helpers shared by tests that compare mer with transformers."""

from __future__ import annotations

import copy

import torch

from mer.store.reader import Store


def dequantized_reference(hf_model, store_path):
    """A copy of the transformers model whose routed experts hold the store's weights,
    dequantized: what the store computes, in the reference implementation."""
    store = Store(store_path)
    ref = copy.deepcopy(hf_model)
    raw = store.expert_path.read_bytes()
    with torch.no_grad():
        for (layer, e), x in store.extents.items():
            buf = torch.frombuffer(
                bytearray(raw[x.offset : x.offset + x.length]), dtype=torch.uint8
            )
            w = store.expert_format.view(buf)
            experts = ref.model.layers[layer].mlp.experts
            experts.gate_up_proj[e] = w.gate_up.dequantize()
            experts.down_proj[e] = w.down.dequantize()
    return ref
