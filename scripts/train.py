#!/usr/bin/env python3
"""Train a residual network; with no flags, the chapter's run (D2L 8.6): ResNet-18 on
Fashion-MNIST at 96x96, batch 128, SGD lr 0.01, 10 epochs.

Running the same command again with the same --workdir resumes from its latest checkpoint.
SIGTERM/SIGINT during training checkpoint after the current dispatch (up to
--steps_per_dispatch steps) and exit 0; before the first step, or a second signal, exit at
once with status 130 (SIGINT) or 143 (SIGTERM). Mistakes in the flags or the data are one
line on stderr with exit status 2; a diverged loss exits with status 3.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from resnet_jax import config as config_lib

    config = config_lib.parse_config(argv, prog="train.py", description=__doc__)

    def job():
        from resnet_jax import distributed
        from resnet_jax.config import validate

        validate(config)
        distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id, config.init_timeout)
        from resnet_jax.train import train_and_evaluate

        record = train_and_evaluate(config)
        import jax

        if record and not record.get("stopped") and jax.process_index() == 0:
            print(f"done: step {record['step']}, val accuracy {record['val_accuracy']:.4f}, "
                  f"workdir {os.path.abspath(config.workdir)}")
        return 0

    return run_main("train.py", job)


if __name__ == "__main__":
    # Training returns 0 only after the checkpoints, metrics and plot are written and closed.
    main_guard("train.py", main, fast_exit=True)
