"""gpt-oss (`GptOssForCausalLM`): sinks, per-layer windows, biases, and 4-bit experts kept so.

Where it differs from the Mixtral-like defaults of `Family`:

- attention: q, k, v and o projections carry biases; every head has a learned
  sink logit that joins its softmax denominator (`layers.attention(sinks=)`);
  layers alternate (`layer_types`) between a sliding window of
  `sliding_window` positions and full attention; YaRN rotary tables.
- routing: the router has a bias, keeps the top-k logits, and the softmax runs
  over those k only (weights always sum to 1).
- experts: a clamped SwiGLU, `(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`
  with g = min(gate, limit), and biases on gate/up and down. The store's
  `gate_up` is [gate rows | up rows] as for every family; the checkpoint
  interleaves them (row 2j gate j, row 2j+1 up j), so the converter splits
  rows, which keeps MXFP4 blocks bit-exact (a block lies within one row).
- checkpoint: the experts of a layer are stacked tensors, either MXFP4
  (`gate_up_proj_blocks`/`_scales` [E, 2F, H/32, 16]/[E, 2F, H/32], as the
  published checkpoints ship them) or float (`gate_up_proj` [E, H, 2F] and
  `down_proj` [E, F, H], multiplied as x @ W, as transformers saves them).
  MXFP4 blocks go into an `mxfp4` store byte for byte; any other scheme (or
  float experts) is quantized from the exact dequantized values.

The KV cache keeps every position of every layer (sliding layers too): the
window is the mask's, so paged blocks, prefix sharing and rollback need nothing
of their own.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from mer.errors import ConfigError
from mer.models.config import ModelConfig
from mer.models.family import Family, Shape, TensorSource
from mer.models.layers import ExpertProvider, Rotary, attention
from mer.quant import mxfp4
from mer.quant.dense import linear
from mer.quant.expert import ExpertFormat, ExpertWeights

_P = "model.layers.{i}."
_X = _P + "mlp.experts."
LAYER_TYPES = ("sliding_attention", "full_attention")
FLOAT = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class GptOssConfig(ModelConfig):
    layer_types: tuple[str, ...] = ()  # per layer: "sliding_attention" or "full_attention"
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # YaRN (rope_type "yarn"), as transformers reads `rope_scaling`/`rope_parameters`
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_original_max_positions: int = 4096
    rope_truncate: bool = True
    rope_attention_factor: float | None = None

    def validate(self, where: str = "config") -> None:
        super().validate(where)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"{where}: layer_types has {len(self.layer_types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        bad = [t for t in self.layer_types if t not in LAYER_TYPES]
        if bad:
            raise ConfigError(f"{where}: layer type {bad[0]!r} is not one of {LAYER_TYPES}")
        for name in ("swiglu_alpha", "swiglu_limit", "rope_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
                raise ConfigError(f"{where}: {name} must be a positive number, got {v!r}")


# The published shapes (openai/gpt-oss-20b and -120b config.json), and a tiny one with every
# quirk within reach of a short prompt: a window of 4, a clamp that bites, YaRN's ramp.
_PUBLISHED = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "rms_norm_eps": 1e-5,
    "rope_theta": 150000.0, "sliding_window": 128, "swiglu_limit": 7.0, "attention_bias": True,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "original_max_position_embeddings": 4096, "truncate": False},
    "num_experts_per_tok": 4, "hidden_size": 2880, "intermediate_size": 2880, "head_dim": 64,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 201088,
    "max_position_embeddings": 131072,
}  # fmt: skip
PRESETS = {
    "gpt-oss-20b": {**_PUBLISHED, "num_hidden_layers": 24, "num_local_experts": 32},
    "gpt-oss-120b": {**_PUBLISHED, "num_hidden_layers": 36, "num_local_experts": 128},
    "tiny-gpt-oss": {**_PUBLISHED, "num_hidden_layers": 4, "num_local_experts": 4,
                     "num_experts_per_tok": 2, "hidden_size": 64, "intermediate_size": 64,
                     "head_dim": 16, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "vocab_size": 512, "max_position_embeddings": 512, "sliding_window": 4,
                     "swiglu_limit": 1.5,
                     "rope_scaling": {**_PUBLISHED["rope_scaling"], "factor": 8.0,
                                      "original_max_position_embeddings": 32}},
}  # fmt: skip


class GptOss(Family):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    config_class = GptOssConfig
    defaults = {"qk_norm": "none", "qkv_bias": True}
    rope_types = ("default", "yarn")
    gguf_architectures = ("gpt-oss",)
    expert_bias = "bfloat16"  # the published checkpoints' bias dtype: stored exactly
    presets = PRESETS
    GLOBAL = {"embed": "model.embed_tokens.weight", "norm": "model.norm.weight",
              "lm_head": "lm_head.weight"}  # fmt: skip
    LAYER = {
        "attn_norm": _P + "input_layernorm.weight",
        **{s: _P + f"self_attn.{s}_proj.weight" for s in "qkvo"},
        **{f"{s}_bias": _P + f"self_attn.{s}_proj.bias" for s in "qkvo"},
        "sinks": _P + "self_attn.sinks",
        "ffn_norm": _P + "post_attention_layernorm.weight",
        "router": _P + "mlp.router.weight",
        "router_bias": _P + "mlp.router.bias",
    }

    # --- config ---------------------------------------------------------------------------

    def normalise(self, values: dict, where: str) -> dict:
        values = super().normalise(values, where)
        if "attention_bias" in values:
            values["qkv_bias"] = bool(values["attention_bias"])
        n = values.get("num_hidden_layers") or 0
        if not values.get("layer_types"):  # transformers' default: sliding, full, sliding, ...
            values["layer_types"] = [LAYER_TYPES[i % 2] for i in range(n)]
        values["layer_types"] = tuple(values["layer_types"])
        rope = values.get("rope_parameters") or values.get("rope_scaling")
        if isinstance(rope, dict):  # a config.json; a manifest holds the fields below
            values["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
            if values["rope_type"] == "yarn":
                orig = rope.get("original_max_position_embeddings", 4096)
                factor = rope.get("factor") or values.get("max_position_embeddings", orig) / orig
                values.update(
                    rope_factor=factor,
                    rope_beta_fast=rope.get("beta_fast") or 32.0,
                    rope_beta_slow=rope.get("beta_slow") or 1.0,
                    rope_original_max_positions=orig,
                    rope_truncate=rope.get("truncate", True),
                    rope_attention_factor=rope.get("attention_factor"),
                )
        return values

    # --- tensors --------------------------------------------------------------------------

    def attention_shapes(self, cfg) -> dict[str, Shape]:
        shapes = super().attention_shapes(cfg)
        if cfg.qkv_bias:
            shapes["o_bias"] = (cfg.hidden_size,)
        shapes["sinks"] = (cfg.num_attention_heads,)
        return shapes

    def ffn_shapes(self, cfg, i: int) -> dict[str, Shape]:
        return super().ffn_shapes(cfg, i) | {"router_bias": (cfg.num_local_experts,)}

    def expert_tensors(self, cfg, layer: int, source=None) -> dict:
        """The layer's stacked experts: MXFP4 blocks where the checkpoint has them, else float."""
        e, h, f = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
        p = _X.format(i=layer)
        biases = {
            p + "gate_up_proj_bias": ((e, 2 * f), FLOAT),
            p + "down_proj_bias": ((e, h), FLOAT),
        }
        if source is not None and p + "gate_up_proj_blocks" in source:
            u8 = ("U8",)
            return {
                p + "gate_up_proj_blocks": ((e, 2 * f, h // 32, 16), u8),
                p + "gate_up_proj_scales": ((e, 2 * f, h // 32), u8),
                p + "down_proj_blocks": ((e, h, f // 32, 16), u8),
                p + "down_proj_scales": ((e, h, f // 32), u8),
                **biases,
            }
        return {p + "gate_up_proj": ((e, h, 2 * f), FLOAT), p + "down_proj": ((e, f, h), FLOAT),
                **biases}  # fmt: skip

    def expert_extent(
        self, source: TensorSource, cfg, layer: int, e: int, ef: ExpertFormat
    ) -> torch.Tensor:
        p = _X.format(i=layer)

        def row(name: str) -> torch.Tensor:  # expert e of a stacked tensor, only its bytes
            return source.get_row(p + name, e)

        gate_up_bias, down_bias = _split(row("gate_up_proj_bias")), row("down_proj_bias")
        if p + "gate_up_proj_blocks" in source:
            gu = {"blocks": row("gate_up_proj_blocks"), "scales": row("gate_up_proj_scales")}
            down = {"blocks": row("down_proj_blocks"), "scales": row("down_proj_scales")}
            if ef.scheme == "mxfp4":  # bit for bit: no float round trip
                gu = {k: _split(v) for k, v in gu.items()}
                return ef.encode_native(gu, down, gate_up_bias, down_bias)
            gate_up, w2 = mxfp4.dequantize(**gu), mxfp4.dequantize(**down)  # [2F, H], [H, F]
        else:
            gate_up = row("gate_up_proj").float().t()  # [2F, H], gate/up rows interleaved
            w2 = row("down_proj").float().t().contiguous()  # [H, F]
        return ef.encode(gate_up[0::2], w2, gate_up[1::2], gate_up_bias, down_bias)

    # --- compute --------------------------------------------------------------------------

    def rotary(self, cfg) -> Rotary:
        if cfg.rope_type == "yarn":
            return YarnRotary(cfg)
        return super().rotary(cfg)

    def sliding_window(self, cfg, i: int) -> int | None:
        return cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None

    def attend(self, m, i: int, q, k, v, spans) -> torch.Tensor:
        """Attention with the layer's sinks, then o with its bias. A sliding layer looks only
        at the keys inside its first query's window: a decode step costs the window, not
        the context (the masked-out keys before it would contribute nothing)."""
        w, p = m.w, f"layers.{i}."
        window = self.sliding_window(m.config, i)
        out = torch.empty(q.shape[0], q.shape[1] * v.shape[2], dtype=q.dtype)
        for span, kv, mask in spans:
            keys, values = kv.append(i, k[span], v[span])  # [S, Hkv, D]
            t, s = mask.shape  # the queries are positions s - t .. s - 1
            lo = 0 if window is None else max(0, s - t - window + 1)
            out[span] = attention(q[span], keys[lo:], values[lo:], mask[:, lo:], w[p + "sinks"])
        return linear(out, w[p + "o"], w.get(p + "o_bias"))

    def route(self, m, i: int, h: torch.Tensor, allowed: torch.Tensor | None):
        """Top-k of the biased router logits, softmax over those k (float32)."""
        w, p = m.w, f"layers.{i}."
        logits = F.linear(h, w[p + "router"], w[p + "router_bias"]).float()  # [T, E]
        k = m.config.num_experts_per_tok
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
            k = min(k, int(allowed.sum()))
        top, ids = torch.topk(logits, k, dim=-1)  # [T, k]
        return torch.softmax(top, dim=-1), ids

    def router_scores(self, m, i: int, h: torch.Tensor) -> torch.Tensor:
        """Softmax of the biased router logits over all experts (float32 [T, E])."""
        w, p = m.w, f"layers.{i}."
        return torch.softmax(F.linear(h, w[p + "router"], w[p + "router_bias"]).float(), -1)

    def experts(self, cfg, provider: ExpertProvider) -> ExpertProvider:
        return ClampedSwiGLUExperts(provider, cfg.swiglu_alpha, cfg.swiglu_limit)


def _split(t: torch.Tensor) -> torch.Tensor:
    """Interleaved gate/up rows (gate j at 2j, up j at 2j+1) -> gate rows, then up rows."""
    return torch.cat([t[0::2], t[1::2]])


def clamped_swiglu(w: ExpertWeights, alpha: float, limit: float, x: torch.Tensor):
    """gpt-oss's expert FFN on x [T, H] from the linear maps of a stored expert."""
    h = w.gate_up(x)  # [T, 2F]: gate | up, biases added
    gate = h[:, : w.ffn].clamp(max=limit)
    up = h[:, w.ffn :].clamp(-limit, limit)
    return w.down((up + 1) * (gate * torch.sigmoid(gate * alpha)))


class ClampedSwiGLUExperts:
    """The provider the MoE block sees: the cache's experts, run with the clamped SwiGLU
    instead of `ExpertWeights`' plain one. Everything else is the wrapped provider's."""

    def __init__(self, provider: ExpertProvider, alpha: float, limit: float) -> None:
        self.provider, self.alpha, self.limit = provider, alpha, limit

    @contextlib.contextmanager
    def use(self, layer: int, expert: int):
        with self.provider.use(layer, expert) as weights:
            yield partial(clamped_swiglu, weights, self.alpha, self.limit)

    def is_resident(self, layer: int, expert: int) -> bool:
        return self.provider.is_resident(layer, expert)

    def is_held(self, layer: int, expert: int) -> bool:
        return getattr(self.provider, "is_held", self.provider.is_resident)(layer, expert)

    def fetch(self, layer: int, experts) -> int:
        return self.provider.fetch(layer, experts)

    def next_step(self) -> None:
        self.provider.next_step()

    def __getattr__(self, name: str):
        return getattr(self.provider, name)  # stats and the like, for whoever holds the model


class YarnRotary(Rotary):
    """YaRN: frequencies below the original context interpolated by `factor`, high ones
    kept, a linear ramp between (by rotations over the original context, `beta_fast` to
    `beta_slow`); cos and sin scaled by the attention factor. As transformers computes it."""

    def __init__(self, cfg: GptOssConfig) -> None:
        dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
        orig = cfg.rope_original_max_positions

        def correction_dim(rotations: float) -> float:
            return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        keep = 1 - ramp  # share of the original (extrapolated) frequency
        inv_freq = 1.0 / (factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep
        scale = cfg.rope_attention_factor
        if scale is None:
            scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
        positions = torch.arange(cfg.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat([freqs, freqs], -1)  # [P, D]
        self.cos, self.sin = emb.cos() * scale, emb.sin() * scale


FAMILIES = (GptOss(),)
