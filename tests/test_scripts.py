"""End to end on the real Fashion-MNIST: scripts/train.py writes its workdir and resumes;
scripts/evaluate.py restores and reports."""

import json
import os
import pstats
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY, TRAIN, WHOLE_TEST_SPLIT

pytestmark = pytest.mark.slow


def test_train_writes_the_workdir_and_resumes(run_train, tmp_path):
    workdir = tmp_path / "run"
    first = run_train(f"--workdir={workdir}", *TINY, WHOLE_TEST_SPLIT, "--epochs=3",
                      "--max_steps=10")
    assert first.returncode == 0, first.stderr[-2000:]
    for name in ("config.json", "metrics.jsonl", "curves.png"):
        assert (workdir / name).is_file(), name
    assert any((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [
        "10", "8"]
    config = json.loads((workdir / "config.json").read_text())
    assert config["arch"] == "resnet18" and config["resolved"]["steps_per_epoch"] == 8
    assert config["stem_conv"] == "auto" and config["resolved"]["stem_conv"] == "direct"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
            "learning_rate", "images_per_sec", "train_time", "eval_time", "wall_time"}
    assert all(keys <= r.keys() for r in records)
    assert all(r["learning_rate"] == pytest.approx(0.01) for r in records)  # the chapter's
    assert all(r["train_time"] + r["eval_time"] < r["wall_time"] for r in records)
    assert [r["step"] for r in records] == [8, 10]
    # Without a terminal, a line per epoch that says how far the run has come.
    epoch_lines = [line for line in first.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epoch_lines] == ["epoch 1/3 step 8",
                                                          "epoch 1.25/3 step 10"]
    assert records[0]["val_count"] == 10_000  # every test image, exactly once
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The same command with a larger budget resumes at the saved step and continues.
    second = run_train(f"--workdir={workdir}", *TINY, WHOLE_TEST_SPLIT, "--epochs=3")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout and "(step 10)" in second.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    # The --max_steps record of the partial epoch is superseded by the full one.
    assert [r["step"] for r in records] == [8, 16, 24]
    assert [r["epoch"] for r in records] == [1, 2, 3]

    # Run again when finished: nothing to do, nothing duplicated.
    third = run_train(f"--workdir={workdir}", *TINY, WHOLE_TEST_SPLIT, "--epochs=3")
    assert third.returncode == 0, third.stderr[-2000:]
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 3

    evaluate = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), f"--workdir={workdir}",
         "--checkpoint=best"], capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    best = max(records, key=lambda r: r["val_accuracy"])
    assert f"checkpoint step {best['step']}: test accuracy {best['val_accuracy']:.4f}" in (
        evaluate.stdout)
    assert "Ankle boot" in evaluate.stdout and "on 10000 images" in evaluate.stdout
    assert "chosen by accuracy on this test split" in evaluate.stdout  # (so optimistic)
    matrix = [line for line in evaluate.stdout.splitlines() if line[:1].isdigit()]
    assert len(matrix) == 10
    assert sum(int(v) for line in matrix for v in line.split()[-10:]) == 10_000

    # An ensemble of one model twice predicts what the model does; --flip averages mirror
    # images; a workdir that is not one is a one-line error.
    def evaluate_many(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args,
                               "--checkpoint=best"], capture_output=True, text=True, timeout=300)

    twice = evaluate_many("--workdir", str(workdir), str(workdir))
    assert twice.returncode == 0, twice.stderr[-2000:]
    assert twice.stdout.count(f"(step {best['step']}): test accuracy "
                              f"{best['val_accuracy']:.4f}") == 2
    assert f"ensemble of 2: test accuracy {best['val_accuracy']:.4f}" in twice.stdout
    flipped = evaluate_many("--workdir", str(workdir), "--flip")
    assert flipped.returncode == 0, flipped.stderr[-2000:]
    assert "ensemble of 1 with flips: test accuracy " in flipped.stdout
    matrix = [line for line in flipped.stdout.splitlines() if line[:1].isdigit()]
    assert sum(int(v) for line in matrix for v in line.split()[-10:]) == 10_000
    # Saved predictions: the per-image probabilities of the model, which join an ensemble later
    # as the model itself would (here the same model twice: the same accuracy).
    from resnet_jax.train import load_predictions

    saved = evaluate_many("--workdir", str(workdir), "--save_predictions",
                          str(tmp_path / "p.npz"))
    assert saved.returncode == 0, saved.stderr[-2000:]
    pred = load_predictions(tmp_path / "p.npz")
    assert pred["probabilities"].shape == (10_000, 10) and pred["labels"].shape == (10_000,)
    assert abs(pred["probabilities"].sum(-1) - 1).max() < 1e-5
    assert abs(np.mean(pred["probabilities"].argmax(-1) == pred["labels"])
               - best["val_accuracy"]) <= 2e-4  # argmax ties aside, the eval loop's accuracy
    assert [(m["workdir"], m["step"]) for m in pred["members"]] == [(str(workdir), best["step"])]
    for args in (["--add_predictions", str(tmp_path / "p.npz"), str(tmp_path / "p.npz")],
                 ["--workdir", str(workdir), "--add_predictions", str(tmp_path / "p.npz")]):
        both = evaluate_many(*args)
        assert both.returncode == 0, both.stderr[-2000:]
        assert f"from {tmp_path / 'p.npz'}): test accuracy" in both.stdout
        single = f"{np.mean(pred['probabilities'].argmax(-1) == pred['labels']):.4f}"
        assert f"ensemble of 2: test accuracy {single}" in both.stdout
    # Different members: an ensemble is the mean of their probabilities, and a saved ensemble
    # weighs as many models as it holds. (Checkpoints 10 and 24 of this run, then both again.)
    from resnet_jax.train import evaluate_ensemble

    def predictions(name, *args):
        done = subprocess.run([sys.executable, str(REPO / "scripts" / "evaluate.py"), *args,
                               "--save_predictions", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return load_predictions(tmp_path / name)["probabilities"]

    p10, p24 = (predictions(f"p{step}.npz", "--workdir", str(workdir), f"--checkpoint={step}")
                for step in (10, 24))
    assert not np.allclose(p10, p24, atol=1e-3)
    pair = predictions("pair.npz", "--add_predictions", *(str(tmp_path / f"p{s}.npz")
                                                          for s in (10, 24)))
    np.testing.assert_allclose(pair, (p10 + p24) / 2, rtol=1e-6, atol=1e-7)
    three = evaluate_ensemble([], saved=[tmp_path / "pair.npz", tmp_path / "p24.npz"])
    mean = (2 * pair + p24) / 3
    assert len(three["members"]) == 3
    assert three["val_accuracy"] == np.mean(mean.argmax(-1) == pred["labels"])
    true = mean[np.arange(len(mean)), pred["labels"]]
    assert three["val_loss"] == pytest.approx(-np.mean(np.log(true)), rel=1e-6)
    # A reader that goes away (`evaluate.py ... | head`) stops it quietly, as a Unix tool.
    gone = subprocess.Popen([sys.executable, str(REPO / "scripts" / "evaluate.py"),
                             "--add_predictions", str(tmp_path / "p.npz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gone.stdout.close()
    assert gone.wait(timeout=300) == 141 and gone.stderr.read() == ""
    (tmp_path / "not.npz").write_text("not predictions")
    bad = evaluate_many("--add_predictions", str(tmp_path / "not.npz"))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "is not a prediction file" in bad.stderr.strip().splitlines()[-1]

    missing = evaluate_many("--workdir", str(workdir), str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "config.json not found" in missing.stderr.strip().splitlines()[-1]
    (tmp_path / "edited").mkdir()
    config = json.loads((workdir / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "precision": "fp8"}))
    edited = evaluate_many("--workdir", str(tmp_path / "edited"))
    assert edited.returncode == 2 and "Traceback" not in edited.stderr
    assert edited.stderr.strip().splitlines()[-1].endswith(
        "edited/config.json: unknown --precision 'fp8'; valid: fp32, bf16")
    # A valid config.json of another model: its checkpoints do not fit, one line (not one
    # warning per checkpoint, as for damaged ones, nor asyncio's tracebacks).
    shutil.copytree(workdir / "checkpoints", tmp_path / "edited" / "checkpoints")
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "width": 8}))
    edited = evaluate_many("--workdir", str(tmp_path / "edited"))
    assert edited.returncode == 2 and len(edited.stderr.strip().splitlines()) == 1, edited.stderr
    assert "do not fit the state restored into them" in edited.stderr


def test_compilation_cache_serves_a_second_run(run_train, tmp_path):
    # A second run of the same programs (another workdir) reads them from the cache and
    # trains to the same bits; `off` keeps the cache out. Another seed (with augmentation,
    # whose key depends on it) runs the same programs too: the seed is an argument of each.
    # Programs that compile in under JAX's default 1 s are cached too (the eval program took
    # 0.5-0.9 s on an H200). Compiled ahead on a worker thread, each compiles once.
    cache = tmp_path / "xla"
    env = {"JAX_LOG_COMPILES": "1"}
    runs = [run_train(f"--workdir={tmp_path / name}", *TINY, "--max_steps=2", "--augment",
                      f"--compilation_cache={where}", f"--seed={seed}", env=env)
            for name, where, seed in (("a", cache, 0), ("b", cache, 0), ("c", "off", 0),
                                      ("d", cache, 1))]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert any(cache.iterdir())
    programs = ("jit_single", "jit_fresh", "jit_epoch_permutation", "jit_evaluate")
    for program in programs:
        hit = f"Persistent compilation cache hit for '{program}'"
        assert hit not in runs[0].stderr and hit in runs[1].stderr and hit in runs[3].stderr
        compiled = f"Compiling {program.replace('_', '(', 1)})"
        assert runs[0].stderr.count(compiled) == runs[2].stderr.count(compiled) == 1, program
    assert "Persistent compilation cache" not in runs[2].stderr
    metrics = [(tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1] for name in "abcd"]
    loads = [{k: v for k, v in json.loads(m).items() if "time" not in k and "per_sec" not in k}
             for m in metrics]
    assert loads[0] == loads[1] == loads[2] != loads[3]


def test_train_under_a_profiler_still_writes_its_profile(fashion_mnist_dir, tmp_path):
    # train.py skips the interpreter's teardown at exit, but not under a profiler, which
    # writes its results then.
    out = subprocess.run(
        [sys.executable, "-m", "cProfile", "-o", str(tmp_path / "train.prof"), str(TRAIN),
         f"--data_dir={fashion_mnist_dir}", f"--workdir={tmp_path / 'run'}", *TINY,
         "--max_steps=2"], capture_output=True, text=True, timeout=600,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "done: step 2" in out.stdout
    functions = {name for _, _, name in pstats.Stats(str(tmp_path / "train.prof")).stats}
    assert "train_and_evaluate" in functions


@pytest.mark.parametrize("script", ["train.py", "evaluate.py", "benchmark.py", "experiment.py",
                                    "export.py"])
def test_help_shows_only_defaults_that_say_something(script):
    out = subprocess.run([sys.executable, str(REPO / "scripts" / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "options:" in text
    # (train.py's BOOL flags take a value, --augment=false, so there "default: False" is said)
    noises = ["(default: None)", "(default: [])"] + ["(default: False)"] * (script != "train.py")
    for noise in noises:
        assert noise not in text, (script, noise)


def test_the_start_up_report_comes_before_any_compilation(fashion_mnist_dir, tmp_path):
    # What a user sees first with `train.py > log`: what is trained, on what, for how long.
    from resnet_jax import models

    workdir = tmp_path / "run"
    cmd = [sys.executable, str(TRAIN), f"--data_dir={fashion_mnist_dir}", f"--workdir={workdir}",
           *TINY, WHOLE_TEST_SPLIT, "--epochs=2", "--max_steps=5"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_LOG_COMPILES": "1"}
    first = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:]
    lines = first.stdout.splitlines()
    compiling = next(i for i, line in enumerate(lines) if "Compiling " in line)
    # (JAX_LOG_COMPILES also logs tracing, as WARNING lines)
    report = [line for line in lines[:compiling] if not line.lower().startswith("warning")]
    params = models.param_count(models.abstract_variables(
        models.create_model("resnet18", num_classes=10, stem="small", width=4), (1, 16, 16, 1)))
    assert report == [
        f"data: fashion_mnist (raw IDX files in {fashion_mnist_dir}): 256 train and 10,000 test "
        "images, 28x28x1 resized to 16x16",
        f"model: resnet18 (small stem, width 4), {params:,} parameters, fp32 precision",
        "devices: 1 x cpu (cpu) in 1 process",
        "steps: 8 per epoch of batch 32, 5 in all (1 epoch), 1 per dispatch",
        f"workdir: {workdir}"], report
    # On a CPU, once the steps after the first are timed: the expected time per epoch.
    estimate = [line for line in lines if line.startswith("cpu: about ")]
    assert len(estimate) == 1 and "per epoch (" in estimate[0], lines
    assert "timed over 3 steps" in estimate[0]
    assert lines.index(estimate[0]) < next(i for i, line in enumerate(lines)
                                           if line.startswith("epoch 0.625/2 step 5"))

    again = subprocess.run(cmd[:-1] + ["--max_steps=6"], capture_output=True, text=True,
                           env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = again.stdout.splitlines()
    assert lines[3] == "steps: 8 per epoch of batch 32, 6 in all (1 epoch), 1 per dispatch"
    assert lines[5] == f"resuming from {workdir / 'checkpoints' / '5'} (step 5)"
