"""Weights between resnet_jax and PyTorch: torchvision's (and timm's) ResNet state_dicts.

The ``variant="torchvision"`` models compute torchvision's function, and their modules map one
to one onto its state_dict keys, so moving weights is renaming and transposing:

==================================  ==================================  ======================
Flax (``params`` / ``batch_stats``)  torchvision                         layout
==================================  ==================================  ======================
``conv1/kernel``                    ``conv1.weight``                    HWIO -> OIHW
``bn1/scale``, ``bn1/bias``         ``bn1.weight``, ``bn1.bias``
``bn1/mean``, ``bn1/var``           ``bn1.running_mean``, ``.running_var``
``layer2_0/downsample_conv``        ``layer2.0.downsample.0``
``layer2_0/downsample_bn``          ``layer2.0.downsample.1``
``fc/kernel``                       ``fc.weight``                       (in, out) -> (out, in)
==================================  ==================================  ======================

plus a ``num_batches_tracked`` counter per batch norm, which only PyTorch has (and which its
``momentum`` makes unused). timm's ResNets use the same keys, so its ``.safetensors`` files load
too. Torch itself is optional: only reading a ``.pth``/``.pt`` file needs it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

# The registry's architectures that torchvision has, under the same names.
TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "resnext101_32x8d")

_BN_LEAVES = {("params", "scale"): "weight", ("params", "bias"): "bias",
              ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var"}
_COUNTER = "num_batches_tracked"
_MODULES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LIST_LIMIT = 8  # names listed in an error before "and N more"


def to_torch(variables: Mapping[str, Any], *, num_batches_tracked: int = 0
             ) -> dict[str, np.ndarray]:
    """A torchvision-variant model's variables as a torchvision state_dict of numpy arrays.

    ``torchvision.models.<arch>(num_classes=...)`` accepts the result in
    ``load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)`` when the
    model has torchvision's layout (the imagenet stem, width 64, 3 input channels; a 1-channel
    model needs ``model.conv1`` replaced by ``nn.Conv2d(1, 64, 7, 2, 3, bias=False)`` first).
    ``num_batches_tracked`` fills every batch norm's counter (e.g. the training steps).

    Raises:
        ValueError: the variables are not one of :data:`TORCHVISION_ARCHS` in the torchvision
            variant (e.g. a d2l-variant model), naming what does not fit.
    """
    for path in _flat(variables.get("params", {})):
        if path[-1] == "bias" and path[-2] in ("conv1", "conv2", "conv3", "downsample_conv"):
            raise ValueError(
                f"{'/'.join(path)} exists: a d2l-variant model (its convs have biases and its "
                "projections no batch norm); no torchvision model has that layout")
    state_dict: dict[str, np.ndarray] = {}
    for collection in ("params", "batch_stats"):
        for path, value in _flat(variables.get(collection, {})).items():
            key, layout = _torch_key(collection, path)
            state_dict[key] = layout(np.asarray(value))
    for key in [k for k in state_dict if k.endswith(".running_var")]:
        state_dict[key.replace("running_var", _COUNTER)] = np.asarray(num_batches_tracked,
                                                                      np.int64)
    check_state_dict(state_dict)
    return state_dict


def from_torch(source: Mapping[str, Any] | str | Path, *, arch: str | None = None) -> dict:
    """Flax variables (``{"params", "batch_stats"}``, numpy arrays of the source's dtype) for
    ``create_model(arch, variant="torchvision", num_classes=...)``.

    ``source``: a state_dict (names to torch tensors or numpy arrays), or the path of a
    ``.pth``/``.pt`` file as ``torch.save`` writes it (needs torch; read with
    ``weights_only=True``) or of a ``.safetensors`` file (read without torch). The model's
    ``num_classes``, input channels, ``width`` and ``stem`` are read from the shapes (torchvision's
    own: 1000, 3, 64, imagenet). ``arch`` is inferred from the keys and shapes, and checked
    when given.

    Raises:
        ValueError: unknown, missing or misshaped keys, or an architecture that is not (or not
            ``arch``) among :data:`TORCHVISION_ARCHS`, all named in one message; nothing is
            loaded in part.
        ImportError: a ``.pth``/``.pt`` file without torch installed.
    """
    state_dict = _read(source) if isinstance(source, str | Path) else _numpy(source)
    check_state_dict(state_dict, arch)
    variables: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for key, value in state_dict.items():
        if key.endswith(_COUNTER):
            continue
        collection, path, layout = _flax_path(key)
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = layout(value)
    return variables


def check_state_dict(state_dict: Mapping[str, Any], arch: str | None = None) -> str:
    """The architecture of a torchvision-layout state_dict (of arrays with ``.shape``), after
    checking every key and shape against that model (``arch``, if given, must be it).

    Raises:
        ValueError: one message naming every unknown, missing and misshaped key.
    """
    if arch is not None and arch not in TORCHVISION_ARCHS:
        raise ValueError(f"arch={arch!r} has no torchvision counterpart; valid: "
                         f"{', '.join(TORCHVISION_ARCHS)}")
    shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    options = _options(shapes)
    found = _infer_arch(shapes)
    if arch is not None and found is not None and found != arch:
        raise ValueError(f"the weights are {found}'s, not {arch}'s")
    if found is None and arch is None:
        raise ValueError(f"the weights match none of {', '.join(TORCHVISION_ARCHS)} (they have "
                         f"stages of {_depths(shapes)} blocks, bottleneck blocks: "
                         f"{'layer1.0.conv3.weight' in shapes}); pass arch= to list the keys")
    expected = _expected_shapes(arch or found, **options)
    problems = []
    missing = sorted(k for k in expected if k not in shapes and not k.endswith(_COUNTER))
    unknown = sorted(k for k in shapes if k not in expected)
    wrong = [f"{k} {shapes[k]} (expected {expected[k]})" for k in shapes
             if k in expected and shapes[k] != expected[k]]
    for what, names in (("missing", missing), ("unknown", unknown), ("misshaped", wrong)):
        if names:
            problems.append(f"{len(names)} {what}: {_names(names)}")
    if problems:
        raise ValueError(f"state_dict does not fit {arch or found} "
                         f"({', '.join(f'{k}={v}' for k, v in options.items())}): "
                         + "; ".join(problems))
    return arch or found


# ----------------------------------------------------------------------------------------------
# Names and layouts.


def _flat(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, (*prefix, str(name))))
        else:
            out[(*prefix, str(name))] = value
    return out


# Each layout change returns a new C-ordered array: the caller's (or torch's) buffers stay
# theirs, and a jax array on the CPU may alias the numpy buffer it was made from.


def _oihw(kernel: np.ndarray) -> np.ndarray:
    if kernel.ndim == 4:  # conv: HWIO -> OIHW (groups keep I = in / groups on both sides)
        return np.array(kernel.transpose(3, 2, 0, 1), order="C")
    return np.array(kernel.T, order="C")  # dense: (in, out) -> (out, in)


def _oihw_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else tuple(shape[::-1])


def _hwio(weight: np.ndarray) -> np.ndarray:
    if weight.ndim == 4:
        return np.array(weight.transpose(2, 3, 1, 0), order="C")
    return np.array(weight.T, order="C")


def _same(value: np.ndarray) -> np.ndarray:
    return np.array(value, order="C")


def _torch_key(collection: str, path: tuple[str, ...]) -> tuple[str, Any]:
    """torchvision's key for a Flax leaf, and the function from Flax's layout to torch's."""
    *modules, leaf = path
    name = ".".join(_MODULES.get(m, re.sub(r"^(layer\d+)_(\d+)$", r"\1.\2", m))
                    for m in modules)
    if leaf == "kernel":
        return f"{name}.weight", _oihw
    return f"{name}.{_BN_LEAVES.get((collection, leaf), leaf)}", _same


def _flax_path(key: str) -> tuple[str, tuple[str, ...], Any]:
    """The Flax collection and path for a (checked) torchvision key, and the layout change."""
    name, _, leaf = key.rpartition(".")
    name = name.replace("downsample.0", "downsample_conv").replace("downsample.1", "downsample_bn")
    modules = tuple(re.sub(r"^(layer\d+)\.(\d+)", r"\1_\2", name).split("."))
    if leaf == "weight" and not re.search(r"(^|\.)(bn\d|downsample_bn)$", name):
        return "params", (*modules, "kernel"), _hwio
    flax = {v: k for k, v in _BN_LEAVES.items()}
    collection, flax_leaf = flax.get(leaf, ("params", leaf))
    return collection, (*modules, flax_leaf), _same


# ----------------------------------------------------------------------------------------------
# Reading sources, and the architecture a state_dict has.


def _read(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt"):
        raise ValueError(f"{path}: expected a .pth, .pt or .safetensors file")
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path.name} needs torch (pip install 'resnet_jax[torch]'); "
                          ".safetensors files need only safetensors") from None
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a state_dict")
    return _numpy(loaded)


def _numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):  # a torch tensor (torch is imported by whoever made it)
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16
                value = value.float()
            value = value.numpy()
        out[str(key)] = np.asarray(value)  # (copied by the layout change)
    return out


def _depths(shapes: Mapping[str, tuple]) -> tuple[int, ...]:
    blocks = {tuple(map(int, m.groups())) for k in shapes
              if (m := re.match(r"layer(\d+)\.(\d+)\.", k))}
    return tuple(sum(1 for s, _ in blocks if s == stage)
                 for stage in range(1, max((s for s, _ in blocks), default=0) + 1))


def _options(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    """``num_classes``, ``in_channels``, ``width`` and ``stem`` from the stem's and head's
    shapes."""
    conv1, fc = shapes.get("conv1.weight"), shapes.get("fc.weight")
    if conv1 is None or fc is None or len(conv1) != 4 or len(fc) != 2:
        raise ValueError("state_dict lacks a 4-d conv1.weight or 2-d fc.weight, so it is no "
                         f"torchvision ResNet; its keys start {_names(sorted(shapes), limit=3)}")
    stems = {7: "imagenet", 3: "small"}
    if conv1[2:] not in ((7, 7), (3, 3)):
        raise ValueError(f"conv1.weight {conv1}: a stem kernel of 7x7 (torchvision) or 3x3 "
                         "(resnet_jax's small stem) is expected")
    return {"num_classes": fc[0], "in_channels": conv1[1], "width": conv1[0],
            "stem": stems[conv1[2]]}


@functools.cache
def _signatures() -> dict[tuple, str]:
    """(stage depths, bottleneck?, groups) -> the torchvision architecture's name."""
    from resnet_jax import models

    out = {}
    for name in TORCHVISION_ARCHS:
        model = models.create_model(name, variant="torchvision")
        out[(tuple(n for n, _ in model.arch), model.block == "bottleneck",
             model.cardinality)] = name
    return out


def _infer_arch(shapes: Mapping[str, tuple]) -> str | None:
    conv2 = shapes.get("layer1.0.conv2.weight", (1, 1))
    bottleneck = "layer1.0.conv3.weight" in shapes
    groups = conv2[0] // max(conv2[1], 1) if bottleneck else 1
    return _signatures().get((_depths(shapes), bottleneck, groups))


@functools.cache
def _expected_shapes(arch: str, *, num_classes: int, in_channels: int, width: int,
                     stem: str) -> dict[str, tuple]:
    """Every key of that model's torchvision state_dict and its shape (from ``eval_shape``)."""
    from resnet_jax import models

    try:
        model = models.create_model(arch, num_classes=num_classes, variant="torchvision",
                                    width=width, stem=stem)
    except ValueError as e:
        raise ValueError(f"the shapes give an invalid {arch}: {e}") from None
    abstract = models.abstract_variables(model, (1, 32, 32, in_channels))
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in _flat(abstract[collection]).items():
            key, _ = _torch_key(collection, path)
            out[key] = _oihw_shape(leaf.shape) if path[-1] == "kernel" else tuple(leaf.shape)
            if key.endswith(".running_var"):
                out[key.replace("running_var", _COUNTER)] = ()
    return out


def _names(names: list[str], limit: int = _LIST_LIMIT) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
