"""finetune.py: --init_from's weights fitted to a run's model, and the mistakes it refuses."""

import importlib.util

import jax
import numpy as np
import pytest

from resnet_jax import finetune, interop, models
from resnet_jax.config import Config
from resnet_jax.errors import UserError
from resnet_jax.train import build_model, load_checkpoint

pytestmark = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                reason="safetensors not installed")
RUN = Config(arch="resnet18", variant="torchvision", image_size=32)



def _load_start(config, abstract):
    return finetune.load_start(config, abstract, load_checkpoint)

def _abstract(config: Config, channels: int = 1) -> dict:
    model = build_model(config, num_classes=10)
    return models.abstract_variables(model, (1, config.image_size, config.image_size, channels))


def _imagenet_file(tmp_path, **options) -> tuple[str, dict]:
    """A torchvision-layout resnet18 with 1000 classes and 3 input channels, as a
    .safetensors file, and its state_dict."""
    from safetensors.numpy import save_file

    model = models.create_model("resnet18", num_classes=1000, variant="torchvision", **options)
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                             models.abstract_variables(model, (1, 32, 32, 3)))
    state_dict = interop.to_torch(variables)
    save_file(state_dict, str(tmp_path / "w.safetensors"))
    return str(tmp_path / "w.safetensors"), state_dict


def test_head_is_left_to_the_fresh_init_and_the_stem_summed_for_one_channel(tmp_path):
    path, state_dict = _imagenet_file(tmp_path)
    start = _load_start(RUN.replace(init_from=path), _abstract(RUN))
    assert start.line == (
        f"--init_from {path}: resnet18 weights from a PyTorch file; fc re-initialised for 10 "
        "classes (the source has 1000); conv1's kernel summed over its 3 input channels for "
        "1-channel images")
    assert start.record() == {"source": path, "notes": list(start.notes)}
    assert ("params", "fc", "kernel") not in start.variables
    assert ("params", "fc", "bias") not in start.variables
    np.testing.assert_allclose(start.variables[("params", "conv1", "kernel")][..., 0, :],
                               state_dict["conv1.weight"].sum(axis=1).transpose(1, 2, 0),
                               rtol=1e-6)
    np.testing.assert_array_equal(start.variables[("batch_stats", "layer3_0", "downsample_bn",
                                                   "var")],
                                  state_dict["layer3.0.downsample.1.running_var"])
    np.testing.assert_array_equal(start.variables[("params", "layer4_1", "conv2", "kernel")],
                                  state_dict["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))


def test_a_three_channel_run_with_1000_classes_takes_every_weight(tmp_path):
    path, _ = _imagenet_file(tmp_path)
    model = build_model(RUN, num_classes=1000)
    start = _load_start(RUN.replace(init_from=path),
                                models.abstract_variables(model, (1, 32, 32, 3)))
    assert start.notes[1:] == ("every weight and batch-norm statistic taken",)
    assert len(start.variables) == len(jax.tree.leaves(
        models.abstract_variables(model, (1, 32, 32, 3))))


def test_mistakes_are_one_line_user_errors(tmp_path):
    path, _ = _imagenet_file(tmp_path)
    with pytest.raises(UserError, match="a PyTorch file has torchvision's layout; give "
                                        "--variant=torchvision"):
        _load_start(Config(init_from=path), _abstract(Config()))
    narrow = RUN.replace(init_from=path, width=32)
    with pytest.raises(UserError) as error:
        _load_start(narrow, _abstract(narrow))
    assert "its weights do not fit this run's model (check --arch, --variant, --width, " \
           "--stem): " in str(error.value)
    assert "misshaped: batch_stats/bn1/mean (64,) (this run: (32,))" in str(error.value)
    with pytest.raises(UserError, match=r"the weights are resnet18's, not resnet34's"):
        _load_start(RUN.replace(arch="resnet34", init_from=path),
                            _abstract(RUN.replace(arch="resnet34")))
    with pytest.raises(UserError, match=r"--init_from .*nothing\.pth: no such file: "):
        _load_start(RUN.replace(init_from=str(tmp_path / "nothing.pth")),
                            _abstract(RUN))
