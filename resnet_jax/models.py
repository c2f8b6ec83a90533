"""Residual networks in Flax linen: D2L 8.6 (ResNet, ResNeXt), He et al. 2016 (v1, v2), ResNeXt.

Everything here takes NHWC float input and is called as ``model.apply(variables, x, train=...)``;
in training mode pass ``mutable=["batch_stats"]``. Layout follows google/flax's examples/imagenet:
residual blocks, one generic :class:`ResNet`, and one ``functools.partial`` per named depth.

Two parameter conventions (``variant``):

* ``"d2l"`` (default): the chapter's PyTorch code. Every convolution has a bias and the 1x1
  projection shortcut has no batch norm. ``resnet18`` on 1x96x96 with 10 classes has 11,178,378
  trainable parameters, as in the chapter.
* ``"torchvision"``: convolutions without bias and batch norm after the projection shortcut
  ("downsample"); with 3x224x224 input and 1000 classes the trainable parameter counts equal
  torchvision's. Module names (``conv1``, ``bn1``, ``layer2_0/downsample_conv``, ``fc``...) map
  one-to-one onto torchvision's state_dict keys (``layer2.0.downsample.0`` etc.).

All padding is explicit and PyTorch-style (``((p, p), (p, p))``, max-pool padded with -inf), so
spatial sizes equal PyTorch's: a 28x28 input gives 14, 7, 7, 4, 2, 1 through the chapter's net.

How the convolutions are computed is chosen per backend, with the same parameters and the same
function whatever the choice (``resnet_jax.conv``): ``conv`` ("auto" | "xla" | "im2col" |
"by_size" | "by_map"; by_map on a CPU, whose programs want
``jax.jit(..., compiler_options=resnet_jax.conv.compiler_options())``), ``grouped_conv``
("auto" | "native" | "split"; groups split on a CPU under "xla") and ``stem_conv`` ("auto" |
"direct" | "space_to_depth"; a space-to-depth stem except on a CPU). On a GPU or TPU "auto"
gives XLA's own convolutions.

Mixed precision: ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype. Batch-norm
statistics are reduced and stored in float32 (flax's ``force_float32_reductions``), and the logits
are always returned in float32 so that losses are computed stably whatever ``dtype`` is.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.conv import (  # noqa: F401  (re-exported: models.conv_per_group etc.)
    CONVS,
    GROUPED_CONVS,
    STEM_CONVS,
    compiler_options,
    conv_by_map,
    conv_function,
    conv_im2col,
    conv_per_group,
    conv_space_to_depth,
    max_pool,
    resolve_conv,
    resolve_grouped_conv,
    resolve_stem_conv,
)

Dtype = Any
Arch = tuple[tuple[int, int], ...]

VARIANTS = ("d2l", "torchvision")
STEMS = ("imagenet", "small")
BLOCKS = ("basic", "bottleneck", "preact_basic", "preact_bottleneck")

# He et al.'s init (kaiming_normal_, fan_out), which torchvision's ResNets apply explicitly.
_he_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# The chapter's: its training code calls `model.apply_init(..., d2l.init_cnn)`, which sets every
# Conv2d and Linear weight with xavier_uniform_, U(+-sqrt(6 / (fan_in + fan_out))). Biases
# start at 0 here (PyTorch leaves them at U(+-1/sqrt(fan_in))); every conv bias but the
# shortcut's feeds a BN, which removes it anyway.
_xavier_init = nn.initializers.xavier_uniform()
# PyTorch's default for Linear, kaiming_uniform_(a=sqrt(5)) = U(+-1/sqrt(fan_in)): torchvision's
# ResNets leave their fc layer at it.
_torch_linear_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _conv_init(variant: str) -> nn.initializers.Initializer:
    return _he_init if variant == "torchvision" else _xavier_init


def _fc_init(variant: str) -> nn.initializers.Initializer:
    return _torch_linear_init if variant == "torchvision" else _xavier_init


def _padding(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    # PyTorch's padding=(k - 1) // 2 on both sides; flax's "SAME" pads asymmetrically under
    # stride 2 and would give different sizes and values from the chapter's network.
    p = (kernel - 1) // 2
    return ((p, p), (p, p))


def _check_choice(option: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f"{option}={value!r} is not valid; valid values: {', '.join(valid)}")


def _check_positive(option: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{option}={value!r} is not valid; it must be a positive integer")


class _Block(nn.Module):
    """Options shared by every block (keyword-only) and helpers to build its layers."""

    _: dataclasses.KW_ONLY
    shortcut: bool = True  # False gives the "plain" block of the degradation experiment
    variant: str = "d2l"
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    grouped_conv: str = "auto"  # how a conv with groups is computed; see the module docstring
    conv: str = "auto"  # how every conv is computed; see the module docstring
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion: ClassVar[int] = 1  # output channels / num_channels
    preact: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("grouped_conv", self.grouped_conv, GROUPED_CONVS)
        _check_choice("conv", self.conv, CONVS)
        super().__post_init__()

    def _conv(
        self, features: int, kernel: int, strides: int = 1, *, groups: int = 1, name: str,
        zero: bool = False,
    ) -> nn.Conv:
        return nn.Conv(
            features, (kernel, kernel), strides=(strides, strides), padding=_padding(kernel),
            feature_group_count=groups, use_bias=self.variant == "d2l",
            kernel_init=nn.initializers.zeros if zero else _conv_init(self.variant),
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            conv_general_dilated=conv_function(self.conv, self.grouped_conv, groups=groups),
        )

    def _bn(self, train: bool, *, name: str, zero: bool = False) -> nn.BatchNorm:
        # No axis_name: under jit with a batch sharded across devices, XLA already reduces the
        # statistics over the global batch.
        return nn.BatchNorm(
            use_running_average=not train, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
            scale_init=nn.initializers.zeros if zero else nn.initializers.ones,
            dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        )

    def _last_bn(self, train: bool, name: str) -> nn.BatchNorm:
        # Zero scale => the residual branch outputs 0 at init and the block is the identity on
        # non-negative input (Goyal et al. 2017), which helps large-batch training.
        return self._bn(train, name=name, zero=self.zero_init_residual)

    def _projection(
        self, x: jax.Array, train: bool, out: int, strides: int, *, norm: bool
    ) -> jax.Array:
        """Strided 1x1 conv ("downsample"), followed by BN when ``norm``."""
        x = self._conv(out, 1, strides, name="downsample_conv")(x)
        return self._bn(train, name="downsample_bn")(x) if norm else x


class Residual(_Block):
    """The chapter's residual block (D2L 8.6.2): the basic block of ResNet-18/34.

    3x3 conv (stride ``strides``) -> BN -> ReLU -> 3x3 conv -> BN, plus the input (through a
    1x1 conv with stride ``strides`` when ``use_1x1conv``), then ReLU. With ``variant="d2l"``
    the convs have biases and the projection has no BN, exactly as the chapter.

    Attributes:
        num_channels: output channels.
        use_1x1conv: project the shortcut with a strided 1x1 conv (needed when the shape changes).
        strides: stride of the first 3x3 conv and of the projection.
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self._conv(self.num_channels, 3, self.strides, name="conv1")(x)
        y = nn.relu(self._bn(train, name="bn1")(y))
        y = self._conv(self.num_channels, 3, name="conv2")(y)
        y = self._last_bn(train, "bn2")(y)
        if self.shortcut:
            if self.use_1x1conv:
                x = self._projection(x, train, self.num_channels, self.strides, norm=_tv(self))
            y = y + x
        return nn.relu(y)


class Bottleneck(_Block):
    """Bottleneck block (He et al. 2016, Table 1), grouped as in ResNeXt (Xie et al. 2017).

    1x1 conv to ``width`` -> BN -> ReLU -> 3x3 conv (stride ``strides``, ``cardinality`` groups)
    -> BN -> ReLU -> 1x1 conv to ``4 * num_channels`` -> BN, plus the (projected) input, then ReLU.
    The stride sits on the 3x3 conv as in torchvision's "v1.5". ``width`` follows torchvision:
    ``int(num_channels * base_width / 64) * cardinality``.

    Attributes:
        num_channels: "planes": the bottleneck width of a plain ResNet; the output has 4x this.
        use_1x1conv: project the shortcut with a strided 1x1 conv.
        strides: stride of the 3x3 conv and of the projection.
        cardinality: number of groups of the 3x3 conv (ResNeXt's C; 1 for ResNet).
        base_width: bottleneck width per group at ``num_channels=64`` (ResNeXt's d; 64 for ResNet).
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1
    cardinality: int = 1
    base_width: int = 64

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = _group_width(self.num_channels, self.base_width, self.cardinality)
        y = nn.relu(self._bn(train, name="bn1")(self._conv(width, 1, name="conv1")(x)))
        y = self._conv(width, 3, self.strides, groups=self.cardinality, name="conv2")(y)
        y = nn.relu(self._bn(train, name="bn2")(y))
        y = self._conv(self.num_channels * self.expansion, 1, name="conv3")(y)
        y = self._last_bn(train, "bn3")(y)
        if self.shortcut:
            if self.use_1x1conv:
                out = self.num_channels * self.expansion
                x = self._projection(x, train, out, self.strides, norm=_tv(self))
            y = y + x
        return nn.relu(y)


class PreActResidual(_Block):
    """Pre-activation basic block (He et al. 2016b, "Identity Mappings"): BN -> ReLU -> conv.

    ``y = x' + conv2(relu(bn2(conv1(relu(bn1(x))))))`` with no ReLU after the addition, where
    ``x'`` is ``x`` or, when ``use_1x1conv``, a strided 1x1 conv of the *pre-activated* input
    ``relu(bn1(x))`` (as in the paper's code). The projection never has a BN here, whatever the
    ``variant`` (which then only decides conv biases). ``zero_init_residual`` zeroes the last
    conv's kernel instead of a BN scale: a zero BN scale would feed exactly 0 into a ReLU whose
    gradient there is 0, so that scale could never grow.
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1

    preact: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        pre = nn.relu(self._bn(train, name="bn1")(x))
        y = self._conv(self.num_channels, 3, self.strides, name="conv1")(pre)
        y = nn.relu(self._bn(train, name="bn2")(y))
        y = self._conv(self.num_channels, 3, name="conv2", zero=self.zero_init_residual)(y)
        if not self.shortcut:
            return y
        if self.use_1x1conv:
            x = self._projection(pre, train, self.num_channels, self.strides, norm=False)
        return y + x


class PreActBottleneck(_Block):
    """Pre-activation bottleneck (He et al. 2016b): (BN -> ReLU -> conv) x 3, 1x1 / 3x3 / 1x1.

    Same widths, stride placement and grouping as :class:`Bottleneck`; shortcut and
    ``zero_init_residual`` as :class:`PreActResidual`.
    """

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1
    cardinality: int = 1
    base_width: int = 64

    expansion: ClassVar[int] = 4
    preact: ClassVar[bool] = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        width = _group_width(self.num_channels, self.base_width, self.cardinality)
        pre = nn.relu(self._bn(train, name="bn1")(x))
        y = self._conv(width, 1, name="conv1")(pre)
        y = nn.relu(self._bn(train, name="bn2")(y))
        y = self._conv(width, 3, self.strides, groups=self.cardinality, name="conv2")(y)
        y = nn.relu(self._bn(train, name="bn3")(y))
        out = self.num_channels * self.expansion
        y = self._conv(out, 1, name="conv3", zero=self.zero_init_residual)(y)
        if not self.shortcut:
            return y
        if self.use_1x1conv:
            x = self._projection(pre, train, out, self.strides, norm=False)
        return y + x


class ResNeXtBlock(_Block):
    """The chapter's ResNeXt block (D2L 8.6.5), faithfully.

    ``bot_channels = int(round(num_channels * bot_mul))``; 1x1 conv -> BN -> ReLU -> 3x3 conv
    (stride ``strides``) with ``bot_channels // groups`` groups -> BN -> ReLU -> 1x1 conv to
    ``num_channels`` -> BN; shortcut through a strided 1x1 conv + BN when ``use_1x1conv``; add;
    ReLU. Convs have biases under the default ``variant="d2l"``, as the chapter's LazyConv2d.

    Note: the chapter's ``groups`` is the number of *channels per group*, not the cardinality:
    its conv has ``bot_channels // groups`` groups. E.g. ``ResNeXtBlock(256, groups=4,
    bot_mul=0.5)`` has 128 bottleneck channels in 32 groups of 4 (the "32x4d" layout).
    :class:`Bottleneck` names the cardinality plainly.
    """

    num_channels: int
    groups: int
    bot_mul: float
    use_1x1conv: bool = False
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bot = int(round(self.num_channels * self.bot_mul))
        if self.groups <= 0 or bot % self.groups:
            raise ValueError(
                f"groups={self.groups} must divide bot_channels={bot} (channels per group)"
            )
        y = nn.relu(self._bn(train, name="bn1")(self._conv(bot, 1, name="conv1")(x)))
        y = self._conv(bot, 3, self.strides, groups=bot // self.groups, name="conv2")(y)
        y = nn.relu(self._bn(train, name="bn2")(y))
        y = self._last_bn(train, "bn3")(self._conv(self.num_channels, 1, name="conv3")(y))
        if self.shortcut:
            if self.use_1x1conv:  # the chapter's conv4 + bn4: this block has BN on the shortcut
                x = self._projection(x, train, self.num_channels, self.strides, norm=True)
            y = y + x
        return nn.relu(y)


def _group_width(num_channels: int, base_width: int, cardinality: int) -> int:
    width = int(num_channels * (base_width / 64)) * cardinality
    if width <= 0:
        raise ValueError(
            f"bottleneck width is 0 (num_channels={num_channels}, base_width={base_width}); "
            "increase width or base_width"
        )
    return width


def _tv(block: _Block) -> bool:
    # torchvision puts BN after the projection ("downsample"); the chapter does not.
    return block.variant == "torchvision"


_BLOCK_CLASSES: dict[str, type[_Block]] = {
    "basic": Residual,
    "bottleneck": Bottleneck,
    "preact_basic": PreActResidual,
    "preact_bottleneck": PreActBottleneck,
}


class ResNet(nn.Module):
    """ResNet / ResNeXt / pre-activation / plain network (D2L 8.6.3, He et al. 2016 Table 1).

    Stem (``stem="imagenet"``, the chapter's ``b1``): 7x7/2 conv (pad 3) -> BN -> ReLU -> 3x3/2
    max-pool (pad 1). ``stem="small"`` (28x28 / 32x32 input): 3x3/1 conv -> BN -> ReLU, no pool.
    Then one stage per ``arch`` entry ``(num_residuals, num_channels)``; the first block of every
    stage but the first halves the resolution. A block gets a 1x1 projection shortcut whenever its
    stride or channel count changes (for bottlenecks this includes the first block of stage 1).
    Then global average pooling and a dense head ``fc``.

    Pre-activation nets (``block="preact_*"``) are built like Keras' ResNet50V2: the stem is the
    conv (and max-pool) alone, since every block starts with BN -> ReLU (the first block's
    pre-activation plays the role of the stem's BN/ReLU, applied after the max-pool); a final
    BN -> ReLU (``final_bn``) precedes pooling.

    Attributes:
        arch: ``((num_residuals, num_channels), ...)`` per stage, channels given at width 64.
        block: one of ``BLOCKS``.
        num_classes: outputs of the head.
        stem: ``"imagenet"`` or ``"small"``.
        width: channels of the first stage; every channel count in ``arch`` (and the stem) is
            scaled by ``width / 64``, so later stages keep doubling.
        cardinality, base_width: ResNeXt's grouping of the bottleneck blocks (see Bottleneck).
        grouped_conv: how the grouped convs are computed (``GROUPED_CONVS``; module docstring).
        stem_conv: how the imagenet stem's 7x7/2 conv is computed (``STEM_CONVS``; module
            docstring).
        conv: how every convolution is computed (``CONVS``; module docstring).
        shortcut: False removes every shortcut (the "plain" nets of the degradation experiment).
        variant, zero_init_residual, bn_momentum, bn_epsilon, dtype, param_dtype: see the module
            docstring and the blocks. ``bn_momentum`` is flax's (0.9 = PyTorch's 0.1).

    Called as ``model.apply(variables, x, train=...)`` on float images ``x`` of shape (N, H, W, C)
    scaled to [0, 1] (``data.preprocess`` makes them from uint8); ``train=True`` uses and updates
    the batch statistics (pass ``mutable=["batch_stats"]``). ``train`` is a Python bool: under
    ``jax.jit`` make it static (``static_argnames="train"``).
    """

    arch: Arch
    block: str = "basic"
    num_classes: int = 10
    stem: str = "imagenet"
    width: int = 64
    cardinality: int = 1
    base_width: int = 64
    grouped_conv: str = "auto"
    stem_conv: str = "auto"
    conv: str = "auto"
    shortcut: bool = True
    variant: str = "d2l"
    zero_init_residual: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        # Validate at construction so create_model fails before any tracing.
        _check_choice("block", self.block, BLOCKS)
        _check_choice("stem", self.stem, STEMS)
        _check_choice("variant", self.variant, VARIANTS)
        _check_choice("grouped_conv", self.grouped_conv, GROUPED_CONVS)
        _check_choice("stem_conv", self.stem_conv, STEM_CONVS)
        _check_choice("conv", self.conv, CONVS)
        if self.stem_conv == "space_to_depth" and self.stem != "imagenet":
            raise ValueError(f"stem_conv={self.stem_conv!r} applies to the imagenet stem only")
        for option in ("num_classes", "width", "cardinality", "base_width"):
            _check_positive(option, getattr(self, option))
        if not self.arch or any(n <= 0 or c <= 0 for n, c in self.arch):
            raise ValueError(f"arch={self.arch!r} is not valid; it needs positive (n, channels)")
        if not 0.0 <= self.bn_momentum <= 1.0:
            raise ValueError(f"bn_momentum={self.bn_momentum!r} is not valid; it must be in [0, 1]")
        if not self.bn_epsilon > 0:
            raise ValueError(f"bn_epsilon={self.bn_epsilon!r} is not valid; it must be > 0")
        if self.block in ("basic", "preact_basic") and (self.cardinality, self.base_width) != (
            1, 64,
        ):
            raise ValueError("cardinality/base_width apply to bottleneck blocks only")
        if self.block not in ("basic", "preact_basic"):
            for c in self.stage_channels:  # raises if a stage's bottleneck would be 0 wide
                _group_width(c, self.base_width, self.cardinality)
        if self.zero_init_residual and not self.shortcut:
            # Without a shortcut a zeroed branch outputs 0, and nothing below the head would
            # ever get a gradient.
            raise ValueError("zero_init_residual needs the shortcuts; a plain net would output 0")
        super().__post_init__()

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """``num_channels`` of each stage after scaling by ``width / 64``."""
        return tuple(max(1, c * self.width // 64) for _, c in self.arch)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        # Shapes and dtypes are static: these mistakes fail at trace time, by name, instead of
        # as a kernel-shape mismatch deep in the stem or head (or, for uint8, not at all).
        if x.ndim != 4:
            raise ValueError(f"ResNet takes a batch of NHWC images (N, H, W, C); got shape "
                             f"{tuple(x.shape)}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"ResNet takes float images scaled to [0, 1]; got {x.dtype} (uint8 "
                            f"pixels: use resnet_jax.data.preprocess)")
        block_cls = _BLOCK_CLASSES[self.block]
        common: dict[str, Any] = dict(
            shortcut=self.shortcut, variant=self.variant,
            zero_init_residual=self.zero_init_residual, bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
            conv=self.conv,
        )
        if block_cls.expansion > 1:
            common.update(cardinality=self.cardinality, base_width=self.base_width,
                          grouped_conv=self.grouped_conv)
        norm = functools.partial(
            nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
            epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
        )
        channels = self.stage_channels

        kernel, strides = (7, 2) if self.stem == "imagenet" else (3, 1)
        x = nn.Conv(
            channels[0], (kernel, kernel), strides=(strides, strides), padding=_padding(kernel),
            use_bias=self.variant == "d2l", kernel_init=_conv_init(self.variant), dtype=self.dtype,
            param_dtype=self.param_dtype, name="conv1",
            conv_general_dilated=conv_function(self.conv, space_to_depth=resolve_stem_conv(
                self.stem_conv, self.stem) == "space_to_depth"),
        )(x)
        if not block_cls.preact:
            x = nn.relu(norm(name="bn1")(x))
        if self.stem == "imagenet":
            # flax pads max_pool with -inf, like PyTorch's MaxPool2d(3, 2, padding=1); the
            # CPU's convolutions come with the CPU's max-pool (see resnet_jax.conv).
            x = max_pool(self.conv)(x)

        for i, ((num_residuals, _), c) in enumerate(zip(self.arch, channels, strict=True)):
            for j in range(num_residuals):
                strides = 2 if i > 0 and j == 0 else 1
                project = strides != 1 or x.shape[-1] != c * block_cls.expansion
                x = block_cls(
                    c, use_1x1conv=project, strides=strides, name=f"layer{i + 1}_{j}", **common
                )(x, train)

        if block_cls.preact:
            x = nn.relu(norm(name="final_bn")(x))
        # Pool in float32: a bf16 sum over many positions loses precision.
        wide = jnp.promote_types(self.dtype, jnp.float32)  # float32, or float64 under x64
        x = jnp.mean(x.astype(wide), axis=(1, 2))
        # The head in float32 too (a 512x10 product: nothing to gain in bf16), so that the
        # logits, and the losses from them, are float32 values whatever the compute dtype.
        return nn.Dense(self.num_classes, kernel_init=_fc_init(self.variant), dtype=wide,
                        param_dtype=self.param_dtype, name="fc")(x)


# ----------------------------------------------------------------------------------------------
# Named models (He et al. 2016, Table 1; Xie et al. 2017; He et al. 2016b), timm-style registry.
# ----------------------------------------------------------------------------------------------


def _arch(*depths: int) -> Arch:
    """``(num_residuals, num_channels)`` per stage, with the chapter's 64, 128, 256, 512."""
    return tuple(zip(depths, (64, 128, 256, 512), strict=True))


# resnet18 with the default options is exactly the chapter's ResNet-18.
resnet18 = functools.partial(ResNet, _arch(2, 2, 2, 2), "basic")
resnet34 = functools.partial(ResNet, _arch(3, 4, 6, 3), "basic")
resnet50 = functools.partial(ResNet, _arch(3, 4, 6, 3), "bottleneck")
resnet101 = functools.partial(ResNet, _arch(3, 4, 23, 3), "bottleneck")
resnet152 = functools.partial(ResNet, _arch(3, 8, 36, 3), "bottleneck")
resnext50_32x4d = functools.partial(resnet50, cardinality=32, base_width=4)
resnext101_32x8d = functools.partial(resnet101, cardinality=32, base_width=8)
preact_resnet18 = functools.partial(ResNet, _arch(2, 2, 2, 2), "preact_basic")
preact_resnet34 = functools.partial(ResNet, _arch(3, 4, 6, 3), "preact_basic")
preact_resnet50 = functools.partial(ResNet, _arch(3, 4, 6, 3), "preact_bottleneck")
plain18 = functools.partial(resnet18, shortcut=False)
plain34 = functools.partial(resnet34, shortcut=False)

_MODELS: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "resnet101": resnet101,
    "resnet152": resnet152,
    "resnext50_32x4d": resnext50_32x4d,
    "resnext101_32x8d": resnext101_32x8d,
    "preact_resnet18": preact_resnet18,
    "preact_resnet34": preact_resnet34,
    "preact_resnet50": preact_resnet50,
    "plain18": plain18,
    "plain34": plain34,
}

_OPTIONS = (
    "variant", "stem", "width", "zero_init_residual", "bn_momentum", "bn_epsilon", "dtype",
    "param_dtype", "stem_conv", "conv",
)
_BOTTLENECK_OPTIONS = ("cardinality", "base_width", "grouped_conv")


def list_models() -> list[str]:
    """The names :func:`create_model` accepts, sorted."""
    return sorted(_MODELS)


def model_options(name: str) -> list[str]:
    """The keyword options :func:`create_model` accepts for ``name`` (besides num_classes)."""
    block = _lookup(name).args[1]  # partials of partials flatten: args are (arch, block)
    extra = _BOTTLENECK_OPTIONS if block.endswith("bottleneck") else ()
    return sorted(_OPTIONS + extra)


def _lookup(name: str) -> functools.partial:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name]  # type: ignore[return-value]


def create_model(name: str, *, num_classes: int = 10, **options: Any) -> ResNet:
    """Builds a registered model (timm's convention), e.g. ``create_model("resnet50")``.

    Options: ``variant`` ("d2l" | "torchvision"), ``stem`` ("imagenet" | "small"), ``width``,
    ``zero_init_residual``, ``bn_momentum``, ``bn_epsilon``, ``dtype``, ``param_dtype``,
    ``stem_conv``, ``conv`` (see the module docstring); bottleneck
    models also take ``grouped_conv`` (see the module docstring), ``cardinality`` and
    ``base_width``, the last two overriding the named ones, so any ResNeXt is a bottleneck model
    plus these two: ``create_model("resnet50", cardinality=32, base_width=4)`` is
    ``resnext50_32x4d`` and ``create_model("resnext50_32x4d", cardinality=8, base_width=14)`` is
    ResNeXt-50 (8x14d).

    Raises:
        ValueError: unknown name, unknown option, or invalid option value (one-line message
            naming the valid ones).
    """
    factory = _lookup(name)
    valid = model_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for model {name!r}; "
            f"valid options: num_classes, {', '.join(valid)}"
        )
    return factory(num_classes=num_classes, **options)


# ----------------------------------------------------------------------------------------------
# Geometry, parameters and FLOPs.
# ----------------------------------------------------------------------------------------------


def _strided_layers(model: ResNet) -> list[tuple[int, int, int]]:
    """``(kernel, stride, padding)`` of each strided layer on the main path, in order."""
    if not isinstance(model, ResNet):
        raise TypeError(f"expected a ResNet, got {type(model).__name__}")
    stem = [(7, 2, 3), (3, 2, 1)] if model.stem == "imagenet" else []
    # Each later stage opens with a 3x3/2 conv, pad 1 (its 1x1/2 projection gives the same size).
    return stem + [(3, 2, 1)] * (len(model.arch) - 1)


def total_stride(model: ResNet) -> int:
    """Total spatial downsampling: 32 for the imagenet stem with 4 stages, 8 for the small stem."""
    return math.prod(s for _, s, _ in _strided_layers(model))


def min_image_size(model: ResNet) -> int:
    """The smallest input side for which no strided layer receives a 1x1 map.

    Smaller inputs still run (padding keeps the maps at 1x1) but the last stages then see a single
    pixel, so a trainer should reject them. The imagenet stem gives 17 (28 is fine, 16 is not);
    the small stem gives 5.
    """
    layers = _strided_layers(model)
    size = 2
    while True:
        side = size
        for kernel, stride, pad in layers:
            if side < 2:
                break
            side = (side + 2 * pad - kernel) // stride + 1
        else:
            return size
        size += 1


def abstract_variables(model: nn.Module, input_shape: Sequence[int]) -> Any:
    """The model's variables as ``jax.ShapeDtypeStruct``: ``jax.eval_shape`` of init, no compute."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


def param_count(variables_or_params: Any) -> int:
    """Number of trainable parameters (the ``"params"`` collection if given all variables, the
    ``params`` of a train state if given one).

    Works on arrays and on ``jax.ShapeDtypeStruct`` leaves alike, e.g. on
    :func:`abstract_variables`.
    """
    tree = variables_or_params
    if isinstance(tree, Mapping) and "params" in tree:
        tree = tree["params"]
    elif not isinstance(tree, Mapping) and hasattr(tree, "params"):  # a TrainState
        tree = tree.params
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def model_flops(model: nn.Module, input_shape: Sequence[int] = (1, 224, 224, 3)) -> dict[str, Any]:
    """Forward FLOPs per image and trainable parameters, from XLA's cost analysis.

    Lowers (does not run) an eval-mode forward pass on ``input_shape`` (NHWC) for the host CPU
    and counts its HLO: a GPU program hides its convolutions in cuDNN calls that XLA's count
    leaves out, so the count is taken where every operation is visible, whatever the default
    backend. XLA counts a multiply-add as 2 FLOPs, so this is about twice the "multiply-adds"
    often quoted (e.g. torchvision's 4.09 GFLOPS for ResNet-50 at 224x224 is ~8.0e9 here).

    Returns:
        ``{"flops": float per image, "params": int}``.
    """
    if isinstance(model, ResNet):
        # The model's arithmetic, whatever the program: auto picks space-to-depth on a GPU (+1%
        # zero-padded FLOPs) and im2col on a CPU (whose windows' copies XLA counts as FLOPs).
        model = model.clone(stem_conv="direct", conv="xla")
    on_cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    variables = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on_cpu),
                             abstract_variables(model, input_shape))
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32, sharding=on_cpu)
    lowered = jax.jit(functools.partial(model.apply, train=False)).lower(variables, x)
    try:
        cost = lowered.cost_analysis()
    except NotImplementedError:  # no analysis before compilation on this jax: compile it
        cost = lowered.compile().cost_analysis()
    # jax returned a list of dicts (one per program) before 0.4.3x and a dict since.
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return {"flops": flops / input_shape[0], "params": param_count(variables)}
