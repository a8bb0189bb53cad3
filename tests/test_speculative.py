"""Speculative decoding keeps the target's output: token for token when greedy, in
distribution when sampling, and rejected drafts leave nothing in the KV cache."""

from __future__ import annotations

import math

import pytest
import torch

import mer
from mer.engine.generate import generate
from mer.engine.sampling import SamplingParams
from mer.engine.scheduler import Request
from mer.engine.speculative import SpecStats, Speculation, generate_speculative
from mer.store.convert import convert

SNIPPET = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@pytest.fixture(scope="module")
def target(trained_store):
    # float32: the verification pass runs k+1 positions at once where plain decoding runs
    # one, and only in float32 are the two equal enough that no argmax can flip.
    m = mer.open(trained_store, ram_budget="1MiB", dtype="float32")
    yield m
    m.close()


@pytest.fixture(scope="module")
def draft(draft_store):
    m = mer.open(draft_store, ram_budget="64MiB", dtype="float32")
    yield m
    m.close()


def drafts(target, draft):
    return {"self": "self", "model": draft.transformer}


@pytest.mark.parametrize("which", ["self", "model"])
@pytest.mark.parametrize("k", [1, 3, 6, None])  # None: adaptive from 4
def test_greedy_output_equals_plain_decoding(target, draft, which, k):
    prompt = target.tokenizer.encode(SNIPPET)
    params = target.sampling_params(max_tokens=40)
    plain = list(generate(target.transformer, prompt, params))
    spec = SpecStats()
    speculation = Speculation(drafts(target, draft)[which], k=k or 4, adaptive=k is None)
    out = generate_speculative(target.transformer, speculation, prompt, params, spec=spec)
    assert list(out) == plain
    if k is not None:
        assert spec.rounds > 0 and 0 < spec.accepted < spec.drafted  # real rejections


@pytest.mark.parametrize("which", ["self", "model"])
def test_a_rejected_draft_leaves_no_trace_in_the_kv_cache(target, draft, which):
    prompt = target.tokenizer.encode(SNIPPET)
    params = target.sampling_params(max_tokens=30, temperature=0.8, seed=3)
    kv = target.transformer.new_kv_cache(len(prompt) + 30 + 9)
    spec = SpecStats()
    speculation = Speculation(drafts(target, draft)[which], k=3, adaptive=False)
    out = list(
        generate_speculative(target.transformer, speculation, prompt, params, spec=spec, kv=kv)
    )
    assert spec.accepted < spec.drafted  # some drafts were rejected and rolled back
    context = prompt + out[:-1]
    assert kv.length == len(context)
    fresh = target.transformer.new_kv_cache(len(context))
    target.transformer.forward(torch.tensor(context), fresh)
    n = len(context)
    torch.testing.assert_close(kv.k[:, :n], fresh.k[:, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv.v[:, :n], fresh.v[:, :n], atol=1e-4, rtol=1e-4)


VOCAB = 6


def tiny_vocab_store(path, seed: int):
    from tests.conftest import tiny_config
    from transformers import MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(tiny_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=32))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6 if p.dim() > 1 else 1)  # peaked, different distributions per seed
    model.save_pretrained(path / "hf")
    return convert(path / "hf", path / "store", quant="bf16", progress=False)


def chi_square_p_value(observed: list[int], expected: list[float]) -> float:
    """Upper tail of Pearson's chi-square (Wilson-Hilferty), cells with expectation < 5
    pooled."""
    obs, exp, pooled_o, pooled_e = [], [], 0, 0.0
    for o, e in zip(observed, expected, strict=True):
        if e < 5:
            pooled_o, pooled_e = pooled_o + o, pooled_e + e
        else:
            obs.append(o)
            exp.append(e)
    if pooled_e > 0:
        obs.append(pooled_o)
        exp.append(pooled_e)
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    df = len(obs) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_output_keeps_the_target_distribution(tmp_path):
    target = mer.open(tiny_vocab_store(tmp_path / "t", seed=1), ram_budget="8MiB")
    other = mer.open(tiny_vocab_store(tmp_path / "d", seed=2), ram_budget="8MiB")
    t = target.transformer
    prompt = [1, 4, 2]
    # The exact joint distribution of the first two tokens, from the target alone.
    kv = t.new_kv_cache(8)
    first = torch.softmax(t.forward(torch.tensor(prompt), kv)[-1], -1)
    joint = []
    for a in range(VOCAB):
        kv2 = t.new_kv_cache(8)
        second = torch.softmax(t.forward(torch.tensor([*prompt, a]), kv2)[-1], -1)
        joint += (first[a] * second).tolist()
    d = other.transformer
    q = torch.softmax(d.forward(torch.tensor(prompt), d.new_kv_cache(8))[-1], -1)
    assert (q - first).abs().max() > 0.2  # the draft really disagrees with the target

    n = 1200
    for speculation in (Speculation(other.transformer, 2, False), Speculation("self", 2, False)):
        counts = [0] * VOCAB**2
        for seed in range(n):
            p = SamplingParams(max_tokens=2, temperature=1.0, seed=seed)
            a, b = generate_speculative(t, speculation, prompt, p)
            counts[a * VOCAB + b] += 1
        assert chi_square_p_value(counts, [n * x for x in joint]) > 1e-3
    # The test has power: the draft's own samples are rejected by it.
    counts = [0] * VOCAB**2
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        a = int(torch.multinomial(q, 1, generator=g))
        counts[a * VOCAB + int(torch.multinomial(q, 1, generator=g))] += 1
    assert chi_square_p_value(counts, [n * x for x in joint]) < 1e-6
    target.close()
    other.close()


def test_generate_and_bench_spec_from_the_command_line(trained_store, draft_store, capsys):
    from mer.cli import main

    base = ["generate", "--store", str(trained_store), "--ram-budget", "1MiB"]
    base += ["--prompt", "import os\n", "--max-tokens", "12", "--dtype", "float32"]
    assert main(base) == 0
    plain = capsys.readouterr()
    for extra in (["--speculate"], ["--draft", str(draft_store), "--spec-k", "2"]):
        assert main([*base, *extra, "--fixed-k"]) == 0
        spec = capsys.readouterr()
        assert spec.out == plain.out  # greedy: the same text
        assert "speculative:" in spec.err and "passes" in spec.err

    bench = ["bench", "spec", "--store", str(trained_store), "--draft", str(draft_store)]
    assert main([*bench, "--prompts", "1", "--max-tokens", "8", "--budgets", "1MiB"]) == 0
    out = capsys.readouterr().out
    assert all(f" {mode} " in out for mode in ("plain", "draft", "self"))


def test_speculation_rejects_a_draft_with_another_vocabulary(trained_store, store_factory):
    target = mer.open(trained_store, ram_budget="1MiB")
    other = mer.open(store_factory("int4"), ram_budget="1MiB")
    with pytest.raises(mer.errors.ConfigError, match="vocabulary"):
        target.speculate(other)
    with pytest.raises(mer.errors.ConfigError, match="at least 1"):
        target.speculate("self", k=0)
    target.close()
    other.close()


@pytest.mark.parametrize("which", ["self", "model"])
def test_the_scheduler_speculates_for_a_lone_request_and_batches_otherwise(target, draft, which):
    tok = target.tokenizer
    prompts = [SNIPPET, "import os\n"]
    params = [target.sampling_params(max_tokens=24) for _ in prompts]
    plain = [
        list(generate(target.transformer, tok.encode(p), q))
        for p, q in zip(prompts, params, strict=True)
    ]
    s = target.scheduler("8MiB", draft="self" if which == "self" else draft, spec_k=3)
    try:
        alone = Request(tok.encode(prompts[0]), params[0])
        s.submit(alone)
        while s.step():
            pass
        assert [t for o in alone.outputs.queue for t in o.token_ids] == plain[0]
        assert s.stats.spec.rounds > 0
        rounds = s.stats.spec.rounds
        pair = [Request(tok.encode(p), q) for p, q in zip(prompts, params, strict=True)]
        for r in pair:
            s.submit(r)
        while s.step():
            pass
        assert [[t for o in r.outputs.queue for t in o.token_ids] for r in pair] == plain
        assert s.pool.used_blocks == 0
        assert s.stats.spec.rounds - rounds < 24  # batched while both ran
    finally:
        s.close()
