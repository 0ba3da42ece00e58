"""Writing a quantized jaxlm checkpoint from an HF or float jaxlm one, streaming.

Each tensor is read, quantized on the host when it is a decoder matrix
(`jaxlm.checkpoint.quant_layout`), and added to the current layer group of
an Orbax partial save; the full-precision model is never held. The same
numpy quantizer runs when `from_pretrained(..., quantize=...)` quantizes on
the fly, so both give the same int values, scales and logits.
"""

from __future__ import annotations

import os

from jaxlm.checkpoint import hf_layout, jaxlm_format, quant_layout
from jaxlm.checkpoint.convert import iter_hf_tensors
from jaxlm.checkpoint.loading import SIDECAR_FILES
from jaxlm.errors import CheckpointError, JaxlmError
from jaxlm.files import atomic_output_dir, check_destination, copy_if_present
from jaxlm.options import QUANTIZE_MODES

BITS = {"8": "int8", "4": "int4"}


def mode_of_bits(bits) -> str:
    """``--bits`` (8 or 4) as a mode name; anything else is refused with one clear line."""
    mode = BITS.get(str(bits).strip())
    if mode is None:
        raise JaxlmError(f"--bits: expected 8 or 4, got {bits!r}")
    return mode


def quantize_checkpoint(src: str, dst: str, *, mode: str, overwrite: bool = False,
                        quantize_output: bool = False, progress: bool | None = None) -> dict:
    """Writes ``src`` (HF or float jaxlm directory) quantized (``mode``: int8 / int4) to ``dst``."""
    from tqdm import tqdm  # plain text bars (tqdm.auto wants ipywidgets in notebooks)

    if mode not in QUANTIZE_MODES:
        raise JaxlmError(f"quantize: expected one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    check_destination(dst, overwrite)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: not a directory")
    if jaxlm_format.is_jaxlm_checkpoint(src) and jaxlm_format.read_marker(src).get("quantize"):
        raise CheckpointError(f"{src}: already quantized ({jaxlm_format.read_marker(src)['quantize']}); "
                              f"quantize the float checkpoint it came from")
    config, dtype, total, count, stream = iter_hf_tensors(src)   # validates everything before writing
    by_hf = hf_layout.by_hf_name(config)
    if progress is None:
        progress = total > (1 << 30)
    named = ((by_hf[name].jaxlm_name, by_hf[name].rule.to_jaxlm(array, config))
             for name, array in tqdm(stream, total=count, disable=not progress, desc="quantizing", unit="tensor"))
    with atomic_output_dir(dst, overwrite) as tmp:
        nbytes = jaxlm_format.save_params(tmp, quant_layout.quantize_stream(config, named, mode, quantize_output),
                                          param_dtype=dtype, quantize=mode, quantize_output=quantize_output)
        config.replace(extra={**config.extra, "torch_dtype": dtype}).to_json_file(os.path.join(tmp, "config.json"))
        copied = copy_if_present(src, tmp, SIDECAR_FILES)
    return {"dst": dst, "bytes": nbytes, "dtype": dtype, "mode": mode, "copied": copied}
