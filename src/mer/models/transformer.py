"""The MoE decoder forward pass over resident weights and an expert provider.

Weights arrive as a dict under mer's tensor names (the converter mapped them
once); experts are never held here, only asked for per layer through the
provider. One call runs the new tokens of one or several sequences packed
together: everything but attention runs on all their tokens at once, so each
MoE layer acquires the union of the batch's experts once; attention runs per
sequence against the KV cache it brought.

Each MoE layer reads: route -> tell the routing hooks -> run the experts. The
hooks are how anything else learns the routing (the cache's policy, live prefetch,
trace recording, the scheduler's dedup count): the model knows none of them.

Where families differ (attention, routing, shared expert, dense MLP, KV layout,
rotary tables, each layer's attention window) the pass calls the config's
`Family` (`mer.models.family`), whose defaults are the shared layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from mer.models.config import ModelConfig
from mer.models.decode_layer import DecodeAttention
from mer.models.kv_cache import KVCache
from mer.models.layers import ExpertProvider, causal_mask, moe, rms_norm
from mer.quant.dense import concat_rows, linear


class KVLike(Protocol):
    """What a forward pass needs of a sequence's KV cache (KVCache, or a paged one)."""

    length: int

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor): ...

    def advance(self, n: int) -> None: ...


# Called once per MoE layer of every forward pass but a draft's, after routing and before
# the experts run, in list order: (layer, hidden [T, H]: the normed input the router
# multiplied, expert ids [T, k], router weights [T, k] float32). A hook may start reads
# (prefetch) but must not change the tensors.
RoutingHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


class MoETransformer:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        experts: ExpertProvider,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        self.config = config
        self.dtype = dtype
        self.family = family = config.family
        fp32 = tuple("." + short for short in family.keep_float32)
        self.w = {  # a quantized weight (`mer.quant.dense`) is kept as it is
            name: t if not isinstance(t, torch.Tensor) else t.float() if name.endswith(fp32)
            else t.to(dtype)
            for name, t in weights.items()
        }  # fmt: skip
        if "lm_head" not in self.w:  # tied embeddings
            self.w["lm_head"] = self.w["embed"]
        self.qkv_rows = self._fuse_qkv()
        self.experts = family.experts(config, experts)
        self.rotary = family.rotary(config)
        self.routing_hooks: list[RoutingHook] = []
        self.routing = None  # exact; or a `mer.models.routing.CacheAwareRouting`
        # Replaces the router's choice (layer, hidden, weights, ids) -> (weights, ids) before
        # the hooks hear of it: forced routing from a trace (mer.trace.forced).
        self.routing_override: Callable | None = None
        self._decode_attention: DecodeAttention | None = None
        # Chooses the int4 kernels' prefetch hint on the first lone decode steps
        # (`mer.quant.stream_hint.HintTrial`); None: nothing to choose.
        self.hint_trial = None

    @property
    def decode_attention(self) -> DecodeAttention:
        """The layers a lone decode token runs through their attention half in one C call,
        planned again if the compute threads changed (kernel choices and thread counts are
        per thread count)."""
        da = self._decode_attention
        if da is None or da.threads != torch.get_num_threads():
            da = self._decode_attention = DecodeAttention(self)
        return da

    def _fuse_qkv(self) -> dict[int, list[int]]:
        """Each layer's q, k and v projections stacked into one matrix `qkv` (and their
        biases into `qkv_bias`) where their scheme allows (`concat_rows`): a decode step then
        makes one call instead of three, and the two narrow ones cost mostly the call (k and
        v of the Qwen3-30B-A3B shape, int4, 72 and 48 us for 0.56 MB each against the q
        projection's 223 us for 4.5 MB). Returns the rows of q, k and v per fused layer."""
        w, rows = self.w, {}
        for i in range(self.config.num_hidden_layers):
            names = [f"layers.{i}.{n}" for n in ("q", "k", "v")]
            biases = [w.get(n + "_bias") for n in names]
            if not all(n in w for n in names) or len({b is None for b in biases}) > 1:
                continue
            fused = concat_rows([w[n] for n in names])
            if fused is None:
                continue
            rows[i] = [w[n].shape[0] for n in names]
            w[f"layers.{i}.qkv"] = fused
            if biases[0] is not None:
                w[f"layers.{i}.qkv_bias"] = torch.cat(biases)
            for n in names:
                del w[n]
                w.pop(n + "_bias", None)
        return rows

    def new_kv_cache(self, capacity: int) -> KVCache:
        return KVCache(self.config, capacity, self.dtype)

    @torch.inference_mode()
    def forward(
        self, tokens: torch.Tensor, kv: KVLike, all_logits: bool = False, draft: bool = False
    ) -> torch.Tensor:
        """tokens [T] -> float32 logits [T, V] (or [1, V] for the last token only)."""
        return self.forward_batch([(tokens, kv)], all_logits, draft)

    @torch.inference_mode()
    def forward_batch(
        self,
        batch: list[tuple[torch.Tensor, KVLike]],
        all_logits: bool = False,
        draft: bool = False,
    ):
        """[(tokens [T_i], kv_i)] -> float32 logits of every token [sum T_i, V], or of each
        sequence's last token [len(batch), V].

        `draft`: route only to experts already in RAM, so the pass reads nothing from the
        SSD (self-speculation's draft); the routing hooks do not hear of it."""
        if self.hint_trial is None:
            return self._forward_batch(batch, all_logits, draft)
        lone = len(batch) == 1 and len(batch[0][0]) == 1 and not draft
        with self.hint_trial.step(timed=lone):
            return self._forward_batch(batch, all_logits, draft)

    def _forward_batch(self, batch, all_logits: bool, draft: bool) -> torch.Tensor:
        cfg, w = self.config, self.w
        tokens = torch.cat([t for t, _ in batch])
        pos = torch.cat([torch.arange(kv.length, kv.length + len(t)) for t, kv in batch])
        rope = self.rotary.tables(pos, self.dtype)
        fam = self.family
        windows = [fam.sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
        spans_of = {}  # window -> spans: one causal mask per sequence and distinct window
        for window in dict.fromkeys(windows):
            spans, start = [], 0
            for t, kv in batch:
                n = len(t)
                mask = causal_mask(pos[start : start + n], kv.length + n, window)
                spans.append((slice(start, start + n), kv, mask))  # mask [T_i, S_i]
                start += n
            spans_of[window] = spans
        x = w["embed"][tokens]  # [T, H]
        # one decode token: its layers' attention halves in one call each, where they fit
        decode = self.decode_attention if len(tokens) == 1 else None
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            step = None
            if decode is not None and decode.applies(i):
                _, kv, mask = spans_of[windows[i]][0]
                step = decode.run(i, x, kv, mask, rope, route=not draft)
            if step is not None:  # x now holds the residual after attention
                h, routed = step
            else:
                h = rms_norm(x, w[p + "attn_norm"], cfg.rms_norm_eps)
                x = x + fam.attention(self, i, h, rope, spans_of[windows[i]])
                h = rms_norm(x, w[p + "ffn_norm"], cfg.rms_norm_eps)
                routed = None
            if cfg.is_moe_layer(i):
                x = x + self._moe(i, h, draft, routed)
            else:
                x = x + fam.mlp(self, i, h)
        for t, kv in batch:
            kv.advance(len(t))
        self.experts.next_step()
        if not all_logits and len(x) > len(batch):  # one token a sequence: x is the last ones
            x = x[torch.tensor([s.stop - 1 for s, _, _ in spans_of[windows[0]]])]
        return linear(rms_norm(x, w["norm"], cfg.rms_norm_eps), w["lm_head"]).float()

    def _moe(self, i: int, h: torch.Tensor, draft: bool = False, routed=None) -> torch.Tensor:
        """Route h [T, H] (or take `routed`, its (weights, ids) already worked out), tell
        the routing hooks, run the experts (and the shared one)."""
        if routed is not None:
            weights, ids = routed
        else:
            allowed = self._resident(i) if draft else None
            weights, ids = self.family.route(self, i, h, allowed)
        if self.routing_override is not None and not draft:  # forced routing (a trace's)
            weights, ids = self.routing_override(i, h, weights, ids)
        if not draft and self.routing is not None:  # opt-in cache-aware routing
            weights, ids = self.routing.adjust(self, i, h, weights, ids)
        if not draft:
            for hook in self.routing_hooks:
                hook(i, h, ids, weights)
        remote = getattr(self.experts, "moe", None)  # experts on other machines (mer.cluster)
        routed = remote(h, weights, ids, i) if remote else moe(h, weights, ids, i, self.experts)
        return self.family.shared(self, i, h, routed)

    def _resident(self, i: int, held: bool = False) -> torch.Tensor:
        """bool [E]: the experts of layer `i` in RAM now, the only ones a draft may use; with
        `held`, also those whose read is under way (a provider without reads has none)."""
        n = self.config.num_local_experts
        ask = getattr(self.experts, "is_held", None) if held else None
        ask = ask or self.experts.is_resident
        return torch.tensor([ask(i, e) for e in range(n)])
