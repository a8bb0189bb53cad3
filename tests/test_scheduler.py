"""Continuous batching and the paged KV cache: batched output equals single-stream output,
prefixes are reused exactly, a full pool preempts without changing anything, and
every block comes back."""

from __future__ import annotations

import pytest
import torch

import mer
from mer.engine.sampling import SamplingParams
from mer.engine.scheduler import Request, Scheduler
from mer.errors import BudgetError, ConfigError
from mer.models.paged_kv import KVPool

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\ndef walk(path):\n",
    "class Stack:\n    def __init__(self):\n",
    "for i in range(10):\n",
    "def parse(s):\n    '''Parse",
    "import json\n",
]


@pytest.fixture(scope="module")
def model(trained_store):
    m = mer.open(trained_store, ram_budget="1MiB")
    yield m
    m.close()


def run_all(scheduler: Scheduler, requests: list[Request]) -> list[list[int]]:
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


def requests(model, tok, n_tokens=12, temperature=0.8) -> list[Request]:
    return [
        Request(
            tok.encode(p),
            model.sampling_params(max_tokens=n_tokens, temperature=temperature, seed=i),
        )
        for i, p in enumerate(PROMPTS)
    ]


def test_batched_output_equals_each_request_run_alone(model):
    tok = model.tokenizer
    alone = [
        model.generate(p, max_tokens=12, temperature=0.8, seed=i).token_ids
        for i, p in enumerate(PROMPTS)
    ]
    s = Scheduler(model.transformer, tok, kv_budget=8 << 20, max_batch_tokens=16)
    try:
        assert run_all(s, requests(model, tok)) == alone
        assert s.stats.dedup_factor > 1.5  # six sequences share most of each layer's experts
        assert s.pool.used_blocks == 0 and s.n_running == 0
    finally:
        s.close()


def test_a_full_kv_pool_preempts_and_recomputes_without_changing_output(trained_store):
    # float32: a recomputed prefix runs as one prefill instead of token by token, and in
    # bf16 that reorders roundings enough to flip an occasional sample. The logic is what
    # is tested here; the bf16 caveat is documented in the scheduler.
    model = mer.open(trained_store, ram_budget="1MiB", dtype="float32")
    tok = model.tokenizer
    roomy = Scheduler(model.transformer, tok, kv_budget=8 << 20)
    expected = run_all(roomy, requests(model, tok, n_tokens=40))
    roomy.close()
    # Enough blocks for one request at a time: the others wait or get preempted.
    need = max(len(tok.encode(p)) + 40 for p in PROMPTS)
    pool = KVPool(model.config, 1 << 30, model.transformer.dtype)
    tight = Scheduler(
        model.transformer, tok, kv_budget=(pool.blocks_for(need) + 2) * pool.block_bytes
    )
    try:
        assert run_all(tight, requests(model, tok, n_tokens=40)) == expected
        assert tight.stats.preemptions > 0
        assert tight.pool.used_blocks == 0
    finally:
        tight.close()
        model.close()


def test_a_shared_prefix_is_reused_and_gives_the_same_logits(model):
    t = model.transformer
    pool = KVPool(model.config, 4 << 20, t.dtype, block_size=4)
    prompt = list(range(5, 5 + 23))

    first = pool.sequence(prompt)
    assert first.length == 0
    first.reserve(prompt)
    full = t.forward_batch([(torch.tensor(prompt), first)])
    first.free()
    assert pool.cached_blocks == 5 and pool.used_blocks == 0

    again = pool.sequence(prompt)
    assert again.length == 20  # five whole blocks reused; the last three tokens run
    rest = prompt[again.length :]
    again.reserve(rest)
    reused = t.forward_batch([(torch.tensor(rest), again)])
    torch.testing.assert_close(reused, full, rtol=0, atol=0.05)
    assert torch.equal(reused.argmax(-1), full.argmax(-1))

    other = pool.sequence([99] + prompt[1:])  # different first block: nothing matches
    assert other.length == 0
    again.free()
    other.free()


def test_truncate_returns_blocks_and_the_pool_evicts_least_recent_cached_blocks(model):
    pool = KVPool(model.config, 1 << 20, torch.bfloat16, block_size=4)
    seq = pool.sequence([1] * 9)
    seq.reserve([1] * 9)
    kv = torch.zeros(9, model.config.num_key_value_heads, model.config.head_dim).bfloat16()
    for layer in range(model.config.num_hidden_layers):
        seq.append(layer, kv, kv)
    seq.advance(9)
    assert len(seq.blocks) == 3 and len(pool.by_digest) == 2
    seq.truncate(5)
    assert len(seq.blocks) == 2 and len(pool.by_digest) == 1
    seq.free()
    assert pool.used_blocks == 0 and pool.cached_blocks == 1
    hog = pool.sequence([2])
    assert hog.reserve([2] * (pool.n_blocks * 4))  # takes every block, evicting the cached one
    assert pool.cached_blocks == 0 and not pool.by_digest
    hog.free()


def test_requests_that_can_never_run_are_refused_at_once(model):
    s = Scheduler(model.transformer, model.tokenizer, kv_budget=256 << 10)
    try:
        with pytest.raises(BudgetError, match="KV blocks"):
            s.submit(Request([1] * 100, SamplingParams(max_tokens=900)))
        with pytest.raises(ConfigError, match="context"):
            s.submit(Request([1] * 100, SamplingParams(max_tokens=5000)))
        with pytest.raises(ConfigError, match="empty"):
            s.submit(Request([], SamplingParams()))
        with pytest.raises(BudgetError, match="KV budget"):
            Scheduler(model.transformer, None, kv_budget=1000)
    finally:
        s.close()


def test_cancelled_requests_free_their_blocks_in_the_engine_thread(model):
    s = Scheduler(model.transformer, model.tokenizer, kv_budget=8 << 20).start()
    try:
        reqs = requests(model, model.tokenizer, n_tokens=200)
        for r in reqs:
            s.submit(r)
        first = next(iter(reqs[0]))  # wait until generation is under way
        assert first.finish_reason is None
        for r in reqs:
            r.cancel()
        finals = [[o for o in r if o.finish_reason] for r in reqs]
        assert all(f[-1].finish_reason == "cancelled" for f in finals)
        assert s.n_running == 0 and s.pool.used_blocks == 0
    finally:
        s.close()
