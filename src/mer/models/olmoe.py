"""OLMoE (`OlmoeForCausalLM`): tensor names. QK RMSNorm over the whole projection (not per
head), optional `clip_qkv`; same layout as Qwen-MoE otherwise, without a shared expert."""

from mer.models.qwen_moe import EXPERT, GLOBAL, LAYER  # noqa: F401 - same names
