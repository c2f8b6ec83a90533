"""The chapter's own PyTorch ResNet-18 (D2L 8.6), the reference resnet_jax is checked and timed
against, and its weights as resnet_jax variables.

Needs torch (the ``torch`` extra; not a dependency of resnet_jax). Used by
``scripts/check_torch_parity.py`` (the same function and training step) and
``scripts/compare_torch_cpu.py`` (the same speed measurement).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def chapter_resnet18(width: int = 64, num_classes: int = 10, image_size: int = 96) -> Any:
    """D2L 8.6's ResNet-18 as the chapter writes it (``LazyConv2d``/``LazyBatchNorm2d``, conv
    biases, a 1x1 projection without batch norm), ``width`` channels in its first stage (the
    chapter's 64), materialised by one forward pass of a zero image of ``image_size`` in eval
    mode (the batch-norm statistics stay at 0 and 1), then ``d2l.init_cnn``: xavier-uniform
    weights for every convolution and the dense layer."""
    import torch
    from torch import nn

    class Residual(nn.Module):
        def __init__(self, num_channels: int, use_1x1conv: bool = False, strides: int = 1):
            super().__init__()
            self.conv1 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1, stride=strides)
            self.conv2 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1)
            self.conv3 = (nn.LazyConv2d(num_channels, kernel_size=1, stride=strides)
                          if use_1x1conv else None)
            self.bn1, self.bn2 = nn.LazyBatchNorm2d(), nn.LazyBatchNorm2d()

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (self.conv3(x) if self.conv3 is not None else x))

    def stage(num_residuals: int, num_channels: int, first: bool) -> nn.Sequential:
        return nn.Sequential(*[
            Residual(num_channels, use_1x1conv=True, strides=2) if i == 0 and not first
            else Residual(num_channels) for i in range(num_residuals)])

    channels = [c * width // 64 for c in (64, 128, 256, 512)]
    net = nn.Sequential(
        nn.Sequential(nn.LazyConv2d(channels[0], kernel_size=7, stride=2, padding=3),
                      nn.LazyBatchNorm2d(), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        *[stage(2, c, i == 0) for i, c in enumerate(channels)],
        nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(num_classes)))
    net.eval()
    with torch.no_grad():
        net(torch.zeros(1, 1, image_size, image_size))
    net.train()
    for m in net.modules():  # d2l.init_cnn
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
    return net


def to_flax(net: Any) -> dict:
    """The state of :func:`chapter_resnet18` as variables of
    ``resnet_jax.create_model("resnet18", width=...)`` (NHWC kernels, flax's names), copied: torch
    updates its tensors in place, and JAX on a CPU may alias a NumPy buffer."""

    def copy(t) -> np.ndarray:
        return t.detach().cpu().numpy().copy()

    def conv(m) -> dict:
        return {"kernel": np.transpose(copy(m.weight), (2, 3, 1, 0)), "bias": copy(m.bias)}

    def bn(m) -> tuple[dict, dict]:
        return ({"scale": copy(m.weight), "bias": copy(m.bias)},
                {"mean": copy(m.running_mean), "var": copy(m.running_var)})

    params, stats = {"conv1": conv(net[0][0])}, {}
    params["bn1"], stats["bn1"] = bn(net[0][1])
    for i in range(4):
        for j, block in enumerate(net[1 + i]):
            name, p, s = f"layer{i + 1}_{j}", {}, {}
            p["conv1"], p["conv2"] = conv(block.conv1), conv(block.conv2)
            if block.conv3 is not None:
                p["downsample_conv"] = conv(block.conv3)
            (p["bn1"], s["bn1"]), (p["bn2"], s["bn2"]) = bn(block.bn1), bn(block.bn2)
            params[name], stats[name] = p, s
    fc = net[5][2]
    params["fc"] = {"kernel": copy(fc.weight).T, "bias": copy(fc.bias)}
    return {"params": params, "batch_stats": stats}
