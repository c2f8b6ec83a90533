#!/usr/bin/env python3
"""Export a trained torchvision-variant run for PyTorch: its checkpoint's weights and batch-norm
statistics as a torchvision state_dict, in a .pth file (torch.save; needs torch) or a
.safetensors file (needs only safetensors). Load it with

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # a 1-channel run (Fashion-MNIST)
    model.load_state_dict(torch.load("run.pth"), strict=True)   # or safetensors.torch.load_file

and give it what the run saw: NCHW images scaled to [0, 1] (no mean/std normalisation) at the
run's --image_size. A d2l-variant run cannot be exported: no torchvision model has its layout.
Mistakes in the flags or the workdir are one line on stderr with exit status 2."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402

FORMATS = (".pth", ".safetensors")


def write(state_dict: dict, path: str, metadata: dict[str, str]) -> None:
    """Writes `state_dict` (numpy arrays) to `path` in the format its suffix names, atomically
    (a file left by a killed export is never half a state_dict)."""
    partial = f"{path}.partial"
    if path.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file(state_dict, partial, metadata=metadata)
    else:
        import torch

        torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, partial)
    os.replace(partial, path)


def notes(config, in_channels: int) -> list[str]:
    """What a torchvision user must know about this run's layout."""
    out = []
    if config.width != 64 or config.stem != "imagenet":
        out.append(f"width {config.width} with the {config.stem} stem is no torchvision layout "
                   "(it needs width 64 and the imagenet stem); resnet_jax.interop.from_torch "
                   "reads it back")
    elif in_channels != 3:
        out.append(f"the stem takes {in_channels}-channel images: set model.conv1 = "
                   f"torch.nn.Conv2d({in_channels}, 64, 7, 2, 3, bias=False) before "
                   "load_state_dict")
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from resnet_jax.config import _DefaultsFormatter, _OneLineParser

    class Formatter(argparse.RawDescriptionHelpFormatter, _DefaultsFormatter):
        """The description as written (it holds code), the flags' defaults after their help."""

    parser = _OneLineParser(prog="export.py", description=__doc__, formatter_class=Formatter)
    parser.add_argument("--workdir", required=True, help="a workdir written by train.py "
                        "with --variant=torchvision")
    parser.add_argument("--output", required=True, metavar="FILE.pth|FILE.safetensors",
                        help="the file to write; its suffix picks the format")
    parser.add_argument("--checkpoint", default="latest", help="best, latest, or a step number")
    args = parser.parse_args(argv)

    def job():
        from pathlib import Path

        from resnet_jax.cli import check_writable
        from resnet_jax.errors import UserError
        from resnet_jax.train import load_checkpoint, load_config

        if not args.output.endswith(FORMATS) or Path(args.output).is_dir():
            raise UserError(f"--output {args.output!r}: name a .pth or .safetensors file")
        config = load_config(args.workdir)  # before the checkpoint: a d2l run stops here
        if config.variant != "torchvision":
            raise UserError(f"{args.workdir} is a {config.variant}-variant run: its convs have "
                            "biases and its projection shortcuts no batch norm, a layout no "
                            "torchvision model has (train with --variant=torchvision)")
        check_writable(Path(args.output).absolute().parent, "--output")
        if args.output.endswith(".pth"):
            try:
                import torch  # noqa: F401
            except ImportError:
                raise UserError("writing a .pth file needs torch (pip install torch); a "
                                ".safetensors file needs only safetensors") from None

        import jax
        import numpy as np

        from resnet_jax import interop

        config, state, step = load_checkpoint(args.workdir, args.checkpoint)
        variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.variables)
        # The counters say how many batches the statistics saw: the run's steps.
        state_dict = interop.to_torch(variables, num_batches_tracked=step)
        in_channels = state_dict["conv1.weight"].shape[1]
        num_classes = state_dict["fc.weight"].shape[0]
        write(state_dict, args.output, {"format": "pt", "arch": config.arch, "step": str(step)})
        print(f"wrote {config.arch} (step {step}, {num_classes} classes) to {args.output}: "
              f"torchvision.models.{config.arch}(num_classes={num_classes}) loads it")
        for note in notes(config, in_channels):
            print(f"note: {note}")
        return 0

    return run_main("export.py", job)


if __name__ == "__main__":
    main_guard("export.py", main)
