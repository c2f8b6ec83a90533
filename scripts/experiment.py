#!/usr/bin/env python3
"""Run a named experiment (the chapter's questions) and write its table and plots.

    python scripts/experiment.py --list
    python scripts/experiment.py degradation --preset cpu --dry_run
    python scripts/experiment.py degradation --preset gpu --seeds 3

Each row and seed trains in its own workdir, RUNS_DIR/NAME/PRESET/ROW-seedK; running the same
command again skips the finished runs and resumes an interrupted one. A run whose settings and
seed equal those of a run another experiment finished in RUNS_DIR is not trained again: that run's
records (config.json, metrics.jsonl) are copied. The report goes to OUT/NAME/PRESET/: table.md,
results.csv, results.json and PNG plots. Several NAMEs, or `all`, run those experiments in turn.
The report covers every finished run of every row: seeds 0 .. N-1 (--seeds) and any other seed
finished in RUNS_DIR, so adding a row with fewer seeds keeps the others' seeds; --report_only
writes it from the finished runs without training (e.g. from records a GPU machine sent back).

Unknown names, presets or rows are one line on stderr with exit status 2. A run whose loss
diverged is reported, the others go on, and the exit status is 3. SIGTERM/SIGINT checkpoint the
current run and exit 0, as train.py; the same command resumes.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import EXIT_DIVERGED, check_writable, main_guard, run_main  # noqa: E402


def make_parser():
    from resnet_jax.config import _OneLineParser

    parser = _OneLineParser(prog="experiment.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="*", help="the experiment (see --list), several run in "
                        "turn, or all")
    parser.add_argument("--preset", default="cpu", help="tiny (CI smoke), cpu or gpu; default cpu")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train seeds 0 .. N-1 of every row (default 1); the report also "
                        "covers other seeds finished in --runs_dir")
    parser.add_argument("--rows", default="", help="comma-separated rows to train (default: all);"
                        " the report covers every finished row")
    parser.add_argument("--data_dir", default=None, help="as train.py's --data_dir")
    parser.add_argument("--out", default="docs/experiments",
                        help="where the reports go; default docs/experiments (of the current "
                        "folder)")
    parser.add_argument("--runs_dir", default="runs/experiments",
                        help="where the workdirs go; default runs/experiments")
    parser.add_argument("--dry_run", action="store_true",
                        help="check every configuration and print it; train nothing")
    parser.add_argument("--report_only", action="store_true",
                        help="write the report of the finished runs; train nothing")
    parser.add_argument("--list", action="store_true", help="list the experiments and rows")
    return parser


def choose(names: list[str]) -> list:
    """The experiments named, in the order given (each once), or all of them."""
    from resnet_jax import experiments as ex

    if "all" in names:
        return list(ex.EXPERIMENTS)
    return [ex.get_experiment(name) for name in dict.fromkeys(names)]


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    def job() -> int:
        from resnet_jax import experiments as ex
        from resnet_jax.errors import UserError

        preset = ex.check_preset(args.preset)
        if args.list:
            print("\n\n".join(ex.describe(e, preset) for e in choose(args.name or ["all"])))
            return 0
        if not args.name:
            raise UserError("name an experiment (see --list) or all")
        chosen = choose(args.name)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        if rows and len(chosen) > 1:
            raise UserError("--rows needs one experiment, not several")
        if args.data_dir is not None and not os.path.isdir(args.data_dir):
            raise UserError(f"--data_dir {args.data_dir} is not a folder")
        if args.dry_run and args.report_only:
            raise UserError("--dry_run and --report_only exclude each other")
        if not args.runs_dir:
            raise UserError("--runs_dir is empty; give a path")
        if not args.dry_run:  # fail now, not after hours of training
            check_writable(args.out, "--out")
            if not args.report_only:
                check_writable(args.runs_dir, "--runs_dir")
        status = 0
        for experiment in chosen:
            runs = ex.plan(experiment, preset, args.seeds, args.runs_dir, args.data_dir, rows)
            if args.dry_run:
                print(f"{experiment.name} ({preset}, {len(runs)} runs):")
                ex.dry_run(runs)
                continue
            if args.report_only:
                folder = ex.write_report(experiment, preset, args.seeds, args.runs_dir, args.out,
                                         args.data_dir, require_runs=True)
                print(f"{experiment.name}: wrote {folder}/table.md from the finished runs")
                continue
            outcomes = ex.run_experiment(experiment, preset, args.seeds, args.runs_dir,
                                         args.out, args.data_dir, rows)
            if outcomes.get("stopped"):
                return 0  # As train.py: checkpointed on SIGTERM/SIGINT; rerun to resume.
            if outcomes.get("diverged"):
                status = EXIT_DIVERGED
        return status

    return run_main("experiment.py", job)


if __name__ == "__main__":
    main_guard("experiment.py", main)
