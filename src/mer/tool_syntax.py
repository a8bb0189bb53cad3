"""Tool calls as each model family writes them: parsing completions into calls, writing calls
back (for history and tests), and the grammar that forces a call whose arguments obey a schema.

A `ToolCall` is a function name and its arguments (a dict). Each `Syntax` knows its
family's documented format:

- hermes (Qwen2/Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
- mistral (Mixtral, Mistral v3 tokenizer): `[TOOL_CALLS] [{"name": ..., "arguments": {...}}]`
- deepseek (V2.5/V3): `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
  \\n```json\\n{...}\\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>`
- glm (GLM-4.5): `<tool_call>NAME\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>`
- harmony (gpt-oss): `<|start|>assistant<|channel|>commentary to=functions.NAME
  <|constrain|>json<|message|>{...}<|call|>`

`parse(text)` returns the content before the first call and the calls (none when the text
holds no well-formed call: it is then plain content). `start` is the marker a call begins
with, so a stream can hold text back from the first character that might begin one.
`grammar(tools, parallel, special)` is Lark source (llguidance's dialect, `%json` for a
schema) for one call, or one or more, to any of `tools`, or None where the family's
arguments are not one JSON value (glm), which then cannot be forced. A marker that is one
of the tokenizer's special tokens (`special`: text -> id; DeepSeek's
<｜tool▁calls▁begin｜>, harmony's <|channel|>, <|call|>) is written as that token
(`<[id]>`): a quoted string would match only its text spelled out in ordinary tokens,
which the model never writes. The text parsed must then hold the special tokens too
(decoded with them kept; the server shows the user the content without them).

The syntax is chosen from the chat template (the markers it writes), then the family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict


class Syntax:
    name = ""
    start = ""

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        at = text.find(self.start)
        if at < 0:
            return text, []
        try:
            calls = self._calls(text[at:])
        except (ValueError, KeyError, TypeError, AttributeError):
            return text, []
        return (text[:at], calls) if calls else (text, [])

    def render(self, calls: list[ToolCall]) -> str:
        raise NotImplementedError

    def grammar(
        self, tools: list[dict], parallel: bool, special: dict[str, int] | None = None
    ) -> str | None:
        """Lark source forcing calls to `tools` ([{"name", "parameters"}]); None if
        unsupported. `special`: the tokenizer's special tokens (text -> id)."""
        return None

    def _calls(self, text: str) -> list[ToolCall]:
        raise NotImplementedError


def _call_schema(tools: list[dict]) -> dict:
    """{"name": ..., "arguments": ...} for any of `tools`, each with its own arguments."""
    return {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": _params(t)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in tools
        ]
    }


def _params(tool: dict) -> dict:
    return tool.get("parameters") or {"type": "object"}


NL = "\n"


def _lit(text: str, special: dict[str, int] | None = None) -> str:
    """`text` as a Lark sequence: quoted strings, and `<[id]>` for each special token in it."""
    marks = [m for m in (special or {}) if m and m in text]
    if not marks:
        return json.dumps(text)
    parts = re.split(
        "(" + "|".join(map(re.escape, sorted(marks, key=len, reverse=True))) + ")", text
    )
    return " ".join(f"<[{special[p]}]>" if p in special else json.dumps(p) for p in parts if p)


def _args(value) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict):
        raise ValueError("arguments must be an object")
    return value


class Hermes(Syntax):
    name, start = "hermes", "<tool_call>"
    _call = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)

    def _calls(self, text):
        calls = []
        for body in self._call.findall(text):
            obj = json.loads(body)
            calls.append(ToolCall(obj["name"], _args(obj.get("arguments", {}))))
        return calls

    def render(self, calls):
        return "\n".join(
            f"<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>"
            for c in calls
        )

    def grammar(self, tools, parallel, special=None):
        body = _json(_call_schema(tools))
        call = f"{_lit('<tool_call>' + NL, special)} {body} {_lit(NL + '</tool_call>', special)}"
        more = f" ({_lit(NL)} call)*" if parallel else ""
        return f"start: call{more}\ncall: {call}\n"


class Mistral(Syntax):
    name, start = "mistral", "[TOOL_CALLS]"

    def _calls(self, text):
        body = text[len(self.start) :].strip()
        value, _ = json.JSONDecoder().raw_decode(body)
        value = value if isinstance(value, list) else [value]
        return [ToolCall(v["name"], _args(v.get("arguments", {}))) for v in value]

    def render(self, calls):
        return self.start + json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls])

    def grammar(self, tools, parallel, special=None):
        items = {"type": "array", "items": _call_schema(tools), "minItems": 1}
        if not parallel:
            items["maxItems"] = 1
        return f"start: {_lit(self.start, special)} {_json(items)}\n"


class DeepSeek(Syntax):
    name = "deepseek"
    start = "<｜tool▁calls▁begin｜>"
    begin, sep, end = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
    close = "<｜tool▁calls▁end｜>"
    _call = re.compile(
        r"<｜tool▁call▁begin｜>function<｜tool▁sep｜>(.*?)\n```json\n(.*?)\n```<｜tool▁call▁end｜>",
        re.S,
    )

    def _calls(self, text):
        return [ToolCall(name.strip(), _args(body)) for name, body in self._call.findall(text)]

    def render(self, calls):
        inner = "".join(
            f"{self.begin}function{self.sep}{c.name}\n```json\n{json.dumps(c.arguments)}\n```"
            f"{self.end}"
            for c in calls
        )
        return f"{self.start}{inner}{self.close}"

    def grammar(self, tools, parallel, special=None):
        head = self.begin + "function" + self.sep
        alts = " | ".join(
            f"{_lit(head + t['name'] + NL + '```json' + NL, special)} "
            f"{_json(_params(t))} {_lit(NL + '```' + self.end, special)}"
            for t in tools
        )
        more = " call*" if parallel else ""
        start, close = _lit(self.start, special), _lit(self.close, special)
        return f"start: {start} call{more} {close}\ncall: {alts}\n"


class Glm(Syntax):
    name, start = "glm", "<tool_call>"
    _call = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
    _pair = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)

    def _calls(self, text):
        calls = []
        for body in self._call.findall(text):
            name = body.split("<arg_key>", 1)[0].strip()
            if not name or name.startswith("{"):
                raise ValueError("not a GLM call")
            args = {}
            for key, value in self._pair.findall(body):
                try:
                    args[key.strip()] = json.loads(value)
                except ValueError:
                    args[key.strip()] = value  # strings are written bare
            calls.append(ToolCall(name, args))
        return calls

    def render(self, calls):
        out = []
        for c in calls:
            pairs = "".join(
                f"<arg_key>{k}</arg_key>\n<arg_value>"
                f"{v if isinstance(v, str) else json.dumps(v)}</arg_value>\n"
                for k, v in c.arguments.items()
            )
            out.append(f"<tool_call>{c.name}\n{pairs}</tool_call>")
        return "\n".join(out)


class Harmony(Syntax):
    name = "harmony"
    start = "<|channel|>commentary to=functions."
    # <|call|> is one of gpt-oss's stop tokens, so the text may end where it would be
    _call = re.compile(
        r"<\|channel\|>commentary to=functions\.([\w.-]+)\s*(?:<\|constrain\|>json)?"
        r"<\|message\|>(.*?)(?:<\|call\|>|\Z)",
        re.S,
    )

    def parse(self, text):
        # the call may be preceded by "<|start|>assistant" (a later turn): not content
        content, calls = super().parse(text)
        if calls and content.endswith("<|start|>assistant"):
            content = content[: -len("<|start|>assistant")]
        return content, calls

    def _calls(self, text):
        return [ToolCall(name, _args(body)) for name, body in self._call.findall(text)]

    def render(self, calls):
        return "".join(
            f"{self.start}{c.name} <|constrain|>json<|message|>{json.dumps(c.arguments)}<|call|>"
            for c in calls
        )

    def grammar(self, tools, parallel, special=None):
        if parallel:
            return None  # harmony ends the turn at <|call|>: one call per message
        alts = " | ".join(
            f"{_lit(self.start + t['name'] + ' <|constrain|>json<|message|>', special)} "
            f"{_json(_params(t))} {_lit('<|call|>', special)}"
            for t in tools
        )
        return f"start: {alts}\n"


SYNTAXES = {s.name: s for s in (Hermes(), Mistral(), DeepSeek(), Glm(), Harmony())}
BY_FAMILY = {
    "mixtral": "mistral",
    "qwen2_moe": "hermes",
    "qwen3_moe": "hermes",
    "olmoe": "hermes",
    "deepseek_v2": "deepseek",
    "deepseek_v3": "deepseek",
    "glm4_moe": "glm",
    "gpt_oss": "harmony",
}


def syntax_for(template: str, model_type: str) -> Syntax:
    """The tool-call syntax a chat template writes (its markers), else its family's."""
    if "tool▁call" in template:
        return SYNTAXES["deepseek"]
    if "<arg_key>" in template:
        return SYNTAXES["glm"]
    if "<|call|>" in template:
        return SYNTAXES["harmony"]
    if "[TOOL_CALLS]" in template:
        return SYNTAXES["mistral"]
    if "<tool_call>" in template:
        return SYNTAXES["hermes"]
    return SYNTAXES[BY_FAMILY.get(model_type, "hermes")]


def _json(schema: dict) -> str:
    """A Lark `%json` rule for `schema` without free whitespace between its tokens: a small
    model may otherwise fill a forced call with newlines and spaces until max_tokens (as
    `response_format` schemas are compiled, in `mer.grammar`)."""
    return "%json" + json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})
