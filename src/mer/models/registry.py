"""model_type -> the family module that names its tensors. Families are imported on demand."""

from __future__ import annotations

import importlib
from types import ModuleType

from mer.errors import ConfigError

FAMILIES = {
    "mixtral": "mer.models.mixtral",
    "qwen2_moe": "mer.models.qwen_moe",
    "qwen3_moe": "mer.models.qwen_moe",
    "olmoe": "mer.models.olmoe",
}


def family(model_type: str) -> ModuleType:
    try:
        return importlib.import_module(FAMILIES[model_type])
    except KeyError:
        raise ConfigError(
            f"model type {model_type!r} is not supported (supported: {', '.join(FAMILIES)})"
        ) from None
