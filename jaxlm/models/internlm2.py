"""InternLM2 / InternLM2.5, the network: a thin file over the shared layers in `jaxlm.nn`.

Parameter names follow the HF checkpoint (``tok_embeddings``, ``attention.wqkv``,
``feed_forward.w1``, ...) so the conversion table reads one-to-one. Everything
that runs the network (the eager jit cache, meshes, chunked prefill,
generation) lives in `jaxlm.runtime`; the public class with HF's API is
`jaxlm.models.causal_lm.InternLM2ForCausalLM`.

Dimensions: B batch, T query tokens, S key slots, E embed, H query heads,
K kv heads, G = H / K query heads per kv head, C = G + 2 slots of a kv group
in ``wqkv``, D head dim, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlm.config import InternLM2Config
from jaxlm.nn import kv_cache as kv_cache_lib
from jaxlm.nn.attention import AttentionMask
from jaxlm.nn.attention_plan import AttentionPlan, attend_cache, plan_attention, resolve_impl
from jaxlm.nn.embed import Embed
from jaxlm.nn.linear import Projection
from jaxlm.nn.mlp import SwiGLU
from jaxlm.nn.norm import RMSNorm
from jaxlm.nn.rotary import RopeConfig, apply_rope, dynamic_ntk_base, rope_cos_sin
from jaxlm.nn.stack import make_stacked, run_layers
from jaxlm.options import ModelOptions
from jaxlm.sharding import ACT, constrain


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
        kw = dict(init_std=cfg.initializer_range, dtype=opts.dtype, param_dtype=opts.param_dtype,
                  quantize=opts.quantize, rngs=rngs)
        # C indexes the slots of a kv group: queries 0..G-1, key G, value G+1.
        self.wqkv = Projection("BTE,KCDE->BTKCD", (K, G + 2, D, E), ("kv_heads", "qkv", "head_dim", "embed"),
                               bias=cfg.bias, **kw)
        self.wo = Projection("BTHD,EHD->BTE", (E, H, D), ("embed", "heads", "head_dim"), in_dims=2,
                             bias=cfg.bias, **kw)

    def __call__(self, x, cos, sin, mask: AttentionMask, plan: AttentionPlan, kv_cache=None, write_slot=None,
                 dropout_key=None):
        G = self.group
        k_qkv, k_wo = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        qkv = self.wqkv(x, k_qkv)                                 # [B, T, K, C, D]
        q = apply_rope(qkv[:, :, :, :G], cos, sin)                # [B, T, K, G, D]
        k = apply_rope(qkv[:, :, :, G], cos, sin)                 # [B, T, K, D]
        v = qkv[:, :, :, G + 1]                                   # [B, T, K, D]
        q = constrain(q, ACT["queries"])
        B, T = x.shape[:2]
        new_cache, kv = None, kv_cache_lib.KVView(k, v)
        if kv_cache is not None:
            # Write this call's keys/values, then attend to the cache as stored (int8 and
            # scales, or pages): all of it when decoding, its first kv_len slots otherwise.
            new_cache = kv_cache_lib.write(kv_cache, k, v, write_slot)
            kv = kv_cache_lib.read(new_cache, None if mask.decode else mask.kv_len)
        out = attend_cache(q, kv, mask, plan)                    # [B, T, K, G, D]
        out = out.reshape(B, T, -1, out.shape[-1])               # [B, T, H, D], head = k*G + g
        return self.wo(out, k_wo), new_cache


class InternLM2DecoderLayer(nnx.Module):
    def __init__(self, cfg: InternLM2Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        norm_kw = dict(dtype=opts.dtype, param_dtype=opts.param_dtype, rngs=rngs)
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.attention = InternLM2Attention(cfg, opts, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm_kw)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size, init_std=cfg.initializer_range,
                                   dtype=opts.dtype, param_dtype=opts.param_dtype, quantize=opts.quantize,
                                   rngs=rngs)

    def __call__(self, x, cos, sin, mask, plan, kv_cache=None, write_slot=None, dropout_key=None):
        k_att, k_mlp = (None, None) if dropout_key is None else jax.random.split(dropout_key)
        h, new_cache = self.attention(self.attention_norm(x), cos, sin, mask, plan, kv_cache, write_slot, k_att)
        x = constrain(x + h, ACT["hidden"])
        x = constrain(x + self.feed_forward(self.ffn_norm(x), k_mlp), ACT["hidden"])
        return x, new_cache


class InternLM2Model(nnx.Module):
    """Embedding, decoder layers and final norm (the HF ``model.`` prefix)."""

    def __init__(self, cfg: InternLM2Config, opts: ModelOptions, *, rngs: nnx.Rngs):
        self.rope = rope_config(cfg)
        self.options = opts
        self.num_layers = cfg.num_hidden_layers
        self.kv_group = (cfg.num_key_value_heads, cfg.q_per_kv, cfg.head_dim)   # K, G, D
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
        How attention runs is planned once here for every layer
        (`jaxlm.nn.attention_plan`).
        """
        if rope_len is None:
            rope_len = jnp.max(positions) + 1
        base = dynamic_ntk_base(self.rope, rope_len)
        cos, sin = rope_cos_sin(positions, self.rope, base, self.options.dtype)
        x = constrain(self.tok_embeddings(input_ids), ACT["hidden"])
        plan = plan_attention(mask, tuple(input_ids.shape) + self.kv_group,
                              impl=self.options.attention_impl, context=self.options.context_attention,
                              dtype=self.options.dtype)

        def layer_fn(layer, h, key, cache):
            return layer(h, cos, sin, mask, plan, cache, write_slot, key)

        keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
        if keys is not None and not self.options.scan_layers:
            keys = list(keys)
        x, new_caches = run_layers(self.layers, x, layer_fn, per_layer=keys, caches=kv_caches,
                                   scanned=self.options.scan_layers, remat=self.options.remat)
        return self.norm(x), new_caches


class InternLM2Network(nnx.Module):
    """The causal LM network: `InternLM2Model` plus the output head (``output``, or tied).

    Traceable methods only; `jaxlm.models.causal_lm.InternLM2ForCausalLM` adds
    the eager call, loading and generation on top.
    """

    def __init__(self, config: InternLM2Config, options: ModelOptions | None = None, *,
                 rngs: nnx.Rngs | None = None, **option_overrides):
        self.config = config
        self.options = ModelOptions.build(options, **option_overrides).resolve()
        resolve_impl(self.options.attention_impl)   # e.g. cuDNN without a GPU: fail now, not at the first call
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.model = InternLM2Model(config, self.options, rngs=rngs)
        if not config.tie_word_embeddings:
            self.output = Projection("BTE,VE->BTV", (config.vocab_size, config.hidden_size),
                                     ("vocab", "embed"), init_std=config.initializer_range,
                                     dtype=self.options.dtype, param_dtype=self.options.param_dtype,
                                     quantize=self.options.quantize if self.options.quantize_output else None,
                                     rngs=rngs)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits ``[B, T, V]`` from final hidden states."""
        if self.config.tie_word_embeddings:
            out = self.model.tok_embeddings.attend(hidden)
        else:
            out = self.output(hidden)
        return constrain(out, ACT["logits"]).astype(jnp.float32)

    def positions(self, input_ids, attention_mask=None, position_ids=None) -> jax.Array:
        """``position_ids``, or HF's rule: ``cumsum(mask) - 1`` clamped at 0 (left padding), else ``arange``."""
        B, T = jnp.shape(input_ids)
        if position_ids is None:
            if attention_mask is not None:
                position_ids = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
            else:
                position_ids = jnp.broadcast_to(jnp.arange(T), (B, T))
        return jnp.asarray(position_ids, jnp.int32)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None,
                      dropout_key=None):
        """Final-norm hidden states ``[B, T, E]`` of full sequences (what `forward` feeds the head).

        ``attention_mask [B, T]`` drops padded keys; ``segment_ids [B, T]``
        keeps attention inside packed examples.
        """
        input_ids = jnp.asarray(input_ids)
        T = input_ids.shape[1]
        positions = self.positions(input_ids, attention_mask, position_ids)
        key_valid = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        seg = None if segment_ids is None else jnp.asarray(segment_ids)
        mask = AttentionMask(T, True, 0, None, key_valid, seg, seg)
        hidden, _ = self.model(input_ids, positions, mask, dropout_key=dropout_key)
        return hidden

    def forward(self, input_ids, attention_mask=None, position_ids=None, segment_ids=None):
        """Full-sequence float32 logits ``[B, T, V]`` (see `hidden_states`)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, segment_ids))

    __call__ = forward
