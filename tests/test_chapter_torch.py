"""resnet_jax.chapter_torch: the chapter's PyTorch ResNet-18 and its weights in resnet_jax. The
train step against it, on the real data: test_correctness.py."""

import importlib.util

import jax
import numpy as np
import pytest

from resnet_jax import create_model, models

pytestmark = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                reason="torch not installed (pip install -e '.[torch]')")


@pytest.mark.parametrize("width", [64, 8])
def test_the_chapters_network_copies_into_resnet18_leaf_for_leaf(width):
    from resnet_jax.chapter_torch import chapter_resnet18, to_flax

    net = chapter_resnet18(width, image_size=32)
    variables = to_flax(net)
    ours = models.abstract_variables(create_model("resnet18", num_classes=10, width=width),
                                     (1, 32, 32, 1))
    assert (jax.tree.map(np.shape, variables)
            == jax.tree.map(lambda a: a.shape, ours))  # same names, same shapes
    assert sum(p.numel() for p in net.parameters()) == models.param_count(ours)
    if width == 64:  # the chapter's count
        assert models.param_count(ours) == 11_178_378
    # Not yet trained: batch-norm statistics at 0 and 1 (materialised in eval mode).
    for stats in jax.tree.leaves(variables["batch_stats"], is_leaf=lambda t: "mean" in t):
        assert not stats["mean"].any() and (stats["var"] == 1).all()


def test_its_function_is_resnet18s_in_float64():
    import torch

    from resnet_jax.chapter_torch import chapter_resnet18, to_flax

    torch.manual_seed(0)
    net = chapter_resnet18(8, image_size=32).double()
    with torch.no_grad():  # statistics and affine parameters away from their starting values
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                for t in (m.weight, m.bias, m.running_mean):
                    t.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    net.eval()
    x = np.random.default_rng(0).random((4, 32, 32, 1))
    with torch.no_grad():
        theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    with jax.enable_x64(True):
        model = create_model("resnet18", num_classes=10, width=8, dtype=np.float64,
                             param_dtype=np.float64)
        ours = np.asarray(model.apply(to_flax(net), x, train=False))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
