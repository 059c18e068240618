"""The ``"cpp"`` backend (C++ extension ``cascade_clip._C``) against the reference backend.

Tolerances, per dtype of the inputs. Errors are measured as ``|cpp - ref| <= rtol * |ref| + atol * max|ref|``, i.e. the
absolute part is relative to the largest magnitude of the compared tensor (1 if that tensor is identically zero), so
one table serves every shape. The
reference is always computed in float32 (it upcasts internally) from the *same* values: for bfloat16/float16 the
low-precision inputs and output gradients are upcast, so the only expected difference is the cpp backend's single
rounding of each result to the low-precision dtype (bf16: 2^-8 relative, fp16: 2^-11) plus float32 reassociation.

    dtype       rtol     atol (x max|ref|)
    float32     1e-5     1e-5
    bfloat16    1.6e-2   1.6e-2
    float16     2e-3     2e-3

float64 is checked with ``torch.autograd.gradcheck`` (the kernels accumulate in double for double inputs).
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from cascade_clip import ops

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _CPP_AVAILABLE = "cpp" in ops.available_backends()
if not _CPP_AVAILABLE:
    pytest.skip(
        f"cpp backend unavailable ({ops.unavailable_reason('cpp')}); build it with "
        "`pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )

from cascade_clip import _cpp_backend  # noqa: E402

TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}
DTYPES = list(TOL)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    rtol, atol = TOL[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item() if expected.numel() else 1.0
    # An identically zero reference (e.g. the q gradient of a cosine with d=1, which is 0 by symmetry) has no scale of
    # its own: use 1, the scale of the unit-variance test inputs, so float rounding of the cancelling terms is allowed.
    scale = scale if scale > 0 else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what} ({dtype}): {m}")


def _leaf(t: torch.Tensor, dtype: torch.dtype, requires_grad: bool = True) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_(requires_grad)


def run_both(fn, inputs, dtypes, grad_seed=1, sum_backward=False, **kwargs):
    """Run ``fn`` with backend cpp on ``inputs`` (cast to ``dtypes``) and reference on float32 copies of the same
    values; backprop the same output gradient. Returns ``(cpp_out, ref_out, cpp_grads, ref_grads)``."""
    cpp_in = [_leaf(x, dt, x.requires_grad) if isinstance(x, torch.Tensor) else x for x, dt in zip(inputs, dtypes)]
    ref_in = [_leaf(x.float(), torch.float32, x.requires_grad) if isinstance(x, torch.Tensor) else x for x in cpp_in]
    out = fn(*cpp_in, backend="cpp", **kwargs)
    ref = fn(*ref_in, backend="reference", **kwargs)
    if sum_backward:
        out.sum().backward()  # the gradient arrives expanded with stride 0
        ref.sum().backward()
    else:
        gen = torch.Generator().manual_seed(grad_seed)
        grad = torch.randn(tuple(out.shape), generator=gen).to(out.dtype)  # representable in out's dtype
        out.backward(grad)
        ref.backward(grad.float())
    cpp_grads = [x.grad for x in cpp_in if isinstance(x, torch.Tensor) and x.requires_grad]
    ref_grads = [x.grad for x in ref_in if isinstance(x, torch.Tensor) and x.requires_grad]
    return out, ref, cpp_grads, ref_grads


def check(fn, inputs, dtypes, names, out_dtype, **kwargs):
    out, ref, cpp_grads, ref_grads = run_both(fn, inputs, dtypes, **kwargs)
    assert out.dtype == out_dtype
    assert_close(out, ref, out_dtype, "output")
    assert len(cpp_grads) == len(ref_grads) == len(names)
    for name, g, r, dt in zip(names, cpp_grads, ref_grads, [d for x, d in zip(inputs, dtypes) if isinstance(x, torch.Tensor) and x.requires_grad]):
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == dt, f"grad of {name} has dtype {g.dtype}, input has {dt}"
        assert_close(g, r, dt, f"grad {name}")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------------------------
# NGA
# ------------------------------------------------------------------------------------------------------------------

NGA_SHAPES = [  # (S, K, B, N, D): K=3 is the model's, K=5 the generic path; M = B*N*D crosses the 2048-element tiles
    (2, 3, 2, 5, 7),
    (1, 1, 1, 1, 1),
    (1, 3, 1, 37, 59),
    (3, 5, 1, 13, 33),
    (2, 2, 3, 11, 97),
    (1, 4, 2, 31, 64),
    (2, 3, 1, 48, 80),  # M % 16 == 0: the AVX-512 streaming backward, where the CPU has it
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", NGA_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_nga_parity(shape, dtype):
    S, K = shape[:2]
    feats = randn(*shape).requires_grad_()
    weights = torch.softmax(randn(S, K, seed=1), dim=1).requires_grad_()
    check(ops.nga, [feats, weights], [dtype, torch.float32], ["feats", "weights"], dtype)


def test_nga_noncontiguous_and_stride0_grad():
    base = randn(2, 3, 2, 9, 13)
    feats = base.transpose(3, 4).detach().requires_grad_()  # (2, 3, 2, 13, 9), not contiguous
    weights_full = randn(3, 5, seed=2)
    weights = weights_full[:2, 1:4].detach().requires_grad_()  # strided slice
    assert not feats.is_contiguous() and not weights.is_contiguous()
    check(ops.nga, [feats, weights], [torch.float32, torch.float32], ["feats", "weights"], torch.float32,
          sum_backward=True)


def test_nga_only_one_input_requires_grad():
    feats, weights = randn(2, 3, 1, 4, 5), randn(2, 3, seed=1)
    for fr, wr in ((True, False), (False, True)):
        f, w = feats.clone().requires_grad_(fr), weights.clone().requires_grad_(wr)
        f2, w2 = feats.clone().requires_grad_(fr), weights.clone().requires_grad_(wr)
        ops.nga(f, w, backend="cpp").sum().backward()
        ops.nga(f2, w2, backend="reference").sum().backward()
        for a, b in ((f, f2), (w, w2)):
            assert (a.grad is None) == (b.grad is None)
            if a.grad is not None:
                assert_close(a.grad, b.grad, torch.float32, "grad")


def test_nga_weight_grad_is_deterministic_across_thread_counts():
    feats = randn(2, 3, 2, 64, 96).requires_grad_()
    weights = randn(2, 3, seed=1).requires_grad_()
    grad = randn(2, 2, 64, 96, seed=2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            _, gw = torch.autograd.grad(ops.nga(feats, weights, backend="cpp"), (feats, weights), grad)
            results.append(gw)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


# ------------------------------------------------------------------------------------------------------------------
# Descriptor
# ------------------------------------------------------------------------------------------------------------------

DESC_SHAPES = [  # (C, d, B, S, e)
    (5, 7, 2, 3, 11),
    (1, 1, 1, 1, 1),
    (3, 9, 1, 2, 4),
    (15, 64, 2, 3, 33),
    (7, 37, 6, 2, 9),  # B=6: image blocks of 4 + 2 in the fused backward; d=37: vector body + tail
    (40, 320, 2, 2, 24),  # text > 48 KiB: the GEMM formulation instead of the fused passes
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", DESC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_descriptor_parity(shape, dtype):
    C, d, B, S, e = shape
    inputs = [randn(C, d), randn(B, d, seed=1), randn(S, e, 2 * d, seed=2) * (2 * d) ** -0.5, randn(S, e, seed=3)]
    inputs = [x.requires_grad_() for x in inputs]
    check(ops.descriptor, inputs, [dtype] * 4, ["text", "g", "weight", "bias"], dtype)


def test_descriptor_mixed_dtypes():
    """Output follows g's dtype; each gradient follows its input's dtype."""
    C, d, B, S, e = 4, 6, 2, 2, 5
    inputs = [randn(C, d), randn(B, d, seed=1), randn(S, e, 2 * d, seed=2), randn(S, e, seed=3)]
    inputs = [x.requires_grad_() for x in inputs]
    out, ref, cpp_grads, ref_grads = run_both(
        ops.descriptor, inputs, [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    )
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "output")
    assert [g.dtype for g in cpp_grads] == [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    # Each gradient at its own dtype's row: the reference backpropagates the same bf16-valued output gradient (upcast),
    # so the float32 gradients (text, weight, bias) differ only by float32 reassociation; only d g is rounded to bf16.
    for name, g, r in zip(["text", "g", "weight", "bias"], cpp_grads, ref_grads):
        assert_close(g, r, g.dtype, f"d{name}")


def test_descriptor_noncontiguous_and_stride0_grad():
    C, d, B, S, e = 5, 7, 3, 2, 6
    text = randn(d, C).t().detach().requires_grad_()
    g = randn(B, 2 * d, seed=1)[:, ::2].detach().requires_grad_()
    weight = randn(S, 2 * d, e, seed=2).transpose(1, 2).detach().requires_grad_()
    bias = randn(e, S, seed=3).t().detach().requires_grad_()
    assert not any(x.is_contiguous() for x in (text, g, weight, bias))
    check(ops.descriptor, [text, g, weight, bias], [torch.float32] * 4, ["text", "g", "weight", "bias"],
          torch.float32, sum_backward=True)


# ------------------------------------------------------------------------------------------------------------------
# Mask logits
# ------------------------------------------------------------------------------------------------------------------

MASK_SHAPES = [  # (S, B, C, N, d)
    (3, 2, 5, 37, 17),
    (1, 1, 1, 1, 1),
    (2, 1, 3, 1, 9),
    (3, 2, 15, 64, 33),
]


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "cosine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_mask_logits_parity(shape, dtype, normalize):
    S, B, C, N, d = shape
    if normalize and d == 1:
        pytest.skip("cosine with d=1: the q/k gradients are exactly 0, see test_mask_logits_cosine_d1")
    q, k = randn(S, B, C, d).requires_grad_(), randn(S, B, N, d, seed=1).requires_grad_()
    scale = (torch.rand(S, generator=torch.Generator().manual_seed(2)) + 0.5).requires_grad_()
    check(ops.mask_logits, [q, k, scale], [dtype, dtype, torch.float32], ["q", "k", "scale"], dtype,
          normalize=normalize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mask_logits_cosine_d1(dtype):
    """With d=1, q_hat = sign(q): the output matches and the q/k gradients are 0 up to float32 rounding of the
    cancelling terms (both backends produce ~1e-8 noise there, so they are compared with 0, not with each other)."""
    q, k = randn(2, 1, 3, 1).requires_grad_(), randn(2, 1, 4, 1, seed=1).requires_grad_()
    scale = torch.tensor([0.5, 1.5], requires_grad=True)
    out, ref, cpp_grads, ref_grads = run_both(ops.mask_logits, [q, k, scale], [dtype, dtype, torch.float32],
                                              normalize=True)
    assert_close(out, ref, dtype, "output")
    assert_close(cpp_grads[2], ref_grads[2], dtype, "grad scale")
    for g, x in zip(cpp_grads[:2], (q, k)):
        # The cancelling terms are ~ |upstream grad| / |x| (upstream grads here are O(1)), each rounded in float32.
        assert g.float().abs().max().item() <= 1e-6 / x.detach().abs().min().item()


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "cosine"])
def test_mask_logits_float_scale_noncontiguous_stride0(normalize):
    S, B, C, N, d = 2, 2, 3, 7, 5
    q = randn(S, B, d, C).transpose(2, 3).detach().requires_grad_()
    k = randn(S, N, B, d, seed=1).transpose(1, 2).detach().requires_grad_()
    assert not q.is_contiguous() and not k.is_contiguous()
    check(ops.mask_logits, [q, k, 0.125], [torch.float32, torch.float32, None], ["q", "k"], torch.float32,
          normalize=normalize, sum_backward=True)


def test_mask_logits_zero_norm_rows():
    """Rows with |x| <= eps follow F.normalize: x / eps, gradient grad / eps (the clamp passes no gradient)."""
    S, B, C, N, d = 2, 1, 3, 4, 6
    q, k = randn(S, B, C, d), randn(S, B, N, d, seed=1)
    q[0, 0, 1] = 0.0
    k[1, 0, 2] = 0.0
    q.requires_grad_()
    k.requires_grad_()
    scale = torch.tensor([0.5, 2.0], requires_grad=True)
    check(ops.mask_logits, [q, k, scale], [torch.float32] * 3, ["q", "k", "scale"], torch.float32, normalize=True)


@pytest.mark.parametrize("normalize", [False, True])
def test_mask_logits_of_zero_width(normalize):
    """d = 0: zero logits (an empty row normalises to zeros), like the reference; gradients of the right shapes."""
    q, k = torch.zeros(2, 1, 3, 0, requires_grad=True), torch.zeros(2, 1, 4, 0, requires_grad=True)
    scale = torch.tensor([0.5, 2.0], requires_grad=True)
    for backend in ("cpp", "reference"):
        out = ops.mask_logits(q, k, scale, normalize=normalize, backend=backend)
        assert out.shape == (1, 3, 4) and torch.equal(out, torch.zeros(1, 3, 4))
        out.backward(torch.ones_like(out))
        assert q.grad.shape == q.shape and k.grad.shape == k.shape and torch.equal(scale.grad, torch.zeros(2))
        q.grad = k.grad = scale.grad = None


# ------------------------------------------------------------------------------------------------------------------
# PyTorch operator contract: opcheck, gradcheck, torch.compile
# ------------------------------------------------------------------------------------------------------------------


def _opcheck_cases():
    S, K, B, N, D = 2, 3, 2, 5, 7
    feats, weights = randn(S, K, B, N, D), randn(S, K, seed=1)
    C, d, e = 4, 6, 5
    text, g, weight, bias = randn(C, d), randn(B, d, seed=1), randn(S, e, 2 * d, seed=2), randn(S, e, seed=3)
    q, k, scale = randn(S, B, C, d), randn(S, B, N, d, seed=1), torch.tensor([0.5, 0.25])
    rk = 1.0 / k.norm(dim=-1).clamp_min(1e-12)
    lib = torch.ops.cascade_clip
    return [
        ("nga", lib.nga, (feats.requires_grad_(), weights.requires_grad_())),
        ("nga_backward", lib.nga_backward, (randn(S, B, N, D), feats.detach(), weights.detach(), [True, True])),
        ("nga_backward_mask", lib.nga_backward, (randn(S, B, N, D), feats.detach(), weights.detach(), [False, True])),
        ("descriptor", lib.descriptor, tuple(x.clone().requires_grad_() for x in (text, g, weight, bias))),
        ("descriptor_backward", lib.descriptor_backward, (randn(S, B, C, e), text, g, weight, bias, [True] * 4)),
        ("mask_logits", lib.mask_logits, (q.clone().requires_grad_(), k.clone().requires_grad_(),
                                          scale.clone().requires_grad_(), False)),
        ("mask_logits_cos", lib.mask_logits, (q.clone().requires_grad_(), k.clone().requires_grad_(),
                                              scale.clone().requires_grad_(), True)),
        ("mask_logits_backward", lib.mask_logits_backward, (randn(B, C, N), q, k, scale, rk, True, [True] * 3)),
    ]


@pytest.mark.parametrize("case", _opcheck_cases(), ids=lambda c: c[0])
def test_opcheck(case):
    _, op, args = case
    torch.library.opcheck(op, args)


def test_gradcheck_float64():
    kw = dict(dtype=torch.float64)
    feats = torch.randn(2, 3, 1, 3, 4, **kw, requires_grad=True)
    weights = torch.randn(2, 3, **kw, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, w: ops.nga(f, w, backend="cpp"), (feats, weights))
    desc = [torch.randn(*s, **kw, requires_grad=True) for s in ((3, 4), (2, 4), (2, 5, 8), (2, 5))]
    assert torch.autograd.gradcheck(lambda *a: ops.descriptor(*a, backend="cpp"), desc)
    q, k = torch.randn(2, 2, 3, 5, **kw, requires_grad=True), torch.randn(2, 2, 4, 5, **kw, requires_grad=True)
    scale = torch.tensor([0.7, -1.3], **kw, requires_grad=True)
    for normalize in (False, True):
        assert torch.autograd.gradcheck(
            lambda a, b, s: ops.mask_logits(a, b, s, normalize=normalize, backend="cpp"), (q, k, scale)
        )


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def head(feats, weights, text, g, weight, bias, k, scale):
        fused = ops.nga(feats, weights, backend="cpp")  # (S, B, N, D)
        q = ops.descriptor(text, g, weight, bias, backend="cpp")  # (S, B, C, e)
        return ops.mask_logits(q, fused + k, scale, normalize=True, backend="cpp")

    S, K, B, N, D, C = 2, 3, 2, 6, 8, 3
    args = [randn(S, K, B, N, D), torch.softmax(randn(S, K, seed=1), 1), randn(C, D, seed=2), randn(B, D, seed=3),
            randn(S, D, 2 * D, seed=4), randn(S, D, seed=5), randn(S, B, N, D, seed=6), torch.tensor([0.5, 0.25])]
    eager_args = [a.clone().requires_grad_() for a in args]
    compiled_args = [a.clone().requires_grad_() for a in args]
    expected = head(*eager_args)
    actual = torch.compile(head, fullgraph=True)(*compiled_args)
    assert_close(actual, expected, torch.float32, "compiled output")
    expected.square().sum().backward()
    actual.square().sum().backward()
    for a, e in zip(compiled_args, eager_args):
        assert_close(a.grad, e.grad, torch.float32, "compiled grad")


# ------------------------------------------------------------------------------------------------------------------
# Loading, auto selection and `python -m cascade_clip.info`
# ------------------------------------------------------------------------------------------------------------------


def test_auto_prefers_cpp_on_cpu():
    from cascade_clip.ops.registry import resolve

    assert resolve("auto", torch.device("cpu")).name == "cpp"


def test_load_failure_raises_import_error_and_warns_once(monkeypatch):
    monkeypatch.setattr(_cpp_backend, "_loaded", False)
    monkeypatch.setattr(_cpp_backend, "_load_error", "cascade_clip._C was built for torch 2.0.0, you have 2.14.1")
    monkeypatch.setattr(_cpp_backend, "_warned", False)
    with pytest.warns(UserWarning, match="built for torch 2.0.0"):
        with pytest.raises(ImportError, match="built for torch 2.0.0, you have"):
            _cpp_backend.load_backend()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second failure must not warn again
        with pytest.raises(ImportError):
            _cpp_backend.load_backend()


def test_build_for_another_torch_is_reported(monkeypatch):
    import types

    import cascade_clip

    stale = types.ModuleType("cascade_clip._C")
    stale.TORCH_VERSION = "2.0.0+cpu"
    monkeypatch.setattr(cascade_clip, "_C", stale, raising=False)
    monkeypatch.setitem(sys.modules, "cascade_clip._C", stale)
    monkeypatch.setattr(_cpp_backend, "_loaded", False)
    monkeypatch.setattr(_cpp_backend, "_load_error", None)
    loaded, reason = _cpp_backend.status()
    assert not loaded
    assert f"built for torch 2.0.0+cpu, you have {torch.__version__}" in reason


def test_build_from_older_sources_is_reported(monkeypatch):
    """A _C built before the loss kernels existed registers only the head ops: the backend says to rebuild it instead
    of failing later at the first loss."""
    import types

    head_ops = {name: getattr(torch.ops.cascade_clip, name) for name in _cpp_backend._OPERATORS
                if not name.startswith("loss_sums")}
    monkeypatch.setattr(torch.ops, "cascade_clip", types.SimpleNamespace(**head_ops))
    monkeypatch.setattr(_cpp_backend, "_loaded", False)
    monkeypatch.setattr(_cpp_backend, "_load_error", None)
    loaded, reason = _cpp_backend.status()
    assert not loaded
    assert "lacks the operators ['loss_sums', 'loss_sums_backward']" in reason and "rebuild it" in reason


def test_built_for_version_is_in_the_binary():
    assert _cpp_backend.extension_torch_version() == torch.__version__
    assert _cpp_backend._built_for_from_binary() == torch.__version__


def test_info_lists_backends():
    result = subprocess.run([sys.executable, "-m", "cascade_clip.info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
             if ":" in line}
    assert lines["torch"] == torch.__version__
    assert lines["cascade_clip._C"].startswith("loaded")
    assert "cpp" in lines["ops backends available"].split(", ")
    assert "reference" in lines["ops backends available"].split(", ")
