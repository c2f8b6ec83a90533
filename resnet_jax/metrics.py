"""What a run leaves for people: metrics.jsonl, TensorBoard events, curves.png, a progress bar.

Only process 0 writes (the caller passes `enabled=False` elsewhere). `metrics.jsonl` is always
rewritten whole from the history stored in the checkpoint a run resumes from, atomically, so a
crash can never leave duplicated or missing epochs in it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm


def atomic_write(path: Path, text: str) -> None:
    """Writes `text` to `path` so that a reader or a crash sees the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    """train loss, val loss and val accuracy by epoch on one axis, like the chapter's plot."""
    # The object API, not pyplot: no global state, so this may run on a worker thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    epochs = [r["epoch"] for r in history]
    for key, style in (("train_loss", "-"), ("val_loss", "--"), ("train_accuracy", "-."),
                       ("val_accuracy", ":")):
        ax.plot(epochs, [r[key] for r in history], style, marker=".", label=key)
    ax.set_xlabel("epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without importing torch.

    tensorboardX imports torch, where it is installed, only to recognise torch tensors; this
    writer is given Python floats. Importing torch (and its CUDA libraries) would stall training
    at the first epoch's end on a machine that has torch, as GPU machines often do.
    """
    if "torch" in sys.modules:  # Already imported by the caller: nothing to save.
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Writes each epoch's record to metrics.jsonl, TensorBoard and curves.png."""

    def __init__(self, workdir: Path, enabled: bool = True, title: str = ""):
        self.workdir = workdir
        self.enabled = enabled
        self.title = title
        self.history: list[dict] = []
        self._tb = None
        # Plotting takes a few hundred ms: off the training thread, one plot at a time.
        self._plotter = ThreadPoolExecutor(max_workers=1)
        self._plot = None

    def reset(self, history: list[dict]) -> None:
        """Starts from `history` (from the checkpoint being resumed), rewriting metrics.jsonl."""
        self.history = list(history)
        if self.enabled:
            atomic_write(self.workdir / "metrics.jsonl",
                         "".join(json.dumps(r) + "\n" for r in self.history))

    def write(self, record: dict) -> None:
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            # A resumed run logs the steps after its checkpoint again: purge_step hides the
            # events a killed run had logged from there on, as metrics.jsonl is rewritten.
            self._tb = _summary_writer_class()(str(self.workdir / "tensorboard"),
                                               purge_step=record["step"])
        for key, value in record.items():
            if (key not in ("epoch", "step") and isinstance(value, int | float)
                    and not isinstance(value, bool)):
                self._tb.add_scalar(key, value, record["step"])
        self._tb.flush()
        if self._plot is not None:
            self._plot.result()  # Surfaces a failed plot; keeps plots in order.
        self._plot = self._plotter.submit(plot_curves, list(self.history),
                                          self.workdir / "curves.png", self.title)

    def close(self) -> None:
        self._plotter.shutdown(wait=True)
        if self._plot is not None:
            self._plot.result()
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar with loss and img/s on a terminal; nothing per step otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self._t0 = 0.0
        self._images = 0

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self.enabled:
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", leave=False, dynamic_ncols=True)
        self._t0, self._images = time.perf_counter(), 0

    def update(self, steps: int, images: int, loss: float) -> None:
        self._images += images
        if self.bar is not None:
            rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(steps)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_record(record: dict) -> str:
    """The plain line printed per epoch."""
    return (f"epoch {record['epoch']:g} step {record['step']}: "
            f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | "
            f"{record['images_per_sec']:,.0f} img/s | {record['wall_time']:.1f} s")
