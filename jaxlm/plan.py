"""How much device memory a run needs, before it runs (``jaxlm plan``).

Bytes per device for parameters, optimizer state, gradients, activations and
the KV cache, from the model's own parameter shapes and logical axes mapped
through the same rules table the run uses, so sharding is accounted exactly.
Activations follow the remat policy. The estimate is checked against XLA's
``compiled.memory_analysis()`` in the tests (within 15%).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.files import parse_size

GiB = 1 << 30

# HBM per chip / GPU (bytes).
DEVICES: dict[str, int] = {
    "v4": 32 * GiB,
    "v5e": 16 * GiB,
    "v5p": 95 * GiB,
    "v6e": 32 * GiB,
    "a100-40g": 40 * GiB,
    "a100-80g": 80 * GiB,
    "h100": 80 * GiB,
    "h200": 141 * 10**9,
}

LORA_TARGETS = ("wqkv", "wo", "w1", "w2", "w3")


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device."""

    params: int
    optimizer: int
    gradients: int
    activations: int
    kv_cache: int
    notes: list[str]
    device_memory: int | None = None
    headroom: float = 0.9

    @property
    def total(self) -> int:
        return self.params + self.optimizer + self.gradients + self.activations + self.kv_cache

    @property
    def fits(self) -> bool | None:
        if self.device_memory is None:
            return None
        return self.total <= self.device_memory * self.headroom

    def as_dict(self) -> dict:
        return {"params": self.params, "optimizer": self.optimizer, "gradients": self.gradients,
                "activations": self.activations, "kv_cache": self.kv_cache, "total": self.total,
                "device_memory": self.device_memory, "fits": self.fits, "notes": self.notes}

    def table(self) -> str:
        rows = [("parameters", self.params), ("optimizer state", self.optimizer),
                ("gradients", self.gradients), ("activations", self.activations),
                ("KV cache", self.kv_cache), ("total", self.total)]
        lines = [f"{name:<16} {fmt_bytes(n):>12}" for name, n in rows]
        if self.device_memory is not None:
            usable = self.device_memory * self.headroom
            verdict = "FITS" if self.fits else "DOES NOT FIT"
            lines.append(f"{'device':<16} {fmt_bytes(self.device_memory):>12}  (plan against "
                         f"{self.headroom:.0%} = {fmt_bytes(usable)})")
            lines.append(f"verdict: {verdict} ({self.total / usable:.0%} of usable memory)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def device_memory(spec: str | int | None) -> int | None:
    """A device name (v5e, h100, ...) or a size (16GiB) -> bytes."""
    if spec is None:
        return None
    if isinstance(spec, str) and spec.lower() in DEVICES:
        return DEVICES[spec.lower()]
    try:
        return parse_size(spec, "device memory")
    except ConfigError:
        raise
    except Exception:
        raise ConfigError(f"--device: unknown device {spec!r}; known: {', '.join(DEVICES)}") from None


def _mesh_sizes(mesh) -> dict[str, int]:
    """Axis sizes of a Mesh, or of a spec like 'fsdp=4,tensor=2' (unnamed axes are 1)."""
    from jaxlm.sharding import MeshConfig, mesh_sizes

    if hasattr(mesh, "axis_names"):
        return mesh_sizes(mesh)
    sizes = dataclasses.asdict(MeshConfig.parse(mesh if mesh is not None else "fsdp=1"))
    return {a: max(v, 1) for a, v in sizes.items()}


def _shard_factor(axes, shape, sizes) -> int:
    from jaxlm.sharding import logical_to_spec

    spec = logical_to_spec(axes, sizes, shape=shape)
    factor = 1
    for entry in spec:
        for name in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
            factor *= sizes[name]
    return factor


def _split(n: int, parts: int) -> float:
    return n / parts if parts and n % parts == 0 else math.ceil(n / max(parts, 1))


def plan_memory(config, *, mesh=None, batch: int = 1, context: int = 2048, train: str | None = None,
                dtype="bfloat16", param_dtype=None, remat: str = "full", lora_rank: int = 16,
                lora_targets=LORA_TARGETS, kv_cache_dtype=None, chunk: int | None = None,
                device: str | int | None = None, headroom: float = 0.9,
                scan_layers: bool | None = None, context_attention: str = "allgather") -> MemoryPlan:
    """Bytes per device for one run.

    ``train=None`` plans inference of a ``context``-token prompt (KV cache of
    ``context`` tokens, prefill in chunks of ``chunk`` tokens when given);
    ``train="full"|"lora"`` plans a training step on ``batch`` x ``context`` tokens.
    ``scan_layers`` defaults to True for training and False for inference.
    ``context_attention`` is the prefill strategy on a context axis (see
    `jaxlm.nn.context_parallel`): what one layer's attention holds of the K/V.

    Activations are planned in the compute dtype, as GPUs and TPUs run it;
    XLA:CPU computes bfloat16 in float32, so a bfloat16 run on CPU can use up
    to twice the planned activations.
    """
    from flax import nnx

    from jaxlm.models.internlm2 import InternLM2ForCausalLM
    from jaxlm.nn.params import logical_axes
    from jaxlm.nn.attention import DENSE_LIMIT, K_BLOCK, Q_BLOCK
    from jaxlm.sharding import check_mesh_for_model
    from jaxlm.train.step import LOSS_CHUNK

    if train not in (None, "full", "lora"):
        raise ConfigError(f"train: expected 'full' or 'lora', got {train!r}")
    if remat not in ("none", "full", "dots_saveable"):
        raise ConfigError(f"remat: expected none, full or dots_saveable, got {remat!r}")
    sizes = _mesh_sizes(mesh)
    tensor, context_par = sizes.get("tensor", 1), sizes.get("context", 1)
    batch_par = sizes.get("data", 1) * sizes.get("fsdp", 1)

    class _Sizes:  # check_mesh_for_model only needs axis names and sizes
        axis_names = tuple(sizes)
        axis_sizes = tuple(sizes.values())

    check_mesh_for_model(_Sizes, config)
    compute = jnp.dtype(dtype)
    a = compute.itemsize
    if param_dtype is None:
        param_dtype = "float32" if train == "full" else dtype
    p_bytes = jnp.dtype(param_dtype).itemsize
    notes: list[str] = []

    model = nnx.eval_shape(lambda: InternLM2ForCausalLM(config, dtype=compute, param_dtype=param_dtype,
                                                        rngs=nnx.Rngs(0)))
    param_elems = 0.0        # per device
    largest_layer_gathered = 0.0
    layer_elems: dict[str, float] = {}
    lora_elems = 0.0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        factor = _shard_factor(logical_axes(var), value.shape, sizes)
        param_elems += value.size / factor
        names = [str(p) for p in path]
        if "layers" in names:
            layer = names[names.index("layers") + 1]
            # weights are all-gathered over fsdp when used: one layer at a time
            fsdp_factor = factor / max(1, _shard_factor(logical_axes(var), value.shape,
                                                        {**sizes, "fsdp": 1}))
            layer_elems[layer] = layer_elems.get(layer, 0.0) + value.size / factor * fsdp_factor
            if train == "lora" and names[-2] in lora_targets and names[-1] == "kernel":
                out_size = math.prod(value.shape[:-2 if names[-2] == "wo" else -1])
                in_size = value.size // out_size
                lora_elems += lora_rank * (in_size + out_size)
    if layer_elems:
        largest_layer_gathered = max(layer_elems.values())
    params = int(param_elems * p_bytes)
    optimizer = gradients = 0
    if train == "full":
        gradients = int(param_elems * 4)
        optimizer = int(param_elems * 4 * 2)   # AdamW mu, nu in float32
        notes.append("full fine-tuning: float32 master weights, float32 gradients and AdamW moments")
    elif train == "lora":
        lora_local = lora_elems / max(tensor, 1)  # adapters follow their module's sharding on tensor
        params += int(lora_local * 4)
        gradients = int(lora_local * 4)
        optimizer = int(lora_local * 4 * 2)
        notes.append(f"LoRA rank {lora_rank} on {', '.join(lora_targets)}: frozen base in {param_dtype}, "
                     f"{lora_elems / 1e6:.1f}M float32 adapter parameters")

    E, L = config.hidden_size, config.num_hidden_layers
    H, K, D, I, V = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                     config.intermediate_size, config.vocab_size)
    b = _split(batch, batch_par) if batch % batch_par == 0 else math.ceil(batch / batch_par)
    if batch % batch_par:
        notes.append(f"batch {batch} is padded to {math.ceil(batch / batch_par) * batch_par} rows "
                     f"for data x fsdp = {batch_par}")
    t = _split(context, context_par)
    h_loc, k_loc, i_loc, v_loc = H / tensor, max(K / tensor, 1), I / tensor, V / tensor
    qkv = (h_loc + 2 * k_loc) * D
    # fsdp all-gathers a layer's weights to use them: two layers in flight when
    # scanned; unrolled, XLA keeps every layer's gathered copy alive
    if scan_layers is None:
        scan_layers = train is not None
    in_flight = 2 if scan_layers else L
    gathered = in_flight * largest_layer_gathered * p_bytes if sizes.get("fsdp", 1) > 1 else 0

    if train is not None:
        # Coefficients fitted to XLA's buffer assignment of the jaxlm train step
        # (scanned layers, chunked loss) on simulated meshes; see tests/test_plan.py.
        saved_per_token = {  # values kept for the backward pass, per token and layer
            "full": E,
            "dots_saveable": E + qkv + i_loc,
            "none": 2 * h_loc * context + 2 * E + qkv + h_loc * D + 4 * i_loc,
        }[remat]
        saved = L * b * t * saved_per_token * a
        layer_live = b * t * (2 * E + qkv + h_loc * D + 2 * i_loc) * a   # one layer's backward
        if t * context <= DENSE_LIMIT:                                  # float32 scores + probs
            scores = b * h_loc * t * context * 4 * 1.4
        else:  # blockwise: a query block's score row is rebuilt for its backward pass
            scores = b * h_loc * Q_BLOCK * context * 4 * 2 + b * h_loc * Q_BLOCK * K_BLOCK * 4 * 3
        logits = b * min(t, LOSS_CHUNK) * v_loc * 4 * 1.4               # one loss chunk
        activations = int(saved + layer_live + scores + logits + gathered)
        kv_cache = 0
        if not scan_layers:
            notes.append("unrolled layers under fsdp keep every layer's gathered weights: "
                         "train with scan_layers=True")
    else:
        cache_dtype = jnp.dtype(kv_cache_dtype if kv_cache_dtype is not None else compute)
        k_shards = tensor if K % tensor == 0 else 1
        cache_per_token = 2 * L * K * D * cache_dtype.itemsize / k_shards
        if cache_dtype == jnp.dtype("int8"):
            cache_per_token += 2 * L * K * 4 / k_shards  # float32 scale per token and head
        kv_cache = int(b * _split(context, context_par) * cache_per_token)
        q_tokens = min(chunk or context, context)
        kv_per_token = 2 * k_loc * D * a                      # one layer's K and V, as attention reads them
        explicit = (context_par > 1 and context_attention in ("allgather", "ring") and 2 * q_tokens <= context
                    and q_tokens % context_par == 0)
        if explicit:
            # Chunked prefill on a context axis: the chunk's tokens stay split over
            # the axis; the all-gather brings a whole layer's K/V to every device,
            # the ring two shards of it.
            q_tokens //= context_par
            attention_kv = b * kv_per_token * (context if context_attention == "allgather" else 2 * t)
        else:
            # One-shot prefill, or XLA's partitioner (which gathers the whole
            # chunk): the whole chunk's activations count. Fitted to XLA's
            # buffers (tests/test_plan.py); not re-derived per strategy.
            attention_kv = 0
        # One forward of q_tokens through one layer: q/k/v, the MLP hidden,
        # float32 norm/residual copies; then the attention scores, dense for
        # short sequences, one 512 x 512 tile per step beyond.
        layer_live = b * q_tokens * ((3 * E + 2 * qkv + 3 * i_loc) * a + 2 * E * 4) + attention_kv
        if q_tokens * context <= DENSE_LIMIT:
            scores = b * h_loc * q_tokens * context * 4 * 0.31
        else:
            scores = b * h_loc * Q_BLOCK * K_BLOCK * 4 * 3
        logits = b * v_loc * 4 * 2  # generation needs the last position's logits only
        activations = int(layer_live + scores + logits + gathered)
        notes.append(f"KV cache: {context} tokens in {cache_dtype.name}"
                     + (f", split over context={context_par}" if context_par > 1 else ""))
        if chunk:
            notes.append(f"prefill in chunks of {chunk} tokens")
    plan = MemoryPlan(params, optimizer, gradients, activations, kv_cache, notes,
                      device_memory(device), headroom)
    if plan.fits is False:
        plan.notes.extend(_suggestions(plan, config, sizes, train, kv_cache_dtype, chunk))
    return plan


def _suggestions(plan, config, sizes, train, kv_cache_dtype, chunk) -> list[str]:
    tips = []
    n = math.prod(sizes.values())
    if plan.params + plan.optimizer + plan.gradients > plan.total / 2:
        tips.append(f"try a larger mesh (fsdp x {2 * n // max(sizes.get('tensor', 1), 1)}) "
                    f"or train='lora'" if train == "full" else "try a larger mesh (more fsdp)")
    if plan.kv_cache > plan.total / 4:
        if kv_cache_dtype is None or jnp.dtype(kv_cache_dtype) != jnp.int8:
            tips.append("try the int8 KV cache (kv_cache_dtype='int8' halves it)")
        tips.append("try a context axis (e.g. mesh context=N) to split the KV cache")
    if plan.activations > plan.total / 4:
        tips.append("try a smaller chunk / batch, or remat='full'" if train else
                    "try a smaller prefill chunk (generate(prefill_chunk_size=4096), jaxlm plan --chunk 4096)")
    return tips
