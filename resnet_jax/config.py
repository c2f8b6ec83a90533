"""The training configuration: one typed place, from which `--help` and validation are derived.

Defaults are the chapter's run (D2L 8.6): ResNet-18 on Fashion-MNIST resized to 96x96, batch 128,
plain SGD with learning rate 0.01, 10 epochs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from resnet_jax.errors import UserError
from resnet_jax.models import (  # one list of choices for models and flags
    CONVS,
    GROUPED_CONVS,
    STEM_CONVS,
    STEMS,
    VARIANTS,
    list_models,
)

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adamw")
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("fp32", "bf16")

# Fields that fix the trajectory of a run: resuming a workdir with any of them changed would
# silently give a different result, so it is an error (``--overwrite`` starts afresh on purpose).
# Extending ``epochs`` or ``max_steps`` is allowed: it only continues the same trajectory (except
# under the cosine schedule, whose length is ``epochs``: see ``identity``).
IDENTITY_FIELDS = (
    "arch", "variant", "dataset", "image_size", "stem", "width", "zero_init_residual",
    "cardinality",
    "base_width", "batch_size",
    "learning_rate", "optimizer", "momentum", "weight_decay", "schedule", "warmup_epochs",
    "label_smoothing", "precision", "augment", "random_erasing", "seed", "train_examples",
    "eval_examples",
)


# Named sets of defaults (`--preset NAME`); flags given explicitly still win.
PRESETS: dict[str, dict[str, Any]] = {
    # Reaches >= 0.85 val accuracy on Fashion-MNIST in under 10 minutes on a 2-core CPU
    # (measured: 0.8804 in 4 min 11 s): 28x28 input, ResNet-18 at half width, 2 epochs.
    "quick": dict(image_size=28, width=32, epochs=2, optimizer="momentum", learning_rate=0.05,
                  schedule="cosine"),
}


def identity(config: Config) -> dict[str, Any]:
    """The fields a resumed run must share with the run that wrote the workdir."""
    names = IDENTITY_FIELDS + (("epochs",) if config.schedule == "cosine" else ())
    return {name: getattr(config, name) for name in names}


def identity_diff(wanted: Mapping[str, Any], saved: Mapping[str, Any]) -> list[str]:
    """``key: saved -> wanted`` for each value of ``wanted`` (identity fields) that ``saved`` (a
    workdir's config.json) differs in. A field missing from ``saved`` was added after that run
    was written and counts as its default, which is always the earlier behaviour."""
    defaults = Config()
    diff = []
    for key, value in wanted.items():
        old = saved.get(key, getattr(defaults, key))
        if old != value:
            diff.append(f"{key}: {old!r} -> {value!r}")
    return diff


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run. Field docs are the `--help` text."""

    preset: str | None = _f(None, "a named set of defaults that explicit flags override: quick "
                            "(a CPU run to >= 0.85 in minutes: " + ", ".join(
                                f"--{k}={v}" for k, v in PRESETS["quick"].items()) + ")")
    arch: str = _f("resnet18", "the model: " + ", ".join(list_models()))
    dataset: str = _f("fashion_mnist", "TFDS dataset name (fashion_mnist, mnist, kmnist, cifar10)")
    data_dir: str | None = _f(
        None,
        "a prepared TFDS data dir, a TFDS manual dir (<dir>/downloads/manual), or a folder with "
        "the original IDX .gz files; default: TFDS's data dir, then the usual system folders",
    )
    workdir: str = _f("workdir", "where config.json, metrics.jsonl, events, curves.png and "
                      "checkpoints/ go; running again with the same workdir resumes")
    epochs: int = _f(10, "number of passes over the training set")
    batch_size: int = _f(128, "global batch size, split over every device; training drops the "
                         "last partial batch of each epoch, evaluation counts every test image "
                         "once")
    learning_rate: float = _f(0.01, "peak learning rate")
    optimizer: str = _f("sgd", "one of " + ", ".join(OPTIMIZERS), choices=OPTIMIZERS)
    momentum: float = _f(0.9, "momentum for the momentum and nesterov optimizers (adamw: b1)")
    weight_decay: float = _f(0.0, "decoupled for adamw, L2 added to the gradient otherwise; "
                             "on every parameter, BN scales and biases included (as PyTorch's)")
    schedule: str = _f("constant", "learning-rate schedule: " + ", ".join(SCHEDULES),
                       choices=SCHEDULES)
    warmup_epochs: float = _f(0.0, "linear warm-up from 0 to the peak rate, in epochs")
    label_smoothing: float = _f(0.0, "label smoothing in [0, 1)")
    image_size: int = _f(96, "side of the square training image after resizing (the chapter: 96)")
    precision: str = _f("fp32", "fp32, or bf16: bfloat16 compute with float32 params, optimizer "
                        "state and batch-norm statistics", choices=PRECISIONS)
    augment: bool = _f(False, "random crop with padding and horizontal flip, on the device")
    random_erasing: float = _f(0.0, "probability that a training image gets a random rectangle "
                               "(2-40%% of its area, aspect 0.3-3.3) filled with noise (Zhong et "
                               "al.'s random erasing), on the device; 0: off")
    stem: str = _f("imagenet", "imagenet: 7x7/2 conv + 3x3/2 max-pool (the chapter's b1); small: "
                   "3x3/1 conv, no pool (for 28x28 and 32x32 inputs)", choices=STEMS)
    width: int = _f(64, "channels of the first stage (later stages double)")
    variant: str = _f("d2l", "parameter layout: d2l (the chapter's: convs with biases, no batch "
                      "norm on the projection shortcut) or torchvision (torchvision's ResNets "
                      "exactly, as --init_from a PyTorch file and scripts/export.py need)",
                      choices=VARIANTS)
    zero_init_residual: bool = _f(False, "start the last BN scale of every block at 0, so each "
                                  "block starts as the identity")
    cardinality: int | None = _f(None, "bottleneck nets: groups of the 3x3 conv (ResNeXt's C); "
                                 "default: the architecture's own")
    base_width: int | None = _f(None, "bottleneck nets: channels per group at width 64 "
                                "(ResNeXt's d); default: the architecture's own")
    grouped_conv: str = _f("auto", "how grouped convs (cardinality > 1) are computed, with the "
                           "same parameters and results: native (one XLA grouped convolution), "
                           "split (one convolution per group: ResNeXt trains 3-12x faster on "
                           "XLA:CPU), auto (split on a CPU, native elsewhere)",
                           choices=GROUPED_CONVS)
    stem_conv: str = _f("auto", "how the imagenet stem's 7x7/2 conv is computed, with the same "
                        "parameters and results: direct, space_to_depth (a 4x4/1 conv on 2x2 "
                        "pixel blocks stacked as channels, avoiding one-channel conv kernels: "
                        "2-12%% faster training on an H200), auto (space_to_depth for the "
                        "imagenet stem, except on a CPU)", choices=STEM_CONVS)
    conv: str = _f("auto", "how every convolution is computed, with the same parameters and "
                   "results: xla (XLA's convolutions), im2col (stacked windows times one "
                   "matrix: 1.75-4x faster training on XLA:CPU, more memory), by_size (im2col for "
                   "grouped convs and those of at least 10 MFLOP, xla for smaller ones), by_map "
                   "(a dense product on maps of at most 2x2, else xla with XLA:CPU's fast "
                   "gradients and its convolutions outside YNNPACK), auto (by_map on a CPU, xla "
                   "elsewhere)", choices=CONVS)
    seed: int = _f(0, "seed of every random draw (init, data order, augmentation)")
    init_from: str | None = _f(
        None, "start from these weights instead of a random init: a torchvision or timm .pth, "
        ".pt or .safetensors file (needs --variant=torchvision), or another run's workdir; a "
        "head with another class count is re-initialised, a 3-channel stem summed over its "
        "channels for 1-channel images. A workdir that already holds checkpoints resumes them "
        "instead")
    train_examples: int | None = _f(None, "use only the first N training examples (quick runs)")
    eval_examples: int | None = _f(None, "evaluate on only the first N test images (quick runs; "
                                   "default: the whole test split)")
    max_steps: int | None = _f(None, "stop after this many steps in total, then evaluate and "
                               "checkpoint (smoke runs)")
    checkpoint_every: int = _f(1, "checkpoint every N epochs (and always at the end)")
    keep_checkpoints: int = _f(3, "keep the last N checkpoints, plus the best by val accuracy")
    steps_per_dispatch: int = _f(0, "train steps run inside one jitted loop per host dispatch; "
                                 "0: auto (1 on CPU, 100 on an accelerator)")
    compilation_cache: str = _f(
        "auto", "folder for XLA's persistent compilation cache, so that a rerun, a resumed run or "
        "another seed skips compiling; auto: JAX_COMPILATION_CACHE_DIR if set, else "
        "~/.cache/resnet_jax/xla on a GPU or TPU (where compiling takes 10-30 s) and none on a "
        "CPU; off: none")
    overwrite: bool = _f(False, "delete what the workdir holds and start again")
    coordinator_address: str | None = _f(None, "multi-host: host:port of process 0 "
                                         "(jax.distributed); default: auto-detect (SLURM, ...)")
    num_processes: int | None = _f(None, "multi-host: total number of processes")
    process_id: int | None = _f(None, "multi-host: this process's index")
    init_timeout: int = _f(300, "multi-host: seconds to wait for the coordinator before failing")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


_FLOAT32_MAX = 3.4028234663852886e38


def validate(config: Config) -> Config:
    """Checks what can be checked without JAX devices or data; raises UserError (one line)."""
    from resnet_jax import models  # Local: keeps `--help` fast.

    for name in ("workdir", "data_dir", "compilation_cache", "init_from"):
        if getattr(config, name) == "":  # would silently mean the current directory
            raise UserError(f"--{name} is empty; give a path")
    for name in ("learning_rate", "momentum", "weight_decay", "warmup_epochs",
                 "label_smoothing", "random_erasing"):
        if not math.isfinite(getattr(config, name)):
            raise UserError(f"--{name} must be a finite number, got {getattr(config, name)}")
        if abs(getattr(config, name)) > _FLOAT32_MAX:  # the programs compute in float32
            raise UserError(f"--{name} {getattr(config, name)} is too large for float32")
    if config.arch not in models.list_models():
        raise UserError(f"unknown --arch {config.arch!r}; valid: {', '.join(models.list_models())}")
    from resnet_jax import data

    if config.dataset not in data.DATASETS:
        raise UserError(f"unknown --dataset {config.dataset!r}; valid: {', '.join(data.DATASETS)}")
    for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                          ("precision", PRECISIONS), ("stem", STEMS), ("variant", VARIANTS),
                          ("grouped_conv", GROUPED_CONVS), ("stem_conv", STEM_CONVS),
                          ("conv", CONVS)):
        if getattr(config, name) not in choices:
            raise UserError(f"unknown --{name} {getattr(config, name)!r}; valid: "
                            f"{', '.join(choices)}")
    for name in ("epochs", "batch_size", "image_size", "width", "checkpoint_every",
                 "keep_checkpoints", "init_timeout"):
        if getattr(config, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(config, name)}")
    if not config.learning_rate > 0:
        raise UserError(f"--learning_rate must be positive, got {config.learning_rate}")
    for name in ("max_steps", "train_examples", "eval_examples", "num_processes", "cardinality",
                 "base_width"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name} must be positive, got {value}")
    if config.steps_per_dispatch < 0:
        raise UserError(f"--steps_per_dispatch must be >= 0, got {config.steps_per_dispatch}")
    if not 0 <= config.seed < 2**31:  # an int32 inside the programs (JAX would wrap larger ones)
        raise UserError(f"--seed must be in [0, {2**31 - 1}], got {config.seed}")
    if config.weight_decay < 0 or config.warmup_epochs < 0:
        raise UserError("--weight_decay and --warmup_epochs must be >= 0")
    if not 0 <= config.momentum < 1:
        raise UserError(f"--momentum must be in [0, 1), got {config.momentum}")
    if not 0 <= config.random_erasing <= 1:
        raise UserError(f"--random_erasing must be in [0, 1], got {config.random_erasing}")
    if not 0 <= config.label_smoothing < 1:
        raise UserError(f"--label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.warmup_epochs >= config.epochs and config.schedule == "cosine":
        raise UserError("--warmup_epochs must be smaller than --epochs for the cosine schedule")
    if config.warmup_epochs > config.epochs:
        raise UserError(f"--warmup_epochs {config.warmup_epochs} exceeds --epochs "
                        f"{config.epochs}")
    return config


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit status 2 (no usage dump), and
    no abbreviated flags (experiment.py's --seed would have meant --seeds)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _typed(kind: type, name: str):
    def convert(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--{name} expects {kind.__name__}, got {text!r}") from None
    return convert


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default after its help, unless the help says it already or there is none
    (None, an empty list, or a switch that takes no value)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if (action.default is None or action.default == [] or action.nargs == 0
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


def make_parser(prog: str | None = None, description: str | None = None,
                exclude: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """An argparse parser with one `--flag` per Config field, documented from the field."""
    parser = _OneLineParser(prog=prog, description=description,
                            formatter_class=_DefaultsFormatter)
    hints = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(Config):
        if f.name in exclude:
            continue
        base = str(f.type).split("|")[0].strip()
        kw: dict[str, Any] = {"default": f.default, "help": f.metadata["help"]}
        if base == "bool":
            # `--augment` alone means true; `--augment=false` is accepted too.
            kw.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        else:
            kw.update(type=_typed(hints[base], f.name), metavar=base.upper())
        parser.add_argument(f"--{f.name}", **kw)
    return parser


def parse_config(argv: list[str] | None = None, prog: str | None = None,
                 description: str | None = None) -> Config:
    """The Config for command-line arguments: defaults, then `--preset`, then explicit flags."""
    parser = make_parser(prog=prog, description=description)
    known, _ = parser.parse_known_args(argv)
    if known.preset is not None:
        if known.preset not in PRESETS:
            parser.error(f"unknown --preset {known.preset!r}; valid: {', '.join(PRESETS)}")
        parser.set_defaults(**PRESETS[known.preset])
    return from_args(parser.parse_args(argv))


def from_saved(saved: Mapping[str, Any]) -> Config:
    """The validated Config of a saved `config.json` object (unknown keys are ignored); a value
    of the wrong type is a UserError, as a bad flag is."""
    kinds = {"int": int, "float": (int, float), "str": str, "bool": bool, "None": type(None)}
    values = {}
    for f in dataclasses.fields(Config):
        if f.name in saved:
            value = saved[f.name]
            allowed = tuple(kinds[t.strip()] for t in str(f.type).split("|"))
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                raise UserError(f"{f.name} is {value!r}, not of type {f.type}")
            values[f.name] = value
    return validate(Config(**values))


def from_args(args: argparse.Namespace) -> Config:
    """The Config for parsed arguments (unknown attributes of `args` are ignored)."""
    names = {f.name for f in dataclasses.fields(Config)}
    return Config(**{k: v for k, v in vars(args).items() if k in names})
