#!/usr/bin/env python3
"""Check resnet_jax's ResNet-18 and train step against the chapter's PyTorch code (D2L 8.6).

Builds the chapter's network in PyTorch (LazyConv2d/LazyBatchNorm2d, materialised by one forward
pass, then `init_cnn`'s xavier_uniform_ as its training code applies), copies its weights into
`resnet_jax.create_model("resnet18")`, and compares on real Fashion-MNIST batches:

* the input pipeline: torchvision's `Resize` + `ToTensor` against `resnet_jax.data.preprocess`;
* training-mode logits and loss, then parameters and batch-norm statistics after `--steps`
  steps of the chapter's SGD (lr 0.01) on the same batches, and evaluation-mode logits;
* the initial weight distribution (the chapter's init against resnet_jax's).

PyTorch is not a dependency of resnet_jax: run this in an environment that has torch and
torchvision (CPU builds are enough), e.g. `pip install torch torchvision` beside resnet_jax's
own requirements. `--float64` runs both sides in double precision, which separates a real
difference from float32 rounding.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def chapter_resnet18(nn, torch):
    """The chapter's ResNet-18: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, 4 stages, GAP, linear."""

    class Residual(nn.Module):
        def __init__(self, num_channels, use_1x1conv=False, strides=1):
            super().__init__()
            self.conv1 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1, stride=strides)
            self.conv2 = nn.LazyConv2d(num_channels, kernel_size=3, padding=1)
            self.conv3 = (nn.LazyConv2d(num_channels, kernel_size=1, stride=strides)
                          if use_1x1conv else None)
            self.bn1, self.bn2 = nn.LazyBatchNorm2d(), nn.LazyBatchNorm2d()

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (self.conv3(x) if self.conv3 is not None else x))

    def stage(num_residuals, num_channels, first):
        return nn.Sequential(*[
            Residual(num_channels, use_1x1conv=True, strides=2) if i == 0 and not first
            else Residual(num_channels) for i in range(num_residuals)])

    return nn.Sequential(
        nn.Sequential(nn.LazyConv2d(64, kernel_size=7, stride=2, padding=3),
                      nn.LazyBatchNorm2d(), nn.ReLU(),
                      nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
        *[stage(2, c, i == 0) for i, c in enumerate((64, 128, 256, 512))],
        nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.LazyLinear(10)))


def to_flax(net, np) -> dict:
    """The torch network's state as resnet_jax variables (NHWC kernels, flax names), copied:
    torch updates its tensors in place, and JAX on a CPU may alias a NumPy buffer."""

    def copy(t):
        return t.detach().numpy().copy()

    def conv(m):
        return {"kernel": np.transpose(copy(m.weight), (2, 3, 1, 0)), "bias": copy(m.bias)}

    def bn(m):
        return ({"scale": copy(m.weight), "bias": copy(m.bias)},
                {"mean": copy(m.running_mean), "var": copy(m.running_var)})

    params, stats = {"conv1": conv(net[0][0])}, {}
    params["bn1"], stats["bn1"] = bn(net[0][1])
    for i in range(4):
        for j, block in enumerate(net[1 + i]):
            name, p, s = f"layer{i + 1}_{j}", {}, {}
            p["conv1"], p["conv2"] = conv(block.conv1), conv(block.conv2)
            if block.conv3 is not None:
                p["downsample_conv"] = conv(block.conv3)
            (p["bn1"], s["bn1"]), (p["bn2"], s["bn2"]) = bn(block.bn1), bn(block.bn2)
            params[name], stats[name] = p, s
    fc = net[5][2]
    params["fc"] = {"kernel": copy(fc.weight).T, "bias": copy(fc.bias)}
    return {"params": params, "batch_stats": stats}


def largest_difference(a, b, jax, np) -> tuple[float, str]:
    """Largest |a - b| relative to the leaf's scale, and the leaf it occurs in."""
    worst, where = 0.0, ""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        d = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12))
        if d > worst:
            worst, where = d, jax.tree_util.keystr(path)
    return worst, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST (see train.py --help)")
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="SGD steps compared")
    parser.add_argument("--float64", action="store_true", help="compare in double precision")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    try:
        import torch
        import torchvision.transforms as T
        from torch import nn
    except ImportError:
        parser.exit(2, "check_torch_parity.py: needs torch and torchvision "
                       "(pip install torch torchvision); they are not resnet_jax dependencies\n")
    import jax

    jax.config.update("jax_enable_x64", args.float64)
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image

    from resnet_jax import data as data_lib
    from resnet_jax import models
    from resnet_jax.config import Config
    from resnet_jax.optimizer import create_optimizer
    from resnet_jax.train import TrainState, train_step

    dtype = np.float64 if args.float64 else np.float32
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dataset = data_lib.load_dataset("fashion_mnist", args.data_dir)
    order = np.random.default_rng(args.seed).permutation(len(dataset.train_labels))
    n, size = args.batch_size, args.image_size
    batches = [order[k * n:(k + 1) * n] for k in range(args.steps + 1)]

    # 1. The input pipeline: torchvision on PIL images vs resnet_jax's on-device preprocess.
    chapter = T.Compose([T.Resize((size, size)), T.ToTensor()])
    first = dataset.train_images[batches[0]]
    theirs = np.stack([chapter(Image.fromarray(img[..., 0])).numpy()[0] for img in first])
    ours = np.asarray(data_lib.preprocess(jnp.asarray(first), size))[..., 0]
    diff = np.abs(theirs - ours) * 255
    print(f"input: torchvision Resize+ToTensor vs preprocess: max |diff| {diff.max():.3f}/255, "
          f"mean {diff.mean():.4f}/255")

    def images(idx):  # the same float input on both sides, so the rest compares the network
        return np.asarray(data_lib.preprocess(jnp.asarray(dataset.train_images[idx]), size),
                          dtype)

    # 2. The chapter's network: materialise the lazy modules, then d2l.init_cnn.
    net = chapter_resnet18(nn, torch)
    net(torch.zeros(1, 1, size, size))

    def init_cnn(m):
        if type(m) in (nn.Linear, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)

    net.apply(init_cnn)
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), to_flax(net, np))

    model = models.create_model("resnet18", num_classes=10, dtype=dtype, param_dtype=dtype)
    ours_init = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 1), dtype),
                                             train=False))(jax.random.key(args.seed))
    print("init: weight std, chapter (torch) vs resnet_jax, per layer kind:")
    for name, path in (("stem conv", ("conv1",)), ("layer2_0 conv1", ("layer2_0", "conv1")),
                       ("layer4_1 conv2", ("layer4_1", "conv2")), ("fc", ("fc",))):
        a, b = variables["params"], ours_init["params"]
        for key in path:
            a, b = a[key], b[key]
        print(f"  {name:<16} {float(np.std(a['kernel'])):.5f} vs {float(np.std(b['kernel'])):.5f}")

    # 3. Train steps: torch SGD(lr=0.01) on cross-entropy vs resnet_jax's train_step.
    config = Config()
    tx = create_optimizer(config, 1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                       apply_fn=model.apply, tx=tx)
    step = jax.jit(train_step)
    # In float32 the two drift apart by rounding alone; torch's own float64 twin of the same
    # network shows how far rounding takes torch itself.
    nets = [net] if args.float64 else [net, copy.deepcopy(net).double()]
    optimizers = [torch.optim.SGD(m.parameters(), lr=config.learning_rate) for m in nets]
    for k in range(args.steps):
        x, y = images(batches[k]), dataset.train_labels[batches[k]]
        losses = []
        for m, optimizer in zip(nets, optimizers, strict=True):
            m.train()
            inputs = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).to(next(m.parameters()).dtype)
            loss = nn.functional.cross_entropy(m(inputs), torch.from_numpy(y.astype(np.int64)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        state, metrics = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
        ours = float(metrics["loss"])
        line = (f"step {k + 1}: loss torch {losses[0]:.8f} resnet_jax {ours:.8f} "
                f"(|diff| {abs(losses[0] - ours):.2e})")
        if len(losses) > 1:
            twin = losses[1]
            line += (f"; torch's float64 twin {twin:.8f} (|diff| to torch "
                     f"{abs(losses[0] - twin):.2e}, to resnet_jax {abs(ours - twin):.2e})")
        print(line)

    after = to_flax(net, np)
    d, where = largest_difference(state.params, after["params"], jax, np)
    print(f"params after {args.steps} steps: largest relative difference {d:.2e} ({where})")
    if len(nets) > 1:
        d, where = largest_difference(to_flax(nets[1], np)["params"], after["params"], jax, np)
        print(f"  torch float32 vs its float64 twin: {d:.2e} ({where})")
    for stat in ("mean", "var"):
        sub = [jax.tree.map(lambda t, s=stat: t[s], tree, is_leaf=lambda t: "mean" in t)
               for tree in (state.batch_stats, after["batch_stats"])]
        d, where = largest_difference(*sub, jax, np)
        print(f"batch-norm running {stat}: largest relative difference {d:.2e} ({where})")

    net.eval()
    x = images(batches[-1]).copy()
    with torch.no_grad():
        theirs = net(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(model.apply(state.variables, jnp.asarray(x), train=False))
    print(f"eval logits: largest |diff| {np.abs(theirs - ours).max():.2e} "
          f"(logit scale {np.abs(theirs).max():.2f}); same predictions: "
          f"{int((theirs.argmax(1) == ours.argmax(1)).sum())}/{len(x)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
