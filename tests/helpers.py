"""Helpers shared by tests that compare mer with transformers."""

from __future__ import annotations

import copy

import torch

from mer.store.reader import Store


def dequantized_reference(hf_model, store_path, gate_up=lambda w: w, down=lambda w: w):
    """A copy of the transformers model whose routed experts hold the store's weights,
    dequantized: what the store computes, in the reference implementation. `gate_up` and
    `down` turn our [out, in] matrices into the family's own layout."""
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
            experts.gate_up_proj[e] = gate_up(w.gate_up.dequantize())
            experts.down_proj[e] = down(w.down.dequantize())
    return ref


def run_all(scheduler, requests) -> list[list[int]]:
    """Submit `requests`, step the scheduler until it is idle, and return each request's
    generated token ids."""
    for r in requests:
        scheduler.submit(r)
    while scheduler.step():
        pass
    outs = []
    for r in requests:
        ids = []
        while not r.outputs.empty():
            ids += r.outputs.get().token_ids
        outs.append(ids)
    return outs
