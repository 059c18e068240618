"""``ops.loss_sums`` (the fused sums of the official focal + dice loss): the triton backend against the reference
backend (the official element-wise formulation), outputs and logit gradients, and the loss built on them.

On a CPU-only machine the kernels run under Triton's interpreter at small, awkward shapes; the op has no ``tl.dot``,
so every dtype runs here. With a GPU the ``gpu`` tests add the training shapes (512 x 512, up to 171 classes).
"""

from __future__ import annotations

import math

import pytest
import torch

from cascade_clip import ops
from cascade_clip.loss import segmentation_loss

triton = pytest.importorskip("triton")

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
gpu = pytest.mark.gpu

# Tolerances (atol, rtol), atol relative to the reference's largest magnitude (``atol * max(1, max|ref|)``).
# Sums: both backends compute in float32 from the same inputs (a half-precision logit converts to float32 exactly), so
# only the summation order and the transcendental functions differ: float32 tolerances for every input dtype.
SUMS_TOLERANCE = (1e-5, 1e-5)
# Logit gradients are stored in the logits' dtype: the two float32 values may round to neighbouring half-precision
# numbers (one ulp: 2^-11 relative in float16, 2^-8 in bfloat16).
GRAD_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _assert_close(name, actual, expected, tolerance):
    atol, rtol = tolerance
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {tuple(actual.shape)} {actual.dtype} != {tuple(expected.shape)} {expected.dtype}")
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values"
    scale = max(1.0, e.abs().max().item()) if e.numel() else 1.0
    err, bound = (a - e).abs(), atol * scale + rtol * e.abs()
    bad = err > bound
    assert not bad.any(), (f"{name}: {int(bad.sum())}/{err.numel()} out of tolerance {tolerance}; max abs err "
                           f"{err.max().item():.3e} (reference magnitude {scale:.3g})")


def _inputs(B, C, H, W, dtype, *, label_dtype=torch.int64, ignored=0.2, logit_scale=3.0):
    logits = (torch.randn(B, C, H, W, device=DEVICE) * logit_scale).to(dtype)
    labels = torch.randint(0, C, (B, H, W), device=DEVICE)
    labels[torch.rand(B, H, W, device=DEVICE) < ignored] = 255
    return logits, labels.to(label_dtype)


def _check_parity(logits, labels, ignore_pixels, grad="random"):
    ref_x = logits.detach().clone().requires_grad_()
    tri_x = logits.detach().clone().requires_grad_()
    ref = ops.loss_sums(ref_x, labels, ignore_pixels=ignore_pixels, backend="reference")
    tri = ops.loss_sums(tri_x, labels, ignore_pixels=ignore_pixels, backend="triton")
    assert ref.dtype == tri.dtype == torch.float32 and ref.shape == (logits.shape[0], logits.shape[1], 4)
    _assert_close("sums", tri, ref, SUMS_TOLERANCE)
    assert torch.equal(tri[..., 3], ref[..., 3]), "target counts are integers: they must match exactly"
    if grad == "sum":  # an expanded (stride-0) gradient
        ref.sum().backward()
        tri.sum().backward()
    else:
        cotangent = torch.randn(ref.shape, device=DEVICE)
        ref.backward(cotangent)
        tri.backward(cotangent)
    _assert_close("dlogits", tri_x.grad, ref_x.grad, GRAD_TOLERANCES[logits.dtype])


# (B, C, H, W): odd and prime sizes, one class, one pixel, a block boundary (2048 pixels) crossed
SHAPES = [(2, 5, 7, 9), (1, 1, 1, 1), (3, 4, 37, 29), (1, 3, 45, 47)]


@pytest.mark.parametrize("ignore_pixels", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_sums_parity(shape, dtype, ignore_pixels):
    _check_parity(*_inputs(*shape, dtype), ignore_pixels)


@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int32])
def test_label_dtypes(label_dtype):
    _check_parity(*_inputs(2, 6, 11, 13, torch.float32, label_dtype=label_dtype), ignore_pixels=True)


def test_saturated_logits_all_ignored_image_and_absent_classes():
    """Logits of +-40 (sigmoid is exactly 0 or 1 in float32), an image with only ignore labels, classes absent."""
    logits, labels = _inputs(3, 4, 9, 10, torch.float32, logit_scale=25.0)
    logits[0, 0, :3] = 40.0
    logits[0, 1, :3] = -40.0
    labels[1] = 255
    labels[2] = 3  # classes 0-2 absent from image 2
    for ignore_pixels in (False, True):
        _check_parity(logits, labels, ignore_pixels)


def test_noncontiguous_logits_and_labels_stride0_grad():
    base = torch.randn(2, 9, 11, 5, device=DEVICE)
    logits = base.permute(0, 3, 2, 1)  # (B, C, H, W) = (2, 5, 11, 9), channels innermost in memory
    labels = torch.randint(0, 5, (2, 9, 11), device=DEVICE).transpose(1, 2)
    assert not logits.is_contiguous() and not labels.is_contiguous()
    _check_parity(logits, labels, ignore_pixels=False, grad="sum")


def _hand_sums(logits, labels, ignore_pixels):
    """[focal, p, p * t, t] per class from the official per-pixel formulas, in Python floats (float64):
    focal = BCE(x, t) * (1 - p_t)^2 * alpha_t with p = sigmoid(x), p_t = p if t else 1 - p, alpha_t = 0.25 if t else
    0.75; label 255 is a negative of every class, and with ``ignore_pixels`` it is left out of the first three sums."""
    sums = []
    for c, channel in enumerate(logits):
        focal = prob = prob_t = target = 0.0
        for x, label in zip(channel, labels):
            t = 1.0 if label == c else 0.0
            p = 1.0 / (1.0 + math.exp(-x))
            bce = -(t * math.log(p) + (1.0 - t) * math.log(1.0 - p))
            p_t = p if t else 1.0 - p
            target += t
            if ignore_pixels and label == 255:
                continue
            focal += bce * (1.0 - p_t) ** 2 * (0.25 if t else 0.75)
            prob += p
            prob_t += p * t
        sums.append([focal, prob, prob_t, target])
    return sums


@pytest.mark.parametrize("ignore_pixels", [False, True])
def test_sums_are_what_they_say(ignore_pixels):
    """Every column, the focal term included, of both backends against the formulas worked out pixel by pixel on a
    2-class, 2 x 3 image with one ignored pixel (labelled pixels of both classes, an absent-class channel elsewhere)."""
    logits = [[0.0, 2.0, -1.0, 3.0, 0.5, -2.5], [1.5, -2.0, 0.5, -0.5, 4.0, 1.0]]  # (C, H * W)
    labels = [0, 255, 1, 0, 0, 1]
    expected = torch.tensor(_hand_sums(logits, labels, ignore_pixels), dtype=torch.float32, device=DEVICE)
    x = torch.tensor(logits, device=DEVICE).view(1, 2, 2, 3)
    y = torch.tensor(labels, device=DEVICE).view(1, 2, 3)
    for backend in ("reference", "triton"):
        sums = ops.loss_sums(x, y, ignore_pixels=ignore_pixels, backend=backend)[0]
        _assert_close(f"{backend} sums (ignore_pixels={ignore_pixels})", sums, expected, SUMS_TOLERANCE)


@pytest.mark.parametrize("ignore_pixels", [False, True])
def test_segmentation_loss_same_on_both_backends(ignore_pixels):
    """The whole loss (focal x100 + dice) and its gradient through either backend's sums."""
    logits, labels = _inputs(2, 6, 16, 15, torch.float32)
    results = {}
    for backend in ("reference", "triton"):
        x = logits.clone().requires_grad_()
        losses = segmentation_loss(x, labels, ignore_pixels=ignore_pixels, backend=backend)
        losses["loss"].backward()
        results[backend] = (losses, x.grad)
    (ref, ref_grad), (tri, tri_grad) = results["reference"], results["triton"]
    for key in ("loss_mask", "loss_dice", "loss"):
        _assert_close(key, tri[key], ref[key], SUMS_TOLERANCE)
    _assert_close("dlogits", tri_grad, ref_grad, GRAD_TOLERANCES[torch.float32])


def test_bad_inputs_are_named():
    logits, labels = _inputs(2, 3, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) = \(2, 4, 5\), got \(2, 4, 6\)"):
        ops.loss_sums(logits, torch.zeros(2, 4, 6, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \(uint8, int8, int16, int32, int64\), "
                                         r"got float32"):
        ops.loss_sums(logits, labels.float())
    with pytest.raises(ValueError, match=r"logits must be \(B, C, H, W\)"):
        ops.loss_sums(logits[0], labels)
    with pytest.raises(ValueError, match="at most 254 classes"):
        ops.loss_sums(torch.zeros(1, 255, 1, 1, device=DEVICE), torch.zeros(1, 1, 1, dtype=torch.long, device=DEVICE))


def test_opcheck_loss_sums():
    from cascade_clip.kernels.loss_sums import loss_sums_op

    logits, labels = _inputs(2, 3, 5, 7, torch.float32)
    for ignore_pixels in (False, True):
        torch.library.opcheck(loss_sums_op, (logits.clone().requires_grad_(), labels, ignore_pixels))


def test_eager_path_equals_custom_op():
    """Eager mode runs an autograd.Function, torch.compile the custom op: the same launchers, bitwise-equal results."""
    from cascade_clip.kernels import loss_sums as module

    logits, labels = _inputs(2, 4, 9, 8, torch.float32)
    outs = []
    for fn in (module.loss_sums, module.loss_sums_op):
        x = logits.clone().requires_grad_()
        y = fn(x, labels, False)
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("classes", [15, 171])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_sums_parity_training_shapes(classes, dtype):
    """B=2, 512 x 512 (the training crop), VOC's 15 and COCO-Stuff's 171 classes."""
    _check_parity(*_inputs(2, classes, 512, 512, dtype), ignore_pixels=False)


def test_loss_compiles_without_graph_breaks():
    """segmentation_loss (without the label check, which reads a value back) under torch.compile(fullgraph=True):
    dynamo sees the loss_sums custom op, and the loss and the logit gradient equal eager."""
    torch._dynamo.reset()
    ops.available_backends()
    dtype = torch.bfloat16 if HAS_CUDA else torch.float32
    logits, labels = _inputs(2, 5, 12, 11, dtype)
    seen_ops = set()

    def recording_backend(gm, example_inputs):
        seen_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def loss_fn(x, labels):
        return segmentation_loss(x, labels, backend="triton", validate_labels=False)["loss"]

    x = logits.clone().requires_grad_()
    loss_c = torch.compile(loss_fn, fullgraph=True, backend=recording_backend)(x, labels)
    assert "cascade_clip_triton.loss_sums.default" in seen_ops, sorted(seen_ops)
    loss_c.backward()
    y = logits.clone().requires_grad_()
    loss_e = loss_fn(y, labels)
    loss_e.backward()
    _assert_close("loss", loss_c, loss_e, SUMS_TOLERANCE)
    _assert_close("dlogits", x.grad, y.grad, GRAD_TOLERANCES[dtype])
