"""Chat templates render and tokenize as transformers' apply_chat_template does."""

from __future__ import annotations

import json

import pytest

import mer
from mer.chat import ChatTemplate
from mer.errors import ConfigError

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You write Python."},
    {"role": "user", "content": "Sort a list."},
    {"role": "assistant", "content": "sorted(xs)"},
    {"role": "user", "content": "In place?"},
]


@pytest.mark.parametrize("template", ["checkpoint's own", "chatml"])
def test_chat_ids_equal_transformers(template, hf_tiny, store_factory, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    store = tmp_path / "store"
    shutil.copytree(store_factory("int4"), store)
    messages = MESSAGES
    if template == "chatml":
        for d in (store,):
            cfg = json.loads((d / "tokenizer_config.json").read_text())
            cfg["chat_template"] = CHATML
            (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    else:
        messages = MESSAGES[1:]  # the Mistral-style template has no system role of its own
    want = AutoTokenizer.from_pretrained(store).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True
    )
    want = want["input_ids"] if hasattr(want, "keys") else want
    got = mer.open(store, ram_budget="64MiB").chat_prompt(messages)
    assert got == list(want)


def test_template_errors_are_clear():
    with pytest.raises(ConfigError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ConfigError, match="roles must alternate"):
        t.render([{"role": "user", "content": "x"}])
    with pytest.raises(ConfigError, match="role and content"):
        ChatTemplate("{{ messages }}").render([{"content": "x"}])


def test_checkpoint_without_template_gets_a_default(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    text = ChatTemplate.from_dir(tmp_path).render([{"role": "user", "content": "hi"}])
    assert text == "<|user|>\nhi\n<|assistant|>\n"
