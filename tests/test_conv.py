"""Tests for resnet_jax.conv: every alternative convolution is ``lax.conv_general_dilated``.

Functions are compared in float64, values and both gradients, so that only the order of the sums
may differ (1e-12); whole networks likewise. The backend defaults are checked by handing each
resolver the backend, not by asking the one this test runs on.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from resnet_jax import conv, models
from resnet_jax.train import create_train_state, train_step

HIGHEST = lax.Precision.HIGHEST
NHWC = ("NHWC", "HWIO", "NHWC")


def _loss(conv_fn, strides, padding, groups, layout, x, k):
    y = conv_fn(x, k, strides, padding, feature_group_count=groups, dimension_numbers=layout,
                precision=HIGHEST)
    return jnp.sum(jnp.sin(y)), y


def _value_and_grads(conv_fn, x, k, *, strides, padding, groups=1, layout=NHWC):
    f = functools.partial(_loss, conv_fn, strides, padding, groups, layout)
    (_, y), grads = jax.value_and_grad(f, (0, 1), has_aux=True)(x, k)
    return y, grads


# Every conv shape of the model family: 1x1 / 3x3 / 7x7, strides 1 and 2, grouped, the stems'.
IM2COL_CASES = {
    "1x1/1": (1, 1, 1, 16, 24, (9, 9), ((0, 0), (0, 0))),
    "1x1/2 projection": (1, 2, 1, 16, 24, (9, 9), ((0, 0), (0, 0))),
    "3x3/1": (3, 1, 1, 8, 8, (10, 10), ((1, 1), (1, 1))),
    "3x3/2": (3, 2, 1, 8, 16, (11, 10), ((1, 1), (1, 1))),
    "7x7/2 imagenet stem": (7, 2, 1, 1, 8, (20, 21), ((3, 3), (3, 3))),
    "3x3/1 small stem": (3, 1, 1, 1, 8, (12, 12), ((1, 1), (1, 1))),
    "3x3/1 grouped": (3, 1, 4, 16, 16, (8, 8), ((1, 1), (1, 1))),
    "3x3/2 grouped": (3, 2, 8, 16, 32, (9, 9), ((1, 1), (1, 1))),
    "4x4/1 space-to-depth stem": (4, 1, 1, 4, 8, (13, 13), ((0, 0), (0, 0))),
}


@pytest.mark.parametrize("case", IM2COL_CASES.values(), ids=IM2COL_CASES.keys())
def test_conv_im2col_is_lax_conv_with_its_gradients(case):
    kernel, stride, groups, cin, cout, size, padding = case
    rng = np.random.default_rng(kernel * 10 + stride)
    with jax.enable_x64(True):  # float64: equal up to the order of the sums
        x = jnp.asarray(rng.normal(size=(2, *size, cin)))
        k = jnp.asarray(rng.normal(size=(kernel, kernel, cin // groups, cout)))
        args = {"strides": (stride, stride), "padding": padding, "groups": groups}
        want = _value_and_grads(lax.conv_general_dilated, x, k, **args)
        got = _value_and_grads(conv.conv_im2col, x, k, **args)
        jaxpr = str(jax.make_jaxpr(functools.partial(
            _loss, conv.conv_im2col, (stride, stride), padding, groups, NHWC))(x, k))
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-11)
    # A matrix product, not XLA's convolution, except forward for stride-1 convs on maps of
    # 12x12 and more, which XLA:CPU runs fast (their weight gradient is still a product).
    xla_forward = groups == 1 and kernel > 1 and stride == 1 and size[0] * size[1] >= 144
    assert ("conv_general_dilated" in jaxpr) == xla_forward


# Maps of at most 4 pixels, which conv_by_map computes as one product with the conv's matrix,
# and other strides and paddings.
BY_MAP_CASES = {
    "3x3/1 on 2x2": (3, 1, 1, 8, 8, (2, 2), ((1, 1), (1, 1))),
    "3x3/1 on 1x1": (3, 1, 1, 8, 8, (1, 1), ((1, 1), (1, 1))),
    "3x3/2 on 2x2": (3, 2, 1, 8, 16, (2, 2), ((1, 1), (1, 1))),
    "3x3/1 on 1x3, uneven padding": (3, 1, 1, 4, 8, (1, 3), ((1, 0), (0, 1))),
    "3x3/1 on 2x2, no padding": (3, 1, 1, 4, 8, (2, 2), ((0, 0), (0, 0))),
    # Strided convs' gradients: an even kernel, uneven padding, stride 3.
    "4x4/2, uneven padding": (4, 2, 1, 4, 8, (9, 8), ((1, 2), (0, 1))),
    "3x3/3, uneven padding": (3, 3, 1, 4, 8, (10, 9), ((1, 1), (0, 2))),
}


@pytest.mark.parametrize("case", [*IM2COL_CASES.values(), *BY_MAP_CASES.values()],
                         ids=[*IM2COL_CASES, *BY_MAP_CASES])
def test_conv_by_map_is_lax_conv_with_its_gradients(case):
    kernel, stride, groups, cin, cout, size, padding = case
    rng = np.random.default_rng(kernel * 10 + stride + size[0])
    loss = functools.partial(_loss, conv.conv_by_map, (stride, stride), padding, groups, NHWC)
    with jax.enable_x64(True):  # float64: equal up to the order of the sums
        x = jnp.asarray(rng.normal(size=(2, *size, cin)))
        k = jnp.asarray(rng.normal(size=(kernel, kernel, cin // groups, cout)))
        args = {"strides": (stride, stride), "padding": padding, "groups": groups}
        want = _value_and_grads(lax.conv_general_dilated, x, k, **args)
        got = _value_and_grads(conv.conv_by_map, x, k, **args)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda x, k: loss(x, k)[0], (0, 1)))(x, k))
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-11)
    # XLA's convolution, forward and both gradients, for ungrouped kernels larger than 1x1 on
    # maps of more than 4 pixels; otherwise products.
    xla = groups == 1 and kernel > 1 and size[0] * size[1] > conv.DENSE_MAX_PIXELS
    assert ("conv_general_dilated" in jaxpr) == xla
    assert "cond" in jaxpr if xla else "cond" not in jaxpr  # the weight gradient's transposes


def test_by_map_compiler_options_take_xla_cpus_convolutions_out_of_ynnpack(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "")  # (the suite's own XLA_FLAGS set that flag)
    options = conv.compiler_options("by_map", "cpu")
    assert options == {conv.YNN_FUSION_FLAG: conv.YNN_FUSIONS_WITHOUT_CONVS}
    assert conv.compiler_options("auto", "gpu") is None
    assert conv.compiler_options("by_size", "cpu") is None
    assert conv.compiler_options("xla", "cpu") is None
    # The option XLA:CPU parses (a bad value is an error) and acts on: XLA's convolution runs
    # as a YNNPACK fusion when that list names convolutions, and not under by_map's list.
    x, k = jnp.ones((2, 8, 8, 32)), jnp.ones((3, 3, 32, 32))

    def program(fusions):
        f = jax.jit(lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                          dimension_numbers=NHWC),
                    compiler_options={conv.YNN_FUSION_FLAG: fusions})
        return f.lower(x, k).compile().as_text()

    assert "__ynn_fusion" in program("LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION")
    assert "__ynn_fusion" not in program(conv.YNN_FUSIONS_WITHOUT_CONVS)
    # A user's own XLA_FLAGS setting of that flag wins.
    monkeypatch.setenv("XLA_FLAGS", f"--{conv.YNN_FUSION_FLAG}=")
    assert conv.compiler_options("by_map", "cpu") is None


@pytest.mark.parametrize("side", [12, 2])  # (by_map: XLA's convolution, the dense matrix)
@pytest.mark.parametrize("stride", [1, 2])  # (the two ways its gradient is computed)
def test_conv_im2col_and_by_map_in_bf16_are_as_close_as_xla_to_float64(stride, side):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, side, side, 16))
    k = rng.normal(size=(3, 3, 16, 32)) / 12
    args = {"strides": (stride, stride), "padding": ((1, 1), (1, 1))}
    with jax.enable_x64(True):
        exact = _value_and_grads(lax.conv_general_dilated, jnp.asarray(x), jnp.asarray(k), **args)
    bf16 = [jnp.asarray(a, jnp.bfloat16) for a in (x, k)]
    xla = _value_and_grads(lax.conv_general_dilated, *bf16, **args)

    def error(tree):
        pairs = zip(jax.tree.leaves(tree), jax.tree.leaves(exact), strict=True)
        return max(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b)))
                   / np.max(np.abs(np.asarray(b))) for a, b in pairs)

    for conv_fn in (conv.conv_im2col, conv.conv_by_map):
        got = _value_and_grads(conv_fn, *bf16, **args)
        assert got[0].dtype == xla[0].dtype == jnp.bfloat16
        # bf16 keeps 8 significant bits (relative rounding 2^-8 = 0.0039).
        assert error(got) < 0.02 and error(got) < 2 * error(xla) + 0.004, (conv_fn,
                                                                           error(got), error(xla))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_im2col_gradient_does_not_keep_every_convs_windows(stride):
    # Eight 3x3 convs. Kept for the backward pass, their windows (9x each input, 10.6 MB per
    # conv here) took 10 convs' worth of the gradient program's temp memory; built again in
    # the backward pass, 4 (this process compiles without most of XLA's optimisations).
    def loss(kernels, x):
        for i, k in enumerate(kernels):
            s = stride if i == 0 else 1
            x = jax.nn.relu(conv.conv_im2col(x, k, (s, s), ((1, 1), (1, 1)),
                                             dimension_numbers=NHWC))
        return jnp.sum(x**2)

    side = 24 * stride
    x = jax.ShapeDtypeStruct((8, side, side, 64), jnp.float32)
    kernels = [jax.ShapeDtypeStruct((3, 3, 64, 64), jnp.float32)] * 8
    compiled = jax.jit(jax.grad(loss)).lower(kernels, x).compile()
    windows = 8 * 24 * 24 * 9 * 64 * 4  # one conv's windows: 10.6 MB
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 6 * windows, temp / windows


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size", [(8, 8), (9, 12)])
def test_max_pool_slices_is_flax_max_pool_with_its_gradient(dtype, size):
    # Bit for bit, ties included (after a ReLU, most windows of zeros tie): each window's
    # gradient goes to its first maximum, as XLA's select-and-scatter sends it.
    rng = np.random.default_rng(size[1])
    with jax.enable_x64(dtype == jnp.float64):
        x = jnp.asarray(np.maximum(rng.normal(size=(2, *size, 3)), 0), dtype)
        pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding=((1, 1), (1, 1)))
        want, want_vjp = jax.vjp(pool, x)
        got, got_vjp = jax.vjp(conv.max_pool_slices, x)
        grad = jnp.asarray(rng.normal(size=want.shape), dtype)
        assert got.dtype == want.dtype and float(jnp.mean(x == 0)) > 0.3
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got_vjp(grad)[0], want_vjp(grad)[0])


def test_conv_im2col_leaves_what_it_does_not_rewrite_to_xla():
    x, k = jnp.ones((1, 6, 6, 2)), jnp.ones((3, 3, 2, 4))
    dilated = jax.make_jaxpr(lambda x, k: conv.conv_im2col(
        x, k, (1, 1), ((2, 2), (2, 2)), rhs_dilation=(2, 2), dimension_numbers=NHWC))(x, k)
    assert "conv_general_dilated" in str(dilated)
    nchw = jax.make_jaxpr(lambda x, k: conv.conv_im2col(
        x, k, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")))(
        x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1))
    assert "conv_general_dilated" in str(nchw)


@pytest.mark.parametrize("layout", [NHWC, ("NCHW", "OIHW", "NCHW")])
@pytest.mark.parametrize("groups, strides", [(2, 1), (4, 2), (8, 1)])
def test_conv_per_group_is_lax_grouped_conv_with_its_gradients(groups, strides, layout):
    rng = np.random.default_rng(groups)
    x = rng.normal(size=(2, 7, 7, 16))  # NHWC, and a kernel HWIO: 16 in, 24 out
    k = rng.normal(size=(3, 3, 16 // groups, 24))
    if layout[0] == "NCHW":
        x, k = x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1)
    args = {"strides": (strides, strides), "padding": ((1, 1), (1, 1)), "groups": groups,
            "layout": layout}
    with jax.enable_x64(True):  # float64: equal up to the order of the sums (1e-12)
        x, k = jnp.asarray(x, jnp.float64), jnp.asarray(k, jnp.float64)
        want = _value_and_grads(lax.conv_general_dilated, x, k, **args)
        got = _value_and_grads(conv.conv_per_group, x, k, **args)
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inner", [lax.conv_general_dilated, conv.conv_im2col])
@pytest.mark.parametrize("size, channels, kernel, padding", [
    ((96, 96), 1, 7, ((3, 3), (3, 3))),  # the chapter's stem
    ((28, 28), 1, 7, ((3, 3), (3, 3))),
    ((29, 30), 3, 7, ((3, 3), (3, 3))),  # odd and even sides
    ((9, 8), 2, 4, ((1, 2), (0, 1))),  # even kernel, uneven padding
    ((10, 10), 1, 1, ((0, 0), (0, 0))),
])
def test_conv_space_to_depth_is_the_strided_conv_with_its_gradients(size, channels, kernel,
                                                                     padding, inner):
    rng = np.random.default_rng(kernel)
    s2d = functools.partial(conv.conv_space_to_depth, inner=inner)
    args = {"strides": (2, 2), "padding": padding}
    with jax.enable_x64(True):  # float64: equal up to the order of the sums
        x = jnp.asarray(rng.normal(size=(2, *size, channels)))
        k = jnp.asarray(rng.normal(size=(kernel, kernel, channels, 5)))
        want = _value_and_grads(lax.conv_general_dilated, x, k, **args)
        got = _value_and_grads(s2d, x, k, **args)
        jaxpr = str(jax.make_jaxpr(functools.partial(
            _loss, s2d, (2, 2), padding, 1, NHWC))(x, k))
    chex.assert_trees_all_close(got, want, rtol=1e-12, atol=1e-11)
    assert "window_strides=(2, 2)" not in jaxpr


# ---------------------------------------------------------------------------------------------
# Whole networks: every choice is the same function with the same parameters
# ---------------------------------------------------------------------------------------------

F64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
NETWORKS = {
    # name: (model builder, input side, the choices to compare)
    "resnet18 imagenet stem": (
        functools.partial(models.create_model, "resnet18", width=8), 32,
        [{"conv": "xla", "stem_conv": "direct"}, {"conv": "xla", "stem_conv": "space_to_depth"},
         {"conv": "im2col", "stem_conv": "direct"},
         {"conv": "im2col", "stem_conv": "space_to_depth"},
         {"conv": "by_map", "stem_conv": "direct"}]),
    "resnext small stem": (
        functools.partial(models.ResNet, ((1, 64), (1, 128)), "bottleneck", cardinality=8,
                          base_width=8, width=16, stem="small"), 8,
        [{"conv": "xla", "grouped_conv": "native"}, {"conv": "xla", "grouped_conv": "split"},
         {"conv": "im2col"}, {"conv": "by_map"}]),
    "preact_resnet18 torchvision": (
        functools.partial(models.create_model, "preact_resnet18", width=8,
                          variant="torchvision"), 32,
        [{"conv": "xla"}, {"conv": "im2col"}, {"conv": "by_map"}]),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_every_conv_choice_gives_the_same_network(name):
    build, side, choices = NETWORKS[name]
    nets = [build(**choice, **F64) for choice in choices]

    def loss(net, variables, x):
        logits, _ = net.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits**2)

    # float64: the programs sum in different orders, and train-mode BN in a deep net amplifies
    # float32 rounding past any tolerance that would still catch a wrong window or group.
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(5).normal(size=(4, side, side, 1)))
        inits = [jax.jit(functools.partial(net.init, train=False))(jax.random.key(0), x)
                 for net in nets]
        for other in inits[1:]:
            chex.assert_trees_all_equal(other, inits[0])  # names, shapes, values
        results = [jax.jit(jax.value_and_grad(functools.partial(loss, net)))(inits[0], x)
                   for net in nets]
    for choice, result in zip(choices[1:], results[1:], strict=True):
        chex.assert_trees_all_close(result, results[0], rtol=1e-9, atol=1e-12,
                                    custom_message=str(choice))


def test_by_size_takes_im2col_from_its_threshold_on():
    def program(n):  # a 3x3 conv of 64 channels on n 8x8 maps: 4.7 MFLOP per example
        x, k = jnp.ones((n, 8, 8, 64)), jnp.ones((3, 3, 64, 64))
        assert conv.conv_flops(x.shape, k.shape, (1, 1), ((1, 1), (1, 1))) == n * 2 * 64 * 576 * 64
        return str(jax.make_jaxpr(lambda x, k: conv.conv_by_size(
            x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))(x, k))

    assert 2 * 4718592 < conv.IM2COL_MIN_FLOPS < 3 * 4718592  # (the sizes below straddle it)
    assert "conv_general_dilated" in program(2)
    assert "conv_general_dilated" not in program(3)
    # A grouped convolution takes im2col's batched product at any size.
    x, k = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 2, 8))
    grouped = jax.make_jaxpr(lambda x, k: conv.conv_by_size(
        x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC, feature_group_count=4))(x, k)
    assert "conv_general_dilated" not in str(grouped)


def _primitives(**options) -> str:
    net = models.create_model("resnet18", width=8, **options)
    jaxpr = jax.make_jaxpr(lambda x: net.init_with_output(jax.random.key(0), x, train=False)[0])
    return str(jaxpr(jnp.zeros((2, 32, 32, 1))))


def test_the_choices_reach_the_program():
    # im2col leaves no convolution; XLA's convs keep one per layer (20 in ResNet-18: the stem,
    # 16 in the blocks, 3 projections); space-to-depth computes the stem without a stride.
    assert _primitives(conv="im2col").count("conv_general_dilated") == 0
    # (at 32x32 and batch 2, every conv of a width-8 ResNet-18 is below the threshold)
    assert _primitives(conv="by_size").count("conv_general_dilated") == 20
    # by_map: the stem and 9 convs on maps of 8x8 and 4x4; the 7 on 2x2 and 1x1 are products.
    assert _primitives(conv="by_map").count("conv_general_dilated") == 10
    # The stem's max-pool goes with the convolutions: XLA's reduce-window, or slices.
    assert "reduce_window_max" in _primitives(conv="xla")
    assert all("reduce_window" not in _primitives(conv=c) for c in ("by_size", "im2col", "by_map"))
    assert _primitives(conv="xla", stem_conv="direct").count("conv_general_dilated") == 20
    strided = {s: _primitives(conv="xla", stem_conv=s).count("window_strides=(2, 2)")
               for s in ("direct", "space_to_depth")}
    assert strided == {"direct": 7, "space_to_depth": 6}
    assert _primitives(conv="xla", stem="small", stem_conv="auto").count(
        "window_strides=(2, 2)") == 6
    assert models.create_model("resnet18").conv == "auto"


@pytest.mark.parametrize("backend, want", [
    ("cpu", {"conv": "by_map", "grouped_conv": "split", "stem_conv": "direct"}),
    ("gpu", {"conv": "xla", "grouped_conv": "native", "stem_conv": "space_to_depth"}),
    ("tpu", {"conv": "xla", "grouped_conv": "native", "stem_conv": "space_to_depth"}),
])
def test_auto_resolves_per_backend(backend, want):
    got = {"conv": conv.resolve_conv("auto", backend),
           "grouped_conv": conv.resolve_grouped_conv("auto", backend),
           "stem_conv": conv.resolve_stem_conv("auto", "imagenet", backend)}
    assert got == want
    assert conv.resolve_stem_conv("auto", "small", backend) == "direct"
    for resolve, choices in ((conv.resolve_conv, conv.CONVS),
                             (conv.resolve_grouped_conv, conv.GROUPED_CONVS),
                             (conv.resolve_stem_conv, conv.STEM_CONVS)):
        forced = [c for c in choices if c != "auto"]
        assert [resolve(c, backend=backend) for c in forced] == forced  # a forced choice stays
    with pytest.raises(ValueError, match="conv='fft' is not valid"):
        conv.resolve_conv("fft", backend)


def test_auto_is_the_default_backends_choice():
    # The models resolve "auto" with the backend JAX runs on: here, the one of this test run.
    backend = jax.default_backend()
    auto = _primitives(conv="auto", stem_conv="auto")
    forced = _primitives(conv=conv.resolve_conv("auto", backend),
                         stem_conv=conv.resolve_stem_conv("auto", "imagenet", backend))
    assert auto == forced


def test_one_train_step_is_the_same_with_every_conv_choice():
    # float32, as users train: equal up to float32 rounding after one SGD step.
    x = jnp.asarray(np.random.default_rng(1).random(size=(8, 16, 16, 1)), jnp.float32)
    batch = {"image": x, "label": jnp.arange(8) % 10}
    states = {}
    for choice in ("xla", "im2col", "by_map"):
        model = models.create_model("resnet18", width=8, stem="small", conv=choice)
        state = create_train_state(model, optax.sgd(0.01), jax.random.key(0), x.shape)
        states[choice] = jax.jit(train_step)(state, batch)
    xla, m_xla = states.pop("xla")
    for other, metrics in states.values():
        np.testing.assert_allclose(metrics["loss"], m_xla["loss"], rtol=1e-5)
        chex.assert_trees_all_close(other.params, xla.params, rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(other.batch_stats, xla.batch_stats, rtol=1e-4, atol=1e-6)
