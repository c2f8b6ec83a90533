"""Run by test_train.py in a fresh process with 8 fake CPU devices: trains two steps of a tiny
model (with augmentation) on a 1-device mesh and on an 8-device mesh and compares params and
batch_stats."""

import sys

import jax

precision = sys.argv[1]
if precision == "float64":
    jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from resnet_jax import create_model  # noqa: E402
from resnet_jax import data as data_lib  # noqa: E402
from resnet_jax.train import (  # noqa: E402
    DeviceData,
    create_train_state,
    empty_accum,
    make_mesh,
    make_train_loop,
    replicate,
)

dtype = jnp.float64 if precision == "float64" else jnp.float32
rng = np.random.default_rng(0)
host = DeviceData(
    train_images=rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8),
    train_labels=rng.integers(0, 10, 64).astype(np.int32),
    test_images=rng.integers(0, 256, (8, 12, 12, 1), dtype=np.uint8),
    test_labels=rng.integers(0, 10, 8).astype(np.int32))
model = create_model("resnet18", num_classes=10, width=4, stem="small", dtype=dtype,
                     param_dtype=dtype)


def run(devices):
    mesh = make_mesh(devices)
    state = create_train_state(model, optax.sgd(0.02, momentum=0.9), jax.random.key(0),
                               (1, 16, 16, 1))
    # flax creates running BN statistics in float32 whatever the dtype; the float64 check needs
    # them in float64 too.
    state = state.replace(batch_stats=jax.tree.map(lambda x: x.astype(dtype), state.batch_stats))
    state = state.replace(**replicate(state.arrays(), mesh))
    # With every per-example random draw on: they must not depend on how the batch is split.
    loop = make_train_loop(mesh, batch_size=32, image_size=16, seed=0, augment=True,
                           random_erasing=0.5, label_smoothing=0.1, dtype=dtype)
    perm = data_lib.epoch_permutation(0, 0, 64)
    state, _, _ = loop(state, replicate(empty_accum(), mesh), replicate(host, mesh), perm,
                       np.int32(0), np.int32(2))
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


devices = jax.devices()
print(f"devices={len(devices)}")
one, eight = run(devices[:1]), run(devices)
# Normalised per leaf: a leaf's worst difference over its largest entry (biases and BN means
# that start at 0 have no meaningful elementwise relative error).
tol = 1e-10 if precision == "float64" else 1e-4
worst = max(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(a))), 1e-3))
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(eight), strict=True))
print(f"worst normalised difference {worst:.3g} (tolerance {tol:g})")
# The status decides (NaN fails too): a word in the output could be found inside another.
sys.exit(0 if worst <= tol else 1)
