"""Convolutions: one function, several programs, chosen per backend.

Every function here computes ``lax.conv_general_dilated`` for the layouts the models use (NHWC
input, HWIO kernel), with the same parameters and, up to the order of the sums, the same values
and gradients; only the program that XLA runs differs. The models pick one through three
options, each with an ``"auto"`` default resolved from the backend (:func:`resolve_conv`,
:func:`resolve_grouped_conv`, :func:`resolve_stem_conv`), so that GPU and TPU programs stay XLA's
own convolutions while a CPU gets what is fast there:

* ``conv``: ``"xla"`` (``lax.conv_general_dilated``), ``"im2col"`` (:func:`conv_im2col`: the
  shifted windows of the padded input stacked on the channel axis, times the kernel as one
  matrix), ``"by_size"`` (im2col for grouped convolutions and those of at least
  ``IM2COL_MIN_FLOPS``, XLA's below) or ``"by_map"`` (:func:`conv_by_map`: by the input map's
  size, a dense matrix product on maps of at most 2x2 pixels, else XLA's convolution with
  gradients XLA:CPU runs fast; its programs compile with :func:`compiler_options`, which take
  XLA:CPU's convolutions out of YNNPACK). In a train step on XLA:CPU, im2col ran the chapter's
  ResNet-18 2-4x faster than XLA's convolutions at 28x28-32x32, and by_map 1.3-1.5x faster
  than by_size on a Xeon with AVX-512 (benchmarks.md). ``"auto"`` is ``"by_map"`` on a CPU,
  ``"xla"`` elsewhere. The stem's max-pool goes with it
  (:func:`max_pool`): XLA's reduce-window under ``"xla"``, else :func:`max_pool_slices`, whose
  gradient needs no scatter.
* ``grouped_conv`` (convs with groups, ResNeXt, under ``conv="xla"``): ``"native"``
  (``feature_group_count``) or ``"split"`` (:func:`conv_per_group`); ``"auto"`` splits on a CPU.
  Under ``conv="im2col"`` or ``"by_size"`` groups are a batched matrix product and this option
  has no effect.
* ``stem_conv`` (the imagenet stem's 7x7/2 conv): ``"direct"`` or ``"space_to_depth"``
  (:func:`conv_space_to_depth`); ``"auto"`` is direct on a CPU and for the small stem.

:func:`conv_function` turns the resolved choices into the callable ``nn.Conv`` takes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONVS = ("auto", "xla", "im2col", "by_size", "by_map")
# Forward FLOPs of one call (2 * N * H' * W' * kh * kw * C/groups * O) from which "by_size"
# takes im2col: the tiny convs of a TINY test model (~2 MFLOP) ran faster and compiled
# faster as XLA's; the quick preset's (~30-150 MFLOP) 2-3x faster as im2col.
IM2COL_MIN_FLOPS = 10e6
# "by_map": maps of at most this many pixels (2x2 and smaller) take the conv's dense matrix.
DENSE_MAX_PIXELS = 4
# XLA:CPU's fusion types of YNNPACK without its convolutions (the default list, less
# LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION): "by_map" programs compile with it.
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSIONS_WITHOUT_CONVS = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
GROUPED_CONVS = ("auto", "native", "split")
STEM_CONVS = ("auto", "direct", "space_to_depth")

ConvFn = Callable[..., jax.Array]
_NHWC = ("NHWC", "HWIO", "NHWC")


def _check(option: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{option}={value!r} is not valid; valid values: {', '.join(valid)}")


def _on_cpu(backend: str | None) -> bool:
    return (backend or jax.default_backend()) == "cpu"


def resolve_conv(choice: str, backend: str | None = None) -> str:
    """``"xla"``, ``"im2col"``, ``"by_size"`` or ``"by_map"``: ``choice`` itself, or for
    ``"auto"`` the backend's (``backend``, default ``jax.default_backend()``): by map on a CPU,
    XLA's convolutions elsewhere."""
    _check("conv", choice, CONVS)
    if choice == "auto":
        return "by_map" if _on_cpu(backend) else "xla"
    return choice


def compiler_options(conv: str = "auto", backend: str | None = None) -> dict[str, str] | None:
    """The XLA options a program of the resolved ``conv`` compiles with (``jax.jit(...,
    compiler_options=...)``), or None: under ``"by_map"`` on a CPU, XLA:CPU's convolutions
    run outside YNNPACK (``YNN_FUSIONS_WITHOUT_CONVS``), unless ``XLA_FLAGS`` already sets
    that flag. Why: on a Xeon with AVX-512 XLA:CPU's other convolution kernels ran the
    chapter's 3x3 convolutions 1.2-2.4x faster forward and 1.4-3.4x faster as weight gradients
    (benchmarks.md). Without these options a "by_map" program gives the same values, slower.
    """
    if resolve_conv(conv, backend) != "by_map" or not _on_cpu(backend) \
            or YNN_FUSION_FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    return {YNN_FUSION_FLAG: YNN_FUSIONS_WITHOUT_CONVS}


def resolve_grouped_conv(choice: str, backend: str | None = None) -> str:
    """``"native"`` or ``"split"``: ``choice`` itself, or for ``"auto"`` the backend's (split on a
    CPU, where XLA's grouped convolution is many times slower; cuDNN implements groups itself)."""
    _check("grouped_conv", choice, GROUPED_CONVS)
    if choice == "auto":
        return "split" if _on_cpu(backend) else "native"
    return choice


def resolve_stem_conv(choice: str, stem: str = "imagenet", backend: str | None = None) -> str:
    """``"direct"`` or ``"space_to_depth"``: ``choice`` itself, or for ``"auto"`` the backend's
    (direct on a CPU); always ``"direct"`` for the small stem's stride-1 conv."""
    _check("stem_conv", choice, STEM_CONVS)
    if choice == "auto":
        return "direct" if stem != "imagenet" or _on_cpu(backend) else "space_to_depth"
    return choice


def conv_function(conv: str, grouped_conv: str = "auto", *, groups: int = 1,
                  space_to_depth: bool = False) -> ConvFn | None:
    """The ``conv_general_dilated`` for ``nn.Conv``: None (flax's default, XLA's convolution) or
    one of this module's functions, for resolved or ``"auto"`` choices."""
    xla = conv_per_group if groups > 1 and resolve_grouped_conv(grouped_conv) == "split" else None
    inner = {"xla": xla, "im2col": conv_im2col,
             "by_size": functools.partial(conv_by_size, xla=xla or lax.conv_general_dilated),
             "by_map": conv_by_map}[resolve_conv(conv)]
    if space_to_depth:
        return functools.partial(conv_space_to_depth, inner=inner or lax.conv_general_dilated)
    return inner


def max_pool(conv: str) -> Callable[[jax.Array], jax.Array]:
    """The stem's 3x3/2 max-pool (padding 1) that goes with the resolved or ``"auto"`` ``conv``:
    XLA's reduce-window under ``"xla"``, else :func:`max_pool_slices` (the same values and
    gradients)."""
    if resolve_conv(conv) == "xla":
        return functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2),
                                 padding=((1, 1), (1, 1)))
    return max_pool_slices


def _is_plain_nhwc(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any,
                   lhs_dilation: Any, rhs_dilation: Any) -> bool:
    undilated = all(d is None or all(v == 1 for v in d) for d in (lhs_dilation, rhs_dilation))
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    return undilated and dn == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)


def conv_im2col(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, *,
    lhs_dilation: Any = None, rhs_dilation: Any = None, dimension_numbers: Any = None,
    feature_group_count: int = 1, precision: Any = None, preferred_element_type: Any = None,
) -> jax.Array:
    """``lax.conv_general_dilated`` of an NHWC/HWIO convolution as one matrix product (im2col).

    The ``kh * kw`` strided windows of the padded input are stacked on the channel axis, in the
    kernel's (row, column, channel) order, so that the convolution is that ``(N, H', W', kh*kw*C)``
    array times the kernel reshaped to ``(kh*kw*C, O)``; with groups, a product batched over
    the groups. Why: on XLA:CPU this trained the chapter's ResNet-18 ~3x faster at 28x28-32x32
    than XLA's own convolutions (benchmarks.md), whose gradient kernels are slow there.
    Ungrouped convolutions larger than 1x1 have their own gradient (:func:`_windows_conv`): the
    windows are built again in the backward pass rather than kept (kh*kw times the input, for
    every conv), and a stride-1 conv's input gradient is a convolution of the cotangent. A
    stride-1 conv on maps of 12x12 and more runs forward and input gradient as XLA's forward
    convolution, which XLA:CPU runs fast there: only its weight gradient is a product (the
    chapter's step at 96x96 ran ~15% faster). Dilated or non-NHWC convolutions go to
    ``lax.conv_general_dilated`` unchanged.
    Usable as ``nn.Conv(..., conv_general_dilated=conv_im2col)``.
    """
    if not _is_plain_nhwc(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type)
    kh, kw, cg, out = rhs.shape
    strides, padding = _explicit(lhs.shape[1:3], (kh, kw), window_strides, padding)
    if feature_group_count == 1 and kh * kw > 1:
        return _windows_conv(lhs, rhs, strides, padding, precision, preferred_element_type)
    dot = functools.partial(jnp.einsum, precision=precision,
                            preferred_element_type=preferred_element_type)
    patches = _patches(lhs, (kh, kw), strides, padding)
    g = feature_group_count
    if g == 1:  # a plain product: a group axis of 1 would make XLA copy the patches around it
        return dot("nhwk,ko->nhwo", patches, rhs.reshape(kh * kw * cg, out))
    # (kh*kw, C/G, G, O/G): the output features of group g are the g-th run of O/G.
    n, oh, ow, _ = patches.shape
    kernel = rhs.reshape(kh * kw, cg, g, out // g)
    patches = patches.reshape(n, oh, ow, kh * kw, g, cg)
    return dot("nhwkgc,kcgo->nhwgo", patches, kernel).reshape(n, oh, ow, out)


Pads = tuple[tuple[int, int], tuple[int, int]]


def _explicit(size: Sequence[int], window: Sequence[int], window_strides: Sequence[int],
              padding: Any) -> tuple[tuple[int, int], Pads]:
    """Strides and padding as ints, a padding string (``"SAME"``) resolved for an input of
    spatial ``size`` and a ``window`` = ``(kh, kw)`` kernel."""
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(size, window, window_strides, padding)
    return (tuple(int(s) for s in window_strides),
            tuple((int(lo), int(hi)) for lo, hi in padding))


def _output_size(size: Sequence[int], window: Sequence[int], strides: Sequence[int],
                 padding: Pads) -> tuple[int, int]:
    """The spatial output size of a convolution with explicit padding."""
    return tuple((n + lo + hi - k) // s + 1
                 for n, k, s, (lo, hi) in zip(size, window, strides, padding, strict=True))


def _patches(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], padding: Pads,
             flipped: bool = False) -> jax.Array:
    """The ``(N, H', W', kh*kw*C)`` windows of ``x`` (NHWC) zero-padded by ``padding``, in
    row-major window order, or its reverse if ``flipped`` (the order of a kernel flipped in
    space)."""
    (kh, kw), (sh, sw), ((top, bottom), (left, right)) = window, strides, padding
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (top, bottom, 0), (left, right, 0),
                                            (0, 0, 0)))
    out = ((x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1)
    windows = _strided_windows(x, window, strides, out)[::-1 if flipped else 1]
    return windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)


def _xla_runs_it_well(x_shape: Sequence[int], strides: tuple[int, int]) -> bool:
    """Whether XLA:CPU's own convolution is the faster program for a stride-1 conv of this
    input (forward, and its input gradient as a forward conv): on maps of 12x12 and more. On
    smaller maps it trained the chapter's ResNet-18 at 28x28-32x32 2-3x slower than im2col.
    The same maps take :func:`_row_windows_weight_grad` for their weight gradient."""
    return strides == (1, 1) and x_shape[1] * x_shape[2] >= 144


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _windows_conv(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int], padding: Pads,
                  precision: Any, preferred_element_type: Any) -> jax.Array:
    """An ungrouped :func:`conv_im2col` whose backward pass builds the windows again. Stride 1
    runs XLA's own convolution forward (no windows: XLA:CPU runs these fast, as one matrix
    kernel) on maps of 12x12 and more; others, the windows' product."""
    if _xla_runs_it_well(lhs.shape, strides):
        return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC,
                                        precision=precision,
                                        preferred_element_type=preferred_element_type)
    kh, kw, c, out = rhs.shape
    return jnp.einsum("nhwk,ko->nhwo", _patches(lhs, (kh, kw), strides, padding),
                      rhs.reshape(kh * kw * c, out), precision=precision,
                      preferred_element_type=preferred_element_type)


def _windows_conv_fwd(lhs, rhs, strides, padding, precision, preferred_element_type):
    y = _windows_conv(lhs, rhs, strides, padding, precision, preferred_element_type)
    return y, (lhs, rhs)


def _windows_conv_bwd(strides: tuple[int, int], padding: Pads, precision: Any,
                      preferred_element_type: Any, saved: tuple[jax.Array, jax.Array],
                      grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, k = saved
    kh, kw, c, out = k.shape
    # The windows are built from x plus a zero taken from the cotangent: XLA:CPU drops
    # optimisation barriers, and its scheduler then built every conv's windows in the forward
    # pass and kept them all (the chapter's step at 96x96, batch 128: 1.8 GB of temp memory
    # against 0.9 GB with the zero). Keeping the forward's windows where it built them (maps
    # under 12x12) was slower: 1,502 against 1,904 img/s at 28x28, width 32, batch 128.
    x_late = x + (grad[0, 0, 0, 0] * 0).astype(x.dtype)
    if _xla_runs_it_well(x.shape, strides):
        dk = _row_windows_weight_grad(x_late, grad, (kh, kw), padding, precision)
    else:
        patches = _patches(x_late, (kh, kw), strides, padding)
        # (O, kh*kw*C) then transposed: as (kh*kw*C, O), XLA:CPU copied the windows
        # transposed. One contracting axis of N*H'*W': contracting over n, h and w, XLA:CPU
        # reordered both operands to (h, n, w) with a copy each.
        dk = jnp.einsum("mo,mk->ok", grad.reshape(-1, out), patches.reshape(-1, kh * kw * c),
                        precision=precision).T.reshape(k.shape)
    return _input_grad(x, k, grad, strides, padding, precision,
                       as_conv=_xla_runs_it_well(x.shape, strides)), dk.astype(k.dtype)


def _input_grad(x: jax.Array, k: jax.Array, grad: jax.Array, strides: tuple[int, int],
                padding: Pads, precision: Any, as_conv: bool) -> jax.Array:
    """The input gradient of an NHWC/HWIO convolution of ``x`` by ``k`` for cotangent ``grad``.

    Stride 1: the transposed convolution as a forward one, of the cotangent padded by
    kernel - 1 - padding with the kernel flipped in space and its channel axes swapped: XLA's
    convolution if ``as_conv``, else the cotangent's windows times the kernel. (XLA's own
    gradient reverses the kernel inside a slow kernel of XLA:CPU's.) Other strides: the
    windows' own transpose, sums of strided pads of the cotangent times the kernel.
    """
    kh, kw, c, out = k.shape
    if strides != (1, 1):
        dpatches = jnp.einsum("nhwo,ko->nhwk", grad, k.reshape(kh * kw * c, out),
                              precision=precision)
        _, windows_vjp = jax.vjp(lambda x: _patches(x, (kh, kw), strides, padding), x)
        return windows_vjp(dpatches.astype(x.dtype))[0]
    pads = ((kh - 1 - padding[0][0], kh - 1 - padding[0][1]),
            (kw - 1 - padding[1][0], kw - 1 - padding[1][1]))
    if as_conv:
        flipped = jnp.flip(k, (0, 1)).transpose(0, 1, 3, 2)
        return lax.conv_general_dilated(grad, flipped, (1, 1), pads, dimension_numbers=_NHWC,
                                        precision=precision).astype(x.dtype)
    # The cotangent's windows in flipped order, and the kernel as (C, kh*kw*O): the product's
    # right operand transposed. As (kh*kw*O, C) flipped, XLA:CPU reversed and transposed every
    # (O, C) block element by element (those copies took 23% of the 32x32 step's op time);
    # this moves whole rows of O.
    rows = k.reshape(kh * kw, c, out).transpose(1, 0, 2).reshape(c, kh * kw * out)
    return jnp.einsum("nhwk,ck->nhwc", _patches(grad, (kh, kw), (1, 1), pads, flipped=True),
                      rows, precision=precision).astype(x.dtype)


_windows_conv.defvjp(_windows_conv_fwd, _windows_conv_bwd)


def _row_windows_weight_grad(x: jax.Array, grad: jax.Array, window: tuple[int, int],
                             padding: Pads, precision: Any) -> jax.Array:
    """The kernel gradient ``(kh, kw, C, O)`` of a stride-1 NHWC convolution of ``x`` with
    cotangent ``grad``: the padded input's ``kw`` column shifts stacked on the channel axis,
    times the cotangent shifted down by each of the ``kh`` rows (zero-padded to the padded
    input's height), as ``kh`` products over one flattened N*H*W' axis.

    Why: the ``kh*kw`` windows of every position cost more than their product on XLA:CPU. This
    builds ``kw`` copies of the input and ``kh`` of the cotangent instead of ``kh*kw`` of the
    input: one stage-1 conv of the chapter's step (128x24x24x64) took 78 ms against 125 ms, and
    the step ran at 73-76 against 68-70 img/s in 695 against 775 MiB. Used on maps of 12x12 and
    more: on the 7x7 maps of the 28x28 step it was slower (1,679 against ~1,850 img/s).
    """
    kh, kw = window
    _, oh, _, out = grad.shape
    c = x.shape[-1]
    columns = _patches(x, (1, kw), (1, 1), padding)  # (N, oh + kh - 1, ow, kw*C)
    height = columns.shape[1]
    rows = columns.reshape(-1, kw * c)
    per_row = [jnp.einsum("mo,mk->ok",
                          lax.pad(grad, jnp.zeros((), grad.dtype),
                                  ((0, 0, 0), (i, height - oh - i, 0), (0, 0, 0), (0, 0, 0))
                                  ).reshape(-1, out),
                          rows, precision=precision)
               for i in range(kh)]  # (O, kw*C): sum over n, h, w of grad[h] x[h + i, w + j]
    return jnp.stack(per_row).reshape(kh, out, kw, c).transpose(0, 2, 3, 1)


def _strided_windows(x: jax.Array, window: tuple[int, int], stride: tuple[int, int],
                     out: tuple[int, int]) -> list[jax.Array]:
    """The ``kh * kw`` strided slices of ``x`` (NHWC) that a ``window`` = ``(kh, kw)`` operation
    of ``stride`` and output size ``out`` reads, in row-major window order."""
    n, _, _, c = x.shape
    (kh, kw), (sh, sw), (oh, ow) = window, stride, out
    return [lax.slice(x, (0, i, j, 0), (n, i + sh * (oh - 1) + 1, j + sw * (ow - 1) + 1, c),
                      (1, sh, sw, 1))
            for i in range(kh) for j in range(kw)]


def _pool_geometry(x: jax.Array, window: int, stride: int, pad: int
                   ) -> tuple[jax.Array, tuple[int, int]]:
    """``x`` padded with -inf on both spatial sides, and the pool's output size."""
    low = jnp.array(-jnp.inf, x.dtype)
    padded = lax.pad(x, low, ((0, 0, 0), (pad, pad, 0), (pad, pad, 0), (0, 0, 0)))
    h, w = padded.shape[1:3]
    return padded, ((h - window) // stride + 1, (w - window) // stride + 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool_slices(x: jax.Array, window: int = 3, stride: int = 2, pad: int = 1) -> jax.Array:
    """``nn.max_pool(x, (window, window), (stride, stride), ((pad, pad), (pad, pad)))`` (NHWC,
    -inf padding) as the maximum of its strided slices, with the same gradient: each window's
    gradient goes to its first maximum in row-major order, as XLA's select-and-scatter gives it.
    Why: on XLA:CPU that gradient became a scatter with four int32 index arrays the size of
    the padded input (328 MB of the chapter's train step at 96x96, batch 128; benchmarks.md).
    """
    padded, out = _pool_geometry(x, window, stride, pad)
    return functools.reduce(jnp.maximum, _strided_windows(padded, (window, window),
                                                          (stride, stride), out))


def _max_pool_fwd(x: jax.Array, window: int, stride: int, pad: int
                  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    y = max_pool_slices(x, window, stride, pad)
    return y, (x, y)


def _max_pool_bwd(window: int, stride: int, pad: int, saved: tuple[jax.Array, jax.Array],
                  grad: jax.Array) -> tuple[jax.Array]:
    x, y = saved

    def windows(x: jax.Array) -> list[jax.Array]:
        padded, out = _pool_geometry(x, window, stride, pad)
        return _strided_windows(padded, (window, window), (stride, stride), out)

    slices, scatter = jax.vjp(windows, x)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for part in slices:  # the first maximum of each window takes its gradient
        first = (part == y) & ~taken
        taken = taken | first
        parts.append(jnp.where(first, grad, jnp.zeros((), grad.dtype)))
    return scatter(parts)


max_pool_slices.defvjp(_max_pool_fwd, _max_pool_bwd)


def conv_flops(lhs_shape: Sequence[int], rhs_shape: Sequence[int], window_strides: Sequence[int],
               padding: Any) -> float:
    """Forward FLOPs of an NHWC/HWIO convolution (a multiply-add counts 2)."""
    n, h, w, _ = lhs_shape
    kh, kw, cg, out = rhs_shape
    strides, padding = _explicit((h, w), (kh, kw), window_strides, padding)
    oh, ow = _output_size((h, w), (kh, kw), strides, padding)
    return 2.0 * n * oh * ow * kh * kw * cg * out


def conv_by_size(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, *,
                 xla: ConvFn = lax.conv_general_dilated, **kwargs: Any) -> jax.Array:
    """:func:`conv_im2col` for a grouped convolution or one of at least ``IM2COL_MIN_FLOPS``,
    else ``xla`` (decided at trace time from the static shapes). Grouped ones of any size: a
    tiny ResNeXt-50 32x4d (16x16, width 16) trained 2 epochs in 25 s as one batched product per
    conv against 75 s split into 32 convolutions (0.36 against 0.62 s per step), compiling far
    less."""
    im2col = (_is_plain_nhwc(lhs, rhs, kwargs.get("dimension_numbers"),
                             kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"))
              and (kwargs.get("feature_group_count", 1) > 1
                   or conv_flops(lhs.shape, rhs.shape, window_strides, padding)
                   >= IM2COL_MIN_FLOPS))
    return (conv_im2col if im2col else xla)(lhs, rhs, window_strides, padding, **kwargs)


def conv_by_map(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                **kwargs: Any) -> jax.Array:
    """``lax.conv_general_dilated`` of an NHWC/HWIO convolution, its program chosen by the
    size of its input map, for XLA:CPU with the options of :func:`compiler_options`.

    * Maps of at most ``DENSE_MAX_PIXELS`` pixels (2x2, 1x1): :func:`conv_dense`. XLA:CPU's
      convolution took 16 ms for a 3x3 conv on 128x2x2x128 maps; this is one small product.
    * Larger maps with kernels larger than 1x1: :func:`conv_xla_cpu`, XLA's convolution with
      a weight gradient it runs fast.
    * 1x1 kernels and grouped convolutions: :func:`conv_im2col` (a plain or batched product).

    Dilated or non-NHWC convolutions go to ``lax.conv_general_dilated`` unchanged.
    """
    plain = _is_plain_nhwc(lhs, rhs, kwargs.get("dimension_numbers"),
                           kwargs.get("lhs_dilation"), kwargs.get("rhs_dilation"))
    kh, kw = rhs.shape[:2]
    if not plain or kwargs.get("feature_group_count", 1) > 1 or kh * kw == 1:
        return conv_im2col(lhs, rhs, window_strides, padding, **kwargs)
    strides, padding = _explicit(lhs.shape[1:3], (kh, kw), window_strides, padding)
    precision = kwargs.get("precision")
    element_type = kwargs.get("preferred_element_type")
    if lhs.shape[1] * lhs.shape[2] <= DENSE_MAX_PIXELS:
        return conv_dense(lhs, rhs, strides, padding, precision, element_type)
    return conv_xla_cpu(lhs, rhs, strides, padding, precision, element_type)


def _taps(size: tuple[int, int], window: tuple[int, int], strides: tuple[int, int],
          padding: Pads) -> np.ndarray:
    """``(H'*W', H*W, kh*kw)`` one-hot: which kernel tap joins input pixel q to output pixel p
    (none where the tap falls in the padding)."""
    (h, w), (kh, kw), (sh, sw), ((top, _), (left, _)) = size, window, strides, padding
    oh, ow = _output_size(size, window, strides, padding)
    taps = np.zeros((oh, ow, h, w, kh, kw), np.float32)
    for y, x, i, j in np.ndindex(oh, ow, kh, kw):
        u, v = y * sh + i - top, x * sw + j - left
        if 0 <= u < h and 0 <= v < w:
            taps[y, x, u, v, i, j] = 1
    return taps.reshape(oh * ow, h * w, kh * kw)


def conv_dense(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int], padding: Pads,
               precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """An NHWC/HWIO convolution (explicit padding) as one product with its dense matrix: the
    flattened ``(N, H*W*C)`` input times the ``(H*W*C, H'*W'*O)`` matrix that holds kernel tap
    (i, j) in the block joining each input pixel to each output pixel it reaches.

    The matrix has ``H*W*H'*W'`` blocks of ``C x O``, so this suits maps no larger than the
    kernel: on a 2x2 map it multiplies by the 4 taps each output reads where the windows
    would multiply all 9, 5 of them zero padding; on a 1x1 map, only the centre tap. The
    gradients are products too (autodiff).
    """
    n, h, w, c = lhs.shape
    kh, kw, _, out = rhs.shape
    taps = _taps((h, w), (kh, kw), strides, padding)
    matrix = jnp.einsum("pqt,tco->qcpo", jnp.asarray(taps, rhs.dtype),
                        rhs.reshape(kh * kw, c, out), precision=precision)
    y = jnp.einsum("nk,km->nm", lhs.reshape(n, h * w * c),
                   matrix.reshape(h * w * c, -1), precision=precision,
                   preferred_element_type=preferred_element_type)
    return y.reshape(n, *_output_size((h, w), (kh, kw), strides, padding), out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv_xla_cpu(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, int], padding: Pads,
                 precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """XLA's NHWC/HWIO convolution (explicit padding) with its own gradient, for XLA:CPU.

    Stride-1 input gradients are a forward convolution (:func:`_input_grad`), strided ones
    the windows' transpose (XLA's dilated-cotangent convolution was 1.4x slower). The weight
    gradient is XLA's convolution of the transposed input and cotangent
    (:func:`_weight_grad_of_transposes`).
    """
    return lax.conv_general_dilated(lhs, rhs, strides, padding, dimension_numbers=_NHWC,
                                    precision=precision,
                                    preferred_element_type=preferred_element_type)


def _conv_xla_cpu_fwd(lhs, rhs, strides, padding, precision, preferred_element_type):
    return conv_xla_cpu(lhs, rhs, strides, padding, precision, preferred_element_type), (lhs, rhs)


def _conv_xla_cpu_bwd(strides: tuple[int, int], padding: Pads, precision: Any,
                      preferred_element_type: Any, saved: tuple[jax.Array, jax.Array],
                      grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, k = saved
    dk = _weight_grad_of_transposes(x, k, grad, strides, padding, precision)
    return _input_grad(x, k, grad, strides, padding, precision, as_conv=True), dk


conv_xla_cpu.defvjp(_conv_xla_cpu_fwd, _conv_xla_cpu_bwd)


def _weight_grad_of_transposes(x: jax.Array, k: jax.Array, grad: jax.Array,
                               strides: tuple[int, int], padding: Pads,
                               precision: Any) -> jax.Array:
    """The kernel gradient of an NHWC/HWIO convolution as XLA's convolution of the input
    transposed to (C, H, W, N) with the cotangent transposed to (H', W', N, O) as the kernel
    (dilated by the stride): the sum over N is its channel axis.

    The transposes are taken inside a ``lax.cond`` (both branches the same) that XLA cannot
    fuse into. Left to itself, XLA:CPU recomputed each conv's input (the previous blocks' batch
    norm, residual sums and ReLU) and the cotangent inside its transposes, reading them in
    transposed order: 35-55 ms per transpose against 5 for a plain one, and the chapter's step
    at 96x96 ran at 90 against 102 img/s.
    """
    kh, kw = k.shape[:2]

    def transposed(operands):
        return operands[0].transpose(3, 1, 2, 0), operands[1].transpose(1, 2, 0, 3)

    # The predicate is the kernel's (replicated: no communication), true but for a NaN.
    x_t, grad_t = lax.cond(k[0, 0, 0, 0] == k[0, 0, 0, 0], transposed, transposed, (x, grad))
    # Rows and columns past the last window's reach are padding the forward never read.
    pads = [(lo, hi - (size + lo + hi - window) % stride) for size, (lo, hi), window, stride
            in zip(x.shape[1:3], padding, (kh, kw), strides, strict=True)]
    dk = lax.conv_general_dilated(x_t, grad_t, (1, 1), pads, rhs_dilation=strides,
                                  dimension_numbers=_NHWC, precision=precision)
    return dk.transpose(1, 2, 0, 3).astype(k.dtype)


def conv_per_group(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, *,
    feature_group_count: int = 1, dimension_numbers: Any = None, **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` computed as one ungrouped convolution per group.

    Same arguments, kernel layout and result as the grouped convolution (group ``g`` of the
    output features sees group ``g`` of the input features); only the program differs. On
    XLA:CPU this is what makes ResNeXt trainable with XLA's convolutions: a 3x3 convolution with
    32 groups of 4 channels on 128x20x20 maps, forward and backward, took 16.5 s natively and
    0.17 s split on this project's 2-core machine (jax 0.10.2), the time of an ungrouped conv of
    its size. Usable as ``nn.Conv(..., conv_general_dilated=conv_per_group)``.
    """
    if feature_group_count == 1:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding,
                                        dimension_numbers=dimension_numbers, **kwargs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    inputs = jnp.split(lhs, feature_group_count, axis=dn.lhs_spec[1])
    kernels = jnp.split(rhs, feature_group_count, axis=dn.rhs_spec[0])
    outputs = [lax.conv_general_dilated(x, k, window_strides, padding, dimension_numbers=dn,
                                        **kwargs) for x, k in zip(inputs, kernels, strict=True)]
    return jnp.concatenate(outputs, axis=dn.out_spec[1])


def conv_space_to_depth(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any, *,
    lhs_dilation: Any = None, rhs_dilation: Any = None, dimension_numbers: Any = None,
    feature_group_count: int = 1, inner: ConvFn = lax.conv_general_dilated, **kwargs: Any,
) -> jax.Array:
    """``lax.conv_general_dilated`` of a stride-2 NHWC/HWIO convolution, computed as a stride-1
    convolution (by ``inner``) on space-to-depth input (each 2x2 block of pixels becomes 4x the
    channels).

    The kernel is zero-padded to an even size ``2m`` and rearranged into an ``m x m`` kernel on
    ``4 * C`` channels, so the result (and, through autodiff, both gradients) equals the strided
    convolution's up to the order of the sums. Why: with one input channel, as the chapter's
    7x7/2 stem on Fashion-MNIST, cuDNN falls back to slow kernels (on an H200 the stem's weight
    gradient ran in its legacy ``wgrad_alg0_engine``, 19% of all weight-gradient time). MLPerf's
    ResNet-50 implementations use the same rewrite for their 3-channel stems. Anything other
    than a plain stride-2 NHWC convolution is passed to ``inner`` unchanged.
    Usable as ``nn.Conv(..., conv_general_dilated=conv_space_to_depth)``.
    """
    plain = (tuple(window_strides) == (2, 2) and feature_group_count == 1
             and not isinstance(padding, str)
             and _is_plain_nhwc(lhs, rhs, dimension_numbers, lhs_dilation, rhs_dilation))
    if not plain:
        return inner(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                     rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                     feature_group_count=feature_group_count, **kwargs)
    n, _, _, c = lhs.shape
    kh, kw, _, out = rhs.shape
    mh, mw = (kh + 1) // 2, (kw + 1) // 2
    # Output size of the strided conv; the padded input is cut or extended (with zeros that
    # only meet the kernel's zero padding) to exactly the 2 * (out - 1 + m) rows it reads.
    sizes = [(size + lo + hi - k) // 2 + 1 for size, (lo, hi), k in
             zip(lhs.shape[1:3], padding, (kh, kw), strict=True)]
    ends = [2 * (o - 1 + m) - size - lo for o, m, size, (lo, _) in
            zip(sizes, (mh, mw), lhs.shape[1:3], padding, strict=True)]
    x = lax.pad(lhs, jnp.zeros((), lhs.dtype), ((0, 0, 0), (padding[0][0], ends[0], 0),
                                                (padding[1][0], ends[1], 0), (0, 0, 0)))
    h2, w2 = x.shape[1] // 2, x.shape[2] // 2
    x = x.reshape(n, h2, 2, w2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, 4 * c)
    k = jnp.pad(rhs, ((0, 2 * mh - kh), (0, 2 * mw - kw), (0, 0), (0, 0)))
    k = k.reshape(mh, 2, mw, 2, c, out).transpose(0, 2, 1, 3, 4, 5).reshape(mh, mw, 4 * c, out)
    return inner(x, k, (1, 1), ((0, 0), (0, 0)), dimension_numbers=_NHWC, **kwargs)
