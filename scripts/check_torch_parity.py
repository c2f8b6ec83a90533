#!/usr/bin/env python3
"""Check resnet_jax's ResNet-18 and train step against the chapter's PyTorch code (D2L 8.6).

Builds the chapter's network in PyTorch (LazyConv2d/LazyBatchNorm2d, materialised by one forward
pass, then `init_cnn`'s xavier_uniform_ as its training code applies), copies its weights into
`resnet_jax.create_model("resnet18")`, and compares on real Fashion-MNIST batches:

* the input pipeline: torchvision's `Resize` + `ToTensor` against `resnet_jax.data.preprocess`;
* training-mode losses, then parameters and batch-norm statistics after `--steps` steps of the
  chapter's SGD (lr 0.01) on the same batches, and evaluation-mode logits;
* the initial weight distribution (the chapter's init against resnet_jax's).

PyTorch is not a dependency of resnet_jax: run this where torch and torchvision are installed
(`pip install -e ".[torch]"`; CPU builds are enough). `--float64` runs both sides in double
precision, which separates a real difference from float32 rounding. `--json` also prints the
figures as one JSON line. Bad input is one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402

PROG = "check_torch_parity.py"


def _parser() -> argparse.ArgumentParser:
    from resnet_jax.config import _OneLineParser

    parser = _OneLineParser(prog=PROG, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None, help="Fashion-MNIST (see train.py --help)")
    parser.add_argument("--image_size", type=int, default=96, help="default 96 (the chapter's)")
    parser.add_argument("--batch_size", type=int, default=32, help="default 32")
    parser.add_argument("--steps", type=int, default=3, help="SGD steps compared; default 3")
    parser.add_argument("--float64", action="store_true", help="compare in double precision")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    parser.add_argument("--json", action="store_true", help="also the figures as one JSON line")
    return parser


def largest_difference(a: Any, b: Any) -> tuple[float, str]:
    """Largest |a - b| relative to the leaf's scale, and the leaf it occurs in."""
    import jax
    import numpy as np

    worst, where = 0.0, ""
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                            strict=True):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        d = float(np.abs(x - y).max() / max(np.abs(y).max(), 1e-12))
        if d > worst:
            worst, where = d, jax.tree_util.keystr(path)
    return worst, where


def compare_input(images_u8: Any, size: int) -> dict:
    """torchvision's Resize + ToTensor on PIL images against resnet_jax's on-device resize."""
    import jax.numpy as jnp
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    from resnet_jax.data import preprocess

    chapter = T.Compose([T.Resize((size, size)), T.ToTensor()])
    theirs = np.stack([chapter(Image.fromarray(img[..., 0])).numpy()[0] for img in images_u8])
    ours = np.asarray(preprocess(jnp.asarray(images_u8), size))[..., 0]
    diff = np.abs(theirs - ours) * 255
    print(f"input: torchvision Resize+ToTensor vs preprocess: max |diff| {diff.max():.3f}/255, "
          f"mean {diff.mean():.4f}/255")
    return {"input_max_diff_255": float(diff.max()), "input_mean_diff_255": float(diff.mean())}


def compare_init(chapter_variables: dict, model: Any, size: int, dtype: Any, seed: int) -> None:
    """The weight std of a few layers: the chapter's init against resnet_jax's own."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    ours = jax.jit(lambda k: model.init(k, jnp.zeros((1, size, size, 1), dtype),
                                        train=False))(jax.random.key(seed))
    print("init: weight std, chapter (torch) vs resnet_jax, per layer kind:")
    for name, path in (("stem conv", ("conv1",)), ("layer2_0 conv1", ("layer2_0", "conv1")),
                       ("layer4_1 conv2", ("layer4_1", "conv2")), ("fc", ("fc",))):
        a, b = chapter_variables["params"], ours["params"]
        for key in path:
            a, b = a[key], b[key]
        print(f"  {name:<16} {float(np.std(a['kernel'])):.5f} vs {float(np.std(b['kernel'])):.5f}")


def train_both(nets: list, state: Any, batches: list[tuple[Any, Any]], learning_rate: float
               ) -> tuple[Any, list[dict]]:
    """`len(batches)` steps of the chapter's SGD on each torch net and of resnet_jax's
    train_step on `state` (whose optimizer is the same SGD); the losses of each step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from resnet_jax.train import train_step

    step = jax.jit(train_step)
    optimizers = [torch.optim.SGD(m.parameters(), lr=learning_rate) for m in nets]
    losses = []
    for k, (x, y) in enumerate(batches):
        theirs = []
        for m, optimizer in zip(nets, optimizers, strict=True):
            m.train()
            inputs = torch.from_numpy(x.copy()).permute(0, 3, 1, 2).to(next(m.parameters()).dtype)
            loss = torch.nn.functional.cross_entropy(m(inputs),
                                                     torch.from_numpy(y.astype(np.int64)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            theirs.append(loss.item())
        state, metrics = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
        ours = float(metrics["loss"])
        line = (f"step {k + 1}: loss torch {theirs[0]:.8f} resnet_jax {ours:.8f} "
                f"(|diff| {abs(theirs[0] - ours):.2e})")
        if len(theirs) > 1:
            twin = theirs[1]
            line += (f"; torch's float64 twin {twin:.8f} (|diff| to torch "
                     f"{abs(theirs[0] - twin):.2e}, to resnet_jax {abs(ours - twin):.2e})")
        print(line)
        losses.append({"torch": theirs[0], "resnet_jax": ours})
    return state, losses


def compare_after(state: Any, nets: list, model: Any, x: Any, steps: int) -> dict:
    """Parameters, batch-norm statistics and evaluation-mode logits after training."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from resnet_jax.chapter_torch import to_flax

    after = to_flax(nets[0])
    found = {}
    d, where = largest_difference(state.params, after["params"])
    print(f"params after {steps} steps: largest relative difference {d:.2e} ({where})")
    found["params_rel_diff"] = d
    if len(nets) > 1:
        d, where = largest_difference(to_flax(nets[1])["params"], after["params"])
        print(f"  torch float32 vs its float64 twin: {d:.2e} ({where})")
    for stat in ("mean", "var"):
        sub = [jax.tree.map(lambda t, s=stat: t[s], tree, is_leaf=lambda t: "mean" in t)
               for tree in (state.batch_stats, after["batch_stats"])]
        d, where = largest_difference(*sub)
        print(f"batch-norm running {stat}: largest relative difference {d:.2e} ({where})")
        found[f"running_{stat}_rel_diff"] = d
    nets[0].eval()
    with torch.no_grad():
        theirs = nets[0](torch.from_numpy(x.copy()).permute(0, 3, 1, 2)).numpy()
    ours = np.asarray(model.apply(state.variables, jnp.asarray(x), train=False))
    same = int((theirs.argmax(1) == ours.argmax(1)).sum())
    print(f"eval logits: largest |diff| {np.abs(theirs - ours).max():.2e} "
          f"(logit scale {np.abs(theirs).max():.2f}); same predictions: {same}/{len(x)}")
    return {**found, "eval_logits_max_diff": float(np.abs(theirs - ours).max()),
            "same_predictions": same, "examples": len(x)}


def check(args: argparse.Namespace) -> dict:
    """The whole comparison; its figures."""
    import jax

    jax.config.update("jax_enable_x64", args.float64)
    import jax.numpy as jnp
    import numpy as np
    import torch

    from resnet_jax import data as data_lib
    from resnet_jax import models
    from resnet_jax.chapter_torch import chapter_resnet18, to_flax
    from resnet_jax.config import Config
    from resnet_jax.optimizer import create_optimizer
    from resnet_jax.train import TrainState

    dtype = np.float64 if args.float64 else np.float32
    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float64 if args.float64 else torch.float32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dataset = data_lib.load_dataset("fashion_mnist", args.data_dir)
    order = np.random.default_rng(args.seed).permutation(len(dataset.train_labels))
    n, size = args.batch_size, args.image_size
    indices = [order[k * n:(k + 1) * n] for k in range(args.steps + 1)]
    found = compare_input(dataset.train_images[indices[0]], size)

    def images(idx):  # the same float input on both sides, so the rest compares the network
        return np.asarray(data_lib.preprocess(jnp.asarray(dataset.train_images[idx]), size),
                          dtype)

    net = chapter_resnet18(image_size=size)
    variables = jax.tree.map(lambda a: jnp.asarray(a, dtype), to_flax(net))
    model = models.create_model("resnet18", num_classes=10, dtype=dtype, param_dtype=dtype)
    compare_init(variables, model, size, dtype, args.seed)
    config = Config()  # the chapter's recipe: SGD, learning rate 0.01
    tx = create_optimizer(config, 1)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]),
                       apply_fn=model.apply, tx=tx)
    # In float32 the two drift apart by rounding alone; torch's own float64 twin of the same
    # network shows how far rounding takes torch itself.
    nets = [net] if args.float64 else [net, copy.deepcopy(net).double()]
    batches = [(images(idx), dataset.train_labels[idx]) for idx in indices[:-1]]
    state, losses = train_both(nets, state, batches, config.learning_rate)
    return {**found, "losses": losses,
            **compare_after(state, nets, model, images(indices[-1]), args.steps)}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def job() -> int:
        if min(args.image_size, args.steps) <= 0 or args.batch_size < 2:
            raise UserError("--image_size and --steps must be positive, --batch_size at least 2 "
                            "(batch norm in training mode)")
        try:
            import torch  # noqa: F401
            import torchvision  # noqa: F401
        except ImportError:
            raise UserError("needs torch and torchvision (pip install -e \".[torch]\"); they are "
                            "not resnet_jax dependencies") from None
        found = check(args)
        if args.json:
            print(json.dumps(found), flush=True)
        return 0

    return run_main(PROG, job)


if __name__ == "__main__":
    main_guard(PROG, main)
