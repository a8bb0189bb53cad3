"""Chat prompts: the checkpoint's own Jinja chat template turns messages into prompt text.

The template comes from `tokenizer_config.json` (`chat_template`, a string or a
list of named templates) or a `chat_template.jinja` file, as Hugging Face
stores it; it is rendered in a sandbox with the same variables transformers
passes (messages, bos_token, eos_token, add_generation_prompt, and tools when given). The result
already holds any BOS the template wants, so it is tokenized without adding
special tokens again.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from mer.errors import ConfigError

# For checkpoints that ship no template: plain role-tagged turns.
DEFAULT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _token_text(value) -> str:
    if isinstance(value, dict):  # AddedToken as serialized by transformers
        return value.get("content", "")
    return value or ""


class ChatTemplate:
    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.filters["tojson"] = _tojson  # as transformers does: no HTML escaping
        try:
            self._template = env.from_string(source)
            self.source = source
        except TemplateError as e:
            raise ConfigError(f"chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTemplate:
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        source = cfg.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": "..."}, ...]
            named = {t.get("name"): t.get("template") for t in source}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        bos, eos = _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token"))
        return cls(source or DEFAULT_TEMPLATE, bos, eos)

    @property
    def takes_tools(self) -> bool:
        """The template renders a `tools` argument (tool definitions in the prompt)."""
        return "tools" in self.source

    def render(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None
    ) -> str:
        """The prompt text; `tools` (OpenAI-shaped function definitions) only where the
        template takes them (ConfigError otherwise)."""
        if tools and not self.takes_tools:
            raise ConfigError("this model's chat template does not take tools")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ConfigError(f"a chat message needs a role and content, got {m!r}")
        try:
            return self._template.render(
                messages=messages,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                add_generation_prompt=add_generation_prompt,
                **({"tools": tools} if tools else {}),
            )
        except TemplateError as e:
            raise ConfigError(f"chat template failed: {e}") from None


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str):
    raise TemplateError(message)
