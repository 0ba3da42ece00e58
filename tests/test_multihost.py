"""Two processes on 127.0.0.1 joined by jax.distributed (gloo): a sharded forward,
an Orbax save by both processes and a restore onto another mesh agree with one process."""

import json
import os
import socket
import subprocess
import sys

from conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes(golden, tmp_path):
    port = str(free_port())
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    worker = str(REPO / "tests" / "multihost_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, port, str(i), str(golden("tiny_gqa")), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    results = [json.loads((tmp_path / f"result{i}.json").read_text()) for i in range(2)]
    for r in results:
        assert r["err_hf"] <= 1e-4 and r["err_ckpt"] <= 1e-4
        # each process holds half of the kv groups and half of embed: never the whole tensor
        assert r["local_shard_shapes"] == [[1, 6, 16, 64], [1, 6, 16, 64]] and r["global_shape"] == [2, 6, 16, 128]
    assert (tmp_path / "ckpt" / "jaxlm_checkpoint.json").exists()
