"""Throughput benchmark of the trainer's own code paths, and an end-to-end timing of a real run.

`benchmark_one` times `train.make_train_loop` and `train.make_eval_loop` (the functions
`train_and_evaluate` dispatches) on a synthetic uint8 dataset replicated over `train.make_mesh()`,
with the model, optimizer and initial state built exactly as the trainer builds them from a
`Config`. Only the data is fake: random 28x28 uint8 images are gathered and resized inside jit,
as Fashion-MNIST is in training, so the input pipeline's cost is part of the measurement.

`end_to_end` runs `train_and_evaluate` itself and reports the wall time, including start-up,
data loading and compilation, and each epoch's throughput from its metrics records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import gzip
import json
import math
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from resnet_jax import data as data_lib
from resnet_jax import models
from resnet_jax import train as train_lib
from resnet_jax.config import Config, validate
from resnet_jax.conv import compiler_options
from resnet_jax.errors import UserError
from resnet_jax.optimizer import create_optimizer

# The chapter's 10-epoch run is expected to reach this test accuracy (the PyTorch original gets
# 0.914, the plain Flax port 0.911; see shared/perf/h200-anchors.md).
TARGET_ACCURACY = 0.906

# Dense (not sparse) peak TFLOP/s per chip from the vendors' data sheets: (device_kind substring,
# bf16 tensor core, TF32 tensor core, fp32 without tensor cores). The first match wins, so the
# NVL and PCIe cards precede the SXM ones. XLA runs float32 convolutions and matmuls as TF32 on
# the tensor cores by default on these cards, so fp32 runs are measured against the TF32 peak,
# unless jax_default_matmul_precision asks for full float32.
PEAK_TFLOPS: tuple[tuple[str, float, float, float], ...] = (
    ("H100 PCIe", 756.0, 378.0, 51.0),
    ("H100 NVL", 835.0, 417.5, 60.0),
    ("H200 NVL", 835.0, 417.5, 60.0),
    ("H100", 989.0, 494.7, 67.0),   # SXM (device_kind "NVIDIA H100 80GB HBM3")
    ("H200", 989.0, 494.7, 67.0),
    ("A100", 312.0, 156.0, 19.5),
)

# JAX's own monitoring events for tracing, lowering to MLIR and XLA compilation (stable names
# since jax 0.4; see jax/_src/dispatch.py). Summing them times compilation without compiling twice.
_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_BACKEND_COMPILE_EVENT = _COMPILE_EVENTS[2]


def peak_kind(precision: str) -> str:
    """Which peak a run at `precision` is measured against: bf16, tf32 or fp32."""
    if precision == "bf16":
        return "bf16"
    full = str(jax.config.jax_default_matmul_precision or "").lower()
    return "fp32" if full in ("highest", "float32") else "tf32"


def peak_tflops(device_kind: str, precision: str) -> float | None:
    """The per-chip dense peak for `precision` (see `peak_kind`) on a known card, else None."""
    column = {"bf16": 1, "tf32": 2, "fp32": 3}[peak_kind(precision)]
    for row in PEAK_TFLOPS:
        if row[0].lower() in device_kind.lower():
            return row[column]
    return None


class CompileTimer:
    """Measures time JAX spends tracing, lowering and compiling while the context is open.

    Events nest (a jit called while tracing another one records its own trace event inside the
    outer one), so the result is the length of the union of the event intervals, not their sum.
    """

    def __init__(self) -> None:
        self._intervals: list[tuple[float, float]] = []
        self.backend_compiles = 0

    def _listen(self, event: str, duration: float, **kwargs: Any) -> None:
        if event in _COMPILE_EVENTS:
            end = time.perf_counter()
            self._intervals.append((end - duration, end))
            self.backend_compiles += event == _BACKEND_COMPILE_EVENT

    def __enter__(self) -> CompileTimer:
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc: Any) -> None:
        # Older jax has no unregister; a listener left behind only appends to a dead list.
        with contextlib.suppress(AttributeError, AssertionError, ValueError):
            jax.monitoring.unregister_event_duration_listener(self._listen)

    @property
    def seconds(self) -> float:
        total, reach = 0.0, -math.inf
        for start, end in sorted(self._intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked combination; everything that changes the compiled program or timing."""

    arch: str
    batch_size: int
    precision: str
    steps_per_dispatch: int
    image_size: int
    steps: int
    repeats: int
    num_classes: int = 10
    channels: int = 1
    width: int = 64
    stem: str = "imagenet"
    cardinality: int | None = None  # None: the arch's own (Config.cardinality)
    base_width: int | None = None
    grouped_conv: str = "auto"
    stem_conv: str = "auto"
    conv: str = "auto"
    source_size: int = 28
    train_examples: int = 60_000
    eval_examples: int = 10_000
    seed: int = 0

    def config(self) -> Config:
        """The trainer's Config for this case (the chapter's optimizer: plain SGD, lr 0.01)."""
        return Config(arch=self.arch, batch_size=self.batch_size, precision=self.precision,
                      image_size=self.image_size, width=self.width, stem=self.stem,
                      cardinality=self.cardinality, base_width=self.base_width,
                      grouped_conv=self.grouped_conv, stem_conv=self.stem_conv,
                      conv=self.conv, steps_per_dispatch=self.steps_per_dispatch, seed=self.seed)

    @property
    def group(self) -> tuple:
        """Cases that share a compiled program (they differ only in steps per dispatch)."""
        return (self.arch, self.batch_size, self.precision, self.image_size, self.num_classes,
                self.channels, self.width, self.stem, self.cardinality, self.base_width,
                self.grouped_conv, self.stem_conv, self.conv, self.source_size, self.seed,
                self.train_examples, self.eval_examples)


def check_case(case: Case, mesh: Mesh) -> None:
    """Raises a one-line UserError for a case the trainer would refuse."""
    config = validate(case.config())
    model = train_lib.build_model(config, case.num_classes)
    if case.image_size < models.min_image_size(model):
        raise UserError(f"--image_size {case.image_size} is too small for {case.arch} with the "
                        f"{case.stem} stem; use at least {models.min_image_size(model)}")
    if case.batch_size > case.train_examples:
        raise UserError(f"--batch_size {case.batch_size} exceeds the {case.train_examples} "
                        "synthetic training examples; raise --train_examples")
    if case.batch_size % mesh.size:
        raise UserError(f"--batch_size {case.batch_size} is not divisible by the {mesh.size} "
                        "devices; use a multiple of the device count")


def synthetic_dataset(case: Case, mesh: Mesh) -> train_lib.DeviceData:
    """Random uint8 images and labels shaped like Fashion-MNIST, replicated like the real set."""
    rng = np.random.default_rng(case.seed)
    shape = (case.source_size, case.source_size, case.channels)
    host = train_lib.DeviceData(
        train_images=rng.integers(0, 256, (case.train_examples, *shape), np.uint8),
        train_labels=rng.integers(0, case.num_classes, case.train_examples).astype(np.int32),
        test_images=rng.integers(0, 256, (case.eval_examples, *shape), np.uint8),
        test_labels=rng.integers(0, case.num_classes, case.eval_examples).astype(np.int32))
    return train_lib.replicate(host, mesh)


def _cost_flops(cost: Any) -> float | None:
    # cost_analysis() gave a list of dicts (one per program) in older jax, a dict since.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


def _cpu_device() -> Any | None:
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU
        return None


_TRAIN_FLOPS_CACHE: dict[tuple, float | None] = {}


def train_step_flops(case: Case) -> float | None:
    """XLA's FLOP count of one train step as the trainer runs it, per image (cached).

    Per image the count does not depend on the batch size (1.5831 vs 1.5829 GFLOP at 128 and
    1024 for the chapter's ResNet-18), so it is counted once at the first batch size seen: should
    a jax version need the compile fallback below, that compile happens once, not per batch.
    """
    key = (case.arch, case.precision, case.image_size, case.num_classes, case.channels,
           case.width, case.stem, case.cardinality, case.base_width, case.source_size)
    if key not in _TRAIN_FLOPS_CACHE:
        _TRAIN_FLOPS_CACHE[key] = _count_train_step_flops(case)
    return _TRAIN_FLOPS_CACHE[key]


def _count_train_step_flops(case: Case) -> float | None:
    """The count behind `train_step_flops`.

    Lowers the loop's single-step path (gather, resize, forward, backward, SGD update) for the
    host CPU and asks XLA's HLO cost analysis, which needs no compilation: the CUDA plugin does
    not offer cost analysis before compilation, and compiling the step a second time on the GPU
    would cost as much as the measurement itself. The count is of the unoptimised program, so it
    is the model's arithmetic, independent of which kernels the GPU compiler later picks.
    """
    cpu = _cpu_device()
    mesh = train_lib.make_mesh([cpu] if cpu is not None else None)
    # The model's FLOPs: a space-to-depth stem multiplies by its kernel's zero padding too, and
    # XLA counts an im2col product's FLOPs otherwise than the same convolution's.
    config = case.config().replace(stem_conv="direct", conv="xla")
    model = train_lib.build_model(config, case.num_classes)
    tx = create_optimizer(config, max(1, case.train_examples // case.batch_size))
    _, abstract = train_lib._initializer(config, model, tx, case.channels, mesh)
    replicated = NamedSharding(mesh, P())

    def sds(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)

    image = (case.source_size, case.source_size, case.channels)
    ddata = train_lib.DeviceData(sds((case.train_examples, *image), jnp.uint8),
                                 sds((case.train_examples,), jnp.int32),
                                 sds((case.eval_examples, *image), jnp.uint8),
                                 sds((case.eval_examples,), jnp.int32))
    state = train_lib.TrainState(apply_fn=model.apply, tx=tx, **abstract["state"])
    loop = train_lib.make_train_loop(mesh, batch_size=case.batch_size,
                                     image_size=case.image_size, seed=case.seed,
                                     dtype=train_lib.compute_dtype(config))
    step = jax.jit(lambda s, a, d, p, i: loop(s, a, d, p, i, 1))
    lowered = step.lower(state, abstract["accum"], ddata, sds((case.batch_size,), jnp.int32),
                         sds((), jnp.int32))
    try:
        flops = _cost_flops(lowered.cost_analysis())
    except NotImplementedError:  # a backend without pre-compilation analysis: compile it
        flops = _cost_flops(lowered.compile().cost_analysis())
    return flops / case.batch_size if flops else None


_FORWARD_CACHE: dict[tuple, dict] = {}


def forward_flops(case: Case) -> dict[str, Any]:
    """`models.model_flops` (forward FLOPs per image and parameters) of the case's model, cached
    per model and input shape: the count depends on neither the backend nor the precision."""
    key = (case.arch, case.num_classes, case.width, case.stem, case.cardinality, case.base_width,
           case.image_size, case.channels)
    if key not in _FORWARD_CACHE:
        model = train_lib.build_model(case.config().replace(precision="fp32"), case.num_classes)
        shape = (1, case.image_size, case.image_size, case.channels)
        _FORWARD_CACHE[key] = models.model_flops(model, shape)
    return _FORWARD_CACHE[key]


def _counted(what: str, count: Callable[[Case], Any], case: Case) -> Any:
    """`count(case)`, or None with a warning: a FLOP count is not worth losing the timings for
    (an accelerator session is short, and JAX's cost-analysis APIs change between versions)."""
    try:
        return count(case)
    except Exception as e:  # deliberately broad: see the docstring
        print(f"warning: no {what} for {case.arch}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def _peak_bytes(device: Any) -> int | None:
    stats = device.memory_stats()  # None on the CPU backend
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _program_memory(group: _Group, case: Case) -> dict[str, int]:
    """XLA's own account of the train program's device memory (`memory_analysis()`): what the
    program needs while it runs, on any backend, unlike the allocator's high-water mark, which
    also holds what compilation (cuDNN's autotuning) allocated. The call that was timed already
    compiled the program, so lowering it again finds it in jit's cache: nothing is compiled."""
    stats = group.train_loop.lower(group.state, group.accum, group.ddata, group.perm,
                                   case.steps_per_dispatch).compile().memory_analysis()
    parts = {"program_argument_bytes": int(stats.argument_size_in_bytes),
             "program_output_bytes": int(stats.output_size_in_bytes),
             # Outputs written into donated inputs' buffers (the state): counted once.
             "program_alias_bytes": int(stats.alias_size_in_bytes),
             "program_temp_bytes": int(stats.temp_size_in_bytes)}
    parts["program_bytes"] = (parts["program_argument_bytes"] + parts["program_output_bytes"]
                              - parts["program_alias_bytes"] + parts["program_temp_bytes"])
    return parts


class _Group:
    """What cases differing only in steps per dispatch share: model, state, jitted loops, data."""

    def __init__(self, case: Case, mesh: Mesh, ddata: train_lib.DeviceData) -> None:
        config = case.config()
        self.dtype = train_lib.compute_dtype(config)
        model = train_lib.build_model(config, case.num_classes)
        tx = create_optimizer(config, max(1, case.train_examples // case.batch_size))
        init, _ = train_lib._initializer(config, model, tx, case.channels, mesh)
        tree = init()
        self.state = train_lib.TrainState(apply_fn=model.apply, tx=tx, **tree["state"])
        self.accum = tree["accum"]
        self.ddata = ddata
        # An epoch's order, as the trainer's epoch_permutation gives (int32 [num_train]).
        order = np.random.default_rng(case.seed + 1).permutation(case.train_examples)
        self.perm = train_lib.replicate(order.astype(np.int32), mesh)
        # One loop object per group, as in the trainer: its looped program takes the step count
        # as a traced value, so every steps_per_dispatch > 1 shares one compilation.
        self.train_loop = train_lib.make_train_loop(
            mesh, batch_size=case.batch_size, image_size=case.image_size, seed=case.seed,
            dtype=self.dtype, compiler_options=compiler_options(case.conv))
        self.eval_result: dict | None = None


def _time_eval(group: _Group, case: Case, mesh: Mesh) -> dict:
    """Compile time and steady images/s of make_eval_loop over the synthetic test split."""
    evaluate = train_lib.make_eval_loop(mesh, image_size=case.image_size, dtype=group.dtype,
                                        compiler_options=compiler_options(case.conv))
    idx, mask = train_lib.replicate(data_lib.eval_batches(case.eval_examples, case.batch_size),
                                    mesh)
    with CompileTimer() as timer:
        jax.block_until_ready(evaluate(group.state, group.ddata, idx, mask))
    times = []
    for _ in range(case.repeats):
        start = time.perf_counter()
        jax.block_until_ready(evaluate(group.state, group.ddata, idx, mask))
        times.append(time.perf_counter() - start)
    return {"eval_compile_s": timer.seconds,
            "eval_images_per_sec": case.eval_examples / statistics.median(times)}


def _train_chunk(group: _Group, case: Case, start: int) -> Any:
    """One dispatch of the train loop: `steps_per_dispatch` steps from step `start` of the
    permutation, the group's state threaded through; returns the chunk's summed loss."""
    group.state, group.accum, loss = group.train_loop(
        group.state, group.accum, group.ddata, group.perm, np.int32(start),
        np.int32(case.steps_per_dispatch))
    return loss


def train_stepper(case: Case, mesh: Mesh) -> Callable[[int], None]:
    """`run(n)`: n more dispatches (of `steps_per_dispatch` steps) of the trainer's loop on the
    case's synthetic data, returning once they are done (for timing it against other code)."""
    group = _Group(case, mesh, synthetic_dataset(case, mesh))
    wrap = max(1, case.train_examples // case.batch_size - case.steps_per_dispatch + 1)
    done = 0

    def run(dispatches: int) -> None:
        nonlocal done
        for _ in range(dispatches):
            loss = _train_chunk(group, case, done * case.steps_per_dispatch % wrap)
            done += 1
        jax.block_until_ready((group.state, loss))

    return run


def _time_train(group: _Group, case: Case) -> dict:
    """Compile time and steady images/s of the train loop at the case's steps per dispatch.

    Dispatches like `train_and_evaluate`: chunks of `steps_per_dispatch` steps, the state donated
    and threaded through, and the previous chunk's loss read back after the next chunk is queued
    (the trainer's progress bar does this), so the host runs at most one chunk ahead.
    """
    spd = case.steps_per_dispatch
    dispatches = max(1, math.ceil(case.steps / spd))
    steps = dispatches * spd
    # Like an epoch's chunks, dispatch k starts at step k * spd of the permutation, wrapping
    # round before it would run off the end (a chunk longer than the epoch reads the last batch
    # again: dynamic_slice clamps). The permutation's shape never changes, so every
    # steps_per_dispatch > 1 of a group runs the one compiled loop.
    wrap = max(1, case.train_examples // case.batch_size - spd + 1)

    def chunk(k: int) -> Any:
        return _train_chunk(group, case, k * spd % wrap)

    start = time.perf_counter()
    with CompileTimer() as timer:
        loss = chunk(0)
        jax.block_until_ready((group.state, group.accum, loss))
    first = time.perf_counter() - start

    times, losses = [], []
    for _ in range(case.repeats):
        start = time.perf_counter()
        pending = None
        for k in range(dispatches):
            loss = chunk(k)
            if pending is not None:
                losses.append(float(pending) / spd)
            pending = loss
        jax.block_until_ready((group.state, group.accum, pending))
        times.append(time.perf_counter() - start)
        losses.append(float(pending) / spd)
    per_dispatch = statistics.median(times) / dispatches
    rates = [steps * case.batch_size / t for t in times]
    # Both from the median time, so that img/s and ms/step agree with an even number of repeats.
    return {"steps": steps, "dispatches": dispatches,
            "compile_s": timer.seconds, "compiled": timer.backend_compiles > 0,
            # The fallback estimate: what the first dispatch cost beyond a steady one.
            "first_dispatch_overhead_s": max(0.0, first - per_dispatch),
            "train_images_per_sec": steps * case.batch_size / statistics.median(times),
            "train_images_per_sec_repeats": rates,
            "step_time_ms": 1e3 * statistics.median(times) / steps,
            "final_loss": losses[-1]}


# ----------------------------------------------------------------------------------------------
# Where a step's device time goes


def case_name(case: Case) -> str:
    return f"{case.arch}_{case.precision}_b{case.batch_size}_spd{case.steps_per_dispatch}"


def _profile_train(group: _Group, case: Case, trace_dir: Path) -> dict:
    """Traces one more dispatch of the train loop with `jax.profiler` into `trace_dir` (open it
    in TensorBoard's profile plugin, or its trace.json.gz in ui.perfetto.dev) and summarises it
    with `device_time_by_op`."""
    with jax.profiler.trace(str(trace_dir)):
        jax.block_until_ready((_train_chunk(group, case, 0), group.state))
    return {"case": case_name(case), "trace_dir": str(trace_dir),
            **device_time_by_op(trace_dir, steps=case.steps_per_dispatch)}


def _op_kind(op: str, kernel: str) -> str:
    """The kind of the XLA instruction `op` that launched `kernel`: its name without the number
    ("cudnn-conv-bw-filter.3" -> "cudnn-conv-bw-filter"). Kernels replayed from a CUDA graph
    all name their graph's instruction ("command_buffer_12"); the kernel's own name, a fusion's
    ("loop_add_fusion_3"), says more."""
    name = kernel if op.startswith("command_buffer") else op
    return re.sub(r"[._]\d+$", "", name)


def device_time_by_op(trace_dir: str | Path, steps: int = 1, top: int = 12) -> dict:
    """Device time per train step by XLA instruction kind, from a `jax.profiler` trace.

    Reads the newest ``plugins/profile/*/*.trace.json.gz`` under `trace_dir`. On a GPU it sums
    the kernels on the device's streams (grouped by the XLA instruction that launched them);
    on a CPU, the host threads' XLA thunks. Kernels on concurrent streams count in full, so
    the busy time can exceed the wall time of the step.

    Returns ``{"device_ms_per_step", "kinds": [{"kind", "ms_per_step", "share", "count"}, ...]}``
    with the `top` kinds by time (``count``: instructions of that kind per step).
    """
    traces = sorted(Path(trace_dir).glob("plugins/profile/*/*.trace.json.gz"),
                    key=lambda p: p.stat().st_mtime)
    if not traces:
        raise UserError(f"no profiler trace under {trace_dir}")
    with gzip.open(traces[-1], "rb") as f:
        events = json.load(f)["traceEvents"]
    meta = {(e["pid"], e.get("tid"), e["name"]): e["args"].get("name", "")
            for e in events if e.get("ph") == "M" and "args" in e}
    devices = {pid for (pid, _, kind), name in meta.items()
               if kind == "process_name" and name.startswith("/device:")}
    # A device's streams; XLA's derived "XLA Ops"/"XLA Modules" lines would count twice.
    streams = {(pid, tid) for (pid, tid, kind), name in meta.items()
               if pid in devices and kind == "thread_name" and name.startswith("Stream")}
    kinds: dict[str, dict] = {}
    for e in events:
        if e.get("ph") != "X":
            continue
        args = e.get("args", {})
        if devices:
            if e["pid"] not in devices or (streams and (e["pid"], e.get("tid")) not in streams):
                continue
        elif "hlo_op" not in args:
            continue
        kind = _op_kind(args.get("hlo_op", e["name"]), e["name"])
        row = kinds.setdefault(kind, {"kind": kind, "us": 0.0, "count": 0})
        row["us"] += float(e.get("dur", 0.0))
        row["count"] += 1
    # Per device: with N GPUs each step runs N copies of every kernel.
    per = steps * max(1, len(devices))
    total = sum(r["us"] for r in kinds.values())
    rows = sorted(kinds.values(), key=lambda r: -r["us"])[:top]
    return {"device_ms_per_step": total / 1e3 / per,
            "kinds": [{"kind": r["kind"], "ms_per_step": r["us"] / 1e3 / per,
                       "share": r["us"] / total if total else 0.0,
                       "count": r["count"] / per} for r in rows]}


def profile_line(r: dict) -> str:
    """The profile of a result as one comment line for the table."""
    p = r["profile"]
    top = ", ".join(f"{k['kind']} {k['ms_per_step']:.3f} ({100 * k['share']:.0f}%)"
                    for k in p["kinds"][:6])
    return (f"# profile {p['case']}: device {p['device_ms_per_step']:.3f} ms/step of "
            f"{r['step_time_ms']:.3f}; "
            f"{top} (trace: {p['trace_dir']})")


def run_cases(cases: list[Case], mesh: Mesh | None = None,
              profile_dir: str | Path | None = None) -> Iterator[dict]:
    """Yields one result dict per case, in order; cases of one group should be adjacent.

    With `profile_dir`, each case also traces one dispatch after its timing into
    ``profile_dir/<case_name>`` and its result holds ``profile`` (`device_time_by_op`).
    """
    mesh = mesh if mesh is not None else train_lib.make_mesh()
    for case in cases:
        check_case(case, mesh)
    device = mesh.devices.flat[0]
    datasets: dict[tuple, train_lib.DeviceData] = {}
    group_key, group, flops = None, None, None
    for case in cases:
        # peak_bytes_in_use is the high-water mark since the process started: it belongs to this
        # case only if this case (with its group's state, for the group's first case) raised it.
        peak_before = None
        if case.group != group_key:
            group_key, group = None, None
            gc.collect()  # free the previous group's state before this one allocates its own
            peak_before = _peak_bytes(device)
            data_key = (case.train_examples, case.eval_examples, case.source_size,
                        case.channels, case.num_classes, case.seed)
            if data_key not in datasets:
                datasets = {data_key: synthetic_dataset(case, mesh)}
            group_key, group = case.group, _Group(case, mesh, datasets[data_key])
            # Independent of steps per dispatch, so counted once per group.
            flops = _counted("train-step FLOP count", train_step_flops, case)
        else:
            peak_before = _peak_bytes(device)
        result = _time_train(group, case)
        memory = _counted("memory analysis", functools.partial(_program_memory, group), case)
        result.update(memory or {"program_bytes": None})
        if profile_dir is not None:
            result["profile"] = _profile_train(group, case, Path(profile_dir) / case_name(case))
        if group.eval_result is None:
            group.eval_result = _time_eval(group, case, mesh)
        peak = _peak_bytes(device)
        fwd = _counted("forward FLOP count", forward_flops, case) or {"flops": None,
                                                                       "params": None}
        achieved = flops * result["train_images_per_sec"] / 1e12 if flops else None
        kind = device.device_kind
        peak_chip = peak_tflops(kind, case.precision)
        yield {
            **dataclasses.asdict(case), **result, **group.eval_result,
            # What "auto" resolved to on this backend.
            "stem_conv_used": models.resolve_stem_conv(case.stem_conv, case.stem),
            "conv_used": models.resolve_conv(case.conv),
            "peak_bytes": peak, "peak_bytes_exact": (None if peak is None else
                                                     peak_before is None or peak > peak_before),
            "train_flops_per_image": flops, "forward_flops_per_image": fwd["flops"],
            "params": fwd["params"], "achieved_tflops": achieved,
            "peak_tflops_per_chip": peak_chip, "peak_kind": peak_kind(case.precision),
            "mfu": (achieved / (peak_chip * mesh.size) if achieved and peak_chip else None),
            "platform": device.platform, "device_kind": kind, "devices": mesh.size,
            "jax_version": jax.__version__,
        }


# ----------------------------------------------------------------------------------------------
# Formatting


def _fmt_bytes(n: int | None, exact: bool | None) -> str:
    if n is None:
        return "n/a"
    size = f"{n / 2**30:.2f}G" if n >= 2**30 else f"{n / 2**20:.0f}M"
    return f"{'' if exact else '<='}{size}"


def _fmt(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


TABLE_COLUMNS: tuple[tuple[str, int], ...] = (
    ("arch", 10), ("prec", 4), ("batch", 5), ("spd", 4), ("conv", 6), ("compile_s", 9),
    ("train_img/s", 11), ("ms/step", 8), ("eval_img/s", 10), ("prog_mem", 8), ("peak_mem", 8),
    ("GF/img", 6), ("fwdGF", 6), ("TFLOP/s", 7), ("MFU", 6),
)


def table_header() -> str:
    return "  ".join(f"{name:>{w}}" if i else f"{name:<{w}}"
                     for i, (name, w) in enumerate(TABLE_COLUMNS))


def table_row(r: dict) -> str:
    """One aligned row; `compile_s` shows "shared" where an earlier case compiled the program."""
    gf, fwd = r["train_flops_per_image"], r["forward_flops_per_image"]
    cells = (
        r["arch"], r["precision"], str(r["batch_size"]), str(r["steps_per_dispatch"]),
        r["conv_used"], f"{r['compile_s']:.1f}" if r["compiled"] else "shared",
        f"{r['train_images_per_sec']:,.0f}", f"{r['step_time_ms']:.2f}",
        f"{r['eval_images_per_sec']:,.0f}", _fmt_bytes(r["program_bytes"], True),
        _fmt_bytes(r["peak_bytes"], r["peak_bytes_exact"]),
        _fmt(gf and gf / 1e9, ".3f"), _fmt(fwd and fwd / 1e9, ".3f"),
        _fmt(r["achieved_tflops"], ".1f" if (r["achieved_tflops"] or 0) >= 10 else ".3g"),
        _fmt(r["mfu"] and 100 * r["mfu"], ".1f"),
    )
    if r["mfu"] is not None:
        cells = (*cells[:-1], cells[-1] + "%")
    return "  ".join(f"{c:>{w}}" if i else f"{c:<{w}}"
                     for i, (c, (_, w)) in enumerate(zip(cells, TABLE_COLUMNS, strict=True)))


def table_legend() -> str:
    return ("compile_s: trace+lower+XLA compile of the train loop; train_img/s: median of repeats; "
            "GF/img: XLA count of one train step per image; fwdGF: models.model_flops forward; "
            "MFU: TFLOP/s over the chip's dense peak (bf16, or TF32 for fp32, which XLA runs as "
            "TF32 by default); prog_mem: the train program's device memory by XLA's buffer "
            "assignment (arguments + outputs - donated + temporaries); peak_mem: the "
            "allocator's high-water mark, compilation's scratch included; '<=': set by an "
            "earlier case")


# ----------------------------------------------------------------------------------------------
# End to end


def end_to_end(config: Config) -> dict:
    """Runs `train_and_evaluate(config)` in a fresh workdir and summarises its records.

    The wall time includes compiling from scratch: `--compilation_cache=auto` means no cache
    here; name a folder to time a run that finds its programs compiled.
    """
    if config.compilation_cache == "auto":
        config = config.replace(compilation_cache="off")
    workdir = Path(config.workdir)
    if (workdir / "config.json").exists() or (workdir / "checkpoints").exists():
        raise UserError(f"--workdir {workdir} already holds a run, which would be resumed; "
                        "end-to-end timing needs an empty or new folder")
    start = time.perf_counter()
    last = train_lib.train_and_evaluate(config)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in
               (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    reached = [r["epoch"] for r in records if r["val_accuracy"] >= TARGET_ACCURACY]
    return {
        "wall_time_s": wall, "epochs": [
            {k: r[k] for k in ("epoch", "train_loss", "val_accuracy", "images_per_sec",
                               "train_time", "eval_time", "wall_time")} for r in records],
        "final_val_accuracy": last.get("val_accuracy"), "target_accuracy": TARGET_ACCURACY,
        "reached_target": bool(last) and last["val_accuracy"] >= TARGET_ACCURACY,
        "first_epoch_at_target": reached[0] if reached else None,
        "config": dataclasses.asdict(config), "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "jax_version": jax.__version__,
        # SIGTERM/SIGINT stopped it before its last step: its times are not the run's.
        "stopped": not last or bool(last.get("stopped")),
    }


def temporary_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="resnet_jax_e2e_")
