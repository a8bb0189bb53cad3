"""The OpenAI wire format: validating request bodies and shaping responses and errors.

Validation is strict about what would change the answer (types, ranges,
unsupported features such as n > 1 or a presence penalty, `UNSUPPORTED`; tools are
`mer.serve.tools`) and lenient about fields that do not (user, metadata, ...), as OpenAI
clients send many of those.
Every failure is an `ApiError` that renders in OpenAI's error shape. The body
must be strict JSON (no NaN or Infinity) whose strings are valid Unicode (no
lone surrogates, which JSON's escapes can spell but no tokenizer can encode).
Sampling ranges are not checked here: `SamplingParams` holds the one rule.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field

ROLES = {"system", "developer", "user", "assistant", "tool"}
# Fields that would change the answer and that this server does not implement, with the
# value that means "off": any other value is a 400 naming the field, never ignored.
UNSUPPORTED = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "repetition_penalty": 1,  # vLLM's
    "min_p": 0,  # vLLM's
    "logit_bias": {},
    "best_of": 1,
    "suffix": "",
    "functions": [],  # the deprecated form of tools
    "function_call": "auto",
    "prediction": None,
    "audio": None,
    "modalities": ["text"],
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's field name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class GenerationRequest:
    """What both endpoints ask for, validated; `prompt` is text or token ids."""

    model: str
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no logprobs; n: the sampled token's and the top n
    json_schema: dict | None = None  # the output must be JSON valid against it ...
    json_output: bool = False  # ... when this is set ({"type": "object"} for json_object)
    echo: bool = False  # completions: the prompt's text comes before the completion's


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an int over 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    if (where := _lone_surrogate(body)) is not None:
        raise ApiError(
            400, f"{where} contains a lone surrogate: not valid Unicode", param=where or None
        )
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _lone_surrogate(body: dict) -> str | None:
    """The path of a string (key or value) that cannot be encoded as UTF-8, if any; the
    path itself is printable (a bad key shows as its escape, e.g. \\ud800)."""
    stack: list[tuple[str, object]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path or "request body"
        elif isinstance(value, dict):
            for key, item in value.items():
                key_text = key.encode("utf-8", "backslashreplace").decode()
                where = f"{path}.{key_text}" if path else key_text
                stack.append((where, key))
                stack.append((where, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def parse_chat(body: dict) -> GenerationRequest:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}] needs a role among {', '.join(sorted(ROLES))}",
                param=f"messages[{i}].role",
            )
        parsed.append({"role": m["role"], "content": _content(m.get("content"), i)})
    req = _common(body, max_tokens_keys=("max_completion_tokens", "max_tokens"))
    req.messages = parsed
    _response_format(body, req)
    top = body.get("top_logprobs")
    if body.get("logprobs") is not None and _typed(body, "logprobs", bool, "logprobs"):
        req.logprobs = 0 if top is None else _number(body, "top_logprobs", int, lo=0, hi=20)
    elif top is not None:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return req


def parse_completion(body: dict) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ApiError(
                400, "'prompt' must be a string or a non-empty list of token ids", param="prompt"
            )
    elif not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
    req = _common(body, max_tokens_keys=("max_tokens",), default_max_tokens=16)
    req.prompt = prompt
    _response_format(body, req)
    if body.get("logprobs") is not None:
        req.logprobs = _number(body, "logprobs", int, lo=0, hi=20)
    req.echo = body.get("echo") is not None and _typed(body, "echo", bool, "echo")
    return req


def _response_format(body: dict, req: GenerationRequest) -> None:
    fmt = body.get("response_format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise ApiError(400, "'response_format' must be an object", param="response_format")
    kind = fmt.get("type")
    if kind == "text":
        return
    if kind == "json_object":
        req.json_output, req.json_schema = True, {"type": "object"}
        return
    if kind != "json_schema":
        raise ApiError(
            400,
            "response_format.type must be 'text', 'json_object' or 'json_schema'",
            param="response_format.type",
        )
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ApiError(
            400,
            "response_format.json_schema must be an object with a 'name'",
            param="response_format.json_schema",
        )
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ApiError(
            400,
            "response_format.json_schema.schema must be an object",
            param="response_format.json_schema.schema",
        )
    _typed(spec, "strict", bool, "response_format.json_schema.strict", default=False)
    req.json_output, req.json_schema = True, schema  # strict or not, the output obeys it


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise ApiError(
                    400, "only text content parts are supported", param=f"messages[{i}].content"
                )
            parts.append(_typed(part, "text", str, f"messages[{i}].content"))
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"messages[{i}].content must be a string", param=f"messages[{i}].content")


def _common(body: dict, max_tokens_keys, default_max_tokens: int | None = None):
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' must be a non-empty string", param="model")
    for key, off in UNSUPPORTED.items():
        if body.get(key) is not None and body[key] != off:
            raise ApiError(400, f"'{key}' is not supported by this server", param=key)
    req = GenerationRequest(model=model, max_tokens=default_max_tokens)
    for key in max_tokens_keys:
        if body.get(key) is not None:
            req.max_tokens = _number(body, key, int, lo=1)
            break
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("temperature") is not None:
        req.temperature = _number(body, "temperature", float)
    if body.get("top_p") is not None:
        req.top_p = _number(body, "top_p", float)
    if body.get("top_k") is not None:
        req.top_k = _number(body, "top_k", int)
    if body.get("seed") is not None:
        req.seed = _number(body, "seed", int, lo=-(2**63), hi=2**64 - 1) % 2**63
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (
            not isinstance(stop, list)
            or len(stop) > 4
            or not all(isinstance(s, str) and s for s in stop)
        ):
            raise ApiError(
                400, "'stop' must be a string or up to 4 non-empty strings", param="stop"
            )
        req.stop = stop
    req.stream = _typed(body, "stream", bool, "stream", default=False)
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object", param="stream_options")
        req.include_usage = _typed(options, "include_usage", bool, "stream_options", False)
    return req


def _number(body: dict, key: str, kind: type, lo=None, hi=None):
    """body[key] as a finite `kind` (an integral float counts as an int), within [lo, hi]."""
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        ok = False
    elif isinstance(value, float):
        if not math.isfinite(value):  # 1e999 parses as inf
            raise ApiError(400, f"'{key}' must be a finite number, got {value}", param=key)
        ok = kind is float or value.is_integer()
    else:
        ok = True
    if not ok:
        raise ApiError(
            400, f"'{key}' must be {'an integer' if kind is int else 'a number'}", param=key
        )
    if kind is float and isinstance(value, int) and abs(value) > 2**1000:
        raise ApiError(400, f"'{key}' must be a finite number", param=key)  # float() overflows
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        big = isinstance(value, int) and abs(value) >= 10**30
        shown = f"an integer of {len(str(abs(value)))} digits" if big else value
        raise ApiError(400, f"'{key}' must be {bounds}, got {shown}", param=key)
    return value


def _typed(body: dict, key: str, kind: type, param: str, default=None):
    value = body.get(key, default)
    if value is None and default is None:
        raise ApiError(400, f"'{key}' is required", param=param)
    if not isinstance(value, kind):
        raise ApiError(400, f"'{key}' must be a {kind.__name__}", param=param)
    return value


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def chat_chunk(rid: str, model: str, delta: dict, finish_reason: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def completion_chunk(
    rid: str, model: str, text: str, finish_reason: str | None, logprobs: dict | None = None
) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}
        ],
    }


def chat_logprobs(entries, token_text) -> dict:
    """Chat's `logprobs` object for `entries` (`TokenLogprob`s); `token_text(id) -> str`."""

    def one(token: int, logprob: float) -> dict:
        text = token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for e in entries:
        item = one(e.token, e.logprob)
        item["top_logprobs"] = [one(t, lp) for t, lp in e.top]
        content.append(item)
    return {"content": content, "refusal": None}


def completion_logprobs(entries, token_text, offset: int) -> dict:
    """The legacy completions `logprobs` object; `offset` is where the first token's text
    starts in the completion."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(e.token))
        offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],  # an echoed prompt's first: null
        "top_logprobs": [
            None if e.top is None else {token_text(t): lp for t, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }
