"""Run by test_distributed.py as one process of a multi-process job: joins it through
`resnet_jax.distributed.initialize` with no arguments (JAX's cluster auto-detection, here from a
simulated SLURM environment), restores the latest checkpoint of WORKDIR collectively onto a mesh
over every device of every process, and saves the params and batch_stats this process sees to
OUT_DIR/restored_<process index>.npz.

    python tests/distributed_worker.py WORKDIR OUT_DIR
"""

import sys
from pathlib import Path

import numpy as np


def flat_variables(state) -> dict[str, np.ndarray]:
    """params and batch_stats of a TrainState as {path: numpy array} (host copies)."""
    import jax

    tree = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def main(workdir: str, out_dir: str) -> None:
    from resnet_jax import distributed

    distributed.initialize(timeout=60)
    import jax

    from resnet_jax.train import make_mesh, restore_state

    values = getattr(jax.config, "values", {})
    print(f"process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} devices, "
          f"cuda_visible_devices={values.get('jax_cuda_visible_devices')}", flush=True)
    _, state, _, step = restore_state(workdir, mesh=make_mesh())
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    np.savez(Path(out_dir) / f"restored_{jax.process_index()}.npz", step=step,
             **flat_variables(state))
    print(f"restored step {step}", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
