"""Orbax checkpoints of a training run: async saves, last N + best kept, damage-tolerant restore.

A checkpoint holds the device state (a pytree of arrays, restored with any sharding, so a
checkpoint written on 2 processes x 2 devices restores on 1 device and back) and a small JSON
`meta` item: a format tag, the run's identity and the per-epoch metric history, so that
`metrics.jsonl` can always be rewritten consistently with the checkpoint a run resumes from.
"""

from __future__ import annotations

import logging
import re
import shutil
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnet_jax.errors import UserError

FORMAT = "resnet_jax/1"
# Orbax's words when a checkpoint holds another model's arrays: other shapes, or another tree
# (a restored path missing from the checkpoint, or the reverse).
_SHAPE_MISMATCH = "is not compatible with the stored shape"
_MISSING_PATH = "Structure mismatch: Target path "
_TREE_MISMATCH = "tree structures do not match"


@dataclass
class Restored:
    step: int
    tree: Any
    meta: dict


def _read_only_notes(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ("read_only=True, setting save_interval_steps" in message
                or message.startswith("Given directory is read only"))


_QUIET_READS = False


def _hide_failed_read_aftermath() -> None:
    """Hides the noise a failed checkpoint read leaves behind, and only that (installed once).

    When one array of a damaged checkpoint cannot be read, Orbax gives up and closes its event
    loop while TensorStore still completes the other reads: each completion then fails with
    "Event loop is closed" and each abandoned read is reported (as an "unraisable" exception,
    or by asyncio's logger as "exception was never retrieved"), thousands of lines in all. The
    failure itself is already reported in one line (the checkpoint is skipped, or named in the
    error).
    """
    # (Again each time: pytest, or a caller's warnings.catch_warnings(), resets the filters.)
    # (A read of another model's checkpoint, stopped at its first misshaped array, can leave
    # the metadata reads' coroutines unawaited likewise.)
    for coroutine in ("_read_array_index_and_device_put", "Store._get_array_metadatas"):
        warnings.filterwarnings("ignore", f"coroutine '{coroutine}' was never awaited",
                                RuntimeWarning)
    global _QUIET_READS
    if _QUIET_READS:
        return
    _QUIET_READS = True
    unraisablehook = sys.unraisablehook

    def failed_read(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        return not ("exception was never retrieved" in message
                    and ("Error reading" in message or "error while reading" in message
                         or (error is not None and ("reading" in str(error)
                                                    or _SHAPE_MISMATCH in str(error)))))

    logging.getLogger("asyncio").addFilter(failed_read)

    def quiet_unraisablehook(unraisable):
        value, code = unraisable.exc_value, getattr(unraisable.object, "cr_code", None)
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        if code is not None and "orbax" in code.co_filename and "read" in code.co_name:
            return
        unraisablehook(unraisable)

    sys.unraisablehook = quiet_unraisablehook


def _policy(keep: int) -> pp.PreservationPolicy:
    return pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        # Only epoch-end checkpoints carry metrics; mid-epoch ones are covered by LatestN.
        pp.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1,
                 keep_checkpoints_without_metrics=False),
    ])


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with the project's layout and fallbacks.

    Close it (or use `with`). The first one made hides, process-wide, the noise Orbax leaves
    after a failed read: asyncio's "exception was never retrieved" for reads, and unraisable
    "Event loop is closed" errors.
    """

    def __init__(self, directory: str | Path, keep: int = 3, *, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.read_only = read_only
        _hide_failed_read_aftermath()
        absl_log = logging.getLogger("absl")
        absl_log.addFilter(_read_only_notes)  # (Orbax's notes that read-only is read-only)
        try:
            options = ocp.CheckpointManagerOptions(
                preservation_policy=_policy(keep),
                enable_async_checkpointing=async_save,
                # Half-written saves of a killed run are left as tmp folders: never listed as
                # steps, removed here so they don't pile up.
                cleanup_tmp_directories=not read_only,
                create=not read_only,
                read_only=read_only,
            )
            self.manager = ocp.CheckpointManager(self.directory, options=options)
            # Orbax removes the tmp folders on a thread it awaits only at the first save: a
            # process that only reads, then exits without close(), had that thread fail at
            # shutdown with a traceback. Waiting here removes them now (usually there are none).
            getattr(self.manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        finally:
            absl_log.removeFilter(_read_only_notes)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def steps(self) -> list[int]:
        """The steps of the checkpoints on disk, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, tree: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts an async save (returns at once; the write finishes in the background)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                    meta=ocp.args.JsonSave({"format": FORMAT, **meta})),
            metrics=metrics,
            force=True,
        )

    def wait(self) -> None:
        """Blocks until the saves started so far are written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and stops Orbax's background threads (or use `with`)."""
        self.manager.close()

    def read_meta(self, step: int) -> dict:
        """The JSON `meta` item of checkpoint `step`; ValueError if it is not this project's."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a resnet_jax checkpoint")
        return meta

    def restore(self, abstract_tree: Any, steps: Sequence[int] | None = None
                ) -> Restored | None:
        """Restores the first checkpoint of `steps` that can be read (default: newest first).

        A damaged checkpoint (truncated or unreadable files) is skipped with a warning naming
        it, and the next one is tried. Returns None when there are no checkpoints; raises
        UserError when none of `steps` can be read. A writable checkpointer moves the damaged
        checkpoints newer than the restored one to `damaged_checkpoints/` beside its directory:
        the resumed run writes those steps again, which Orbax refuses while they exist.
        """
        if not self.steps():
            return None
        candidates = list(steps) if steps is not None else list(reversed(self.steps()))
        errors, damaged = [], []
        for s in candidates:
            try:
                meta = self.read_meta(s)
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree)))
                tree = restored["state"]
                jax.block_until_ready(tree)
            except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
                reason = _reason(e)
                mismatch = _mismatch(str(e)) or _mismatch(str(e.__cause__ or ""))
                if mismatch:  # not damaged: another model's
                    raise UserError(
                        f"the checkpoints in {self.directory} do not fit the state restored "
                        f"into them ({mismatch}): another model's checkpoints, or an edited "
                        f"config.json?"
                    ) from None
                errors.append(f"step {s}: {reason}")
                damaged.append(s)
                warnings.warn(f"skipping unreadable checkpoint {self.directory / str(s)}: "
                              f"{reason}", stacklevel=2)
                continue
            if not self.read_only:
                self._set_aside([d for d in damaged if d > s])
            return Restored(step=s, tree=tree, meta=meta)
        advice = ("" if self.read_only else
                  "; use --overwrite to start again")  # (reading: the run's command decides)
        raise UserError(f"no usable checkpoint in {self.directory} ({'; '.join(errors)}){advice}")

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        aside = self.directory.parent / "damaged_checkpoints"
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for s in steps:
                target = aside / str(s)
                shutil.rmtree(target, ignore_errors=True)  # an older damaged copy of the step
                (self.directory / str(s)).rename(target)
                warnings.warn(f"moved the unreadable checkpoint of step {s} to {target}",
                              stacklevel=3)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("resnet_jax_damaged_checkpoints")
        self.manager.reload()


def _reason(error: BaseException) -> str:
    """One line on why a checkpoint could not be read: the error and its cause, without the
    TensorStore spec dump Orbax appends."""
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    if error.__cause__ is not None:
        text += f" ({_clip(' '.join(str(error.__cause__).split()), 200)})"
    return _clip(text, 400) or type(error).__name__


def _clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, at a word's end if one is near, with "..."."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > len(cut) - 40 else cut) + "..."


def _mismatch(message: str) -> str | None:
    """What differs, in a few words, if Orbax's `message` says the checkpoint holds another
    model's arrays; None for any other failure."""
    message = " ".join(message.split())
    if _SHAPE_MISMATCH in message:
        return _clip(message.split(". ")[0], 200)
    if _MISSING_PATH in message:  # "... Target path ('state', 'fc') not found in ..."
        path = message.split(_MISSING_PATH, 1)[1].split(" not found", 1)[0]
        keys = re.findall(r"'([^']*)'|(\d+)", path)  # (sequence indices are ints)
        return _clip("the checkpoint has no " + ".".join(a or b for a, b in keys), 200)
    if _TREE_MISMATCH in message:  # "... do not match: state.layer1: - Source: ..."
        path = message.split(_TREE_MISMATCH, 1)[1].lstrip(": ").split(":", 1)[0]
        where = f" at {path}" if path and " " not in path else ""
        return _clip(f"the trees of arrays differ{where}", 200)
    return None


def best_steps(checkpointer: Checkpointer) -> list[int]:
    """The kept steps, highest val_accuracy in the run's history first (then the newest).

    The history is read from the newest checkpoint whose metadata can be read; kept steps
    without a val_accuracy (mid-epoch saves) come last, newest first.
    """
    steps = checkpointer.steps()
    if not steps:
        raise UserError(f"no checkpoints in {checkpointer.directory}")
    history = []
    for s in reversed(steps):
        try:
            history = checkpointer.read_meta(s).get("history", [])
            break
        except Exception:  # noqa: BLE001 - damaged: an older one holds the history too
            continue
    scored = {r["step"]: r["val_accuracy"] for r in history if r["step"] in steps}
    return sorted(steps, key=lambda s: (s in scored, scored.get(s, 0.0), s), reverse=True)
