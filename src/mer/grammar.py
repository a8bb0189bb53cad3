"""Constrained decoding: JSON schemas compiled to a per-token mask with llguidance.

`Grammars` wraps one checkpoint's tokenizer (built once, ~1 s for a large vocabulary)
and compiles a JSON schema, or "any JSON object", into a grammar; `constraint()`
gives a fresh `GrammarConstraint` for one sequence, which the engine's `Steering`
applies before every token is chosen (plain, batched or speculative decoding alike).

Why llguidance: it computes the mask for one token in tens of microseconds on CPU at
our vocabulary sizes (`mer bench grammar` measures it), has no dependency of its own
(xgrammar pulls triton and a TVM runtime, and is tied to torch's version), and
compiles JSON schemas lazily, so compiling costs nothing per request.

The mask is filled into one preallocated int32 bitmask and applied with numpy's
`unpackbits` into a preallocated bool row (~50 µs at vocab 32,000), not with
`llguidance.torch.apply_token_bitmask_inplace`, whose `torch.compile`d kernel costs
~1 ms a call on CPU (guards and a [V] int32 expansion) and seconds to compile. The mask
is computed where it is used, not ahead on a worker thread during the forward pass:
tried, that cost 3.9 ms a token against 1.0 ms on 2 busy cores (the worker's wakeup and
the GIL's hand-over outweigh the ~50-200 µs it would hide).

Invariants: a token the mask forbids gets logit -inf, so it is never sampled; once the
grammar is complete only the end-of-sequence tokens are allowed; a schema the engine
cannot compile is a `GrammarError` naming the problem, before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import llguidance
import llguidance.numpy as lln
import numpy as np
import torch
from tokenizers import Tokenizer

from mer.errors import ConfigError


class GrammarError(ConfigError):
    """A schema or grammar that cannot be compiled; the message says why."""


class Grammars:
    """Grammar compilation for one tokenizer (the checkpoint's tokenizer.json)."""

    def __init__(self, tokenizer_json: Path, vocab_size: int, eos_ids: tuple[int, ...]) -> None:
        self.vocab_size = vocab_size  # the model's: the logits' length
        text = Path(tokenizer_json).read_text()
        # A tokenizer may name more tokens than the model has logits (an added token past
        # the embedding, as a GGUF's <|endoftext|> at id 32000 of a 32,000 vocab):
        # llguidance needs them all; the mask is cut to the logits, so the model never
        # produces them.
        n_tokens = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
        self.n_vocab = max(vocab_size, n_tokens)
        self.tokenizer = llguidance.LLTokenizer(text, n_vocab=self.n_vocab, eos_token=list(eos_ids))
        # The first mask builds the tokenizer's slices (seconds for a large vocabulary):
        # done here, once, rather than in the middle of some request's first token.
        self.constraint(self.json_schema(None)).mask(torch.zeros(vocab_size))

    def json_schema(self, schema: dict | None) -> str:
        """A grammar for JSON that validates against `schema` (None: any JSON object)."""
        if schema is None:
            schema = {"type": "object"}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False}
            )
        except Exception as e:  # llguidance raises ValueError with the reason
            raise GrammarError(f"the JSON schema cannot be compiled: {e}") from None
        return self.check(grammar)

    def lark(self, source: str) -> str:
        """A grammar from Lark source (as llguidance reads it)."""
        return self.check(llguidance.LLMatcher.grammar_from_lark(source))

    def check(self, grammar: str) -> str:
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"the grammar cannot be compiled: {error}")
        return grammar

    def constraint(self, grammar: str) -> GrammarConstraint:
        return GrammarConstraint(self, grammar)


class GrammarConstraint:
    """One sequence's place in a grammar: the tokens allowed next, as a logit mask."""

    def __init__(self, grammars: Grammars, grammar: str) -> None:
        self.matcher = llguidance.LLMatcher(grammars.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"the grammar cannot be compiled: {self.matcher.get_error()}")
        words = (grammars.n_vocab + 31) // 32
        self.bitmask = np.zeros((1, words), dtype=np.int32)  # bit t of the row: token t allowed
        self.forbidden = torch.zeros(32 * words, dtype=torch.bool)  # [32 * words]

    def mask(self, logits: torch.Tensor) -> None:
        """Set the logits of tokens the grammar forbids next to -inf (float32 [V], in place)."""
        lln.fill_next_token_bitmask(self.matcher, self.bitmask)
        # Little-endian int32 words as bytes, bits in little order: bit t is token t.
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")
        np.logical_not(bits, out=self.forbidden.numpy())
        logits.masked_fill_(self.forbidden[: logits.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")

    def rollback(self, n: int) -> None:
        if not self.matcher.rollback(n):
            raise GrammarError(f"cannot roll back {n} tokens: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The text so far is a whole sentence of the grammar."""
        return self.matcher.is_accepting()
