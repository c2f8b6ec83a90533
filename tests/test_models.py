"""Tests for resnet_jax.models, sized for a 2-core CPU (narrow models, tiny inputs).

Parameter counts and geometry use ``jax.eval_shape`` (no compute); numerical checks recompute
blocks by hand with ``lax.conv_general_dilated`` and the batch-norm formula from the block's own
parameters.
"""

import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax

from resnet_jax import models

HIGHEST = lax.Precision.HIGHEST
EPS = 1e-5
REQUIRED = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "resnext101_32x8d", "preact_resnet18", "preact_resnet34", "preact_resnet50", "plain18",
    "plain34",
}
# Narrow models keep compile and run time small. ResNeXt-50 32x4d needs width >= 16: its groups
# have int(planes * 4 / 64) channels, which is 0 at planes = 8.
TEST_WIDTH = {name: 8 for name in models.list_models()} | {"resnext50_32x4d": 16}


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def random_variables(module, x_shape, seed=0, **init_kwargs):
    """Random (non-trivial) variables with the module's structure, without running init."""
    x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    abstract = jax.eval_shape(
        functools.partial(module.init, train=False, **init_kwargs), jax.random.key(0), x
    )
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        key = path[-1].key
        if key in ("var", "scale"):  # positive, away from 1, so BN is not a no-op
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:
            value = rng.normal(0.0, 0.2, leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def conv(x, p, strides=1, groups=1):
    """PyTorch-style conv (pad (k-1)//2 both sides) with the params of a flax nn.Conv."""
    pad = (p["kernel"].shape[0] - 1) // 2
    y = lax.conv_general_dilated(
        x, p["kernel"], (strides, strides), ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups, precision=HIGHEST,
    )
    return y + p["bias"] if "bias" in p else y


def bn(x, p, stats=None):
    """Batch norm: running statistics when given, else this batch's (biased) statistics."""
    if stats is None:
        mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    else:
        mean, var = stats["mean"], stats["var"]
    return (x - mean) / jnp.sqrt(var + EPS) * p["scale"] + p["bias"]


def max_pool(x):
    """PyTorch's MaxPool2d(3, stride=2, padding=1): padding never wins the max."""
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )


def intermediates(model, variables, x, **kwargs):
    """Eval-mode output plus every submodule's output, keyed by module path."""
    y, state = model.apply(
        variables, x, train=False, capture_intermediates=True, mutable=["intermediates"], **kwargs
    )
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    return y, {"/".join(k.key for k in path[:-2]): v for path, v in flat}


def spatial_sizes(model, side, names):
    """Spatial side of the named submodules' outputs, via eval_shape (no compute)."""
    x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
    variables = models.abstract_variables(model, x.shape)
    _, inter = jax.eval_shape(functools.partial(intermediates, model), variables, x)
    return [inter[name].shape[1] for name in names]


# ---------------------------------------------------------------------------------------------
# Every registered model: output shape and dtype
# ---------------------------------------------------------------------------------------------


@functools.cache
def _variables(name):
    # Random variables from eval_shape: every model shares one set for both compute dtypes.
    model = models.create_model(name, width=TEST_WIDTH[name])
    return random_variables(model, (2, 32, 32, 3))


# Applied eagerly too, op by op: the smallest model of each kind of block. The deeper ones
# repeat those blocks, and eagerly cost seconds each (ResNeXt-101 7.9 s) for nothing new.
EAGER = {"resnet18", "resnet50", "preact_resnet18", "preact_resnet50", "plain18",
         "resnext50_32x4d"}


class ForwardTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(name=sorted(EAGER), dtype=("float32", "bfloat16"))
    def test_output_shape_and_dtype(self, name, dtype):
        self._check_forward(name, dtype)

    @chex.variants(with_jit=True)
    @parameterized.product(name=sorted(REQUIRED - EAGER), dtype=("float32", "bfloat16"))
    def test_output_shape_and_dtype_of_the_deeper_models(self, name, dtype):
        self._check_forward(name, dtype)

    def _check_forward(self, name, dtype):
        model = models.create_model(name, width=TEST_WIDTH[name], dtype=jnp.dtype(dtype))
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
        y = self.variant(lambda v, x: model.apply(v, x, train=False))(_variables(name), x)
        chex.assert_shape(y, (2, 10))
        chex.assert_type(y, jnp.float32)  # logits are float32 whatever the compute dtype
        chex.assert_tree_all_finite(y)


def test_list_models_sorted_and_complete():
    names = models.list_models()
    assert names == sorted(names)
    assert set(names) >= REQUIRED


def test_bfloat16_keeps_float32_params_and_statistics():
    model = models.create_model("resnet18", width=8, stem="small", dtype=jnp.bfloat16)
    variables = random_variables(model, (2, 8, 8, 3))
    x = jnp.ones((2, 8, 8, 3))
    y, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.float32
    for leaf in jax.tree.leaves((variables["params"], state["batch_stats"])):
        assert leaf.dtype == jnp.float32
    # Float32 values, not bf16 ones widened: the head runs in float32 on float32 features.
    x = jnp.asarray(np.random.default_rng(0).random((4, 8, 8, 3)), jnp.float32)
    y = model.apply(variables, x, train=False)
    assert np.any(np.asarray(y) != np.asarray(y.astype(jnp.bfloat16).astype(jnp.float32)))


# ---------------------------------------------------------------------------------------------
# Parameter counts (eval_shape only)
# ---------------------------------------------------------------------------------------------


def test_chapter_resnet18_param_count():
    variables = models.abstract_variables(models.create_model("resnet18"), (1, 96, 96, 1))
    assert models.param_count(variables) == 11_178_378
    assert models.param_count(variables["params"]) == 11_178_378


def test_param_count_of_a_train_state_counts_its_params_only():
    import optax

    from resnet_jax.train import create_train_state

    model = models.create_model("resnet18", width=4, stem="small")
    state = create_train_state(model, optax.adam(1e-3), jax.random.key(0), (1, 8, 8, 1))
    assert models.param_count(state) == models.param_count(state.params) < sum(
        x.size for x in jax.tree.leaves(state.arrays()))


def test_package_top_level():
    import resnet_jax

    # The README's API table is importable from the top, and the submodules load on first use.
    assert resnet_jax.conv_per_group is models.conv_per_group
    assert resnet_jax.conv_space_to_depth is models.conv_space_to_depth
    assert resnet_jax.conv_im2col is models.conv_im2col
    assert callable(resnet_jax.train.train_step)
    files = {p.stem for p in Path(resnet_jax.__file__).parent.glob("*.py")} - {"__init__"}
    assert files <= set(dir(resnet_jax)), files - set(dir(resnet_jax))
    assert set(resnet_jax.__all__) <= set(dir(resnet_jax))
    assert not {"importlib", "Any", "TYPE_CHECKING"} & set(dir(resnet_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        resnet_jax.nope  # noqa: B018


@pytest.mark.parametrize(
    "name, count",
    [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        ("resnext50_32x4d", 25_028_904),
        ("resnext101_32x8d", 88_791_336),
    ],
)
def test_torchvision_param_counts(name, count):
    model = models.create_model(name, num_classes=1000, variant="torchvision")
    variables = models.abstract_variables(model, (1, 224, 224, 3))
    assert models.param_count(variables) == count
    assert models.param_count(variables["params"]) == count


def test_torchvision_variant_names_and_biases():
    variables = models.abstract_variables(
        models.create_model("resnet50", variant="torchvision"), (1, 32, 32, 3)
    )
    params = variables["params"]
    assert set(params["layer1_0"]) == {
        "conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample_conv", "downsample_bn",
    }
    assert set(params["conv1"]) == {"kernel"}  # no conv biases
    assert "downsample_conv" not in params["layer1_1"]  # identity shortcut
    chapter = models.abstract_variables(models.create_model("resnet18"), (1, 32, 32, 3))["params"]
    assert set(chapter["layer2_0"]) == {"conv1", "bn1", "conv2", "bn2", "downsample_conv"}
    assert set(chapter["layer2_0"]["conv1"]) == {"kernel", "bias"}


def test_plain_nets_have_no_shortcut_parameters():
    plain = models.abstract_variables(models.create_model("plain34"), (1, 32, 32, 3))["params"]
    assert not any("downsample_conv" in block for block in plain.values())
    resnet = models.abstract_variables(models.create_model("resnet34"), (1, 32, 32, 3))["params"]
    projections = sum(
        models.param_count(block["downsample_conv"])
        for block in resnet.values()
        if "downsample_conv" in block
    )
    assert models.param_count(resnet) - models.param_count(plain) == projections


def test_width_scales_every_stage():
    model = models.create_model("resnet50", width=16)
    assert model.stage_channels == (16, 32, 64, 128)
    params = models.abstract_variables(model, (1, 32, 32, 3))["params"]
    assert params["conv1"]["kernel"].shape[-1] == 16
    assert params["fc"]["kernel"].shape == (128 * 4, 10)


# ---------------------------------------------------------------------------------------------
# Geometry: PyTorch padding, total stride, minimum image size, FLOPs
# ---------------------------------------------------------------------------------------------


def test_chapter_spatial_sizes_match_pytorch():
    model = models.create_model("resnet18")
    names = ["conv1", "layer1_1", "layer2_0", "layer3_0", "layer4_1"]
    assert spatial_sizes(model, 28, names) == [14, 7, 4, 2, 1]
    assert spatial_sizes(model, 96, names) == [48, 24, 12, 6, 3]
    small = models.create_model("resnet18", stem="small")
    assert spatial_sizes(small, 28, names) == [28, 28, 14, 7, 4]


@pytest.mark.parametrize("stem, stride, min_size", [("imagenet", 32, 17), ("small", 8, 5)])
def test_total_stride_and_min_image_size(stem, stride, min_size):
    model = models.create_model("resnet18", stem=stem, width=8)
    assert models.total_stride(model) == stride
    assert models.min_image_size(model) == min_size
    # The last strided layer (layer4_0) sees layer3's output: >= 2 at min_size, 1 just below.
    assert spatial_sizes(model, min_size, ["layer3_1"]) == [2]
    assert spatial_sizes(model, min_size - 1, ["layer3_1"]) == [1]
    if stem == "imagenet":
        assert models.min_image_size(model) <= 28 and models.min_image_size(model) > 16


def test_model_flops_scale_with_area():
    model = models.create_model("resnet18", width=8, stem="small")
    small = models.model_flops(model, (1, 32, 32, 3))
    large = models.model_flops(model, (2, 64, 64, 3))  # per image, so the batch cancels out
    assert small["flops"] > 0
    assert 3.5 < large["flops"] / small["flops"] < 4.5
    assert small["params"] == large["params"]
    assert small["params"] == models.param_count(models.abstract_variables(model, (1, 8, 8, 3)))


def test_model_flops_do_not_count_the_space_to_depth_padding():
    # The space-to-depth stem zero-pads its 7x7 kernel to 8x8; the model's FLOPs are the same.
    shape = (1, 32, 32, 1)
    direct, s2d = (models.model_flops(models.create_model("resnet18", width=8, stem_conv=c),
                                      shape) for c in ("direct", "space_to_depth"))
    assert direct == s2d


# ---------------------------------------------------------------------------------------------
# Batch norm: train mode updates the statistics, eval mode uses them
# ---------------------------------------------------------------------------------------------


# A real init is slow on CPU (XLA compiles the random sampler once per kernel shape: ~15 s for a
# ResNet-18), so the tests that need one share this one.
INIT_MODEL = models.create_model("resnet18", width=8, stem="small", zero_init_residual=True)


@functools.cache
def _initialized():
    x = jnp.ones((1, 8, 8, 3))
    return jax.jit(functools.partial(INIT_MODEL.init, train=False))(jax.random.key(0), x)


def test_train_updates_batch_stats_and_eval_uses_them():
    model, variables = INIT_MODEL, _initialized()
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 1.0, (4, 16, 16, 3)), jnp.float32)
    train = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda mdl, _: mdl.name == "conv1",
        )
    )
    _, state = train(variables, x)
    # Running mean moves 10% of the way (flax momentum 0.9) towards this batch's mean.
    conv1_out = state["intermediates"]["conv1"]["__call__"][0]
    np.testing.assert_allclose(
        state["batch_stats"]["bn1"]["mean"], 0.1 * conv1_out.mean(axis=(0, 1, 2)), atol=1e-5
    )
    np.testing.assert_allclose(
        state["batch_stats"]["bn1"]["var"], 0.9 + 0.1 * conv1_out.var(axis=(0, 1, 2)), atol=1e-4
    )
    updated = {"params": variables["params"], "batch_stats": state["batch_stats"]}
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    before, after = evaluate(variables, x), evaluate(updated, x)
    assert not np.allclose(before, after)
    np.testing.assert_array_equal(after, evaluate(updated, x))  # deterministic
    # Running statistics make each example's output independent of the rest of the batch.
    np.testing.assert_allclose(evaluate(updated, x[:1])[0], after[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["d2l", "torchvision"])
def test_residual_block_matches_the_chapter_by_hand(variant):
    block = models.Residual(16, use_1x1conv=True, strides=2, variant=variant)
    variables = random_variables(block, (2, 9, 9, 8))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 8)), jnp.float32)
    p, s = variables["params"], variables["batch_stats"]
    y = jax.nn.relu(bn(conv(x, p["conv1"], 2), p["bn1"], s["bn1"]))
    y = bn(conv(y, p["conv2"]), p["bn2"], s["bn2"])
    shortcut = conv(x, p["downsample_conv"], 2)
    if variant == "torchvision":
        shortcut = bn(shortcut, p["downsample_bn"], s["downsample_bn"])
    expected = jax.nn.relu(y + shortcut)
    out = block.apply(variables, x, train=False)
    chex.assert_shape(out, (2, 5, 5, 16))  # PyTorch: floor((9 + 2 - 3) / 2) + 1
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["d2l", "torchvision"])
def test_bottleneck_block_by_hand(variant):
    # torchvision's v1.5 layout: the stride on the grouped 3x3 conv, ReLU after the addition.
    block = models.Bottleneck(8, use_1x1conv=True, strides=2, cardinality=2, base_width=32,
                              variant=variant, grouped_conv="native")
    variables = random_variables(block, (2, 9, 9, 16))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 9, 9, 16)), jnp.float32)
    p, s = variables["params"], variables["batch_stats"]
    y = jax.nn.relu(bn(conv(x, p["conv1"]), p["bn1"], s["bn1"]))
    y = jax.nn.relu(bn(conv(y, p["conv2"], 2, groups=2), p["bn2"], s["bn2"]))
    y = bn(conv(y, p["conv3"]), p["bn3"], s["bn3"])
    shortcut = conv(x, p["downsample_conv"], 2)
    if variant == "torchvision":
        shortcut = bn(shortcut, p["downsample_bn"], s["downsample_bn"])
    out = block.apply(variables, x, train=False)
    chex.assert_shape(out, (2, 5, 5, 32))  # 4 x 8 channels out
    np.testing.assert_allclose(out, jax.nn.relu(y + shortcut), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# zero_init_residual
# ---------------------------------------------------------------------------------------------

# 16 channels in and out; the bottlenecks share kernel shapes so init compiles once for them.
IDENTITY_BLOCKS = {
    "basic": lambda **kw: models.Residual(16, **kw),
    "basic_torchvision": lambda **kw: models.Residual(16, variant="torchvision", **kw),
    "bottleneck": lambda **kw: models.Bottleneck(4, cardinality=2, base_width=64, **kw),
    "preact_basic": lambda **kw: models.PreActResidual(16, **kw),
    "preact_bottleneck": lambda **kw: models.PreActBottleneck(4, cardinality=2, **kw),
    "resnext_chapter": lambda **kw: models.ResNeXtBlock(16, groups=4, bot_mul=0.5, **kw),
}


@pytest.mark.parametrize("kind", sorted(IDENTITY_BLOCKS))
def test_zero_init_identity_blocks_are_the_identity(kind):
    x = jnp.abs(jnp.asarray(np.random.default_rng(3).normal(size=(2, 6, 6, 16)), jnp.float32))
    block = IDENTITY_BLOCKS[kind](zero_init_residual=True)
    variables = block.init(jax.random.key(0), x, train=False)
    np.testing.assert_allclose(block.apply(variables, x, train=False), x, atol=1e-6)
    out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, x, atol=1e-6)
    plain = IDENTITY_BLOCKS[kind]()
    assert not np.allclose(plain.apply(plain.init(jax.random.key(0), x, train=False), x,
                                       train=False), x)


def test_zero_init_residual_reaches_every_block_of_a_model():
    params = _initialized()["params"]
    blocks = [name for name in params if name.startswith("layer")]
    assert len(blocks) == 8
    for name in blocks:
        np.testing.assert_array_equal(params[name]["bn2"]["scale"], 0.0)  # the last BN only
        np.testing.assert_array_equal(params[name]["bn1"]["scale"], 1.0)


def _kernels(params):
    return [(jax.tree_util.keystr(path), np.asarray(leaf))
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel"]


def _fans(kernel):
    receptive = int(np.prod(kernel.shape[:-2]))  # conv (kh, kw, in, out); dense (in, out)
    return kernel.shape[-2] * receptive, kernel.shape[-1] * receptive


def test_d2l_init_is_the_chapters_xavier_uniform():
    # The chapter's training code applies d2l.init_cnn: xavier_uniform_ on every conv and linear.
    kernels = _kernels(_initialized()["params"])
    assert len(kernels) == 1 + 8 * 2 + 3 + 1  # stem, 2 per block, 3 projections, fc
    for name, w in kernels:
        fan_in, fan_out = _fans(w)
        bound = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= bound, name
        if w.size >= 500:
            assert np.abs(w).max() > 0.9 * bound, name
        if w.size >= 5000:
            np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.05, err_msg=name)


def test_torchvision_init_is_he_normal_fan_out_and_a_default_linear():
    model = models.create_model("resnet18", width=8, stem="small", variant="torchvision")
    with jax.threefry_partitionable(False):  # compiles ~3x faster on CPU; same distribution
        params = jax.jit(functools.partial(model.init, train=False))(
            jax.random.key(1), jnp.ones((1, 8, 8, 3)))["params"]
    for name, w in _kernels(params):
        fan_in, fan_out = _fans(w)
        if name == "['fc']['kernel']":  # torchvision leaves fc at PyTorch's default
            assert np.abs(w).max() <= 1 / np.sqrt(fan_in)
        elif w.size >= 5000:
            np.testing.assert_allclose(w.std(), np.sqrt(2 / fan_out), rtol=0.05, err_msg=name)
            assert abs(w.mean()) < 0.1 * w.std(), name


# ---------------------------------------------------------------------------------------------
# Grouped convolution = separate narrow convolutions, concatenated (ResNeXt)
# ---------------------------------------------------------------------------------------------

GROUPED_BLOCKS = {
    # width = int(32 * 16 / 64) * 4 = 32 channels in 4 groups of 8.
    "bottleneck": (lambda **kw: models.Bottleneck(32, cardinality=4, base_width=16, **kw), 4, 128),
    # The chapter's groups=8 means 8 channels per group: 32 bottleneck channels in 4 groups.
    "resnext_chapter": (lambda **kw: models.ResNeXtBlock(64, groups=8, bot_mul=0.5, **kw), 4, 64),
}


@pytest.mark.parametrize("impl", ["native", "split"])
@pytest.mark.parametrize("kind", sorted(GROUPED_BLOCKS))
def test_grouped_conv_equals_split_convolutions(kind, impl):
    make, cardinality, channels = GROUPED_BLOCKS[kind]
    block = make(grouped_conv=impl)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(2, 6, 6, channels)), jnp.float32)
    variables = random_variables(block, x.shape)
    _, inter = intermediates(block, variables, x)
    conv2_in = jax.nn.relu(inter["bn1"])
    p = variables["params"]["conv2"]
    kernel = p["kernel"]
    assert kernel.shape == (3, 3, 32 // cardinality, 32)  # each group sees 1/C of the input
    cin, cout = 32 // cardinality, 32 // cardinality
    parts = [
        conv(conv2_in[..., g * cin : (g + 1) * cin],
             {"kernel": kernel[..., g * cout : (g + 1) * cout]})
        for g in range(cardinality)
    ]
    expected = jnp.concatenate(parts, axis=-1) + p.get("bias", 0.0)
    np.testing.assert_allclose(inter["conv2"], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Pre-activation: BN -> ReLU -> conv, numerically
# ---------------------------------------------------------------------------------------------


def test_preact_basic_block_by_hand_in_train_mode():
    block = models.PreActResidual(16, use_1x1conv=True, strides=2)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 8, 8, 8)), jnp.float32)
    variables = random_variables(block, x.shape)
    p = variables["params"]
    pre = jax.nn.relu(bn(x, p["bn1"]))
    y = conv(jax.nn.relu(bn(conv(pre, p["conv1"], 2), p["bn2"])), p["conv2"])
    expected = y + conv(pre, p["downsample_conv"], 2)  # projection of the pre-activated input
    out, _ = block.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_preact_bottleneck_block_by_hand():
    block = models.PreActBottleneck(8, cardinality=2, base_width=32)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 6, 6, 32)), jnp.float32)
    variables = random_variables(block, x.shape)
    p, s = variables["params"], variables["batch_stats"]
    y = conv(jax.nn.relu(bn(x, p["bn1"], s["bn1"])), p["conv1"])
    y = conv(jax.nn.relu(bn(y, p["bn2"], s["bn2"])), p["conv2"], groups=2)
    y = conv(jax.nn.relu(bn(y, p["bn3"], s["bn3"])), p["conv3"])
    out = block.apply(variables, x, train=False)
    np.testing.assert_allclose(out, x + y, rtol=1e-4, atol=1e-4)  # no ReLU after the addition


def test_preact_network_stem_first_stage_and_head_by_hand():
    model = models.create_model("preact_resnet18", width=8)
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x.shape)
    p, s = variables["params"], variables["batch_stats"]
    assert "bn1" not in p and "final_bn" in p  # stem: conv (+ max-pool) only
    logits, inter = intermediates(model, variables, x)
    # Stem: 7x7/2 conv then max-pool, no BN/ReLU in between; first stage: BN -> ReLU -> conv.
    h = max_pool(conv(x, p["conv1"], 2))
    for name in ("layer1_0", "layer1_1"):
        q, t = p[name], s[name]
        y = conv(jax.nn.relu(bn(h, q["bn1"], t["bn1"])), q["conv1"])
        h = h + conv(jax.nn.relu(bn(y, q["bn2"], t["bn2"])), q["conv2"])
        np.testing.assert_allclose(inter[name], h, rtol=1e-4, atol=1e-4)
    # Head: final BN -> ReLU -> global average pool -> fc.
    pooled = jax.nn.relu(bn(inter["layer4_1"], p["final_bn"], s["final_bn"])).mean(axis=(1, 2))
    expected = pooled @ p["fc"]["kernel"] + p["fc"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# Registry errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("resnet19", {}, r"unknown model 'resnet19'; valid names: .*resnet18"),
        ("resnet18", {"foo": 1}, r"unknown option\(s\) foo .*valid options: .*variant"),
        ("resnet18", {"cardinality": 4}, r"unknown option\(s\) cardinality .*valid options"),
        ("resnet18", {"variant": "foo"}, r"variant='foo' .*valid values: d2l, torchvision"),
        ("resnet50", {"stem": "bar"}, r"stem='bar' .*valid values: imagenet, small"),
        ("resnet18", {"width": 0}, r"width=0 .*positive integer"),
        ("resnext50_32x4d", {"cardinality": -1}, r"cardinality=-1 .*positive integer"),
        ("resnet50", {"grouped_conv": "fast"}, r"grouped_conv='fast' .*valid values: auto, nat"),
        ("resnet18", {"stem_conv": "fft"}, r"stem_conv='fft' .*valid values: auto, direct, sp"),
        ("resnet18", {"stem_conv": "space_to_depth", "stem": "small"},
         r"stem_conv='space_to_depth' applies to the imagenet stem only"),
        ("resnet18", {"grouped_conv": "split"}, r"unknown option\(s\) grouped_conv"),
        ("plain18", {"zero_init_residual": True}, r"zero_init_residual needs the shortcuts"),
        # Caught at construction, not when init traces: a stage's bottleneck would be 0 wide.
        ("resnext50_32x4d", {"width": 8}, r"bottleneck width is 0 \(num_channels=8, base_wi"),
        ("resnet50", {"width": 8, "base_width": 1}, r"bottleneck width is 0"),
    ],
)
def test_bad_names_and_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match) as info:
        models.create_model(name, **options)
    assert "\n" not in str(info.value)


def test_wrong_input_is_named_at_trace_time():
    # uint8 pixels would otherwise run (logits of 0-255 input, no error); an image without its
    # batch axis would fail as a kernel-shape mismatch of the head.
    model = models.create_model("resnet18", width=4, stem="small")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)),
                                                  train=False))
    with pytest.raises(TypeError, match=r"float images scaled to \[0, 1\]; got uint8"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2, 8, 8, 1), jnp.uint8),
                                             train=False), variables)
    with pytest.raises(ValueError, match=r"NHWC images \(N, H, W, C\); got shape \(8, 8, 1\)"):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((8, 8, 1)), train=False), variables)


def test_resnext_hyperparameters_override():
    model = models.create_model("resnext50_32x4d", cardinality=8, base_width=14, width=64)
    params = models.abstract_variables(model, (1, 32, 32, 3))["params"]
    # width = int(64 * 14 / 64) * 8 = 112 channels in 8 groups of 14.
    assert params["layer1_0"]["conv2"]["kernel"].shape == (3, 3, 14, 112)
    same = models.create_model("resnet50", cardinality=32, base_width=4)
    assert (same.cardinality, same.base_width) == (32, 4)


def test_chapter_resnext_block_shapes_and_shortcut():
    block = models.ResNeXtBlock(32, groups=4, bot_mul=1, use_1x1conv=True, strides=2)
    x = jax.ShapeDtypeStruct((1, 8, 8, 16), jnp.float32)
    variables = jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(0), x)
    params = variables["params"]
    assert params["conv2"]["kernel"].shape == (3, 3, 4, 32)  # 32 // 4 = 8 groups of 4 channels
    assert {"downsample_conv", "downsample_bn"} <= set(params)  # the chapter's conv4 + bn4
    assert "bias" in params["conv1"]  # LazyConv2d's default bias
    out = jax.eval_shape(functools.partial(block.apply, train=False), variables, x)
    assert out.shape == (1, 4, 4, 32)
    bad = models.ResNeXtBlock(32, groups=5, bot_mul=1)
    with pytest.raises(ValueError, match="groups=5 must divide bot_channels=32"):
        jax.eval_shape(functools.partial(bad.init, train=False), jax.random.key(0), x)


# ---------------------------------------------------------------------------------------------
# Whole networks by hand: the chapter's stem and head, and the plain nets' blocks
# ---------------------------------------------------------------------------------------------


def _stem_by_hand(name: str, side: int, seed: int):
    """A width-8 model's variables, its logits and blocks' outputs on random input, and its
    stem computed by hand: D2L 8.6.3's b1, 7x7/2 conv (pad 3, bias) -> BN -> ReLU -> 3x3/2
    max-pool (pad 1)."""
    model = models.create_model(name, width=8)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(2, side, side, 3)), jnp.float32)
    variables = random_variables(model, x.shape)
    p, s = variables["params"], variables["batch_stats"]
    logits, inter = intermediates(model, variables, x)
    return p, s, logits, inter, max_pool(jax.nn.relu(bn(conv(x, p["conv1"], 2), p["bn1"],
                                                         s["bn1"])))


def test_chapter_network_stem_first_stage_and_head_by_hand():
    # The stem, then the basic blocks; the head: global average pool -> dense. At 64x64 the
    # last stage is 2x2, so that its pooling is a mean over several positions.
    p, s, logits, inter, h = _stem_by_hand("resnet18", 64, seed=8)
    chex.assert_shape(h, (2, 16, 16, 8))  # 64 -> 32 (conv) -> 16 (pool)
    for name in ("layer1_0", "layer1_1"):  # identity shortcuts: 8 channels, stride 1
        q, t = p[name], s[name]
        y = jax.nn.relu(bn(conv(h, q["conv1"]), q["bn1"], t["bn1"]))
        h = jax.nn.relu(bn(conv(y, q["conv2"]), q["bn2"], t["bn2"]) + h)
        np.testing.assert_allclose(inter[name], h, rtol=1e-4, atol=1e-4)
    chex.assert_shape(inter["layer4_1"], (2, 2, 2, 64))
    expected = inter["layer4_1"].mean(axis=(1, 2)) @ p["fc"]["kernel"] + p["fc"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_plain_networks_compute_no_shortcut():
    # A function check (an identity shortcut has no parameters to miss): every block of the
    # first two stages is conv -> BN -> ReLU -> conv -> BN -> ReLU of its input, nothing added.
    p, s, _, inter, h = _stem_by_hand("plain18", 32, seed=9)
    for name, strides in (("layer1_0", 1), ("layer1_1", 1), ("layer2_0", 2), ("layer2_1", 1)):
        q, t = p[name], s[name]
        assert "downsample_conv" not in q
        y = jax.nn.relu(bn(conv(h, q["conv1"], strides), q["bn1"], t["bn1"]))
        y = jax.nn.relu(bn(conv(y, q["conv2"]), q["bn2"], t["bn2"]))
        np.testing.assert_allclose(inter[name], y, rtol=1e-4, atol=1e-4, err_msg=name)
        h = inter[name]
