"""resnet_jax: residual networks in pure JAX/Flax, with a sharded, resumable trainer.

    import resnet_jax
    model = resnet_jax.create_model("resnet18", num_classes=10)
"""

from resnet_jax.errors import UserError
from resnet_jax.models import (
    Bottleneck,
    PreActBottleneck,
    PreActResidual,
    Residual,
    ResNet,
    ResNeXtBlock,
    create_model,
    list_models,
    model_flops,
    param_count,
)

__all__ = [
    "Bottleneck",
    "PreActBottleneck",
    "PreActResidual",
    "ResNeXtBlock",
    "ResNet",
    "Residual",
    "UserError",
    "create_model",
    "list_models",
    "model_flops",
    "param_count",
]
__version__ = "0.1.0"
