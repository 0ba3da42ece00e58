"""jaxlm: InternLM2 in JAX / Flax NNX."""

from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError, ConfigError, JaxlmError
from jaxlm.models.causal_lm import InternLM2ForCausalLM
from jaxlm.options import ModelOptions
from jaxlm.config import PRESETS
from jaxlm.serving.pipeline import pipeline
from jaxlm.tokenizer import InternLM2Tokenizer

__version__ = "0.1.0"

__all__ = ["InternLM2Config", "InternLM2ForCausalLM", "ModelOptions", "InternLM2Tokenizer", "PRESETS", "pipeline", "JaxlmError", "ConfigError",
           "CheckpointError"]
