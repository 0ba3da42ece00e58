"""Multi-host runs: one process per host, joined by ``jax.distributed``.

Every host runs the same program. `initialize` takes the coordinator address,
process count and process id from its arguments or the environment
(``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``; the
``JAXLM_`` prefixed names win), and on TPU VMs / SLURM / GKE lets JAX
discover them itself. On CPU it selects gloo collectives, so a two-process
run on one machine (127.0.0.1) works for testing.
"""

from __future__ import annotations

import os

import jax

from jaxlm.errors import ConfigError

_ENV = {
    "coordinator_address": ("JAXLM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("JAXLM_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("JAXLM_PROCESS_ID", "JAX_PROCESS_ID"),
}


def _from_env(name: str):
    for key in _ENV[name]:
        if os.environ.get(key):
            return os.environ[key]
    return None


def _on_tpu_vm() -> bool:
    return os.path.exists("/dev/accel0") or bool(os.environ.get("TPU_WORKER_HOSTNAMES"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None) -> dict:
    """Joins this process to the run; returns ``{"process_id", "num_processes", "devices"}``.

    With nothing given and nothing in the environment: automatic on a TPU VM
    (JAX reads the slice's metadata), a no-op (single process) elsewhere.
    """
    coordinator_address = coordinator_address or _from_env("coordinator_address")
    num_processes = num_processes if num_processes is not None else _from_env("num_processes")
    process_id = process_id if process_id is not None else _from_env("process_id")
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if explicit and (coordinator_address is None or num_processes is None or process_id is None):
        raise ConfigError("distributed: give all of coordinator_address, num_processes and process_id "
                          "(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)")
    if explicit:
        try:
            num_processes, process_id = int(num_processes), int(process_id)
        except ValueError:
            raise ConfigError("distributed: num_processes and process_id must be integers") from None
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"distributed: process_id {process_id} is outside 0..{num_processes - 1}")
    if jax.distributed.is_initialized() if hasattr(jax.distributed, "is_initialized") else False:
        return info()
    if explicit:
        if _cpu_only():
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, local_device_ids=local_device_ids)
    elif _on_tpu_vm():
        jax.distributed.initialize()
    return info()


def _cpu_only() -> bool:
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    try:  # without importing a backend: is any accelerator plugin installed?
        import importlib.util

        return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                                                              "libtpu", "jax_rocm60_plugin"))
    except (ImportError, ValueError):
        return True


def info() -> dict:
    return {"process_id": jax.process_index(), "num_processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


def is_main_process() -> bool:
    return jax.process_index() == 0
