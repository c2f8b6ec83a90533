"""metrics.py: what a run leaves for people (metrics.jsonl, TensorBoard events, curves.png)."""

import json
import subprocess
import sys
import textwrap

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
    assert len(events) == 1 and b"val_accuracy" in events[0].read_bytes()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_writer_keeps_a_torch_the_caller_imported(tmp_path):
    done = _write_records(tmp_path, preload_torch=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "True"
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
