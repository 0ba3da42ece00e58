"""Collectives per decoder layer that XLA compiles for each mesh layout.

    python benchmarks/collectives.py        (simulates 8 CPU devices)

For pure FSDP (fsdp=8), pure tensor parallelism (tensor=8) and 2x2x2, it
compiles the sharded forward and the training step of a 2-layer and a
3-layer model and reports the difference: the collectives one more decoder
layer adds (all-gather, reduce-scatter, all-reduce, ...), with their bytes
per device, next to what the rules table implies.
"""

import os
import re
import sys
from collections import Counter

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from jaxlm import InternLM2Config, InternLM2ForCausalLM  # noqa: E402
from jaxlm.checkpoint.loading import param_sharding  # noqa: E402
from jaxlm.sharding import make_mesh, named_sharding  # noqa: E402
from jaxlm.train.step import OptimizerConfig, make_optimizer, train_step  # noqa: E402

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
OP = re.compile(r"=\s+(\(?[a-z0-9]+\[[^\]]*\][^=]*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1}
BATCH, SEQ = 8, 512


def config(layers):
    return InternLM2Config(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)


def collectives(hlo: str):
    counts, nbytes = Counter(), Counter()
    for match in OP.finditer(hlo):
        kind = match.group(2)
        # XLA's combiners merge several collectives into one op over a tuple:
        # count each array of the tuple as one collective.
        for dtype, dims in SHAPE.findall(match.group(1)):
            counts[kind] += 1
            nbytes[kind] += BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return counts, nbytes


def compile_both(mesh_spec, layers):
    mesh = make_mesh(mesh_spec)
    model = nnx.eval_shape(lambda: InternLM2ForCausalLM(config(layers), rngs=nnx.Rngs(0)))
    place = lambda v: jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=param_sharding(v, mesh))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(place, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    rows = named_sharding(mesh, ("act_batch", None))
    ids = jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32, sharding=rows)

    def forward(params, ids):
        return nnx.merge(graphdef, params, rest).forward(ids)

    opt = make_optimizer(OptimizerConfig())
    opt_state = optax.tree_map_params(
        opt, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
        jax.eval_shape(opt.init, params), params,
        transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=named_sharding(mesh, (None,) * s.ndim)))
    batch = {"input_ids": ids, "targets": ids,
             "loss_weights": jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32, sharding=rows)}
    with jax.set_mesh(mesh):
        fwd = jax.jit(forward).lower(params, ids).compile().as_text()
        step = train_step.lower(graphdef, params, rest, opt_state, batch, optimizer=opt).compile().as_text()
    return collectives(fwd), collectives(step)


EXPECTED = {
    "fsdp=8": "forward: all-gather of the 5 weight matrices (wqkv, wo, w1, w3, w2); train: + their "
              "reduce-scattered gradients (and re-gathers for the backward)",
    "tensor=8": "forward: 2 all-reduces of [B, T, E] activations (after wo and after w2, Megatron); "
                "train: + 2 more in the backward",
    "data=2,fsdp=2,tensor=2": "forward: 5 weight all-gathers over fsdp + 2 activation all-reduces over tensor; "
                              "train: + gradient reduce-scatters over fsdp and all-reduces over data",
}


def main():
    print(f"collectives added by one decoder layer (hidden 1024, 16 heads, 8 kv heads, mlp 2816), "
          f"batch {BATCH} x {SEQ} tokens, float32, jax {jax.__version__}\n")
    for mesh_spec, expectation in EXPECTED.items():
        # layers 2 -> 3: with one layer, XLA lays the program out differently
        (f1, t1), (f2, t2) = compile_both(mesh_spec, 2), compile_both(mesh_spec, 3)
        print(f"mesh {mesh_spec}")
        for name, (c1, b1), (c2, b2) in (("forward", f1, f2), ("train step", t1, t2)):
            parts = []
            for kind in KINDS:
                n, nb = c2[kind] - c1[kind], b2[kind] - b1[kind]
                if n:
                    parts.append(f"{n} {kind} ({nb / 2**20:.1f} MiB)")
            print(f"  {name:<11} " + (", ".join(parts) if parts else "none"))
        print(f"  expected:   {expectation}\n")


if __name__ == "__main__":
    main()
