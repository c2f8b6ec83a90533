"""Tests for resnet_jax.checkpoint used directly (the trainer's use is in test_faults.py)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_jax.checkpoint import Checkpointer
from resnet_jax.errors import UserError


def test_round_trip_in_a_with_block(tmp_path):
    tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.array(7, jnp.int32)}
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.restore(jax.eval_shape(lambda: tree)) is None  # nothing saved yet
        ck.save(7, tree, {"note": "first"})
        ck.wait()
        assert ck.steps() == [7]
    with Checkpointer(tmp_path / "ck", read_only=True) as ck:
        restored = ck.restore(jax.eval_shape(lambda: tree))
    assert restored.step == 7 and restored.meta["note"] == "first"
    np.testing.assert_array_equal(restored.tree["w"], tree["w"])
    assert restored.tree["step"] == 7


def test_another_models_state_is_one_error_and_nothing_else_on_stderr(tmp_path):
    # Used as a library (no CLI set-up): restoring into another shape raises one UserError,
    # without Orbax's failed-read aftermath ("Event loop is closed" tracebacks, seen on a busy
    # CPU: it depends on timing); and a process that only reads, then exits without close(),
    # exits quietly (Orbax's tmp-folder cleanup thread failed at shutdown with a traceback).
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, {"w": jnp.zeros((4, 8)), "b": jnp.zeros(8), "c": jnp.zeros(3)}, {})
    script = textwrap.dedent(f"""
        import jax, jax.numpy as jnp
        from resnet_jax.checkpoint import Checkpointer
        from resnet_jax.errors import UserError
        other = {{"w": jax.ShapeDtypeStruct((4, 16), jnp.float32),
                 "b": jax.ShapeDtypeStruct((16,), jnp.float32),
                 "c": jax.ShapeDtypeStruct((3,), jnp.float32)}}
        try:
            Checkpointer({str(tmp_path / "ck")!r}).restore(other)
        except UserError as e:
            print(e)
        Checkpointer({str(tmp_path / "empty")!r}).restore({{}})  # left open
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert run.returncode == 0 and run.stderr == "", run.stderr
    assert run.stdout.count("\n") == 1 and "do not fit the state restored into them" in run.stdout


def test_a_non_project_checkpoint_is_skipped_by_name(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(3, {"w": jnp.zeros(2)}, {})
        ck.wait()
        # A checkpoint of another program (its meta is not this project's format).
        ck.manager.save(5, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"w": jnp.ones(2)}),
            meta=ocp.args.JsonSave({"format": "another/1"})), force=True)
    with Checkpointer(tmp_path / "ck", read_only=True) as ck:
        with pytest.warns(UserWarning, match=r"skipping unreadable checkpoint .*5: "):
            restored = ck.restore(jax.eval_shape(lambda: {"w": jnp.zeros(2)}))
        assert restored.step == 3
        with pytest.raises(UserError, match=r"no usable checkpoint .*step 5: not a resnet_jax"), \
                pytest.warns(UserWarning):
            ck.restore(jax.eval_shape(lambda: {"w": jnp.zeros(2)}), steps=[5])


def test_another_architecture_is_named_where_the_trees_differ(tmp_path):
    with Checkpointer(tmp_path / "ck") as ck:
        ck.save(1, {"state": {"layer1": {"w": jnp.zeros(2)}, "fc": jnp.zeros(3)}}, {})
    other = {"state": {"layer1": {"w": jnp.zeros(2), "b": jnp.zeros(2)}, "fc": jnp.zeros(3)}}
    # Orbax words it one way for an array the checkpoint lacks, another for one it has extra.
    for restored, says in [(other, "the checkpoint has no state.layer1.b"),
                           ({"state": {"fc": jnp.zeros(3)}},
                            "the trees of arrays differ at state.layer1")]:
        with Checkpointer(tmp_path / "ck", read_only=True) as ck, \
                pytest.raises(UserError) as info:
            ck.restore(jax.eval_shape(lambda t=restored: t))
        message = str(info.value)
        assert f"do not fit the state restored into them ({says})" in message, message
        assert "\n" not in message and len(message) < 300
