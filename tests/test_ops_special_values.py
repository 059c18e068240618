"""The fused backends against the reference where values are extreme: NaN and inf inputs, fp16 range limits, and
second derivatives (which the fused backends refuse rather than get wrong).

Each fused backend runs where it can: ``cpp`` on CPU tensors, ``triton`` on CUDA tensors or (without a GPU) under
Triton's interpreter. A NaN or inf must land exactly where the reference puts it; finite values must agree within
the tolerance of the dtype (the same table as ``test_ops_triton.py``).
"""

from __future__ import annotations

import pytest
import torch

from cascade_clip import ops

pytestmark = pytest.mark.usefixtures("one_thread")

HAS_CUDA = torch.cuda.is_available()

# (atol, rtol) per dtype; atol is scaled by max(1, max|reference|), as in test_ops_triton.py
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (5e-3, 5e-3), torch.float64: (1e-12, 1e-12)}


def _fused_backends():
    params = []
    if "cpp" in ops.available_backends():
        params.append(pytest.param("cpp", id="cpp"))
    if "triton" in ops.available_backends():
        params.append(pytest.param("triton", id="triton"))
    return params


FUSED = _fused_backends()


def _device(backend: str) -> str:
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def _assert_same_values(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """NaN, +inf and -inf at the same places; the finite entries within the dtype's tolerance."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, name
    a, e = actual.double(), expected.double()
    for label, test in (("NaN", torch.isnan), ("+inf", lambda x: x == float("inf")), ("-inf", lambda x: x == -float("inf"))):
        assert torch.equal(test(a), test(e)), f"{name}: {label} at {test(a).nonzero().tolist()}, want {test(e).nonzero().tolist()}"
    finite = torch.isfinite(e)
    if finite.any():
        atol, rtol = TOLERANCES[expected.dtype]
        scale = max(1.0, e[finite].abs().max().item())
        err = (a - e)[finite].abs()
        bound = atol * scale + rtol * e[finite].abs()
        assert bool((err <= bound).all()), f"{name}: max abs err {err.max().item():.3e} (atol {atol}*{scale:.3g})"


def _run(fn, inputs, backend, cotangent):
    leaves = [t.detach().clone().to(_device(backend)).requires_grad_() for t in inputs]
    out = fn(*leaves, backend=backend)
    out.backward(cotangent.to(out.device, out.dtype))
    return out, [t.grad for t in leaves]


def _compare(fn, inputs, backend, cotangent, names):
    ref_out, ref_grads = _run(fn, inputs, "reference", cotangent)
    out, grads = _run(fn, inputs, backend, cotangent)
    _assert_same_values("output", out, ref_out)
    for name, grad, ref in zip(names, grads, ref_grads):
        _assert_same_values(f"d {name}", grad, ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("where", ["q", "k"])
def test_cosine_logits_nan_in_a_row_poisons_that_rows_gradient(backend, where):
    """F.normalize of a row holding a NaN is NaN everywhere, so the row's whole gradient is NaN. The fused kernels
    once clamped the NaN norm to eps (a max that drops NaN) and returned finite gradients of ~1e12."""
    torch.manual_seed(0)
    S, B, C, N, d = 2, 1, 3, 5, 6
    q, k, scale = torch.randn(S, B, C, d), torch.randn(S, B, N, d), torch.tensor([0.7, 1.3])
    (q if where == "q" else k)[1, 0, 1, 2] = float("nan")
    cot = torch.randn(B, C, N)
    _compare(lambda q, k, s, backend: ops.mask_logits(q, k, s, normalize=True, backend=backend),
             [q, k, scale], backend, cot, ["q", "k", "scale"])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("C", [3, 16])
def test_scale_gradient_with_an_inf_in_k(backend, C):
    """All terms of d scale are +inf here; the Triton kernel once returned NaN when C was not a multiple of its class
    tile (the padded rows computed 0 * inf and were summed)."""
    q = torch.rand(1, 1, C, 8) + 0.1
    k = torch.rand(1, 1, 4, 8)
    k[0, 0, 2, 0] = float("inf")
    ref_out, (_, _, ref_dscale) = _run(lambda q, k, s, backend: ops.mask_logits(q, k, s, backend=backend),
                                       [q, k, torch.ones(1)], "reference", torch.ones(1, C, 4))
    out, (_, _, dscale) = _run(lambda q, k, s, backend: ops.mask_logits(q, k, s, backend=backend),
                               [q, k, torch.ones(1)], backend, torch.ones(1, C, 4))
    assert ref_dscale.item() == float("inf")
    _assert_same_values("d scale", dscale, ref_dscale)
    _assert_same_values("output", out, ref_out)


@pytest.mark.parametrize("backend", FUSED)
def test_float16_descriptor_large_text_times_g(backend):
    """text * g beyond float16's range with small weights: every true output is representable. The Triton kernel once
    rounded text * g to float16 before its dot (inf, then NaN); it now forms that operand in float32."""
    torch.manual_seed(0)
    S, B, C, d, e = 2, 2, 3, 5, 4
    text, g = torch.randn(C, d) * 400, torch.randn(B, d) * 400
    weight, bias = torch.randn(S, e, 2 * d) * 3e-4, torch.randn(S, e)
    inputs = [t.half() for t in (text, g, weight, bias)]
    ref_out = ops.descriptor(*inputs, backend="reference")
    assert torch.isfinite(ref_out).all() and ref_out.abs().max() > 1  # the case is meaningful: finite, not tiny
    _compare(lambda *a, backend: ops.descriptor(*a, backend=backend), inputs, backend,
             torch.randn(S, B, C, e), ["text", "g", "weight", "bias"])


@pytest.mark.parametrize("backend", FUSED)
def test_float16_descriptor_large_image_summed_gradient(backend):
    """An output gradient of 40000 (fp16 loss scaling) summed over two images passes 65504; the gradients of text and
    g stay representable and must not become inf (the Triton kernels once fed that sum to tl.dot in float16)."""
    torch.manual_seed(0)
    S, B, C, d, e = 2, 2, 3, 5, 4
    inputs = [torch.randn(C, d).half(), torch.randn(B, d).half(), (torch.randn(S, e, 2 * d) * 0.01).half(),
              torch.randn(S, e).half()]
    cot = torch.full((S, B, C, e), 40000.0)
    _, ref_grads = _run(lambda *a, backend: ops.descriptor(*a, backend=backend), inputs, "reference", cot)
    assert torch.isfinite(ref_grads[0]).all() and torch.isfinite(ref_grads[1]).all()
    _compare(lambda *a, backend: ops.descriptor(*a, backend=backend), inputs, backend, cot,
             ["text", "g", "weight", "bias"])


@pytest.mark.parametrize("backend", FUSED)
def test_float32_bias_beside_float16_operands(backend):
    """A float32 bias outside float16's range while the output is inside it: the bias is added in float32."""
    S, B, C, d, e = 1, 1, 2, 4, 2
    text, g = torch.ones(C, d).half(), torch.ones(B, d).half()
    weight = torch.zeros(S, e, 2 * d)
    weight[..., d:] = -2500.0  # the text half gives 4 * -2500 = -10000 per output
    bias = torch.full((S, e), 70000.0)  # float32: 70000 - 10000 = 60000 < 65504
    dev = _device(backend)
    out = ops.descriptor(text.to(dev), g.to(dev), weight.half().to(dev), bias.to(dev), backend=backend)
    ref = ops.descriptor(text, g, weight.half(), bias, backend="reference")
    assert torch.equal(ref, torch.full_like(ref, 60000.0))
    _assert_same_values("output", out, ref)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("ignore_pixels", [False, True])
def test_loss_sums_nan_and_inf_logits(backend, ignore_pixels):
    """+inf, -inf and NaN logits on a target pixel, a pixel of another class and an ignore (255) pixel, one per image.
    The reference's BCE, (1 - t) x - log sigmoid(x), is NaN at a +inf target and at every -inf pixel and +inf at a
    +inf non-target; a pixel dropped by ``ignore_pixels`` is multiplied by 0, so a non-finite logit there still makes
    its sums NaN; the gradient of every non-finite logit is NaN. The triton kernel once wrote the BCE as
    max(x, 0) - x t + log(1 + exp(-|x|)) (NaN for a +inf non-target) and dropped ignored pixels with a select."""
    torch.manual_seed(0)
    values = [float("inf"), -float("inf"), float("nan")]
    pixel_labels = [0, 1, 255]  # a target of class 0, another class, ignored
    B, C, H, W = len(values) * len(pixel_labels), 2, 2, 3
    logits = torch.randn(B, C, H, W)
    labels = torch.randint(0, C, (B, H, W))
    for b in range(B):
        logits[b, 0, 0, 0] = values[b // len(pixel_labels)]
        labels[b, 0, 0] = pixel_labels[b % len(pixel_labels)]
    ref = ops.loss_sums(logits, labels, ignore_pixels=ignore_pixels, backend="reference")
    assert torch.isnan(ref).any() and torch.isinf(ref).any()  # the case holds both kinds
    _compare(lambda x, backend: ops.loss_sums(x, labels.to(x.device), ignore_pixels=ignore_pixels, backend=backend),
             [logits], backend, torch.randn(B, C, 4), ["logits"])


# ---------------------------------------------------------------- second derivatives


def _op_cases():
    torch.manual_seed(0)
    S, K, B, N, D, C, d, e = 2, 3, 1, 4, 5, 3, 4, 3
    return {
        "nga": (lambda f, w, backend: ops.nga(f, w, backend=backend), [torch.randn(S, K, B, N, D), torch.rand(S, K)]),
        "descriptor": (lambda *a, backend: ops.descriptor(*a, backend=backend),
                       [torch.randn(C, d), torch.randn(B, d), torch.randn(S, e, 2 * d), torch.randn(S, e)]),
        "mask_logits": (lambda q, k, s, backend: ops.mask_logits(q, k, s, normalize=True, backend=backend),
                        [torch.randn(S, B, C, d), torch.randn(S, B, N, d), torch.rand(S) + 0.5]),
        "loss_sums": (lambda x, backend: ops.loss_sums(x, torch.tensor([[[0, 1], [255, 2]]], device=x.device),
                                                       backend=backend),
                      [torch.randn(1, 3, 2, 2)]),
    }


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["nga", "descriptor", "mask_logits", "loss_sums"])
def test_second_derivatives_are_refused_not_wrong(backend, op):
    """``create_graph=True`` still gives the right first derivatives; differentiating them raises a named error where
    the backend has no second derivative (the C++ ops once gave zeros, the Triton descriptor part of the answer)."""
    fn, inputs = _op_cases()[op]

    def first_derivatives(name):
        leaves = [t.detach().clone().to(_device(name)).requires_grad_() for t in inputs]
        out = fn(*leaves, backend=name)
        return leaves, torch.autograd.grad((out.float() ** 2).sum(), leaves, create_graph=True)

    ref_leaves, ref_grads = first_derivatives("reference")
    leaves, grads = first_derivatives(backend)
    for i, (grad, ref) in enumerate(zip(grads, ref_grads)):
        _assert_same_values(f"{op} d input {i}", grad, ref)
    # the reference has second derivatives, so the comparison below is about the backend, not the math
    second = torch.autograd.grad(sum((g ** 2).sum() for g in ref_grads), ref_leaves)
    assert any(s.abs().sum() > 0 for s in second)
    with pytest.raises(RuntimeError, match=f"{op}: the '{backend}' backend computes first derivatives only"):
        torch.autograd.grad(sum((g ** 2).sum() for g in grads), leaves)


@pytest.mark.parametrize("backend", FUSED)
def test_the_guard_stays_out_of_a_plain_backward(backend, monkeypatch):
    """A plain backward (training) never builds the second-order guard; create_graph=True does."""
    from cascade_clip.ops import first_order

    built = []
    real = first_order._SecondOrderUnsupported.apply
    monkeypatch.setattr(first_order._SecondOrderUnsupported, "apply", lambda *a: built.append(1) or real(*a))
    fn, inputs = _op_cases()["descriptor"]
    leaves = [t.detach().clone().to(_device(backend)).requires_grad_() for t in inputs]
    grads = torch.autograd.grad(fn(*leaves, backend=backend).sum(), leaves)
    assert not built and all(g.grad_fn is None for g in grads)
    torch.autograd.grad((fn(*leaves, backend=backend) ** 2).sum(), leaves, create_graph=True)
    assert built


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("op", ["nga", "descriptor", "mask_logits", "loss_sums"])
def test_create_graph_through_activation_checkpointing(backend, op):
    """Non-reentrant torch.utils.checkpoint lets each saved tensor be unpacked once per backward: the guard must not
    unpack them a second time (it once did, and a create_graph=True backward through a checkpointed op failed)."""
    from torch.utils.checkpoint import checkpoint

    fn, inputs = _op_cases()[op]

    def first_derivatives(name):
        leaves = [t.detach().clone().to(_device(name)).requires_grad_() for t in inputs]
        out = checkpoint(lambda *xs: fn(*xs, backend=name), *leaves, use_reentrant=False)
        return torch.autograd.grad((out.float() ** 2).sum(), leaves, create_graph=True)

    for i, (grad, ref) in enumerate(zip(first_derivatives(backend), first_derivatives("reference"))):
        _assert_same_values(f"{op} d input {i}", grad, ref)
