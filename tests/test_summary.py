"""scripts/summary.py and resnet_jax.summary: the chapter's shape listing, for any model."""

import subprocess
import sys

import pytest
from conftest import REPO

from resnet_jax import models, summary

SCRIPT = REPO / "scripts" / "summary.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=300, env={"JAX_PLATFORMS": "cpu", "PATH": ""})


def test_resnet18_at_96_is_the_chapters_listing():
    out = run("--arch=resnet18", "--image_size=96")
    assert out.returncode == 0, out.stderr[-2000:]
    shapes = [line.split("output shape: ")[1] for line in out.stdout.splitlines()
              if "output shape: " in line]
    # The chapter (D2L 8.6, NCHW): b1 (1, 64, 24, 24) after its max-pool, then the stages
    # (1, 64, 24, 24), (1, 128, 12, 12), (1, 256, 6, 6), (1, 512, 3, 3), and Linear (1, 10).
    assert shapes == ["(1, 48, 48, 64)", "(1, 48, 48, 64)", *["(1, 24, 24, 64)"] * 2,
                      *["(1, 12, 12, 128)"] * 2, *["(1, 6, 6, 256)"] * 2,
                      *["(1, 3, 3, 512)"] * 2, "(1, 10)"]
    table = {line.split("  ")[0].strip(): line for line in out.stdout.splitlines()
             if line.startswith(("stem ", "stage ", "head ", "total "))}
    assert "(1, 24, 24, 64)" in table["stem"] and "(1, 3, 3, 512)" in table["stage 4"]
    assert "11,178,378" in table["total"]  # the chapter's count


# One model of each block kind (the deeper ones only repeat their blocks, and take minutes to
# lower on 2 CPU cores).
@pytest.mark.parametrize("arch", ["resnet18", "plain18", "preact_resnet18", "resnet50",
                                  "preact_resnet50", "resnext50_32x4d"])
def test_every_block_kinds_parts_add_up_to_the_whole(arch):
    assert arch in models.list_models()
    model = models.create_model(arch, num_classes=10, stem="small", width=16,
                                **({"base_width": 16} if "resnext" in arch else {}))
    shape = (2, 20, 20, 3)
    listed = summary.layers(model, shape)
    parts = summary.parts(listed)
    assert [p["part"] for p in parts] == ["stem", "stage 1", "stage 2", "stage 3", "stage 4",
                                          "head"]
    assert sum(p["params"] for p in parts) == models.param_count(
        models.abstract_variables(model, shape))
    assert parts[-1]["output_shape"] == (2, 10)
    # Each block takes what the one before it gave.
    blocks = [layer for layer in listed if layer.part.startswith("stage")]
    pairs = zip(blocks[:-1], blocks[1:], strict=True)
    assert all(b.input_shape == a.output_shape for a, b in pairs)
    # The layers' FLOPs are the whole model's but for the element-wise work between them.
    whole = models.model_flops(model, shape)["flops"] * shape[0]
    layers = sum(layer.flops for layer in listed)
    assert 0.99 * whole < layers <= whole


@pytest.mark.parametrize("args, message", [
    (["--arch=resnet19"], "unknown --arch 'resnet19'; valid: plain18"),
    (["--image_size=8"], "--image_size 8 is too small for resnet18 with the imagenet stem"),
    (["--arch=resnet18", "--cardinality=4"], "--cardinality applies to the bottleneck archs"),
    (["--epochs=3"], "unrecognized arguments: --epochs=3"),
])
def test_bad_flags_are_one_line(args, message):
    out = run(*args)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr
