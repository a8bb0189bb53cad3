"""Text <-> token ids with the checkpoint's own `tokenizer.json`, plus streaming detokenization.

Streaming decodes a short window of recent ids and emits only text that can
no longer change, so a multi-byte character split across tokens never
reaches the user as a replacement character.

Text for the user skips special tokens; text for a parser that looks for them (tool
calls written with DeepSeek's or gpt-oss's special tokens) keeps them, and
`strip_special` then cleans what of it is shown.
"""

from __future__ import annotations

import re
from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from mer.errors import StoreError


class Tokenizer:
    """Encoding adds special tokens as the checkpoint's tokenizer.json says (Mixtral: <s>)."""

    def __init__(self, path: Path) -> None:
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise StoreError(f"{path}: cannot load tokenizer ({e})") from None

    @classmethod
    def from_dir(cls, directory: Path) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise StoreError(
                f"{path}: missing, so this store cannot encode text (copy the checkpoint's "
                "tokenizer.json into it)"
            )
        return cls(path)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], keep_special: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=not keep_special)

    def stream_decoder(self, keep_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, keep_special)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        """The special tokens (those decoding skips): text -> id."""
        added = self._tok.get_added_tokens_decoder()
        return {t.content: i for i, t in added.items() if t.special and t.content}

    def strip_special(self, text: str) -> str:
        """`text` without the special tokens' texts in it (as decoding would skip them)."""
        if self._special_re is None:
            return text
        return self._special_re.sub("", text)

    @cached_property
    def _special_re(self) -> re.Pattern | None:
        marks = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, marks))) if marks else None


class StreamDecoder:
    """Feed ids one by one; each `push` returns the text that became final."""

    def __init__(self, tok: Tokenizer, keep_special: bool = False) -> None:
        self.tok, self.keep_special = tok, keep_special
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted context
        self.read = 0  # ids before this have been emitted as text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.keep_special)
        now = self.tok.decode(self.ids[self.prefix :], self.keep_special)
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read], self.keep_special)
        now = self.tok.decode(self.ids[self.prefix :], self.keep_special)
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
