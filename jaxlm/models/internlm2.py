"""InternLM2 / InternLM2.5: a thin model file over the shared layers in `jaxlm.nn`.

Parameter names follow the HF checkpoint (``tok_embeddings``, ``attention.wqkv``,
``feed_forward.w1``, ...) so the conversion table reads one-to-one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.config import InternLM2Config
from jaxlm.generation.api import GenerationMixin
from jaxlm.models.options import ModelOptions
from jaxlm.nn.attention import AttentionMask, attend, attend_decode
from jaxlm.nn import kv_cache as kv_cache_lib
from jaxlm.nn.embed import Embed
from jaxlm.nn.linear import Projection
from jaxlm.nn.mlp import SwiGLU
from jaxlm.nn.norm import RMSNorm
from jaxlm.nn.rotary import RopeConfig, apply_rope, dynamic_ntk_base, rope_cos_sin
from jaxlm.nn.stack import make_stacked, run_layers
from jaxlm.sharding import batch_multiple, constrain, model_mesh, named_sharding, pad_rows

ACT = ("batch", "length", "act_embed")


def rope_config(cfg: InternLM2Config) -> RopeConfig:
    return RopeConfig(head_dim=cfg.head_dim, theta=float(cfg.rope_theta), scaling_type=cfg.rope_type,
                      factor=cfg.rope_factor, max_position_embeddings=cfg.max_position_embeddings)


class InternLM2Attention(nnx.Module):
    """Grouped-query attention with the original packed ``wqkv`` projection.

    ``wqkv.kernel`` is ``[kv_heads, G + 2, head_dim, embed]``, the HF tensor with
    its rows unflattened: for kv head ``k`` the slots are its G query heads,
    then its key, then its value. Tensor parallelism splits it along ``kv_heads``.
    """

    def __init__(self, cfg: InternLM2Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        E, H, K, G, D = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                         cfg.q_per_kv, cfg.head_dim)
        self.group = G
        self.impl = opts.attention_impl
        self.context_attention = opts.context_attention
        kw = dict(init_std=cfg.initializer_range, dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        # C indexes the slots of a kv group: queries 0..G-1, key G, value G+1.
        self.wqkv = Projection("BTE,KCDE->BTKCD", (K, G + 2, D, E), ("kv_heads", "qkv", "head_dim", "embed"),
                               bias=cfg.bias, **kw)
        self.wo = Projection("BTHD,EHD->BTE", (E, H, D), ("embed", "heads", "head_dim"), in_dims=2,
                             bias=cfg.bias, **kw)

    def __call__(self, x, cos, sin, mask, kv_cache=None, write_slot=None, dropout_key=None):
        G = self.group
        k_qkv, k_wo = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        qkv = self.wqkv(x, k_qkv)                                 # [B, T, K, G+2, D]
        q = apply_rope(qkv[:, :, :, :G], cos, sin)                # [B, T, K, G, D]
        k = apply_rope(qkv[:, :, :, G], cos, sin)                 # [B, T, K, D]
        v = qkv[:, :, :, G + 1]                                   # [B, T, K, D]
        q = constrain(q, ("batch", "length", "act_kv_heads", None, "head_dim"))
        B, T = x.shape[:2]
        new_cache = None
        if kv_cache is not None:
            new_cache = kv_cache_lib.write(kv_cache, k, v, write_slot)
            if T == 1:  # decoding: one query per row against the cache
                k_all, v_all = kv_cache_lib.read(new_cache, q.dtype)
                out = attend_decode(q.reshape(B, -1, q.shape[-1]), k_all, v_all, write_slot + 1, self.impl)
                return self.wo(out.reshape(B, 1, -1, out.shape[-1])), new_cache
            k, v = kv_cache_lib.read(new_cache, q.dtype, mask.kv_len)
        out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, self.impl,
                     self.context_attention)                     # [B, T, K, G, D]
        out = out.reshape(B, T, -1, out.shape[-1])               # [B, T, H, D], head = k*G + g
        return self.wo(out, k_wo), new_cache


class InternLM2DecoderLayer(nnx.Module):
    def __init__(self, cfg: InternLM2Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.attention = InternLM2Attention(cfg, opts, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size, init_std=cfg.initializer_range,
                                   dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, kv_cache=None, write_slot=None, dropout_key=None):
        k_att, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        h, new_cache = self.attention(self.attention_norm(x), cos, sin, mask, kv_cache, write_slot, k_att)
        x = constrain(x + h, ACT)
        x = constrain(x + self.feed_forward(self.ffn_norm(x), k_mlp), ACT)
        return x, new_cache


class InternLM2Model(nnx.Module):
    """Embedding, decoder layers and final norm (the HF ``model.`` prefix)."""

    def __init__(self, cfg: InternLM2Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.rope = rope_config(cfg)
        self.options = opts
        self.num_layers = cfg.num_hidden_layers
        kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.tok_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, init_std=cfg.initializer_range, **kw)
        make = lambda r: InternLM2DecoderLayer(cfg, opts, rngs=r)
        if opts.scan_layers:
            self.layers = make_stacked(make, cfg.num_hidden_layers, rngs)
        else:
            self.layers = nnx.List([make(rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

    def __call__(self, input_ids, positions, mask, *, rope_len=None, kv_caches=None, write_slot=None,
                 dropout_key=None):
        """Hidden states ``[B, T, E]`` (and updated caches when ``kv_caches`` is given).

        ``rope_len`` is the sequence length L that fixes the dynamic-NTK base;
        by default ``max(positions) + 1`` of this call, as in the reference.
        ``dropout_key`` turns on LoRA dropout (one key per layer, split from it).
        """
        if rope_len is None:
            rope_len = jnp.max(positions) + 1
        base = dynamic_ntk_base(self.rope, rope_len)
        cos, sin = rope_cos_sin(positions, self.rope, base, self.options.dtype)
        x = constrain(self.tok_embeddings(input_ids), ACT)

        def layer_fn(layer, h, key, cache):
            return layer(h, cos, sin, mask, cache, write_slot, key)

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
        if keys is not None and not self.options.scan_layers:
            keys = list(keys)
        x, new_caches = run_layers(self.layers, x, layer_fn, per_layer=keys, caches=kv_caches,
                                   scanned=self.options.scan_layers, remat=self.options.remat)
        return self.norm(x), new_caches


class InternLM2ForCausalLM(GenerationMixin, nnx.Module):
    """The causal LM: `InternLM2Model` plus the output head (``output``, or tied)."""

    def __init__(self, config: InternLM2Config, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 scan_layers: bool = False, attention_impl: str = "auto", remat: str = "none",
                 max_context: int | None = None, kv_cache_dtype=None, context_attention: str = "allgather",
                 rngs: nnx.Rngs | None = None):
        self.config = config
        self.options = ModelOptions(dtype=dtype, param_dtype=param_dtype, scan_layers=scan_layers,
                                    attention_impl=attention_impl, remat=remat, max_context=max_context,
                                    kv_cache_dtype=kv_cache_dtype, context_attention=context_attention)
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.model = InternLM2Model(config, self.options, rngs=rngs)
        if not config.tie_word_embeddings:
            self.output = Projection("BTE,VE->BTV", (config.vocab_size, config.hidden_size),
                                     ("vocab", "embed"), init_std=config.initializer_range,
                                     dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                                     rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[B, T, V]`` from final hidden states."""
        if self.config.tie_word_embeddings:
            out = self.model.tok_embeddings.attend(hidden)
        else:
            out = self.output(hidden)
        return constrain(out, ("batch", "length", "act_vocab")).astype(jnp.float32)

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, chunk_size=None):
        """Traceable full-sequence forward: logits ``[B, T, V]`` in float32.

        With ``attention_mask`` and no ``position_ids``, positions are
        ``cumsum(mask) - 1`` clamped at 0 (HF's left-padding rule). With
        ``segment_ids`` (packed rows) attention stays inside each segment.
        With ``chunk_size`` the sequence goes through a KV cache that many
        tokens at a time (memory ~ chunk x context); the logits are the same.
        """
        if chunk_size:
            return self._chunked_logits(input_ids, attention_mask, position_ids, segment_ids, chunk_size)
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))

    def _positions(self, input_ids, attention_mask, position_ids):
        B, T = input_ids.shape
        if position_ids is None:
            if attention_mask is not None:
                position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(T), (B, T))
        return jnp.asarray(position_ids, jnp.int32)

    def _chunked_logits(self, input_ids, attention_mask, position_ids, segment_ids, chunk):
        from jaxlm.generation.chunked import run_chunks
        from jaxlm.generation.engine import init_caches

        input_ids = jnp.asarray(input_ids)
        B, T = input_ids.shape
        positions = self._positions(input_ids, attention_mask, position_ids)
        n = -(-T // chunk)
        caches = init_caches(self, B, n * chunk, jnp.dtype(self.options.dtype))
        logits0 = jnp.zeros((n, B, chunk, self.config.vocab_size), jnp.float32)
        collect = lambda c, hidden, out: out.at[c].set(self.logits(hidden))
        key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        _, logits = run_chunks(self, input_ids, positions, caches, chunk=chunk, rope_len=jnp.max(positions) + 1,
                               collect=collect, init=logits0, key_valid=key_valid,
                               segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))
        return jnp.moveaxis(logits, 0, 1).reshape(B, n * chunk, -1)[:, :T]

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                      dropout_key=None):
        """Final-norm hidden states ``[B, T, E]`` (what `forward` feeds the output head)."""
        input_ids = jnp.asarray(input_ids)
        T = input_ids.shape[1]
        positions = self._positions(input_ids, attention_mask, position_ids)
        mask = attention_mask_for(T, attention_mask, segment_ids)
        hidden, _ = self.model(input_ids, positions, mask, dropout_key=dropout_key)
        return hidden

    def __call__(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None, chunk_size=None):
        """``model(input_ids, attention_mask=None, position_ids=None, chunk_size=None)`` -> float32 logits.

        Called with concrete arrays it runs a cached jitted forward; inside a
        user's own ``jit``/``grad`` it traces directly.
        """
        args = (input_ids, attention_mask, position_ids, segment_ids)
        if any(isinstance(a, jax.core.Tracer) for a in args):
            return self.forward(*args, chunk_size=chunk_size)
        graphdef, state = nnx.split(self)
        mesh = model_mesh(self)
        if mesh is None:
            return _jitted_forward(graphdef, state, *args, chunk_size=chunk_size)
        # On a mesh the batch is split over the data x fsdp axes; a batch that
        # does not divide evenly is padded here and the padding dropped below.
        rows = np.asarray(input_ids).shape[0]
        multiple = batch_multiple(mesh)
        batch_sharding = named_sharding(mesh, ("batch", None))
        placed = [None if a is None else
                  jax.device_put(pad_rows(np.asarray(a), multiple, 1 if i == 1 else 0), batch_sharding)
                  for i, a in enumerate(args)]
        with jax.set_mesh(mesh):
            return _jitted_forward(graphdef, state, *placed, chunk_size=chunk_size)[:rows]


def attention_mask_for(T: int, attention_mask=None, segment_ids=None) -> AttentionMask:
    """Causal mask for a full sequence, with key padding and/or packed segments."""
    key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    return AttentionMask(T, True, 0, None, key_valid, seg, seg)


# Plain jax.jit over (graphdef, state): nnx.jit would return the module state as
# outputs, i.e. copy every weight on every call.
@functools.partial(jax.jit, static_argnames=("graphdef", "chunk_size"))
def _jitted_forward(graphdef, state, input_ids, attention_mask, position_ids, segment_ids, chunk_size=None):
    return nnx.merge(graphdef, state).forward(input_ids, attention_mask, position_ids, segment_ids, chunk_size)


def _from_pretrained(cls, path, *, dtype=None, param_dtype=None, mesh=None, scan_layers=False,
                     attention_impl="auto", remat="none", max_context=None, kv_cache_dtype=None,
                     context_attention="allgather"):
    """Loads an HF InternLM2 directory or a jaxlm checkpoint.

    ``param_dtype`` defaults to the stored dtype and ``dtype`` (compute) to
    ``param_dtype``. Weights are read tensor by tensor, never as a whole model.
    """
    from jaxlm.checkpoint.loading import load_pretrained

    return load_pretrained(cls, path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                           scan_layers=scan_layers, attention_impl=attention_impl, remat=remat,
                           max_context=max_context, kv_cache_dtype=kv_cache_dtype,
                           context_attention=context_attention)


def _save_pretrained(self, dst, *, overwrite=False, source_dir=None):
    """Writes a jaxlm checkpoint (Orbax) plus config.json to ``dst``."""
    from jaxlm.checkpoint.loading import save_pretrained

    return save_pretrained(self, dst, overwrite=overwrite, source_dir=source_dir)


InternLM2ForCausalLM.from_pretrained = classmethod(_from_pretrained)
InternLM2ForCausalLM.save_pretrained = _save_pretrained
