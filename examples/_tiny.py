"""The examples' tiny default: the bundled tiny InternLM2 as an HF checkpoint (random weights)."""

import os
import tempfile


def tiny_hf_checkpoint(root: str | None = None) -> str:
    """Writes (once) the bundled tiny InternLM2 with random weights and its tokenizer, in HF layout."""
    from jaxlm.assets import TINY_DIR
    from jaxlm.checkpoint.synthetic import write_hf_checkpoint
    from jaxlm.config import InternLM2Config
    from jaxlm.files import copy_if_present

    path = os.path.join(root or tempfile.gettempdir(), "jaxlm-tiny-hf")
    if not os.path.isfile(os.path.join(path, "config.json")):
        write_hf_checkpoint(path, InternLM2Config.from_pretrained(TINY_DIR), seed=0)
        copy_if_present(TINY_DIR, path, ["tokenizer.model", "tokenizer_config.json"])
    return path
