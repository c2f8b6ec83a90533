#!/usr/bin/env python3
"""Benchmark the trainer's train and eval loops on synthetic data, or time a real run end to end.

For every combination of --arch, --batch_size, --precision and --steps_per_dispatch it reports:
compile time of the train loop, steady-state train images/s (median of --repeats runs of --steps
steps, synchronised before the clock is read), eval images/s, device memory (the train
program's, by XLA's buffer assignment; and the allocator's peak where the backend reports it),
XLA's FLOPs per image of a train step, forward FLOPs (models.model_flops), achieved TFLOP/s
and, on a card with a known peak (A100, H100, H200), the model FLOP utilisation. The code is the
trainer's own: make_train_loop / make_eval_loop over make_mesh() of every device, the state built
from a Config as train_and_evaluate builds it; only the data is synthetic (random 28x28 uint8,
resized on the device as Fashion-MNIST is). Lists take several values, spaced or comma-separated.

Defaults depend on the backend. CPU: --arch resnet18 --batch_size 32 --image_size 32 --steps 3
--repeats 2 --steps_per_dispatch 1 --train_examples 1024 --eval_examples 256 (a few minutes on
2 cores). Accelerator: --batch_size 128 1024 --image_size 96 --steps 50 --repeats 3
--steps_per_dispatch 1 50 --train_examples 60000 --eval_examples 10000.

--end_to_end instead runs train_and_evaluate on the real data (default: the chapter's run,
ResNet-18, Fashion-MNIST at 96x96, batch 128, fp32, 10 epochs) and reports its wall time
(start-up, data loading and compilation included), each epoch's images/s, the final test
accuracy and whether it reached 0.906.

Bad flags are one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from resnet_jax.cli import check_writable, main_guard, run_main  # noqa: E402
from resnet_jax.models import CONVS, GROUPED_CONVS, STEM_CONVS, STEMS  # noqa: E402

PROG = "benchmark.py"


def _list_of(kind: Callable[[str], Any], name: str, check: Callable[[Any], str | None]
             ) -> Callable[[str], list]:
    """An argparse type: one token, possibly comma-separated, to a list of checked values."""

    def convert(text: str) -> list:
        values = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            try:
                value = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"--{name} expects {getattr(kind, '__name__', 'a value')}, got {part!r}"
                ) from None
            problem = check(value)
            if problem:
                raise argparse.ArgumentTypeError(f"--{name} {value!r}: {problem}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"--{name} got an empty value")
        return values

    return convert


def _positive(value: int) -> str | None:
    return None if value > 0 else "must be positive"


def _precision(value: str) -> str | None:
    from resnet_jax.config import PRECISIONS

    return None if value in PRECISIONS else f"unknown; valid: {', '.join(PRECISIONS)}"


def _conv(value: str) -> str | None:
    return None if value in CONVS else f"unknown; valid: {', '.join(CONVS)}"


def _flatten(lists: list[list] | None) -> list | None:
    """argparse gives one list per token; duplicates are dropped, the order kept."""
    if lists is None:
        return None
    return list(dict.fromkeys(v for values in lists for v in values))


def _one(name: str) -> Callable[[str], int]:
    convert = _list_of(int, name, _positive)

    def single(text: str) -> int:
        values = convert(text)
        if len(values) != 1:
            raise argparse.ArgumentTypeError(f"--{name} takes one value, got {text!r}")
        return values[0]

    return single


def make_parser() -> argparse.ArgumentParser:
    from resnet_jax.config import _OneLineParser

    parser = _OneLineParser(prog=PROG, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    many = {"nargs": "+", "action": "extend"}
    # Lists are parsed per token into lists, then flattened: `--batch_size 128,1024 4096` works.
    parser.add_argument("--arch", type=_list_of(str, "arch", lambda v: None), **many,
                        help="model names (resnet_jax.list_models()); default resnet18")
    parser.add_argument("--batch_size", type=_list_of(int, "batch_size", _positive), **many,
                        help="global batch sizes; default 32 (CPU), 128 1024 (accelerator)")
    parser.add_argument("--precision", type=_list_of(str, "precision", _precision), **many,
                        help="fp32 and/or bf16; default fp32 (CPU and --end_to_end), "
                             "fp32 bf16 (accelerator)")
    parser.add_argument("--steps_per_dispatch", type=_list_of(int, "steps_per_dispatch",
                                                              _positive), **many,
                        help="train steps per jitted call: 1 is the trainer's separate "
                             "single-step program, >1 its in-jit loop; default 1 (CPU), 1 50 "
                             "(accelerator); --end_to_end: one value, default the trainer's "
                             "(1 on a CPU, 100 otherwise)")
    for name, text in (
            ("image_size", "side of the resized input; default 32 (CPU), 96 (accelerator and "
                           "--end_to_end)"),
            ("steps", "timed train steps per repeat (rounded up to whole dispatches); default 3 "
                      "(CPU), 50"),
            ("repeats", "timed repeats, the median is reported; default 2 (CPU), 3"),
            ("num_classes", "classes of the synthetic labels and the model head; default 10"),
            ("channels", "image channels; default 1 (Fashion-MNIST)"),
            ("source_size", "side of the synthetic stored images, resized on the device like "
                            "Fashion-MNIST's 28; default 28"),
            ("width", "channels of the first stage (Config.width); default 64, small values "
                      "make quick smoke tests"),
            ("cardinality", "bottleneck nets: groups of the 3x3 conv (ResNeXt's C; "
                            "Config.cardinality); default: the arch's own"),
            ("base_width", "bottleneck nets: channels per group at width 64 (ResNeXt's d; "
                           "Config.base_width); default: the arch's own"),
            ("train_examples", "synthetic training-set size; default 1024 (CPU), 60000. "
                               "--end_to_end: use only the first N real examples"),
            ("eval_examples", "synthetic test-set size for eval images/s; default 256 (CPU), "
                              "10000"),
            ("epochs", "--end_to_end: epochs; default 10")):
        parser.add_argument(f"--{name}", type=_one(name), default=None, help=text)
    parser.add_argument("--stem", choices=STEMS, default="imagenet",
                        help="imagenet (default): the chapter's 7x7/2 conv + max-pool; small: "
                             "3x3/1, no pool (Config.stem)")
    parser.add_argument("--grouped_conv", choices=GROUPED_CONVS, default="auto",
                        help="how grouped convs are computed (Config.grouped_conv): native, "
                             "split (one conv per group), auto (default: split on a CPU)")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="after timing each combination, trace one more dispatch with "
                             "jax.profiler into DIR/<combination> and print where the device "
                             "time of a step goes, by XLA instruction kind")
    parser.add_argument("--stem_conv", choices=STEM_CONVS, default="auto",
                        help="how the imagenet stem's 7x7/2 conv is computed (Config.stem_conv): "
                             "auto (default), direct or space_to_depth")
    parser.add_argument("--conv", type=_list_of(str, "conv", _conv), **many,
                        help="how every conv is computed (Config.conv): auto (default: "
                             "by_size on a CPU, xla elsewhere), xla, im2col, by_size; several "
                             "values compare them (--end_to_end: one)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per combination on stdout; the table then "
                             "goes to stderr")
    parser.add_argument("--end_to_end", action="store_true",
                        help="time train_and_evaluate on the real data instead (see above)")
    parser.add_argument("--data_dir", default=None, help="--end_to_end: the data folder "
                        "(as train.py's); default: the usual places")
    parser.add_argument("--workdir", default=None, help="--end_to_end: a new or empty folder; "
                        "default: a temporary one, deleted afterwards")
    return parser


def _defaults(args: argparse.Namespace, accelerator: bool) -> dict:
    """Flag values with the backend's defaults filled in (see the module docstring)."""
    pick = (lambda cpu, acc: acc if accelerator else cpu)  # noqa: E731
    return {
        "arch": _flatten(args.arch) or ["resnet18"],
        "batch_size": _flatten(args.batch_size) or pick([32], [128, 1024]),
        "precision": _flatten(args.precision) or pick(["fp32"], ["fp32", "bf16"]),
        "conv": _flatten(args.conv) or ["auto"],
        "steps_per_dispatch": _flatten(args.steps_per_dispatch) or pick([1], [1, 50]),
        "image_size": args.image_size or pick(32, 96),
        "steps": args.steps or pick(3, 50),
        "repeats": args.repeats or pick(2, 3),
        "train_examples": args.train_examples or pick(1024, 60_000),
        "eval_examples": args.eval_examples or pick(256, 10_000),
    }


def run_benchmark(args: argparse.Namespace) -> int:
    import jax

    from resnet_jax import benchmark
    from resnet_jax.errors import UserError
    from resnet_jax.train import make_mesh

    for name in ("epochs", "data_dir", "workdir"):  # not ignored: a forgotten --end_to_end
        if getattr(args, name) is not None:
            raise UserError(f"--{name} applies to --end_to_end, not the synthetic benchmark")
    # compile_s is the time to compile: a persistent compilation cache (JAX_COMPILATION_CACHE_DIR)
    # would serve an earlier run's programs instead, and report no compilation at all.
    jax.config.update("jax_enable_compilation_cache", False)
    accelerator = jax.default_backend() != "cpu"
    d = _defaults(args, accelerator)
    common = {"image_size": d["image_size"], "steps": d["steps"], "repeats": d["repeats"],
              "num_classes": args.num_classes or 10, "channels": args.channels or 1,
              "width": args.width or 64, "stem": args.stem, "cardinality": args.cardinality,
              "base_width": args.base_width, "grouped_conv": args.grouped_conv,
              "stem_conv": args.stem_conv, "source_size": args.source_size or 28,
              "train_examples": d["train_examples"], "eval_examples": d["eval_examples"]}
    # Cases differing only in steps per dispatch are adjacent: they share one state and one
    # jitted loop (the in-jit loop takes its step count as a traced value: one compilation).
    cases = [benchmark.Case(arch=a, batch_size=b, precision=p, conv=c, steps_per_dispatch=s,
                            **common)
             for a in d["arch"] for b in d["batch_size"] for p in d["precision"]
             for c in d["conv"] for s in d["steps_per_dispatch"]]
    mesh = make_mesh()
    for case in cases:  # every flag error before any output or compilation
        benchmark.check_case(case, mesh)
    if args.profile is not None:
        check_writable(args.profile, "--profile")
    table = sys.stderr if args.json else sys.stdout
    device = jax.devices()[0]
    print(f"# {jax.device_count()} x {device.device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}; image {d['image_size']}x{d['image_size']}x{common['channels']}"
          f", {common['num_classes']} classes, width {common['width']}, {args.stem} stem"
          + (f", cardinality {args.cardinality}" if args.cardinality else "")
          + (f", base width {args.base_width}" if args.base_width else "")
          + (f", {args.grouped_conv} grouped convs" if args.cardinality else "")
          + (f", {args.stem_conv} stem conv" if args.stem_conv != "auto" else "")
          + f"; {d['steps']} steps x {d['repeats']} repeats", file=table, flush=True)
    print(benchmark.table_header(), file=table, flush=True)
    for result in benchmark.run_cases(cases, mesh, profile_dir=args.profile):
        # Rows are printed as they finish, so a run cut short still leaves its results.
        print(benchmark.table_row(result), file=table, flush=True)
        if "profile" in result:
            print(benchmark.profile_line(result), file=table, flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
    print("# " + benchmark.table_legend(), file=table, flush=True)
    return 0


def run_end_to_end(args: argparse.Namespace) -> int:
    from resnet_jax import benchmark
    from resnet_jax.config import Config, validate
    from resnet_jax.errors import UserError

    single: dict[str, Any] = {}
    for name in ("arch", "batch_size", "precision", "steps_per_dispatch", "conv"):
        values = _flatten(getattr(args, name))
        if values is not None and len(values) != 1:
            raise UserError(f"--end_to_end takes one --{name}, got {len(values)}")
        if values is not None:
            single[name] = values[0]
    for name in ("image_size", "epochs", "width", "train_examples", "cardinality", "base_width"):
        if getattr(args, name) is not None:
            single[name] = getattr(args, name)
    single.update(stem=args.stem, stem_conv=args.stem_conv, grouped_conv=args.grouped_conv)
    if args.profile is not None:
        raise UserError("--profile applies to the synthetic benchmark, not --end_to_end")
    for name in ("steps", "repeats", "num_classes", "channels", "source_size", "eval_examples"):
        if getattr(args, name) is not None:
            raise UserError(f"--{name} applies to the synthetic benchmark, not --end_to_end")

    def run(workdir: str) -> int:
        config = validate(Config(data_dir=args.data_dir, workdir=workdir, **single))
        out = sys.stderr if args.json else sys.stdout
        # The trainer prints a line per epoch; with --json, stdout must hold only the JSON.
        with contextlib.redirect_stdout(out):
            result = benchmark.end_to_end(config)
        if result["stopped"]:
            print(f"{PROG}: stopped before the run's last step: no timing (an end-to-end run "
                  "is timed whole, not resumed)", file=sys.stderr)
            return 130
        print(f"{'epoch':>6}  {'train_loss':>10}  {'val_acc':>7}  {'img/s':>9}  {'wall_s':>7}",
              file=out)
        for r in result["epochs"]:
            print(f"{r['epoch']:>6g}  {r['train_loss']:>10.4f}  {r['val_accuracy']:>7.4f}  "
                  f"{r['images_per_sec']:>9,.0f}  {r['wall_time']:>7.1f}", file=out)
        print(f"{config.arch} b{config.batch_size} {config.precision} "
              f"{config.image_size}px on {result['devices']} x {result['device_kind']}: wall "
              f"{result['wall_time_s']:.1f} s (start-up, data and compilation included), final "
              f"val accuracy {result['final_val_accuracy']:.4f}, target "
              f"{result['target_accuracy']} {'reached' if result['reached_target'] else 'MISSED'}"
              + (f" (first at epoch {result['first_epoch_at_target']:g})"
                 if result["first_epoch_at_target"] is not None else ""), file=out)
        if args.json:
            print(json.dumps(result))
        return 0

    if args.workdir is not None:  # (an empty one is an error, not a temporary folder)
        return run(args.workdir)
    with benchmark.temporary_workdir() as workdir:
        return run(workdir)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    return run_main(PROG, lambda: run_end_to_end(args) if args.end_to_end
                    else run_benchmark(args))


if __name__ == "__main__":
    main_guard("benchmark.py", main)
