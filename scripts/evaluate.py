#!/usr/bin/env python3
"""Evaluate a checkpoint of a training workdir on the whole test split: accuracy, loss and the
confusion matrix with class names. Several workdirs are evaluated as an ensemble (the mean of
their predicted probabilities), and --flip adds test-time augmentation (each image and its
mirror image). --save_predictions writes the per-image probabilities; --add_predictions puts
saved ones into the ensemble, so models trained elsewhere, whose checkpoints are gone, count.
Mistakes in the flags, workdirs or files are one line on stderr with exit status 2."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import main_guard, run_main  # noqa: E402


def format_confusion(confusion, class_names: list[str]) -> str:
    """Rows are true classes, columns predicted ones."""
    width = max(6, max(len(str(v)) for v in confusion.flat) + 1)
    names = [n[:12] for n in class_names]
    label = max(len(n) for n in names)
    head = " " * (label + 2) + "".join(f"{i:>{width}}" for i in range(len(names)))
    rows = [f"{i} {n:<{label}}" + "".join(f"{v:>{width}}" for v in row)
            for i, (n, row) in enumerate(zip(names, confusion, strict=True))]
    return "\n".join([head, *rows])


def main(argv: list[str] | None = None) -> int:
    from resnet_jax.config import _DefaultsFormatter, _OneLineParser

    parser = _OneLineParser(prog="evaluate.py", description=__doc__,
                            formatter_class=_DefaultsFormatter)
    parser.add_argument("--workdir", nargs="+", default=[],
                        help="a workdir written by train.py; several: evaluate their ensemble "
                             "(the mean of the models' class probabilities)")
    parser.add_argument("--checkpoint", default="latest",
                        help="best, latest, or a step number (of every workdir)")
    parser.add_argument("--flip", action="store_true",
                        help="test-time augmentation: average each model's probabilities for "
                             "the image and its horizontal mirror")
    parser.add_argument("--data_dir", default=None, help="override the data dir the runs used")
    parser.add_argument("--save_predictions", metavar="FILE.npz", default=None,
                        help="write the test images' class probabilities (of the ensemble), "
                             "labels and members to this .npz file")
    parser.add_argument("--add_predictions", metavar="FILE.npz", nargs="+", default=[],
                        help="files of --save_predictions whose models join the ensemble "
                             "(each counting as many models as it holds)")
    args = parser.parse_args(argv)
    if not args.workdir and not args.add_predictions:
        parser.error("give --workdir, --add_predictions, or both")

    def job():
        from resnet_jax.errors import UserError
        from resnet_jax.train import (
            evaluate_checkpoint,
            evaluate_ensemble,
            save_predictions,
            use_compilation_cache,
        )

        for flag in ("save_predictions", "data_dir"):
            if getattr(args, flag) == "":
                raise UserError(f"--{flag} is empty")
        if args.save_predictions:  # before the evaluation, not after it
            from pathlib import Path

            from resnet_jax.cli import check_writable

            if Path(args.save_predictions).is_dir():
                raise UserError(f"--save_predictions {args.save_predictions} is a folder; name "
                                "a file")
            check_writable(Path(args.save_predictions).parent, "--save_predictions")
        # As training does: on a GPU, members of one architecture compile their program once.
        use_compilation_cache("auto")

        if (len(args.workdir) == 1 and not args.flip and not args.save_predictions
                and not args.add_predictions):
            result = evaluate_checkpoint(args.workdir[0], args.checkpoint, args.data_dir)
            print(f"checkpoint step {result['step']}: test accuracy "
                  f"{result['val_accuracy']:.4f}, loss {result['val_loss']:.4f} on "
                  f"{result['val_count']} images")
        else:
            result = evaluate_ensemble(args.workdir, args.checkpoint, args.data_dir, args.flip,
                                       saved=args.add_predictions)
            for member in result["members"]:
                saved = f", from {member['file']}" if "file" in member else ""
                print(f"{member['workdir']} (step {member['step']}{saved}): test accuracy "
                      f"{member['val_accuracy']:.4f}{' with flips' if member['flip'] else ''}")
            tta = " with flips" if args.flip and not args.add_predictions else ""
            print(f"ensemble of {len(result['members'])}{tta}: test accuracy "
                  f"{result['val_accuracy']:.4f}, loss {result['val_loss']:.4f} on "
                  f"{result['val_count']} images")
            if args.save_predictions:
                save_predictions(args.save_predictions, result)
                print(f"predictions of {len(result['members'])} model(s) written to "
                      f"{args.save_predictions}")
        if args.checkpoint == "best" and args.workdir:  # (training validates on the test split)
            print("note: 'best' was chosen by accuracy on this test split, so its accuracy is "
                  "an optimistic estimate")
        print("confusion matrix (rows: true class, columns: predicted):")
        print(format_confusion(result["confusion"], result["class_names"]))
        return 0

    return run_main("evaluate.py", job)


if __name__ == "__main__":
    main_guard("evaluate.py", main)
