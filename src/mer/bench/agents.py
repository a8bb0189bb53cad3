"""Simulated coding agents talking to an OpenAI-compatible server, for `mer bench serve`.

Each agent runs a session: the shared system prompt, a task, then turns of
(call a tool, get its result back, think), as OpenAI clients do it: the
request carries the tool schemas (`TOOLS`) with `tool_choice: "required"`, so
even the small bundled model answers with a call whose arguments obey the
schema; the call comes back as `tool_calls`, goes into the history as the
assistant's message, and the tool's result (a slice of real Python source,
the standard library's, of varied length) follows as a `tool` message. A call
cut short by `max_tokens` is not a call: its text goes into the history and
the result follows as a user message. The conversation grows every turn, so
each request's prompt extends the previous one: what prefix reuse is for. All
of it is drawn from a seed, so two runs send the same requests.

Token timing comes from the stream's logprobs: a forced call's text is held by
the server until the call is whole, but each token's logprob is sent as it is
made, so time to first token and per output token are measured, not guessed.
"""

from __future__ import annotations

import contextlib
import json
import random
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mer.errors import MerError
from mer.serve.local import connect

SYSTEM_PROMPT = (
    "You are a careful Python coding agent working in a repository. You can call tools:\n"
    "read_file(path) returns a file's text; grep(pattern) returns matching lines;\n"
    "run_tests(target) returns the test report. Answer each step with exactly one tool\n"
    "call. Keep calls short; never explain them.\n"
)


def _tool(name: str, description: str, param: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {param: {"type": "string", "maxLength": 24}},
                "required": [param],
                "additionalProperties": False,
            },
        },
    }


TOOLS = [
    _tool("read_file", "The text of a file of the repository", "path"),
    _tool("grep", "Lines of the repository matching a regular expression", "pattern"),
    _tool("run_tests", "Run the tests of a module or directory; the report", "target"),
]
# A ChatML template that takes tools (Qwen's Hermes format), for a model whose own
# template takes none (the bundled one): `mer bench serve` serves with it.
TOOLS_TEMPLATE = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}# Tools

You may call one or more functions. Function signatures within <tools></tools>:
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>

For each call, return a JSON object within <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}<|im_start|>user
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
TASKS = [
    "Fix the failing test in the json decoder.",
    "Find where the HTTP client sets its default timeout.",
    "Add type hints to the csv reader helpers.",
    "Explain why the pathlib glob is slow on large trees.",
    "Rename the private helper in shutil that copies metadata.",
    "Find the bug in the argparse help formatter wrapping.",
    "Make the logging handler flush on close.",
    "Write a test for the textwrap dedent edge cases.",
]


@dataclass(frozen=True)
class Turn:
    tool_result: str  # pasted in after the agent's call
    think_seconds: float
    max_tokens: int
    seed: int


@dataclass(frozen=True)
class Session:
    task: str
    turns: list[Turn]


def make_sessions(
    n_agents: int,
    n_turns: int,
    seed: int = 0,
    max_tokens: int = 48,
    result_chars: tuple[int, int] = (120, 900),
    think: float = 0.2,
) -> list[Session]:
    rng = random.Random(seed)
    corpus = _python_source(rng)
    sessions = []
    for a in range(n_agents):
        turns = []
        for t in range(n_turns):
            size = rng.randint(*result_chars)
            start = rng.randrange(max(1, len(corpus) - size))
            turns.append(
                Turn(
                    tool_result=corpus[start : start + size],
                    think_seconds=rng.uniform(0.5, 1.5) * think,
                    max_tokens=max_tokens,
                    seed=seed * 1000 + a * 100 + t,
                )
            )
        sessions.append(Session(TASKS[a % len(TASKS)], turns))
    return sessions


def _python_source(rng: random.Random, files: int = 40) -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(p for p in stdlib.glob("*.py") if p.stat().st_size > 4000)
    if not paths:
        raise MerError(f"no Python sources under {stdlib} to paste as tool results")
    chosen = rng.sample(paths, min(files, len(paths)))
    return "\n".join(p.read_text(errors="replace") for p in chosen)


@dataclass
class RequestTiming:
    ttft: float  # seconds from sending to the first generated text
    tpot: float | None  # seconds per output token after the first (None for one token)
    completion_tokens: int
    prompt_tokens: int


@dataclass
class AgentResult:
    timings: list[RequestTiming] = field(default_factory=list)
    restarts: int = 0  # conversations restarted because the context was full
    tool_calls: int = 0  # turns answered with a whole tool call


def run_agent(
    url: str,
    model: str,
    session: Session,
    context: int,
    gate: threading.Lock | None = None,
    api_key: str | None = None,
) -> AgentResult:
    """Play one session against the server; returns the timing of every request. With a
    `gate`, each request holds it: the agents' requests then run one at a time."""
    result = AgentResult()
    opening = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": session.task},
    ]
    messages = list(opening)
    prompt_tokens = 0
    for turn in session.turns:
        # A real agent compacts its history when the window fills; this one starts over.
        if prompt_tokens + len(turn.tool_result) // 2 + 2 * turn.max_tokens > context:
            messages = list(opening)
            result.restarts += 1
        with gate or contextlib.nullcontext():
            timing, reply, calls = stream_chat(url, model, messages, turn, api_key)
        result.timings.append(timing)
        prompt_tokens = timing.prompt_tokens + timing.completion_tokens
        if calls:
            result.tool_calls += 1
            messages += [
                {"role": "assistant", "content": reply or None, "tool_calls": calls},
                *(
                    {"role": "tool", "tool_call_id": c["id"], "content": turn.tool_result}
                    for c in calls
                ),
            ]
        else:  # cut short by max_tokens: not a call
            messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Tool result:\n" + turn.tool_result},
            ]
        time.sleep(turn.think_seconds)
    return result


def stream_chat(url: str, model: str, messages: list[dict], turn: Turn, api_key=None):
    conn = connect(url, timeout=600)
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": turn.max_tokens,
        "temperature": 0.7,
        "seed": turn.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "logprobs": True,  # each token's entry arrives as it is made: the timing
    }
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise MerError(f"{url}: chat request failed with {resp.status}: {resp.read()[:300]!r}")
    first = last = None
    text, calls, usage = [], [], None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise MerError(f"{url}: generation failed: {event['error']['message']}")
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            delta = choice["delta"]
            tokens = (choice.get("logprobs") or {}).get("content") or []
            if tokens or delta.get("content") or delta.get("tool_calls"):
                last = time.perf_counter()
                first = first or last
            text.append(delta.get("content") or "")
            for call in delta.get("tool_calls") or []:  # each whole, in one delta
                fn = call["function"]
                calls.append(
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": fn["name"], "arguments": fn["arguments"]},
                    }
                )
    conn.close()
    if usage is None:
        raise MerError(f"{url}: the stream ended without usage")
    n = usage["completion_tokens"]
    end = last or time.perf_counter()
    first = first or end
    tpot = (end - first) / (n - 1) if n > 1 else None
    return RequestTiming(first - t0, tpot, n, usage["prompt_tokens"]), "".join(text), calls
