"""Tool calling on the wire: validating `tools`, `tool_choice`, `parallel_tool_calls` and the
tool-call history in messages, and turning a completion back into OpenAI `tool_calls`.

What the request asks becomes a `ToolRequest`: the tools (name, description, JSON schema
of the arguments), the choice ("auto", "none", "required", or one function's name) and
whether several calls may come at once. The prompt shows the tools through the
checkpoint's own chat template; the completion is parsed with the family's syntax
(`mer.tool_syntax`). With "required" or a named function the output is forced by a
grammar, so it is always a call whose arguments validate against the schema; with
"auto" the model may answer in text or call, and a call it writes malformed stays text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from mer.serve.protocol import ApiError
from mer.tool_syntax import Syntax, ToolCall

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolRequest:
    tools: list[dict] = field(default_factory=list)  # [{"name", "description", "parameters"}]
    choice: str = "auto"  # auto | none | required | a function's name
    parallel: bool = True

    @property
    def forced(self) -> list[dict] | None:
        """The tools a call is forced to, or None when the model may answer in text."""
        if self.choice == "required":
            return self.tools
        if self.choice not in ("auto", "none"):
            return [t for t in self.tools if t["name"] == self.choice]
        return None

    def template_tools(self) -> list[dict] | None:
        """The tools as chat templates take them (OpenAI's shape), None for choice 'none'."""
        if not self.tools or self.choice == "none":
            return None
        return [{"type": "function", "function": t} for t in self.tools]


def parse_tools(body: dict) -> ToolRequest | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        if tools is not None and not isinstance(tools, list):
            raise ApiError(400, "'tools' must be a list", param="tools")
        return None
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", param="tools")
    req = ToolRequest()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(400, f"{where}.type must be 'function'", param=f"{where}.type")
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}.function needs a name", param=f"{where}.function")
        if not NAME.match(fn["name"]):
            raise ApiError(
                400,
                f"{where}.function.name must be 1 to 64 letters, digits, _ or -",
                param=f"{where}.function.name",
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ApiError(
                400, f"{where}.function.parameters must be an object", param=f"{where}.function"
            )
        desc = fn.get("description", "")
        if not isinstance(desc, str):
            raise ApiError(400, f"{where}.function.description must be a string", param=where)
        if any(t["name"] == fn["name"] for t in req.tools):
            raise ApiError(400, f"two tools are named {fn['name']!r}", param=f"{where}.function")
        req.tools.append({"name": fn["name"], "description": desc, "parameters": params})
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise ApiError(
                400, "'tool_choice' must be auto, none, required or a function", param="tool_choice"
            )
        req.choice = choice
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise ApiError(
                400,
                "tool_choice must be {'type': 'function', 'function': {'name': ...}}",
                param="tool_choice",
            )
        if not any(t["name"] == name for t in req.tools):
            raise ApiError(400, f"tool_choice names {name!r}, not among tools", param="tool_choice")
        req.choice = name
    elif choice is not None:
        raise ApiError(400, "'tool_choice' must be a string or an object", param="tool_choice")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise ApiError(400, "'parallel_tool_calls' must be a bool", param="parallel_tool_calls")
        req.parallel = parallel
    return req


def add_history(raw: list[dict], messages: list[dict]) -> None:
    """Give each parsed message (`messages`) the tool-call parts of its raw form."""
    for i, (m, parsed) in enumerate(zip(raw, messages, strict=True)):
        parsed.update(history_fields(m, i))


def history_fields(m: dict, i: int) -> dict:
    """The tool-call parts of message `i` for the chat template: an assistant's
    `tool_calls` (arguments as objects, as templates expect) and a tool result's id."""
    out = {}
    if m["role"] == "assistant" and m.get("tool_calls") is not None:
        calls = m["tool_calls"]
        where = f"messages[{i}].tool_calls"
        if not isinstance(calls, list):
            raise ApiError(400, f"{where} must be a list", param=where)
        out["tool_calls"] = []
        for j, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ApiError(400, f"{where}[{j}] needs function.name", param=f"{where}[{j}]")
            args = fn.get("arguments", "{}")
            try:
                args = json.loads(args) if isinstance(args, str) else args
            except ValueError:
                raise ApiError(
                    400, f"{where}[{j}].function.arguments is not JSON", param=f"{where}[{j}]"
                ) from None
            out["tool_calls"].append(
                {
                    "id": call.get("id", ""),
                    "type": "function",
                    "function": {"name": fn["name"], "arguments": args},
                }
            )
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str):
            raise ApiError(
                400, f"messages[{i}].tool_call_id is required", param=f"messages[{i}].tool_call_id"
            )
        out["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            out["name"] = m["name"]
    return out


def openai_calls(calls: list[ToolCall], stream: bool = False) -> list[dict]:
    out = []
    for i, c in enumerate(calls):
        item = {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
        }
        if stream:
            item["index"] = i
        out.append(item)
    return out


class ToolStream:
    """Streamed text with tool calls cut out: content flows until the text might begin a
    call (the syntax's start marker, or a prefix of it at the end), then is held; `finish`
    parses what was held into calls (or gives it back as content if it is none).

    The text pushed may hold special tokens (decoded kept, for markers that are special
    tokens); the content given back goes through `clean`, which removes them."""

    def __init__(self, syntax: Syntax, parallel: bool, clean=lambda text: text) -> None:
        self.syntax, self.parallel, self.clean = syntax, parallel, clean
        self.held = ""
        self.calling = False

    def push(self, piece: str) -> str:
        if self.calling:
            self.held += piece
            return ""
        text = self.held + piece
        start = self.syntax.start
        at = text.find(start)
        if at >= 0:
            self.calling, self.held = True, text[at:]
            return self.clean(text[:at])
        keep = next((n for n in range(len(start) - 1, 0, -1) if text.endswith(start[:n])), 0)
        self.held = text[len(text) - keep :] if keep else ""
        return self.clean(text[: len(text) - keep])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still held, the calls)."""
        content, calls = self.syntax.parse(self.held)
        if not self.parallel:
            calls = calls[:1]
        return self.clean(content), calls
