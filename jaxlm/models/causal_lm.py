"""`InternLM2ForCausalLM`: the network with HF's API, as thin entry points.

Each method hands the work to the layer that does it: the eager forward to
`jaxlm.runtime.forward`, generation and chat to `jaxlm.runtime.generate`,
loading and saving to `jaxlm.checkpoint.loading`. The network itself is
`jaxlm.models.internlm2`.
"""

from __future__ import annotations

from jaxlm.checkpoint import loading
from jaxlm.models.internlm2 import InternLM2Network
from jaxlm.options import ModelOptions
from jaxlm.runtime import forward, generate as generation


class InternLM2ForCausalLM(InternLM2Network):
    """InternLM2 / InternLM2.5 causal LM.

    ``InternLM2ForCausalLM(config, options=None, rngs=None, **option_overrides)``
    builds a randomly initialized model; ``from_pretrained`` loads one. Options
    (`jaxlm.options.ModelOptions`) may be given as an object, as keywords
    (``dtype="bfloat16"``, ``scan_layers=True``, ...) or both.
    """

    @classmethod
    def from_pretrained(cls, path: str, options: ModelOptions | None = None, *, mesh=None, revision=None,
                        **option_overrides):
        """Loads an HF InternLM2 directory, an InternEvo "Origin" directory or a jaxlm checkpoint,
        tensor by tensor; a hub id (``internlm/internlm2-chat-7b``, ``modelscope:ORG/NAME``) that
        is not a local path is fetched (at ``revision``) through the hub's cache first.

        ``param_dtype`` defaults to the stored dtype and ``dtype`` (compute) to
        ``param_dtype``; with ``mesh`` every tensor is placed with its sharding.
        """
        return loading.load_pretrained(cls, path, ModelOptions.build(options, **option_overrides), mesh=mesh,
                                       revision=revision)

    def save_pretrained(self, dst: str, *, overwrite: bool = False, source_dir: str | None = None) -> str:
        """Writes a jaxlm checkpoint (Orbax) plus config.json to ``dst``."""
        return loading.save_pretrained(self, dst, overwrite=overwrite, source_dir=source_dir)

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, chunk_size=None):
        """float32 logits ``[B, T, V]``; see `jaxlm.runtime.forward.call`.

        With ``chunk_size`` the sequence goes through a KV cache that many
        tokens at a time (memory ~ chunk x context); the logits are the same.
        """
        return forward.call(self, input_ids, attention_mask, position_ids, segment_ids, chunk_size)

    @property
    def max_context(self) -> int:
        return generation.max_context(self)

    def generate(self, input_ids, attention_mask=None, **kwargs):
        return generation.generate(self, input_ids, attention_mask, **kwargs)

    def stream_generate(self, input_ids, attention_mask=None, **kwargs):
        return generation.stream_generate(self, input_ids, attention_mask, **kwargs)

    def chat(self, tokenizer, query: str, history=(), **kwargs):
        return generation.chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query: str, history=(), **kwargs):
        return generation.stream_chat(self, tokenizer, query, history, **kwargs)

    generate.__doc__ = generation.generate.__doc__
    stream_generate.__doc__ = generation.stream_generate.__doc__
    chat.__doc__ = generation.chat.__doc__
    stream_chat.__doc__ = generation.stream_chat.__doc__
