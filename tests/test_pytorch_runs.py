"""End to end on the real Fashion-MNIST: train.py --init_from a torchvision file fine-tunes,
resumes its own checkpoints, and scripts/export.py hands the run back to torchvision."""

import importlib.util
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, TINY

from resnet_jax import interop

pytestmark = pytest.mark.slow
EXPORT = REPO / "scripts" / "export.py"
needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None,
    reason="torch/torchvision not installed (pip install -e '.[torch]')")


def _export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXPORT), *args], capture_output=True, text=True,
                          timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})


@needs_torch
def test_init_from_a_torchvision_file_fine_tunes_and_exports_back(run_train, tmp_path):
    import torch
    import torchvision

    torch.manual_seed(0)
    imagenet = torchvision.models.resnet18()  # torchvision's layout: 3 channels, 1000 classes
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    workdir = tmp_path / "run"
    command = [f"--workdir={workdir}", "--variant=torchvision",
               f"--init_from={tmp_path / 'resnet18.pth'}", "--image_size=32", "--batch_size=32",
               "--train_examples=256", "--eval_examples=256", "--steps_per_dispatch=1"]
    first = run_train(*command, "--epochs=1")
    assert first.returncode == 0, first.stderr[-2000:]
    line = (f"--init_from {tmp_path / 'resnet18.pth'}: resnet18 weights from a PyTorch file; fc "
            "re-initialised for 10 classes (the source has 1000); conv1's kernel summed over "
            "its 3 input channels for 1-channel images")
    assert first.stdout.splitlines()[0] == line
    recorded = json.loads((workdir / "config.json").read_text())["resolved"]["init_from"]
    assert recorded == {"source": str(tmp_path / "resnet18.pth"), "notes": [
        "resnet18 weights from a PyTorch file", "fc re-initialised for 10 classes (the source "
        "has 1000)", "conv1's kernel summed over its 3 input channels for 1-channel images"]}

    # Checkpoints in the workdir: the same command resumes them, and the record stays.
    second = run_train(*command, "--epochs=2")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming from" in second.stdout and "--init_from" not in second.stdout
    assert json.loads((workdir / "config.json").read_text())["resolved"]["init_from"] == recorded

    done = _export(f"--workdir={workdir}", f"--output={tmp_path / 'run.pth'}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note: the stem takes 1-channel images: set model.conv1 = torch.nn.Conv2d(1, 64, 7, " \
           "2, 3, bias=False) before load_state_dict" in done.stdout
    tuned = torchvision.models.resnet18(num_classes=10)
    tuned.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    tuned.load_state_dict(torch.load(tmp_path / "run.pth", weights_only=True), strict=True)
    assert int(tuned.bn1.num_batches_tracked) == 16  # the run's steps

    # 16 steps at lr 0.01 moved the weights from the file's, but not far.
    with torch.no_grad():
        before, after = imagenet.layer4[1].conv2.weight, tuned.layer4[1].conv2.weight
        change = float((after - before).norm() / before.norm())
        assert 0 < change < 0.05, change
        # The stem moves most (19% here), but a fresh init would be ~115% away from the sum.
        before = imagenet.conv1.weight.sum(dim=1, keepdim=True)
        assert float((tuned.conv1.weight - before).norm() / before.norm()) < 0.5

    # torchvision computes what resnet_jax does with the run's checkpoint.
    from resnet_jax.train import load_checkpoint

    _, state, step = load_checkpoint(workdir)
    images = np.random.default_rng(0).uniform(size=(4, 32, 32, 1)).astype(np.float32)
    want = np.asarray(state.apply_fn(state.variables, images, train=False))
    with torch.no_grad():
        got = tuned.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_export_writes_a_small_run_and_refuses_a_d2l_one(run_train, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors not installed")
    from safetensors.numpy import load_file

    small = tmp_path / "small"
    done = run_train(f"--workdir={small}", *TINY, "--variant=torchvision", "--epochs=1",
                     "--max_steps=2")
    assert done.returncode == 0, done.stderr[-2000:]
    output = tmp_path / "small.safetensors"
    exported = _export(f"--workdir={small}", f"--output={output}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert exported.stdout.splitlines() == [
        f"wrote resnet18 (step 2, 10 classes) to {output}: torchvision.models.resnet18("
        "num_classes=10) loads it",
        "note: width 4 with the small stem is no torchvision layout (it needs width 64 and the "
        "imagenet stem); resnet_jax.interop.from_torch reads it back"]
    from resnet_jax.train import load_checkpoint

    _, state, _ = load_checkpoint(small)
    jax.tree.map(np.testing.assert_array_equal, interop.from_torch(output),
                 jax.tree.map(np.asarray, state.variables))
    assert load_file(str(output))["bn1.num_batches_tracked"] == 2

    chapter = tmp_path / "chapter"
    done = run_train(f"--workdir={chapter}", *TINY, "--epochs=1", "--max_steps=1")
    assert done.returncode == 0, done.stderr[-2000:]
    refused = _export(f"--workdir={chapter}", f"--output={tmp_path / 'chapter.pth'}")
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr == (
        f"export.py: error: {chapter} is a d2l-variant run: its convs have biases and its "
        "projection shortcuts no batch norm, a layout no torchvision model has (train with "
        "--variant=torchvision)\n")
    assert not (tmp_path / "chapter.pth").exists()
    wrong = _export(f"--workdir={small}", f"--output={tmp_path / 'small.npz'}")
    assert wrong.returncode == 2 and "name a .pth or .safetensors file" in wrong.stderr
