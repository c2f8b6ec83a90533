"""Multi-process start-up through JAX's own distributed runtime (`jax.distributed`).

`jax.distributed.initialize` does not raise when the coordinator cannot be reached or a process
never joins: after `initialization_timeout` it aborts the whole process from C++ (SIGABRT, a
stack trace, exit status 134). So the wait is bounded here by a watchdog thread instead (the
connection is made with the GIL released): at `timeout` seconds it prints one line saying what
was found at the coordinator's address and exits with status 2. JAX's own limit is set a little
later, as a backstop.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading

import jax

from resnet_jax.errors import UserError

try:  # Where JAX keeps the coordinator address it auto-detected (only for error messages).
    from jax._src import distributed as _jax_distributed
except ImportError:  # pragma: no cover
    _jax_distributed = None

EXIT_USER_ERROR = 2  # = cli.EXIT_USER_ERROR (not imported: the watchdog must not import late)
_BACKSTOP_S = 15  # JAX's own initialization_timeout is ours plus this.


def _slurm_job() -> bool:
    """A SLURM job step with several tasks, as JAX's SlurmCluster detects it."""
    names = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
             "SLURM_LOCALID")
    if not all(n in os.environ for n in names):
        return False
    ntasks = os.environ["SLURM_NTASKS"]
    return not ntasks.isdigit() or int(ntasks) > 1


def _cluster_detected() -> bool:
    """Whether the environment announces a multi-process job that JAX can auto-detect."""
    if _slurm_job():
        return True
    size = os.environ.get("OMPI_COMM_WORLD_SIZE", "")
    orte = os.environ.get("OMPI_MCA_orte_hnp_uri")  # noqa: SIM112 - Open MPI's own spelling
    if orte and (not size.isdigit() or int(size) > 1):
        return True
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def slurm_tasks_on_this_node(environ: dict | None = None) -> int | None:
    """How many tasks of the SLURM step run on this node, from SLURM_STEP_TASKS_PER_NODE
    (`2(x3),1`: 2 tasks on each of 3 nodes, then 1) and SLURM_NODEID; None if unknown."""
    env = os.environ if environ is None else environ
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    node = env.get("SLURM_NODEID", "")
    if not spec or not node.isdigit():
        return None
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[int(node)] if int(node) < len(counts) else None


def _probe(address: str) -> str:
    """What a TCP connection to the coordinator's host:port finds, as half a sentence."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except (OSError, ValueError) as e:
        return (f"nothing accepts connections at {address} ({e.strerror or e}): is process 0 "
                "running, and is that address reachable from this host?")
    return (f"the coordinator at {address} is up but not every process joined: are all of them "
            "started, with the same --coordinator_address and --num_processes?")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout: int = 300, *,
               prog: str | None = None) -> None:
    """Joins a multi-process job, or does nothing for a single process.

    With explicit arguments they go to `jax.distributed.initialize`; with none, JAX's cluster
    auto-detection (SLURM, Open MPI, `JAX_COORDINATOR_ADDRESS`, ...) is used when the environment
    announces a multi-process job. Must run before anything touches the devices.

    A set-up mistake JAX reports is a UserError. A coordinator that cannot be reached, or
    processes that do not all join, within `timeout` seconds end this process with one line on
    stderr (`prog: error: ...`) and exit status 2, from a watchdog thread: JAX itself would abort
    with a C++ stack trace, which cannot be caught.
    """
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not explicit and not _cluster_detected():
        return
    if explicit and None in (coordinator_address, num_processes, process_id):
        raise UserError("multi-host needs all of --coordinator_address, --num_processes and "
                        "--process_id (or none, to auto-detect a cluster)")
    if explicit and not re.fullmatch(r"\S+:\d+", coordinator_address):
        raise UserError(f"--coordinator_address must be host:port (process 0's host and a free "
                        f"port), got {coordinator_address!r}")
    if explicit and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    # CPU collectives across processes (harmless for GPU runs, which use NCCL).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    prog = prog or os.path.basename(sys.argv[0]) or "resnet_jax"
    where = (coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
             or "the auto-detected coordinator")
    joined = threading.Event()

    def give_up() -> None:
        if joined.is_set():
            return
        address = coordinator_address or getattr(
            getattr(_jax_distributed, "global_state", None), "coordinator_address", None)
        who = f"process {process_id} of {num_processes}" if explicit else "this process"
        why = _probe(address) if address else "no coordinator address was found"
        sys.stdout.flush()
        sys.stderr.write(f"{prog}: error: {who} could not join the multi-host job within "
                         f"--init_timeout {timeout} s: {why}\n")
        sys.stderr.flush()
        os._exit(EXIT_USER_ERROR)

    # JAX's SLURM auto-detection makes only GPU number SLURM_LOCALID visible, i.e. assumes one
    # process per GPU; with one task per node, every local GPU belongs to this process.
    keep_all_gpus = (not explicit and _slurm_job() and "JAX_LOCAL_DEVICE_IDS" not in os.environ
                     and slurm_tasks_on_this_node() == 1)
    values = getattr(jax.config, "values", {})
    visible = {name: values[name] for name in ("jax_cuda_visible_devices",
                                               "jax_rocm_visible_devices") if name in values}
    watchdog = threading.Timer(timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        # Explicit flags switch the auto-detection off: under SLURM it would otherwise still
        # restrict this process to the GPU numbered SLURM_LOCALID.
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   cluster_detection_method="deactivate" if explicit else None,
                                   initialization_timeout=timeout + _BACKSTOP_S)
        joined.set()
    except Exception as e:  # noqa: BLE001 - every failure here is a set-up problem
        joined.set()
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UserError(f"could not join the multi-host job at {where}: {first}") from None
    finally:
        watchdog.cancel()
    if keep_all_gpus:
        for name, value in visible.items():
            jax.config.update(name, value)
