"""scripts/benchmark.py, run as a user runs it (a subprocess), on tiny configurations.

No timing is asserted: the CPU is shared and slow. What is checked is that every reported field
exists and is sane, and that bad flags are one line with exit status 2.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import xla_flags

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "benchmark.py"
TINY = ["--arch", "resnet18", "--width", "8", "--batch_size", "8", "--image_size", "32"]


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    # One CPU device whatever the caller's XLA_FLAGS, so the table's numbers are for one mesh.
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_benchmark_json_fields_are_sane():
    # Dispatch sizes 1 (the single-step program) and 2 and 3 (the in-jit loop, compiled once
    # for both: the second must report no compilation of its own). --steps 3 with 2 per dispatch
    # rounds up to 4 steps in 2 dispatches.
    out = _run(*TINY, "--steps", "3", "--repeats", "1", "--steps_per_dispatch", "1,2", "3",
               "--train_examples", "64", "--eval_examples", "16", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    results = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["steps_per_dispatch"], r["steps"], r["dispatches"]) for r in results] == [
        (1, 3, 3), (2, 4, 2), (3, 3, 1)]
    for r in results:
        assert (r["arch"], r["batch_size"], r["precision"], r["width"]) == ("resnet18", 8, "fp32",
                                                                            8)
        assert r["train_images_per_sec"] > 0 and r["eval_images_per_sec"] > 0
        assert r["step_time_ms"] > 0 and len(r["train_images_per_sec_repeats"]) == 1
        assert (r["stem_conv"], r["stem_conv_used"]) == ("auto", "direct")  # on a CPU
        assert (r["conv"], r["conv_used"]) == ("auto", "by_map")
        assert r["forward_flops_per_image"] > 0 and r["params"] > 0
        # A train step (forward, backward ~2x, update) costs about three forward passes.
        assert 2 < r["train_flops_per_image"] / r["forward_flops_per_image"] < 4.5
        assert r["achieved_tflops"] > 0
        assert r["platform"] == "cpu" and r["devices"] == 1
        assert r["peak_bytes"] is None and r["mfu"] is None  # no memory stats or peak on CPU
        # XLA's account of the train program: its arguments hold at least the fp32 params
        # (plain SGD keeps no optimizer state) and the uint8 training images (jit drops the
        # unused test split); the updated state is written into the donated input buffers.
        assert r["program_argument_bytes"] >= 4 * r["params"] + 64 * 28 * 28
        assert 0 < r["program_alias_bytes"] <= r["program_output_bytes"]
        assert r["program_temp_bytes"] > 0
        assert r["program_bytes"] == (r["program_argument_bytes"] + r["program_output_bytes"]
                                      - r["program_alias_bytes"] + r["program_temp_bytes"])
        assert r["final_loss"] > 0 and r["first_dispatch_overhead_s"] >= 0
    assert results[0]["compiled"] and results[0]["compile_s"] > 0
    assert results[1]["compiled"] and results[1]["compile_s"] > 0
    assert not results[2]["compiled"]  # the loop takes its step count as a traced value
    assert results[0]["eval_compile_s"] > 0
    # The table goes to stderr with --json: a header and one row per combination.
    rows = [line for line in out.stderr.splitlines() if line.startswith("resnet18 ")]
    assert len(rows) == 3 and "shared" in rows[2]
    assert "train_img/s" in out.stderr


def test_profile_says_where_the_step_time_goes(tmp_path):
    out = _run(*TINY, "--steps", "2", "--repeats", "1", "--steps_per_dispatch", "2",
               "--train_examples", "64", "--eval_examples", "16", "--profile", str(tmp_path),
               "--stem_conv", "space_to_depth", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert result["stem_conv"] == result["stem_conv_used"] == "space_to_depth"
    assert "space_to_depth stem conv" in out.stderr
    profile = result["profile"]
    assert Path(profile["trace_dir"]) == tmp_path / "resnet18_fp32_b8_spd2"
    assert list(Path(profile["trace_dir"]).glob("plugins/profile/*/*.trace.json.gz"))
    kinds = {k["kind"]: k for k in profile["kinds"]}
    assert profile["device_ms_per_step"] > 0 and 0 < sum(k["share"] for k in kinds.values()) <= 1
    assert all(k["ms_per_step"] > 0 and k["count"] > 0 for k in kinds.values())
    # A ResNet-18 step is mostly its convolutions, forward and backward: one is among the top.
    assert any("conv" in kind for kind in kinds)
    assert "# profile resnet18_fp32_b8_spd2: device " in out.stderr


def test_device_time_by_op_reads_a_gpu_trace(tmp_path):
    # The shape of a jax.profiler trace on a GPU (jax 0.11, H200): kernels on the device's
    # stream threads name the XLA instruction that launched them; a CUDA graph's kernels all
    # name the graph. Derived lines ("XLA Ops") and host threads must not count; two GPUs ran
    # the same kernels, and the times are per device.
    from resnet_jax.benchmark import device_time_by_op

    def meta(pid, kind, name, tid=None):
        return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}

    def kernel(tid, name, op, dur, pid=1):
        return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur, "name": name,
                "args": {"hlo_op": op}}

    events = [
        meta(1, "process_name", "/device:GPU:0"), meta(701, "process_name", "/host:CPU"),
        meta(1, "thread_name", "Stream #14(Compute)", 14), meta(1, "thread_name", "XLA Ops", 9),
        kernel(14, "sm90_xmma_wgrad", "cudnn-conv-bw-filter.3", 60.0),
        kernel(14, "sm90_xmma_wgrad", "cudnn-conv-bw-filter.17", 100.0),
        kernel(14, "loop_add_fusion_3", "command_buffer_5", 30.0),
        kernel(14, "loop_add_fusion_12", "command_buffer_8", 10.0),
        meta(2, "process_name", "/device:GPU:1"), meta(2, "thread_name", "Stream #15(Compute)", 15),
        kernel(15, "sm90_xmma_wgrad", "cudnn-conv-bw-filter.3", 60.0, pid=2),
        kernel(15, "sm90_xmma_wgrad", "cudnn-conv-bw-filter.17", 100.0, pid=2),
        kernel(15, "loop_add_fusion_3", "command_buffer_5", 30.0, pid=2),
        kernel(15, "loop_add_fusion_12", "command_buffer_8", 10.0, pid=2),
        kernel(9, "cudnn-conv-bw-filter.3", "cudnn-conv-bw-filter.3", 60.0),  # derived line
        kernel(3, "cudnn-conv-bw-filter.3", "cudnn-conv-bw-filter.3", 500.0, pid=701),  # host
    ]
    folder = tmp_path / "plugins" / "profile" / "2026_11_27"
    folder.mkdir(parents=True)
    with gzip.open(folder / "host.trace.json.gz", "wt") as f:
        json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)

    profile = device_time_by_op(tmp_path, steps=2)
    assert profile["device_ms_per_step"] == pytest.approx(0.1)  # 200 us over 2 steps
    assert profile["kinds"] == [
        {"kind": "cudnn-conv-bw-filter", "ms_per_step": pytest.approx(0.08),
         "share": pytest.approx(0.8), "count": 1.0},
        {"kind": "loop_add_fusion", "ms_per_step": pytest.approx(0.02),
         "share": pytest.approx(0.2), "count": 1.0},
    ]


@pytest.mark.parametrize("args, expected", [
    (["--arch", "resnet18,resnet19"], "unknown --arch 'resnet19'; valid: "),
    (["--batch_size", "128", "0"], "--batch_size 0: must be positive"),
    (["--precision", "fp16"], "--precision 'fp16': unknown; valid: fp32, bf16"),
    (["--steps", "many"], "--steps expects int"),
    (["--conv", "xla,fft"], "--conv 'fft': unknown; valid: auto, xla, im2col, by_size, by_map"),
    (["--end_to_end", "--precision", "fp32,bf16"], "--end_to_end takes one --precision"),
    (["--end_to_end", "--profile", "p"], "--profile applies to the synthetic benchmark"),
    (["--profile", "/dev/null", "--width", "4", "--image_size", "16", "--stem", "small"],
     "--profile /dev/null is a file, not a directory"),
    (["--epochs", "3"], "--epochs applies to --end_to_end, not the synthetic benchmark"),
    (["--end_to_end", "--workdir="], "--workdir is empty; give a path"),
])
def test_bad_flags_are_one_line(args, expected):
    out = _run(*args, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], out.stderr
    assert out.stdout == ""


def test_sizes_beyond_host_memory_are_one_line():
    out = _run("--steps", "1", "--repeats", "1", "--eval_examples", "64", "--image_size", "16",
               "--width", "4", "--stem", "small", "--train_examples", "10000000000")
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("benchmark.py: error: out of host memory (Unable to allocate"), line


@pytest.mark.slow  # real data: loads and evaluates all 10,000 Fashion-MNIST test images
def test_end_to_end_tiny_run(fashion_mnist_dir, tmp_path):
    out = _run("--end_to_end", "--data_dir", str(fashion_mnist_dir), "--workdir",
               str(tmp_path / "run"), "--epochs", "1", "--train_examples", "64", "--batch_size",
               "32", "--image_size", "28", "--width", "8", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert result["wall_time_s"] > 0 and len(result["epochs"]) == 1
    assert result["epochs"][0]["images_per_sec"] > 0
    assert 0 <= result["final_val_accuracy"] <= 1 and result["reached_target"] is False
    assert result["config"]["train_examples"] == 64 and result["config"]["width"] == 8
    # Running again on the same workdir would resume, not time a run: refused.
    again = _run("--end_to_end", "--workdir", str(tmp_path / "run"), timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr


@pytest.mark.slow  # real data
def test_end_to_end_stopped_by_a_signal_reports_no_timing(fashion_mnist_dir, tmp_path):
    env = {**os.environ, "XLA_FLAGS": xla_flags(1), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--end_to_end", "--data_dir", str(fashion_mnist_dir),
         "--workdir", str(tmp_path / "run"), "--epochs", "3", "--train_examples", "256",
         "--batch_size", "32", "--image_size", "16", "--width", "4", "--stem", "small",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    while not (line := proc.stderr.readline()).startswith("epoch 1/"):  # (--json: on stderr)
        assert line or proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert out == ""  # no JSON: a stopped run's times are not the run's
    assert err.strip().splitlines()[-1] == (
        "benchmark.py: stopped before the run's last step: no timing (an end-to-end run is "
        "timed whole, not resumed)")


def test_model_options_reach_the_benchmarked_model():
    # ResNeXt's cardinality and width per group, and the stem, as the cardinality experiment
    # needs them: the reported parameter count is the grouped model's, not resnet50's own.
    import functools

    import jax
    import jax.numpy as jnp

    from resnet_jax import models

    out = _run("--arch", "resnet50", "--width", "16", "--stem", "small", "--cardinality", "2",
               "--base_width", "40", "--batch_size", "8", "--image_size", "8", "--steps", "1",
               "--repeats", "1", "--train_examples", "16", "--eval_examples", "8", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert (result["stem"], result["cardinality"], result["base_width"]) == ("small", 2, 40)
    assert "small stem, cardinality 2, base width 40" in out.stderr

    def params(**options):
        model = models.create_model("resnet50", num_classes=10, width=16, stem="small", **options)
        shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                                jnp.zeros((1, 8, 8, 1)))
        return models.param_count(shapes["params"])

    assert result["params"] == params(cardinality=2, base_width=40) != params()


def test_peaks_are_dense_and_fp32_is_measured_against_tf32():
    import jax

    from resnet_jax.benchmark import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert peak_tflops("NVIDIA H200", "fp32") == 494.7  # XLA's default: TF32 tensor cores
    assert peak_tflops("NVIDIA H100 NVL", "bf16") == 835.0  # not the SXM card's
    assert peak_tflops("NVIDIA A100-SXM4-40GB", "fp32") == 156.0
    assert peak_tflops("cpu", "fp32") is None
    with jax.default_matmul_precision("highest"):
        assert peak_tflops("NVIDIA H200", "fp32") == 67.0


def test_program_memory_reuses_the_timed_compilation():
    # The memory figure must not cost a GPU session a second compilation per case.
    from resnet_jax import benchmark, train

    case = benchmark.Case(arch="resnet18", batch_size=8, precision="fp32", steps_per_dispatch=2,
                          image_size=32, steps=2, repeats=1, width=8, train_examples=64,
                          eval_examples=16)
    mesh = train.make_mesh()
    group = benchmark._Group(case, mesh, benchmark.synthetic_dataset(case, mesh))
    benchmark._time_train(group, case)
    with benchmark.CompileTimer() as timer:
        memory = benchmark._program_memory(group, case)
    assert timer.backend_compiles == 0
    assert memory["program_bytes"] > memory["program_temp_bytes"] > 0


COMPARE = REPO / "scripts" / "compare_torch_cpu.py"


def test_compare_torch_cpu_times_both_and_reports_the_ratio():
    pytest.importorskip("torch", reason="compare_torch_cpu.py needs torch (the torch extra)")
    out = subprocess.run([sys.executable, str(COMPARE), "--sizes", "16:4:8", "--steps", "1",
                          "--repeats", "2", "--conv", "im2col", "--json"], capture_output=True,
                         text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-3000:]
    (result,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert (result["image_size"], result["batch_size"], result["width"]) == (16, 4, 8)
    assert len(result["torch_img_s_repeats"]) == len(result["resnet_jax_img_s_repeats"]) == 2
    assert result["ratio"] == pytest.approx(result["resnet_jax_img_s"] / result["torch_img_s"])
    assert "conv im2col" in out.stdout.splitlines()[0]
    for args, message in ((["--sizes", "96x128"], "a size is SIDE:BATCH:WIDTH"),
                          (["--steps", "0"], "--steps, --repeats and --threads must be positive")):
        bad = subprocess.run([sys.executable, str(COMPARE), *args], capture_output=True,
                             text=True, timeout=60)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert message in bad.stderr
