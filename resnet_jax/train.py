"""Training: `TrainState`, the pure `train_step`/`eval_step`, their sharded jitted loops, and
`train_and_evaluate`, which runs a whole resumable experiment from a `Config`.

Data parallelism is expressed with a `jax.sharding.Mesh` with one axis, `data`, over every device
of every process: the state and the (small, uint8) dataset are replicated, each batch is sharded
over `data`, and XLA inserts the gradient all-reduce. `nn.BatchNorm` needs no `axis_name`: under
jit its batch statistics are computed over the global, sharded batch, i.e. synchronised.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import conv as conv_lib
from resnet_jax import data as data_lib
from resnet_jax import finetune, models
from resnet_jax.checkpoint import Checkpointer, Restored
from resnet_jax.cli import check_writable
from resnet_jax.config import Config, from_saved, identity, identity_diff, validate
from resnet_jax.errors import DivergedError, UserError
from resnet_jax.metrics import MetricsWriter, Progress, atomic_write, format_record
from resnet_jax.optimizer import create_optimizer, learning_rate_schedule

# Random streams, all derived from the seed alone (never from wall time or process history), so
# that a resumed run draws exactly what an uninterrupted one would. The data order uses
# fold_in(key(seed), epoch) (see data.epoch_permutation); these tags are far above any epoch.
_INIT_STREAM = 2**31 + 1
_AUGMENT_STREAM = 2**31 + 2


class TrainState(struct.PyTreeNode):
    """Everything a train step reads and writes; `apply_fn` and `tx` are static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    apply_fn: Callable = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @property
    def variables(self) -> dict:
        return {"params": self.params, "batch_stats": self.batch_stats}

    def arrays(self) -> dict:
        """The state as a plain dict of arrays (what checkpoints hold)."""
        return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
                "opt_state": self.opt_state}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       rng: jax.Array | int, input_shape: tuple[int, ...]) -> TrainState:
    """Initialises the model on a dummy NHWC batch of `input_shape` and the optimizer state.

    `rng` is a PRNG key or an int seed."""
    if isinstance(rng, int | np.integer):
        rng = jax.random.key(rng)
    # Compiled as one program: run eagerly, init compiles every layer's ops one by one (a
    # ResNet-18 at 96x96 took 14.0 s that way against 5.9 s jitted, on this project's 2-core
    # CPU). Inside a jit (the trainer) it is inlined.
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(rng, jnp.zeros(input_shape, jnp.float32))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                      apply_fn=model.apply, tx=tx)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array,
                       label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, in float32 whatever the compute dtype.

    `labels` are int class indices in [0, num_classes): under jit they cannot be checked, and
    one out of range has an all-zero target (a loss of 0 without label smoothing).
    `label_smoothing` may be traced (e.g. an argument of a jitted `train_step`).
    """
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if not (isinstance(label_smoothing, int | float) and label_smoothing == 0):
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(
        logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), targets)


def train_step(state: TrainState, batch: dict, *, label_smoothing: float = 0.0
               ) -> tuple[TrainState, dict]:
    """One optimizer step (`state.tx`) on `batch`; returns batch-mean `loss` and `accuracy`.

    `batch` is {"image": float NHWC in [0, 1], "label": int class indices}; see
    `cross_entropy_loss` for the labels' range."""

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         batch["image"], train=True, mutable=["batch_stats"])
        loss = cross_entropy_loss(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1,
                              params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new_state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, batch: dict) -> dict:
    """Sums over `batch` with running BN statistics; `batch["mask"]` (optional) drops padding.

    Returns `loss_sum`, `correct`, `count` and the `confusion` matrix [true, predicted], so that
    sums over batches give exact totals however the test set was padded.
    """
    logits = state.apply_fn(state.variables, batch["image"], train=False)
    labels = batch["label"]
    mask = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
    predicted = jnp.argmax(logits, -1)
    num_classes = logits.shape[-1]
    confusion = jnp.zeros((num_classes, num_classes), jnp.float32).at[labels, predicted].add(mask)
    return {"loss_sum": jnp.sum(cross_entropy_loss(logits, labels) * mask),
            "correct": jnp.sum((predicted == labels) * mask), "count": jnp.sum(mask),
            "confusion": confusion}


# --------------------------------------------------------------------------------------------
# Sharded loops: the dataset lives on the devices; batches are gathered and resized inside jit.


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh, axis `data`, over `devices` (default: every device of every process)."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))


@struct.dataclass
class DeviceData:
    """The whole dataset as uint8 images and int32 labels, replicated on every device."""

    train_images: jax.Array
    train_labels: jax.Array
    test_images: jax.Array
    test_labels: jax.Array


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host (numpy) arrays → global arrays replicated over `mesh` (works across processes)."""
    sharding = NamedSharding(mesh, P())

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def _host_data(dataset: data_lib.Dataset) -> DeviceData:
    return DeviceData(dataset.train_images, dataset.train_labels.astype(np.int32),
                      dataset.test_images, dataset.test_labels.astype(np.int32))


def put_dataset(dataset: data_lib.Dataset, mesh: Mesh) -> DeviceData:
    """The dataset's arrays as a DeviceData replicated over `mesh` (the loops gather from it)."""
    return replicate(_host_data(dataset), mesh)


def empty_accum() -> dict:
    """Running sums over the current epoch (checkpointed, so a mid-epoch resume is exact).

    Host (numpy) arrays: making them waits for nothing. Device zeros would be computed behind
    the work already queued, and `replicate` would wait for that to read them back."""
    return {"loss_sum": np.zeros((), np.float32), "accuracy_sum": np.zeros((), np.float32),
            "steps": np.zeros((), np.int32), "nonfinite_step": np.full((), -1, np.int32)}


def augment_key(seed: int | jax.Array, step: jax.Array) -> jax.Array:
    """The augmentation key of train step `step`: a function of (seed, step) alone, so a
    resumed run augments exactly as an uninterrupted one."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _AUGMENT_STREAM), step)


def _train_batch(data: DeviceData, perm: jax.Array, offset: jax.Array, seed: jax.Array,
                 step: jax.Array, *, batch_size: int, image_size: int, dtype: Any,
                 augment: bool, random_erasing: float, sharding: NamedSharding) -> dict:
    """The batch `perm[offset : offset + batch_size]`, gathered from `data`, preprocessed and
    augmented with train step `step`'s key."""
    idx = jax.lax.dynamic_slice_in_dim(perm, offset, batch_size)
    idx = jax.lax.with_sharding_constraint(idx, sharding)
    images = data_lib.preprocess(data.train_images[idx], image_size, dtype)
    if augment or random_erasing:
        key = augment_key(seed, step)
    if random_erasing:  # (split only then: runs without it keep their augmentation bits)
        key, erase_key = jax.random.split(key)
    if augment:
        images = data_lib.augment(key, images)
    if random_erasing:  # last, as in Zhong et al.: erase after crop and flip
        images = data_lib.random_erasing(erase_key, images, random_erasing)
    images = jax.lax.with_sharding_constraint(images, sharding)
    return {"image": images, "label": data.train_labels[idx]}


def _accumulate(accum: dict, metrics: dict, step: jax.Array) -> dict:
    """The epoch's running sums after train step `step`, which gave `metrics` (float32 sums;
    the first step with a non-finite loss kept)."""
    bad = ~jnp.isfinite(metrics["loss"]) & (accum["nonfinite_step"] < 0)
    m = {k: v.astype(jnp.float32) for k, v in metrics.items()}
    return {"loss_sum": accum["loss_sum"] + m["loss"],
            "accuracy_sum": accum["accuracy_sum"] + m["accuracy"],
            "steps": accum["steps"] + 1,
            "nonfinite_step": jnp.where(bad, step, accum["nonfinite_step"])}


def _chunk_start(start: Any, num_steps: int, batch_size: int, examples: int) -> Any:
    """`start` as the programs take it, once the chunk is checked to fit the permutation: host
    integers of any type as int32 (a weakly typed int would compile the program again); a
    value traced by a caller's jit as it is."""
    try:
        first = operator.index(start)
    except TypeError:  # traced, by a caller's jit
        first = None
    if num_steps < 1 or first is not None and (
            first < 0 or (first + num_steps) * batch_size > examples):
        raise ValueError(f"{num_steps} steps from step {start} of batch {batch_size} do not "
                         f"fit the permutation of {examples} examples")
    return start if first is None else np.int32(first)


def make_train_loop(mesh: Mesh, *, batch_size: int, image_size: int, seed: int,
                    augment: bool = False, random_erasing: float = 0.0,
                    label_smoothing: float = 0.0, dtype: Any = jnp.float32,
                    loop_single_steps: bool = False,
                    compiler_options: dict[str, str] | None = None) -> Callable:
    """`loop(state, accum, data, perm, start, num_steps) -> (state, accum, chunk_loss_sum)`.

    Runs `num_steps` train steps (a traced count: one compilation serves every chunk length)
    on batches `perm[(start + i) * batch_size : ...]`, with the state buffers donated. Each step
    is `train_step` on the gathered, preprocessed batch. Chunks of several steps give the same
    bits however they are split; a lone step is compiled without the loop and may differ in the
    last bits, unless `loop_single_steps` (then it runs in the loop too). The trainer aligns
    chunks to fixed step numbers, and loops single steps when it dispatches several steps at
    a time: a run stopped mid-chunk (--max_steps) and resumed splits a chunk. The seed is passed
    to the compiled programs as an argument, not baked in, so runs with other seeds find them
    in the persistent compilation cache.

    `dtype` is the dtype the uint8 images are preprocessed to; the model's own `dtype` sets
    the precision its layers compute in (the trainer gives both the same). `compiler_options`
    go to `jax.jit` (`resnet_jax.conv.compiler_options(config.conv)`).
    """
    if not 0 <= seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    replicated = NamedSharding(mesh, P())
    batch_of = functools.partial(
        _train_batch, batch_size=batch_size, image_size=image_size, dtype=dtype,
        augment=augment, random_erasing=random_erasing, sharding=NamedSharding(mesh, P("data")))

    def body(i, carry, data, perm, start, seed):
        state, accum, chunk_loss = carry
        step = state.step
        batch = batch_of(data, perm, (start + i) * batch_size, seed, step)
        state, metrics = train_step(state, batch, label_smoothing=label_smoothing)
        return (state, _accumulate(accum, metrics, step),
                chunk_loss + metrics["loss"].astype(jnp.float32))

    def loop(state, accum, data, perm, start, num_steps, seed):
        carry = (state, accum, jnp.zeros((), jnp.float32))
        return jax.lax.fori_loop(0, num_steps, functools.partial(body, data=data, perm=perm,
                                                                 start=start, seed=seed), carry)

    def single(state, accum, data, perm, start, seed):
        return body(0, (state, accum, jnp.zeros((), jnp.float32)), data, perm, start, seed)

    looped = jax.jit(loop, out_shardings=replicated, donate_argnums=(0, 1),
                     compiler_options=compiler_options)
    unrolled = jax.jit(single, out_shardings=replicated, donate_argnums=(0, 1),
                       compiler_options=compiler_options)

    def run(state, accum, data, perm, start, num_steps):
        num_steps = int(num_steps)
        start = _chunk_start(start, num_steps, batch_size, perm.shape[0])
        # XLA:CPU runs a convolution inside a while loop several times slower than outside one
        # (measured: 3.4 s vs 0.9 s per ResNet-18 step at 28x28, batch 128), so a single step is
        # dispatched without a loop; on CPU the default is one step per dispatch.
        if num_steps == 1 and not loop_single_steps:
            return unrolled(state, accum, data, perm, start, np.int32(seed))
        return looped(state, accum, data, perm, start, np.int32(num_steps), np.int32(seed))

    def lower(state, accum, data, perm, num_steps: int) -> jax.stages.Lowered:
        """The program `run` dispatches for chunks of `num_steps` (arrays may be abstract)."""
        scalar = jax.ShapeDtypeStruct((), np.int32)
        if num_steps == 1 and not loop_single_steps:
            return unrolled.lower(state, accum, data, perm, scalar, scalar)
        return looped.lower(state, accum, data, perm, scalar, scalar, scalar)

    run.lower = lower
    return run


def make_eval_loop(mesh: Mesh, *, image_size: int, dtype: Any = jnp.float32,
                   compiler_options: dict[str, str] | None = None) -> Callable:
    """`evaluate(state, data, idx, mask) -> sums` over test batches `idx` [num_batches, batch];
    `compiler_options` as for `make_train_loop`."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def evaluate(state, data, idx, mask):
        def body(totals, xs):
            i, m = (jax.lax.with_sharding_constraint(x, batch) for x in xs)
            images = data_lib.preprocess(data.test_images[i], image_size, dtype)
            out = eval_step(state, {"image": images, "label": data.test_labels[i], "mask": m})
            return jax.tree.map(jnp.add, totals, out), None

        first = jax.eval_shape(lambda: eval_step(state, {
            "image": jnp.zeros((idx.shape[1], image_size, image_size,
                                data.test_images.shape[-1]), dtype),
            "label": jnp.zeros(idx.shape[1], jnp.int32)}))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
        return jax.lax.scan(body, zeros, (idx, mask))[0]

    return jax.jit(evaluate, out_shardings=replicated, compiler_options=compiler_options)


def make_predict_loop(mesh: Mesh, *, image_size: int, dtype: Any = jnp.float32,
                      flip: bool = False,
                      compiler_options: dict[str, str] | None = None) -> Callable:
    """`predict(state, data, idx) -> probabilities` float32 [num_batches, batch, classes] for
    the test images `idx` [num_batches, batch]: the softmax of the logits (running BN
    statistics); with `flip`, the mean of the image's and its mirror image's (test-time
    augmentation, as the recipe's random flips train for); `compiler_options` as for
    `make_train_loop`."""
    batch = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())

    def predict(state, data, idx):
        def body(carry, i):
            i = jax.lax.with_sharding_constraint(i, batch)
            images = data_lib.preprocess(data.test_images[i], image_size, dtype)
            probs = jax.nn.softmax(state.apply_fn(state.variables, images, train=False))
            if flip:  # NHWC: axis 2 is the width
                mirrored = state.apply_fn(state.variables, images[:, :, ::-1], train=False)
                probs = (probs + jax.nn.softmax(mirrored)) / 2
            return carry, probs

        return jax.lax.scan(body, None, idx)[1]

    return jax.jit(predict, out_shardings=replicated, compiler_options=compiler_options)


def summarize_eval(sums: dict) -> dict:
    """`eval_step`'s sums over the test set -> `val_loss`, `val_accuracy`, `val_count`."""
    count = float(sums["count"])
    return {"val_loss": float(sums["loss_sum"]) / count,
            "val_accuracy": float(sums["correct"]) / count, "val_count": int(count)}


# --------------------------------------------------------------------------------------------
# The experiment.


def compute_dtype(config: Config) -> Any:
    """The activations' dtype for `config.precision` (parameters stay float32)."""
    return jnp.bfloat16 if config.precision == "bf16" else jnp.float32


def build_model(config: Config, num_classes: int) -> nn.Module:
    """The model a Config names, with its options; a bad option is a UserError."""
    grouping = {k: getattr(config, k) for k in ("cardinality", "base_width")
                if getattr(config, k) is not None}
    options = models.model_options(config.arch)
    if grouping and "cardinality" not in options:
        bottlenecks = [n for n in models.list_models() if "cardinality" in models.model_options(n)]
        raise UserError(f"--{next(iter(grouping))} applies to the bottleneck archs "
                        f"({', '.join(bottlenecks)}), not {config.arch}")
    if "grouped_conv" in options:
        grouping["grouped_conv"] = config.grouped_conv
    try:
        return models.create_model(config.arch, num_classes=num_classes,
                                   dtype=compute_dtype(config), stem=config.stem,
                                   variant=config.variant,
                                   width=config.width, stem_conv=config.stem_conv,
                                   conv=config.conv,
                                   zero_init_residual=config.zero_init_residual, **grouping)
    except ValueError as e:
        raise UserError(str(e)) from None


def _check_workdir(config: Config, is_main: bool) -> Path:
    """Creates or checks the workdir; refuses to mix runs in it (one-line UserErrors)."""
    workdir = Path(config.workdir).absolute()
    check_writable(workdir, "--workdir")
    ckpt_dir = workdir / "checkpoints"
    folders = ("checkpoints", "damaged_checkpoints", "tensorboard")
    if config.overwrite and is_main:
        for name in folders:
            shutil.rmtree(workdir / name, ignore_errors=True)
        for name in ("config.json", "metrics.jsonl", "curves.png", *folders):
            if not (workdir / name).is_dir():  # (a file where a folder should be too)
                (workdir / name).unlink(missing_ok=True)
    _barrier("workdir")
    for name in folders:
        if (workdir / name).exists() and not (workdir / name).is_dir():
            raise UserError(f"--workdir {workdir} holds a file {name} where the run keeps a "
                            "folder; use --overwrite to start again or another --workdir")
    saved_path = workdir / "config.json"
    # A run that saved no checkpoint (it failed to start, or was killed in its first epoch) has
    # nothing to resume: a corrected command may start afresh in its workdir.
    saved_steps = ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir())
    if saved_path.exists() and saved_steps:
        try:
            saved = json.loads(saved_path.read_text())
        except (OSError, ValueError):
            saved = None
        if not isinstance(saved, dict):
            raise UserError(f"{saved_path} is unreadable or not a training config; use "
                            "--overwrite to start again")
        diff = identity_diff(identity(config), saved)
        if diff:
            raise UserError(f"--workdir {workdir} holds a different run ({'; '.join(diff)}); "
                            "use --overwrite to start again or another --workdir")
    elif not saved_path.exists() and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise UserError(f"--workdir {workdir} holds checkpoints of an unknown run (no "
                        "config.json); use --overwrite to start again or another --workdir")
    return workdir


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (so every process stops at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))


class _Preemption:
    """SIGTERM/SIGINT: finish the current dispatch, checkpoint, exit 0. A second one: exit now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> _Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: checkpointing after the current "
              "dispatch (send it again to exit at once)", file=sys.stderr, flush=True)


def _initializer(config: Config, model: nn.Module, tx: optax.GradientTransformation,
                 channels: int, mesh: Mesh) -> tuple[Callable[[], dict], Any]:
    """The function that creates a fresh checkpoint tree (replicated over `mesh`), and that
    tree's abstract shape, which is what a restore needs."""
    input_shape = (1, config.image_size, config.image_size, channels)
    replicated = NamedSharding(mesh, P())

    # The seed is an argument of the compiled program (not a constant in it), so that every
    # seed's initialisation is one program, found in the persistent compilation cache.
    def fresh(seed):
        init_rng = jax.random.fold_in(jax.random.key(seed), _INIT_STREAM)
        return {"state": create_train_state(model, tx, init_rng, input_shape).arrays(),
                "accum": empty_accum()}

    # XLA compiles the partitionable threefry (JAX's default) about 3x slower, and a
    # replicated state gains nothing from it: jit(init) of ResNet-18 (width 8) took 6.1 s to
    # compile on this CPU, 1.9 s without it. The flag must hold while jit traces and lowers.
    # Traced once: the trace gives the abstract tree a restore needs, and the program.
    seed = jax.ShapeDtypeStruct((), np.int32)
    with jax.threefry_partitionable(False):
        traced = jax.jit(fresh, out_shardings=replicated).trace(seed)

    # It runs once: on a CPU, LLVM's optimisation of it costs more than it saves (ResNeXt-50's
    # compiled in 2.8 s against 4.3 s, ResNet-18's in 1.1 against 1.8 s, to the same bits).
    on_cpu = mesh.devices.flat[0].platform == "cpu"  # where it runs, whatever the default
    options = {"xla_backend_optimization_level": 0} if on_cpu else None

    def init():
        with jax.threefry_partitionable(False):
            return traced.lower().compile(options)(np.int32(config.seed))

    return init, jax.tree.map(_abstract(replicated), traced.out_info)


def _copy(x: jax.Array) -> jax.Array:
    """A copy of `x` in new buffers, placed as `x` is (across processes too). In one process a
    plain buffer copy; across processes JAX compiles a small program per shape once."""
    return jax.device_put(x, x.sharding, may_alias=False)


def _abstract(sharding: NamedSharding) -> Callable[[Any], jax.ShapeDtypeStruct]:
    """x -> the ShapeDtypeStruct of x placed with `sharding` (for lowering ahead of time)."""
    return lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _compile_ahead(compiler: ThreadPoolExecutor, train_loop: Callable, eval_loop: Callable,
                   state: TrainState, accum: dict, data: DeviceData,
                   eval_batches: tuple[np.ndarray, np.ndarray], num_steps: int,
                   sharding: NamedSharding) -> tuple[Future, Future]:
    """Compiles the train program (for chunks of `num_steps`), then the eval program, on
    `compiler`'s thread from the shapes of the arguments (`sharding`-placed); their futures.

    XLA compiles without holding the GIL, so this overlaps what the caller does meanwhile (on
    an H200 the init and train programs took 5.4 s + 5.8 s to compile one after the other).
    A compiled program lands in jit's caches, where the first real call finds it.
    """
    spec = _abstract(sharding)
    data = jax.tree.map(spec, data)
    perm = jax.ShapeDtypeStruct(data.train_labels.shape, np.int32, sharding=sharding)
    idx, mask = map(spec, eval_batches)
    return (compiler.submit(lambda: train_loop.lower(state, accum, data, perm,
                                                     num_steps).compile()),
            compiler.submit(lambda: eval_loop.lower(state, data, idx, mask).compile()))


def _saved_config(workdir: str | Path) -> tuple[Path, dict]:
    """The path of a workdir's config.json and its JSON object."""
    path = Path(workdir) / "config.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: is --workdir a training workdir?") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable: {e}") from None
    if not isinstance(saved, dict):
        raise UserError(f"{path} is not a training config (not a JSON object)")
    return path, saved


def _config_of(path: Path, saved: dict) -> Config:
    try:
        return from_saved(saved)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def load_config(workdir: str | Path) -> Config:
    """The Config a workdir was trained with (from its config.json)."""
    return _config_of(*_saved_config(workdir))


def load_checkpoint(workdir: str | Path, checkpoint: str | int = "latest",
                    mesh: Mesh | None = None, *, steps_per_epoch: int | None = None,
                    ) -> tuple[Config, TrainState, int]:
    """Restores a checkpoint of `workdir` (`latest`, `best` or a step number), without the data.

    The model and optimizer are rebuilt from the run's config.json: the dataset's class count
    and channels from the dataset table, the schedule's `steps_per_epoch` from the record of
    the run (or as given). Returns the run's Config, the TrainState (placed replicated on
    `mesh`, default every device) and the restored step. For inference:
    `state.apply_fn(state.variables, images, train=False)` on NHWC float images in [0, 1] at
    `config.image_size`.
    """
    from resnet_jax.checkpoint import best_steps

    path, saved = _saved_config(workdir)
    config = _config_of(path, saved)
    spec = data_lib.get_spec(config.dataset)
    if steps_per_epoch is None:
        steps_per_epoch = (saved.get("resolved") or {}).get("steps_per_epoch")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch <= 0:
            raise UserError(f"{path} does not record the run's steps per epoch; restore with "
                            "its data (restore_state)")
    mesh = mesh if mesh is not None else make_mesh()
    model = build_model(config, spec.num_classes)
    tx = create_optimizer(config, steps_per_epoch)
    _, abstract = _initializer(config, model, tx, spec.image_shape[-1], mesh)
    checkpointer = Checkpointer(Path(workdir) / "checkpoints", read_only=True)
    try:
        steps = checkpointer.steps()
        if not steps:
            raise UserError(f"no checkpoints in {checkpointer.directory}")
        checkpoint = str(checkpoint)
        if checkpoint == "latest":
            candidates = None
        elif checkpoint == "best":
            candidates = best_steps(checkpointer)
        elif checkpoint.isdigit() and int(checkpoint) in steps:
            candidates = [int(checkpoint)]
        else:
            raise UserError(f"--checkpoint {checkpoint!r} not found in {workdir}; valid: best, "
                            "latest, " + ", ".join(map(str, steps)))
        restored = checkpointer.restore(abstract, candidates)
    finally:
        checkpointer.close()
    state = TrainState(apply_fn=model.apply, tx=tx, **restored.tree["state"])
    return config, state, restored.step


def restore_state(workdir: str | Path, checkpoint: str | int = "latest",
                  data_dir: str | None = None, mesh: Mesh | None = None,
                  dataset: data_lib.Dataset | None = None,
                  ) -> tuple[Config, TrainState, data_lib.Dataset, int]:
    """Restores a checkpoint of `workdir` (`latest`, `best` or a step number), and its data.

    Returns the run's Config, the TrainState, the dataset and the restored step. A `dataset`
    already loaded is used, not read again, if it is the one the run was trained on.
    (`load_checkpoint` restores without the data.)
    """
    config = load_config(workdir)
    if data_dir:
        config = config.replace(data_dir=data_dir)
    if dataset is None or dataset.spec.tfds_name != config.dataset:
        try:
            dataset = data_lib.load_dataset(config.dataset, config.data_dir)
        except UserError as e:
            if data_dir:
                raise
            raise UserError(f"{e} (the run's data_dir, from {Path(workdir) / 'config.json'}; "
                            "give --data_dir)") from None
    num_train = min(len(dataset.train_labels), config.train_examples or len(dataset.train_labels))
    _, state, step = load_checkpoint(
        workdir, checkpoint, mesh,
        steps_per_epoch=data_lib.steps_per_epoch(num_train, config.batch_size))
    return config, state, dataset, step


def evaluate_checkpoint(workdir: str | Path, checkpoint: str | int = "latest",
                        data_dir: str | None = None, mesh: Mesh | None = None) -> dict:
    """Restores a checkpoint of `workdir` (`latest`, `best` or a step) and evaluates it on the
    whole test split: `val_loss`, `val_accuracy`, `confusion` [true, predicted], `class_names`."""
    mesh = mesh if mesh is not None else make_mesh()
    config, state, dataset, step = restore_state(workdir, checkpoint, data_dir, mesh)
    batch = config.batch_size - config.batch_size % mesh.size or mesh.size
    idx, mask = replicate(data_lib.eval_batches(len(dataset.test_labels), batch), mesh)
    sums = make_eval_loop(mesh, image_size=config.image_size, dtype=compute_dtype(config),
                          compiler_options=conv_lib.compiler_options(config.conv))(
        state, put_dataset(dataset, mesh), idx, mask)
    return {"step": step, **summarize_eval(sums),
            "confusion": np.asarray(sums["confusion"]).round().astype(np.int64),
            "class_names": list(dataset.spec.class_names)}


def _predict(config: Config, state: TrainState, dataset: data_lib.Dataset, ddata: DeviceData,
             mesh: Mesh, flip: bool) -> np.ndarray:
    """Probabilities [num_test, classes] of `state` (a run of `config`) on `dataset`'s test
    split, `ddata` being its copy on the devices."""
    batch = config.batch_size - config.batch_size % mesh.size or mesh.size
    idx, _ = data_lib.eval_batches(len(dataset.test_labels), batch)
    probs = make_predict_loop(mesh, image_size=config.image_size, dtype=compute_dtype(config),
                              flip=flip, compiler_options=conv_lib.compiler_options(config.conv)
                              )(state, ddata, replicate(idx, mesh))
    return np.asarray(probs).reshape(-1, probs.shape[-1])[:len(dataset.test_labels)]


def evaluate_ensemble(workdirs: list[str | Path], checkpoint: str = "latest",
                      data_dir: str | None = None, flip: bool = False,
                      mesh: Mesh | None = None, saved: list[str | Path] = ()) -> dict:
    """Evaluates the mean of the test-split probabilities of a checkpoint (`latest`, `best` or
    a step) of each of `workdirs`: an ensemble, each member with flip test-time augmentation
    if `flip`. `saved` adds the members of prediction files (`save_predictions`), each file
    weighing as many models as it holds, so that models trained elsewhere, or no longer at
    hand, join the ensemble.

    Returns `members` (per model: `workdir`, `step`, `flip`, `val_accuracy`, and `file` for
    saved ones), `val_accuracy` and `val_loss` (negative log of the mean probability of the
    true class) of the ensemble, `val_count`, `confusion` [true, predicted], `class_names`,
    `probabilities` [num_test, classes] (the ensemble's) and `labels`."""
    if not workdirs and not saved:
        raise UserError("no workdirs or prediction files to evaluate")
    mesh = mesh if mesh is not None else make_mesh() if workdirs else None
    # Members share the loaded data and its copy on the devices.
    members, total, dataset, ddata = [], None, None, None
    labels, class_names, source = None, None, None

    def same_test_set(new_labels: np.ndarray, what: str) -> None:
        if labels is not None and not np.array_equal(new_labels, labels):
            raise UserError(f"{what} is of another test set than {source}; an ensemble needs one")

    for workdir in workdirs:
        config, state, loaded, step = restore_state(workdir, checkpoint, data_dir, mesh, dataset)
        if loaded is not dataset:
            same_test_set(loaded.test_labels, f"{workdir} ({config.dataset})")
            dataset, ddata = loaded, put_dataset(loaded, mesh)
            labels, class_names = dataset.test_labels, list(dataset.spec.class_names)
            source = source or str(workdir)
        probs = _predict(config, state, dataset, ddata, mesh, flip)
        total = probs if total is None else total + probs
        members.append({"workdir": str(workdir), "step": step, "flip": flip,
                        "val_accuracy": float(np.mean(probs.argmax(-1) == labels))})
    for path in saved:
        file = load_predictions(path)
        same_test_set(file["labels"], str(path))
        if class_names and file["class_names"] != class_names:
            raise UserError(f"{path} holds predictions over other classes than {source}'s")
        labels, class_names = file["labels"], class_names or file["class_names"]
        source = source or str(path)
        weight = len(file["members"])
        total = file["probabilities"] * weight + (0 if total is None else total)
        members += [{**m, "file": str(path)} for m in file["members"]]
    mean = total / len(members)
    predicted = mean.argmax(-1)
    confusion = np.zeros((mean.shape[-1],) * 2, np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    true_prob = mean[np.arange(len(labels)), labels]
    return {"members": members, "val_accuracy": float(np.mean(predicted == labels)),
            "val_loss": float(-np.mean(np.log(np.maximum(true_prob, 1e-30)))),
            "val_count": len(labels), "confusion": confusion, "class_names": class_names,
            "probabilities": mean.astype(np.float32), "labels": np.asarray(labels, np.int32)}


def save_predictions(path: str | Path, result: dict) -> None:
    """Writes an `evaluate_ensemble` result's test-split probabilities, labels, class names and
    members to `path` (.npz, atomically): for analysis (which images fail, calibration), and to
    ensemble these models later without their checkpoints (`evaluate_ensemble(saved=...)`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder; name a file for the predictions")
    tmp = path.with_name(path.name + ".tmp.npz")
    try:
        np.savez_compressed(tmp, probabilities=result["probabilities"], labels=result["labels"],
                            class_names=np.asarray(result["class_names"]),
                            members=np.asarray(json.dumps(result["members"])))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # (a full disk, say: no half-written file left behind)


def load_predictions(path: str | Path) -> dict:
    """A prediction file of `save_predictions`: `probabilities`, `labels`, `class_names`,
    `members`; a one-line UserError if it is missing or not one."""
    not_one = f"{path} is not a prediction file of evaluate.py --save_predictions"
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {"probabilities": np.asarray(f["probabilities"], np.float64),
                   "labels": np.asarray(f["labels"]),
                   "class_names": [str(n) for n in f["class_names"]],
                   "members": json.loads(str(f["members"]))}
    except FileNotFoundError:
        raise UserError(f"prediction file {path} not found") from None
    except KeyError as e:  # numpy's words: "probabilities is not a file in the archive"
        raise UserError(f"{not_one} ({e.args[0] if e.args else e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # cut short, or damaged
        raise UserError(f"{path} is damaged or cut short ({str(e) or type(e).__name__})"
                        ) from None
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{not_one} ({type(e).__name__})") from None
    probs, labels, members = out["probabilities"], out["labels"], out["members"]
    if (probs.ndim != 2 or labels.shape != probs.shape[:1] or not len(labels)
            or probs.shape[1] != len(out["class_names"])):
        raise UserError(f"{not_one} (inconsistent shapes)")
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) for m in members):
        raise UserError(f"{not_one} (its members are not a list of models)")
    if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise UserError(f"{not_one} (labels are not class indices)")
    sums = probs.sum(-1)
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(sums - 1).max() > 1e-3:
        raise UserError(f"{not_one} (its rows are not probabilities)")
    return out


def use_compilation_cache(setting: str) -> Path | None:
    """Points XLA's persistent compilation cache at `setting` (see `--compilation_cache`) and
    returns the folder used. "auto" keeps a folder JAX already has (JAX_COMPILATION_CACHE_DIR);
    a folder or "off", given on the command line, wins over it."""
    if setting == "auto" and jax.config.jax_compilation_cache_dir:
        return Path(jax.config.jax_compilation_cache_dir)
    folder = compilation_cache_dir(setting)
    if folder is None:
        if setting == "off":
            jax.config.update("jax_enable_compilation_cache", False)
        return None
    if setting != "auto":  # a folder named by the user: one line now, not a warning per program
        check_writable(folder, "--compilation_cache")
    jax.config.update("jax_compilation_cache_dir", str(folder))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX caches only programs that took >= 1 s to compile; on an H200 the eval and
        # data-order programs took 0.5-0.9 s each, every run.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return folder


def compilation_cache_dir(setting: str, backend: str | None = None) -> Path | None:
    """The folder `--compilation_cache` names on `backend` (default: JAX's): "auto" is
    ~/.cache/resnet_jax/xla (under $XDG_CACHE_HOME if set) on an accelerator and none on a CPU,
    whose programs compile in seconds and would fill the cache; "off" is none."""
    if setting == "off" or (setting == "auto" and (backend or jax.default_backend()) == "cpu"):
        return None
    if setting == "auto":
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_jax/xla"
    return Path(setting)


def default_steps_per_dispatch(backend: str | None = None) -> int:
    """Train steps per jitted call when `--steps_per_dispatch` is 0, on `backend` (default:
    JAX's): 1 on a CPU, where XLA:CPU runs a convolution inside a loop several times slower
    (benchmarks.md), 100 on an accelerator, where each dispatch costs host time."""
    return 1 if (backend or jax.default_backend()) == "cpu" else 100


# --------------------------------------------------------------------------------------------
# The run, as `train_and_evaluate` reads: a plan from the config, the programs, restore (or a
# fresh start), the loop over epochs, finish. Each step below is one of those.


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run does, computed and checked once from its Config (`make_plan`): printed as the
    start-up report and saved, resolved, in config.json."""

    config: Config
    dataset: data_lib.Dataset  # cut to --train_examples and --eval_examples
    model: nn.Module
    steps_per_epoch: int
    total_steps: int  # this run's last step (--epochs, or --max_steps before that)
    dispatch: int  # train steps per dispatch to the devices (the chunks' size)
    workdir: Path

    @property
    def num_train(self) -> int:
        """The training examples of an epoch."""
        return len(self.dataset.train_labels)


def make_plan(config: Config, mesh: Mesh, is_main: bool) -> Plan:
    """Loads the data and builds the model `config` names, checks that they fit together and
    the mesh, and prepares the workdir; each mistake is a one-line UserError."""
    if config.batch_size % mesh.size:
        raise UserError(f"--batch_size {config.batch_size} is not divisible by the {mesh.size} "
                        "devices; use a multiple of the device count")
    dataset = _cut(data_lib.load_dataset(config.dataset, config.data_dir), config)
    model = build_model(config, dataset.spec.num_classes)
    if config.image_size < models.min_image_size(model):
        raise UserError(f"--image_size {config.image_size} is too small for {config.arch} with "
                        f"the {config.stem} stem; use at least {models.min_image_size(model)}")
    num_train = len(dataset.train_labels)
    steps_per_epoch = data_lib.steps_per_epoch(num_train, config.batch_size)
    if steps_per_epoch == 0:
        raise UserError(f"--batch_size {config.batch_size} exceeds the {num_train} training "
                        "examples")
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    dispatch = config.steps_per_dispatch or default_steps_per_dispatch()
    return Plan(config, dataset, model, steps_per_epoch, total_steps, dispatch,
                _check_workdir(config, is_main))


def _cut(dataset: data_lib.Dataset, config: Config) -> data_lib.Dataset:
    """`dataset` cut to its first --train_examples and --eval_examples examples."""
    for flag, asked, split in (("train_examples", config.train_examples, dataset.train_labels),
                               ("eval_examples", config.eval_examples, dataset.test_labels)):
        if asked is not None and asked > len(split):
            raise UserError(f"--{flag} {asked} exceeds the {len(split)} examples of the split")
    if not (config.train_examples or config.eval_examples):
        return dataset
    train, test = slice(config.train_examples), slice(config.eval_examples)
    return dataclasses.replace(
        dataset, train_images=dataset.train_images[train],
        train_labels=dataset.train_labels[train], test_images=dataset.test_images[test],
        test_labels=dataset.test_labels[test])


@dataclasses.dataclass(frozen=True)
class Programs:
    """The run's programs for the devices, and the fresh or restored tree they start from.
    Compiled on first use, or ahead on a worker thread (`train_ready`, `eval_ready`)."""

    mesh: Mesh
    tx: optax.GradientTransformation
    init: Callable[[], dict]  # a fresh checkpoint tree: {"state": ..., "accum": ...}
    abstract: Any  # that tree's shapes and placement, which a restore needs
    train_loop: Callable  # see make_train_loop
    eval_loop: Callable  # see make_eval_loop
    permutation: Callable  # (seed, epoch, num_examples) -> the epoch's data order
    train_ready: Future | None = None
    eval_ready: Future | None = None

    def state(self, model: nn.Module, tree: dict) -> TrainState:
        """The TrainState of a checkpoint tree's arrays."""
        return TrainState(apply_fn=model.apply, tx=self.tx, **tree["state"])


def build_programs(plan: Plan, mesh: Mesh) -> Programs:
    """Traces the initialisation and defines (without compiling) the train and eval loops."""
    config, dtype = plan.config, compute_dtype(plan.config)
    options = conv_lib.compiler_options(config.conv)
    tx = create_optimizer(config, plan.steps_per_epoch)
    init, abstract = _initializer(config, plan.model, tx, plan.dataset.spec.image_shape[-1],
                                  mesh)
    train_loop = make_train_loop(mesh, batch_size=config.batch_size, image_size=config.image_size,
                                 seed=config.seed, augment=config.augment,
                                 random_erasing=config.random_erasing,
                                 label_smoothing=config.label_smoothing, dtype=dtype,
                                 loop_single_steps=plan.dispatch > 1,
                                 compiler_options=options)
    eval_loop = make_eval_loop(mesh, image_size=config.image_size, dtype=dtype,
                               compiler_options=options)
    # The seed traced like the epoch: one program for every seed (compilation cache).
    permutation = jax.jit(data_lib.epoch_permutation, static_argnums=(2,),
                          out_shardings=NamedSharding(mesh, P()))
    return Programs(mesh, tx, init, abstract, train_loop, eval_loop, permutation)


def compile_ahead(compiler: ThreadPoolExecutor, plan: Plan, programs: Programs) -> Programs:
    """`programs` with their train and eval programs compiling on `compiler`'s thread."""
    train_ready, eval_ready = _compile_ahead(
        compiler, programs.train_loop, programs.eval_loop,
        programs.state(plan.model, programs.abstract), programs.abstract["accum"],
        _host_data(plan.dataset), _eval_batches(plan), min(plan.dispatch, plan.total_steps),
        NamedSharding(programs.mesh, P()))
    return dataclasses.replace(programs, train_ready=train_ready, eval_ready=eval_ready)


def _eval_batches(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """The padded test batches (indices and mask) of the plan's batch size."""
    return data_lib.eval_batches(len(plan.dataset.test_labels), plan.config.batch_size)


def restore_latest(plan: Plan, checkpointer: Checkpointer, programs: Programs,
                   is_main: bool) -> Restored | None:
    """The workdir's latest readable checkpoint (damaged ones are set aside), or None."""
    restored = checkpointer.restore(programs.abstract)
    if restored is not None and restored.step > plan.total_steps:
        checkpointer.close()
        raise UserError(f"--workdir {plan.workdir} holds step {restored.step}, past this run's "
                        f"last step {plan.total_steps}; give more --epochs (or --max_steps), or "
                        "use --overwrite to start again")
    if is_main and restored is None and (plan.workdir / "config.json").exists():
        # The same command again, but the first run saved no checkpoint (stopped in its first
        # epoch): say that this is a fresh start, not a resume.
        print(f"no checkpoint in {checkpointer.directory} to resume: starting from step 0",
              flush=True)
    return restored


def fine_tune_start(plan: Plan, checkpointer: Checkpointer, programs: Programs,
                    restored: Restored | None, is_main: bool) -> finetune.Start | None:
    """The weights `--init_from` names, fitted to the model, for a fresh run (a workdir that
    holds checkpoints resumes them instead); None without `--init_from`."""
    if restored is not None or not plan.config.init_from:
        return None
    try:
        start = finetune.load_start(plan.config, programs.abstract["state"], load_checkpoint)
    except BaseException:
        checkpointer.close()
        raise
    if is_main:
        print(start.line, flush=True)
    return start


def save_resolved_config(plan: Plan, mesh: Mesh, start: finetune.Start | None) -> None:
    """Writes config.json: the Config, and what it resolved to on this machine."""
    config = plan.config
    resolved = {**dataclasses.asdict(config), "resolved": {
        "devices": mesh.size, "processes": jax.process_count(),
        "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total_steps,
        "steps_per_dispatch": plan.dispatch, "data_source": plan.dataset.source,
        "stem_conv": models.resolve_stem_conv(config.stem_conv, config.stem),
        "conv": models.resolve_conv(config.conv),
        "grouped_conv": models.resolve_grouped_conv(config.grouped_conv),
        "init_from": finetune.record(start, plan.workdir), "jax_version": jax.__version__}}
    # Atomic: the other processes may be reading it (_check_workdir), or a kill may land.
    atomic_write(plan.workdir / "config.json", json.dumps(resolved, indent=2) + "\n")


def startup_report(plan: Plan, programs: Programs, restored: Restored | None,
                   checkpoints: Path) -> str:
    """A few lines on what the run trains, on what, with what, and for how long."""
    config, dataset, mesh = plan.config, plan.dataset, programs.mesh
    height, width, channels = dataset.spec.image_shape
    params = models.param_count(programs.abstract["state"]["params"])
    epochs = -(-plan.total_steps // plan.steps_per_epoch)
    lines = [
        f"data: {config.dataset} ({dataset.source}): {plan.num_train:,} train and "
        f"{len(dataset.test_labels):,} test images, {height}x{width}x{channels} resized to "
        f"{config.image_size}x{config.image_size}",
        f"model: {config.arch} ({config.stem} stem, width {config.width}), {params:,} "
        f"parameters, {config.precision} precision",
        f"devices: {mesh.size} x {jax.devices()[0].device_kind} ({jax.default_backend()}) in "
        f"{_count(jax.process_count(), 'process', 'processes')}",
        f"steps: {plan.steps_per_epoch:,} per epoch of batch {config.batch_size}, "
        f"{plan.total_steps:,} in all ({_count(epochs, 'epoch')}), {plan.dispatch} per dispatch",
        f"workdir: {plan.workdir}"]
    if restored is not None:
        lines.append(f"resuming from {checkpoints / str(restored.step)} (step {restored.step})")
    return "\n".join(lines)


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else many or one + 's'}"


class Books:
    """The host's side of a run, across epochs: the history of records, the epoch report still
    to write, the clocks, the checkpoints and metrics written, the progress shown."""

    def __init__(self, plan: Plan, checkpointer: Checkpointer, history: list[dict],
                 wall_offset: float, is_main: bool, compiling: Future | None = None) -> None:
        config = plan.config
        self.plan, self.checkpointer, self.is_main = plan, checkpointer, is_main
        self.writer = MetricsWriter(plan.workdir, enabled=is_main,
                                    title=f"{config.arch} on {config.dataset} "
                                          f"({config.image_size}px)")
        self.writer.reset(history)
        self.progress = Progress(enabled=is_main)
        self.last: dict = history[-1] if history else {}  # the latest record
        self.pending_report: Callable[[], None] | None = None
        self.wall_offset = wall_offset  # the wall time of the run before this process
        self.run_start = self.epoch_start = time.perf_counter()
        self.schedule = learning_rate_schedule(config, plan.steps_per_epoch)
        self.estimate = _EpochEstimate(plan.steps_per_epoch,
                                       is_main and jax.default_backend() == "cpu", compiling)

    def save(self, step: int, record: dict | None, tree: dict) -> None:
        """Checkpoints `tree` at `step` (asynchronously), with the history up to `record`."""
        meta = {"step": step, "history": self.writer.history + ([record] if record else []),
                "config": identity(self.plan.config),
                "wall_time": self.wall_offset + time.perf_counter() - self.run_start}
        metrics = ({"val_accuracy": record["val_accuracy"]}
                   if record and not record.get("partial") else None)
        self.checkpointer.save(step, tree, meta, metrics)

    def diverged(self, what: str) -> DivergedError:
        """The error for a loss that stopped being finite, naming the last good checkpoint."""
        kept = self.checkpointer.steps()
        return DivergedError(
            f"{what}; " + (f"the last good checkpoint, step {kept[-1]}, is kept in "
                           f"{self.checkpointer.directory}" if kept
                           else "no checkpoint had been saved"))

    def finish_chunk(self, chunk_loss: jax.Array, n: int, accum: dict) -> None:
        """Reads back a chunk's loss (blocking on that chunk only; the next one is queued),
        checks it and shows it."""
        loss = float(chunk_loss) / n
        if not np.isfinite(loss):
            bad = int(accum["nonfinite_step"])  # steps done before the bad one
            raise self.diverged(f"loss became {loss} at step {bad + 1} "
                                f"(epoch {bad // self.plan.steps_per_epoch + 1})")
        self.progress.update(n, n * self.plan.config.batch_size, loss)
        if line := self.estimate.steps_done(n):
            self.progress.write(line)

    def defer_report(self, end: EpochEnd, accum: dict, eval_sums: dict,
                     tree: dict | None) -> None:
        """Holds the epoch's report until `write_pending_report` (see `train_epoch`)."""
        self.pending_report = functools.partial(self.report, end, accum, eval_sums, tree)

    def write_pending_report(self) -> bool:
        """Writes the report held by `defer_report`, if any; whether there was one."""
        report, self.pending_report = self.pending_report, None
        if report is not None:
            report()
        return report is not None

    def report(self, end: EpochEnd, accum: dict, eval_sums: dict, tree: dict | None) -> None:
        """An epoch's bookkeeping once its evaluation (queued on the devices) is read back:
        its record, checkpoint `tree` (if any), metrics and line. The next epoch's clock
        starts when the evaluation was read back."""
        steps, spe = int(accum["steps"]), self.plan.steps_per_epoch
        val = summarize_eval(eval_sums)  # blocks until its evaluation is done
        eval_end = time.perf_counter()
        if not np.isfinite(val["val_loss"]):  # the epoch's last update broke the weights
            raise self.diverged(f"the validation loss became {val['val_loss']} after step "
                                f"{end.step} (epoch {end.epoch + 1}), though the training loss "
                                "was finite")
        record = {"epoch": round(end.epoch + end.position / spe, 4), "step": end.step,
                  "train_loss": float(accum["loss_sum"]) / steps,
                  "train_accuracy": float(accum["accuracy_sum"]) / steps, **val,
                  "learning_rate": self.learning_rate(end.step),
                  "images_per_sec": end.images / end.train_time,
                  # Where the time went: waiting for compilation shows in the first epoch's
                  # wall_time (the eval program's in its eval_time).
                  "train_time": end.train_time, "eval_time": eval_end - end.train_end,
                  "wall_time": self.wall_offset + eval_end - self.run_start}
        if end.position < spe:
            record["partial"] = True
        if tree is not None:
            self.save(end.step, record, tree)
        self.writer.write(record)
        if self.is_main:
            print(format_record(record, self.plan.config.epochs), flush=True)
        self.last, self.epoch_start = record, eval_end

    def learning_rate(self, step: int) -> float:
        """The learning rate of the epoch's last step, computed on the host's CPU device
        (not queued on an accelerator behind the next epoch's steps)."""
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            return float(self.schedule(step - 1))

    def close(self, stopped: bool) -> dict:
        """Waits for the checkpoint being written and closes the outputs; the last record,
        marked stopped if a signal stopped the run before its last step."""
        self.checkpointer.wait()
        self.checkpointer.close()
        self.writer.close()
        return {**self.last, "stopped": True} if stopped and self.last else self.last


class _EpochEstimate:
    """On a CPU, where an epoch can take many minutes: once a few steps after the first are
    timed, one line with the expected time per epoch. The clock starts once `compiling` (the
    eval program, compiled on another thread meanwhile) is done: the steps it overlapped ran
    1.7x slower at --preset=quick on 2 cores."""

    STEPS = 3

    def __init__(self, steps_per_epoch: int, enabled: bool,
                 compiling: Future | None = None) -> None:
        self.steps_per_epoch, self.enabled, self.compiling = steps_per_epoch, enabled, compiling
        self.start: float | None = None
        self.steps = 0

    def steps_done(self, n: int) -> str | None:
        """Counts `n` steps just read back; the line, once, when enough are timed."""
        if not self.enabled:
            return None
        if self.start is None:  # (the first chunk also waited for the devices to warm up)
            if self.compiling is not None and not self.compiling.done():
                # The next chunk ran while this waited: the clock starts when it is read.
                self.compiling.exception()  # (waits; an error is raised where it is used)
                return None
            self.start = time.perf_counter()
            return None
        now = time.perf_counter()
        self.steps += n
        if self.steps < self.STEPS:
            return None
        self.enabled = False
        per_step = (now - self.start) / self.steps
        return (f"cpu: about {_duration(per_step * self.steps_per_epoch)} per epoch "
                f"({per_step:.3g} s per step, timed over {self.steps} steps)")


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


@dataclasses.dataclass(frozen=True)
class EpochEnd:
    """Where an epoch's training stopped, and how long it took."""

    epoch: int  # 0-based
    position: int  # the epoch's steps done
    step: int  # the run's steps done
    images: int  # trained on by this process's run of the epoch
    train_time: float
    train_end: float  # time.perf_counter() when its last chunk was read back
    stop: bool  # a signal asked the run to stop


@dataclasses.dataclass(frozen=True)
class DeviceInputs:
    """The dataset on the devices, and the padded test batches evaluation runs over."""

    data: DeviceData
    eval_idx: jax.Array
    eval_mask: jax.Array


def put_inputs(plan: Plan, mesh: Mesh) -> DeviceInputs:
    """The plan's dataset and test batches, replicated over `mesh`."""
    return DeviceInputs(put_dataset(plan.dataset, mesh), *replicate(_eval_batches(plan), mesh))


def train_epoch(plan: Plan, programs: Programs, inputs: DeviceInputs, books: Books,
                state: TrainState, accum: dict, preemption: _Preemption,
                ) -> tuple[TrainState, dict, EpochEnd]:
    """Trains from `state`'s step to the epoch's end (or this run's last step) in chunks,
    reading each chunk's loss back while the next one runs; a signal stops it after a chunk."""
    config, step = plan.config, int(state.step)
    epoch, position = divmod(step, plan.steps_per_epoch)
    end = min(plan.steps_per_epoch, plan.total_steps - epoch * plan.steps_per_epoch)
    perm = programs.permutation(np.int32(config.seed), epoch, plan.num_train)
    if books.pending_report is None:
        books.progress.start_epoch(epoch, config.epochs, end, position)
    images, pending, stop = 0, None, False
    while position < end and not stop:
        # Chunks end on multiples of `dispatch` within the epoch, so a resumed run groups
        # steps exactly as an uninterrupted one.
        n = min(plan.dispatch - position % plan.dispatch, end - position)
        try:
            state, accum, chunk_loss = programs.train_loop(
                state, accum, inputs.data, perm, np.int32(position), np.int32(n))
        except Exception:
            if books.write_pending_report():  # (out of memory, say) keep the last epoch
                books.checkpointer.wait()
            raise
        position, step, images = position + n, step + n, images + n * config.batch_size
        # The overlap: the last epoch's report (read back, checkpoint, metrics) was deferred
        # until now, so the devices train on while the host writes it (on an H200 that
        # bookkeeping left the GPU idle ~0.15 s per epoch, ~10% of an epoch).
        if books.write_pending_report():
            books.progress.start_epoch(epoch, config.epochs, end, position - n)
        if pending is not None:
            books.finish_chunk(*pending, accum)
        pending = (chunk_loss, n)
        stop = _any_process(preemption.signum is not None)
    # Blocks until the epoch's training is done; the devices then idle only while the host
    # queues the evaluation and the next epoch's first chunk.
    books.finish_chunk(*pending, accum)
    train_end = time.perf_counter()
    books.progress.end_epoch()
    return state, accum, EpochEnd(epoch, position, step, images,
                                  train_end - books.epoch_start, train_end, stop)


def end_epoch(plan: Plan, programs: Programs, inputs: DeviceInputs, books: Books,
              state: TrainState, accum: dict, end: EpochEnd) -> dict:
    """Queues the epoch's evaluation, and its report and checkpoint, written at once when the
    run ends here, else deferred (see `train_epoch`). Returns the next chunk's running sums."""
    programs.eval_ready.result()
    eval_sums = programs.eval_loop(state, inputs.data, inputs.eval_idx, inputs.eval_mask)
    going_on = end.step < plan.total_steps and not end.stop
    epoch_accum, tree, mesh = accum, None, programs.mesh
    if end.position == plan.steps_per_epoch:
        # Global (replicated) arrays: a multi-process save or train step rejects the
        # single-device arrays empty_accum() returns.
        accum = replicate(empty_accum(), mesh)
    if not going_on or (end.epoch + 1) % plan.config.checkpoint_every == 0:
        # A copy of the state if the next epoch's first chunk, which takes the state's buffers
        # (donated), is queued before the checkpoint is written.
        tree = {"state": (jax.tree.map(_copy, state.arrays()) if going_on
                          else state.arrays()),
                "accum": accum if end.position < plan.steps_per_epoch else
                replicate(empty_accum(), mesh)}
    books.defer_report(end, epoch_accum, eval_sums, tree)
    if not going_on:
        books.write_pending_report()
    return accum


def checkpoint_and_stop(books: Books, end: EpochEnd, tree: dict | None) -> None:
    """Preemption: checkpoints `tree` (a run stopped mid-epoch: its state and the epoch's
    running sums; None where the epoch's report saved it) and says how to resume."""
    where = ""
    if tree is not None:
        books.save(end.step, None, tree)
        where = f" to {books.checkpointer.directory / str(end.step)}"
    books.checkpointer.wait()
    if books.is_main:
        print(f"checkpointed step {end.step}{where}; run the same command to resume",
              flush=True)


def run_epochs(plan: Plan, programs: Programs, inputs: DeviceInputs, books: Books,
               state: TrainState, accum: dict) -> int:
    """The loop over epochs, until this run's last step or a signal; returns the last step."""
    step = int(state.step)
    with _Preemption() as preemption:
        while step < plan.total_steps:
            state, accum, end = train_epoch(plan, programs, inputs, books, state, accum,
                                            preemption)
            step = end.step
            if end.stop and end.position < plan.steps_per_epoch and step < plan.total_steps:
                checkpoint_and_stop(books, end, {"state": state.arrays(), "accum": accum})
                break
            accum = end_epoch(plan, programs, inputs, books, state, accum, end)
            if end.stop:
                checkpoint_and_stop(books, end, None)
                break
    return step


def start_books(plan: Plan, checkpointer: Checkpointer, restored: Restored | None,
                is_main: bool, compiling: Future | None = None) -> Books:
    """The run's books, from the history of the checkpoint resumed (none for a fresh run);
    `compiling`: the eval program's compilation, which the CPU's estimate waits for."""
    history = restored.meta.get("history", []) if restored else []
    # A record of a run stopped early by --max_steps is superseded once training continues.
    history = [r for r in history if not r.get("partial") or r["step"] >= plan.total_steps]
    wall_offset = history[-1]["wall_time"] if history else 0.0
    if restored is not None:  # its own clock: a stop mid-epoch would lose the time since
        wall_offset = restored.meta.get("wall_time", wall_offset)  # the last record
    return Books(plan, checkpointer, history, wall_offset, is_main, compiling)


def train_and_evaluate(config: Config, mesh: Mesh | None = None) -> dict:
    """Trains and evaluates as `config` says, resuming from the workdir's latest checkpoint.

    Returns the last metrics record (one dict per epoch is also appended to metrics.jsonl),
    marked ``"stopped": True`` when SIGTERM/SIGINT stopped the run before its last step.
    Raises UserError for bad input, DivergedError if the loss stops being finite.
    """
    validate(config)
    use_compilation_cache(config.compilation_cache)
    mesh = mesh if mesh is not None else make_mesh()
    is_main = jax.process_index() == 0
    plan = make_plan(config, mesh, is_main)
    programs = build_programs(plan, mesh)
    checkpointer = Checkpointer(plan.workdir / "checkpoints", config.keep_checkpoints)
    restored = restore_latest(plan, checkpointer, programs, is_main)
    start = fine_tune_start(plan, checkpointer, programs, restored, is_main)
    if is_main:
        save_resolved_config(plan, mesh, start)
        print(startup_report(plan, programs, restored, checkpointer.directory), flush=True)
    step = restored.step if restored else 0
    compiler = ThreadPoolExecutor(1, thread_name_prefix="compile")
    try:
        if step < plan.total_steps:  # (a finished run compiles nothing)
            programs = compile_ahead(compiler, plan, programs)
        tree = restored.tree if restored else finetune.apply_start(programs.init(), start)
        state, accum = programs.state(plan.model, tree), tree["accum"]
        inputs = put_inputs(plan, mesh)
        books = start_books(plan, checkpointer, restored, is_main, programs.eval_ready)
        if step < plan.total_steps:
            programs.train_ready.result()  # raises what compiling raised
        books.epoch_start = time.perf_counter()  # (the first epoch's time leaves compiling out)
        step = run_epochs(plan, programs, inputs, books, state, accum)
        return books.close(stopped=step < plan.total_steps)
    except BaseException:
        # Whatever stops the run (a closed output pipe, say) lets the checkpoint being written
        # finish, rather than the interpreter's exit cut it off mid-write.
        try:
            checkpointer.wait()
            checkpointer.close()
        except Exception:  # noqa: BLE001 - the original failure is the one to report
            pass
        raise
    finally:
        # A failed run does not wait for a compilation nobody will use.
        compiler.shutdown(wait=False, cancel_futures=True)
