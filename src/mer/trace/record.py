"""Records routing as a model runs: per token and MoE layer, the experts chosen and their
router weights, with sequence boundaries, in the trace layout of `mer.trace.format`.

Attach it as a routing hook (`MoETransformer.routing_hooks`); call `begin_sequence()`
before each generation. The first forward pass of a sequence is its prefill (phase 0),
later ones decode (1). After `watch_hidden()` it also records the hidden state entering
each MoE block (for router lookahead), in float16: 2 bytes x hidden size per token and
MoE layer.
"""

from __future__ import annotations

import numpy as np
import torch

from mer.config import ModelConfig
from mer.trace.format import Trace


class TraceRecorder:
    def __init__(self, config: ModelConfig, expert_bytes: int | None = None) -> None:
        """`expert_bytes`: what reading one expert costs in the store, kept in the trace's
        metadata so that replays price misses in the traced model's own bytes."""
        self.config = config
        self.expert_bytes = expert_bytes
        self.moe_layers = config.moe_layers
        self._column = {layer: j for j, layer in enumerate(self.moe_layers)}
        self._experts: list[np.ndarray] = []  # one [T, moe_layers, k] block per pass
        self._weights: list[np.ndarray] = []
        self._phase: list[np.ndarray] = []
        self._starts: list[int] = []
        self._pass: tuple[np.ndarray, np.ndarray] | None = None
        self._hidden: list[np.ndarray] | None = None  # [T, moe_layers, H] per pass, if watched
        self._pass_hidden: np.ndarray | None = None
        self._passes_in_sequence = 0
        self._tokens = 0

    def begin_sequence(self) -> None:
        self._flush()
        self._starts.append(self._tokens)
        self._passes_in_sequence = 0

    def watch_hidden(self) -> None:
        """Record the hidden state entering each MoE block from now on (it comes with the
        routing hook's call)."""
        if self._tokens or self._pass is not None:
            raise RuntimeError("watch hidden states before the first forward pass")
        self._hidden = []

    def __call__(
        self, layer: int, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> None:
        j = self._column[layer]
        if j == 0:
            self._flush()
            t, k = ids.shape
            shape = (t, len(self.moe_layers), k)
            self._pass = (np.zeros(shape, np.int16), np.zeros(shape, np.float16))
            if self._hidden is not None:
                size = self.config.hidden_size
                self._pass_hidden = np.zeros((t, len(self.moe_layers), size), np.float16)
        experts, w = self._pass
        experts[:, j] = ids.numpy()
        w[:, j] = weights.float().numpy()
        if self._pass_hidden is not None:
            self._pass_hidden[:, j] = hidden.float().numpy()

    def _flush(self) -> None:
        if self._pass is None:
            return
        experts, w = self._pass
        if not self._starts:
            self._starts.append(0)
        self._experts.append(experts)
        self._weights.append(w)
        if self._pass_hidden is not None:
            self._hidden.append(self._pass_hidden)
            self._pass_hidden = None
        phase = 0 if self._passes_in_sequence == 0 else 1
        self._phase.append(np.full(len(experts), phase, np.int8))
        self._tokens += len(experts)
        self._passes_in_sequence += 1
        self._pass = None

    def trace(self) -> Trace:
        self._flush()
        cfg = self.config
        k = cfg.num_experts_per_tok
        empty = np.zeros((0, len(self.moe_layers), k))
        hidden = None
        if self._hidden is not None:
            hidden = np.zeros((0, len(self.moe_layers), cfg.hidden_size), np.float16)
            hidden = np.concatenate(self._hidden or [hidden])
        meta = {
            "model": cfg.model_type,
            "n_experts": cfg.num_local_experts,
            "top_k": k,
            "moe_layers": list(self.moe_layers),
            "recorded": "mer generate: every forward pass, prefill then decode",
        }
        if self.expert_bytes:
            meta["expert_bytes"] = int(self.expert_bytes)
        return Trace(
            np.concatenate(self._experts or [empty]).astype(np.int16),
            np.array([*self._starts, self._tokens] if self._starts else [0], np.int64),
            np.concatenate(self._phase or [np.zeros(0, np.int8)]),
            meta,
            np.concatenate(self._weights or [empty]).astype(np.float16),
            hidden,
        )
