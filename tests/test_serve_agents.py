"""What agents ask of `mer serve` beyond text: logprobs, structured output, tool calls.

A real server on localhost, spoken to by the official `openai` client, alone and under
concurrent (batched) requests."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tests.test_serve import MODEL, completion_text, start_server

import mer

openai = pytest.importorskip("openai")

WELL_FORMED = {"model": MODEL, "prompt": "def fibonacci(n):\n", "max_tokens": 8, "temperature": 0}
PROMPT = "import os\n"


@pytest.fixture(scope="module")
def server(trained_store):
    with start_server(trained_store) as local:
        yield local.port


@pytest.fixture(scope="module")
def reference(server) -> str:
    return completion_text(server, WELL_FORMED)


@pytest.fixture(autouse=True)
def _still_serving(server, reference):
    yield
    assert completion_text(server, WELL_FORMED) == reference


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server}/v1", api_key="unused")


@pytest.fixture(scope="module")
def first_logprobs(trained_store) -> torch.Tensor:
    """The model's log-distribution of the first token after PROMPT, computed here."""
    with mer.open(trained_store, ram_budget="64MiB") as model:
        ids = model.tokenizer.encode(PROMPT)
        logits = model.transformer.forward(torch.tensor(ids), model.transformer.new_kv_cache(64))
        return torch.log_softmax(logits[-1].float(), -1)


def test_completion_logprobs_are_the_models(client, first_logprobs):
    out = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.token_logprobs) == out.usage.completion_tokens
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset[0] == 0
    want, best = torch.topk(first_logprobs, 3)
    assert lp.token_logprobs[0] == pytest.approx(float(want[0]), abs=1e-3)  # greedy: the argmax
    assert list(lp.top_logprobs[0].values()) == pytest.approx(want.tolist(), abs=1e-3)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-4


def chat_logprobs(client, seed: int, stream: bool):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Write a sort function."}],
        max_tokens=12,
        temperature=1.0,
        seed=seed,
        logprobs=True,
        top_logprobs=5,
    )
    if not stream:
        out = client.chat.completions.create(**kw)
        return out.choices[0].message.content, out.choices[0].logprobs.content
    text, entries = [], []
    for chunk in client.chat.completions.create(stream=True, **kw):
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].logprobs is not None:
                entries += chunk.choices[0].logprobs.content
    return "".join(text), entries


def check_sampled(content: str, entries) -> None:
    assert entries and "".join(e.token for e in entries).startswith(content)
    for e in entries:
        assert e.logprob <= 0 and e.bytes == list(e.token.encode())
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert sum(math.exp(t) for t in tops) <= 1 + 1e-4
        # the sampled token is among the top five, or less likely than all of them
        listed = {t.token: t.logprob for t in e.top_logprobs}
        if e.token in listed:
            assert e.logprob == pytest.approx(listed[e.token], abs=1e-5)
        else:
            assert e.logprob <= tops[-1] + 1e-5


def test_chat_logprobs_batched_equal_alone_streamed_and_whole(client):
    alone = {seed: chat_logprobs(client, seed, stream=False) for seed in (1, 2)}
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(chat_logprobs, client, s, st) for s in (1, 2) for st in (0, 1)]
        together = [f.result() for f in futures]
    for (seed, _stream), (content, entries) in zip(
        [(s, st) for s in (1, 2) for st in (0, 1)], together, strict=True
    ):
        check_sampled(content, entries)
        want_content, want = alone[seed]
        assert content == want_content
        assert [e.token for e in entries] == [e.token for e in want]
        got_lp, want_lp = [e.logprob for e in entries], [e.logprob for e in want]
        assert got_lp == pytest.approx(want_lp, abs=1e-3)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_logprobs_are_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, **body
        )
    assert e.value.body["param"] == param


TRIP = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
        "hotel": {"type": "boolean"},
        "kind": {"enum": ["work", "leisure"]},
    },
    "required": ["city", "days", "hotel", "kind"],
    "additionalProperties": False,
}


def structured(
    client, seed: int, stream: bool, schema: dict | None = TRIP, max_tokens: int = 96
) -> str:
    fmt = (
        {"type": "json_object"}
        if schema is None
        else {
            "type": "json_schema",
            "json_schema": {"name": "trip", "schema": schema, "strict": True},
        }
    )
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan a trip as JSON."}],
        max_tokens=max_tokens,
        temperature=0.8,
        seed=seed,
        response_format=fmt,
    )
    if not stream:
        out = client.chat.completions.create(**kw)
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_json_schema_output_validates_alone_and_batched(client):
    jsonschema = pytest.importorskip("jsonschema")
    alone = {seed: structured(client, seed, stream=False) for seed in (3, 4, 5)}
    for text in alone.values():
        jsonschema.validate(json.loads(text), TRIP)
    cases = [(s, st) for s in (3, 4, 5) for st in (False, True)]
    with ThreadPoolExecutor(len(cases)) as pool:
        together = list(pool.map(lambda c: structured(client, *c), cases))
    for (seed, _), text in zip(cases, together, strict=True):
        assert text == alone[seed]  # batched equals alone, streamed equals whole


def test_json_object_output_is_an_object(client):
    value = json.loads(structured(client, 7, stream=False, schema=None, max_tokens=400))
    assert isinstance(value, dict)


def test_a_schema_the_engine_cannot_compile_is_a_400(client):
    bad = {"type": "object", "properties": {"a": {"$ref": "#/definitions/missing"}}}
    with pytest.raises(openai.BadRequestError) as e:
        structured(client, 1, stream=False, schema=bad)
    assert e.value.body["param"] == "response_format"
    assert "missing" in e.value.body["message"]


@pytest.mark.parametrize(
    "fmt, param",
    [
        ({"type": "xml"}, "response_format.type"),
        ({"type": "json_schema"}, "response_format.json_schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}},
            "response_format.json_schema.schema",
        ),
        ("json", "response_format"),
    ],
)
def test_bad_response_format_is_400_naming_the_field(client, fmt, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            response_format=fmt,
        )
    assert e.value.body["param"] == param
