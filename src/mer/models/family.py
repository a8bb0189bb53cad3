"""`Family`: what a model family is to mer, with the shared behaviour as its defaults.

A family module (mixtral.py, qwen_moe.py, olmoe.py, ...) defines a subclass
that overrides only what differs from these defaults:

- who it serves: Hugging Face `architectures` and `model_types`, GGUF
  `gguf_architectures`;
- its config: `config_class` (a `ModelConfig` subclass with the family's own
  fields), `defaults` for what its config.json may leave out, `normalise` from
  its config.json spellings to ours, the `rope_types` it implements;
- its `presets` for `mer synth`: published full-size shapes, and tiny ones with
  every quirk switched on;
- its tensors: the name tables `GLOBAL`, `LAYER`, `EXPERT` (mer name -> Hugging
  Face template) and the shapes of what a config has (`layer_shapes`);
- its compute, called by `MoETransformer` per layer: `attention`, `route`,
  `shared`, `mlp`, the per-token KV layout (`kv_shapes`), the rotary tables
  (`rotary`), each layer's attention window (`sliding_window`) and a seam
  around the expert provider (`experts`);
- its experts in a checkpoint: the tensors it reads for a layer's experts
  (`expert_tensors`) and how one expert's become a store extent
  (`expert_extent`), whether per-expert matrices or stacked ones, float or
  already quantized; `expert_bias` when its experts carry biases;
- the synthetic checkpoints `mer synth` makes of it (`presets`).

The defaults are the Mixtral-like decoder: GQA attention with optional q/k/v
biases and per-head QK RMSNorm, softmax top-k routing, an ungated SwiGLU shared
expert when the config has one, SwiGLU dense layers, full K and V cached.
Families hold no weights and no state: one instance serves every model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Container
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from mer.models import rowops
from mer.models.config import ModelConfig
from mer.models.layers import Rotary, apply_rotary, attention, rms_norm, route, swiglu
from mer.quant.dense import linear

if TYPE_CHECKING:
    from mer.models.layers import ExpertProvider
    from mer.models.transformer import MoETransformer
    from mer.quant.expert import ExpertFormat

Shape = tuple[int, ...]


class TensorSource(Protocol):
    """What a family reads a checkpoint through (`mer.store.safetensors_source`)."""

    def __contains__(self, name: str) -> bool: ...

    def get(self, name: str) -> torch.Tensor: ...

    def get_row(self, name: str, index: int) -> torch.Tensor: ...  # t[index] of a stacked t


class Family:
    name: str = ""  # our model_type, written in stores
    model_types: tuple[str, ...] = ()  # Hugging Face `model_type`s it serves
    architectures: tuple[str, ...] = ()  # Hugging Face `architectures`
    gguf_architectures: tuple[str, ...] = ()  # GGUF `general.architecture`
    config_class: type[ModelConfig] = ModelConfig
    defaults: dict[str, Any] = {}  # what a config.json may leave out
    rope_types: tuple[str, ...] = ("default",)
    keep_float32: frozenset[str] = frozenset()  # short names kept in float32 in store and RAM
    GLOBAL: dict[str, str] = {}
    LAYER: dict[str, str] = {}  # templates with {i}
    EXPERT: dict[str, str] = {}  # w1 (gate), w2 (down), w3 (up): templates with {i} and {e}
    expert_bias: str = ""  # "" or the dtype its experts' biases are stored in ("bfloat16")
    presets: dict[str, dict[str, Any]] = {}  # `mer synth --preset` name -> config.json fields
    SOURCE_DTYPES: tuple[str, ...] = ("BF16", "F16", "F32")  # float checkpoint tensors read

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # --- config ---------------------------------------------------------------------------

    def normalise(self, values: dict[str, Any], where: str) -> dict[str, Any]:
        """config.json fields (defaults applied) -> ours. Must accept its own output too: a
        store's manifest holds `ModelConfig.to_dict()`, read back through here."""
        values.setdefault("dense_layers", [])
        return values

    # --- tensors --------------------------------------------------------------------------

    def global_shapes(self, cfg: ModelConfig) -> dict[str, Shape]:
        h, v = cfg.hidden_size, cfg.vocab_size
        return {"embed": (v, h), "norm": (h,), "lm_head": (v, h)}

    def layer_shapes(self, cfg: ModelConfig, i: int) -> dict[str, Shape]:
        """Short name (without `layers.{i}.`) -> shape, for every resident tensor of layer i."""
        return {
            "attn_norm": (cfg.hidden_size,),
            **self.attention_shapes(cfg),
            **self.ffn_shapes(cfg, i),
        }

    def attention_shapes(self, cfg: ModelConfig) -> dict[str, Shape]:
        h, d = cfg.hidden_size, cfg.head_dim
        q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
        shapes = {"q": (q, h), "k": (kv, h), "v": (kv, h), "o": (h, q)}
        if cfg.qkv_bias:
            shapes.update({"q_bias": (q,), "k_bias": (kv,), "v_bias": (kv,)})
        if cfg.qk_norm == "head":
            shapes.update({"q_norm": (d,), "k_norm": (d,)})
        return shapes

    def ffn_shapes(self, cfg: ModelConfig, i: int) -> dict[str, Shape]:
        """The norm before the FFN, and the router and shared expert or the dense MLP."""
        h = cfg.hidden_size
        shapes: dict[str, Shape] = {"ffn_norm": (h,)}
        if cfg.is_moe_layer(i):
            shapes["router"] = (cfg.num_local_experts, h)
            s = cfg.shared_expert_intermediate_size
            if s:
                shapes.update({"shared.gate": (s, h), "shared.up": (s, h), "shared.down": (h, s)})
        else:
            f = cfg.dense_intermediate_size
            shapes.update({"mlp.gate": (f, h), "mlp.up": (f, h), "mlp.down": (h, f)})
        return shapes

    def expert_shapes(self, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
        h, f = cfg.hidden_size, cfg.intermediate_size
        return {"w1": (f, h), "w2": (h, f), "w3": (f, h)}

    def expert_tensors(
        self, cfg: ModelConfig, layer: int, source: Container[str] | None = None
    ) -> dict[str, tuple[Shape, tuple[str, ...]]]:
        """Hugging Face name -> (shape, safetensors dtypes accepted) of every checkpoint
        tensor holding layer `layer`'s routed experts; `source` (the names a checkpoint has)
        lets a family that reads several layouts say which one it will read."""
        shapes = self.expert_shapes(cfg)
        return {
            hf.format(i=layer, e=e): (shapes[w], self.SOURCE_DTYPES)
            for e in range(cfg.num_local_experts)
            for w, hf in self.EXPERT.items()
        }

    def expert_extent(
        self, source: TensorSource, cfg: ModelConfig, layer: int, e: int, ef: ExpertFormat
    ) -> torch.Tensor:
        """One routed expert, read from a checkpoint, as a store extent in format `ef`."""
        w = {k: source.get(hf.format(i=layer, e=e)).float() for k, hf in self.EXPERT.items()}
        return ef.encode(w["w1"], w["w2"], w["w3"])

    def kv_shapes(self, cfg: ModelConfig) -> tuple[Shape, Shape]:
        """Per-token shapes of the two tensors each layer caches (full keys and values)."""
        kv = (cfg.num_key_value_heads, cfg.head_dim)
        return kv, kv

    def kv_bytes_per_token(self, cfg: ModelConfig, itemsize: int = 2) -> int:
        """What one token costs in the KV cache over all layers, `itemsize` bytes a number."""
        k, v = self.kv_shapes(cfg)
        return cfg.num_hidden_layers * (math.prod(k) + math.prod(v)) * itemsize

    # --- compute --------------------------------------------------------------------------

    def rotary(self, cfg: ModelConfig) -> Rotary:
        return Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def sliding_window(self, cfg: ModelConfig, i: int) -> int | None:
        """How many positions (the query's own included) layer i attends to; None: all."""
        return cfg.sliding_window

    def experts(self, cfg: ModelConfig, provider: ExpertProvider) -> ExpertProvider:
        """The provider the MoE block uses: a family whose experts compute differently (another
        activation) wraps the callables `use` yields. Default: the provider itself."""
        return provider

    def attention(self, m: MoETransformer, i: int, h: torch.Tensor, rope, spans) -> torch.Tensor:
        """Self-attention of layer i on the normed hidden h [T, H] -> [T, H]; `spans` are
        (token slice, KV cache, mask [T_i, S_i]) per sequence, `rope` the rotary tables.
        A lone decode token of a family that projects and attends as these defaults do
        takes one C call from its projections to its attention output (`_attend_decode`)."""
        if self._default_attention and h.shape[0] == 1 and len(spans) == 1:
            q, k, v = project_qkv(m, i, h)
            out = self._attend_decode(m, i, q, k, v, rope, spans[0])
            if out is not None:
                return out
            q, k, v = self.heads(m, i, q, k, v)
        else:
            q, k, v = self.qkv(m, i, h)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return self.attend(m, i, q, k, v, spans)

    @functools.cached_property
    def _default_attention(self) -> bool:
        """Whether this family's q, k, v and attention are the defaults' (what
        `rowops.attend_decode` computes)."""
        cls = type(self)
        return cls.qkv is Family.qkv and cls.heads is Family.heads and cls.attend is Family.attend

    def _attend_decode(self, m: MoETransformer, i: int, q, k, v, rope, span):
        """`attention` of one token of one sequence from its projections q, k, v [1, n] in
        one C call (QK norms, rotary, cache write, attention), then o; None where that
        call does not apply (a paged cache, float32, a full cache: the caller goes on)."""
        cfg, w, p = m.config, m.w, f"layers.{i}."
        _, kv, mask = span
        layer = getattr(kv, "layer", None)
        if layer is None or kv.length >= kv.capacity:
            return None
        head = cfg.qk_norm == "head"
        q_norm, k_norm = (w[p + "q_norm"], w[p + "k_norm"]) if head else (None, None)
        out = rowops.attend_decode(q, k, v, q_norm, k_norm, cfg.rms_norm_eps, *rope,
                                   *layer(i), kv.length, mask)  # fmt: skip
        return None if out is None else linear(out, w[p + "o"])

    def qkv(self, m: MoETransformer, i: int, h: torch.Tensor):
        """Queries [T, Hq, D], keys and values [T, Hkv, D] before the rotary embedding."""
        return self.heads(m, i, *project_qkv(m, i, h))

    def heads(self, m: MoETransformer, i: int, q, k, v):
        """The projections q, k, v [T, n] split into heads, q and k normed per head if the
        config says so."""
        cfg, w, p = m.config, m.w, f"layers.{i}."
        t = q.shape[0]
        q = q.view(t, cfg.num_attention_heads, -1)
        k, v = k.view(t, cfg.num_key_value_heads, -1), v.view(t, cfg.num_key_value_heads, -1)
        if cfg.qk_norm == "head":
            eps = cfg.rms_norm_eps
            q, k = rms_norm(q, w[p + "q_norm"], eps), rms_norm(k, w[p + "k_norm"], eps)
        return q, k, v

    def attend(self, m: MoETransformer, i: int, q, k, v, spans) -> torch.Tensor:
        """Each sequence's queries against its cache (after appending its new k, v), then o."""
        if len(spans) == 1:  # one sequence (a lone decode step): no slices, no gathering copy
            _, kv, mask = spans[0]
            return linear(attention(q, *kv.append(i, k, v), mask), m.w[f"layers.{i}.o"])
        out = torch.empty(q.shape[0], q.shape[1] * v.shape[2], dtype=q.dtype)
        for span, kv, mask in spans:
            out[span] = attention(q[span], *kv.append(i, k[span], v[span]), mask)
        return linear(out, m.w[f"layers.{i}.o"])

    def route(self, m: MoETransformer, i: int, h: torch.Tensor, allowed: torch.Tensor | None):
        """(weights [T, k] float32, expert ids [T, k]) for h [T, H]; `allowed` (bool [E], a
        draft's) limits the choice to those experts, as if the others did not exist."""
        cfg = m.config
        router = m.w[f"layers.{i}.router"]
        return route(h, router, cfg.num_experts_per_tok, cfg.norm_topk_prob, allowed)

    def router_scores(self, m: MoETransformer, i: int, h: torch.Tensor) -> torch.Tensor:
        """float32 [T, E]: the router's score of every expert for h [T, H], what `route`
        takes its top-k from (cache-aware routing compares them, `mer.models.routing`)."""
        return F.softmax(F.linear(h, m.w[f"layers.{i}.router"]).float(), dim=-1)

    def shared(self, m: MoETransformer, i: int, h: torch.Tensor, out: torch.Tensor):
        """Add the layer's always-on shared expert, if the config has one, to the routed `out`."""
        if m.config.shared_expert_intermediate_size:
            w, p = m.w, f"layers.{i}."
            out = out + swiglu(h, w[p + "shared.gate"], w[p + "shared.up"], w[p + "shared.down"])
        return out

    def mlp(self, m: MoETransformer, i: int, h: torch.Tensor) -> torch.Tensor:
        """A dense (non-MoE) layer's FFN."""
        w, p = m.w, f"layers.{i}."
        return swiglu(h, w[p + "mlp.gate"], w[p + "mlp.up"], w[p + "mlp.down"])


def project_qkv(m: MoETransformer, i: int, h: torch.Tensor):
    """h [T, H] through layer i's q, k and v projections, biases added: [T, n] each; one
    call where the model stacked them (`MoETransformer._fuse_qkv`)."""
    w, p = m.w, f"layers.{i}."
    rows = m.qkv_rows.get(i)
    if rows is not None:
        return linear(h, w[p + "qkv"], w.get(p + "qkv_bias")).split(rows, -1)
    return tuple(linear(h, w[p + n], w.get(p + n + "_bias")) for n in ("q", "k", "v"))
