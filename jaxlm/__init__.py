"""jaxlm: InternLM2 in JAX / Flax NNX."""

from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, ConfigError, JaxlmError
from jaxlm.models.internlm2 import InternLM2ForCausalLM
from jaxlm.presets import PRESETS
from jaxlm.tokenizer import InternLM2Tokenizer

__version__ = "0.1.0"

__all__ = ["InternLM2Config", "InternLM2ForCausalLM", "InternLM2Tokenizer", "PRESETS", "JaxlmError", "ConfigError",
           "CheckpointError"]
