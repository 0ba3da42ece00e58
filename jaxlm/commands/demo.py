"""``jaxlm demo``: the main job on the bundled tiny default model.

Creates the tiny InternLM2 as an HF checkpoint (random weights), converts it
to a jaxlm checkpoint and back, checks the round trip is bit-exact and that
both load to the same logits, and reports timings.
"""

import os
import tempfile
import time


def build_parser(parser):
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --workdir")
    return parser


def run(args) -> int:
    from jaxlm.cli_util import quiet_runtime_logs, user_errors

    quiet_runtime_logs()
    with user_errors():
        workdir = args.workdir or tempfile.mkdtemp(prefix="jaxlm-demo-")
        return _demo(workdir, args.overwrite)


def _demo(workdir: str, overwrite: bool) -> int:
    import numpy as np

    from jaxlm import InternLM2Config, InternLM2ForCausalLM
    from jaxlm.assets import TINY_DIR
    from jaxlm.checkpoint.convert import hf_to_jaxlm, jaxlm_to_hf
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint
    from jaxlm.files import atomic_output_dir

    config = InternLM2Config.from_pretrained(TINY_DIR)
    hf_dir, jx_dir, back_dir = (os.path.join(workdir, n) for n in ("hf", "jaxlm", "hf_roundtrip"))
    t0 = time.perf_counter()
    with atomic_output_dir(hf_dir, overwrite) as tmp:
        write_hf_checkpoint(tmp, config, seed=0)
    print(f"[1/4] tiny InternLM2 ({config.num_params() / 1e6:.2f}M params) written in HF layout: {hf_dir}")
    hf_to_jaxlm(hf_dir, jx_dir, overwrite=overwrite)
    print(f"[2/4] converted to a jaxlm checkpoint: {jx_dir}")
    jaxlm_to_hf(jx_dir, back_dir, overwrite=overwrite)
    same = _same_tensors(hf_dir, back_dir)
    print(f"[3/4] converted back to HF: {back_dir} (bit-exact: {same})")
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 32))
    a = np.asarray(InternLM2ForCausalLM.from_pretrained(hf_dir)(ids))
    b = np.asarray(InternLM2ForCausalLM.from_pretrained(jx_dir, scan_layers=True)(ids))
    diff = float(np.abs(a - b).max())
    print(f"[4/4] logits from the HF dir (unrolled) and the jaxlm dir (scanned) differ by {diff:.2e}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    return 0 if same and diff < 1e-5 else 1


def _same_tensors(a: str, b: str) -> bool:
    from jaxlm.checkpoint.hf_reader import HFCheckpoint

    ra, rb = HFCheckpoint(a), HFCheckpoint(b)
    return sorted(ra.names()) == sorted(rb.names()) and all(
        ra.read(n).tobytes() == rb.read(n).tobytes() for n in ra.names())
