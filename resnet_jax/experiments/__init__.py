"""The chapter's questions as named experiments, run and reported from the typed Config.

An experiment is one table of training configurations ("rows") sharing a recipe. Three parts:

- `table.py`: the table itself (recipes, presets, `EXPERIMENTS`); adding an experiment is
  adding an entry there.
- `runs.py`: one row at one preset and seed is a `Run` in its own workdir; `train_run` trains,
  resumes, skips or shares it.
- `report.py`: `write_report` reads the runs' workdirs back, tabulates and plots them.

For a preset (``tiny``: CI smoke, seconds per run; ``cpu``: minutes per run on a laptop; ``gpu``:
the real thing) and a number of seeds, :func:`run_experiment` trains every row and seed one after
another with :func:`resnet_jax.train.train_and_evaluate`, each in its own workdir::

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

from collections.abc import Sequence
from pathlib import Path

from resnet_jax.experiments.report import (
    SPREAD,
    collect,
    describe,
    draw,
    run_summary,
    seeds_on_disk,
    write_report,
)
from resnet_jax.experiments.runs import (
    TRAINING_FIELDS,
    Run,
    _print,
    check_model,
    dry_run,
    find_twin,
    finished_record,
    flops_spread,
    identity_diff,
    model_cost,
    plan,
    read_records,
    row_settings,
    share_run,
    train_run,
)
from resnet_jax.experiments.runs import (
    _setting as _setting,  # (tests read it)
)
from resnet_jax.experiments.table import (
    CHAPTER_RECIPE,
    CONFIG_FIELDS,
    EXPERIMENTS,
    IMPROVED_RECIPE,
    PRESETS,
    Experiment,
    Plot,
    Row,
    check_preset,
    experiment_names,
    get_experiment,
)


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



__all__ = [
    "CHAPTER_RECIPE", "CONFIG_FIELDS", "EXPERIMENTS", "IMPROVED_RECIPE", "PRESETS", "SPREAD",
    "TRAINING_FIELDS", "Experiment", "Plot", "Row", "Run", "check_model", "check_preset",
    "collect", "describe", "draw", "dry_run", "experiment_names", "find_twin", "finished_record",
    "flops_spread", "get_experiment", "identity_diff", "model_cost", "plan", "read_records",
    "row_settings", "run_experiment", "run_summary", "seeds_on_disk", "share_run", "train_run",
    "write_report",
]
