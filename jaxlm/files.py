"""Safe output paths: write to a temporary directory beside the target, then rename.

A failed or interrupted command leaves the destination as it was: nothing
new at a fresh path, and an existing output untouched unless the caller
asked to overwrite it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile

from jaxlm.errors import JaxlmError


def check_destination(dst: str, overwrite: bool) -> None:
    if os.path.isfile(dst) or os.path.islink(dst):
        if not overwrite:
            raise JaxlmError(f"{dst}: exists and is a file; pass --overwrite to replace it")
    elif os.path.isdir(dst) and os.listdir(dst) and not overwrite:
        raise JaxlmError(f"{dst}: directory is not empty; pass --overwrite to replace it")


def _processes() -> tuple[int, int]:
    """(process index, process count) of a jax.distributed run; (0, 1) otherwise."""
    jax = sys.modules.get("jax")  # a run that never imported jax is single-process
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def _barrier(name: str) -> None:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def atomic_output_dir(dst: str, overwrite: bool = False):
    """Yields a fresh temporary directory that becomes ``dst`` on success.

    In a multi-process run every process gets the same directory (Orbax
    writes each process's shards into it); process 0 creates and renames it.
    """
    dst = os.path.abspath(dst)
    check_destination(dst, overwrite)
    parent = os.path.dirname(dst)
    index, count = _processes()
    if count > 1:
        tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-shared")
        if index == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a previous run's leftovers
            os.makedirs(tmp)
        _barrier(f"jaxlm-atomic-open:{dst}")
    else:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        yield tmp
    except BaseException:
        if index == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if count > 1:
        _barrier(f"jaxlm-atomic-written:{dst}")
    if index == 0:
        _normal_permissions(tmp)
        check_destination(dst, overwrite)  # nobody created it meanwhile
        if os.path.lexists(dst):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=parent)
            os.rename(dst, os.path.join(old, "content"))
            os.rename(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    if count > 1:
        _barrier(f"jaxlm-atomic-renamed:{dst}")


def is_main_process() -> bool:
    return _processes()[0] == 0


def _normal_permissions(root: str) -> None:
    """mkdtemp makes 0700 directories; give the output the usual umask modes."""
    umask = os.umask(0)
    os.umask(umask)
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o666 & ~umask)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
          "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_size(text: str | int, what: str = "size") -> int:
    """'5GB' -> 5e9 (decimal, as HF), '16GiB' -> 16 * 2**30, '1000' -> 1000."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS:
        raise JaxlmError(f"{what}: cannot parse {text!r} (examples: 5GB, 500MB, 16GiB)")
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise JaxlmError(f"{what}: must be positive, got {text!r}")
    return value


def copy_if_present(src_dir: str, dst_dir: str, names) -> list[str]:
    copied = []
    for name in names:
        src = os.path.join(src_dir, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(dst_dir, name))
            copied.append(name)
    return copied
