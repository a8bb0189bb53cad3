"""Text <-> token ids with the checkpoint's own `tokenizer.json`, plus streaming detokenization.

Streaming decodes a short window of recent ids and emits only text that can
no longer change, so a multi-byte character split across tokens never
reaches the user as a replacement character.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from mer.errors import StoreError


class Tokenizer:
    def __init__(self, path: Path, bos_id: int | None, add_bos: bool = True) -> None:
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise StoreError(f"{path}: cannot load tokenizer ({e})") from None
        self.bos_id = bos_id
        self.add_bos = add_bos and bos_id is not None

    @classmethod
    def from_dir(cls, directory: Path, bos_id: int | None) -> Tokenizer:
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise StoreError(f"{path}: missing; pass token ids instead of text")
        add_bos = True
        cfg_path = directory / "tokenizer_config.json"
        if cfg_path.is_file():
            add_bos = json.loads(cfg_path.read_text()).get("add_bos_token", True)
        return cls(path, bos_id, add_bos)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if self.add_bos else ids

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
