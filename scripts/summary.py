#!/usr/bin/env python3
"""Print a model's shape listing, as the chapter does ("Sequential output shape: ..."): each
layer's output shape for one image, then parameters and FLOPs per stage.

    python scripts/summary.py --arch=resnet18 [--image_size=96]

Any model of the registry (--arch), with train.py's model flags; the image's channels and the
class count are the dataset's (--dataset). Nothing is computed: shapes come from an abstract
forward pass and FLOPs from XLA's count of each layer (a multiply-add is 2 FLOPs). Bad flags are
one line on stderr with exit status 2.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402

MODEL_FLAGS = ("arch", "dataset", "image_size", "stem", "width", "cardinality", "base_width",
               "zero_init_residual")


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from resnet_jax import config as config_lib

    others = tuple(f.name for f in dataclasses.fields(config_lib.Config)
                   if f.name not in MODEL_FLAGS)
    parser = config_lib.make_parser("summary.py", __doc__, exclude=others)
    config = config_lib.from_args(parser.parse_args(argv))

    def job() -> int:
        from resnet_jax import data, models, summary
        from resnet_jax.errors import UserError
        from resnet_jax.train import build_model

        config_lib.validate(config)
        spec = data.get_spec(config.dataset)
        model = build_model(config, spec.num_classes)
        if config.image_size < models.min_image_size(model):
            raise UserError(f"--image_size {config.image_size} is too small for {config.arch} "
                            f"with the {config.stem} stem; use at least "
                            f"{models.min_image_size(model)}")
        shape = (1, config.image_size, config.image_size, spec.image_shape[-1])
        print(summary.listing(config.arch, model, shape))
        return 0

    return run_main("summary.py", job)


if __name__ == "__main__":
    main_guard("summary.py", main)
