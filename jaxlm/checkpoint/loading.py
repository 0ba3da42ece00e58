"""Building a model from an HF or jaxlm directory, and saving it back.

No random initialization happens: the model is created abstractly
(`nnx.eval_shape`) and each parameter is filled from the checkpoint as it is
read, cast to ``param_dtype`` and placed with its sharding. Stacked
(scanned) layers are filled layer by layer into a donated buffer, so no
parameter is ever held twice on device.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

from jaxlm.checkpoint import hf_layout, jaxlm_format, quant_layout
from jaxlm.checkpoint.source import resolve_source
from jaxlm.config import InternLM2Config
from jaxlm.errors import CheckpointError
from jaxlm.files import atomic_output_dir, copy_if_present, is_main_process
from jaxlm.nn import quant
from jaxlm.nn.params import logical_axes
from jaxlm.options import ModelOptions
from jaxlm.runtime.config import GenerationDefaults
from jaxlm.sharding import check_mesh_for_model, named_sharding

# Files that travel with the weights (tokenizer, generation defaults, and the
# original remote code so the HF side still loads with trust_remote_code).
SIDECAR_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "configuration_internlm2.py", "modeling_internlm2.py",
                 "tokenization_internlm2.py", "tokenization_internlm2_fast.py")


def _layer_split(name: str) -> tuple[int | None, str]:
    """'model.layers.3.attention.wo.kernel' -> (3, 'model.layers.attention.wo.kernel')."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[2].isdigit():
        return int(parts[2]), ".".join(parts[:2] + parts[3:])
    return None, name


def _variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """Dotted path -> Variable of an (abstract) model state."""
    out = {}
    for path, var in nnx.to_flat_state(state):
        out[".".join(str(p) for p in path)] = var
    return out


def param_sharding(var: nnx.Variable, mesh, shape=None):
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    value = var.get_value()
    return named_sharding(mesh, logical_axes(var), shape if shape is not None else value.shape, value.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(buffer, value, index):
    """``buffer[index] = value`` in place; ``index`` is traced, so one compilation serves
    every layer of a (shape, dtype, sharding)."""
    return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), index, 0)


class _StateFiller:
    """Receives per-layer (canonical) tensors and fills the model's variables.

    Each tensor becomes a ``jax.Array`` with its target sharding directly:
    `put_from` asks a reader for exactly the slices this host's devices hold.
    """

    def __init__(self, model: nnx.Module, mesh):
        self.scanned = model.options.scan_layers
        self.vars = _variables(nnx.state(model, nnx.Param))
        self.mesh = mesh
        self.filled: dict[str, int] = {}

    def target(self, name: str):
        """The (variable key, shape, dtype, sharding) one canonical tensor must take."""
        layer, stacked_name = _layer_split(name)
        key = stacked_name if self.scanned and layer is not None else name
        var = self.vars.get(key)
        if var is None:
            raise CheckpointError(f"parameter {name!r} does not belong to this model")
        abstract = var.get_value()
        if key == name:
            return key, tuple(abstract.shape), abstract.dtype, param_sharding(var, self.mesh)
        full = param_sharding(var, self.mesh)  # the stacked variable's; drop the layers axis
        sharding = full if self.mesh is None else jax.sharding.NamedSharding(
            self.mesh, jax.sharding.PartitionSpec(*full.spec[1:]))
        return key, tuple(abstract.shape[1:]), abstract.dtype, sharding

    def quantized(self, name: str):
        """(mode, in_dims) when the model holds ``name`` quantized, else None."""
        layer, stacked_name = _layer_split(name)
        key = stacked_name if self.scanned and layer is not None else name
        scale = self.vars.get(quant_layout.scale_name(key))
        if scale is None:
            return None
        kernel = self.vars[key].get_value()
        mode = next(m for m, d in quant.STORAGE.items() if d == kernel.dtype)
        return mode, kernel.ndim - scale.get_value().ndim + (mode == "int4")

    def put_from(self, name: str, read_slice) -> None:
        """Builds tensor ``name`` from ``read_slice(index) -> np.ndarray`` (jaxlm layout).

        A tensor the model holds quantized is read whole (a row's scale needs
        all of it), quantized on the host, and placed as int values + scales.
        """
        quantized = self.quantized(name)
        if quantized is None:
            return self._put_sliced(name, read_slice)
        shape = self.target(name)[1]
        q, scale = quant.quantize(read_slice(tuple(slice(0, n) for n in shape)), quantized[1], quantized[0])
        self._put_sliced(name, lambda index: q[index])
        self._put_sliced(quant_layout.scale_name(name), lambda index: scale[index])

    def _put_sliced(self, name: str, read_slice) -> None:
        _, shape, dtype, sharding = self.target(name)
        np_dtype = np.dtype(dtype)
        cache = {}  # replicated shards ask for the same slice once per device

        def read(index):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in cache:
                cache[key] = np.asarray(read_slice(index)).astype(np_dtype, copy=False)
            return cache[key]

        self.put(name, jax.make_array_from_callback(shape, sharding, read))

    def put(self, name: str, array: jax.Array) -> None:
        key, shape, dtype, sharding = self.target(name)
        if tuple(array.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {shape}")
        var = self.vars[key]
        if key == name:
            var.set_value(jax.device_put(array.astype(dtype), sharding))
        else:
            layer, _ = _layer_split(name)
            if key not in self.filled:
                full = var.get_value()
                var.set_value(jnp.zeros(full.shape, full.dtype, device=param_sharding(var, self.mesh)))
            var.set_value(_set_layer(var.get_value(), jax.device_put(array, sharding), np.int32(layer)))
        self.filled[key] = self.filled.get(key, 0) + 1

    def check_complete(self, source: str) -> None:
        for key, var in self.vars.items():
            if not isinstance(var.get_value(), jax.Array):
                raise CheckpointError(f"{source}: no value for parameter {key!r}")


def load_pretrained(cls, path: str, options: ModelOptions | None = None, *, mesh=None, revision=None):
    """`InternLM2ForCausalLM.from_pretrained`: HF, Origin or jaxlm directory, or a hub id (`resolve_source`)."""
    source = resolve_source(path, revision)
    path = source.path
    stored_quant = {}
    if source.kind == "jaxlm":
        config = InternLM2Config.from_pretrained(path)
        marker = jaxlm_format.read_marker(path)
        stored_dtype = marker["param_dtype"]
        if marker.get("quantize") is not None:
            stored_quant = {"quantize": marker["quantize"], "quantize_output": bool(marker.get("quantize_output"))}
        reader = None
    else:
        reader = source.weights()
        config = reader.config
        reader.validate()
        stored_dtype = reader.checkpoint_dtype()
    options = _with_stored_quantization(ModelOptions.build(options), stored_quant, path).resolve(stored_dtype)
    model = nnx.eval_shape(lambda: cls(config, options, rngs=nnx.Rngs(0)))
    if mesh is not None:
        check_mesh_for_model(mesh, config)
    filler = _StateFiller(model, mesh)
    if reader is not None:
        entries = reader.validate()
        for entry in tqdm(entries, desc=f"loading {os.path.basename(os.path.normpath(path))}",
                          unit="tensor", disable=reader.total_bytes() <= (1 << 30)):
            filler.put_from(entry.jaxlm_name, functools.partial(reader.read_jaxlm, entry))
    else:
        _fill_from_jaxlm(path, config, filler, stored_quant)
    filler.check_complete(path)
    model.generation_config = GenerationDefaults.load(path, config)
    return model


def _with_stored_quantization(options: ModelOptions, stored: dict, path: str) -> ModelOptions:
    """A quantized checkpoint loads quantized; asking for another mode is an error, not a re-quantization."""
    if not stored:
        return options
    for name, value in stored.items():
        if getattr(options, name) not in (value, None, False):
            raise CheckpointError(f"{path}: the checkpoint is quantized with {name}={value!r}; "
                                  f"{name}={getattr(options, name)!r} was asked for (load the float checkpoint "
                                  f"to quantize it differently)")
    return dataclasses.replace(options, **stored)


def _fill_from_jaxlm(path: str, config: InternLM2Config, filler: _StateFiller, stored_quant: dict) -> None:
    stored = jaxlm_format.stored_arrays(path)
    expected = quant_layout.expected(config, stored_quant.get("quantize"), stored_quant.get("quantize_output", False))
    for name, (want, dtype) in expected.items():
        if name not in stored:
            raise CheckpointError(f"{path}: missing parameter {name!r}")
        if dtype is not None and stored[name][1].name != dtype:
            raise CheckpointError(f"{path}: parameter {name!r} is stored as {stored[name][1]}, expected {dtype}")
        if stored[name][0] != want:
            raise CheckpointError(f"{path}: parameter {name!r} has shape {stored[name][0]}, "
                                  f"but the config implies {want}")
    unexpected = sorted(set(stored) - set(expected))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected parameter {unexpected[0]!r} for this config")
    # One Orbax restore per layer group keeps host/device staging small.
    groups: dict[str, list[str]] = {}
    for name in expected:
        layer, _ = _layer_split(name)
        groups.setdefault("top" if layer is None else str(layer), []).append(name)
    for names in groups.values():
        targets, on_host = {}, []
        for name in names:
            _, shape, dtype, sharding = filler.target(name)
            if filler.quantized(name) and not stored_quant:   # a float kernel, quantized as it is read
                targets[name] = np.empty(*stored[name])
                on_host.append(name)
            else:
                targets[name] = jax.ShapeDtypeStruct(shape, stored[name][1], sharding=sharding)
        for name, array in jaxlm_format.load_arrays(path, targets, stored=stored).items():
            if name in on_host:
                filler.put_from(name, lambda index, a=array: a[index])
            else:
                filler.put(name, array)


def iter_canonical(model) -> "Iterator[tuple[str, jax.Array]]":
    """Yields the model's parameters under per-layer jaxlm names, one at a time.

    Arrays keep their sharding: Orbax then writes each process's own shards.
    """
    vars_ = _variables(nnx.state(model, nnx.Param))
    scanned = model.options.scan_layers
    for name in quant_layout.expected(model.config, model.options.quantize, model.options.quantize_output):
        layer, stacked_name = _layer_split(name)
        if scanned and layer is not None:
            value = vars_[stacked_name].get_value()[layer]
        else:
            value = vars_[name].get_value()
        yield name, value


def save_pretrained(model, dst: str, *, overwrite: bool = False, source_dir: str | None = None) -> str:
    """Writes a jaxlm checkpoint directory (streaming, one layer at a time)."""
    with atomic_output_dir(dst, overwrite) as tmp:
        dtype = jnp.dtype(model.options.param_dtype).name
        jaxlm_format.save_params(tmp, iter_canonical(model), param_dtype=dtype, quantize=model.options.quantize,
                                 quantize_output=model.options.quantize_output)
        if is_main_process():
            config = model.config.replace(extra={**model.config.extra, "torch_dtype": dtype})
            config.to_json_file(os.path.join(tmp, "config.json"))
            if source_dir is not None:
                copy_if_present(source_dir, tmp, SIDECAR_FILES)
    return dst
