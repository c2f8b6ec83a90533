"""The chapter's questions as named experiments, run and reported from the typed Config.

An experiment is one table of training configurations ("rows") sharing a recipe. For a preset
(``tiny``: CI smoke, seconds per run; ``cpu``: minutes per run on a laptop; ``gpu``: the real
thing) and a number of seeds, :func:`run_experiment` trains every row and seed one after another
with :func:`resnet_jax.train.train_and_evaluate`, each in its own workdir::

    RUNS_DIR/NAME/PRESET/ROW-seedK/     config.json, metrics.jsonl, checkpoints/, ...

A run whose workdir already holds its final record is skipped (never retrained); an unfinished one
resumes from its last checkpoint; a new one whose very settings and seed another experiment already
ran to the end (resnet18 with the chapter's recipe is in five) takes that run's records instead of
training again (``find_twin``). :func:`write_report` then reads those workdirs and writes::

    OUT/NAME/PRESET/table.md, results.csv, results.json and the experiment's plots (PNG)

A run's settings are merged in this order, later entries winning: Config's defaults (the chapter's
run), the preset, the experiment's recipe, the experiment's per-preset settings, the row's
settings, the row's per-preset settings. Every setting is a Config field.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import statistics
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from resnet_jax.config import IDENTITY_FIELDS, Config, validate
from resnet_jax.config import identity_diff as config_identity_diff
from resnet_jax.errors import UserError

CONFIG_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))

# ------------------------------------------------------------------------------------------------
# Recipes and presets.

# The chapter's recipe (D2L 8.6) is Config's defaults: plain SGD, learning rate 0.01 (constant),
# batch 128, no augmentation, no weight decay.
CHAPTER_RECIPE: dict[str, Any] = {}

# A better recipe: augmentation (random crop + flip), SGD with momentum, cosine schedule after a
# linear warm-up, label smoothing and weight decay, at batch 128.
IMPROVED_RECIPE: dict[str, Any] = {
    "optimizer": "momentum", "momentum": 0.9, "learning_rate": 0.1, "weight_decay": 5e-4,
    "schedule": "cosine", "warmup_epochs": 1.0, "label_smoothing": 0.1, "augment": True,
}

PRESETS: dict[str, dict[str, Any]] = {
    # CI smoke: 16x16, 8 steps per epoch, evaluated on 1,000 test images (the whole split took
    # 30 s per epoch for ResNeXt-50 here); compilation dominates (seconds per run).
    "tiny": {"image_size": 16, "stem": "small", "width": 4, "batch_size": 32,
             "train_examples": 256, "eval_examples": 1000, "epochs": 2},
    # A laptop CPU: the chapter's network (7x7/2 stem + max-pool) at the native 28x28, a quarter of
    # the width, the first 8192 training images, 4 epochs (minutes per run).
    "cpu": {"image_size": 28, "stem": "imagenet", "width": 16, "train_examples": 8192,
            "epochs": 4},
    # One GPU: the chapter's setting, 96x96, full width, all 60,000 training images, 10 epochs.
    "gpu": {"image_size": 96, "stem": "imagenet", "width": 64, "train_examples": None,
            "epochs": 10},
}

# Longer training for the recipe comparison (the GPU target is >= 0.950 test accuracy).
_LONG = {"tiny": {"epochs": 8}, "cpu": {"epochs": 16}, "gpu": {"epochs": 50}}
# On the gpu preset the improved rows are the README's recipe command, which reached 0.9508 and
# 0.9526 on an H200: Nesterov momentum, 2 warm-up epochs, bf16 (the chapter's rows stay fp32).
_IMPROVED_LONG = {**_LONG, "gpu": {**_LONG["gpu"], "optimizer": "nesterov",
                                   "warmup_epochs": 2.0, "precision": "bf16"}}


# ------------------------------------------------------------------------------------------------
# The table of experiments.


@dataclass(frozen=True)
class Row:
    """One training configuration of an experiment.

    Attributes:
        name: the row's key in tables and its workdir name (with ``-seedK``).
        settings: Config fields over the recipe and preset.
        per_preset: preset -> settings over ``settings`` for that preset only.
        group: the panel of the curve plots the row is drawn in.
        x: the row's position on a sweep plot's x axis (e.g. the cardinality).
    """

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    per_preset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    group: str = ""
    x: float | None = None


@dataclass(frozen=True)
class Plot:
    """One PNG of an experiment.

    ``kind``: ``curves`` (metrics by epoch, one line per row, one column of panels per row group),
    ``scatter`` (a summary metric against ``x``, points annotated with the row names) or ``sweep``
    (summary metrics against ``x``, lines with error bars). ``panels``: the metrics of each panel.
    ``x``: a summary key (``flops``, ``params``, ``images_per_sec``) or ``row`` for ``Row.x``.
    """

    kind: str
    file: str
    panels: tuple[tuple[str, ...], ...]
    x: str = "epoch"
    x_label: str = ""
    log_x: bool = False


@dataclass(frozen=True)
class Experiment:
    """A named list of rows that share a recipe, and how to plot them.

    Attributes:
        name: the CLI name and the folder name.
        question: what the experiment asks, for the report.
        design: why the rows are what they are (choices a reader should know).
        rows: the configurations.
        plots: the figures written with the table.
        recipe: Config fields shared by every row (over the preset).
        per_preset: preset -> settings over the recipe for that preset only.
        flops_matched: rows meant to cost the same; the dry run reports their FLOPs spread.
        flops_tolerance: allowed max/min - 1 of the matched rows' FLOPs (at the cpu and gpu
            presets; the tiny preset's maps are too small to keep the match).
    """

    name: str
    question: str
    design: str
    rows: tuple[Row, ...]
    plots: tuple[Plot, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    per_preset: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    flops_matched: tuple[str, ...] = ()
    flops_tolerance: float = 0.15


_CURVES = (("train_loss",), ("val_accuracy",))

EXPERIMENTS: tuple[Experiment, ...] = (
    Experiment(
        "degradation",
        "Does a deeper plain network train worse than a shallower one, and do shortcuts fix it?",
        "He et al. 2016, Fig. 4: plain18/plain34 are resnet18/resnet34 without any shortcut "
        "(same layers, same FLOPs but the 1x1 projections). The chapter's recipe for all four.",
        (Row("plain18", {"arch": "plain18"}, group="plain"),
         Row("plain34", {"arch": "plain34"}, group="plain"),
         Row("resnet18", {"arch": "resnet18"}, group="residual"),
         Row("resnet34", {"arch": "resnet34"}, group="residual")),
        (Plot("curves", "train_loss.png", _CURVES),),
        recipe=CHAPTER_RECIPE,
    ),
    Experiment(
        "depth",
        "How do accuracy, parameters, FLOPs and throughput change across He et al.'s Table 1?",
        "resnet18/34 use basic blocks, resnet50/101/152 bottleneck blocks; the chapter's recipe, "
        "same epochs for all.",
        tuple(Row(f"resnet{d}", {"arch": f"resnet{d}"}) for d in (18, 34, 50, 101, 152)),
        (Plot("scatter", "accuracy_vs_flops.png", (("val_accuracy",),), x="flops", log_x=True),
         Plot("scatter", "accuracy_vs_throughput.png", (("val_accuracy",),),
              x="images_per_sec", log_x=True)),
        recipe=CHAPTER_RECIPE,
    ),
    Experiment(
        "bottleneck",
        "Bottleneck or basic blocks, at comparable depth and cost?",
        "resnet34 (16 basic blocks) against resnet50, which is He et al.'s own pairing: the same "
        "3-4-6-3 stages with every 2-layer basic block replaced by a 3-layer bottleneck. "
        "resnet50-narrow is resnet50 at the width whose FLOPs match resnet34's at the preset's "
        "input size (gpu: width 56 for 64; cpu: 12 for 16; tiny: 3 for 4).",
        (Row("resnet34", {"arch": "resnet34"}),
         Row("resnet50", {"arch": "resnet50"}),
         Row("resnet50-narrow", {"arch": "resnet50"},
             per_preset={"gpu": {"width": 56}, "cpu": {"width": 12}, "tiny": {"width": 3}})),
        (Plot("curves", "curves.png", _CURVES),
         Plot("scatter", "accuracy_vs_flops.png", (("val_accuracy",),), x="flops", log_x=True)),
        recipe=CHAPTER_RECIPE, flops_matched=("resnet34", "resnet50-narrow"),
        flops_tolerance=0.05,
    ),
    Experiment(
        "preact",
        "Pre-activation (BN-ReLU-conv, He et al. 2016b) or post-activation blocks, at 18 and 50 "
        "layers?",
        "Each pair has the same layers and parameters; only the order of BN, ReLU and the "
        "addition differs. The chapter's recipe.",
        (Row("resnet18", {"arch": "resnet18"}, group="18 layers"),
         Row("preact_resnet18", {"arch": "preact_resnet18"}, group="18 layers"),
         Row("resnet50", {"arch": "resnet50"}, group="50 layers"),
         Row("preact_resnet50", {"arch": "preact_resnet50"}, group="50 layers")),
        (Plot("curves", "curves.png", _CURVES),),
        recipe=CHAPTER_RECIPE,
    ),
    Experiment(
        "cardinality",
        "At a fixed cost, does splitting the bottleneck into more groups (ResNeXt's cardinality C) "
        "help, and what does it do to throughput?",
        "ResNeXt-50 templates of Xie et al. 2017, Table 2: (C, d) = (1, 64), (2, 40), (4, 24), "
        "(8, 14), (32, 4), where d is the width of one group at the first stage; C=1 is resnet50. "
        "The bottleneck widths keep FLOPs about equal only where the feature maps are larger "
        "than the 3x3 kernels: at 28x28 with the 7x7/2 stem (maps 7-4-2-1) the FLOPs of C=32 "
        "exceed C=1's by 26%, so the cpu preset uses 20x20 input with the small stem "
        "(maps 20-10-5-3: 13%). The tiny preset uses width 16 so that d=4 gives at least "
        "one channel per group. Grouped convs run as Config.grouped_conv=auto picks: one "
        "convolution per group on a CPU (with XLA:CPU's own grouped convolution these models "
        "train 3-12x slower here, see throughput.md), cuDNN's grouped convolution on a GPU.",
        tuple(Row(f"{c}x{d}d", {"arch": "resnet50", "cardinality": c, "base_width": d}, x=c)
              for c, d in ((1, 64), (2, 40), (4, 24), (8, 14), (32, 4))),
        (Plot("sweep", "cardinality.png",
              (("val_accuracy",), ("images_per_sec",), ("flops",)), x="row",
              x_label="cardinality C", log_x=True),),
        recipe=CHAPTER_RECIPE,
        per_preset={"cpu": {"image_size": 20, "stem": "small", "width": 16},
                    "tiny": {"width": 16}},
        flops_matched=("1x64d", "2x40d", "4x24d", "8x14d", "32x4d"), flops_tolerance=0.15,
    ),
    Experiment(
        "capacity",
        "As the model grows, how do training and validation accuracy (and their gap) move?",
        "resnet18 at first-stage widths 4 to 64 (later stages double; about 16x the parameters per "
        "4x width), the chapter's recipe with no augmentation or weight decay, so nothing holds "
        "back over-fitting. The tiny preset divides every width by 4.",
        tuple(Row(f"width{w}", {"arch": "resnet18", "width": w},
                  per_preset={"tiny": {"width": max(1, w // 4)}}, x=w)
              for w in (4, 8, 16, 32, 64)),
        (Plot("sweep", "gap.png", (("train_accuracy", "val_accuracy"), ("gap",)), x="params",
              log_x=True),),
        recipe=CHAPTER_RECIPE,
    ),
    Experiment(
        "recipe",
        "How much does a better training recipe add to ResNet-18, and how much of it is just "
        "training longer?",
        "chapter: the chapter's recipe (SGD, lr 0.01, constant) for the preset's epochs; "
        "chapter-long: the same recipe for as many epochs as improved; improved: random crop + "
        "flip, momentum 0.9, lr 0.1 with 1 warm-up epoch then cosine decay, label smoothing 0.1, "
        "weight decay 5e-4 (gpu: 50 epochs, with Nesterov momentum, 2 warm-up epochs and bf16 as "
        "the README's recipe command; target >= 0.950 test accuracy); improved+erasing: "
        "the same plus random erasing (Zhong et al.) with probability 0.5. Training loss is "
        "not comparable across recipes (label smoothing), so the plot shows validation metrics.",
        (Row("chapter", CHAPTER_RECIPE),
         Row("chapter-long", CHAPTER_RECIPE, per_preset=_LONG),
         Row("improved", IMPROVED_RECIPE, per_preset=_IMPROVED_LONG),
         Row("improved+erasing", {**IMPROVED_RECIPE, "random_erasing": 0.5},
             per_preset=_IMPROVED_LONG)),
        (Plot("curves", "curves.png", (("val_accuracy",), ("val_loss",))),),
        recipe={"arch": "resnet18"},
    ),
)


def experiment_names() -> list[str]:
    return [e.name for e in EXPERIMENTS]


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``; a one-line UserError naming the valid ones otherwise."""
    for experiment in EXPERIMENTS:
        if experiment.name == name:
            return experiment
    raise UserError(f"unknown experiment {name!r}; valid: {', '.join(experiment_names())}, all")


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise UserError(f"unknown --preset {preset!r}; valid: {', '.join(PRESETS)}")
    return preset


# ------------------------------------------------------------------------------------------------
# Runs: one row, one seed, one workdir.


@dataclass(frozen=True)
class Run:
    """One training run: a row of an experiment at a preset and seed."""

    experiment: Experiment
    row: Row
    preset: str
    seed: int
    settings: Mapping[str, Any]  # every Config field the run overrides
    workdir: Path

    @property
    def name(self) -> str:
        return f"{self.row.name}-seed{self.seed}"

    def config(self) -> Config:
        """The run's Config, validated (a UserError if not valid)."""
        return validate(Config(**self.settings))


def row_settings(experiment: Experiment, row: Row, preset: str) -> dict[str, Any]:
    """The settings of ``row`` at ``preset``, merged as the module docstring says."""
    check_preset(preset)
    settings: dict[str, Any] = {}
    for layer in (PRESETS[preset], experiment.recipe, experiment.per_preset.get(preset, {}),
                  row.settings, row.per_preset.get(preset, {})):
        settings.update(layer)
    unknown = sorted(set(settings) - CONFIG_FIELDS)
    if unknown:
        raise UserError(f"experiment {experiment.name!r} row {row.name!r} sets unknown "
                        f"setting(s) {', '.join(unknown)}")
    return settings


def plan(experiment: Experiment, preset: str, seeds: int, runs_dir: str | Path,
         data_dir: str | None = None, rows: Sequence[str] | None = None) -> list[Run]:
    """The runs of ``experiment`` (all rows, or only ``rows``) for seeds 0 .. seeds - 1."""
    check_preset(preset)
    if not 0 < seeds <= 1000:
        raise UserError(f"--seeds must be in 1 .. 1000, got {seeds}")
    names = [r.name for r in experiment.rows]
    if rows:
        unknown = [r for r in rows if r not in names]
        if unknown:
            raise UserError(f"unknown row(s) {', '.join(unknown)} of experiment "
                            f"{experiment.name!r}; valid: {', '.join(names)}")
    selected = [r for r in experiment.rows if not rows or r.name in rows]
    base = Path(runs_dir) / experiment.name / preset
    runs = []
    for row in selected:
        settings = row_settings(experiment, row, preset)
        for seed in range(seeds):
            workdir = base / f"{row.name}-seed{seed}"
            runs.append(Run(experiment, row, preset, seed,
                            {**settings, "seed": seed, "data_dir": data_dir,
                             "workdir": str(workdir)}, workdir))
    return runs


def _setting(settings: Mapping[str, Any], key: str) -> Any:
    """A run's value of ``key``: its own, else Config's default."""
    return settings[key] if key in settings else getattr(Config(), key)


# ------------------------------------------------------------------------------------------------
# Models: parameters and FLOPs (cached per architecture, options and input size).

_COST_CACHE: dict[tuple, dict[str, Any]] = {}


# The Config fields that define a run's model and its input.
_MODEL_FIELDS = ("arch", "variant", "dataset", "image_size", "precision", "stem", "width",
                 "zero_init_residual", "cardinality", "base_width")


def _model_key(settings: Mapping[str, Any]) -> tuple:
    return tuple(_setting(settings, k) for k in _MODEL_FIELDS)


def _input_shape(settings: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """One image of the run's input: (1, image_size, image_size, channels)."""
    from resnet_jax import data as data_lib

    size = _setting(settings, "image_size")
    return (1, size, size, data_lib.get_spec(_setting(settings, "dataset")).image_shape[-1])


def build_model(settings: Mapping[str, Any]) -> Any:
    """The model a run trains: train.build_model of the run's settings."""
    from resnet_jax import data as data_lib
    from resnet_jax import train as train_lib

    config = Config(**{k: _setting(settings, k) for k in _MODEL_FIELDS})
    return train_lib.build_model(config, data_lib.get_spec(config.dataset).num_classes)


def model_cost(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"flops": forward FLOPs per image, "params": trainable parameters}`` of a run's model at
    its input size, from models.model_flops (an XLA compile of the forward pass; cached)."""
    from resnet_jax import models

    key = _model_key(settings)
    if key not in _COST_CACHE:
        _COST_CACHE[key] = models.model_flops(build_model(settings), _input_shape(settings))
    return _COST_CACHE[key]


_PARAMS_CACHE: dict[tuple, int] = {}


def check_model(settings: Mapping[str, Any]) -> int:
    """Builds the model, checks that the input size suits it and traces its initialisation
    (shapes only: ``jax.eval_shape``, which catches e.g. a zero bottleneck width); returns the
    number of parameters."""
    from resnet_jax import models

    key = _model_key(settings)
    if key not in _PARAMS_CACHE:
        model = build_model(settings)
        shape = _input_shape(settings)
        size = shape[1]
        if size < models.min_image_size(model):
            raise UserError(f"image_size {size} is too small for {model.block} blocks with the "
                            f"{model.stem} stem; use at least {models.min_image_size(model)}")
        try:
            variables = models.abstract_variables(model, shape)
        except ValueError as e:
            raise UserError(str(e)) from None
        _PARAMS_CACHE[key] = models.param_count(variables)
    return _PARAMS_CACHE[key]


def flops_spread(runs: Sequence[Run]) -> float | None:
    """max/min - 1 of the FLOPs of the experiment's ``flops_matched`` rows among ``runs``."""
    matched = {r.row.name: r for r in runs if r.row.name in r.experiment.flops_matched}
    if len(matched) < 2:
        return None
    flops = [model_cost(r.settings)["flops"] for r in matched.values()]
    return max(flops) / min(flops) - 1


# ------------------------------------------------------------------------------------------------
# The runner.


def read_records(workdir: Path) -> list[dict]:
    """The run's metrics.jsonl records. A last line that is not a record (a write cut short)
    is left out with a warning: the run then counts as unfinished, and resuming it from its
    checkpoint rewrites the file. A bad line before the last is a UserError."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("no step")
        except ValueError:
            if n < len(lines):
                raise UserError(f"{path}: line {n} is not a metrics record; delete {workdir} "
                                "to train the run again") from None
            warnings.warn(f"{path}: its last line is not a metrics record (a write cut "
                          "short?); left out", stacklevel=2)
            break
        records.append(record)
    return records


def identity_diff(run: Run, saved: Mapping[str, Any]) -> list[str]:
    """The identity fields in which a workdir's saved config.json differs from ``run``, as
    ``key: saved -> wanted`` (config.identity_diff)."""
    return config_identity_diff({k: _setting(run.settings, k) for k in IDENTITY_FIELDS}, saved)


def _finished_in(workdir: Path, run: Run, fields: Iterable[str]) -> dict | None:
    """The final metrics record of the run in ``workdir`` if its config.json agrees with ``run``
    on ``fields`` and its metrics.jsonl reaches ``run``'s last step; else None."""
    try:
        saved = json.loads((workdir / "config.json").read_text())
        steps_per_epoch = int(saved["resolved"]["steps_per_epoch"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):  # the trainer writes it whole: damaged
        warnings.warn(f"{workdir / 'config.json'} is unreadable or not a training config: the "
                      "run counts as not run", stacklevel=2)
        return None
    if config_identity_diff({k: _setting(run.settings, k) for k in fields}, saved):
        return None
    total = _setting(run.settings, "epochs") * steps_per_epoch
    max_steps = _setting(run.settings, "max_steps")
    if max_steps:
        total = min(total, max_steps)
    records = read_records(workdir)
    # Exactly at the last step: a workdir trained further (more epochs than this run asks for)
    # holds another run, whose last record must not be reported as this one's.
    if records and records[-1].get("step", -1) == total:
        return records[-1]
    return None


def finished_record(run: Run) -> dict | None:
    """The final metrics record if ``run``'s workdir holds this very run, finished; else None.

    Finished: config.json matches the run's identity fields and the last record of metrics.jsonl
    is at the run's last step (epochs x steps per epoch, or max_steps if smaller).
    """
    return _finished_in(run.workdir, run, IDENTITY_FIELDS)


# Config fields that change nothing a run computes: paths, checkpointing, how it is launched.
_BOOKKEEPING = frozenset({"preset", "data_dir", "workdir", "checkpoint_every", "keep_checkpoints",
                          "compilation_cache", "overwrite", "coordinator_address",
                          "num_processes", "process_id", "init_timeout"})
TRAINING_FIELDS = tuple(sorted(CONFIG_FIELDS - _BOOKKEEPING))


def find_twin(run: Run) -> Path | None:
    """A finished workdir of another row or experiment in ``run``'s runs dir that trained the
    very same run: every training setting (epochs included) and the seed equal. Experiments share
    rows (resnet18 with the chapter's recipe is in five of them); such a run is trained once."""
    runs_dir = run.workdir.parents[2]  # RUNS_DIR/NAME/PRESET/ROW-seedK
    for config_file in sorted(runs_dir.glob("*/*/*/config.json")):
        workdir = config_file.parent
        try:
            if workdir != run.workdir and _finished_in(workdir, run, TRAINING_FIELDS) is not None:
                return workdir
        except UserError:  # another run's damaged records: not a twin (its own run says so)
            continue
    return None


def share_run(run: Run, twin: Path) -> str:
    """Gives ``run``'s workdir the records of the finished ``twin`` (config.json, naming where it
    came from in ``shared_from``, and metrics.jsonl; not its checkpoints). Returns the twin's
    place relative to the runs dir (its origin's, if the twin was itself shared)."""
    runs_dir = run.workdir.parents[2]
    saved = json.loads((twin / "config.json").read_text())
    origin = saved.get("shared_from") or twin.relative_to(runs_dir).as_posix()
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / "metrics.jsonl").write_bytes((twin / "metrics.jsonl").read_bytes())
    saved.update(workdir=str(run.workdir), shared_from=origin)
    # config.json last: until it is there, the workdir is not a finished run.
    tmp = run.workdir / "config.json.tmp"
    tmp.write_text(json.dumps(saved, indent=2) + "\n")
    os.replace(tmp, run.workdir / "config.json")
    return origin


def _describe(settings: Mapping[str, Any], keys: Iterable[str]) -> str:
    return ", ".join(f"{k}={_setting(settings, k)}" for k in keys)


def _varying(runs: Sequence[Run]) -> list[str]:
    """The settings that differ between the rows of ``runs`` (seed and paths excepted)."""
    keys = sorted({k for r in runs for k in r.settings} - {"seed", "workdir", "data_dir"})
    return [k for k in keys if len({repr(_setting(r.settings, k)) for r in runs}) > 1]


def _print(line: str) -> None:
    print(line, flush=True)


def dry_run(runs: Sequence[Run], say=_print) -> None:
    """Checks every run without training: its Config validates, its model builds at its input
    size; prints parameters, FLOPs and whether it is done, to resume or new. A run that cannot
    be trained is a UserError."""
    varying = _varying(runs)
    for run in runs:
        check_model(run.settings)
        cost = model_cost(run.settings)
        run.config()
        if finished_record(run):
            status = "done"
        elif (run.workdir / "config.json").exists():
            status = "resume"
        elif find_twin(run) is not None:
            status = "shared"
        else:
            status = "new"
        epochs = _setting(run.settings, "epochs")
        say(f"  {run.name:<22} {status:<7} epochs {epochs:<3} params {cost['params']:>11,}  "
            f"FLOPs/img {_si(cost['flops']):>7}  {_describe(run.settings, varying)}")
    spread = flops_spread(runs)
    if spread is not None:
        experiment = runs[0].experiment
        verdict = ("not checked at the tiny preset" if runs[0].preset == "tiny" else
                   "ok" if spread <= experiment.flops_tolerance else "OUT OF TOLERANCE")
        say(f"  FLOPs-matched rows ({', '.join(experiment.flops_matched)}): max/min - 1 = "
            f"{spread:.1%} (tolerance {experiment.flops_tolerance:.0%}): {verdict}")


def train_run(run: Run, say=_print, prefix: str = "") -> str:
    """Trains ``run`` unless it is finished: ``skipped``, ``shared`` (another experiment's
    identical run finished: its records are copied, see `find_twin`), ``trained``, ``diverged``
    or ``stopped`` (SIGTERM/SIGINT checkpointed it). ``say`` gets one line per decision."""
    from resnet_jax import train as train_lib

    record = finished_record(run)
    if record is not None:
        say(f"{prefix}skip {run.name}: finished at step {record['step']} in {run.workdir}")
        return "skipped"
    config = run.config()
    try:
        saved = json.loads((run.workdir / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    diff = identity_diff(run, saved) if isinstance(saved, dict) else []
    if diff:
        raise UserError(f"{run.workdir} holds a different run ({'; '.join(diff)}); delete it, "
                        "or use another --runs_dir")
    twin = find_twin(run) if saved is None else None  # (a started run resumes instead)
    if twin is not None:
        origin = share_run(run, twin)
        say(f"{prefix}share {run.name}: the same run finished in {origin} (records copied to "
            f"{run.workdir})")
        return "shared"
    say(f"{prefix}train {run.name} in {run.workdir}")
    try:
        train_lib.train_and_evaluate(config)
    except train_lib.DivergedError as e:
        say(f"{prefix}diverged {run.name}: {e}")
        return "diverged"
    except UserError as e:  # train.py's advice names its --overwrite, not a flag of this runner
        raise UserError(re.sub(r"use --overwrite to start again( or another --workdir)?",
                               f"delete {run.workdir} to train the run again", str(e))) from None
    if finished_record(run) is None:
        return "stopped"
    return "trained"


def run_experiment(experiment: Experiment, preset: str, seeds: int = 1,
                   runs_dir: str | Path = "runs/experiments", out: str | Path = "docs/experiments",
                   data_dir: str | None = None, rows: Sequence[str] | None = None,
                   say=_print) -> dict[str, list[str]]:
    """Trains the runs not yet finished, then writes the report of every finished run.

    Returns the run names by outcome (``skipped``, ``trained``, ``diverged``, ``stopped``); the
    report is not written when a run was stopped.
    """
    runs = plan(experiment, preset, seeds, runs_dir, data_dir, rows)
    outcomes: dict[str, list[str]] = {}
    for i, run in enumerate(runs, 1):
        outcome = train_run(run, say, prefix=f"[{experiment.name} {i}/{len(runs)}] ")
        outcomes.setdefault(outcome, []).append(run.name)
        if outcome == "stopped":
            say(f"stopped during {run.name}; run the same command to resume")
            return outcomes
    say(f"{experiment.name}: trained {len(outcomes.get('trained', []))}, shared "
        f"{len(outcomes.get('shared', []))}, skipped "
        f"{len(outcomes.get('skipped', []))} finished, diverged "
        f"{len(outcomes.get('diverged', []))}")
    folder = write_report(experiment, preset, seeds, runs_dir, out, data_dir)
    say(f"{experiment.name}: wrote {folder}/table.md, results.csv, results.json and "
        f"{', '.join(p.file for p in experiment.plots)}")
    return outcomes


# ------------------------------------------------------------------------------------------------
# The report.

SPREAD = "sample standard deviation over seeds"


def run_summary(run: Run, records: list[dict]) -> dict[str, Any]:
    """What the table needs from one finished run's metrics records and config.json."""
    saved = json.loads((run.workdir / "config.json").read_text())
    resolved = saved.get("resolved", {})
    speeds = [r["images_per_sec"] for r in (records[1:] if len(records) >= 2 else records)]
    last = records[-1]
    hardware = f"{resolved.get('device_kind', '?')} ({resolved.get('platform', '?')})"
    if resolved.get("devices", 1) > 1:
        hardware += f" x{resolved['devices']}"
    # The folder's name only (under --runs_dir/NAME/PRESET): reports carry no machine's paths.
    return {"seed": run.seed, "workdir": run.workdir.name, "step": last["step"],
            "epochs": last["epoch"], "train_accuracy": last["train_accuracy"],
            "val_accuracy": last["val_accuracy"], "train_loss": last["train_loss"],
            "val_loss": last["val_loss"],
            "gap": last["train_accuracy"] - last["val_accuracy"],
            "images_per_sec": statistics.median(speeds), "wall_time": last["wall_time"],
            "hardware": hardware, "shared_from": saved.get("shared_from"), "history": records}


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) >= 2 else None,
            "min": min(values), "max": max(values)}


def seeds_on_disk(experiment: Experiment, preset: str, runs_dir: str | Path) -> int:
    """1 + the highest seed of any workdir of ``experiment`` in ``runs_dir`` (0 if none)."""
    found = [re.fullmatch(r".+-seed(\d+)", p.name)
             for p in (Path(runs_dir) / experiment.name / preset).glob("*-seed*")]
    return max((int(m.group(1)) + 1 for m in found if m), default=0)


def collect(experiment: Experiment, preset: str, seeds: int, runs_dir: str | Path,
            data_dir: str | None = None) -> tuple[list[dict], list[str]]:
    """Per-row summaries over the finished seeds, and the names of rows with none finished.

    Seeds 0 .. ``seeds`` - 1 and any higher seed finished in ``runs_dir``: a report made with
    fewer ``seeds`` than an earlier one (adding a row with one seed, say) keeps every seed run.
    """
    runs = plan(experiment, preset, max(seeds, seeds_on_disk(experiment, preset, runs_dir)),
                runs_dir, data_dir)
    varying = _varying(runs)
    rows, missing = [], []
    for row in experiment.rows:
        mine = [r for r in runs if r.row is row]
        done = []
        for run in mine:
            if finished_record(run) is not None:
                done.append(run_summary(run, read_records(run.workdir)))
        if not done:
            missing.append(row.name)
            continue
        settings = mine[0].settings
        cost = model_cost(settings)
        summary: dict[str, Any] = {
            "row": row.name, "arch": settings.get("arch", Config().arch),
            "settings": _describe(settings, varying), "x": row.x, "group": row.group,
            "params": cost["params"], "flops": cost["flops"],
            "seeds": [d["seed"] for d in done], "n_seeds": len(done),
            "hardware": ", ".join(sorted({d["hardware"] for d in done})),
        }
        for key in ("train_accuracy", "val_accuracy", "gap", "images_per_sec", "wall_time"):
            summary[key] = _stats([d[key] for d in done])
        summary["runs"] = done
        rows.append(summary)
    return rows, missing


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _pm(stats: Mapping[str, float | None], fmt: str = ".4f") -> str:
    text = format(stats["mean"], fmt)
    return text if stats["std"] is None else f"{text} ± {format(stats['std'], fmt)}"


def _shared_setup(experiment: Experiment, preset: str) -> str:
    """The settings every row shares, in words."""
    runs = plan(experiment, preset, 1, "runs")
    varying = set(_varying(runs)) | {"seed", "workdir", "data_dir"}
    shared = {k: v for k, v in runs[0].settings.items() if k not in varying}
    defaults = Config()
    base = {k: getattr(defaults, k) for k in ("optimizer", "learning_rate", "schedule",
                                              "batch_size", "epochs", "image_size", "stem",
                                              "width", "train_examples", "augment")
            if k not in varying and k not in shared}
    return ", ".join(f"{k}={v}" for k, v in {**base, **shared}.items())


def _eval_set(experiment: Experiment, preset: str, rows: list[dict]) -> str:
    """What the val accuracy was measured on, in words, from the runs' val_count."""
    counts = {d["history"][-1].get("val_count") for r in rows for d in r["runs"]} - {None}
    count = ", ".join(f"{c:,}" for c in sorted(counts)) or "?"
    if _setting(plan(experiment, preset, 1, "runs")[0].settings, "eval_examples"):
        return f"the first {count} images of the test split"
    return f"the whole test split ({count} images)"


def write_report(experiment: Experiment, preset: str, seeds: int, runs_dir: str | Path,
                 out: str | Path, data_dir: str | None = None, require_runs: bool = False
                 ) -> Path:
    """Writes table.md, results.csv, results.json and the plots into OUT/NAME/PRESET.

    With ``require_runs``, a runs dir without any finished run of the experiment is a
    UserError (a mistyped --runs_dir must not replace a report with an empty one).
    """
    rows, missing = collect(experiment, preset, seeds, runs_dir, data_dir)
    if require_runs and not rows:
        raise UserError(f"no finished run of {experiment.name} ({preset} preset) in {runs_dir}; "
                        "nothing to report")
    folder = Path(out) / experiment.name / preset
    folder.mkdir(parents=True, exist_ok=True)
    setup = _shared_setup(experiment, preset)

    columns = ["row", "settings", "params", "FLOPs/img (fwd)", "train img/s", "wall (s)",
               "train acc", "val acc", "seeds", "hardware"]
    lines = [f"# {experiment.name} ({preset} preset)", "", f"**Question.** {experiment.question}",
             "", f"**Design.** {experiment.design}", "", f"**Shared settings.** {setup}.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["row"], r["settings"], f"{r['params'] / 1e6:.2f}M", _si(r["flops"]),
                 f"{r['images_per_sec']['mean']:,.0f}", f"{r['wall_time']['mean']:,.1f}",
                 _pm(r["train_accuracy"]), _pm(r["val_accuracy"]),
                 ",".join(map(str, r["seeds"])), r["hardware"]]
        lines.append("| " + " | ".join(cells) + " |")
    for name in missing:
        lines.append(f"| {name} | not run | | | | | | | | |")
    shared = []
    for r in rows:
        mine = [d for d in r["runs"] if d["shared_from"]]
        if mine:
            origins = sorted({d["shared_from"].rsplit("/", 1)[0] for d in mine})
            shared.append(f"{r['row']} (seed{'s' * (len(mine) > 1)} "
                          f"{', '.join(str(d['seed']) for d in mine)}: {', '.join(origins)})")
    lines += [
        "",
        *([f"Runs shared with other experiments (the same settings and seed, trained once and "
           f"reported in each): {'; '.join(shared)}.", ""] if shared else []),
        f"Accuracies are the last epoch's: train accuracy is the running mean over that epoch "
        f"(training mode), val accuracy is on {_eval_set(experiment, preset, rows)}; ± is the "
        f"{SPREAD} (shown when there are 2 or more; min and max are in results.csv). FLOPs: "
        f"XLA's count for one forward pass of one image at the run's input size (a multiply-add "
        f"is 2). train img/s: median over epochs of the training throughput (the first epoch, "
        f"which can include compilation and warm-up, is left out when there are 2 or more), mean "
        f"over seeds. wall: the training run's wall time from the start of training (waiting for "
        f"compilation and evaluation included; start-up, data loading and initialisation not), "
        f"mean over seeds.",
        "",
    ]
    lines += [f"![{p.file}]({p.file})" for p in experiment.plots if rows]
    (folder / "table.md").write_text("\n".join(lines) + "\n")
    (folder / "results.csv").write_text(_csv(experiment, preset, rows))
    (folder / "results.json").write_text(json.dumps({
        "experiment": experiment.name, "preset": preset, "question": experiment.question,
        "design": experiment.design, "shared_settings": setup, "spread": SPREAD,
        "rows": rows, "not_run": missing}, indent=1) + "\n")
    if rows:
        for plot in experiment.plots:
            draw(plot, rows, folder / plot.file, f"{experiment.name} ({preset})")
    return folder


def _csv(experiment: Experiment, preset: str, rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    stats = ("train_accuracy", "val_accuracy", "gap")
    writer.writerow(["experiment", "preset", "row", "arch", "settings", "params", "flops",
                     "images_per_sec", "wall_time_s",
                     *[f"{k}_{s}" for k in stats for s in ("mean", "std", "min", "max")],
                     "n_seeds", "seeds", "hardware"])
    for r in rows:
        writer.writerow([experiment.name, preset, r["row"], r["arch"], r["settings"], r["params"],
                         f"{r['flops']:.0f}", f"{r['images_per_sec']['mean']:.1f}",
                         f"{r['wall_time']['mean']:.1f}",
                         *["" if r[k][s] is None else f"{r[k][s]:.6f}"
                           for k in stats for s in ("mean", "std", "min", "max")],
                         r["n_seeds"], " ".join(map(str, r["seeds"])), r["hardware"]])
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# Plots.

LABELS = {"train_loss": "train loss", "val_loss": "validation loss",
          "train_accuracy": "train accuracy", "val_accuracy": "validation accuracy",
          "gap": "train - validation accuracy", "images_per_sec": "train images/s",
          "flops": "forward FLOPs per image", "params": "parameters", "epoch": "epoch",
          "wall_time": "wall time (s)"}


def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    """Epochs and the per-epoch mean of ``key`` over seeds (truncated to the shortest run)."""
    n = min(len(r["history"]) for r in runs)
    epochs = [runs[0]["history"][i]["epoch"] for i in range(n)]
    return epochs, [statistics.fmean(r["history"][i][key] for r in runs) for i in range(n)]


def _value(row: dict, key: str) -> tuple[float, float]:
    if key == "row":
        return float(row["x"]), 0.0
    value = row[key]
    if isinstance(value, Mapping):
        return value["mean"], value["std"] or 0.0
    return float(value), 0.0


def draw(plot: Plot, rows: list[dict], path: Path, title: str) -> None:
    """Draws ``plot`` of the row summaries into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, ScalarFormatter

    si = FuncFormatter(lambda v, _: _si(v))  # 4.8M, 1.2G: as the tables write them

    groups = list(dict.fromkeys(r["group"] for r in rows)) if plot.kind == "curves" else [""]
    nrows, ncols = (len(plot.panels), len(groups)) if plot.kind == "curves" else (
        1, len(plot.panels))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), dpi=120,
                             squeeze=False, sharey="row" if plot.kind == "curves" else False)
    x_label = plot.x_label or LABELS.get(plot.x, plot.x)
    for p, metrics in enumerate(plot.panels):
        if plot.kind == "curves":
            for g, group in enumerate(groups):
                ax = axes[p][g]
                for r in (r for r in rows if r["group"] == group):
                    ax.plot(*_mean_curve(r["runs"], metrics[0]), marker=".", label=r["row"])
                if g == 0:
                    ax.set_ylabel(LABELS.get(metrics[0], metrics[0]))
                if p == 0 and group:
                    ax.set_title(group, fontsize=9)
                ax.legend(fontsize=8)
        else:
            ax = axes[0][p]
            for metric in metrics:
                points = sorted((_value(r, plot.x)[0], *_value(r, metric), r["row"])
                                for r in rows)
                xs, ys, errs, names = zip(*points, strict=True)
                if plot.kind == "scatter":
                    ax.errorbar(xs, ys, yerr=errs, fmt="o", capsize=3)
                    for x, y, name in zip(xs, ys, names, strict=True):
                        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4),
                                    fontsize=8)
                else:
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3,
                                label=LABELS.get(metric, metric))
            ax.set_ylabel(LABELS.get(metrics[0], metrics[0]) if len(metrics) == 1 else "accuracy")
            if len(metrics) > 1:
                ax.legend(fontsize=8)
            if metrics[0] in ("flops", "images_per_sec", "params"):
                ax.set_ylim(0, ax.get_ylim()[1] * 1.05)  # (the top marker whole)
                ax.yaxis.set_major_formatter(si)
            if plot.log_x:
                ax.set_xscale("log", base=2 if plot.x == "row" else 10)
                if plot.x != "row":  # ticks at 1, 2 and 5 x 10^k: some inside any span
                    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.xaxis.set_major_formatter(si)
                ax.xaxis.set_minor_formatter(NullFormatter())
            if plot.x == "row":  # label the rows' own values (1, 2, 4, 8, 32), not powers
                ax.set_xticks(sorted({_value(r, "row")[0] for r in rows}))
                ax.xaxis.set_major_formatter(ScalarFormatter())
        for ax in axes[p] if plot.kind == "curves" else [axes[0][p]]:
            ax.grid(alpha=0.3)
            ax.set_xlabel(x_label)
    if plot.kind != "curves":
        title += "\npoints: mean over seeds; bars: sample standard deviation"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def describe(experiment: Experiment, preset: str) -> str:
    """The experiment and its rows' settings at ``preset`` (for ``--list``), several lines."""
    runs = plan(experiment, preset, 1, "runs")
    varying = _varying(runs)
    lines = [f"{experiment.name}: {experiment.question}",
             f"  shared ({preset}): {_shared_setup(experiment, preset)}"]
    for run in runs:
        lines.append(f"  {run.row.name:<16} {_describe(run.settings, varying)}")
    return "\n".join(lines)


__all__ = [
    "CHAPTER_RECIPE", "EXPERIMENTS", "IMPROVED_RECIPE", "PRESETS", "Experiment",
    "Plot", "Row", "Run", "check_preset", "collect", "describe", "dry_run", "finished_record",
    "flops_spread", "get_experiment", "model_cost", "plan", "run_experiment", "train_run",
    "write_report",
]
