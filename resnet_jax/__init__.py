"""resnet_jax: residual networks in pure JAX/Flax, with a sharded, resumable trainer.

    import resnet_jax
    model = resnet_jax.create_model("resnet18", num_classes=10)

Where things live, lowest layer first; a module uses only those above it in this list:

- `errors`: `UserError` (a one-line mistake in the user's input) and `DivergedError`. Uses none.
- `cli`: what the scripts share: one-line errors and exit codes (`run_main`), signals
  (`main_guard`), `check_writable`. Uses `errors`.
- `conv`: the convolutions' alternative programs (im2col, by map size, per-group,
  space-to-depth; the same function as XLA's), their per-backend choice and the compiler
  options that go with it. Uses none.
- `models`: the networks (blocks, `ResNet`, the registry `create_model`/`list_models`,
  `param_count`, `model_flops`). Uses `conv`.
- `summary`: a model's shape listing (each layer's output shape; parameters and FLOPs per
  stage), as `scripts/summary.py` prints it. Uses `models`.
- `data`: finding and reading datasets on the host (IDX or TFDS); preprocessing, augmentation
  and the epoch's order on the device. Uses `errors`.
- `config`: `Config`, the one typed place for every setting, its flags and validation. Uses
  `data`, `models` (for the valid choices), `errors`.
- `optimizer`: the optax optimizer and learning-rate schedule of a Config. Uses `config`.
- `checkpoint`: `Checkpointer` (Orbax): asynchronous saves, the last N and best kept, a damaged
  checkpoint set aside for the one before it. Uses `errors`.
- `metrics`: what a run leaves for people: metrics.jsonl, TensorBoard events, curves.png, the
  progress bar. Uses none.
- `distributed`: joining several processes (hosts) before training. Uses `errors`.
- `interop`: weights from and to PyTorch (`from_torch`, `to_torch`: torchvision's state_dict
  keys and layouts). Uses `models`.
- `chapter_torch`: the chapter's own PyTorch ResNet-18 (D2L 8.6), the reference the scripts
  check and time resnet_jax against, and its weights as resnet_jax variables (needs torch).
  Uses none.
- `finetune`: a fresh run's starting weights from `--init_from` (a PyTorch file or another
  run's workdir), fitted to the model. Uses `interop`, `config`, `errors`.
- `train`: `train_step`/`eval_step`, their sharded jitted loops (`make_train_loop`), and
  `train_and_evaluate`, which reads as the algorithm: `make_plan`, `build_programs`,
  `restore_latest`, `run_epochs` (`train_epoch`, `end_epoch`, `checkpoint_and_stop`), with
  `Books` holding what lives across epochs. Also restoring and evaluating checkpoints
  (`restore_state`, `evaluate_checkpoint`, `evaluate_ensemble`). Uses all of the above but
  `distributed` and `interop`.
- `benchmark`: throughput of the trainer's own loops, and end-to-end timing. Uses `train`.
- `experiments` (a package): `table` (the experiments: adding one is adding an entry there),
  `runs` (train, resume, skip or share each run), `report` (tables and plots). Uses `train`.

The scripts in `scripts/` (train, evaluate, benchmark, experiment, summary, export,
compare_torch_cpu, check_torch_parity) parse flags and call these; `tests/` has a test file per
module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The public names, imported on first use (PEP 562): the scripts import `resnet_jax.cli` first
# without paying for JAX and Flax, so `--help` is quick and a Ctrl-C while they load is one line.
__all__ = [
    "Bottleneck",
    "PreActBottleneck",
    "PreActResidual",
    "ResNeXtBlock",
    "ResNet",
    "Residual",
    "UserError",
    "compiler_options",
    "conv_by_map",
    "conv_im2col",
    "conv_per_group",
    "conv_space_to_depth",
    "create_model",
    "list_models",
    "model_flops",
    "param_count",
]
_EXPORTS = {name: "resnet_jax.errors" if name == "UserError" else "resnet_jax.models"
            for name in __all__}
# The submodules, also loaded on first use: `resnet_jax.train.train_step` after `import resnet_jax`.
_SUBMODULES = frozenset({"benchmark", "chapter_torch", "checkpoint", "cli", "config", "conv",
                         "data", "distributed", "errors", "experiments", "finetune", "interop",
                         "metrics", "models", "optimizer", "summary", "train"})
__version__ = "0.1.0"

if TYPE_CHECKING:
    from resnet_jax.errors import UserError
    from resnet_jax.models import (
        Bottleneck,
        PreActBottleneck,
        PreActResidual,
        Residual,
        ResNet,
        ResNeXtBlock,
        compiler_options,
        conv_by_map,
        conv_im2col,
        conv_per_group,
        conv_space_to_depth,
        create_model,
        list_models,
        model_flops,
        param_count,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"resnet_jax.{name}")  # (which binds it here)
    raise AttributeError(f"module 'resnet_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES, "__version__"})
