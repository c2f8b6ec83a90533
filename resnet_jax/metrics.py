"""What a run leaves for people: metrics.jsonl, TensorBoard events, curves.png, a progress bar.

Only process 0 writes (the caller passes `enabled=False` elsewhere). `metrics.jsonl` is always
rewritten whole from the history stored in the checkpoint a run resumes from, atomically, so a
crash can never leave duplicated or missing epochs in it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
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
    """train and val loss and accuracy by epoch on one axis, like the chapter's plot."""
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
    ax.set_ylabel("loss, accuracy")
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


# TensorBoard groups tags by their prefix: train, val and time sections, not one long list.
TENSORBOARD_TAGS = {
    "train_loss": "train/loss", "train_accuracy": "train/accuracy",
    "learning_rate": "train/learning_rate", "images_per_sec": "train/images_per_sec",
    "val_loss": "val/loss", "val_accuracy": "val/accuracy", "val_count": "val/count",
    "train_time": "time/train", "eval_time": "time/eval", "wall_time": "time/wall",
}


class MetricsWriter:
    """Writes each epoch's record to metrics.jsonl, TensorBoard and curves.png."""

    def __init__(self, workdir: Path, enabled: bool = True, title: str = ""):
        self.workdir = workdir
        self.enabled = enabled
        self.title = title
        self.history: list[dict] = []
        self._tb = None
        self._purge_step = 0
        # Plotting takes a few hundred ms: off the training thread, one plot at a time, and
        # never waited for: records that arrive while a plot is drawn are drawn next.
        self._plotter = ThreadPoolExecutor(max_workers=1)
        self._plot = None
        self._lock = threading.Lock()
        self._drawn = 0  # records in the last curves.png

    def reset(self, history: list[dict]) -> None:
        """Starts from `history` (from the checkpoint being resumed), rewriting metrics.jsonl."""
        self.history = list(history)
        # TensorBoard hides the events a killed or partial run logged after the kept history.
        self._purge_step = self.history[-1]["step"] + 1 if self.history else 0
        if self.enabled:
            atomic_write(self.workdir / "metrics.jsonl",
                         "".join(json.dumps(r) + "\n" for r in self.history))

    def write(self, record: dict) -> None:
        """Appends `record` (one epoch's metrics, with `step`) to every output; the plot is
        redrawn on a worker thread."""
        self.history.append(record)
        if not self.enabled:
            return
        with open(self.workdir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is None:
            # A resumed run logs the steps after its checkpoint again: purge_step hides the
            # events a killed run (or a --max_steps run's partial epoch) had logged from there
            # on, as metrics.jsonl is rewritten.
            self._tb = _summary_writer_class()(str(self.workdir / "tensorboard"),
                                               purge_step=self._purge_step)
        for key, value in record.items():
            if (key not in ("epoch", "step") and isinstance(value, int | float)
                    and not isinstance(value, bool)):
                self._tb.add_scalar(TENSORBOARD_TAGS.get(key, key), value, record["step"])
        self._tb.flush()
        with self._lock:
            if self._plot is not None and self._plot.done():
                self._plot.result()  # surfaces a failed plot
                self._plot = None
            if self._plot is None:
                self._plot = self._plotter.submit(self._draw)

    def _draw(self) -> None:
        """Draws curves.png until it shows every record (more may arrive while it draws)."""
        while True:
            with self._lock:
                history = list(self.history)
                if len(history) == self._drawn:
                    self._plot = None  # (this job: the next record starts another)
                    return
            plot_curves(history, self.workdir / "curves.png", self.title)
            self._drawn = len(history)

    def close(self) -> None:
        """Finishes the plot (it then shows every record) and closes TensorBoard's file."""
        with self._lock:
            plot = self._plot
        if plot is not None:
            plot.result()
        self._plotter.shutdown(wait=True)
        if self.enabled and self.history and self._drawn != len(self.history):
            plot_curves(list(self.history), self.workdir / "curves.png", self.title)
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar with loss and img/s on a terminal; nothing per step otherwise."""

    def __init__(self, enabled: bool):
        # (a terminal that cannot redraw a line, TERM=dumb, gets the plain lines)
        self.enabled = enabled and sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.bar = None
        self._t0 = 0.0
        self._images = 0

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        """A bar for 0-based `epoch` of `total` steps, `done` of them already (a resumed one)."""
        if self.enabled:
            self.bar = tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{epochs}",
                            unit="step", leave=False, dynamic_ncols=True)
        self._t0, self._images = time.perf_counter(), 0

    def update(self, steps: int, images: int, loss: float) -> None:
        """Advances by `steps` steps of `images` images in all; shows `loss` and img/s."""
        self._images += images
        if self.bar is not None:
            rate = self._images / max(time.perf_counter() - self._t0, 1e-9)
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:,.0f}", refresh=False)
            self.bar.update(steps)

    def write(self, line: str) -> None:
        """Prints `line` on stdout, above the bar if one is shown."""
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def end_epoch(self) -> None:
        """Removes the bar (the epoch's plain line follows it)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def format_record(record: dict, epochs: int | None = None) -> str:
    """The plain line printed per epoch (`epochs`: the run's total, shown as "epoch 3/10")."""
    of = f"/{epochs}" if epochs is not None else ""
    return (f"epoch {record['epoch']:g}{of} step {record['step']}: "
            f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f} | "
            f"val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f} | "
            f"{record['images_per_sec']:,.0f} img/s | {record['wall_time']:.1f} s")
