"""What agents ask of `mer serve` beyond text: logprobs, structured output, tool calls.

A real server on localhost, spoken to by the official `openai` client, alone and under
concurrent (batched) requests."""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from tests.test_serve import MODEL, completion_text, start_server

import mer
from mer.tokenizer import Tokenizer

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


# A Qwen-style template that takes tools (the bundled model's own takes none).
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each function call, return a json object within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"utc_offset": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["utc_offset"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def tools_client(trained_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("tools") / "store"
    shutil.copytree(trained_store, store)
    cfg_path = store / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = TOOLS_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    with start_server(store) as local:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{local.port}/v1", api_key="unused")


def call_tools(client, seed: int, stream: bool, choice="required", parallel=None):
    kw = dict(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        max_tokens=120,
        temperature=0.8,
        seed=seed,
    )
    if parallel is not None:
        kw["parallel_tool_calls"] = parallel
    if not stream:
        out = client.chat.completions.create(**kw).choices[0]
        return (
            out.finish_reason,
            out.message.content,
            [(c.function.name, c.function.arguments) for c in out.message.tool_calls or []],
        )
    reason, content, calls = None, "", []
    for chunk in client.chat.completions.create(stream=True, **kw):
        choice0 = chunk.choices[0] if chunk.choices else None
        if choice0 is None:
            continue
        content += choice0.delta.content or ""
        for c in choice0.delta.tool_calls or []:
            assert c.index == len(calls) and c.id.startswith("call_") and c.type == "function"
            calls.append((c.function.name, c.function.arguments))
        reason = choice0.finish_reason or reason
    return reason, content or None, calls


def check_calls(calls, names=("get_weather", "get_time")) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    assert calls
    for name, arguments in calls:
        assert name in names
        jsonschema.validate(json.loads(arguments), schemas[name])


def test_required_tool_calls_parse_and_validate_streamed_whole_and_batched(tools_client):
    cases = [(seed, stream) for seed in (1, 2, 3) for stream in (False, True)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(lambda c: call_tools(tools_client, *c, parallel=False), cases))
    for (seed, _), (reason, content, calls) in zip(cases, results, strict=True):
        assert reason == "tool_calls" and content is None  # one call, then the grammar ends
        check_calls(calls)
        alone = call_tools(tools_client, seed, stream=False, parallel=False)
        assert [n for n, _ in calls] == [n for n, _ in alone[2]]
        assert [json.loads(a) for _, a in calls] == [json.loads(a) for _, a in alone[2]]


def test_parallel_required_calls_all_validate(tools_client):
    """With parallel calls the model may go on calling until max_tokens: every complete
    call it made is returned, and validates."""
    for stream in (False, True):
        reason, content, calls = call_tools(tools_client, 5, stream, parallel=True)
        assert reason in ("tool_calls", "length") and content is None
        check_calls(calls)


def test_a_named_function_is_the_one_called_once_without_parallel_calls(tools_client):
    named = {"type": "function", "function": {"name": "get_time"}}
    for stream in (False, True):
        reason, _, calls = call_tools(tools_client, 5, stream, choice=named, parallel=False)
        assert reason == "tool_calls" and len(calls) == 1
        check_calls(calls, names=("get_time",))


def test_a_tool_result_goes_back_to_the_model(tools_client):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    out = tools_client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=4, temperature=0
    )
    assert out.usage.prompt_tokens > 60  # the tools, the call and its result are all in it
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_template_renders_tools_and_history():
    from mer.chat import ChatTemplate

    text = ChatTemplate(TOOLS_TEMPLATE).render(
        [
            *ASK,
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "P"}}}],
            },
            {"role": "tool", "content": "sunny"},
        ],
        tools=[WEATHER],
    )
    assert '"name": "get_weather"' in text and '{"city": "P"}' in text
    assert "<tool_response>\nsunny" in text


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        (
            {
                "tools": [WEATHER],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "response_format",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_the_field(tools_client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        tools_client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, **body)
    assert e.value.body["param"] == param


def test_tools_on_a_template_without_them_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=2, tools=[WEATHER])
    assert e.value.body["param"] == "tools"


# DeepSeek's tool-call markers, each one special token (as in DeepSeek-V3's tokenizer).
DEEPSEEK_MARKS = [
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁sep｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁calls▁end｜>",
]
DEEPSEEK_TEMPLATE = """{%- if tools %}## Tools
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call a tool as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
```json
ARGUMENTS
```<｜tool▁call▁end｜><｜tool▁calls▁end｜>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'user' %}<｜User｜>{{ message.content }}
{%- elif message.role == 'tool' %}<｜tool▁output▁begin｜>{{ message.content }}
{%- elif message.role == 'assistant' %}<｜Assistant｜>{{ message.content or '' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<｜Assistant｜>{% endif %}"""


def with_special_marks(tokenizer: dict, marks: list[str]) -> dict:
    """The tokenizer with `marks` as special tokens in place of its last merges (the
    rarest), so their ids are inside the model's vocabulary."""
    bpe = tokenizer["model"]
    by_id = {i: t for t, i in bpe["vocab"].items()}
    first = len(bpe["vocab"]) - len(marks)
    for tid in range(len(bpe["vocab"]) - 1, first - 1, -1):
        a, b = bpe["merges"].pop()
        assert a + b == by_id[tid]  # the last merges made the last tokens
        del bpe["vocab"][by_id[tid]]
    for tid, mark in enumerate(marks, start=first):
        tokenizer["added_tokens"].append(
            {
                "id": tid,
                "content": mark,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
        )
    return tokenizer


@pytest.fixture(scope="module")
def deepseek_client(trained_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("deepseek-tools") / "store"
    shutil.copytree(trained_store, store)
    tok = json.loads((store / "tokenizer.json").read_text())
    (store / "tokenizer.json").write_text(json.dumps(with_special_marks(tok, DEEPSEEK_MARKS)))
    cfg_path = store / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg["chat_template"] = DEEPSEEK_TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    with start_server(store) as local:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{local.port}/v1", api_key="unused")


def test_calls_written_with_special_tokens_are_parsed(deepseek_client):
    """The forced call is written with DeepSeek's markers as special tokens (the grammar
    asks for the tokens themselves): the parser sees them, decoded kept, and the calls come
    back parsed and valid, streamed and whole, with no marker left in the content."""
    for stream in (False, True):
        reason, content, calls = call_tools(deepseek_client, 3, stream, parallel=True)
        assert reason in ("tool_calls", "length") and content is None
        check_calls(calls)
    for stream in (False, True):
        reason, content, calls = call_tools(deepseek_client, 4, stream, parallel=False)
        assert reason == "tool_calls" and content is None and len(calls) == 1
        check_calls(calls)
    # The markers are single tokens: the whole call takes far fewer tokens than its text.
    out = deepseek_client.chat.completions.create(
        model=MODEL, messages=ASK, tools=[TIME], tool_choice="required", max_tokens=80
    )
    call = out.choices[0].message.tool_calls[0].function
    spelled = len("".join(DEEPSEEK_MARKS)) + len("function") + len(call.name)
    assert out.usage.completion_tokens < spelled


def test_echo_gives_the_prompt_back_before_the_completion(client, trained_store):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0)
    plain = client.completions.create(**kw).choices[0].text
    echoed = client.completions.create(echo=True, **kw)
    assert echoed.choices[0].text == PROMPT + plain
    assert echoed.usage.completion_tokens == 6
    streamed = "".join(
        c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kw)
    )
    assert streamed == PROMPT + plain
    tokenizer = Tokenizer.from_dir(trained_store)
    ids = tokenizer.encode(PROMPT)  # token ids echo as their text
    by_ids = client.completions.create(**{**kw, "prompt": ids}, echo=True)
    assert by_ids.choices[0].text == tokenizer.decode(ids) + plain


LONG_PROMPT = (
    "import os\nimport sys\n\n\ndef main(argv):\n"
    "    for name in argv[1:]:\n        print(os.path.abspath(name))\n"
)


def test_echo_with_logprobs_scores_the_prompt(client, trained_store):
    """The prompt's tokens come back with their logprobs under the model (the first null,
    as OpenAI gives it), then the completion's, the same alone, again (its prefix now
    cached: a scored prompt runs whole) and batched with other requests. The server runs
    bf16, where a packed pass may take another int4 kernel than one whole forward (the
    kernel is chosen per token count by measuring, and the int8-activation kernel rounds
    activations per group: 0.0226 apart was seen on a quiet machine): values agree to 5e-2,
    as that kernel's own tolerance; a token off by one position would be off by nats."""
    kw = dict(model=MODEL, prompt=LONG_PROMPT, max_tokens=4, temperature=0, logprobs=2)
    TOL = 5e-2  # noqa: N806
    plain = client.completions.create(**kw).choices[0]
    with mer.open(trained_store, ram_budget="64MiB") as model:
        ids = model.tokenizer.encode(LONG_PROMPT)
        kv = model.transformer.new_kv_cache(len(ids))
        logits = model.transformer.forward(torch.tensor(ids), kv, all_logits=True)
        want = torch.log_softmax(logits.float(), -1)
    assert len(ids) > 32  # two KV blocks: a prefix the cache could give

    def echoed():
        return client.completions.create(echo=True, **kw).choices[0]

    with ThreadPoolExecutor(4) as pool:
        runs = [echoed(), echoed(), *pool.map(lambda _: echoed(), range(3))]
    for out in runs:
        lp = out.logprobs
        assert out.text == LONG_PROMPT + plain.text
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        n = len(ids)
        assert len(lp.tokens) == n + 4 and lp.text_offset[0] == 0
        for pos in range(1, n):
            assert lp.token_logprobs[pos] == pytest.approx(float(want[pos - 1, ids[pos]]), abs=TOL)
            assert max(lp.top_logprobs[pos].values()) == pytest.approx(
                float(want[pos - 1].max()), abs=TOL
            )
        assert lp.token_logprobs[n:] == pytest.approx(plain.logprobs.token_logprobs, abs=TOL)
        assert lp.tokens[n:] == plain.logprobs.tokens
    streamed = list(client.completions.create(echo=True, stream=True, **kw))
    text = "".join(c.choices[0].text for c in streamed)
    entries = [
        v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs
    ]
    assert text == LONG_PROMPT + plain.text
    want_entries = runs[0].logprobs.token_logprobs
    assert entries[0] is None and entries[1:] == pytest.approx(want_entries[1:], abs=TOL)


@pytest.mark.parametrize("body", [{"echo": "yes"}, {"echo": 1}])
def test_bad_echo_is_400_naming_it(client, body):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **body)
    assert e.value.body["param"] == "echo"


def test_bench_agents_call_tools_and_send_their_results_back(tools_client):
    """`mer bench serve`'s agents: every turn a forced call to one of the bench's tools,
    valid against its schema, whose result goes back as a tool message (the next prompt
    holds it)."""
    from mer.bench.agents import TOOLS, make_sessions, run_agent, stream_chat

    url = str(tools_client.base_url)
    (session,) = make_sessions(1, 3, seed=4, think=0.0, result_chars=(100, 200))
    result = run_agent(url, MODEL, session, context=1024)
    assert result.tool_calls == 3 and result.restarts == 0
    prompts = [t.prompt_tokens for t in result.timings]
    assert prompts == sorted(prompts) and prompts[-1] > prompts[0] + 60  # results went back
    timing, _, calls = stream_chat(
        url, MODEL, [{"role": "user", "content": "go"}], session.turns[0]
    )
    jsonschema = pytest.importorskip("jsonschema")
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    (call,) = calls
    jsonschema.validate(
        json.loads(call["function"]["arguments"]), schemas[call["function"]["name"]]
    )
    assert timing.ttft > 0 and timing.completion_tokens > 1 and timing.tpot > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "--chat-template"), ("{% for %}", "chat template does not parse")],
)
def test_serve_rejects_a_bad_chat_template_in_one_line(
    trained_store, tmp_path, capsys, content, message
):
    from mer.cli import main

    path = tmp_path / "template.jinja"
    if content is not None:
        path.write_text(content)
    assert main(["serve", "--store", str(trained_store), "--chat-template", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frequency_penalty": -1}, "frequency_penalty"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"best_of": 2}, "best_of"),
        ({"suffix": "\n"}, "suffix"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_not_ignored(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, **body)
    assert e.value.body["param"] == param and "not supported" in e.value.body["message"]


def test_their_off_values_are_accepted(client):
    out = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=2,
        presence_penalty=0,
        frequency_penalty=0.0,
        logit_bias={},
        best_of=1,
        user="someone",
    )
    assert out.usage.completion_tokens == 2
