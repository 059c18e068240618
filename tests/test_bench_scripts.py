"""The whole-model benchmarks run and append rows (tiny CPU smoke runs; no timing asserted)."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

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


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_train_check.sh", "gpu_recheck.sh", "gpu_env.sh"])
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


# ---------------------------------------------------------------- the GPU kernel benchmark (bench_gpu.py), CPU side

def _bench_module(name):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def _head_cases(common, dtype="fp32"):
    return [common.Case("nga", 2, dtype, N=16, D=16), common.Case("descriptor", 2, dtype, C=3, N=16, D=16),
            common.Case("mask_logits", 2, dtype, C=3, N=16, D=16, variant="attn"),
            common.Case("mask_logits", 2, dtype, C=3, N=16, D=16, variant="cos")]


@pytest.mark.parametrize("index", range(4), ids=["nga", "descriptor", "attn", "cos"])
def test_bench_gpu_separate_official_inputs_match_stacked(index, monkeypatch):
    """The eager provider gets every tap, every stage's q/k and every stage's Linear as separate leaves and returns
    per-stage outputs; the triton provider gets the stacked tensors. Same values in, same outputs and gradients out:
    checked against the official formulation on the stacked inputs, and through runner() against the reference
    backend standing in for triton (same inputs, same cotangents)."""
    import torch

    common = _bench_module("bench_common_gpu")
    official_ops = _bench_module("official_ops")
    case = _head_cases(common)[index]
    stacked = common.make_inputs(case, "cpu", requires_grad=True)
    official = common.official_inputs(case, stacked, requires_grad=True)
    assert all(t.is_leaf and t.requires_grad and t._base is None for t in official)
    cots = common.cotangents(case, official, "cpu")
    outs = common.eager_fn(case)(*official)
    outs = list(outs) if isinstance(outs, list) else [outs]
    assert len(outs) == (case.S if case.op in ("nga", "descriptor") else 1)
    torch.autograd.backward(outs, cots)

    heads, normalize, scale = common._mask_params(case)
    stacked_fn = {"nga": official_ops.nga, "descriptor": official_ops.descriptor}.get(
        case.op, lambda q, k: official_ops.mask_logits(q, k, heads, normalize))
    ref = stacked_fn(*stacked)
    ref.backward(torch.stack(cots) if len(cots) > 1 else cots[0])
    torch.testing.assert_close(torch.stack(outs) if len(outs) > 1 else outs[0], ref, rtol=0, atol=0)
    if case.op == "nga":  # taps stage-major, then each stage's weights
        got = [torch.stack([t.grad for t in official[:case.S * case.K]]).view_as(stacked[0]),
               torch.stack([t.grad for t in official[case.S * case.K:]])]
    elif case.op == "descriptor":  # text, g, each stage's weight, each stage's bias
        got = [official[0].grad, official[1].grad, torch.stack([t.grad for t in official[2:2 + case.S]]),
               torch.stack([t.grad for t in official[2 + case.S:]])]
    else:  # each stage's q, then each stage's k
        got = [torch.stack([t.grad for t in official[:case.S]]), torch.stack([t.grad for t in official[case.S:]])]
    for g, t in zip(got, stacked):
        torch.testing.assert_close(g, t.grad, rtol=0, atol=0)

    # runner(): eager on separate leaves vs "triton" (here the reference backend) on the stacked inputs
    from cascade_clip import ops

    def reference_fn(case, provider, device):
        if case.op == "nga":
            return lambda f, w: ops.nga(f, w, backend="reference")
        if case.op == "descriptor":
            return lambda t, g, w, b: ops.descriptor(t, g, w, b, backend="reference")
        return lambda q, k: ops.mask_logits(q, k, scale, normalize=normalize, backend="reference")

    run_e, in_e = common.runner(case, "eager", "fwd+bwd", "cpu")
    monkeypatch.setattr(common, "provider_fn", reference_fn)
    run_t, in_t = common.runner(case, "triton", "fwd+bwd", "cpu")
    assert len(in_t) == len(stacked) and all(a.shape == b.shape for a, b in zip(in_t, stacked))
    run_e()
    run_t()
    grads_t = [t.grad for t in in_t]
    if case.op == "nga":
        grads_e = [torch.stack([t.grad for t in in_e[:case.S * case.K]]).view_as(in_t[0]),
                   torch.stack([t.grad for t in in_e[case.S * case.K:]])]
    elif case.op == "descriptor":
        grads_e = [in_e[0].grad, in_e[1].grad, torch.stack([t.grad for t in in_e[2:2 + case.S]]),
                   torch.stack([t.grad for t in in_e[2 + case.S:]])]
    else:
        grads_e = [torch.stack([t.grad for t in in_e[:case.S]]), torch.stack([t.grad for t in in_e[case.S:]])]
    for ge, gt in zip(grads_e, grads_t):
        torch.testing.assert_close(ge, gt)


def test_bench_gpu_compile_provider_compiles_only_timed_graphs():
    """The compile provider on the CPU: same gradients as eager, and a fwd+bwd case compiles one graph (the
    autograd one it times), not an extra no-grad graph for the cotangent's shape."""
    import torch
    import torch._dynamo
    from torch._dynamo.utils import counters

    common = _bench_module("bench_common_gpu")
    case = common.Case("nga", 1, "fp32", N=8, D=8)
    torch._dynamo.reset()
    common._COMPILED.clear()
    before = counters["stats"]["unique_graphs"]
    run_c, in_c = common.runner(case, "compile", "fwd+bwd", "cpu")
    run_c()
    assert counters["stats"]["unique_graphs"] - before == 1
    run_e, in_e = common.runner(case, "eager", "fwd+bwd", "cpu")
    run_e()
    for a, b in zip(in_c, in_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_bench_gpu_work_counts_the_backward_reread():
    """fwd+bwd bytes are 3*in + 2*out for every op (forward: read in, write out; backward: read the output grad and
    the inputs again, write the input grads); forward bytes in + out."""
    common = _bench_module("bench_common_gpu")
    S, K, B, N, D, C = 3, 3, 8, 1024, 512, 15
    io = {
        "nga": (S * K * B * N * D, S * B * N * D),
        "descriptor": (C * D + B * D + S * D * 2 * D + S * D, S * B * C * D),
        "mask_logits": (S * B * C * D + S * B * N * D, B * C * N),
    }
    for dtype, es in (("bf16", 2), ("fp32", 4)):
        for op, (ins, out) in io.items():
            case = common.Case(op, B, dtype, C=C, N=N, D=D, variant="attn" if op == "mask_logits" else "")
            assert common.work(case, "fwd")[0] == (ins + out) * es, op
            assert common.work(case, "fwd+bwd")[0] == (3 * ins + 2 * out) * es, op
        loss = common.Case("loss", B, dtype, C=C, N=64 * 64)
        logits, labels = B * C * 64 * 64 * es, B * 64 * 64 * 8
        assert common.work(loss, "fwd+bwd")[0] == 3 * logits + 2 * labels


def _gpu_row(**kw):
    row = {"date": "2026-11-28T08:00:00Z", "card": "H200", "torch": "2.11", "triton": "3.6", "commit": "abc",
           "op": "nga", "variant": "", "provider": "eager", "mode": "fwd+bwd", "timing": "graph",
           "shape": "S3,K3,B8,N1024,D512", "dtype": "bf16", "p50_ms": "1.0", "p20_ms": "1.0", "p80_ms": "1.0",
           "gbps": "1", "tflops": "1", "frac_copy_bw": "0.5", "frac_mm_peak": "0.1", "peak_mem_mib": "1",
           "copy_gbps_measured": "4000", "mm_tflops_measured": "700"}
    row.update(kw)
    return row


def _write_csv(path, rows):
    fields = list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_render_results_ratios_stay_within_one_run(tmp_path):
    """render_results.py: ratios only between rows of one run id; a later run of the same commit with only some
    providers shows only its own rows; rows without the run column (old CSVs, or old rows beside new ones) keep the
    old grouping (newest commit, within the hour); the descriptor's TFLOP/s is marked official-equivalent."""
    render = _bench_module("render_results")
    old = tmp_path / "old.csv"  # before the run column: eager 2.0 ms, triton 0.1 ms -> 20x
    _write_csv(old, [_gpu_row(p50_ms="2.0"), _gpu_row(provider="triton", p50_ms="0.1"),
                     _gpu_row(op="descriptor", shape="S3,B8,C15,d512,e512", p50_ms="0.2"),
                     _gpu_row(op="descriptor", shape="S3,B8,C15,d512,e512", provider="triton", p50_ms="0.1",
                              tflops="43.0", frac_mm_peak="0.06"),
                     _gpu_row(date="2026-11-28T05:00:00Z", provider="triton", p50_ms="9.0")])  # older: dropped
    md_old = tmp_path / "old.md"
    assert render.main([str(old), "--md", str(md_old)]) == 0
    text = md_old.read_text()
    assert "| nga | S3,K3,B8,N1024,D512 | fwd+bwd | 20.00x |" in text and "9.0000" not in text
    assert "| 43.0† |" in text and "| 0.06† |" in text and "official-equivalent" in text
    assert "Rows without a run id predate" in text

    # the same commit twice (a stale .git, a repeat): run B re-timed only triton, half an hour later
    new = tmp_path / "new.csv"
    _write_csv(new, [_gpu_row(run="A", date="2026-11-28T09:00:00Z", p50_ms="2.0"),
                     _gpu_row(run="A", date="2026-11-28T09:00:00Z", provider="triton", p50_ms="0.1"),
                     _gpu_row(run="B", date="2026-11-28T09:30:00Z", provider="triton", p50_ms="0.2")])
    rows = render.latest_runs(render.load(str(old), str(new)))
    assert {r["run"] for r in rows} == {"B"} and len(rows) == 1
    md = render.table(rows)
    assert "run B" in md and "| - | - | 0.2000 | - |" in md  # no eager of run A divided by triton of run B
    everything = render.table(render._dedup(render.load(str(old), str(new))))
    assert "| 2.0000 | - | 0.1000 | 20.00x |" in everything and "run A" in everything and "run B" in everything
    assert everything.count("### H200") == 3  # the old rows' commit, run A, run B: never one table
    # a rendered file of both, through main (several CSVs at once)
    assert render.main([str(old), str(new), "--all", "--md", str(tmp_path / "all.md")]) == 0
    assert "Targets on H200, run A" in (tmp_path / "all.md").read_text()


def test_render_results_plot_keeps_cards_and_runs_apart(tmp_path):
    """plot(): one row of panels per (card, run), so two cards' bars never share a panel (needs matplotlib, which
    the project does not depend on)."""
    pytest.importorskip("matplotlib")
    render = _bench_module("render_results")
    rows = [_gpu_row(run="A"), _gpu_row(run="A", provider="triton", p50_ms="0.1"),
            _gpu_row(run="C", card="A100", p50_ms="3.0"), _gpu_row(run="C", card="A100", provider="triton")]
    assert render.runs(rows) == [("A100", "C"), ("H200", "A")]
    path = tmp_path / "p.png"
    assert render.plot(rows, str(path)) and path.stat().st_size > 0


def test_bench_gpu_dry_run_run_id_compile_and_skip_measured(tmp_path):
    """bench_gpu.py --dry-run: rows carry $CASCADE_CLIP_RUN_ID; compile runs at the tiny shape when --providers
    names it (and only then); --skip-measured skips the cases this run already has, not another run's."""
    out = tmp_path / "out"
    script = os.path.join(ROOT, "bench", "bench_gpu.py")
    base = [sys.executable, script, "--dry-run", "--out", str(out), "--ops", "nga", "--modes", "fwd+bwd"]
    env = dict(os.environ, CASCADE_CLIP_RUN_ID="run-1", TRITON_INTERPRET="1")

    def run(*extra, run_id="run-1"):
        proc = subprocess.run(base + list(extra), capture_output=True, text=True, timeout=300,
                              env=dict(env, CASCADE_CLIP_RUN_ID=run_id))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    run("--providers", "eager,compile,triton")
    rows = list(csv.DictReader(open(out / "results_gpu.csv")))
    assert [r["provider"] for r in rows] == ["eager", "compile", "triton"] and {r["run"] for r in rows} == {"run-1"}
    assert "cases already measured" in run("--skip-measured")
    assert len(list(csv.DictReader(open(out / "results_gpu.csv")))) == 3
    run("--skip-measured", run_id="run-2")  # another run: measured again, default providers (no compile)
    rows = list(csv.DictReader(open(out / "results_gpu.csv")))
    assert [(r["run"], r["provider"]) for r in rows[3:]] == [("run-2", "eager"), ("run-2", "triton")]


def test_cpu_bench_loss_case_is_one_loss_for_every_provider():
    """The loss case's providers compute the same loss and logit gradient from the same inputs: the official
    element-wise loss (eager), and segmentation_loss on the reference and cpp backends."""
    common = _bench_module("bench_common_cpu")
    results = {}
    for provider in [p for p in ("eager", "reference", "cpp") if p in common.available_providers()]:
        case = common.make_case("loss", requires_grad=True)  # the same seed: the same values for each provider
        inputs, grads = common.official_layout(case, requires_grad=True) if provider == "eager" else (
            list(case.inputs), [case.grad])
        out = common.provider_fn("loss", provider, case)(*inputs)
        torch.autograd.backward(out if isinstance(out, list) else [out], grads)
        results[provider] = ((out[0] if isinstance(out, list) else out).detach(), case.inputs[0].grad)
    assert "cpp" in results and "reference" in results
    loss, grad = results["eager"]
    for provider in ("reference", "cpp"):
        torch.testing.assert_close(results[provider][0], loss, rtol=1e-5, atol=1e-5, msg=provider)
        torch.testing.assert_close(results[provider][1], grad, rtol=1e-5, atol=1e-7, msg=provider)


def test_cpu_bench_official_layout_computes_the_op():
    """The CPU benchmark's eager provider (separate taps, per-stage q/k and parameters, as the official head holds
    them) computes the op and all its gradients: equal to the reference backend on the stacked inputs."""
    common = _bench_module("bench_common_cpu")
    for op in ("nga", "descriptor", "mask_logits"):
        case = common.make_case(op, requires_grad=True)
        inputs, grads = common.official_layout(case, requires_grad=True)
        outs = common.official_fn(case)(*inputs)
        torch.autograd.backward(outs, grads)
        expected = common.provider_fn(op, "reference", case)(*case.inputs)
        expected.backward(case.grad)
        got = outs[0] if op == "mask_logits" else torch.stack(outs)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=op)
        leaf_grads = [t.grad for t in inputs]
        if op == "nga":
            S, K = case.inputs[1].shape
            regrouped = [torch.stack(leaf_grads[:S * K]).view(case.inputs[0].shape), torch.stack(leaf_grads[S * K:])]
        elif op == "descriptor":
            S = case.inputs[2].shape[0]
            regrouped = leaf_grads[:2] + [torch.stack(leaf_grads[2:2 + S]), torch.stack(leaf_grads[2 + S:])]
        else:
            S = case.inputs[0].shape[0]
            regrouped = [torch.stack(leaf_grads[:S]), torch.stack(leaf_grads[S:])]
        for got_grad, stacked in zip(regrouped, case.inputs):
            torch.testing.assert_close(got_grad, stacked.grad, rtol=1e-4, atol=1e-4, msg=op)


_RESIDENT_PROBE = """
import json, sys
sys.path.insert(0, {bench!r})
import torch
from bench_cpu import peak_resident_mb
import bench_common_cpu as common

MIB = 2**20 // 4  # float32 elements per MiB

def one_block():
    x = torch.ones(64 * MIB); del x

def one_after_another():  # freed before the next: the peak is one block, not two
    a = torch.ones(32 * MIB); del a
    b = torch.ones(16 * MIB); c = torch.ones(16 * MIB); del b, c
    d = torch.ones(32 * MIB); del d

def nothing():
    pass

for _ in range(2):  # free blocks of every size behind, as earlier benchmark steps leave them
    one_block(); one_after_another()
step = common.make_step("nga", "cpp", "fwd+bwd")
step(); step()
step.clear_grads()
feats = common.make_case("nga").inputs[0]
print(json.dumps(dict(one_block=peak_resident_mb(one_block), one_after_another=peak_resident_mb(one_after_another),
                      nothing=peak_resident_mb(nothing), nga_step=peak_resident_mb(step),
                      nga_tap_grads=feats.numel() * 4 / 2**20)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_bench_resident_peak_is_the_peak_of_live_memory():
    """bench_cpu's resident-memory pass, in a process started as its memory pass is: a step's peak of live tensors
    (one block freed before the next counts once), nothing for an empty step, and a backward step's gradients."""
    bench_cpu = _bench_module("bench_cpu")
    env = dict(os.environ, **bench_cpu.PRIVATE_MAPPINGS_ENV)
    probe = _RESIDENT_PROBE.format(bench=os.path.join(ROOT, "bench"))
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    # resolution about 0.5 MiB: pages the interpreter itself frees or touches during a step count too
    assert 63.5 <= got["one_block"] < 65.5
    assert 31.5 <= got["one_after_another"] < 33.5
    assert abs(got["nothing"]) < 0.5
    # the returned gradient of the taps (24 MiB) and the output-sized buffers the backward needs
    assert got["nga_tap_grads"] - 0.5 <= got["nga_step"] < got["nga_tap_grads"] + 16


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the resident peak reads /proc/self/status")
def test_cpu_bench_memory_pass_fills_both_columns(tmp_path):
    """bench_cpu end to end on the cheapest op: every row gets both peak-memory columns from its child process."""
    out = tmp_path / "cpu.csv"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_cpu.py"), "--ops", "descriptor", "--modes",
                    "fwd+bwd", "--providers", "reference,cpp", "--min-run-time", "0.05", "--rounds", "1", "--out",
                    str(out)], capture_output=True, text=True, check=True)
    rows = list(csv.DictReader(open(out)))
    assert [r["provider"] for r in rows] == ["reference", "cpp"]
    for r in rows:  # the gradients of weight (S, e, 2d) alone are 6 MiB
        assert float(r["peak_mem_mb"]) >= 6 and float(r["peak_rss_mb"]) >= 6, r


def test_cpu_bench_memory_pass_failure_keeps_the_timing_rows(capsys):
    """A memory pass that dies (here on an unknown op) is reported, and the cases it did not measure get no memory
    figures instead of the run losing its timing rows."""
    bench_cpu = _bench_module("bench_cpu")
    assert bench_cpu.measure_memory([["no-such-op", "cpp", "fwd"]]) == {}
    assert "warning: the memory pass failed" in capsys.readouterr().err
