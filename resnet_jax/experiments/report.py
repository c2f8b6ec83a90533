"""The report of an experiment: its runs' records read back from their workdirs, tabulated
(table.md, results.csv, results.json) and plotted."""


from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from resnet_jax.config import Config
from resnet_jax.errors import UserError
from resnet_jax.experiments.runs import (
    Run,
    _describe,
    _setting,
    _si,
    _varying,
    finished_record,
    model_cost,
    plan,
    read_records,
)
from resnet_jax.experiments.table import Experiment, Plot

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
