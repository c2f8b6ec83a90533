"""Fine-tuning: a fresh run's starting weights from a PyTorch file or another run's workdir
(``--init_from``).

The source's weights must have the run's model's layout, except in two places that a new
dataset changes: a head (``fc``) whose class count differs keeps the run's own initialisation,
and a 3-channel stem kernel is summed over its input channels for 1-channel images (a grey
image replicated into RGB meets the same filter). Both are said in :attr:`Start.line`.
The optimizer state needs nothing: every optimizer here starts from zeros of the parameters'
shapes, so the fresh one stands.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from resnet_jax import interop
from resnet_jax.config import Config
from resnet_jax.errors import UserError

Flat = dict[tuple[str, ...], Any]  # ("params" | "batch_stats", module..., leaf) -> array


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a fresh run starts: the source and its variables, fitted to the run's model."""

    source: str
    variables: Flat  # host arrays of the model's dtypes; the head absent when re-initialised
    notes: tuple[str, ...]

    @property
    def line(self) -> str:
        """The one line said at start-up."""
        return f"--init_from {self.source}: " + "; ".join(self.notes)

    def record(self) -> dict:
        """What config.json records (``resolved.init_from``)."""
        return {"source": self.source, "notes": list(self.notes)}


def load_start(config: Config, abstract: dict, load_checkpoint: Callable[[Path], Any]) -> Start:
    """The weights of ``config.init_from`` fitted to the run's model, whose variables
    (``{"params", "batch_stats"}``, arrays or ``jax.ShapeDtypeStruct``) are ``abstract``.

    ``load_checkpoint`` reads another run's workdir (``train.load_checkpoint``, passed in
    because the trainer is what calls this: the module below it cannot import it).

    Raises:
        UserError: an unreadable source, or one whose layout is not the model's (one line).
    """
    source = Path(config.init_from)
    if source.is_dir():
        variables, what = _from_workdir(source, load_checkpoint)
    else:
        variables, what = _from_file(config, source)
    want = _flat(abstract)
    got, fresh, notes = _fit(_flat(variables), want)
    _check_layout(got, want, fresh, source)
    got = {path: np.asarray(value, want[path].dtype) for path, value in got.items()}
    return Start(str(source), got, (what, *notes))


def apply_start(tree: dict, start: Start | None) -> dict:
    """``tree`` (a fresh checkpoint tree ``{"state": ..., "accum": ...}``) with the start's
    variables in place of the state's, each placed as the fresh array it replaces."""
    if start is None:
        return tree
    state = dict(tree["state"])
    for collection in ("params", "batch_stats"):
        def put(path, fresh, collection=collection):
            value = start.variables.get((collection, *(k.key for k in path)))
            if value is None:  # the re-initialised head
                return fresh
            # From the host copy every process holds (device_put would not span processes).
            return jax.make_array_from_callback(value.shape, fresh.sharding,
                                                lambda index: value[index])

        state[collection] = jax.tree_util.tree_map_with_path(put, state[collection])
    return {**tree, "state": state}


def record(start: Start | None, workdir: str | Path) -> dict | None:
    """config.json's ``resolved.init_from``: this start's, or when resuming, the one the run's
    first start recorded (the resumed command may no longer name it)."""
    if start is not None:
        return start.record()
    try:
        saved = json.loads((Path(workdir) / "config.json").read_text())
        return saved["resolved"]["init_from"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------


def _from_file(config: Config, path: Path) -> tuple[dict, str]:
    if config.variant != "torchvision":
        raise UserError(f"--init_from {path}: a PyTorch file has torchvision's layout; give "
                        "--variant=torchvision")
    try:
        variables = interop.from_torch(path, arch=config.arch)
    except (ValueError, ImportError, OSError) as e:
        raise UserError(f"--init_from {path}: {e}") from None
    return variables, f"{config.arch} weights from a PyTorch file"


def _from_workdir(path: Path, load_checkpoint: Callable[[Path], Any]) -> tuple[dict, str]:
    source, state, step = load_checkpoint(path)
    # The local copy of each replicated array (the whole of it, on every process).
    variables = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.variables)
    return variables, f"{source.arch} ({source.variant}) weights of step {step} of that run"


def _flat(variables: dict) -> Flat:
    return {(collection, *(k.key for k in path)): leaf
            for collection in ("params", "batch_stats")
            for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get(collection, {}))}


def _fit(got: Flat, want: Flat) -> tuple[Flat, set, list[str]]:
    """``got`` without a head whose class count differs from ``want``'s, and with a 3-channel
    stem summed for a 1-channel model; the paths left to the fresh init; the notes."""
    got, fresh, notes = dict(got), set(), []
    head, stem = ("params", "fc", "kernel"), ("params", "conv1", "kernel")
    if head in got and head in want and got[head].shape != want[head].shape \
            and got[head].shape[:-1] == want[head].shape[:-1]:
        notes.append(f"fc re-initialised for {want[head].shape[-1]} classes (the source has "
                     f"{got[head].shape[-1]})")
        fresh = {head, ("params", "fc", "bias")}
        got = {path: value for path, value in got.items() if path not in fresh}
    if stem in got and stem in want and got[stem].shape[2] == 3 and want[stem].shape[2] == 1:
        notes.append("conv1's kernel summed over its 3 input channels for 1-channel images")
        got[stem] = np.sum(got[stem], axis=2, keepdims=True)
    return got, fresh, notes or ["every weight and batch-norm statistic taken"]


def _check_layout(got: Flat, want: Flat, fresh: set, source: Path) -> None:
    missing = sorted("/".join(p) for p in want if p not in got and p not in fresh)
    unknown = sorted("/".join(p) for p in got if p not in want)
    wrong = sorted(f"{'/'.join(p)} {tuple(got[p].shape)} (this run: {tuple(want[p].shape)})"
                   for p in got if p in want and tuple(got[p].shape) != tuple(want[p].shape))
    problems = [f"{len(names)} {what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("missing", missing), ("unknown", unknown),
                                    ("misshaped", wrong)) if names]
    if problems:
        raise UserError(f"--init_from {source}: its weights do not fit this run's model (check "
                        f"--arch, --variant, --width, --stem): {'; '.join(problems)}")
