"""The train and eval steps, and their sharded loops, on tiny models and synthetic data."""

import logging
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import UNOPTIMISED

from resnet_jax import create_model
from resnet_jax import data as data_lib
from resnet_jax.train import (
    DeviceData,
    create_train_state,
    empty_accum,
    eval_step,
    make_eval_loop,
    make_mesh,
    make_predict_loop,
    make_train_loop,
    replicate,
    train_step,
)

REPO = Path(__file__).resolve().parents[1]


def tiny_state(lr=0.05, seed=0, **options):
    model = create_model("resnet18", num_classes=10, width=4, stem="small", **options)
    return create_train_state(model, optax.sgd(lr), jax.random.key(seed), (1, 16, 16, 1))


def batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.random((n, 16, 16, 1), np.float32)),
            "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    state, b = tiny_state(), batch()
    step = jax.jit(train_step)
    losses = []
    for _ in range(15):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 15
    assert losses[-1] < 0.5 * losses[0], losses


def test_an_int_seed_is_the_key_of_that_seed():
    model = create_model("resnet18", num_classes=10, width=4, stem="small")
    from_int = create_train_state(model, optax.sgd(0.1), 3, (1, 16, 16, 1))
    chex.assert_trees_all_equal(from_int.arrays(), tiny_state(lr=0.1, seed=3).arrays())
    assert not np.array_equal(from_int.params["fc"]["kernel"],
                              tiny_state(seed=4).params["fc"]["kernel"])


def test_train_step_updates_batch_stats_and_eval_uses_them():
    state, b = tiny_state(), batch()
    new, _ = jax.jit(train_step)(state, b)
    before = jax.tree.leaves(state.batch_stats)
    after = jax.tree.leaves(new.batch_stats)
    assert any(not np.allclose(x, y) for x, y in zip(before, after, strict=True))
    # Eval mode normalises with running statistics: an example's logits do not depend on the
    # rest of the batch, unlike in train mode.
    alone = new.apply_fn(new.variables, b["image"][:1], train=False)
    in_batch = new.apply_fn(new.variables, b["image"], train=False)[:1]
    np.testing.assert_allclose(alone, in_batch, rtol=1e-5, atol=1e-5)
    train_alone, _ = new.apply_fn(new.variables, b["image"][:2], train=True,
                                  mutable=["batch_stats"])
    train_in_batch, _ = new.apply_fn(new.variables, b["image"], train=True,
                                     mutable=["batch_stats"])
    assert not np.allclose(train_alone[:1], train_in_batch[:1], atol=1e-3)


def test_eval_step_sums_respect_the_mask():
    state, b = tiny_state(), batch(12)
    mask = jnp.arange(12) < 7
    full = eval_step(state, b)
    masked = eval_step(state, {**b, "mask": mask})
    first7 = eval_step(state, {k: v[:7] for k, v in b.items()})
    assert float(full["count"]) == 12 and float(masked["count"]) == 7
    np.testing.assert_allclose(masked["loss_sum"], first7["loss_sum"], rtol=1e-5)
    assert float(masked["correct"]) == float(first7["correct"])
    np.testing.assert_array_equal(masked["confusion"], first7["confusion"])
    assert float(masked["confusion"].sum()) == 7


def test_the_loss_is_cross_entropy_with_label_smoothing():
    state, b = tiny_state(), batch()
    step = jax.jit(train_step)
    _, plain = step(state, b)  # (label_smoothing a Python 0.0 inside: not traced)
    _, smooth = step(state, b, label_smoothing=0.1)  # traced
    # Independently: the batch mean of (1 - e) * -log p_label + e * mean over classes of -log p.
    logits, _ = state.apply_fn(state.variables, b["image"], train=True, mutable=["batch_stats"])
    nll = -np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64)))
    labels = np.asarray(b["label"])
    for eps, metrics in ((0.0, plain), (0.1, smooth)):
        want = np.mean((1 - eps) * nll[np.arange(len(labels)), labels] + eps * nll.mean(-1))
        assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    _, traced0 = step(state, b, label_smoothing=0.0)  # traced, the same program as 0.1
    np.testing.assert_allclose(traced0["loss"], plain["loss"], rtol=1e-5)


def synthetic_data(num_train=40, num_test=13, seed=0):
    rng = np.random.default_rng(seed)
    return DeviceData(
        train_images=rng.integers(0, 256, (num_train, 12, 12, 1), dtype=np.uint8),
        train_labels=rng.integers(0, 10, num_train).astype(np.int32),
        test_images=rng.integers(0, 256, (num_test, 12, 12, 1), dtype=np.uint8),
        test_labels=rng.integers(0, 10, num_test).astype(np.int32))


def test_eval_loop_counts_an_odd_sized_test_set_exactly_once():
    mesh = make_mesh()
    host = synthetic_data(num_test=13)
    state = tiny_state()
    idx, mask = data_lib.eval_batches(13, 4)
    sums = make_eval_loop(mesh, image_size=16)(state, replicate(host, mesh),
                                               *replicate((idx, mask), mesh))
    assert float(sums["count"]) == 13
    assert float(sums["confusion"].sum()) == 13
    # Each true label is counted as often as it occurs.
    np.testing.assert_array_equal(np.asarray(sums["confusion"]).sum(1),
                                  np.bincount(host.test_labels, minlength=10))


def test_predict_loop_gives_probabilities_and_flip_averages_the_mirror_image():
    mesh = make_mesh()
    host = synthetic_data(num_test=13)
    state = tiny_state()
    data, idx = replicate(host, mesh), replicate(data_lib.eval_batches(13, 4)[0], mesh)
    plain, flipped = (np.asarray(make_predict_loop(mesh, image_size=16, flip=flip)(
        state, data, idx)).reshape(-1, 10)[:13] for flip in (False, True))

    def probs(images):
        return jax.nn.softmax(state.apply_fn(state.variables, images, train=False))

    images = data_lib.preprocess(jnp.asarray(host.test_images), 16)
    np.testing.assert_allclose(plain.sum(-1), 1, rtol=1e-5)
    np.testing.assert_allclose(plain, probs(images), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(flipped, (probs(images) + probs(images[:, :, ::-1])) / 2,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, flipped, atol=1e-4)


def test_chunked_train_loop_does_not_depend_on_the_split():
    """Chunks of several steps give the same bits however they are split (exact resume relies on
    it); a lone step (compiled without the loop) agrees up to rounding."""
    mesh = make_mesh()
    data = replicate(synthetic_data(), mesh)
    loop = make_train_loop(mesh, batch_size=8, image_size=16, seed=3, augment=True,
                           random_erasing=0.5)
    perm = data_lib.epoch_permutation(3, 0, 40)

    def run(splits):
        state, accum, start = tiny_state(), empty_accum(), 0
        for n in splits:
            state, accum, _ = loop(state, accum, data, perm, np.int32(start), np.int32(n))
            start += n
        assert int(accum["steps"]) == 4 and int(accum["nonfinite_step"]) == -1
        return {"params": state.params, "batch_stats": state.batch_stats, "accum": accum}

    whole = run([4])
    chex.assert_trees_all_equal(whole, run([2, 2]))
    chex.assert_trees_all_close(whole, run([1, 1, 1, 1]), rtol=1e-4, atol=1e-5)
    # Lone steps inside the loop (what the trainer does when it dispatches several at a time).
    loop = make_train_loop(mesh, batch_size=8, image_size=16, seed=3, augment=True,
                           random_erasing=0.5, loop_single_steps=True)
    chex.assert_trees_all_equal(whole, run([2, 1, 1]))


def test_train_loop_checks_its_steps_and_compiles_once_for_any_int_type(caplog):
    mesh = make_mesh()
    data = replicate(synthetic_data(num_train=64), mesh)
    loop = make_train_loop(mesh, batch_size=8, image_size=16, seed=0)
    perm = data_lib.epoch_permutation(0, 0, 64)
    state, accum = tiny_state(), empty_accum()
    for start in (0, 2):  # the second call sees the state as the loop returns it
        state, accum, _ = loop(state, accum, data, perm, np.int32(start), np.int32(2))
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        state, accum, _ = loop(state, accum, data, perm, 4, 3)  # Python ints: the same program
    compiled = [r.getMessage() for r in caplog.records if "jit(loop)" in r.getMessage()]
    assert not compiled, compiled
    assert int(accum["steps"]) == 7
    with pytest.raises(ValueError, match="2 steps from step 7 of batch 8 do not fit the perm"):
        loop(state, accum, data, perm, 7, 2)  # 9 batches of 8 from 64 examples
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*31\), got 2147483648"):
        make_train_loop(mesh, batch_size=8, image_size=16, seed=2**31)
    with pytest.raises(TypeError, match="preprocess takes uint8 images, got float32"):
        data_lib.preprocess(jnp.zeros((1, 12, 12, 1)), 16)  # [0, 1] floats: not again / 255


def test_random_erasing_changes_the_batches_and_nothing_else():
    mesh = make_mesh()
    data = replicate(synthetic_data(), mesh)
    perm = data_lib.epoch_permutation(0, 0, 40)

    def params_after_two_steps(**options):
        loop = make_train_loop(mesh, batch_size=8, image_size=16, seed=0, augment=True, **options)
        state, _, _ = loop(tiny_state(), empty_accum(), data, perm, np.int32(0), np.int32(2))
        return state.params

    plain = params_after_two_steps()
    chex.assert_trees_all_equal(plain, params_after_two_steps(random_erasing=0.0))
    erased = params_after_two_steps(random_erasing=1.0)
    assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain),
                                                        jax.tree.leaves(erased), strict=True))


def test_nonfinite_loss_is_recorded_with_its_step():
    mesh = make_mesh()
    data = replicate(synthetic_data(), mesh)
    loop = make_train_loop(mesh, batch_size=8, image_size=16, seed=0)
    state = tiny_state(lr=1e30)  # Diverges within a few steps.
    state, accum, _ = loop(state, empty_accum(), data, data_lib.epoch_permutation(0, 0, 40),
                           np.int32(0), np.int32(5))
    assert not np.isfinite(float(accum["loss_sum"]))
    assert 0 <= int(accum["nonfinite_step"]) < 5


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_eight_devices_match_one_device(precision):
    """8 fake CPU devices vs 1: same params and batch_stats after two steps."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu", **UNOPTIMISED}
    out = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_worker.py"),
                          precision], env=env, capture_output=True, text=True, timeout=600)
    assert "devices=8" in out.stdout.splitlines(), out.stdout
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]


def test_prediction_files_are_checked_whole(tmp_path):
    from resnet_jax.errors import UserError
    from resnet_jax.train import load_predictions, save_predictions

    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    good = {"probabilities": probs, "labels": np.array([0, 2, 1, 1, 0], np.int32),
            "class_names": ["a", "b", "c"], "members": [{"workdir": "w", "step": 1}]}
    save_predictions(tmp_path / "good.npz", good)
    assert [p.name for p in tmp_path.iterdir()] == ["good.npz"]  # no temporary file left
    loaded = load_predictions(tmp_path / "good.npz")
    np.testing.assert_array_equal(loaded["probabilities"], probs)
    assert loaded["class_names"] == good["class_names"] and loaded["members"] == good["members"]
    for change, reason in (({"labels": np.array([0, 2, 1, 1, 3])}, "labels are not class"),
                           ({"labels": np.zeros(5, np.float32)}, "labels are not class"),
                           ({"probabilities": probs * np.nan}, "rows are not probabilities"),
                           ({"probabilities": probs * 2}, "rows are not probabilities"),
                           ({"probabilities": probs[:, :2]}, "inconsistent shapes"),
                           ({"members": ["w"]}, "members are not a list of models"),
                           ({"members": {"w": 1}}, "members are not a list of models")):
        save_predictions(tmp_path / "bad.npz", {**good, **change})
        with pytest.raises(UserError, match=f"is not a prediction file .*{reason}"):
            load_predictions(tmp_path / "bad.npz")
    with pytest.raises(UserError, match="is a folder; name a file"):
        save_predictions(tmp_path, good)
    # A file cut short, one with a damaged byte in its compressed data, one without a field.
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
    member = zipfile.ZipFile(tmp_path / "good.npz").getinfo("probabilities.npy")
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:][:4])
    start = (member.header_offset + 30 + name_len + extra_len  # its compressed data, halfway
             + member.compress_size // 2)
    (tmp_path / "flipped.npz").write_bytes(data[:start] + bytes([data[start] ^ 0xFF])
                                           + data[start + 1:])
    np.savez(tmp_path / "partial.npz", labels=good["labels"])
    for name, reason in (("cut", r"is damaged or cut short \(File is not a zip file\)"),
                         ("flipped", r"is damaged or cut short \(.+\)"),
                         ("partial", r"is not a prediction file .*\(probabilities is not a "
                                     r"file in the archive\)")):
        with pytest.raises(UserError, match=f"{name}.npz {reason}"):
            load_predictions(tmp_path / f"{name}.npz")
    # An ensemble of files over other classes (same labels): refused, not silently mixed.
    from resnet_jax.train import evaluate_ensemble

    save_predictions(tmp_path / "other.npz", {**good, "class_names": ["x", "y", "z"]})
    with pytest.raises(UserError, match="other.npz holds predictions over other classes"):
        evaluate_ensemble([], saved=[tmp_path / "good.npz", tmp_path / "other.npz"])



@pytest.mark.parametrize("backend, dispatch, cached", [
    ("cpu", 1, False), ("gpu", 100, True), ("tpu", 100, True)])
def test_backend_defaults_follow_the_backend_given(backend, dispatch, cached, monkeypatch,
                                                   tmp_path):
    from resnet_jax.train import compilation_cache_dir, default_steps_per_dispatch

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_steps_per_dispatch(backend) == dispatch
    auto = compilation_cache_dir("auto", backend)
    assert auto == (tmp_path / "resnet_jax" / "xla" if cached else None)
    assert compilation_cache_dir("off", backend) is None
    assert compilation_cache_dir(str(tmp_path / "c"), backend) == tmp_path / "c"
    # Without a backend, JAX's own is asked: on this test's, the same as naming it.
    here = jax.default_backend()
    assert default_steps_per_dispatch() == default_steps_per_dispatch(here)
    assert compilation_cache_dir("auto") == compilation_cache_dir("auto", here)


def test_the_cpus_epoch_estimate_times_only_steps_after_the_eval_compilation():
    # Steps that overlapped the eval program's compilation ran 1.7x slower (--preset=quick):
    # the clock starts after it. The chunk queued behind the one read while waiting finished
    # meanwhile, so the clock starts when that chunk is read; each later chunk takes `step`.
    from concurrent.futures import ThreadPoolExecutor

    from resnet_jax.train import _EpochEstimate

    step = 0.05
    with ThreadPoolExecutor(1) as pool:
        compiling = pool.submit(time.sleep, 4 * step)
        estimate = _EpochEstimate(steps_per_epoch=100, enabled=True, compiling=compiling)
        assert estimate.steps_done(1) is None and compiling.done()  # it waited
        assert estimate.steps_done(1) is None  # the chunk that ran meanwhile: the clock starts
        lines = []
        for _ in range(3):
            time.sleep(step)
            lines.append(estimate.steps_done(1))
    assert lines[:2] == [None, None] and "timed over 3 steps" in lines[2]
    per_step = float(lines[2].split("(")[1].split(" s per step")[0])
    assert per_step >= step  # three chunks of `step` each, nothing done before the clock
    assert estimate.steps_done(1) is None  # said once
    assert _EpochEstimate(100, enabled=False).steps_done(1) is None
