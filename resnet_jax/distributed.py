"""Multi-process start-up through JAX's own distributed runtime (`jax.distributed`)."""

from __future__ import annotations

import os

import jax

from resnet_jax.errors import UserError

# Variables by which a cluster manager announces a multi-process job that JAX can auto-detect.
_CLUSTER_HINTS = (("SLURM_NTASKS", "SLURM_JOB_ID"), ("OMPI_COMM_WORLD_SIZE",),
                  ("JAX_COORDINATOR_ADDRESS",))


def _cluster_detected() -> bool:
    for names in _CLUSTER_HINTS:
        if all(os.environ.get(n) for n in names):
            size = os.environ.get(names[0], "")
            if not size.isdigit() or int(size) > 1:
                return True
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300) -> None:
    """Joins a multi-process job, or does nothing for a single process.

    With explicit arguments they go to `jax.distributed.initialize`; with none, JAX's cluster
    auto-detection (SLURM, Open MPI, ...) is used when the environment announces a multi-process
    job. Must run before anything touches the devices. A coordinator that cannot be reached within
    `timeout` seconds is a UserError, not a hang.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and not _cluster_detected():
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise UserError("multi-host needs all of --coordinator_address, --num_processes and "
                        "--process_id (or none, to auto-detect a cluster)")
    # CPU collectives across processes (harmless for GPU runs, which use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=timeout)
    except Exception as e:  # noqa: BLE001 - every failure here is a set-up problem
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"could not join the multi-host job at {coordinator_address or 'auto'} "
                        f"within {timeout} s: {first}") from None
