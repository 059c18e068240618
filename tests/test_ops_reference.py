"""The ops layer: the reference backend against hand-computed examples, float64 gradcheck, the backend switch, errors."""

import os
import subprocess
import sys

import pytest
import torch

from cascade_clip import ops

torch.manual_seed(0)


def test_nga_hand_example():
    feats = torch.tensor([[[[[1.0, 2.0]]], [[[3.0, 4.0]]]]])  # (S=1, K=2, B=1, N=1, D=2)
    weights = torch.tensor([[0.5, 2.0]])
    out = ops.nga(feats, weights, backend="reference")
    torch.testing.assert_close(out, torch.tensor([[[[6.5, 9.0]]]]))  # 0.5*[1,2] + 2*[3,4]


def test_nga_accumulates_in_float32_and_returns_input_dtype():
    # In bf16 (spacing 2 at 256), summing 256 + 1 + 1 step by step rounds back to 256 twice; float32 accumulation
    # gives 258, which bf16 holds exactly.
    feats = torch.tensor([256.0, 1.0, 1.0], dtype=torch.bfloat16).view(1, 3, 1, 1, 1)
    out = ops.nga(feats, torch.ones(1, 3), backend="reference")
    assert out.dtype == torch.bfloat16
    assert out.item() == 258.0


def test_descriptor_hand_example():
    text = torch.tensor([[1.0, 2.0]])  # C=1, d=2
    g = torch.tensor([[3.0, 0.5]])  # B=1
    weight = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0]]])  # S=1, e=2, 2d=4
    bias = torch.tensor([[0.0, 10.0]])
    # r = [t*g, t] = [3, 1, 1, 2] -> [3, 1+1+2+10]
    out = ops.descriptor(text, g, weight, bias, backend="reference")
    torch.testing.assert_close(out, torch.tensor([[[[3.0, 14.0]]]]))


def test_mask_logits_hand_example():
    q = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 2.0]]]])  # S=2, B=1, C=1, d=2
    k = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 1.0]]]])  # N=1
    out = ops.mask_logits(q, k, torch.tensor([1.0, 0.5]), backend="reference")
    torch.testing.assert_close(out, torch.tensor([[[1.0 * 3.0 + 0.5 * 2.0]]]))
    cos = ops.mask_logits(q, k, 2.0, normalize=True, backend="reference")
    expected = 2.0 * (3.0 / 5.0) + 2.0 * (2.0 / (2.0 * 2**0.5))
    torch.testing.assert_close(cos, torch.tensor([[[expected]]]))


def test_head_average_of_per_head_logits_is_one_scaled_product():
    """The decoder's mask logits (mean over heads of q_h k_h^T / sqrt(d_h)) equal mask_logits with one scale."""
    heads, d = 8, 64
    q, k = torch.randn(1, 2, 5, d, dtype=torch.float64), torch.randn(1, 2, 7, d, dtype=torch.float64)
    qh = q[0].unflatten(-1, (heads, d // heads)).transpose(1, 2)
    kh = k[0].unflatten(-1, (heads, d // heads)).transpose(1, 2)
    per_head = (qh @ kh.transpose(-2, -1)) * (d // heads) ** -0.5
    out = ops.mask_logits(q, k, (d // heads) ** -0.5 / heads, backend="reference")
    torch.testing.assert_close(out, per_head.mean(1))


def test_gradcheck_float64():
    feats = torch.randn(2, 3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: ops.nga(f, w, backend="reference"), (feats, weights))

    text = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.descriptor(*a, backend="reference"), (text, g, weight, bias))

    q = torch.randn(3, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, dtype=torch.float64, requires_grad=True)
    for normalize in (False, True):
        assert torch.autograd.gradcheck(
            lambda q, k, s: ops.mask_logits(q, k, s, normalize=normalize, backend="reference"), (q, k, scale)
        )


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.nga(torch.randn(2, 3, 1, 4), torch.randn(2, 3)), r"\(S, K, B, N, D\)"),
        (lambda: ops.nga(torch.randn(2, 3, 1, 4, 5), torch.randn(3, 2)), r"weights must be \(S, K\) = \(2, 3\)"),
        (lambda: ops.nga(torch.ones(2, 3, 1, 4, 5, dtype=torch.long), torch.randn(2, 3)), "floating-point tensor .* got int64"),
        (lambda: ops.descriptor(torch.randn(3, 4), torch.randn(2, 5), torch.randn(1, 2, 8), torch.randn(1, 2)), "g width 5"),
        (lambda: ops.descriptor(torch.randn(3, 4), torch.randn(2, 4), torch.randn(1, 2, 7), torch.randn(1, 2)), "2d = 8"),
        (lambda: ops.descriptor(torch.randn(3, 4), torch.randn(2, 4), torch.randn(1, 2, 8), torch.randn(2)), r"bias must be \(S, e\)"),
        (lambda: ops.mask_logits(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 3), 1.0), "must agree on S, B and d"),
        (lambda: ops.mask_logits(torch.randn(2, 1, 3, 4), torch.randn(2, 1, 5, 4), torch.ones(3)), r"scale must be"),
        (lambda: ops.nga(torch.randn(1, 1, 1, 1, 1), torch.randn(1, 1), backend="nope"), "unknown ops backend 'nope'"),
    ],
)
def test_bad_op_inputs_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_backend_switch():
    assert ops.available_backends()[0] == "reference"
    previous = ops.get_backend()
    try:
        ops.set_backend("reference")
        assert ops.get_backend() == "reference"
        with pytest.raises(ValueError, match="unknown ops backend"):
            ops.set_backend("cuda-magic")
    finally:
        ops.set_backend(previous)


def _small_cases():
    """(op name, fn(*inputs, backend=...), float32 inputs) of every op; labels with ignored pixels for loss_sums."""
    labels = torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    cases = [
        ("nga", ops.nga, [torch.randn(2, 3, 1, 6, 8), torch.rand(2, 3)]),
        ("descriptor", ops.descriptor, [torch.randn(5, 16), torch.randn(2, 16), torch.randn(3, 7, 32) * 0.25,
                                        torch.randn(3, 7)]),
    ]
    for normalize in (False, True):
        cases.append((f"mask_logits(normalize={normalize})",
                      lambda q, k, s, backend, n=normalize: ops.mask_logits(q, k, s, normalize=n, backend=backend),
                      [torch.randn(3, 2, 5, 16) * 0.5, torch.randn(3, 2, 7, 16) * 0.5, torch.rand(3) + 0.1]))
    for ignore in (False, True):
        cases.append((f"loss_sums(ignore_pixels={ignore})",
                      lambda x, y, backend, i=ignore: ops.loss_sums(x, y, ignore_pixels=i, backend=backend),
                      [torch.randn(2, 3, 4, 5) * 3, labels]))
    return cases


def test_every_available_backend_agrees_with_reference_on_a_small_case():
    """All four ops (both modes of mask_logits and loss_sums), outputs and the gradients of every float input, on
    each loaded backend's own device (Triton: CUDA, or the CPU under its interpreter)."""
    backends = [name for name in ops.available_backends() if name != "reference"]
    assert backends, "no backend besides the reference loaded"
    for name in backends:
        device = "cuda" if name == "triton" and torch.cuda.is_available() else "cpu"
        for op, fn, inputs in _small_cases():
            runs = {}
            for backend in ("reference", name):
                leaves = [x.detach().clone().to(device).requires_grad_(x.is_floating_point()) for x in inputs]
                out = fn(*leaves, backend=backend)
                out.backward(torch.linspace(-1, 1, out.numel(), device=device).view(out.shape))
                runs[backend] = out.detach(), [x.grad for x in leaves if x.is_floating_point()]
            (ref_out, ref_grads), (out, grads) = runs["reference"], runs[name]
            torch.testing.assert_close(out, ref_out, msg=lambda m: f"{op} on {name}: output: {m}")
            for i, (g, r) in enumerate(zip(grads, ref_grads)):
                torch.testing.assert_close(g, r, msg=lambda m: f"{op} on {name}: gradient of input {i}: {m}")


def test_environment_variable_sets_the_default():
    code = "import cascade_clip.ops as o; print(o.get_backend())"
    env = {**os.environ, "CASCADE_CLIP_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "reference"
    env["CASCADE_CLIP_BACKEND"] = "bogus"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "auto" and "ignored" in out.stderr


def test_required_backend_that_fails_to_load_stops_the_test_run(tmp_path):
    """`make test` sets CASCADE_CLIP_REQUIRE_BACKENDS: a required backend that does not load, or an unknown name, stops
    pytest at the start with the load error (instead of the backend's tests being skipped). The C++ extension's import
    is blocked by a plugin that runs before tests/conftest.py; only collection is asked for (the check precedes it)."""
    (tmp_path / "block_cpp_extension.py").write_text("import sys\nsys.modules['cascade_clip._C'] = None\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}
    command = [sys.executable, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", "tests/test_ops_reference.py"]

    def run(required, *extra):
        return subprocess.run([*command, *extra], cwd=root, env={**env, "CASCADE_CLIP_REQUIRE_BACKENDS": required},
                              capture_output=True, text=True, timeout=300)

    blocked = run("cpp,cuda-magic", "-p", "block_cpp_extension")
    out = blocked.stdout + blocked.stderr
    assert blocked.returncode == 1, out[-3000:]
    assert "CASCADE_CLIP_REQUIRE_BACKENDS=cpp,cuda-magic" in out and "'cuda-magic' is not an ops backend" in out
    assert "'cpp' did not load" in out and "cascade_clip._C failed to load: import of cascade_clip._C halted" in out
    assert "collected" not in out  # stopped before collecting
    fine = run("reference")
    assert fine.returncode == 0 and "collected" in fine.stdout, fine.stdout[-2000:] + fine.stderr[-2000:]


def test_ops_import_stays_light():
    code = "import sys, cascade_clip.ops, cascade_clip.kernels; print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ops.nga(torch.randn(1, 2, 1, 2, 3).to(torch.float8_e4m3fn), torch.rand(1, 2)),
         r"feats must be a floating-point tensor \(float16, bfloat16, float32, float64\), got float8_e4m3fn"),
        (lambda: ops.mask_logits(torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3), torch.ones(1, dtype=torch.complex64)),
         "scale must be a floating-point tensor"),
        (lambda: ops.loss_sums(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.uint16)),
         r"labels must be an integer tensor \(uint8, int8, int16, int32, int64\), got uint16"),
        (lambda: ops.loss_sums(torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)), "got bool"),
    ],
)
def test_unsupported_dtypes_are_named(call, match):
    """Every backend is refused the same dtypes, at the front (the Triton kernels once computed float8 silently)."""
    with pytest.raises(ValueError, match=match):
        call()


def test_reference_runs_on_meta_tensors():
    """Shape propagation on the meta device (the autocast query once raised for it)."""
    out = ops.nga(torch.empty(2, 3, 1, 4, 5, device="meta"), torch.empty(2, 3, device="meta"), backend="reference")
    assert out.device.type == "meta" and out.shape == (2, 1, 4, 5)
    out = ops.descriptor(*(torch.empty(s, device="meta") for s in [(3, 4), (2, 4), (1, 5, 8), (1, 5)]),
                         backend="reference")
    assert out.shape == (1, 2, 3, 5)


def test_auto_sends_a_dtype_its_backend_lacks_to_the_reference(monkeypatch):
    """"auto" picks the device's fused backend, but float64 on CUDA (Triton has no float64 kernels) goes to the
    reference; an explicit backend that lacks the dtype is a named error. Simulated on the CPU with a fake backend."""
    from cascade_clip.ops import registry

    def refuse(*args):
        raise AssertionError("the fake float32-only backend was called")

    fake = registry.Backend("fake", refuse, refuse, refuse, devices=("cpu",), dtypes=(torch.float32,), loss_sums=refuse)
    monkeypatch.setitem(registry._auto_choice, "cpu", fake)
    monkeypatch.setitem(registry._backends, "fake", fake)
    feats, weights = torch.randn(2, 3, 1, 4, 5, dtype=torch.float64), torch.rand(2, 3, dtype=torch.float64)
    torch.testing.assert_close(ops.nga(feats, weights, backend="auto"), ops.nga(feats, weights, backend="reference"))
    with pytest.raises(AssertionError, match="fake float32-only backend was called"):
        ops.nga(feats.float(), weights.float(), backend="auto")
    with pytest.raises(ValueError, match="'fake' ops backend computes float32, not float64"):
        registry.resolve("fake", torch.device("cpu"), (torch.float64,))
    if "triton" in ops.available_backends():
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # CPU tensors reach triton only under the interpreter
        with pytest.raises(ValueError, match="'triton' ops backend computes float16, bfloat16, float32, not float64"):
            ops.nga(feats.to(dev), weights.to(dev), backend="triton")
        # only the tensors that set the computation count: float64 weights, bias or scale are read as they are
        out = ops.nga(feats.float().to(dev), weights.to(dev), backend="triton")
        torch.testing.assert_close(out.cpu(), ops.nga(feats.float(), weights, backend="reference"))
        q, k = torch.randn(2, 1, 3, 8, device=dev), torch.randn(2, 1, 5, 8, device=dev)
        scale = torch.tensor([0.5, 2.0], dtype=torch.float64, device=dev)
        torch.testing.assert_close(ops.mask_logits(q, k, scale, backend="triton").cpu(),
                                   ops.mask_logits(q.cpu(), k.cpu(), scale.cpu(), backend="reference"))


def test_loss_sums_keeps_float64():
    logits, labels = torch.randn(1, 3, 2, 2, dtype=torch.float64), torch.tensor([[[0, 1], [255, 2]]])
    assert ops.loss_sums(logits, labels, backend="reference").dtype == torch.float64
    assert ops.loss_sums(logits.float(), labels, backend="reference").dtype == torch.float32
