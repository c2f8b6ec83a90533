"""A model's shape listing, as the chapter prints it ("Sequential output shape: ..."): each
layer's output shape in call order, then parameters and FLOPs per stage.

Shapes come from an abstract forward pass (`jax.eval_shape`: nothing computed); FLOPs from XLA's
cost analysis of each layer lowered alone for the host CPU, as `models.model_flops` counts the
whole model (a multiply-add is 2 FLOPs).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from resnet_jax import models


@dataclasses.dataclass(frozen=True)
class Layer:
    """One submodule of the network as the forward pass calls it."""

    name: str  # its name in the parameters: conv1, layer2_0, fc, ...
    kind: str  # its class: Conv, Residual, Bottleneck, Dense, ...
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    params: int
    flops: float  # per forward pass of the whole input batch

    @property
    def part(self) -> str:
        """`stem`, `stage N` or `head`."""
        if match := re.fullmatch(r"layer(\d+)_\d+", self.name):
            return f"stage {match[1]}"
        return "stem" if self.name in ("conv1", "bn1") else "head"


def layers(model: models.ResNet, input_shape: Sequence[int]) -> list[Layer]:
    """The model's direct submodules in call order, with their shapes, parameters and FLOPs
    (`input_shape` NHWC, eval mode)."""
    model = model.clone(stem_conv="direct", conv="xla")  # as model_flops counts (auto may not)
    variables = models.abstract_variables(model, input_shape)
    calls = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == "__call__" and len(module.scope.path) == 1:
            calls.append((module, args, kwargs, out.shape))
        return out

    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    return [_layer(module, args, kwargs, out_shape, variables)
            for module, args, kwargs, out_shape in calls]


def _layer(module: nn.Module, args: tuple, kwargs: dict, out_shape: tuple,
           variables: dict) -> Layer:
    own = {col: tree[module.name] for col, tree in variables.items() if module.name in tree}
    in_shape = tuple(args[0].shape)
    alone = module.clone(parent=None, name=None)
    key = (repr(alone), in_shape, str(args[1:]), str(kwargs))  # (its attributes: all of it)
    flops = _flops(key, lambda v, x: alone.apply(v, x, *args[1:], **kwargs), own, in_shape)
    return Layer(module.name, type(module).__name__, in_shape, tuple(out_shape),
                 models.param_count(own.get("params", {})), flops)


_FLOPS_CACHE: dict[tuple, float] = {}  # identical blocks of a stage are counted once


def _flops(key: tuple, fn: Any, variables: Any, input_shape: tuple[int, ...]) -> float:
    """XLA's FLOP count of `fn(variables, x)` lowered for the host CPU."""
    if key not in _FLOPS_CACHE:
        cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        place = functools.partial(jax.ShapeDtypeStruct, sharding=cpu)
        variables = jax.tree.map(lambda s: place(s.shape, s.dtype), variables)
        lowered = jax.jit(fn).lower(variables, place(input_shape, jnp.float32))
        try:
            cost = lowered.cost_analysis()
        except NotImplementedError:  # no analysis before compilation on this jax: compile it
            cost = lowered.compile().cost_analysis()
        if isinstance(cost, list | tuple):  # (a list of dicts on older jax)
            cost = cost[0] if cost else {}
        _FLOPS_CACHE[key] = float((cost or {}).get("flops", 0.0))
    return _FLOPS_CACHE[key]


def parts(listed: list[Layer]) -> list[dict[str, Any]]:
    """Per part (stem, each stage, head): `part`, `output_shape`, `params`, `flops`."""
    out: dict[str, dict[str, Any]] = {}
    for layer in listed:
        row = out.setdefault(layer.part, {"part": layer.part, "params": 0, "flops": 0.0})
        row["params"] += layer.params
        row["flops"] += layer.flops
        row["output_shape"] = layer.output_shape
    if "stem" in out and len(listed) > 2:  # the stem's output is the first block's input
        first_block = next(layer for layer in listed if layer.part.startswith("stage"))
        out["stem"]["output_shape"] = first_block.input_shape
    return list(out.values())


def si(value: float) -> str:
    """`value` with a k, M or G suffix, three significant digits."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def listing(name: str, model: models.ResNet, input_shape: Sequence[int]) -> str:
    """The printed listing: each layer's output shape, then the per-part table with totals."""
    listed = layers(model, input_shape)
    total = models.model_flops(model, input_shape)
    lines = [f"{name}: input {tuple(input_shape)}, {model.num_classes} classes "
             "(forward pass, eval mode)"]
    lines += [f"{layer.name:<10} {layer.kind:<18} output shape: {layer.output_shape}"
              for layer in listed]
    lines += ["", f"{'part':<10} {'output shape':<20} {'parameters':>12} {'FLOPs/img':>10}"]
    batch = input_shape[0]
    rows = parts(listed)
    for row in rows:
        lines.append(f"{row['part']:<10} {str(row['output_shape']):<20} {row['params']:>12,} "
                     f"{si(row['flops'] / batch):>10}")
    other = total["flops"] - sum(row["flops"] for row in rows) / batch
    lines.append(f"{'other':<10} {'(ReLU, pooling)':<20} {'':>12} {si(other):>10}")
    lines.append(f"{'total':<10} {'':<20} {total['params']:>12,} {si(total['flops']):>10}")
    return "\n".join(lines)
