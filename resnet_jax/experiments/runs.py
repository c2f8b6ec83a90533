"""Runs: one row of an experiment, at one preset and seed, in its own workdir; trained,
resumed, skipped when finished, or shared with an identical run of another experiment."""


from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_jax.config import IDENTITY_FIELDS, Config, validate
from resnet_jax.config import identity_diff as config_identity_diff
from resnet_jax.errors import UserError
from resnet_jax.experiments.table import CONFIG_FIELDS, PRESETS, Experiment, Row, check_preset


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


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


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
