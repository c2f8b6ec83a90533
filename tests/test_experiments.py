"""scripts/experiment.py and resnet_jax.experiments: every configuration of every experiment and
preset validates, FLOPs-matched rows are matched, the report and plots are written from workdirs,
every experiment's tiny preset trains end to end, a run shared by several experiments
trains once, and finished runs are skipped (not retrained) when run again."""

import dataclasses
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

import pytest
from conftest import REPO

from resnet_jax import experiments as ex
from resnet_jax.config import Config, parse_config
from resnet_jax.errors import UserError

SCRIPT = REPO / "scripts" / "experiment.py"
PNG = b"\x89PNG\r\n\x1a\n"


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("preset", list(ex.PRESETS))
def test_every_configuration_validates(preset, tmp_path):
    for experiment in ex.EXPERIMENTS:
        runs = ex.plan(experiment, preset, 2, tmp_path)
        assert len(runs) == 2 * len(experiment.rows)
        assert len({r.workdir for r in runs}) == len(runs)
        for run in runs:
            ex.check_model(run.settings)  # builds, and the input size suits it
            config = run.config()  # validates
            assert (config.seed, config.workdir) == (run.seed, str(run.workdir))


def test_the_gpu_recipe_row_is_the_readmes_recipe_command(tmp_path):
    # The row that reports on the 0.950 target trains what the README's results table ran.
    row = next(line for line in (REPO / "README.md").read_text().splitlines()
               if line.startswith("| a better recipe"))
    command = shlex.split(re.search(r"`(python scripts/train.py [^`]+)`", row)[1])
    from_readme = parse_config(command[2:])
    [run] = [r for r in ex.plan(ex.get_experiment("recipe"), "gpu", 1, tmp_path)
             if r.row.name == "improved+erasing"]
    ignored = {"workdir": None, "data_dir": None}
    assert dataclasses.replace(run.config(), **ignored) == dataclasses.replace(from_readme,
                                                                                **ignored)


@pytest.mark.parametrize("preset", ["cpu", "gpu"])
def test_flops_matched_rows_are_matched(preset):
    checked = 0
    for experiment in ex.EXPERIMENTS:
        if experiment.flops_matched:
            spread = ex.flops_spread(ex.plan(experiment, preset, 1, "runs"))
            assert spread is not None and spread <= experiment.flops_tolerance, experiment.name
            checked += 1
    assert checked == 2  # bottleneck, cardinality


def test_cli_list_and_one_line_errors():
    listed = run_script("--list", "--preset=gpu")
    assert listed.returncode == 0, listed.stderr
    for experiment in ex.EXPERIMENTS:
        assert f"{experiment.name}: " in listed.stdout
    assert "image_size=96" in listed.stdout
    for args, message in ((["nope"], "unknown experiment 'nope'"),
                          (["depth", "--preset=huge"], "unknown --preset 'huge'"),
                          (["depth", "--rows=resnet18, resnet19"], "unknown row(s) resnet19"),
                          (["depth", "preact", "--rows=resnet18"], "--rows needs one experiment"),
                          (["depth", "--seeds=0"], "--seeds must be in 1 .. 1000, got 0"),
                          (["depth", "--dry_run", "--data_dir=/nonexistent"],
                           "--data_dir /nonexistent is not a folder"),
                          (["depth", "--seed=3"], "unrecognized arguments: --seed=3"),
                          (["depth", "--dry_run", "--report_only"], "exclude each other"),
                          (["depth", "--runs_dir="], "--runs_dir is empty"),
                          (["depth", "--runs_dir=/dev/null"],
                           "--runs_dir /dev/null is a file, not a directory")):
        result = run_script(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_cli_dry_run_trains_nothing(tmp_path):
    result = run_script("bottleneck", "depth", "bottleneck", "--preset=tiny", "--dry_run",
                        "--seeds=2", f"--runs_dir={tmp_path / 'runs'}", f"--out={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-2000:]
    # Each named experiment once, in the order given.
    assert re.findall(r"^(\w+) \(tiny, (\d+) runs\):$", result.stdout, re.M) == [
        ("bottleneck", "6"), ("depth", "10")]
    assert result.stdout.count(" new ") == 16
    assert "FLOPs-matched rows (resnet34, resnet50-narrow)" in result.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_index_covers_every_experiment_and_links_only_real_reports():
    index = (REPO / "docs" / "experiments.md").read_text()
    for experiment in ex.EXPERIMENTS:
        assert f"— `{experiment.name}`" in index
    # Every experiment's section ends with a reading (of its results, or "not yet run").
    assert index.count("- Reading") == len(ex.EXPERIMENTS)
    links = set(re.findall(r"\]\((experiments/[^)]+)\)", index))
    for link in links:
        assert (REPO / "docs" / link).is_file(), f"dead link {link}"
    for table in (REPO / "docs" / "experiments").glob("*/*/table.md"):
        assert str(table.relative_to(REPO / "docs")) in links, f"{table} is not linked"


def _fake_workdir(run: ex.Run, seed_offset: float) -> None:
    """A finished run's config.json and metrics.jsonl, as train_and_evaluate writes them."""
    settings = {k: v for k, v in run.settings.items() if k in ex.CONFIG_FIELDS}
    saved = {**dataclasses.asdict(Config(**settings)),
             "resolved": {"steps_per_epoch": 8, "platform": "cpu", "device_kind": "cpu",
                          "devices": 1}}
    epochs = run.settings["epochs"]
    records = [{"epoch": e, "step": 8 * e, "train_loss": 2.0 / e + seed_offset,
                "train_accuracy": 0.5 + 0.05 * e, "val_loss": 2.2 / e,
                "val_accuracy": 0.45 + 0.04 * e + seed_offset, "images_per_sec": 100.0 * e,
                "wall_time": 3.0 * e} for e in range(1, epochs + 1)]
    run.workdir.mkdir(parents=True)
    (run.workdir / "config.json").write_text(json.dumps(saved))
    (run.workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_a_workdir_trained_further_is_not_this_run_finished(tmp_path):
    run = ex.plan(ex.get_experiment("degradation"), "tiny", 1, tmp_path, rows=["resnet18"])[0]
    _fake_workdir(run, 0.0)
    assert ex.finished_record(run)["step"] == 8 * run.settings["epochs"]
    longer = dataclasses.replace(run, settings={**run.settings, "epochs": 1})
    assert ex.finished_record(longer) is None  # its workdir went past its last step


def test_report_of_every_experiment_from_workdirs(tmp_path):
    # No training: finished workdirs are faked, so that every table and every kind of plot is
    # drawn, with two seeds (mean ± std). The models' costs are real (lowered, not run).
    for experiment in ex.EXPERIMENTS:
        runs = ex.plan(experiment, "tiny", 2, tmp_path / "runs")
        for run in runs:
            if run.row.name != experiment.rows[-1].name:  # the last row stays "not run"
                _fake_workdir(run, 0.01 * run.seed)
        folder = ex.write_report(experiment, "tiny", 2, tmp_path / "runs", tmp_path / "out")
        results = json.loads((folder / "results.json").read_text())
        assert [r["row"] for r in results["rows"]] == [r.name for r in experiment.rows[:-1]]
        assert results["not_run"] == [experiment.rows[-1].name]
        first = results["rows"][0]
        assert first["n_seeds"] == 2 and first["val_accuracy"]["std"] > 0
        for row in results["rows"]:  # parameters as eval_shape counts them, FLOPs positive
            settings = next(r.settings for r in runs if r.row.name == row["row"])
            assert row["params"] == ex.check_model(settings) and row["flops"] > 0
        epochs = runs[0].settings["epochs"]
        # Median img/s over the epochs after the first; the last epoch's accuracies.
        assert first["images_per_sec"]["mean"] == statistics.median(
            100.0 * e for e in range(2, epochs + 1))
        assert first["val_accuracy"]["mean"] == pytest.approx(0.45 + 0.04 * epochs + 0.005)
        table = (folder / "table.md").read_text()
        assert f"| {experiment.rows[-1].name} | not run |" in table and " ± " in table
        assert len((folder / "results.csv").read_text().splitlines()) == len(experiment.rows)
        for plot in experiment.plots:
            assert (folder / plot.file).read_bytes()[:8] == PNG, (experiment.name, plot.file)


def test_report_keeps_every_finished_seed(tmp_path):
    # Seeds 0-2 finished earlier; a report asked for one seed (the default) still covers all
    # three, and a seed whose run is unfinished is not counted.
    experiment = ex.get_experiment("capacity")
    runs = ex.plan(experiment, "tiny", 4, tmp_path / "runs", rows=["width4"])
    for run in runs[:3]:
        _fake_workdir(run, 0.01 * run.seed)
    runs[3].workdir.mkdir(parents=True)  # seed 3: started, nothing finished
    assert ex.seeds_on_disk(experiment, "tiny", tmp_path / "runs") == 4
    folder = ex.write_report(experiment, "tiny", 1, tmp_path / "runs", tmp_path / "out")
    (row,) = json.loads((folder / "results.json").read_text())["rows"]
    assert row["seeds"] == [0, 1, 2]
    assert "| 0,1,2 |" in (folder / "table.md").read_text()


def test_identical_runs_are_shared_between_experiments(tmp_path):
    runs_dir = tmp_path / "runs"

    def run_of(name: str, row: str, seed: int = 0) -> ex.Run:
        runs = ex.plan(ex.get_experiment(name), "tiny", seed + 1, runs_dir, rows=[row])
        return runs[-1]

    original = run_of("depth", "resnet18")
    _fake_workdir(original, 0.0)
    # preact's resnet18 and the recipe's chapter row are depth's resnet18, setting for setting.
    for name, row in (("preact", "resnet18"), ("recipe", "chapter")):
        assert ex.find_twin(run_of(name, row)) == original.workdir, (name, row)
    # Not the same run: another seed; the chapter's recipe for more epochs (its identity
    # fields are the same, so a resume would accept it, but its result is not).
    assert ex.find_twin(run_of("preact", "resnet18", seed=1)) is None
    longer = run_of("recipe", "chapter-long")
    assert not ex.identity_diff(longer, json.loads((original.workdir / "config.json").read_text()))
    assert ex.find_twin(longer) is None

    lines: list[str] = []
    ex.dry_run([run_of("preact", "resnet18")], say=lines.append)
    assert " shared " in lines[0]
    shared = run_of("preact", "resnet18")
    assert ex.train_run(shared, say=lines.append) == "shared"  # not trained: no data given
    assert "share resnet18-seed0: the same run finished in depth/tiny/resnet18-seed0" in lines[-1]
    assert ((shared.workdir / "metrics.jsonl").read_bytes()
            == (original.workdir / "metrics.jsonl").read_bytes())
    saved = json.loads((shared.workdir / "config.json").read_text())
    assert saved["shared_from"] == "depth/tiny/resnet18-seed0"
    assert saved["workdir"] == str(shared.workdir)
    assert ex.finished_record(shared) == ex.finished_record(original)
    assert ex.train_run(shared, say=lines.append) == "skipped"
    # Shared from a shared copy: the origin is still the run that trained.
    chapter = run_of("recipe", "chapter")
    (original.workdir / "config.json").unlink()
    assert ex.find_twin(chapter) == shared.workdir
    ex.share_run(chapter, shared.workdir)
    assert json.loads((chapter.workdir / "config.json").read_text())["shared_from"] == (
        "depth/tiny/resnet18-seed0")

    # The report says so; --report_only writes it from the finished runs, training nothing.
    out = tmp_path / "out"
    result = run_script("preact", "--preset=tiny", "--report_only", f"--runs_dir={runs_dir}",
                        f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "train " not in result.stdout and "epoch 1/" not in result.stdout
    table = (out / "preact" / "tiny" / "table.md").read_text()
    assert "| resnet18 | arch=resnet18 |" in table and "| preact_resnet18 | not run |" in table
    assert "reported in each): resnet18 (seed 0: depth/tiny)." in table
    assert sorted(p.name for p in runs_dir.glob("*/*/*")) == [
        "chapter-seed0", "resnet18-seed0", "resnet18-seed0"]

    # A runs dir with no finished run of it (a typo) leaves the report alone; an --out that
    # cannot be written is refused before anything trains.
    a_file = out / "preact" / "tiny" / "table.md"
    for args, message in (([f"--runs_dir={tmp_path / 'typo'}", f"--out={out}"],
                           "no finished run of preact (tiny preset) in "),
                          ([f"--runs_dir={runs_dir}", f"--out={a_file}"], "is a file, not")):
        result = run_script("preact", "--preset=tiny", "--report_only", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr
    assert a_file.read_text() == table


# Every experiment, in two halves that parallel workers take at once; the runs a half's
# experiments have in common are shared within it.
HALVES = (["degradation", "depth", "bottleneck", "preact"], ["cardinality", "capacity", "recipe"])


def test_the_halves_cover_every_experiment_once():
    assert sorted(sum(HALVES, [])) == sorted(e.name for e in ex.EXPERIMENTS)


@pytest.mark.slow
@pytest.mark.longest
@pytest.mark.parametrize("names", HALVES, ids=["first half", "second half"])
def test_every_experiment_tiny_end_to_end_then_skipped(names, fashion_mnist_dir, tmp_path):
    runs_dir, out = tmp_path / "runs", tmp_path / "out"
    common = ["--preset=tiny", f"--data_dir={fashion_mnist_dir}", f"--runs_dir={runs_dir}",
              f"--out={out}"]
    first = run_script(*names, *common, timeout=1800)
    assert first.returncode == 0, first.stderr[-2000:]
    experiments = [ex.get_experiment(name) for name in names]
    trained = 0
    for experiment in experiments:
        summary = re.search(rf"^{experiment.name}: trained (\d+), shared (\d+), skipped 0 "
                            r"finished, diverged 0$", first.stdout, re.M)
        assert summary, (experiment.name, first.stdout[-3000:])
        assert int(summary[1]) + int(summary[2]) == len(experiment.rows)
        trained += int(summary[1])
        folder = out / experiment.name / "tiny"
        results = json.loads((folder / "results.json").read_text())
        assert [r["row"] for r in results["rows"]] == [r.name for r in experiment.rows]
        assert results["not_run"] == []
        for plot in experiment.plots:
            assert (folder / plot.file).read_bytes()[:8] == PNG, (experiment.name, plot.file)
    # Each distinct run was trained once, whichever experiments it is a row of.
    runs = [run for e in experiments for run in ex.plan(e, "tiny", 1, runs_dir)]
    assert trained == len({tuple(repr(ex._setting(run.settings, k)) for k in ex.TRAINING_FIELDS)
                           for run in runs}) < len(runs)
    if "degradation" not in names:
        return
    for row in ("plain18", "resnet18"):
        assert f"train {row}-seed0 in {runs_dir}/degradation/tiny/{row}-seed0" in first.stdout
    assert "share resnet18-seed0: the same run finished in degradation/tiny/resnet18-seed0" in (
        first.stdout)

    folder = out / "degradation" / "tiny"
    results = json.loads((folder / "results.json").read_text())
    for row in results["rows"]:
        records = [json.loads(line) for line in (
            runs_dir / "degradation" / "tiny" / f"{row['row']}-seed0" / "metrics.jsonl"
        ).read_text().splitlines()]
        assert [r["step"] for r in records] == [8, 16]  # 256 examples, batch 32, 2 epochs
        assert {r["val_count"] for r in records} == {1000}  # the tiny preset's eval_examples
        assert row["val_accuracy"]["mean"] == records[-1]["val_accuracy"]
        assert row["images_per_sec"]["mean"] == records[1]["images_per_sec"]
        assert row["wall_time"]["mean"] == records[-1]["wall_time"]
        assert row["params"] > 0 and row["flops"] > 0 and row["hardware"] == "cpu (cpu)"
    table = (folder / "table.md").read_text()
    assert "| plain18 | arch=plain18 |" in table
    assert "val accuracy is on the first 1,000 images of the test split" in table
    assert len((folder / "results.csv").read_text().splitlines()) == 5

    args = ["degradation", "--rows=plain18,resnet18", *common]
    # Again: both runs are found finished in their workdirs, and nothing in them changes.
    before = {p: p.stat().st_mtime_ns for p in runs_dir.rglob("*")}
    second = run_script(*args)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "skip plain18-seed0: finished at step 16" in second.stdout
    assert "skip resnet18-seed0: finished at step 16" in second.stdout
    assert "degradation: trained 0, shared 0, skipped 2" in second.stdout
    assert "train " not in second.stdout and "epoch 1/" not in second.stdout
    assert {p: p.stat().st_mtime_ns for p in runs_dir.rglob("*")} == before

    # More epochs for the same runs: no longer finished, so a run would resume them.
    longer = dataclasses.replace(ex.get_experiment("degradation"),
                                 per_preset={"tiny": {"epochs": 3}})
    for run in ex.plan(longer, "tiny", 1, runs_dir, rows=["plain18", "resnet18"]):
        assert ex.finished_record(run) is None
    # Another recipe in the same workdirs: refused before anything is trained.
    other = dataclasses.replace(ex.get_experiment("degradation"),
                                recipe={"learning_rate": 0.02})
    run = ex.plan(other, "tiny", 1, runs_dir, rows=["plain18"])[0]
    assert ex.finished_record(run) is None
    with pytest.raises(UserError, match=r"holds a different run \(learning_rate: 0.01 -> 0.02"):
        ex.train_run(run)


def test_a_cut_short_last_record_is_left_out_and_a_bad_one_before_it_is_named(tmp_path):
    run = ex.plan(ex.get_experiment("degradation"), "tiny", 1, tmp_path, rows=["resnet18"])[0]
    _fake_workdir(run, 0.0)
    metrics = run.workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:-1]) + '\n{"epoch": 2, "st')  # killed mid-write
    with pytest.warns(UserWarning, match=r"its last line is not a metrics record"):
        assert [r["step"] for r in ex.read_records(run.workdir)] == [8]
    with pytest.warns(UserWarning):
        assert ex.finished_record(run) is None  # so the runner resumes it, rewriting the file
    metrics.write_text("\n".join(lines) + "\n")
    (run.workdir / "config.json").write_text("{garbled")
    with pytest.warns(UserWarning, match=r"config.json is unreadable or not a training config: "
                                         r"the run counts as not run"):
        assert ex.finished_record(run) is None
    _fake_workdir(dataclasses.replace(run, workdir=tmp_path / "again"), 0.0)
    (run.workdir / "config.json").write_bytes((tmp_path / "again" / "config.json").read_bytes())
    metrics.write_text("\n".join(["not json", *lines]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl: line 1 is not a metrics record; "
                                        r"delete .*resnet18-seed0 to train the run again"):
        ex.read_records(run.workdir)


def test_the_trainers_advice_names_what_the_runner_can_do(fashion_mnist_dir, tmp_path):
    # train.py's errors advise its --overwrite; the runner has no such flag.
    run = ex.plan(ex.get_experiment("degradation"), "tiny", 1, tmp_path, rows=["plain18"],
                  data_dir=str(fashion_mnist_dir))[0]
    (run.workdir / "checkpoints" / "8").mkdir(parents=True)
    (run.workdir / "config.json").write_text("{garbled")
    with pytest.raises(UserError) as info, pytest.warns(UserWarning, match="counts as not run"):
        ex.train_run(run, say=lambda _: None)
    assert str(info.value).endswith(f"config.json is unreadable or not a training config; "
                                    f"delete {run.workdir} to train the run again")
