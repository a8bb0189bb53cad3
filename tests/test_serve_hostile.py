"""Hostile input against a real `mer serve`: every request field of /v1/completions and
/v1/chat/completions given values of the wrong type, out of range, empty, huge, NaN or
inf, lone surrogates and bytes that are not UTF-8, drawn by hypothesis.

Each answer must be an OpenAI-shaped 4xx or a correct 200 (never a 5xx, never a
hang), and after each one the server must still answer a well-formed request with
the same text as on a fresh start. A sweep gives every field every value of a fixed
hostile list; hypothesis then draws combinations of fields and nested values. One
server serves the whole module, with every expert in RAM so that answers are quick.
"""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mer.serve.local import LocalServer

MODEL = "stdlib"
WELL_FORMED = {"model": MODEL, "prompt": "def fibonacci(n):\n", "max_tokens": 4, "temperature": 0}
EXAMPLES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def server(trained_store):
    options = ["--model-name", MODEL, "--ram-budget", "64MiB", "--kv-budget", "16MiB"]
    with LocalServer(trained_store, *options) as local:
        yield local.port


@pytest.fixture(scope="module")
def reference(server) -> str:
    status, body = post(server, "/v1/completions", encode(WELL_FORMED))
    assert status == 200
    return body["choices"][0]["text"]


def encode(body) -> bytes:
    """As a careless client would send it: NaN and Infinity as bare words, lone surrogates
    as \\ud800 escapes (json.dumps writes both)."""
    return json.dumps(body, allow_nan=True).encode()


def post(port: int, path: str, raw: bytes) -> tuple[int, dict | str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    payload = resp.read().decode()
    conn.close()
    is_json = resp.getheader("content-type", "").startswith("application/json")
    return resp.status, json.loads(payload) if is_json else payload


# ---- hostile values ----

SPECIAL = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**4000,
    0.0, -0.0, 0.5, 1e-40, 1e-300, 5e-324, 2.5, 1e308, float("nan"), float("inf"),
    float("-inf"), "", " ", "0", "1.5", "NaN", "\x00", "\ud800", "a\udfffb", "x" * 20_000,
    [], [None], [1.5], [""], [[]], {}, {"a": 1}, {"type": "text"},
]  # fmt: skip

KEYS = st.text(max_size=8) | st.text(st.characters(categories=["Cs", "L"]), max_size=4)
VALUES = st.recursive(
    st.one_of(
        st.sampled_from(SPECIAL),
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=40),
        st.text(st.characters(categories=["Cs", "Co", "Cn", "Cc"]), max_size=8),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=8,
)

COMPLETION_FIELDS = [
    "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n",
    "stream", "stream_options", "echo", "user", "logit_bias",
]  # fmt: skip
CHAT_FIELDS = [
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
    "top_k", "seed", "stop", "n", "stream", "stream_options", "tools", "user",
]  # fmt: skip

MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from(["user", "system", "assistant", "tool", "wizard"]) | VALUES,
        "content": VALUES
        | st.lists(st.fixed_dictionaries({"type": VALUES | st.just("text"), "text": VALUES})),
        "name": VALUES,
    },
)
CHAT_BASE = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a function."}],
    "max_tokens": 4,
    "max_completion_tokens": 4,  # either bounds the answer when the other is made hostile
}


def hostile(base: dict, fields: list[str], extra: dict | None = None):
    """The well-formed base with one to three fields replaced, removed or added (unknown
    keys, lone surrogates among them)."""
    changes = st.dictionaries(
        st.sampled_from(fields) | KEYS, VALUES | st.just(...) | st.one_of(*(extra or {}).values()),
        min_size=1, max_size=3,
    )  # fmt: skip

    def apply(edit: dict) -> dict:
        body = dict(base)
        for key, value in edit.items():
            if value is ...:
                body.pop(key, None)
            else:
                body[key] = value
        return body

    return changes.map(apply)


def not_utf8(base: dict):
    """A well-formed body with bytes that are not UTF-8 spliced into a string."""
    bad = st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80", b"\x80"])
    raw = encode(base)
    at = raw.index(b'": "') + 4  # inside the first string value
    return bad.map(lambda b: raw[:at] + b + raw[at:])


# ---- the checks ----


def check_answer(port: int, path: str, raw: bytes, body: dict | None, reference: str) -> None:
    check_reply(path, raw, body, *post(port, path, raw))
    check_unharmed(port, reference)


def check_reply(path: str, raw: bytes, body: dict | None, status: int, answer) -> None:
    """An OpenAI-shaped 4xx, or a 200 that is a correct answer to `body`."""
    assert status < 500, (status, answer, raw[:300])
    if status != 200:
        assert 400 <= status < 500 and isinstance(answer, dict), (status, answer)
        error = answer["error"]
        assert isinstance(error["message"], str) and error["message"]
        assert isinstance(error["type"], str) and error["type"]
        assert set(error) == {"message", "type", "param", "code"}
    else:
        assert body is not None
        check_success(path, body, answer)


def check_unharmed(port: int, reference: str) -> None:
    """The next well-formed request gets the answer a fresh server gives."""
    status, done = post(port, "/v1/completions", encode(WELL_FORMED))
    assert status == 200 and done["choices"][0]["text"] == reference


def check_success(path: str, body: dict, answer) -> None:
    chat = path.endswith("chat/completions")
    limit = body.get("max_completion_tokens" if chat else "max_tokens")
    if chat and limit is None:
        limit = body.get("max_tokens")
    if body.get("stream") is True:
        assert isinstance(answer, str) and answer.endswith("data: [DONE]\n\n"), answer[-300:]
        events = [json.loads(e[6:]) for e in answer.split("\n\n") if e.startswith("data: {")]
        assert events and all("error" not in e for e in events), answer[-300:]
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert reasons in (["stop"], ["length"]), reasons
        return
    choice = answer["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    text = choice["message"]["content"] if chat else choice["text"]
    assert isinstance(text, str)
    used = answer["usage"]
    assert used["total_tokens"] == used["prompt_tokens"] + used["completion_tokens"]
    if isinstance(limit, int) and not isinstance(limit, bool):
        assert used["completion_tokens"] <= limit


@pytest.mark.parametrize(
    ("path", "base", "fields"),
    [
        ("/v1/completions", WELL_FORMED, COMPLETION_FIELDS),
        ("/v1/chat/completions", CHAT_BASE, CHAT_FIELDS),
    ],
)
def test_every_field_with_every_hostile_value(server, reference, path, base, fields):
    failures = []
    for field in [*fields, "messages[0].role", "messages[0].content"]:
        for value in SPECIAL:
            body = dict(base)
            if field.startswith("messages["):
                if "messages" not in base:
                    continue
                key = field.split(".")[1]
                body["messages"] = [{**base["messages"][0], key: value}]
            else:
                body[field] = value
            raw = encode(body)
            try:
                check_reply(path, raw, body, *post(server, path, raw))
            except AssertionError as e:
                failures.append(f"{field}={value!r:.60}: {str(e)[:300]}")
        check_unharmed(server, reference)
    assert not failures, "\n".join(failures)


@EXAMPLES
@given(body=hostile(WELL_FORMED, COMPLETION_FIELDS))
def test_hostile_completion_fields(server, reference, body):
    check_answer(server, "/v1/completions", encode(body), body, reference)


@EXAMPLES
@given(body=hostile(CHAT_BASE, CHAT_FIELDS, {"messages": st.lists(MESSAGE, max_size=3)}))
def test_hostile_chat_fields(server, reference, body):
    check_answer(server, "/v1/chat/completions", encode(body), body, reference)


@settings(EXAMPLES, max_examples=20)
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    raw=not_utf8(WELL_FORMED) | not_utf8(CHAT_BASE) | st.binary(max_size=64),
)
def test_bodies_that_are_not_utf8_json(server, reference, path, raw):
    check_answer(server, path, raw, None, reference)
