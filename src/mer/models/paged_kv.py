"""Paged KV cache for many sequences: fixed-size blocks from one budget, shared prefixes.

All sequences draw blocks of `block_size` tokens from one preallocated pool
sized by a byte budget, so the KV memory of a server never grows past what was
asked for. A block that a sequence has filled is registered under a digest of
the whole token prefix it ends (not just its own tokens: the same block text
after a different prefix has different keys and values). A new sequence whose
prompt starts with registered blocks takes them instead of computing them; a
finished sequence's registered blocks stay cached, evicted least recently used
first when a fresh block is needed. Shared blocks are always full, so no
sequence ever writes into a block another one reads. A block holds, per layer and
token, what the family caches (`Family.kv_shapes`): full keys and values, or
DeepSeek's compressed latent and rope key.

The pool is checked against the memory the machine has (`available_memory`)
before it is allocated: a budget that cannot fit is a one-line BudgetError,
not an allocation failure or the OOM killer.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import xxhash

from mer.errors import BudgetError
from mer.models.config import ModelConfig
from mer.procfs import kib_field
from mer.units import fmt_bytes


class KVPool:
    def __init__(
        self, config: ModelConfig, budget_bytes: int, dtype: torch.dtype, block_size: int = 16
    ) -> None:
        self.config, self.block_size = config, block_size
        elem = torch.empty((), dtype=dtype).element_size()
        k_shape, v_shape = config.family.kv_shapes(config)  # per token and layer
        per_token = math.prod(k_shape) + math.prod(v_shape)
        self.block_bytes = config.num_hidden_layers * block_size * per_token * elem
        self.n_blocks = budget_bytes // self.block_bytes
        if self.n_blocks < 2:
            raise BudgetError(
                f"KV budget of {budget_bytes} bytes holds {self.n_blocks} blocks of "
                f"{self.block_bytes} bytes ({block_size} tokens); need at least 2"
            )
        pool_bytes = self.n_blocks * self.block_bytes
        available, source = available_memory()
        if available is not None and pool_bytes > available:
            raise BudgetError(
                f"KV budget of {fmt_bytes(budget_bytes)} needs a pool of {fmt_bytes(pool_bytes)}"
                f", more than the {fmt_bytes(available)} of memory available ({source})"
            )
        rows = (config.num_hidden_layers, self.n_blocks * block_size)
        self.k = torch.zeros((*rows, *k_shape), dtype=dtype)
        self.v = torch.zeros((*rows, *v_shape), dtype=dtype)
        self.refs = np.zeros(self.n_blocks, dtype=np.int64)
        self.free: list[int] = list(range(self.n_blocks - 1, -1, -1))
        self.by_digest: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; LRU first
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    @property
    def used_blocks(self) -> int:
        """Blocks referenced by live sequences."""
        return int((self.refs > 0).sum())

    @property
    def cached_blocks(self) -> int:
        return len(self.evictable)

    @property
    def available_blocks(self) -> int:
        """Blocks a sequence could get now: free ones plus cached ones nobody holds."""
        return len(self.free) + len(self.evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def sequence(self, prompt: list[int], reuse: bool = True) -> PagedSequence:
        """A new sequence holding the longest registered prefix of `prompt` (never all of
        it: the last prompt token must still run to give the next token's logits); none
        without `reuse` (every prompt token then runs, as scoring the prompt needs)."""
        seq = PagedSequence(self)
        digest = b""
        full = (len(prompt) - 1) // self.block_size if reuse else 0
        for b in range(full):
            digest = _chain(digest, prompt[b * self.block_size : (b + 1) * self.block_size])
            block = self.by_digest.get(digest)
            if block is None:
                break
            self._ref(block)
            seq.blocks.append(block)
            seq.digests.append(digest)
        seq.tokens = list(prompt[: len(seq.blocks) * self.block_size])
        seq.length = len(seq.tokens)
        self.prefix_hit_tokens += seq.length
        self.prefix_query_tokens += len(prompt)
        return seq

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.evictable.pop(block, None)
        self.refs[block] += 1

    def _take(self) -> int | None:
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_digest[self.digest_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self.digest_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def register(self, block: int, digest: bytes) -> None:
        if digest not in self.by_digest and block not in self.digest_of:
            self.by_digest[digest] = block
            self.digest_of[block] = digest

    def unregister(self, block: int) -> None:
        digest = self.digest_of.pop(block, None)
        if digest is not None and self.by_digest.get(digest) == block:
            del self.by_digest[digest]


def available_memory(meminfo: str | Path = "/proc/meminfo") -> tuple[int | None, str]:
    """Bytes the machine can give a new allocation, and where that figure came from:
    MemAvailable from /proc/meminfo (Linux), else the physical memory (an upper bound),
    else (None, why) where neither can be read."""
    available = kib_field(meminfo, "MemAvailable")
    if available is not None:
        return available, f"MemAvailable in {meminfo}"
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None, "unknown"
    return (total, "physical memory") if total > 0 else (None, "unknown")


class PagedSequence:
    """One sequence's view of the pool, with the KV cache interface the forward pass uses."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.digests: list[bytes] = []  # of the registered full blocks, in order
        self.tokens: list[int] = []  # whose keys and values are (or are being) written
        self.length = 0
        self._index = torch.zeros(0, dtype=torch.long)

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def reserve(self, tokens: list[int]) -> bool:
        """Make room for `tokens` to run next; False (holding nothing new) if the pool is full."""
        if not self.reserve_room(len(tokens)):
            return False
        self.tokens = self.tokens[: self.length] + list(tokens)
        return True

    def reserve_room(self, n: int) -> bool:
        """Room for `n` more tokens not known yet (a draft's): their blocks are never shared."""
        need = self.pool.blocks_for(self.length + n) - len(self.blocks)
        got = []
        for _ in range(need):
            block = self.pool._take()
            if block is None:
                for b in got:
                    self.pool.release(b)
                return False
            got.append(block)
        if got:
            self.blocks += got
            self._reindex()
        return True

    def _reindex(self) -> None:
        """Pool rows of this sequence's positions, rebuilt only when its blocks change."""
        bs = self.pool.block_size
        starts = torch.tensor(self.blocks, dtype=torch.long) * bs
        self._index = (starts[:, None] + torch.arange(bs)).reshape(-1)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [T, ...] after the current length; return all keys and values so far."""
        end = self.length + k.shape[0]
        if end > self.capacity:
            raise BudgetError(f"{end} tokens written to a sequence reserved for {self.capacity}")
        written = self._index[self.length : end]
        self.pool.k[layer].index_copy_(0, written, k)
        self.pool.v[layer].index_copy_(0, written, v)
        index = self._index[:end]
        return self.pool.k[layer].index_select(0, index), self.pool.v[layer].index_select(0, index)

    def advance(self, n: int) -> None:
        """Commit `n` tokens written by a forward pass; blocks they filled become shareable."""
        self.length += n
        bs = self.pool.block_size
        for b in range(len(self.digests), min(self.length, len(self.tokens)) // bs):
            prev = self.digests[-1] if self.digests else b""
            self.digests.append(_chain(prev, self.tokens[b * bs : (b + 1) * bs]))
            self.pool.register(self.blocks[b], self.digests[-1])

    def truncate(self, length: int) -> None:
        """Roll back to `length` tokens; blocks past it go back to the pool."""
        if length >= self.length:
            return
        bs = self.pool.block_size
        keep_full = length // bs
        for b in range(keep_full, len(self.digests)):
            self.pool.unregister(self.blocks[b])
        del self.digests[keep_full:]
        for block in self.blocks[self.pool.blocks_for(length) :]:
            self.pool.release(block)
        del self.blocks[self.pool.blocks_for(length) :]
        self.length = length
        del self.tokens[length:]
        if length % bs and self.pool.refs[self.blocks[-1]] > 1:
            self._copy_last_block()  # another sequence took it while it was full: keep theirs
        self._reindex()

    def _copy_last_block(self) -> None:
        block = self.pool._take()
        if block is None:
            raise BudgetError("KV pool full while copying a shared block")
        bs, old = self.pool.block_size, self.blocks[-1]
        for kv in (self.pool.k, self.pool.v):
            kv[:, block * bs : (block + 1) * bs] = kv[:, old * bs : (old + 1) * bs]
        self.pool.release(old)
        self.blocks[-1] = block

    def free(self) -> None:
        for block in self.blocks:
            self.pool.release(block)
        self.blocks, self.digests, self.tokens, self.length = [], [], [], 0


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    """Digest of a prefix: the previous blocks' digest and this block's token ids (128-bit)."""
    return xxhash.xxh3_128_digest(prev + np.asarray(tokens, dtype=np.int64).tobytes())
