"""Optimizers and learning-rate schedules (optax) built from a Config."""

from __future__ import annotations

import optax

from resnet_jax.config import Config
from resnet_jax.errors import UserError


def learning_rate_schedule(config: Config, steps_per_epoch: int) -> optax.Schedule:
    """`constant` (the chapter's) or `cosine` decay to 0, each after an optional linear warm-up."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.schedule == "cosine":
        if warmup >= total:
            raise UserError(f"--warmup_epochs {config.warmup_epochs:g} is {warmup} steps, the "
                            f"whole run of {total}; the cosine decay needs steps after it")
        if warmup:
            return optax.warmup_cosine_decay_schedule(
                0.0, config.learning_rate, warmup_steps=warmup, decay_steps=total)
        return optax.cosine_decay_schedule(config.learning_rate, decay_steps=total)
    if warmup:
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.learning_rate, warmup),
             optax.constant_schedule(config.learning_rate)], [warmup])
    return optax.constant_schedule(config.learning_rate)


def create_optimizer(config: Config, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optax transformation for `config.optimizer` with its schedule and weight decay.

    `sgd` is the chapter's plain SGD (`torch.optim.SGD(lr=0.01)`); `momentum` and `nesterov` are
    heavy-ball SGD; for those, weight decay is the classic L2 term added to the gradient (as
    PyTorch's SGD does), while `adamw` decouples it.
    """
    lr = learning_rate_schedule(config, steps_per_epoch)
    if config.optimizer == "adamw":
        return optax.adamw(lr, b1=config.momentum, weight_decay=config.weight_decay)
    momentum = None if config.optimizer == "sgd" else config.momentum
    sgd = optax.sgd(lr, momentum=momentum, nesterov=config.optimizer == "nesterov")
    if config.weight_decay:
        return optax.chain(optax.add_decayed_weights(config.weight_decay), sgd)
    return sgd
