"""The whole-model benchmarks run and append rows (tiny CPU smoke runs; no timing asserted)."""

import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_speed_smoke(tmp_path):
    out = tmp_path / "train.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--tiny", "--iters", "1", "--warmup", "1",
           "--batch", "2", "--precisions", "fp32", "--backends", "reference", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    # rows are appended, never overwritten; the second run compares the step's variants side by side
    variants = ["default", "per-stage-decoders", "mha-blocks", "for-loop-adamw"]
    subprocess.run(cmd + ["--variants", ",".join(variants)], check=True, capture_output=True, text=True, timeout=300)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 5 and all(r["backend"] == "reference" and float(r["img_per_s"]) > 0 for r in rows)
    assert [r["variant"] for r in rows] == ["default"] + variants
    # render_training.py: one table per run (ratios never cross runs)
    md = tmp_path / "train.md"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "render_training.py"), "--train", str(out),
                           "--md", str(md)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    runs = {r["run"] for r in rows}
    text = md.read_text()
    assert all(f"run {run}" in text for run in runs) and text.count("| fp32 | reference | none | default |") == len(runs)
    assert "| fp32 | reference | none | per-stage-decoders |" in text
    bad = subprocess.run(cmd + ["--variants", "fastest"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown --variants entry 'fastest'" in bad.stderr


def test_pipeline_run_smoke(tmp_path):
    """bench/pipeline_run.py: synthetic VOC-layout data + an OpenAI-format (TorchScript) CLIP file -> the real
    training pipeline -> one CSV row per run."""
    out, csv_path = tmp_path / "run", tmp_path / "pipeline.csv"
    cmd = [sys.executable, os.path.join(ROOT, "bench", "pipeline_run.py"), "--tiny", "--iters", "2", "--num-workers", "0",
           "--out", str(out), "--csv", str(csv_path), "--set", "train.eval_at_end=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 1 and rows[0]["clip_model"] == "cascade-tiny" and float(rows[0]["img_per_s"]) > 0
    assert (out / "cascade-tiny-openai-format.pt").exists() and (out / "train" / "latest.pt").exists()


def test_step_ops_counts_fewer_calls_with_the_written_out_blocks_and_batched_decoders(capsys):
    """bench/step_ops.py on the tiny CLIP: the training path's written-out blocks dispatch fewer ATen calls than
    nn.MultiheadAttention's path, and the stage-batched decoders fewer than one decoder per stage, forward and
    backward, the optimizer the same; the script restores the model's own paths."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import step_ops
    finally:
        sys.path.pop(0)
    import cascade_clip.head
    from cascade_clip.decoder import run_stages

    counts = step_ops.main(["--clip-model", "cascade-tiny", "--time", "1"])
    mha, written = counts[("mha", "per stage")], counts[("written-out", "per stage")]
    batched = counts[("written-out", "batched")]
    for fewer, more in ((written, mha), (batched, written)):
        assert fewer["forward+loss"] < more["forward+loss"] and fewer["backward"] < more["backward"]
        assert fewer["optimizer"] == more["optimizer"]
    assert "| written-out | batched |" in capsys.readouterr().out
    assert batched["ms_per_step"] > 0 and set(counts["adamw_ms"]) == {"fused", "foreach", "for-loop"}
    assert cascade_clip.head.run_stages is run_stages


def test_results_csv_append_and_refusal(tmp_path, monkeypatch):
    """bench/results_io.py: rows are appended under one header; a file with other columns is refused untouched; the
    commit comes from CASCADE_CLIP_COMMIT when set (a device copy's .git may be stale)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("results_io", os.path.join(ROOT, "bench", "results_io.py"))
    results_io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_io)
    path = str(tmp_path / "r.csv")
    results_io.append_rows(path, ["a", "b"], [{"a": 1, "b": 2}])
    results_io.append_rows(path, ["a", "b"], [{"a": 3, "b": 4}])
    assert open(path).read().splitlines() == ["a,b", "1,2", "3,4"]
    with pytest.raises(ValueError, match=r"has the columns \['a', 'b'\], these rows have \['a', 'c'\]"):
        results_io.append_rows(path, ["a", "c"], [{"a": 5, "c": 6}])
    assert open(path).read().splitlines() == ["a,b", "1,2", "3,4"]
    monkeypatch.setenv("CASCADE_CLIP_COMMIT", "abc1234")
    assert results_io.git_commit() == "abc1234"


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_train_check.sh", "gpu_env.sh"])
def test_gpu_scripts_parse(script):
    """The GPU scripts run only on a lent GPU machine, where a syntax error would cost a whole device session:
    bash must at least parse them here (their dry run, without CUDA, is a manual check: see the README)."""
    proc = subprocess.run(["bash", "-n", os.path.join(ROOT, "bench", script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_cascade_clip_bench_command(tmp_path, monkeypatch, capsys):
    """`cascade-clip bench NAME ARGS` runs bench/<script> with ARGS; unknown names and installs without the
    repository's bench/ folder get a clear error."""
    from cascade_clip import bench_cli, cli

    out = tmp_path / "kernels"
    cli.main(["bench", "kernels", "--dry-run", "--out", str(out), "--ops", "nga", "--modes", "fwd"])
    rows = list(csv.DictReader(open(out / "results_gpu.csv")))
    assert {r["provider"] for r in rows} == {"eager", "triton"}
    with pytest.raises(SystemExit, match="unknown benchmark 'gpu'; choose one of kernels, cpu, train"):
        cli.main(["bench", "gpu"])
    monkeypatch.setattr(bench_cli, "bench_dir", lambda: None)
    with pytest.raises(SystemExit, match="the benchmarks live in the repository's bench/ folder"):
        cli.main(["bench", "cpu"])


def test_segment_speed_smoke(capsys):
    """bench/segment_speed.py on the tiny CLIP: both block attention paths give the same scores and a time each; the
    model keeps its own path afterwards."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import segment_speed
    finally:
        sys.path.pop(0)
    result = segment_speed.main(["--clip-model", "cascade-tiny", "--short-side", "64", "--rounds", "1",
                                 "--precisions", "fp32,bf16"])
    assert set(result["seconds"]) == {(p, path) for p in ("fp32", "bf16")
                                      for path in ("written-out attention", "nn.MultiheadAttention")}
    assert all(s > 0 for s in result["seconds"].values()) and set(result["max_difference"]) == {"fp32", "bf16"}
    # (the two paths' parity is tested in test_model.py; random weights saturate most scores, so the printed
    # difference is a plumbing check, not a parity test)
    assert "| bf16 | written-out attention |" in capsys.readouterr().out
