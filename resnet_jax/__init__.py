"""resnet_jax: residual networks in pure JAX/Flax, with a sharded, resumable trainer.

    import resnet_jax
    model = resnet_jax.create_model("resnet18", num_classes=10)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names, imported on first use (PEP 562): the scripts import `resnet_jax.cli` first
# without paying for JAX and Flax, so `--help` is quick and a Ctrl-C while they load is one line.
__all__ = [
    "Bottleneck",
    "PreActBottleneck",
    "PreActResidual",
    "ResNeXtBlock",
    "ResNet",
    "Residual",
    "UserError",
    "conv_im2col",
    "conv_per_group",
    "conv_space_to_depth",
    "create_model",
    "list_models",
    "model_flops",
    "param_count",
]
_EXPORTS = {name: "resnet_jax.errors" if name == "UserError" else "resnet_jax.models"
            for name in __all__}
# The submodules, also loaded on first use: `resnet_jax.train.train_step` after `import resnet_jax`.
_SUBMODULES = frozenset({"benchmark", "checkpoint", "cli", "config", "conv", "data",
                         "distributed", "errors", "experiments", "finetune", "interop", "metrics",
                         "models", "optimizer", "train"})
__version__ = "0.1.0"

if TYPE_CHECKING:
    from resnet_jax.errors import UserError
    from resnet_jax.models import (
        Bottleneck,
        PreActBottleneck,
        PreActResidual,
        Residual,
        ResNet,
        ResNeXtBlock,
        conv_im2col,
        conv_per_group,
        conv_space_to_depth,
        create_model,
        list_models,
        model_flops,
        param_count,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"resnet_jax.{name}")  # (which binds it here)
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, "__version__"})
