"""jaxlm: InternLM2 in JAX / Flax NNX."""

from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, ConfigError, JaxlmError
from jaxlm.models.internlm2 import InternLM2ForCausalLM
from jaxlm.presets import PRESETS

__version__ = "0.1.0"

__all__ = ["InternLM2Config", "InternLM2ForCausalLM", "PRESETS", "JaxlmError", "ConfigError",
           "CheckpointError"]
