"""interop.py against the real torch and torchvision: the seven torchvision architectures give
the same logits in float64 both ways, round trips are exact, and bad state_dicts are refused."""

import importlib.util
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO

from resnet_jax import interop, models

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None,
    reason="torch/torchvision not installed (pip install -e '.[torch]')")
needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None,
                                       reason="safetensors not installed")
F64 = {"dtype": jnp.float64, "param_dtype": jnp.float64}
NUM_CLASSES = 7  # not torchvision's 1000: the head's shape is read from the weights
# NHWC, float64. 32x32 still pads every stage's strided conv (16, 8, 4, 2, 1 pixels).
IMAGES = np.random.default_rng(0).uniform(size=(2, 32, 32, 3))


def _randomise(shapes: dict[str, tuple], seed: int) -> dict[str, np.ndarray]:
    """float64 values for every key of a torchvision state_dict, batch-norm statistics and
    affine parameters included (at their defaults they would hide a swapped or missed one)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        block = re.match(r"layer\d+\.\d+\.", key)
        last_bn = block and f"{block[0]}{'bn3' if f'{block[0]}bn3.weight' in shapes else 'bn2'}"
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(rng.integers(0, 1000), np.int64)
        elif last_bn and key == f"{last_bn}.weight":
            # Small: in eval mode nothing renormalises the sum of 50 residual branches, whose
            # scale would otherwise double per block (logits of 1e9 in ResNet-152).
            out[key] = rng.uniform(0.05, 0.2, shape)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight",
                           "downsample.1.weight")):
            out[key] = rng.uniform(0.5, 1.5, shape)
        elif len(shape) > 1:  # a conv or the fc: He-like, so that 150 layers stay finite
            out[key] = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))
        else:  # biases and running means
            out[key] = rng.normal(scale=0.1, size=shape)
    return out


def _flax_model(arch: str) -> models.ResNet:
    # Native grouped convs: the same function as the split ones (test_models), and eagerly
    # applied ResNeXt-101 runs 3x faster with 23x fewer ops to dispatch.
    native = {"grouped_conv": "native"} if "grouped_conv" in models.model_options(arch) else {}
    return models.create_model(arch, num_classes=NUM_CLASSES, variant="torchvision", **F64,
                               **native)


def _flax_logits(arch: str, variables: dict) -> np.ndarray:
    model = _flax_model(arch)
    with jax.enable_x64(True):
        return np.asarray(model.apply(variables, jnp.asarray(IMAGES), train=False))


def _torch_logits(net) -> np.ndarray:
    import torch

    with torch.no_grad():
        return net(torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())).numpy()


def _load(net, state_dict: dict[str, np.ndarray]) -> None:
    import torch

    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
                        strict=True)


@pytest.fixture(scope="module", params=interop.TORCHVISION_ARCHS)
def torchvision_net(request):
    """(arch, a float64 torchvision model in eval mode). One at a time: the tests of an arch
    run together, and the ResNeXt-101 alone holds 88M float64 weights."""
    import torch
    import torchvision

    torch.manual_seed(0)
    net = getattr(torchvision.models, request.param)(num_classes=NUM_CLASSES).double().eval()
    return request.param, net


@needs_torch
def test_from_torch_gives_torchvisions_logits(torchvision_net):
    arch, net = torchvision_net
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    _load(net, _randomise(shapes, seed=1))
    state_dict = net.state_dict()  # torch tensors, as a user passes them
    assert interop.check_state_dict(state_dict) == arch  # inferred from keys and shapes

    assert interop.check_state_dict(state_dict, arch=arch) == arch
    variables = interop.from_torch(state_dict)

    want, got = _torch_logits(net), _flax_logits(arch, variables)
    assert got.dtype == np.float64 and np.abs(want).max() > 0.5  # not a degenerate comparison
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@needs_torch
def test_to_torch_is_loaded_by_torchvision_with_the_same_logits(torchvision_net):
    arch, net = torchvision_net
    with jax.enable_x64(True):
        abstract = models.abstract_variables(_flax_model(arch), IMAGES.shape)
    # Flax-side values, randomised through their torchvision names (the same distributions).
    torch_shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    variables = interop.from_torch(_randomise(torch_shapes, seed=2))
    assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda s: s.shape, abstract)

    state_dict = interop.to_torch(variables, num_batches_tracked=5)
    _load(net, state_dict)  # strict: every key, no extra one, every shape
    assert int(net.bn1.num_batches_tracked) == 5
    want, got = _flax_logits(arch, variables), _torch_logits(net)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12 * np.abs(want).max())


@needs_torch
def test_round_trips_are_exact(torchvision_net):
    arch, net = torchvision_net
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    state_dict = {k: v.astype(np.float32) if v.dtype == np.float64 else v
                  for k, v in _randomise(shapes, seed=3).items()}
    variables = interop.from_torch(state_dict, arch=arch)
    back = interop.to_torch(variables)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        if not key.endswith("num_batches_tracked"):  # (counters are to_torch's argument)
            assert back[key].dtype == value.dtype and np.array_equal(back[key], value), key
    again = interop.from_torch(back)
    jax.tree.map(np.testing.assert_array_equal, again, variables)


def _random_variables(model, channels: int = 3, seed: int = 0) -> dict:
    """float32 values of the model's variables' shapes (from eval_shape: an eager init would
    compile every layer's ops one by one, a jitted one the whole net, for values that do not
    matter here)."""
    rng = np.random.default_rng(seed)
    abstract = models.abstract_variables(model, (1, 32, 32, channels))
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), abstract)


def _small_variables(arch: str = "resnet18") -> dict:
    """Random variables of a torchvision-variant `arch` with NUM_CLASSES classes."""
    return _random_variables(models.create_model(arch, num_classes=NUM_CLASSES,
                                                 variant="torchvision"))


def test_bad_keys_are_named_in_one_error_and_nothing_is_loaded():
    state_dict = interop.to_torch(_small_variables())
    del state_dict["layer2.0.downsample.1.running_var"]
    state_dict["layer1.0.conv1.bias"] = np.zeros(64, np.float32)
    state_dict["layer3.1.conv2.weight"] = np.zeros((256, 256, 1, 1), np.float32)
    with pytest.raises(ValueError) as error:
        interop.from_torch(state_dict)
    message = str(error.value)
    assert "\n" not in message and message.startswith("state_dict does not fit resnet18")
    assert "1 missing: layer2.0.downsample.1.running_var" in message
    assert "1 unknown: layer1.0.conv1.bias" in message
    assert "1 misshaped: layer3.1.conv2.weight (256, 256, 1, 1) (expected (256, 256, 3, 3))" \
        in message


def test_the_architecture_is_checked_when_given_and_inferred_only_when_unambiguous():
    state_dict = interop.to_torch(_small_variables("resnet18"))
    with pytest.raises(ValueError, match="the weights are resnet18's, not resnet34's"):
        interop.from_torch(state_dict, arch="resnet34")
    with pytest.raises(ValueError, match="no torchvision counterpart; valid: resnet18, "):
        interop.from_torch(state_dict, arch="preact_resnet18")
    # A block too few: no architecture has stages of (2, 2, 2, 1) blocks.
    cut = {k: v for k, v in state_dict.items() if not k.startswith("layer4.1.")}
    with pytest.raises(ValueError, match=r"match none of .* stages of \(2, 2, 2, 1\) blocks"):
        interop.from_torch(cut)
    # Named, the same weights are checked against resnet18 and the block's keys reported.
    with pytest.raises(ValueError, match=r"10 missing: layer4\.1\.bn1\.bias, "
                                         r"layer4\.1\.bn1\.running_mean, "):
        interop.from_torch(cut, arch="resnet18")


def test_a_d2l_variant_model_is_refused_with_the_reason():
    model = models.create_model("resnet18", width=8, stem="small")  # d2l: conv biases
    variables = _random_variables(model, channels=1)
    with pytest.raises(ValueError, match=r"conv1/bias exists: a d2l-variant model \(its convs "
                                         r"have biases and its projections no batch norm\)"):
        interop.to_torch(variables)


def test_narrow_and_small_stem_models_round_trip_too():
    # Not torchvision-buildable, but what export writes for a small run must load back.
    model = models.create_model("resnext50_32x4d", num_classes=3, width=32, stem="small",
                                variant="torchvision")
    variables = _random_variables(model, channels=1, seed=1)
    state_dict = interop.to_torch(variables)
    assert state_dict["conv1.weight"].shape == (32, 1, 3, 3)
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch(state_dict), variables)


@needs_torch
def test_a_pth_file_loads(tmp_path):
    import torch

    state_dict = interop.to_torch(_small_variables(), num_batches_tracked=3)
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "w.pth")
    got = interop.from_torch(tmp_path / "w.pth")
    jax.tree.map(np.testing.assert_array_equal, got, interop.from_torch(state_dict))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"w\.bin: expected a \.pth, \.pt or \.safetensors file"):
        interop.from_torch(tmp_path / "w.bin")


@needs_safetensors
def test_a_safetensors_file_loads_without_torch(tmp_path):
    from safetensors.numpy import save_file

    variables = _small_variables()
    save_file(interop.to_torch(variables), str(tmp_path / "w.safetensors"))
    (tmp_path / "w.pth").write_bytes(b"")
    # A fresh interpreter where `import torch` fails, as where torch is not installed.
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None
        import numpy as np, jax
        from resnet_jax import interop
        variables = interop.from_torch({str(tmp_path / "w.safetensors")!r})
        leaves = jax.tree_util.tree_leaves_with_path(variables)
        np.savez({str(tmp_path / "got.npz")!r},
                 **{{jax.tree_util.keystr(p): v for p, v in leaves}})
        try:
            interop.from_torch({str(tmp_path / "w.pth")!r})
        except ImportError as e:
            print(e)
        print("torch" in sys.modules and sys.modules["torch"] is not None)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == [
        "reading w.pth needs torch (pip install 'resnet_jax[torch]'); .safetensors files need "
        "only safetensors", "False"]
    got = np.load(tmp_path / "got.npz")
    want = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    assert sorted(got.files) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value)
