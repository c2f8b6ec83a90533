"""Fault tolerance: exact resume after SIGKILL, SIGTERM checkpoints, damaged checkpoints, workdir
mismatches, divergence, and one-line errors for bad input."""

import gzip
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import chex
import jax
import numpy as np
import pytest
from conftest import TINY, TRAIN, xla_flags

from resnet_jax.errors import UserError

pytestmark = pytest.mark.slow

EPOCHS = ["--epochs=3"]


def restore(workdir):
    from resnet_jax.train import restore_state

    _, state, _, step = restore_state(workdir)
    return step, jax.device_get(state.arrays())


def history(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


TIMING = {"images_per_sec", "train_time", "eval_time", "wall_time"}


def computed(records):
    """A run's metrics without the timings: what resuming must reproduce exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.fixture(scope="module")
def reference(run_train, tmp_path_factory):
    """An uninterrupted run of the tiny configuration, and how long it took."""
    workdir = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    out = run_train(f"--workdir={workdir}", *TINY, *EPOCHS)
    assert out.returncode == 0, out.stderr[-2000:]
    return workdir, time.monotonic() - start


def popen_train(fashion_mnist_dir, workdir, *extra):
    cmd = [sys.executable, str(TRAIN), f"--data_dir={fashion_mnist_dir}",
           f"--workdir={workdir}", *TINY, *EPOCHS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_sigkill_at_random_points_then_resume_is_bit_identical(reference, fashion_mnist_dir,
                                                               tmp_path):
    ref_dir, ref_seconds = reference
    workdir = tmp_path / "killed"
    rng = random.Random(1234)
    records = history(ref_dir)
    epoch_seconds = records[-1]["wall_time"] - records[-2]["wall_time"]
    kills, finished, outputs = 0, False, []
    # Kills alternate between a random moment (start-up, mostly: a restart repeats it; steps,
    # evaluation and checkpoint writes otherwise) and a random moment of the epoch after the
    # process's first epoch ended and its checkpoint was finalised. The latter stays within
    # 0.8 of an epoch, so that the process cannot finish first: restarts then resume from
    # successive checkpoints (8, then 16) whatever the timing.
    for attempt in range(6):
        proc = popen_train(fashion_mnist_dir, workdir)
        lines = []
        if attempt % 2:
            while not (line := proc.stdout.readline()).startswith("epoch ") and line:
                lines.append(line)
            lines.append(line)
            if step := re.search(r" step (\d+):", line):
                saved = workdir / "checkpoints" / step.group(1)  # (renamed there when final)
                deadline = time.monotonic() + 120
                while not saved.is_dir() and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            delay = rng.uniform(0.1, 0.8) * epoch_seconds
        else:
            delay = rng.uniform(0.05, 0.5) * ref_seconds
        try:
            proc.wait(timeout=delay)
            finished = proc.returncode == 0
            assert finished, proc.stderr.read()[-2000:]
            outputs.append("".join(lines) + proc.stdout.read())
            break
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            kills += 1
            outputs.append("".join(lines) + proc.stdout.read())
    if not finished:
        proc = popen_train(fashion_mnist_dir, workdir)
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-2000:]
        outputs.append(out)
    resumed = [int(m) for out in outputs for m in re.findall(r"resuming from \S+ \(step (\d+)\)",
                                                              out)]
    # shown with -s; docs/reliability.md quotes these runs
    print(f"{kills} kills; restarts resumed from steps {resumed}; final state identical")
    assert kills >= 2 and len(set(resumed) - {0}) >= 2, (kills, resumed)

    ref_step, ref_state = restore(ref_dir)
    step, state = restore(workdir)
    assert step == ref_step == 24
    leaves, ref_leaves = jax.tree.leaves_with_path(state), jax.tree.leaves_with_path(ref_state)
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]
    for (path, a), (_, b) in zip(leaves, ref_leaves, strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    got, want = history(workdir), history(ref_dir)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want] == [1, 2, 3]
    for key in ("step", "train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [r[key] for r in got] == [r[key] for r in want], key


def test_sigterm_checkpoints_and_resumes(reference, fashion_mnist_dir, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "term"
    proc = popen_train(fashion_mnist_dir, workdir)
    # Wait until training is under way (the first epoch's line), then ask it to stop.
    line = ""
    while "epoch 1/" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM" in err
    assert "checkpointed step" in out and "run the same command to resume" in out
    assert "done:" not in out  # stopped, not finished
    saved = int(out.split("checkpointed step ")[1].split()[0])
    assert 8 <= saved < 24

    proc = popen_train(fashion_mnist_dir, workdir)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"(step {saved})" in out
    _, ref_state = restore(ref_dir)
    _, state = restore(workdir)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert computed(history(workdir)) == computed(history(ref_dir))


def test_resume_mid_epoch_and_mid_dispatch_is_bit_identical(run_train, tmp_path):
    # Three steps per dispatch (an accelerator's in-jit loop, here on the CPU). A run stopped at
    # step 10 (--max_steps: mid-epoch and mid-dispatch) then extended computes what an
    # uninterrupted one does: the state bit for bit, and every epoch's metrics, whose running
    # sums over the epoch's first steps come from the checkpoint.
    args = [*(a for a in TINY if not a.startswith("--steps_per_dispatch")),
            "--steps_per_dispatch=3", "--epochs=2"]
    for workdir, extra in (("whole", []), ("cut", ["--max_steps=10"]), ("cut", [])):
        out = run_train(f"--workdir={tmp_path / workdir}", *args, *extra)
        assert out.returncode == 0, out.stderr[-2000:]
    assert "(step 10)" in out.stdout  # the last run resumed there
    assert computed(history(tmp_path / "cut")) == computed(history(tmp_path / "whole"))
    (step, state), (ref_step, ref_state) = restore(tmp_path / "cut"), restore(tmp_path / "whole")
    assert step == ref_step == 16
    chex.assert_trees_all_equal(state, ref_state)


def test_a_closed_output_pipe_stops_quietly_and_keeps_the_checkpoint(fashion_mnist_dir,
                                                                     tmp_path):
    # The reader goes away after the start-up report and the CPU's time estimate (at step 4):
    # the first epoch's line finds no reader. The run stops with status 141 and nothing on
    # stderr, after the checkpoint being written is finished.
    proc = popen_train(fashion_mnist_dir, tmp_path / "piped")
    while not (line := proc.stdout.readline()).startswith("cpu: about "):
        assert line, proc.stderr.read()[-2000:]
    proc.stdout.close()  # (the epoch's 4 other steps and evaluation take far longer than this)
    assert proc.wait(timeout=300) == 141
    assert proc.stderr.read() == ""
    kept = sorted(p.name for p in (tmp_path / "piped" / "checkpoints").iterdir())
    assert kept == ["8"], kept  # whole: no half-written (tmp) checkpoint folder


def test_each_epochs_checkpoint_holds_the_state_at_its_step(reference, run_train, tmp_path):
    # The trainer queues the next epoch's first steps (which take the state's buffers) before it
    # writes an epoch's checkpoint, from a copy: that copy must be the epoch's end, bit for bit.
    from resnet_jax.train import restore_state

    ref_dir, _ = reference
    out = run_train(f"--workdir={tmp_path}", *TINY, *EPOCHS, "--max_steps=8")
    assert out.returncode == 0, out.stderr[-2000:]
    step, state = restore(tmp_path)
    _, ref_state, _, ref_step = restore_state(ref_dir, "8")
    assert step == ref_step == 8
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(jax.device_get(ref_state.arrays())),
                    strict=True):
        np.testing.assert_array_equal(a, b)


def test_load_checkpoint_needs_no_data(reference, tmp_path, caplog):
    # Weights for inference on another machine: the run's data folder is gone, the step is an
    # int, and the restore logs nothing (Orbax's read-only notes are filtered).
    from resnet_jax.train import load_checkpoint, restore_state

    ref_dir, _ = reference
    workdir = tmp_path / "moved"
    shutil.copytree(ref_dir, workdir)
    saved = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**saved, "data_dir": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="does not exist"):
        restore_state(workdir, 16)
    with caplog.at_level(logging.INFO):
        config, state, step = load_checkpoint(workdir, 16)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records
    _, ref_state, _, ref_step = restore_state(ref_dir, "16")
    assert step == ref_step == 16 and config.arch == saved["arch"]
    chex.assert_trees_all_equal(jax.device_get(state.arrays()),
                                jax.device_get(ref_state.arrays()))
    # The schedule's length comes from the run's record; without it, a one-line error.
    del saved["resolved"]["steps_per_epoch"]
    (workdir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError, match="does not record the run's steps per epoch"):
        load_checkpoint(workdir, 16)


def _checkpoint_files(step_dir):
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference, run_train,
                                                                  tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "damaged"
    shutil.copytree(ref_dir, workdir)
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps[-3:] == [8, 16, 24]
    # Truncate every array file of the newest checkpoint.
    for f in _checkpoint_files(workdir / "checkpoints" / "24" / "state"):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    from resnet_jax.train import restore_state

    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*24"):
        _, _, _, step = restore_state(workdir)
    assert step == 16
    # The best checkpoint by val_accuracy, or the next best where that is the damaged one.
    accuracy = {r["step"]: r["val_accuracy"] for r in history(ref_dir)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, _, best = restore_state(workdir, "best")
    assert best == max((8, 16), key=lambda s: (accuracy[s], s))
    assert (workdir / "checkpoints" / "24").is_dir()  # reading moves nothing

    # Training resumes from step 16 and writes step 24 again: the damaged one is moved aside,
    # and the run ends as the uninterrupted one did.
    out = run_train(f"--workdir={workdir}", *TINY, *EPOCHS)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "(step 16)" in out.stdout
    assert "moved the unreadable checkpoint of step 24" in out.stderr
    # One line per warning: not the thousands of lines of the reads Orbax abandoned.
    assert [line.split(":")[0] for line in out.stderr.splitlines()] == ["warning"] * 2, out.stderr
    assert _checkpoint_files(workdir / "damaged_checkpoints" / "24" / "state")
    _, ref_state = restore(ref_dir)
    step, state = restore(workdir)
    assert step == 24
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["val_accuracy"] for r in history(workdir)] == list(accuracy.values())

    # A half-written save (what a kill during an async write leaves) is not a checkpoint.
    tmp = workdir / "checkpoints" / "32.orbax-checkpoint-tmp-1234"
    tmp.mkdir()
    (tmp / "junk").write_text("partial")

    # None usable: a one-line error, exit 2.
    for step_dir in (workdir / "checkpoints").iterdir():
        if step_dir.name.isdigit():
            for f in _checkpoint_files(step_dir):
                f.write_bytes(b"garbage")
    out = run_train(f"--workdir={workdir}", *TINY, "--epochs=4")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith("train.py: error: no usable checkpoint")


def test_workdir_mismatch_and_overwrite(reference, run_train, tmp_path):
    ref_dir, _ = reference
    workdir = tmp_path / "mismatch"
    shutil.copytree(ref_dir, workdir)
    out = run_train(f"--workdir={workdir}", *TINY, *EPOCHS, "--arch=resnet34")
    assert out.returncode == 2
    assert "holds a different run (arch: 'resnet18' -> 'resnet34')" in out.stderr
    assert "--overwrite" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # Fewer epochs than the checkpoints hold: refused, not "done" with a contradicting config.
    out = run_train(f"--workdir={workdir}", *TINY, "--epochs=2")
    assert out.returncode == 2
    assert "holds step 24, past this run's last step 16" in out.stderr
    config = (workdir / "config.json").read_text()
    (workdir / "config.json").write_text("[1, 2]")
    out = run_train(f"--workdir={workdir}", *TINY, *EPOCHS)
    assert out.returncode == 2 and "is unreadable or not a training config" in out.stderr
    (workdir / "config.json").write_text(config)

    # Checkpoints without config.json: never silently overwritten.
    (workdir / "config.json").unlink()
    out = run_train(f"--workdir={workdir}", *TINY, *EPOCHS)
    assert out.returncode == 2 and "holds checkpoints of an unknown run" in out.stderr

    # --overwrite starts afresh; checkpoints every 2 epochs, the last one kept plus the best.
    out = run_train(f"--workdir={workdir}", *TINY, "--epochs=4", "--checkpoint_every=2",
                    "--keep_checkpoints=1", "--overwrite")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming" not in out.stdout
    records = history(workdir)
    assert [r["step"] for r in records] == [8, 16, 24, 32]
    best = max((r for r in records if r["step"] in (16, 32)), key=lambda r: r["val_accuracy"])
    kept = {int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()}
    assert kept == {32, best["step"]}


def test_divergence_stops_with_the_step(run_train, tmp_path):
    workdir = tmp_path / "nan"
    out = run_train(f"--workdir={workdir}", *TINY, "--epochs=1", "--learning_rate=1e38")
    assert out.returncode == 3, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: loss became ") and " at step " in last
    assert "(epoch 1)" in last and last.endswith("no checkpoint had been saved")
    # Nothing was saved after the loss stopped being finite.
    assert not any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    # With no checkpoint there is nothing to resume: the corrected command may use the workdir.
    out = run_train(f"--workdir={workdir}", *TINY, "--epochs=1", "--max_steps=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((workdir / "config.json").read_text())["learning_rate"] == 0.01


def test_weights_broken_by_an_epochs_last_step_are_not_saved(run_train, tmp_path):
    # The last step's loss is computed before its update, so it can be finite while the update
    # leaves the weights infinite: the evaluation catches it, before the checkpoint.
    out = run_train(f"--workdir={tmp_path}", *TINY, "--epochs=1", "--max_steps=1",
                    "--learning_rate=1e38")
    assert out.returncode == 3, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("train.py: error: the validation loss became ")
    assert "after step 1 (epoch 1), though the training loss was finite" in last
    assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())


def test_a_failure_as_the_next_epoch_starts_keeps_the_finished_epoch(fashion_mnist_dir,
                                                                     tmp_path, monkeypatch):
    # An epoch's checkpoint and record are written after the next epoch's first chunk is
    # queued; if queueing it fails (out of device memory, say), they are written first.
    from resnet_jax import config as config_lib
    from resnet_jax import train

    make_loop, calls = train.make_train_loop, []

    def failing_at_the_ninth_chunk(*args, **kwargs):
        loop = make_loop(*args, **kwargs)

        def run(*loop_args):
            calls.append(1)
            if len(calls) == 9:  # epoch 2's first (8 chunks of one step per epoch)
                raise RuntimeError("RESOURCE_EXHAUSTED: injected")
            return loop(*loop_args)

        run.lower = loop.lower
        return run

    monkeypatch.setattr(train, "make_train_loop", failing_at_the_ninth_chunk)
    config = config_lib.parse_config([f"--data_dir={fashion_mnist_dir}",
                                      f"--workdir={tmp_path}", *TINY, *EPOCHS])
    with pytest.raises(RuntimeError, match="injected"):
        train.train_and_evaluate(config)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()] == ["8"]
    assert [r["step"] for r in history(tmp_path)] == [8]


def _idx(path, magic, dims, payload):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    with gzip.open(path, "wb") as f:
        f.write(header + payload)


def _bad_data_dir(tmp_path, problem):
    folder = tmp_path / problem
    folder.mkdir()
    n_train, n_test = 4, 2
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, n * 28 * 28, dtype=np.uint8).tobytes()
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        count = n + 1 if problem == "count" and prefix == "train" else n
        if problem == "labels" and prefix == "train":
            labels[0] = 12
        magic = 1234 if problem == "magic" and prefix == "t10k" else 2051
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", magic, (count, 28, 28), images)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels.tobytes())
    if problem == "truncated":
        f = folder / "train-images-idx3-ubyte.gz"
        f.write_bytes(f.read_bytes()[:-20])
    return folder


def _train_main(argv, capsys):
    """scripts/train.py's main in this process: (exit code, stderr lines)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_script", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        code = module.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args, message", [
    (["--arch=resnet19"], "unknown --arch 'resnet19'; valid: plain18"),
    (["--dataset=imagenet"], "unknown --dataset 'imagenet'; valid: fashion_mnist"),
    (["--optimizer=lion"], "--optimizer"),
    (["--schedule=step"], "--schedule"),
    (["--epochs=0"], "--epochs must be positive, got 0"),
    (["--batch_size=-8"], "--batch_size must be positive, got -8"),
    (["--learning_rate=0"], "--learning_rate must be positive, got 0.0"),
    (["--epochs=two"], "--epochs expects int, got 'two'"),
    (["--image_size=12", "--stem=imagenet"], "--image_size 12 is too small for resnet18"),
    (["--data_dir=/nonexistent/fmnist"], "/nonexistent/fmnist does not exist"),
    (["--momentum=nan"], "--momentum must be a finite number, got nan"),
    (["--workdir="], "--workdir is empty; give a path"),
    (["--cardinality=4"], "--cardinality applies to the bottleneck archs (preact_resnet50, "),
    (["--eval_examples=10001"], "--eval_examples 10001 exceeds the 10000 examples of the split"),
    (["--schedule=cosine", "--epochs=1", "--warmup_epochs=0.9999", "--train_examples=1280"],
     "--warmup_epochs 0.9999 is 10 steps, the whole run of 10"),
    (["--warmup_epochs=2e9"], "--warmup_epochs 2000000000.0 exceeds --epochs 10"),
    (["--compilation_cache=/dev/null"], "--compilation_cache /dev/null is a file, not a dir"),
    (["--learning_rate=1e300"], "--learning_rate 1e+300 is too large for float32"),
    (["--epoch=3"], "unrecognized arguments: --epoch=3"),  # no abbreviations
    (["--image_size=20000", "--stem=small", "--width=4", "--batch_size=32",
      "--train_examples=256", "--eval_examples=64", "--steps_per_dispatch=1"],
     "out of device memory (RESOURCE_EXHAUSTED"),  # XLA could not allocate: not a bug
])
def test_bad_flags_are_one_line_with_exit_2(args, message, capsys, tmp_path, fashion_mnist_dir):
    argv = [f"--workdir={tmp_path / 'w'}", f"--data_dir={fashion_mnist_dir}", *args]
    code, err = _train_main(argv, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert message in err[0]


@pytest.mark.parametrize("problem, message", [
    ("magic", "magic"), ("truncated", "truncated"), ("count", "count"),
    ("labels", "has 10 classes (0..9)"),
])
def test_bad_data_is_one_line_with_exit_2(problem, message, capsys, tmp_path):
    folder = _bad_data_dir(tmp_path, problem)
    code, err = _train_main([f"--workdir={tmp_path / 'w'}", f"--data_dir={folder}"], capsys)
    assert code == 2
    assert len(err) == 1, err
    assert message in err[0].lower(), err[0]


def test_bad_workdirs_are_one_line_with_exit_2(capsys, tmp_path, fashion_mnist_dir):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for workdir, message in ((a_file, "is a file, not a directory"),
                             (a_file / "sub", "is not writable"),
                             # a name from bytes that are not UTF-8 (os.fsdecode's surrogates)
                             (tmp_path / "w\udcff", "is not a UTF-8 path")):
        code, err = _train_main([f"--workdir={workdir}", f"--data_dir={fashion_mnist_dir}",
                                 *TINY], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], err

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "7").mkdir(parents=True)
    (foreign / "checkpoints" / "7" / "weights.pt").write_text("not ours")
    code, err = _train_main([f"--workdir={foreign}", f"--data_dir={fashion_mnist_dir}", *TINY],
                            capsys)
    assert code == 2 and len(err) == 1 and "checkpoints of an unknown run" in err[0], err

    squatted = tmp_path / "squatted"  # a file where the run keeps its checkpoints folder
    squatted.mkdir()
    (squatted / "checkpoints").write_text("")
    code, err = _train_main([f"--workdir={squatted}", f"--data_dir={fashion_mnist_dir}", *TINY],
                            capsys)
    assert code == 2 and len(err) == 1 and "holds a file checkpoints where" in err[0], err


def test_a_run_that_saved_no_checkpoint_starts_afresh_and_says_so(run_train, tmp_path):
    workdir = tmp_path / "w"
    args = [f"--workdir={workdir}", *TINY, "--epochs=1"]
    first = run_train(*args)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "no checkpoint" not in first.stdout  # a new workdir: nothing to say
    shutil.rmtree(workdir / "checkpoints")  # as if killed before its first checkpoint
    again = run_train(*args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"no checkpoint in {workdir}/checkpoints to resume: "
                                   "starting from step 0\n"), again.stdout
    assert again.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]  # the same run


def test_a_second_signal_during_training_exits_at_once(fashion_mnist_dir, tmp_path):
    proc = popen_train(fashion_mnist_dir, tmp_path / "twice")
    while not (line := proc.stdout.readline()).startswith("epoch 1/"):
        assert line or proc.poll() is None, proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    while "send it again to exit at once" not in (line := proc.stderr.readline()):
        assert line, proc.stderr.read()[-2000:]  # (two signals at once would be taken as one)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143


@pytest.mark.parametrize("sig, status, word", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_start_up_is_one_line(sig, status, word, fashion_mnist_dir, tmp_path,
                                              sigint_not_ignored):
    # -X importtime shows when JAX is being imported: inside the script's guard, before
    # training's own handler (which checkpoints) exists.
    proc = subprocess.Popen([sys.executable, "-X", "importtime", str(TRAIN),
                             f"--workdir={tmp_path / 'w'}", f"--data_dir={fashion_mnist_dir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not re.search(r"\|\s+jax(\.|$)", line := proc.stderr.readline()):
            assert line, proc.stderr.read()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=120)
    finally:  # a run the signal missed (SIGINT ignored) would train the chapter's 10 epochs
        proc.kill()
    assert proc.returncode == status, err[-2000:]
    assert err.strip().splitlines()[-1] == f"train.py: {word}" and out == ""


def test_batch_not_divisible_by_devices_is_one_line(fashion_mnist_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(8), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(TRAIN), f"--data_dir={fashion_mnist_dir}",
                          f"--workdir={tmp_path}", "--batch_size=12"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip() == ("train.py: error: --batch_size 12 is not divisible by the 8 "
                                  "devices; use a multiple of the device count")
