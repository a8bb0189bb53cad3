"""OLMoE (`OlmoeForCausalLM`): QK RMSNorm over the whole projection (not per head) and an
optional `clip_qkv`; Qwen-MoE's tensor names otherwise, without a shared expert."""

from __future__ import annotations

from mer.models.family import Family, Shape, project_qkv
from mer.models.layers import rms_norm
from mer.models.qwen_moe import Qwen2Moe


class Olmoe(Family):
    name = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
    gguf_architectures = ("olmoe",)
    defaults = {"norm_topk_prob": False, "qk_norm": "full", "qkv_bias": False}
    GLOBAL, LAYER, EXPERT = Qwen2Moe.GLOBAL, Qwen2Moe.LAYER, Qwen2Moe.EXPERT

    def attention_shapes(self, cfg) -> dict[str, Shape]:
        shapes = super().attention_shapes(cfg)
        if cfg.qk_norm == "full":
            shapes.update({"q_norm": shapes["q"][:1], "k_norm": shapes["k"][:1]})
        return shapes

    def qkv(self, m, i: int, h):
        """Norm over the whole q and k projections, then clip q, k, v, then split heads."""
        cfg, w, p = m.config, m.w, f"layers.{i}."
        t, eps = h.shape[0], cfg.rms_norm_eps
        q, k, v = project_qkv(m, i, h)  # [T, Hq*D], [T, Hkv*D] twice
        if cfg.qk_norm == "full":
            q, k = rms_norm(q, w[p + "q_norm"], eps), rms_norm(k, w[p + "k_norm"], eps)
        if cfg.clip_qkv is not None:
            q, k, v = (z.clamp(-cfg.clip_qkv, cfg.clip_qkv) for z in (q, k, v))
        hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        return q.view(t, hq, -1), k.view(t, hkv, -1), v.view(t, hkv, -1)


_OLMOE = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "norm_topk_prob": False, "clip_qkv": None}  # fmt: skip
Olmoe.presets = {
    "olmoe-1b-7b": {**_OLMOE, "num_hidden_layers": 16, "num_experts": 64,
                    "num_experts_per_tok": 8, "hidden_size": 2048, "intermediate_size": 1024,
                    "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 50304,
                    "max_position_embeddings": 4096},
    "tiny-olmoe": {**_OLMOE, "num_hidden_layers": 2, "num_experts": 8, "num_experts_per_tok": 2,
                   "hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 512,
                   "clip_qkv": 3.0},
}  # fmt: skip

FAMILIES = (Olmoe(),)
