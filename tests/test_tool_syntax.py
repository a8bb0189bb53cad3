"""Each family's tool-call syntax: documented examples parse into calls, and calls written
back parse into the same calls."""

from __future__ import annotations

import json

import pytest

from mer.tool_syntax import NL, SYNTAXES, ToolCall, syntax_for

# Examples in each family's documented format (the model cards and their chat templates).
DOCUMENTED = {
    # Qwen2.5/Qwen3 (Hermes format): function-calling docs of Qwen
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_current_temperature", "arguments": '
        '{"location": "San Francisco, CA, USA"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_temperature_date", "arguments": {"location": "San Francisco, CA, '
        'USA", "date": "2024-10-01"}}\n</tool_call>',
        "Let me check.\n",
        [
            ToolCall("get_current_temperature", {"location": "San Francisco, CA, USA"}),
            ToolCall(
                "get_temperature_date", {"location": "San Francisco, CA, USA", "date": "2024-10-01"}
            ),
        ],
    ),
    # Mistral (v3 tokenizer, Mixtral-8x22B-Instruct-v0.1 model card)
    "mistral": (
        '[TOOL_CALLS] [{"name": "get_current_weather", "arguments": {"location": "Paris, '
        'France", "format": "celsius"}}]',
        "",
        [ToolCall("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
    ),
    # DeepSeek-V3 chat template
    "deepseek": (
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"location": "Hangzhou"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>'
        'function<｜tool▁sep｜>get_time\n```json\n{"tz": "Asia/Shanghai"}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
        "",
        [
            ToolCall("get_weather", {"location": "Hangzhou"}),
            ToolCall("get_time", {"tz": "Asia/Shanghai"}),
        ],
    ),
    # GLM-4.5 chat template
    "glm": (
        "I'll look it up.<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing"
        "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>",
        "I'll look it up.",
        [ToolCall("get_weather", {"city": "Beijing", "days": 3})],
    ),
    # gpt-oss harmony response format (OpenAI's harmony guide)
    "harmony": (
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|><|start|>assistant"
        "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location":"San Francisco"}<|call|>',
        "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>",
        [ToolCall("get_weather", {"location": "San Francisco"})],
    ),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_documented_examples_parse(name):
    text, content, calls = DOCUMENTED[name]
    assert SYNTAXES[name].parse(text) == (content, calls)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_calls_round_trip(name):
    syntax = SYNTAXES[name]
    calls = DOCUMENTED[name][2]
    assert syntax.parse("Sure. " + syntax.render(calls)) == ("Sure. ", calls)


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_text_without_a_well_formed_call_is_content(name):
    syntax = SYNTAXES[name]
    for text in ["just text", syntax.start + "{not json"]:
        assert syntax.parse(text) == (text, [])


def test_the_syntax_follows_the_template_then_the_family():
    assert syntax_for("... <tool_call> ...", "mixtral").name == "hermes"
    assert syntax_for("{{ '[TOOL_CALLS]' }}", "qwen3_moe").name == "mistral"
    assert syntax_for("", "gpt_oss").name == "harmony"
    assert syntax_for("", "deepseek_v3").name == "deepseek"
    assert syntax_for("", "glm4_moe").name == "glm"


def test_a_harmony_call_ended_by_its_stop_token_parses():
    """<|call|> is a gpt-oss stop token: the decoded text ends where it would be."""
    text = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}'
    assert SYNTAXES["harmony"].parse(text) == ("", [ToolCall("f", {"a": 1})])


def test_forced_calls_write_special_token_markers_as_tokens():
    """A marker that is a special token is that token in the grammar (`<[id]>`): a quoted
    string would only match it spelled out in ordinary tokens."""
    tool = [{"name": "f", "parameters": {"type": "object"}}]
    special = {"<|channel|>": 7, "<|constrain|>": 8, "<|message|>": 9, "<|call|>": 10}
    harmony = SYNTAXES["harmony"].grammar(tool, False, special)
    assert harmony.startswith('start: <[7]> "commentary to=functions.f " <[8]> "json" <[9]> ')
    assert harmony.rstrip().endswith("<[10]>")
    assert SYNTAXES["harmony"].grammar(tool, False).startswith('start: "<|channel|>commentary')
    deepseek = {"<｜tool▁calls▁begin｜>": 3, "<｜tool▁sep｜>": 4}
    grammar = SYNTAXES["deepseek"].grammar(tool, False, deepseek)
    assert grammar.startswith(f"start: <[3]> call {json.dumps('<｜tool▁calls▁end｜>')}")
    head = json.dumps("<｜tool▁call▁begin｜>function")
    assert f"{head} <[4]> {json.dumps('f' + NL + '```json' + NL)}" in grammar
