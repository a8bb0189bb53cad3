"""`ModelConfig` and `read_json`, where the rest of mer has always imported them from.

The class lives in `mer.models.config`: building it asks the family registry
(`mer.models.registry`) how to read a family's `config.json`, and the families
subclass it, so it belongs to the models package (defining it here would make
`mer.config` and `mer.models` import each other).
"""

from mer.models.config import ModelConfig, read_json

__all__ = ["ModelConfig", "read_json"]
