"""Text <-> token ids with the checkpoint's own `tokenizer.json`, plus streaming detokenization.

Streaming decodes a short window of recent ids and emits only text that can
no longer change, so a multi-byte character split across tokens never
reaches the user as a replacement character.
"""

from __future__ import annotations

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

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Feed ids one by one; each `push` returns the text that became final."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted context
        self.read = 0  # ids before this have been emitted as text

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end decodes as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read])
        now = self.tok.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
