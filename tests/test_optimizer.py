"""Optimizers and schedules built from a Config."""

import jax.numpy as jnp
import optax
import pytest

from resnet_jax.config import Config
from resnet_jax.optimizer import create_optimizer, learning_rate_schedule


def test_constant_is_the_chapters_rate():
    schedule = learning_rate_schedule(Config(), steps_per_epoch=100)
    assert [float(schedule(s)) for s in (0, 500, 999)] == pytest.approx([0.01] * 3)


def test_cosine_with_warmup_rises_peaks_and_decays_to_zero():
    config = Config(schedule="cosine", learning_rate=0.1, epochs=10, warmup_epochs=2)
    schedule = learning_rate_schedule(config, steps_per_epoch=100)
    assert float(schedule(0)) == pytest.approx(0.0)
    assert float(schedule(100)) == pytest.approx(0.05)
    assert float(schedule(200)) == pytest.approx(0.1)
    assert float(schedule(600)) < 0.1
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)


def test_constant_with_warmup():
    schedule = learning_rate_schedule(Config(warmup_epochs=1), steps_per_epoch=10)
    assert float(schedule(5)) == pytest.approx(0.005)
    assert float(schedule(50)) == pytest.approx(0.01)


def _one_update(config, grad=1.0, param=2.0):
    tx = create_optimizer(config, steps_per_epoch=10)
    params = {"w": jnp.array([param])}
    updates, _ = tx.update({"w": jnp.array([grad])}, tx.init(params), params)
    return float(optax.apply_updates(params, updates)["w"][0])


def test_sgd_is_plain_sgd():
    assert _one_update(Config(learning_rate=0.1)) == pytest.approx(2.0 - 0.1)


def test_weight_decay_is_l2_for_sgd_and_decoupled_for_adamw():
    # SGD: the gradient gets wd * param added (as torch.optim.SGD does).
    assert _one_update(Config(learning_rate=0.1, weight_decay=0.5)) == pytest.approx(
        2.0 - 0.1 * (1.0 + 0.5 * 2.0))
    # AdamW: first step moves by lr * (sign-like 1 + wd * param).
    assert _one_update(Config(optimizer="adamw", learning_rate=0.1, weight_decay=0.5)) == (
        pytest.approx(2.0 - 0.1 * (1.0 + 0.5 * 2.0), rel=1e-3))


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum_optimizers_accumulate(name):
    tx = create_optimizer(Config(optimizer=name, learning_rate=0.1, momentum=0.9), 10)
    params = {"w": jnp.array([0.0])}
    state = tx.init(params)
    steps = []
    for _ in range(3):
        updates, state = tx.update({"w": jnp.array([1.0])}, state, params)
        steps.append(-float(updates["w"][0]))
    # torch.optim.SGD's definitions: buf = momentum * buf + g; the step is lr * buf, or with
    # Nesterov lr * (g + momentum * buf).
    buf, expected = 0.0, []
    for _ in range(3):
        buf = 0.9 * buf + 1.0
        expected.append(0.1 * (1.0 + 0.9 * buf if name == "nesterov" else buf))
    assert steps == pytest.approx(expected, rel=1e-6)  # momentum 0.1, 0.19, 0.271


def test_a_warmup_as_long_as_the_cosine_run_is_a_user_error():
    from resnet_jax.errors import UserError

    # 0.96 of an epoch of 10 steps rounds to 10 warm-up steps: no decay would be left.
    config = Config(schedule="cosine", epochs=1, warmup_epochs=0.96)
    with pytest.raises(UserError, match="--warmup_epochs 0.96 is 10 steps, the whole run of 10"):
        create_optimizer(config, steps_per_epoch=10)
    create_optimizer(config.replace(warmup_epochs=0.9), steps_per_epoch=10)
