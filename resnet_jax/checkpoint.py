"""Orbax checkpoints of a training run: async saves, last N + best kept, damage-tolerant restore.

A checkpoint holds the device state (a pytree of arrays, restored with any sharding, so a
checkpoint written on 2 processes x 2 devices restores on 1 device and back) and a small JSON
`meta` item: a format tag, the run's identity and the per-epoch metric history, so that
`metrics.jsonl` can always be rewritten consistently with the checkpoint a run resumes from.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from resnet_jax.errors import UserError

FORMAT = "resnet_jax/1"


@dataclass
class Restored:
    step: int
    tree: Any
    meta: dict


def _policy(keep: int) -> pp.PreservationPolicy:
    return pp.AnyPreservationPolicy([
        pp.LatestN(n=keep),
        # Only epoch-end checkpoints carry metrics; mid-epoch ones are covered by LatestN.
        pp.BestN(get_metric_fn=lambda m: m["val_accuracy"], n=1,
                 keep_checkpoints_without_metrics=False),
    ])


class Checkpointer:
    """A thin layer over `ocp.CheckpointManager` with the project's layout and fallbacks."""

    def __init__(self, directory: str | Path, keep: int = 3, *, async_save: bool = True,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            preservation_policy=_policy(keep),
            enable_async_checkpointing=async_save,
            # Half-written saves of a killed run are left as tmp folders: never listed as steps,
            # removed here so they don't pile up.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
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
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def read_meta(self, step: int) -> dict:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError("not a resnet_jax checkpoint")
        return meta

    def restore(self, abstract_tree: Any, step: int | None = None) -> Restored | None:
        """Restores `step`, or the newest checkpoint that can be read.

        A damaged newest checkpoint (truncated or unreadable files) is skipped with a warning
        naming it, and the next older one is tried. Returns None when there are no checkpoints;
        raises UserError when there are some but none can be read.
        """
        steps = self.steps()
        if not steps:
            return None
        candidates = [step] if step is not None else list(reversed(steps))
        errors = []
        for s in candidates:
            try:
                meta = self.read_meta(s)
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_tree)))
                tree = restored["state"]
                jax.block_until_ready(tree)
            except Exception as e:  # noqa: BLE001 - any failure means "this one is unusable"
                reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                errors.append(f"step {s}: {reason}")
                warnings.warn(f"skipping unreadable checkpoint {self.directory / str(s)}: "
                              f"{reason}", stacklevel=2)
                continue
            return Restored(step=s, tree=tree, meta=meta)
        raise UserError(f"no usable checkpoint in {self.directory} ({'; '.join(errors)}); "
                        "use --overwrite to start again")


def best_step(checkpointer: Checkpointer) -> int:
    """The kept step with the highest val_accuracy in the run's history."""
    steps = checkpointer.steps()
    if not steps:
        raise UserError(f"no checkpoints in {checkpointer.directory}")
    history = checkpointer.read_meta(steps[-1]).get("history", [])
    scored = {r["step"]: r["val_accuracy"] for r in history if r["step"] in steps}
    if not scored:
        return steps[-1]
    return max(scored, key=lambda s: (scored[s], s))
