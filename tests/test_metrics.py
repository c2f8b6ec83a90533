"""metrics.py: what a run leaves for people (metrics.jsonl, TensorBoard events, curves.png)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import REPO

RECORDS = [{"epoch": e, "step": 10 * e, "train_loss": 1.0 / e, "train_accuracy": 0.5,
            "val_loss": 1.2 / e, "val_accuracy": 0.4 + 0.1 * e} for e in (1, 2)]


def _write_records(tmp_path, preload_torch: bool) -> subprocess.CompletedProcess:
    """Writes RECORDS with a MetricsWriter in a fresh interpreter where `torch` is a stand-in
    package that leaves a marker file when imported."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        f"open({str(tmp_path / 'torch_imported')!r}, 'w').close()\nTensor = type(None)\n")
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        {"import torch" if preload_torch else ""}
        from resnet_jax.metrics import MetricsWriter
        w = MetricsWriter(Path({str(tmp_path)!r}), title="t")
        w.reset([])
        for r in {RECORDS!r}:
            w.write(r)
        w.close()
        print("torch" in sys.modules)
    """)
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{REPO}", "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)


def test_writer_leaves_metrics_events_and_plot_without_importing_torch(tmp_path):
    done = _write_records(tmp_path, preload_torch=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "torch_imported").exists()
    assert done.stdout.strip() == "False"  # and a later `import torch` is not poisoned
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == RECORDS
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    scalars = {(e.step, v.tag): v.simple_value for e in _events(events[0]) for v in e.summary.value}
    # Grouped by prefix, one value per record and tag; epoch and step are the x axis, not tags.
    assert scalars == {(r["step"], f"{split}/{name}"): pytest.approx(r[f"{split}_{name}"])
                       for r in RECORDS for split in ("train", "val")
                       for name in ("loss", "accuracy")}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_keeps_a_torch_the_caller_imported(tmp_path):
    done = _write_records(tmp_path, preload_torch=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1


def _events(path):
    """The Event protos of a TensorBoard events file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 8], "little")
        events.append(Event.FromString(data[pos + 12:pos + 12 + length]))
        pos += 12 + length + 4
    return events


def test_a_resumed_writer_purges_the_events_after_its_checkpoint(tmp_path):
    from tensorboardX.proto.event_pb2 import SessionLog

    from resnet_jax.metrics import MetricsWriter

    # A first process logged both epochs and was killed; the second resumes after epoch 1.
    for history, records in (([], RECORDS), (RECORDS[:1], [{**RECORDS[1], "partial": True}])):
        time.sleep(1.1)  # events files are named by the second they were opened in
        writer = MetricsWriter(tmp_path)
        writer.reset(history)
        for record in records:
            writer.write(record)
        writer.close()
    first, second = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"),
                           key=lambda p: p.stat().st_mtime_ns)
    def starts(path):
        return [e.step for e in _events(path) if e.session_log.status == SessionLog.START]

    assert starts(first) == [0]  # a fresh run: whatever a failed one left is hidden
    # TensorBoard hides the first's events after the kept history (its last record's step).
    assert starts(second) == [RECORDS[0]["step"] + 1]
    tags = {v.tag for e in _events(second) for v in e.summary.value}
    assert "val/accuracy" in tags and "partial" not in tags


def test_curves_show_every_record_once_closed(tmp_path):
    # Records arrive faster than plots are drawn (write does not wait for a plot): each plot
    # draws what has arrived, and closing draws the rest.
    from resnet_jax.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path)
    writer.reset([])
    records = [{**RECORDS[0], "epoch": e, "step": 10 * e} for e in range(1, 7)]
    for record in records:
        writer.write(record)
    writer.close()
    assert writer._drawn == len(records)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records


def test_no_progress_bar_where_a_terminal_cannot_redraw(monkeypatch):
    from resnet_jax.metrics import Progress

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # (a terminal, as far as it sees)
    monkeypatch.setenv("TERM", "xterm")
    assert Progress(enabled=True).enabled
    monkeypatch.setenv("TERM", "dumb")
    assert not Progress(enabled=True).enabled
