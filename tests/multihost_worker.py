"""One process of the two-process test (run by tests/test_multihost.py).

    python tests/multihost_worker.py PORT PROCESS_ID GOLDEN_DIR WORKDIR
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

port, pid, golden, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

import jaxlm.distributed as dist  # noqa: E402

info = dist.initialize(f"127.0.0.1:{port}", 2, pid)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from jaxlm import InternLM2ForCausalLM  # noqa: E402
from jaxlm.sharding import make_mesh  # noqa: E402

assert jax.device_count() == 4 and jax.local_device_count() == 2, info
ref = np.load(os.path.join(golden, "golden.npz"))
mesh = make_mesh("fsdp=2,tensor=2")


def logits(model):
    out = model(ref["input_ids"], ref["attention_mask"], ref["position_ids"])
    return np.asarray(multihost_utils.process_allgather(out, tiled=True))


model = InternLM2ForCausalLM.from_pretrained(golden, mesh=mesh)  # each host reads its slices
kernel = model.model.layers[0].attention.wqkv.kernel[...]
local = [s.data.shape for s in kernel.addressable_shards]
from_hf = logits(model)
ckpt = os.path.join(workdir, "ckpt")
model.save_pretrained(ckpt, overwrite=True)                       # Orbax, both processes write
restored = InternLM2ForCausalLM.from_pretrained(ckpt, mesh=make_mesh("data=2,fsdp=2"))
from_ckpt = logits(restored)
valid = ref["attention_mask"].astype(bool)
result = {
    "process": pid,
    "err_hf": float(np.abs(from_hf - ref["logits"])[valid].max()),
    "err_ckpt": float(np.abs(from_ckpt - ref["logits"])[valid].max()),
    "local_shard_shapes": [list(s) for s in local],
    "global_shape": list(kernel.shape),
}
with open(os.path.join(workdir, f"result{pid}.json"), "w") as f:
    json.dump(result, f)
multihost_utils.sync_global_devices("done")
