"""The README's promises, each against the code that keeps it: bf16 and the better recipe's
options through the trainer (train, checkpoint, kill, resume, evaluate.py), a full disk and the
checkpoint it cuts short, divergence after checkpoints exist."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, TINY, TRAIN, WHOLE_TEST_SPLIT

pytestmark = pytest.mark.slow

EVALUATE = REPO / "scripts" / "evaluate.py"


def _history(workdir) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _computed(records: list[dict]) -> list[dict]:
    """A run's records without its timings: what a resumed run must reproduce exactly."""
    timing = {"images_per_sec", "train_time", "eval_time", "wall_time"}
    return [{k: v for k, v in r.items() if k not in timing} for r in records]


def _state(workdir, checkpoint="latest") -> dict:
    from resnet_jax.train import load_checkpoint

    _, state, _ = load_checkpoint(workdir, checkpoint)
    return jax.device_get(state.arrays())


def _kill_after_first_checkpoint(data_dir, workdir, *args: str) -> None:
    """Starts train.py and SIGKILLs it once epoch 1's checkpoint (step 8) is final."""
    proc = subprocess.Popen([sys.executable, str(TRAIN), f"--data_dir={data_dir}",
                             f"--workdir={workdir}", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        while not (line := proc.stdout.readline()).startswith("epoch 1/"):
            assert line, "the run ended before its first epoch's line"
        deadline = time.monotonic() + 120  # Orbax renames the folder to "8" when final
        while not (workdir / "checkpoints" / "8").is_dir() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed, not finished (2 epochs: 16 steps)


# The README's better recipe, at TINY size: crop/flip, random erasing, label smoothing, several
# steps per dispatch (3: chunks end at steps 3, 6, 8 of each epoch), in bf16.
RECIPE = [*(a for a in TINY if not a.startswith("--steps_per_dispatch")), "--steps_per_dispatch=3",
          "--augment", "--random_erasing=0.5", "--label_smoothing=0.1", "--epochs=2",
          WHOLE_TEST_SPLIT]


def test_bf16_recipe_trains_resumes_after_a_kill_bit_exactly_and_evaluates(
        run_train, fashion_mnist_dir, tmp_path):
    args = [*RECIPE, "--precision=bf16"]
    whole = run_train(f"--workdir={tmp_path / 'whole'}", *args)
    assert whole.returncode == 0, whole.stderr[-2000:]
    _kill_after_first_checkpoint(fashion_mnist_dir, tmp_path / "killed", *args)
    resumed = run_train(f"--workdir={tmp_path / 'killed'}", *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "(step 8)" in resumed.stdout
    want, got = _state(tmp_path / "whole"), _state(tmp_path / "killed")
    for (path, a), b in zip(jax.tree.leaves_with_path(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert _computed(_history(tmp_path / "killed")) == _computed(_history(tmp_path / "whole"))
    # The parameters stay float32 (bf16 is the activations'): the checkpoint holds those.
    assert {x.dtype for x in jax.tree.leaves(got["params"])} == {np.dtype(np.float32)}

    # bf16 is what trained: the same steps in fp32 end elsewhere.
    fp32 = run_train(f"--workdir={tmp_path / 'fp32'}", *RECIPE, "--max_steps=8")
    assert fp32.returncode == 0, fp32.stderr[-2000:]
    assert not np.array_equal(_state(tmp_path / "fp32")["params"]["fc"]["kernel"],
                              _state(tmp_path / "whole", 8)["params"]["fc"]["kernel"])

    # evaluate.py restores the bf16 run and evaluates it as the trainer did, in bf16 (the
    # whole test split both times).
    last = _history(tmp_path / "killed")[-1]
    out = subprocess.run([sys.executable, str(EVALUATE), f"--workdir={tmp_path / 'killed'}"],
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (f"checkpoint step 16: test accuracy {last['val_accuracy']:.4f}, loss "
            f"{last['val_loss']:.4f} on 10000 images") in out.stdout, (out.stdout, last)


@pytest.fixture
def small_disk(tmp_path):
    """A 128 KiB tmpfs at tmp_path/disk: room for a tiny run's config, metrics and events, not
    for its first checkpoint. Skipped where this process may not mount one (not root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
    if mount.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip() or mount.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_its_half_written_checkpoint_is_never_listed(
        run_train, small_disk, tmp_path):
    args = [*TINY, "--epochs=2"]
    full = run_train(f"--workdir={small_disk / 'run'}", *args)
    assert full.returncode == 2, full.stderr[-2000:]
    assert full.stderr.count("\n") == 1 and full.stderr.startswith(
        "train.py: error: no space left on the disk ("), full.stderr
    assert full.stderr.rstrip().endswith("; free some, or write elsewhere")
    # What the write left: Orbax's temporary folder of step 8, not a checkpoint.
    left = [p.name for p in (small_disk / "run" / "checkpoints").iterdir()]
    assert left and all(name.startswith("8.") for name in left), left

    from resnet_jax.checkpoint import Checkpointer

    with Checkpointer(small_disk / "run" / "checkpoints", read_only=True) as checkpointer:
        assert checkpointer.steps() == []
    # Moved where there is room, the same command starts afresh: nothing to resume.
    workdir = tmp_path / "room"
    subprocess.run(["cp", "-a", str(small_disk / "run"), str(workdir)], check=True)
    again = run_train(f"--workdir={workdir}", *args, "--max_steps=1")
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"no checkpoint in {workdir}/checkpoints to resume"), (
        again.stdout)


def test_divergence_after_checkpoints_keeps_and_names_the_last_good_one(fashion_mnist_dir,
                                                                         tmp_path, monkeypatch):
    # The weights break at step 21 (epoch 3; checkpoints at 8 and 16): the real loop runs on,
    # from a state whose parameters are made infinite at that chunk.
    from resnet_jax import config as config_lib
    from resnet_jax import train

    make_loop = train.make_train_loop

    def breaking_at_step_21(*args, **kwargs):
        loop = make_loop(*args, **kwargs)

        def run(state, accum, data, perm, start, num_steps):
            if int(state.step) == 20:
                state = state.replace(params=jax.tree.map(lambda p: p * np.inf, state.params))
            return loop(state, accum, data, perm, start, num_steps)

        run.lower = loop.lower
        return run

    monkeypatch.setattr(train, "make_train_loop", breaking_at_step_21)
    config = config_lib.parse_config([f"--data_dir={fashion_mnist_dir}",
                                      f"--workdir={tmp_path}", *TINY, "--epochs=4"])
    with pytest.raises(train.DivergedError) as diverged:
        train.train_and_evaluate(config)
    assert str(diverged.value) == (
        f"loss became nan at step 21 (epoch 3); the last good checkpoint, step 16, is kept in "
        f"{tmp_path / 'checkpoints'}")
    # Nothing after it: no checkpoint (not even a half-written one), no record.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["16", "8"]
    assert [r["step"] for r in _history(tmp_path)] == [8, 16]
