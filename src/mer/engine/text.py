"""Generated token ids to text, ending at a stop token or stop string.

Text is held back just long enough that a stop string is never half-emitted
and a multi-byte character split across tokens never reaches the user broken.
Used token by token, so the single-stream API and the server stop alike.
"""

from __future__ import annotations

from mer.tokenizer import Tokenizer


class TextStream:
    def __init__(
        self, tokenizer: Tokenizer, stop: list[str], stop_ids, keep_special: bool = False
    ) -> None:
        self.decoder = tokenizer.stream_decoder(keep_special)  # kept: for a tool-call parser
        self.stop, self.stop_ids = list(stop), set(stop_ids)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.finish_reason: str | None = None  # "stop" once a stop token or string is seen

    def push(self, token: int) -> str:
        """The text that became final with `token` ('' once stopped)."""
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            return self._end("stop")
        self.pending += self.decoder.push(token)
        cut = self._stop_at()
        if cut is not None:
            self.pending = self.pending[:cut]
            return self._end("stop")
        if len(self.pending) <= self.hold:
            return ""
        keep = len(self.pending) - self.hold
        piece, self.pending = self.pending[:keep], self.pending[keep:]
        return piece

    def finish(self, reason: str = "length") -> str:
        """Generation ended for `reason` without a stop: the rest of the text."""
        if self.finish_reason is not None:
            return ""
        self.pending += self.decoder.flush()
        cut = self._stop_at()
        if cut is not None:
            self.pending = self.pending[:cut]
            return self._end("stop")
        return self._end(reason)

    def _end(self, reason: str) -> str:
        self.finish_reason = reason
        piece, self.pending = self.pending, ""
        return piece

    def _stop_at(self) -> int | None:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None
