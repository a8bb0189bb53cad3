"""The routing hook: heard once per MoE layer per pass, in registration order, with what the
router saw and chose, before the experts run; a draft pass routes only to resident experts and
no hook hears it. On in-memory experts (`conftest.memory_model`): no store is involved."""

from __future__ import annotations

import torch
from tests.conftest import memory_model

from mer.models.layers import route

PROMPT = torch.tensor([1, 17, 93, 5, 200])


def test_hooks_hear_each_moe_layer_once_per_pass_with_what_the_router_saw():
    model = memory_model()
    cfg, k = model.config, model.config.num_experts_per_tok
    heard, order = [], []
    model.routing_hooks.append(lambda layer, h, ids, w: order.append(("first", layer)))
    model.routing_hooks.append(
        lambda layer, h, ids, w: heard.append((layer, h.clone(), ids.clone(), w.clone()))
    )
    model.routing_hooks.append(lambda layer, h, ids, w: order.append(("last", layer)))
    kv = model.new_kv_cache(16)
    model.forward(PROMPT, kv)
    model.forward(torch.tensor([7]), kv)
    layers = list(cfg.moe_layers)
    assert [layer for layer, *_ in heard] == layers * 2
    assert order == [(when, m) for m in layers * 2 for when in ("first", "last")]
    for n, (layer, h, ids, w) in enumerate(heard):
        t = len(PROMPT) if n < len(layers) else 1
        assert h.shape == (t, cfg.hidden_size) and ids.shape == w.shape == (t, k)
        # `h` is what the router multiplied: routing it again chooses the same.
        w2, ids2 = route(h, model.w[f"layers.{layer}.router"], k, cfg.norm_topk_prob)
        assert torch.equal(ids, ids2) and torch.allclose(w, w2)
    # The experts that ran are exactly those the hooks were told of.
    told = {(layer, int(e)) for layer, _, ids, _ in heard for e in ids.unique()}
    assert set(model.experts.acquired) == told
    assert model.experts.passes == 2


def test_a_draft_routes_only_to_resident_experts_and_no_hook_hears_it():
    model = memory_model()
    cfg = model.config
    heard = []
    model.routing_hooks.append(lambda layer, h, ids, w: heard.append(layer))
    plain = model.forward(PROMPT, model.new_kv_cache(16), all_logits=True)
    heard.clear()
    # Every expert resident: the draft routes as the plain pass does.
    draft = model.forward(PROMPT, model.new_kv_cache(16), all_logits=True, draft=True)
    assert torch.equal(draft, plain) and heard == []
    model.experts.resident = {(m, 0) for m in cfg.moe_layers} | {(cfg.moe_layers[0], 3)}
    model.experts.acquired.clear()
    model.forward(PROMPT, model.new_kv_cache(16), draft=True)
    assert set(model.experts.acquired) <= model.experts.resident and heard == []
    # None resident: the draft still runs, its MoE layers adding nothing.
    model.experts.resident, model.experts.acquired = set(), {}
    logits = model.forward(PROMPT, model.new_kv_cache(16), all_logits=True, draft=True)
    assert torch.isfinite(logits).all() and not model.experts.acquired
    assert not torch.equal(logits, plain)
