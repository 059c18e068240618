"""Parity of the ``"triton"`` backend against the ``"reference"`` backend: outputs and every gradient.

On a CPU-only machine the kernels run under Triton's interpreter (``tests/conftest.py`` sets ``TRITON_INTERPRET=1``)
at small, deliberately awkward shapes (odd, prime, 1). The interpreter computes bf16 ``tl.dot`` wrongly, so the bf16
cases of the two matmul ops are ``gpu``-marked; NGA has no dot and runs bf16 everywhere. With a GPU the ``gpu`` tests
add the real shapes (N up to 4096, d = 512, C up to 171).

The reference backend computes in float32 from the same (possibly low-precision) inputs, so the kernel's error is its
own rounding: the intermediate casts to the input dtype before ``tl.dot`` and the final store.
"""

from __future__ import annotations

import pytest
import torch

from cascade_clip import ops

triton = pytest.importorskip("triton")

# Tolerance table, per dtype: (atol, rtol). The atol is relative to the reference tensor's largest magnitude
# (``atol * max(1, max|ref|)``) so that long float32 reductions are judged at their own scale.
#   float32: Liger's 1e-5/1e-5 (fp32 accumulation everywhere; fp32 dots use IEEE, not TF32).
#   float16: 5e-3 = 5 ulps at fp16's 2^-10 epsilon (operand casts before tl.dot plus the final store).
#   bfloat16: Liger's 2e-2 (bf16 epsilon 2^-7, a few roundings).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (2e-2, 2e-2),
}

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu

# Tests of the matmul ops in bf16 need a GPU (interpreter bf16 tl.dot is wrong).
DOT_DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=gpu),
]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _assert_close(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all() or not torch.isfinite(e).all(), f"{name}: non-finite values in the kernel output"
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err = (a - e).abs()
    bound = atol * scale + rtol * e.abs()
    if not bool((err <= bound).all()):
        worst = int((err - bound).argmax())
        raise AssertionError(
            f"{name} ({dtype}): {int((err > bound).sum())}/{err.numel()} elements out of tolerance "
            f"(atol={atol}*{scale:.3g}, rtol={rtol}); max abs err {err.max().item():.3e}, "
            f"worst at flat index {worst}: got {a.flatten()[worst].item():.6g}, want {e.flatten()[worst].item():.6g}"
        )


def _leaves(tensors):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _check_parity(fn, inputs, dtype, names, grad_mode="random"):
    """Run ``fn(*inputs, backend=...)`` on both backends; compare the output and the gradient of every input.

    ``grad_mode="random"`` backpropagates a random cotangent; ``"sum"`` uses ``y.sum().backward()``, whose gradient
    reaches the op as an expanded stride-0 tensor.
    """
    ref_in, tri_in = _leaves(inputs), _leaves(inputs)
    y_ref = fn(*ref_in, backend="reference")
    y_tri = fn(*tri_in, backend="triton")
    _assert_close("output", y_tri, y_ref, dtype)
    if grad_mode == "sum":
        y_ref.float().sum().backward()
        y_tri.float().sum().backward()
    else:
        cot = torch.randn(y_ref.shape, device=y_ref.device, dtype=torch.float32).to(y_ref.dtype)
        y_ref.backward(cot)
        y_tri.backward(cot)
    for name, r, t in zip(names, ref_in, tri_in):
        if r.grad is None:
            assert t.grad is None, f"d{name}: reference has no gradient but triton does"
            continue
        assert t.grad is not None, f"d{name}: missing gradient"
        _assert_close(f"d{name}", t.grad, r.grad, dtype)


def _randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_backend_registered():
    assert "triton" in ops.available_backends(), ops.unavailable_reason("triton")
    from cascade_clip.ops.registry import resolve

    assert resolve("auto", torch.device("cpu")).name != "triton"  # auto routes only CUDA tensors to Triton
    if HAS_CUDA:
        assert resolve("auto", torch.device("cuda")).name == "triton"


# ---------------------------------------------------------------- NGA

NGA_SHAPES = [(3, 3, 2, 7, 13), (1, 1, 1, 1, 1), (2, 5, 1, 17, 31)]  # (S, K, B, N, D)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", NGA_SHAPES)
def test_nga_parity(shape, dtype):
    feats = _randn(*shape, dtype=dtype)
    weights = torch.rand(shape[:2], device=DEVICE)
    _check_parity(ops.nga, [feats, weights], dtype, ["feats", "weights"])


def test_nga_noncontiguous_and_stride0_grad():
    S, K, B, N, D = 2, 3, 2, 11, 9
    base = _randn(S, K, B, D, N)
    feats = base.transpose(3, 4)  # (S, K, B, N, D) view, not contiguous
    weights = torch.rand(K, S, device=DEVICE).t()  # (S, K), transposed view
    assert not feats.is_contiguous() and not weights.is_contiguous()
    _check_parity(ops.nga, [feats, weights], torch.float32, ["feats", "weights"], grad_mode="sum")


# ---------------------------------------------------------------- descriptor

DESC_SHAPES = [(5, 24, 2, 3, 19), (1, 16, 1, 1, 16), (7, 33, 3, 2, 17)]  # (C, d, B, S, e)


def _descriptor_inputs(C, d, B, S, e, dtype):
    return [
        _randn(C, d, dtype=dtype),
        _randn(B, d, dtype=dtype),
        _randn(S, e, 2 * d, dtype=dtype, scale=d**-0.5),
        _randn(S, e, dtype=dtype),
    ]


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("shape", DESC_SHAPES)
def test_descriptor_parity(shape, dtype):
    _check_parity(ops.descriptor, _descriptor_inputs(*shape, dtype), dtype, ["text", "g", "weight", "bias"])


def test_descriptor_of_zero_width_is_the_bias():
    """d = 0: the output is the bias alone, broadcast, and the bias still gets its gradient (summed over b, c)."""
    inputs = [_randn(3, 0), _randn(2, 0), _randn(2, 5, 0), _randn(2, 5)]  # text, g, weight, bias
    _check_parity(ops.descriptor, inputs, torch.float32, ["text", "g", "weight", "bias"])


def test_descriptor_noncontiguous_and_stride0_grad():
    C, d, B, S, e = 6, 20, 3, 2, 13
    text = _randn(d, C).t()
    g = _randn(d, B).t()
    weight = _randn(S, 2 * d, e, scale=d**-0.5).transpose(1, 2)
    bias = _randn(e, S).t()
    assert not any(t.is_contiguous() for t in (text, g, weight, bias))
    _check_parity(ops.descriptor, [text, g, weight, bias], torch.float32, ["text", "g", "weight", "bias"], "sum")


@pytest.mark.parametrize("groups", [1, 2, 3])
def test_descriptor_image_groups(monkeypatch, groups):
    """Images split into 1-3 groups of programs (3, 2 + 1 and 1 images per program; the launcher picks the split from
    the tile count at real sizes, forced here): same results."""
    from cascade_clip.kernels import descriptor as desc_mod

    monkeypatch.setattr(desc_mod, "_image_groups", lambda tiles, B, requested=0: groups)
    _check_parity(ops.descriptor, _descriptor_inputs(7, 33, 3, 2, 17, torch.float32), torch.float32,
                  ["text", "g", "weight", "bias"])


def _every_gpu_config():
    """(kernel module, kernel name, config) for every autotune candidate of every autotuned kernel."""
    import importlib

    from cascade_clip.kernels import launch

    ops.available_backends()  # imports the kernel modules, which registers their candidates
    assert launch.AUTOTUNE_CANDIDATES, "no autotuned kernel registered its candidates"
    return [
        pytest.param(importlib.import_module(module), name, cfg, id=f"{name}-{i}")
        for (module, name), cfgs in launch.AUTOTUNE_CANDIDATES.items() for i, cfg in enumerate(cfgs)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=gpu)])
@pytest.mark.parametrize("module,kernel,config", _every_gpu_config())
def test_every_autotune_config_is_correct(monkeypatch, module, kernel, config, dtype):
    """The interpreter autotunes nothing (it runs each kernel's first config), so each GPU candidate is forced here,
    at shapes with several and partial tiles, and checked against the reference like the tuned kernel (float32
    everywhere; bf16, whose dots the interpreter gets wrong, on a GPU)."""
    tuner = getattr(module, kernel)
    monkeypatch.setattr(tuner, "configs", [config])  # one config: the autotuner runs it without benchmarking
    monkeypatch.setattr(tuner, "cache", {})
    if kernel.startswith("_descriptor"):
        inputs = _descriptor_inputs(150, 40, 3, 2, 70, dtype)  # C=150 spans two 128-row class tiles
        _check_parity(ops.descriptor, inputs, dtype, ["text", "g", "weight", "bias"])
    else:
        for normalize in (False, True):
            q, k = _randn(2, 2, 37, 40, dtype=dtype), _randn(2, 2, 133, 40, dtype=dtype)
            _check_parity(_mask_fn(normalize), [q, k, torch.rand(2, device=DEVICE)], dtype, ["q", "k", "scale"])


def test_descriptor_mixed_dtypes():
    """float32 parameters with a half-precision image embedding: computed in float32, returned in g's dtype."""
    C, d, B, S, e = 5, 24, 2, 2, 17
    text, _, weight, bias = _descriptor_inputs(C, d, B, S, e, torch.float32)
    g = _randn(B, d, dtype=torch.float16)
    ref_in, tri_in = _leaves([text, g, weight, bias]), _leaves([text, g, weight, bias])
    y_ref = ops.descriptor(*ref_in, backend="reference")
    y_tri = ops.descriptor(*tri_in, backend="triton")
    _assert_close("output", y_tri, y_ref, torch.float16)
    y_ref.float().sum().backward()
    y_tri.float().sum().backward()
    for name, r, t in zip(["text", "g", "weight", "bias"], ref_in, tri_in):
        _assert_close(f"d{name}", t.grad, r.grad, torch.float16 if t.dtype == torch.float16 else torch.float32)


# ---------------------------------------------------------------- mask logits

ML_SHAPES = [(3, 2, 5, 37, 24), (1, 1, 1, 1, 16), (2, 1, 3, 53, 40)]  # (S, B, C, N, d)


def _mask_fn(normalize, scale_is_float=False):
    def fn(q, k, scale, backend):
        s = float(scale[0].detach()) if scale_is_float else scale
        return ops.mask_logits(q, k, s, normalize=normalize, backend=backend)

    return fn


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("shape", ML_SHAPES)
def test_mask_logits_parity(shape, dtype, normalize):
    S, B, C, N, d = shape
    q, k = _randn(S, B, C, d, dtype=dtype), _randn(S, B, N, d, dtype=dtype)
    scale = torch.rand(S, device=DEVICE) + 0.1  # (S,) tensor with a gradient
    if not normalize:
        q, k = q * d**-0.25, k * d**-0.25
    _check_parity(_mask_fn(normalize), [q, k, scale], dtype, ["q", "k", "scale"])


@pytest.mark.parametrize("normalize", [False, True])
def test_mask_logits_float_scale_noncontiguous_stride0(normalize):
    S, B, C, N, d = 2, 2, 3, 19, 20
    q = _randn(S, B, d, C).transpose(2, 3)
    k = _randn(S, N, B, d).transpose(1, 2)
    assert not q.is_contiguous() and not k.is_contiguous()
    scale = torch.full((S,), 0.37, device=DEVICE)
    _check_parity(_mask_fn(normalize, scale_is_float=True), [q, k, scale], torch.float32, ["q", "k", "scale"], "sum")


def test_mask_logits_zero_rows_normalize():
    """A zero row sits below F.normalize's clamp: forward 0, backward linear (no projection term)."""
    S, B, C, N, d = 2, 1, 4, 17, 16
    q, k = _randn(S, B, C, d), _randn(S, B, N, d)
    q[0, 0, 1] = 0.0
    k[1, 0, 5] = 0.0
    scale = torch.rand(S, device=DEVICE)
    _check_parity(_mask_fn(True), [q, k, scale], torch.float32, ["q", "k", "scale"])


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_mask_logits_zero_rows_normalize_low_precision(dtype):
    """In fp16/bf16 a zero row's own gradient is inf (grad / eps) in every backend, but it must not spill over: the
    other rows' gradients and the scale gradient stay finite and match the reference (the kernels once folded
    1/|k| into the fp16 gradient tile, where it overflowed and turned every row of the slice into NaN)."""
    S, B, C, N, d = 1, 1, 4, 17, 16
    q, k = _randn(S, B, C, d, dtype=dtype), _randn(S, B, N, d, dtype=dtype)
    q[0, 0, 1] = 0.0
    k[0, 0, 5] = 0.0
    scale = torch.rand(S, device=DEVICE) + 0.1
    ref_in, tri_in = _leaves([q, k, scale]), _leaves([q, k, scale])
    cot = torch.randn(B, C, N, device=DEVICE).to(dtype)
    for inputs, backend in ((ref_in, "reference"), (tri_in, "triton")):
        ops.mask_logits(*inputs, normalize=True, backend=backend).backward(cot)
    keep_q = [c for c in range(C) if c != 1]
    keep_k = [n for n in range(N) if n != 5]
    _assert_close("dq (nonzero rows)", tri_in[0].grad[:, :, keep_q], ref_in[0].grad[:, :, keep_q], dtype)
    _assert_close("dk (nonzero rows)", tri_in[1].grad[:, :, keep_k], ref_in[1].grad[:, :, keep_k], dtype)
    _assert_close("dscale", tri_in[2].grad, ref_in[2].grad, dtype)
    assert torch.isfinite(tri_in[0].grad[:, :, keep_q]).all() and torch.isfinite(tri_in[1].grad[:, :, keep_k]).all()


# ---------------------------------------------------------------- torch.library and torch.compile


def test_opcheck_nga():
    from cascade_clip.kernels.nga import nga_op

    feats = _randn(2, 3, 1, 5, 7).requires_grad_()
    weights = torch.rand(2, 3, device=DEVICE).requires_grad_()
    torch.library.opcheck(nga_op, (feats, weights))


def test_opcheck_descriptor():
    from cascade_clip.kernels.descriptor import descriptor_op

    args = [t.requires_grad_() for t in _descriptor_inputs(3, 16, 2, 2, 17, torch.float32)]
    torch.library.opcheck(descriptor_op, tuple(args))


@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck_mask_logits(normalize):
    from cascade_clip.kernels.mask_logits import mask_logits_op

    q = _randn(2, 1, 3, 16).requires_grad_()
    k = _randn(2, 1, 7, 16).requires_grad_()
    scale = torch.rand(2, device=DEVICE).requires_grad_()
    torch.library.opcheck(mask_logits_op, (q, k, scale, normalize))


@pytest.mark.parametrize("op", ["nga", "descriptor", "mask_logits"])
def test_eager_path_equals_custom_op(op):
    """In eager mode the backend calls an autograd.Function (no custom-op dispatch); under torch.compile it calls the
    custom op. Both run the same launchers: outputs and every gradient are bitwise equal."""
    from cascade_clip.kernels import descriptor as descriptor_mod, mask_logits as mask_mod, nga as nga_mod

    if op == "nga":
        inputs, eager, custom = [_randn(2, 3, 1, 5, 7), torch.rand(2, 3, device=DEVICE)], nga_mod.nga, nga_mod.nga_op
    elif op == "descriptor":
        inputs = _descriptor_inputs(3, 16, 2, 2, 17, torch.float32)
        eager, custom = descriptor_mod.descriptor, descriptor_mod.descriptor_op
    else:
        inputs = [_randn(2, 1, 3, 16), _randn(2, 1, 7, 16), torch.rand(2, device=DEVICE)]
        eager = lambda q, k, s: mask_mod.mask_logits(q, k, s, True)  # noqa: E731
        custom = lambda q, k, s: mask_mod.mask_logits_op(q, k, s, True)  # noqa: E731
    a, b = _leaves(inputs), _leaves(inputs)
    ya, yb = eager(*a), custom(*b)
    assert torch.equal(ya, yb)
    cot = torch.randn_like(ya)
    ya.backward(cot)
    yb.backward(cot)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x.grad, y.grad), f"{op}: gradient {i} differs between the eager path and the custom op"


def test_first_use_inside_compile_is_named():
    """A backend whose first use is inside torch.compile(fullgraph=True) cannot load there (a lock, an import): the
    error says what to do. A fresh process, so that no earlier test has loaded the backend."""
    import subprocess
    import sys

    code = (  # CUDA tensors where there is a GPU (the compiled kernels take no CPU tensors outside the interpreter)
        "import torch\n"
        "from cascade_clip import ops\n"
        f"dev = '{DEVICE}'\n"
        "f = torch.compile(lambda x: ops.nga(x, torch.ones(x.shape[:2], device=x.device), backend='triton'),"
        " fullgraph=True, backend='eager')\n"
        "try:\n    f(torch.randn(2, 3, 1, 4, 16, device=dev))\nexcept Exception as e:\n    print(e)\n"
        "ops.available_backends()\n"
        "print('after loading:', tuple(f(torch.randn(2, 3, 1, 4, 16, device=dev)).shape))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "first used inside torch.compile" in proc.stdout and "available_backends()" in proc.stdout, proc.stderr[-2000:]
    assert "after loading: (2, 1, 4, 16)" in proc.stdout, proc.stderr[-2000:]


def test_compile_fullgraph():
    """The three ops inside one compiled function, forward and backward, with no graph break."""
    torch._dynamo.reset()
    ops.available_backends()  # backends load outside the traced code (test_first_use_inside_compile_is_named)

    def head(feats, weights, text, g, weight, bias, k, scale):
        fused = ops.nga(feats, weights, backend="triton")  # (S, B, N, D)
        q = ops.descriptor(text, g, weight, bias, backend="triton")  # (S, B, C, e)
        return ops.mask_logits(q, k + fused, scale, normalize=True, backend="triton")

    S, K, B, N, D, C = 2, 3, 1, 9, 16, 5
    inputs = [
        _randn(S, K, B, N, D), torch.rand(S, K, device=DEVICE),
        *_descriptor_inputs(C, 16, B, S, D, torch.float32),
        _randn(S, B, N, D), torch.rand(S, device=DEVICE),
    ]
    eager_in, comp_in = _leaves(inputs), _leaves(inputs)
    seen_ops = set()

    def recording_backend(gm, example_inputs):  # dynamo must see the three custom ops, not trace into launchers
        seen_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(head, fullgraph=True, backend=recording_backend)
    y_c = compiled(*comp_in)
    for name in ("nga", "descriptor", "mask_logits"):
        assert f"cascade_clip_triton.{name}.default" in seen_ops, (name, sorted(seen_ops))
    y_e = head(*eager_in)
    _assert_close("compiled output", y_c, y_e, torch.float32)
    y_c.sum().backward()
    y_e.sum().backward()
    for i, (e, c) in enumerate(zip(eager_in, comp_in)):
        _assert_close(f"compiled grad {i}", c.grad, e.grad, torch.float32)


# ---------------------------------------------------------------- real shapes (GPU only)

@gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,N", [(1, 1024), (2, 4096)])
def test_nga_parity_real(B, N, dtype):
    feats = _randn(3, 3, B, N, 512, dtype=dtype)
    weights = torch.rand(3, 3, device=DEVICE)
    _check_parity(ops.nga, [feats, weights], dtype, ["feats", "weights"])


@gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("C,B", [(15, 4), (171, 8), (59, 1)])
def test_descriptor_parity_real(C, B, dtype):
    _check_parity(ops.descriptor, _descriptor_inputs(C, 512, B, 3, 512, dtype), dtype, ["text", "g", "weight", "bias"])


@gpu
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("B,C,N", [(2, 171, 1024), (1, 20, 4096), (1, 1, 4099)])
def test_mask_logits_parity_real(B, C, N, dtype, normalize):
    S, d = 3, 512
    q, k = _randn(S, B, C, d, dtype=dtype), _randn(S, B, N, d, dtype=dtype)
    if not normalize:
        q, k = q * d**-0.25, k * d**-0.25
    scale = torch.rand(S, device=DEVICE) + 0.1
    _check_parity(_mask_fn(normalize), [q, k, scale], dtype, ["q", "k", "scale"])


# Bitwise determinism of every op at real shapes (GPU only: the interpreter runs one program at a time, so even a
# reduction by atomics would repeat itself there). (S, K, B, N, D) for NGA, (C, d, B, S, e) for the descriptor,
# (S, B, C, N, d) for the mask logits, (B, C, H, W) for the loss sums: N = 1024 is the 512 crop's 32 x 32 grid, C = 171
# COCO-Stuff's classes.
DETERMINISM_SHAPES = {
    "nga": (3, 3, 2, 1024, 512),
    "descriptor": (171, 512, 8, 3, 512),
    "mask_logits": (3, 2, 171, 1024, 512),
    "loss_sums": (2, 171, 512, 512),
}
DETERMINISM_OPS = ["nga", "descriptor", "mask_logits_raw", "mask_logits_cosine", "loss_sums", "loss_sums_ignore_pixels"]


def _determinism_case(op, dtype):
    """(input names, fn(*inputs, backend=...), inputs) of one op at DETERMINISM_SHAPES."""
    if op == "nga":
        shape = DETERMINISM_SHAPES["nga"]
        return ["feats", "weights"], ops.nga, [_randn(*shape, dtype=dtype), torch.rand(shape[:2], device=DEVICE)]
    if op == "descriptor":
        return ["text", "g", "weight", "bias"], ops.descriptor, _descriptor_inputs(*DETERMINISM_SHAPES[op], dtype)
    if op.startswith("mask_logits"):
        S, B, C, N, d = DETERMINISM_SHAPES["mask_logits"]
        q, k = _randn(S, B, C, d, dtype=dtype, scale=d**-0.25), _randn(S, B, N, d, dtype=dtype, scale=d**-0.25)
        return ["q", "k", "scale"], _mask_fn(op == "mask_logits_cosine"), [q, k, torch.rand(S, device=DEVICE) + 0.1]
    B, C, H, W = DETERMINISM_SHAPES["loss_sums"]
    labels = torch.randint(0, C, (B, H, W), device=DEVICE)
    labels[torch.rand(B, H, W, device=DEVICE) < 0.2] = 255
    ignore = op == "loss_sums_ignore_pixels"

    def fn(logits, labels, backend):
        return ops.loss_sums(logits, labels, ignore_pixels=ignore, backend=backend)

    return ["logits", "labels"], fn, [_randn(B, C, H, W, dtype=dtype, scale=3.0), labels]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (torch.equal on floats would take -0.0 for 0.0 and fail on equal NaNs)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]) if t.is_floating_point() else t


def _check_bitwise_determinism(op, dtype, repeats=3):
    names, fn, inputs = _determinism_case(op, dtype)
    runs = []
    cot = None
    for _ in range(repeats):  # fresh leaves each time: new buffers, the same values
        leaves = _leaves(inputs)
        y = fn(*leaves, backend="triton")
        if cot is None:
            cot = torch.randn(y.shape, device=y.device).to(y.dtype)
        y.backward(cot)
        runs.append((y.detach(), {n: x.grad for n, x in zip(names, leaves) if x.is_floating_point()}))
    first_y, first_grads = runs[0]
    assert first_grads and all(g is not None for g in first_grads.values()), f"{op}: missing gradients {first_grads}"
    for i, (y, grads) in enumerate(runs[1:], start=2):
        assert torch.equal(_bits(y), _bits(first_y)), f"{op} ({dtype}): output of run {i} differs bitwise from run 1"
        for name, g in grads.items():
            assert torch.equal(_bits(g), _bits(first_grads[name])), (
                f"{op} ({dtype}): d{name} of run {i} differs bitwise from run 1 (max abs diff "
                f"{(g.double() - first_grads[name].double()).abs().max().item():.3e})")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", DETERMINISM_OPS)
def test_every_op_is_bitwise_deterministic(op, dtype):
    """Forward and every gradient, three runs: bitwise equal (README: the fused reductions use no atomics)."""
    _check_bitwise_determinism(op, dtype)


def _compiled_against_eager(q, k, scale, dtype):
    """Cosine mask logits compiled (fullgraph) and eager on separate leaves: the output against the eager triton run
    and the reference, every gradient against the eager triton run, at ``dtype``'s tolerance."""
    torch._dynamo.reset()
    ops.available_backends()

    def fn(q, k, scale):
        return ops.mask_logits(q, k, scale, normalize=True, backend="triton")

    comp_in, eager_in = _leaves([q, k, scale]), _leaves([q, k, scale])
    y_c = torch.compile(fn, fullgraph=True)(*comp_in)
    y_e = fn(*eager_in)
    _assert_close("compiled output", y_c, y_e, dtype)
    _assert_close("compiled output vs reference", y_c, ops.mask_logits(q, k, scale, normalize=True,
                                                                        backend="reference"), dtype)
    cot = torch.randn(y_e.shape, device=y_e.device).to(y_e.dtype)
    y_c.backward(cot)
    y_e.backward(cot)
    for name, c, e in zip(["q", "k", "scale"], comp_in, eager_in):
        assert c.grad is not None and e.grad is not None, f"d{name}: missing gradient"
        _assert_close(f"compiled d{name}", c.grad, e.grad, dtype)


@gpu
def test_compile_fullgraph_real_bf16():
    q = _randn(3, 2, 171, 512, dtype=torch.bfloat16)
    k = _randn(3, 2, 1024, 512, dtype=torch.bfloat16)
    _compiled_against_eager(q, k, torch.full((3,), 0.1, device=DEVICE), torch.bfloat16)


# ---------------------------------------------------------------- benchmark plumbing (CPU side)

@pytest.mark.skipif(HAS_CUDA, reason="the dry run is the CPU stand-in; with a GPU, gpu_check.sh runs the real benchmark")
def test_bench_script_dry_run(tmp_path):
    """bench/bench_gpu.py --dry-run (interpreter, tiny shapes) appends CSV rows; render_results reads them back."""
    import csv
    import importlib.util
    import os

    bench_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench")

    def load(name):
        spec = importlib.util.spec_from_file_location(name, os.path.join(bench_dir, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    bench, render = load("bench_gpu"), load("render_results")
    out = tmp_path / "out"
    argv = ["--dry-run", "--out", str(out), "--ops", "nga,mask_logits", "--modes", "fwd"]
    assert bench.main(argv) == 0
    assert bench.main(argv) == 0  # a second run appends, never rewrites
    with open(out / "results_gpu.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2  # 2 runs x 2 ops x (eager, triton)
    assert {r["provider"] for r in rows} == {"eager", "triton"} and all(float(r["p50_ms"]) > 0 for r in rows)
    md = tmp_path / "table.md"
    assert render.main([str(out / "results_gpu.csv"), "--md", str(md)]) == 0
    assert "| nga |" in md.read_text()
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", str(out), "--dtypes", "fp8"])
