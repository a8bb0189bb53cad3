"""Constrained decoding: the grammar's mask holds in plain, batched and speculative decoding,
and all three choose the same tokens under it."""

from __future__ import annotations

import json

import pytest
import torch

import mer
from mer.engine.generate import generate
from mer.engine.sampling import SamplingParams
from mer.engine.scheduler import Request
from mer.engine.speculative import SpecStats, Speculation, generate_speculative, verify
from mer.engine.steering import Steering
from mer.grammar import GrammarError, Grammars

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "n", "ok"],
    "additionalProperties": False,
}
PROMPT = 'def config():\n    return {"name": '


@pytest.fixture(scope="module")
def target(trained_store):
    m = mer.open(trained_store, ram_budget="1MiB", dtype="float32")
    yield m
    m.close()


@pytest.fixture(scope="module")
def grammars(target):
    cfg = target.config
    return Grammars(target.store.path / "tokenizer.json", cfg.vocab_size, cfg.eos_token_ids)


def steer(grammars) -> Steering:
    return Steering(grammars.constraint(grammars.json_schema(SCHEMA)))


def params(target, temperature: float, seed: int = 0) -> SamplingParams:
    return target.sampling_params(max_tokens=80, temperature=temperature, seed=seed)


def text(target, tokens: list[int]) -> str:
    stops = set(target.config.eos_token_ids)
    return target.tokenizer.decode([t for t in tokens if t not in stops])


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_plain_speculative_and_batched_agree_under_a_grammar(target, grammars, temperature):
    prompt = target.tokenizer.encode(PROMPT)
    p = params(target, temperature, seed=11)
    plain = list(generate(target.transformer, prompt, p, steer=steer(grammars)))
    assert plain[-1] in target.config.eos_token_ids  # the grammar completed, then EOS
    jsonschema.validate(json.loads(text(target, plain)), SCHEMA)

    spec = Speculation("self", k=4, adaptive=False)
    s = steer(grammars)
    speculative = list(generate_speculative(target.transformer, spec, prompt, p, steer=s))
    if temperature == 0:
        assert speculative == plain  # greedy: token for token
    jsonschema.validate(json.loads(text(target, speculative)), SCHEMA)

    sched = target.scheduler(kv_budget="8MiB").start()
    try:
        reqs = [Request(prompt, p, steering=steer(grammars)) for _ in range(3)]
        reqs.append(Request(target.tokenizer.encode("import os\n"), params(target, 0.0)))
        for r in reqs:
            sched.submit(r)
        outs = [[t for o in r for t in o.token_ids] for r in reqs]
    finally:
        sched.close()
    for out in outs[:3]:
        assert out == plain  # batched equals alone (same seed, same grammar)


def test_a_drafted_token_the_grammar_forbids_is_rejected(target, grammars):
    """Greedy verification where the raw argmax is the drafted token, a letter, in a place
    where the grammar (an integer) allows only digits: the draft is rejected."""
    vocab = target.config.vocab_size
    letter = target.tokenizer.encode("x", add_special_tokens=False)[0]
    digit = target.tokenizer.encode("7", add_special_tokens=False)[0]
    logits = torch.zeros(2, vocab)
    logits[:, letter] = 10.0
    logits[:, digit] = 5.0
    s = Steering(grammars.constraint(grammars.json_schema({"type": "integer"})))
    out = verify([letter], [None], logits, SamplingParams(temperature=0), torch.Generator(), s)
    assert out[0] == digit
    assert len(out) == 1
    sampled = verify(
        [letter],
        [torch.full((vocab,), 1 / vocab)],
        logits,
        SamplingParams(temperature=1.0),
        torch.Generator().manual_seed(0),
        Steering(grammars.constraint(grammars.json_schema({"type": "integer"}))),
    )
    assert sampled[0] != letter and len(sampled) == 1


def test_a_schema_that_cannot_compile_names_the_problem(grammars):
    with pytest.raises(GrammarError, match="nowhere"):
        grammars.json_schema({"$ref": "#/definitions/nowhere"})


def test_the_mask_is_llguidances_own_bitmask_applied(grammars):
    """mer applies the bitmask itself (numpy unpacking, not llguidance.torch's compiled
    kernel): at every step of a JSON text the masked row equals llguidance's reference
    application of the same bitmask, and the text's own next token stays allowed."""
    import llguidance.numpy as lln

    c = grammars.constraint(grammars.json_schema(SCHEMA))
    tokens = grammars.tokenizer.tokenize_str('{"name":"ab","n":42,"ok":true}')
    row = torch.randn(grammars.vocab_size, generator=torch.Generator().manual_seed(0))
    for token in tokens:
        ours = row.clone()
        c.mask(ours)
        reference = row.clone().numpy()
        lln.apply_token_bitmask_inplace(reference, c.bitmask)
        assert torch.equal(ours, torch.from_numpy(reference))
        assert ours[token] == row[token]
        assert 0 < int(torch.isfinite(ours).sum()) < grammars.vocab_size
        c.advance(token)
    assert c.complete


def test_a_tokenizer_with_tokens_past_the_models_vocab(target, tmp_path):
    """A GGUF's tokenizer may add a token past the embedding (<|endoftext|> at id 32000 of
    a 32,000 vocab): the grammar engine takes it, and the mask still fits the logits."""
    tok = json.loads((target.store.path / "tokenizer.json").read_text())
    vocab = target.config.vocab_size
    tok["added_tokens"].append(
        {
            "id": vocab,
            "content": "<|extra|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    g = Grammars(tmp_path / "tokenizer.json", vocab, target.config.eos_token_ids)
    assert g.n_vocab == vocab + 1
    row = torch.zeros(vocab)
    g.constraint(g.json_schema({"type": "integer"})).mask(row)
    digit = target.tokenizer.encode("7", add_special_tokens=False)[0]
    letter = target.tokenizer.encode("x", add_special_tokens=False)[0]
    assert row[digit] == 0 and row[letter] == float("-inf")


@pytest.mark.parametrize("drafter", ["self", "model"])
def test_drafts_follow_the_grammar(target, grammars, draft_store, drafter):
    """Drafts are drawn from masked rows and the grammar is rolled back before verification:
    greedy output equals plain constrained decoding token for token, and acceptance under
    a schema is not below unconstrained acceptance (unmasked, most drafts of a JSON text
    are tokens the grammar forbids: 2.4% accepted here against 52% masked)."""
    prompt = target.tokenizer.encode(PROMPT)
    p = params(target, 0.0)
    opened = mer.open(draft_store, ram_budget="64MiB", dtype="float32")
    draft = "self" if drafter == "self" else opened.transformer
    try:
        rates = accept_rates(target, grammars, draft, prompt, p)
    finally:
        opened.close()
    assert rates["schema"] >= rates["free"] - 0.05, rates


def accept_rates(target, grammars, draft, prompt, p) -> dict[str, float]:
    rates = {}
    for mode in ("free", "schema"):
        s = steer(grammars) if mode == "schema" else None
        plain = list(generate(target.transformer, prompt, p, steer=steer(grammars) if s else None))
        stats = SpecStats()
        spec = Speculation(draft, k=4, adaptive=False)
        out = list(generate_speculative(target.transformer, spec, prompt, p, spec=stats, steer=s))
        assert out == plain
        assert stats.drafted > 0
        rates[mode] = stats.acceptance_rate
        if s is not None:
            assert s.drafted == 0  # every draft was rolled back
            jsonschema.validate(json.loads(text(target, out)), SCHEMA)
    return rates


def test_a_rolled_back_draft_leaves_the_mask_as_it_was(grammars):
    s = Steering(grammars.constraint(grammars.json_schema({"type": "boolean"})))
    row = torch.zeros(grammars.vocab_size)
    before = s.logits(row)
    for token in grammars.tokenizer.tokenize_str("true"):
        s.draft(token)
    assert s.drafted == len(grammars.tokenizer.tokenize_str("true"))
    s.undraft()
    assert s.drafted == 0
    assert torch.equal(s.logits(row), before)


def test_bench_grammar_prints_both_modes_and_the_mask_share(trained_store, capsys):
    from mer.cli import main

    args = ["bench", "grammar", "--store", str(trained_store), "--prompts", "2"]
    assert main([*args, "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    plain = [line for line in out.splitlines() if "│       plain │" in line]
    schema = [line for line in out.splitlines() if "│ json schema │" in line]
    assert len(plain) == 1 and len(schema) == 1
    cells = [c.strip() for c in schema[0].split("│")[1:-1]]
    assert cells[4].endswith("%") and 0 < float(cells[4][:-1]) < 100  # the mask's share
    assert float(cells[3]) > 0  # µs per token
