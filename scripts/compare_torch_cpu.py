#!/usr/bin/env python3
"""Train-step speed of the chapter's ResNet-18 on this CPU: the chapter's PyTorch code against
resnet_jax, side by side in one run.

For each size (image side, batch, width) both frameworks train the same network on the same
random data held in memory: plain SGD, learning rate 0.01, float32. The PyTorch model is the
chapter's code (D2L 8.6: convolutions with biases, a 1x1 projection without batch norm,
xavier-uniform init); resnet_jax runs its trainer's own jitted step (``make_train_loop``, as
``scripts/benchmark.py`` times it: uint8 28x28 images gathered and resized on the device). The
two are timed alternately, ``--repeats`` times ``--steps`` steps each after a warm-up, so that
a change in the machine's load hits both; the median of each is reported, with the ratio
resnet_jax / PyTorch (above 1: resnet_jax is faster).

Needs torch (``pip install torch``; not a dependency of resnet_jax). Time on an idle machine:
one busy process moves the ratio, since PyTorch's threads suffer more from it. Bad flags are
one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402
from resnet_jax.conv import CONVS  # noqa: E402
from resnet_jax.errors import UserError  # noqa: E402

PROG = "compare_torch_cpu.py"
# The three sizes: the chapter's run, --preset=quick's model, benchmark.py's CPU default.
DEFAULT_SIZES = ("96:128:64", "28:128:32", "32:32:64")


def _size(text: str) -> tuple[int, int, int]:
    try:
        side, batch, width = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a size is SIDE:BATCH:WIDTH, e.g. 96:128:64; got {text!r}") from None
    if min(side, batch, width) <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r}: every number must be positive")
    return side, batch, width


def _parser() -> argparse.ArgumentParser:
    from resnet_jax.config import _OneLineParser

    parser = _OneLineParser(prog=PROG, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_size, nargs="+", default=None, metavar="SIDE:BATCH:WIDTH",
                        help=f"default {' '.join(DEFAULT_SIZES)}")
    parser.add_argument("--steps", type=int, default=3, help="steps per timed repeat; default 3")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed repeats of each framework, alternating; default 3")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch's intra-op threads; default: the CPU count")
    parser.add_argument("--conv", default="auto", choices=CONVS,
                        help="resnet_jax's Config.conv; default auto (by_map on a CPU)")
    parser.add_argument("--json", action="store_true", help="also one JSON line per size")
    return parser


# ----------------------------------------------------------------------------------------------
# The chapter's PyTorch code (D2L 8.6), with the width scaled as resnet_jax's --width does.


def torch_stepper(side: int, batch: int, width: int, threads: int) -> Callable[[int], None]:
    """`run(n)` trains the PyTorch model n steps on fixed random data, as the chapter does."""
    import torch

    from resnet_jax.chapter_torch import chapter_resnet18

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = chapter_resnet18(width, image_size=side)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    x = torch.rand(batch, 1, side, side)
    y = torch.randint(0, 10, (batch,))
    net.train()

    def run(steps: int) -> None:
        for _ in range(steps):
            optimizer.zero_grad()
            loss = loss_fn(net(x), y)
            loss.backward()
            optimizer.step()
        float(loss.detach())  # synchronise, as the JAX side does

    return run


def jax_stepper(side: int, batch: int, width: int, conv: str) -> Callable[[int], None]:
    """`run(n)` trains resnet_jax's ResNet-18 n steps through the trainer's jitted loop."""
    from resnet_jax import benchmark
    from resnet_jax.train import make_mesh

    case = benchmark.Case(arch="resnet18", batch_size=batch, precision="fp32",
                          steps_per_dispatch=1, image_size=side, steps=1, repeats=1,
                          width=width, conv=conv, train_examples=max(1024, 2 * batch),
                          eval_examples=batch)
    return benchmark.train_stepper(case, make_mesh())


# ----------------------------------------------------------------------------------------------


def _rate(run: Callable[[int], None], steps: int, batch: int) -> float:
    start = time.perf_counter()
    run(steps)
    return steps * batch / (time.perf_counter() - start)


def compare(side: int, batch: int, width: int, args: argparse.Namespace) -> dict:
    runs = {"torch": torch_stepper(side, batch, width, args.threads),
            "resnet_jax": jax_stepper(side, batch, width, args.conv)}
    for run in runs.values():
        run(1)  # compile (JAX), allocator and thread-pool warm-up (both)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            rates[name].append(_rate(run, args.steps, batch))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {"image_size": side, "batch_size": batch, "width": width, "conv": args.conv,
            "steps": args.steps, "repeats": args.repeats, "torch_threads": args.threads,
            "torch_img_s": medians["torch"], "resnet_jax_img_s": medians["resnet_jax"],
            "torch_img_s_repeats": rates["torch"], "resnet_jax_img_s_repeats": rates["resnet_jax"],
            "ratio": medians["resnet_jax"] / medians["torch"]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def job() -> int:
        if args.steps <= 0 or args.repeats <= 0 or args.threads <= 0:
            raise UserError("--steps, --repeats and --threads must be positive")
        try:
            import torch
        except ImportError:
            raise UserError("PyTorch is not installed: pip install torch") from None
        import jax

        from resnet_jax.conv import resolve_conv

        print(f"# torch {torch.__version__} ({args.threads} threads), jax {jax.__version__} "
              f"({jax.default_backend()}, conv {resolve_conv(args.conv)}), {os.cpu_count()} "
              f"CPUs; train img/s, median of {args.repeats} x {args.steps} steps, alternating",
              flush=True)
        print(f"{'size':>12}  {'batch':>5}  {'width':>5}  {'torch':>8}  {'resnet_jax':>10}  "
              f"{'ratio':>5}", flush=True)
        for side, batch, width in args.sizes or [_size(s) for s in DEFAULT_SIZES]:
            r = compare(side, batch, width, args)
            print(f"{side:>5}x{side:<6}  {batch:>5}  {width:>5}  {r['torch_img_s']:>8,.0f}  "
                  f"{r['resnet_jax_img_s']:>10,.0f}  {r['ratio']:>5.2f}", flush=True)
            if args.json:
                print(json.dumps(r), flush=True)
        return 0

    return run_main(PROG, job)


if __name__ == "__main__":
    main_guard(PROG, main)
