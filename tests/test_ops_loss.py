"""``ops.loss_sums`` (the fused sums of the official focal + dice loss): each fused backend against the reference
backend (the official element-wise formulation), outputs and logit gradients, and the loss built on them.

The ``cpp`` backend runs on CPU tensors (its C++ kernels); the ``triton`` backend on CUDA tensors, or on a CPU-only
machine under Triton's interpreter at small, awkward shapes (the op has no ``tl.dot``, so every dtype runs there).
With a GPU the ``gpu`` tests add the training shapes (512 x 512, up to 171 classes).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cascade_clip import ops
from cascade_clip.loss import segmentation_loss

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    _AVAILABLE = ops.available_backends()
# The fused backends that loaded, each with the device its tensors live on.
FUSED = [name for name in ("cpp", "triton") if name in _AVAILABLE]
BACKEND_DEVICE = {"cpp": "cpu", "triton": "cuda" if HAS_CUDA else "cpu", "reference": "cpu"}
needs_triton = pytest.mark.skipif("triton" not in _AVAILABLE, reason="the triton backend did not load")

# Tolerances (atol, rtol), atol relative to the reference's largest magnitude (``atol * max(1, max|ref|)``).
# Sums: every backend computes in float32 from the same inputs (a half-precision logit converts to float32 exactly), so
# only the summation order and the transcendental functions differ: float32 tolerances for every input dtype
# (float64 for float64 logits, which only the reference and cpp backends compute).
SUMS_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-5, 1e-5),
    torch.bfloat16: (1e-5, 1e-5),
    torch.float64: (1e-12, 1e-12),
}
SUMS_TOLERANCE = SUMS_TOLERANCES[torch.float32]
# Logit gradients are stored in the logits' dtype: the two float32 values may round to neighbouring half-precision
# numbers (one ulp: 2^-11 relative in float16, 2^-8 in bfloat16).
GRAD_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float64: (1e-12, 1e-12),
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


def _inputs(B, C, H, W, dtype, *, backend="reference", label_dtype=torch.int64, ignored=0.2, logit_scale=3.0):
    device = BACKEND_DEVICE[backend]
    logits = (torch.randn(B, C, H, W, device=device) * logit_scale).to(dtype)
    labels = torch.randint(0, C, (B, H, W), device=device)
    labels[torch.rand(B, H, W, device=device) < ignored] = 255
    return logits, labels.to(label_dtype)


def _check_parity(backend, logits, labels, ignore_pixels, grad="random"):
    """``backend`` against the reference on the same values: the sums, exact target counts, the logit gradient."""
    ref_x = logits.detach().clone().requires_grad_()
    fused_x = logits.detach().clone().requires_grad_()
    ref = ops.loss_sums(ref_x, labels, ignore_pixels=ignore_pixels, backend="reference")
    fused = ops.loss_sums(fused_x, labels, ignore_pixels=ignore_pixels, backend=backend)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    assert ref.dtype == fused.dtype == acc and fused.shape == (logits.shape[0], logits.shape[1], 4)
    _assert_close(f"{backend} sums", fused, ref, SUMS_TOLERANCES[logits.dtype])
    assert torch.equal(fused[..., 3], ref[..., 3]), "target counts are integers: they must match exactly"
    if grad == "sum":  # an expanded (stride-0) gradient
        ref.sum().backward()
        fused.sum().backward()
    else:
        cotangent = torch.randn(ref.shape, device=ref.device, dtype=acc)
        ref.backward(cotangent)
        fused.backward(cotangent)
    _assert_close(f"{backend} dlogits", fused_x.grad, ref_x.grad, GRAD_TOLERANCES[logits.dtype])


# (B, C, H, W): odd and prime sizes, one class, one pixel, a block boundary (2048 pixels) crossed
SHAPES = [(2, 5, 7, 9), (1, 1, 1, 1), (3, 4, 37, 29), (1, 3, 45, 47)]
# Larger than the interpreter can afford: several 2048-pixel tiles per image, more classes (cpp only)
CPP_SHAPES = [(2, 15, 97, 131), (1, 37, 64, 65)]


@pytest.mark.parametrize("ignore_pixels", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", FUSED)
def test_loss_sums_parity(backend, shape, dtype, ignore_pixels):
    _check_parity(backend, *_inputs(*shape, dtype, backend=backend), ignore_pixels)


@pytest.mark.skipif("cpp" not in _AVAILABLE, reason="the cpp backend did not load")
@pytest.mark.parametrize("ignore_pixels", [False, True])
@pytest.mark.parametrize("dtype", DTYPES + [torch.float64])
@pytest.mark.parametrize("shape", CPP_SHAPES)
def test_cpp_loss_sums_parity_larger_shapes_and_float64(shape, dtype, ignore_pixels):
    _check_parity("cpp", *_inputs(*shape, dtype, backend="cpp"), ignore_pixels)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("label_dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_label_dtypes(backend, label_dtype):
    _check_parity(backend, *_inputs(2, 6, 11, 13, torch.float32, backend=backend, label_dtype=label_dtype),
                  ignore_pixels=True)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("ignore_pixels", [False, True])
def test_label_values_outside_the_classes(backend, ignore_pixels):
    """The op does not validate label values (loss.check_labels does); whatever they hold, the fused backends must
    read them as the reference does: an int64 label past int32 is no class (it once wrapped to class k or to 255),
    an int8 label below -1 is no class (it once became class 256 + v), int8 -1 is the ignore label 255 (the reference
    compares with the Python scalar 255, which wraps to -1 in int8), and 300 or -5 are no class and not ignored."""
    device = BACKEND_DEVICE[backend]
    cases = {
        torch.int64: [2**32 + 1, 2**32 + 255, 300, -5, 255, 0, 2**40, 200],
        torch.int32: [300, -5, -1, 255, 0, 200, 2**31 - 1, 3],
        torch.int16: [300, -5, -1, 255, 0, 200, -32768, 3],
        torch.int8: [-56, -2, -1, 0, 127, -128, 5, 3],
    }
    for label_dtype, values in cases.items():
        labels = torch.tensor(values, dtype=label_dtype, device=device).view(1, 2, 4)
        logits = torch.randn(1, 201, 2, 4, device=device) * 3  # 201 classes: class 200 = 256 - 56 exists
        _check_parity(backend, logits, labels, ignore_pixels)


@pytest.mark.parametrize("backend", FUSED)
def test_saturated_logits_all_ignored_image_and_absent_classes(backend):
    """Logits of +-40 (sigmoid is exactly 0 or 1 in float32), logits past float32's exp range (+-100: exp(-100) is
    subnormal, exp(-110) is 0), an image with only ignore labels, classes absent."""
    logits, labels = _inputs(3, 4, 9, 10, torch.float32, backend=backend, logit_scale=25.0)
    logits[0, 0, :3] = 40.0
    logits[0, 1, :3] = -40.0
    logits[0, 2, 0, :2] = torch.tensor([100.0, -100.0])
    logits[0, 3, 0, :2] = torch.tensor([110.0, -110.0])
    labels[1] = 255
    labels[2] = 3  # classes 0-2 absent from image 2
    for ignore_pixels in (False, True):
        _check_parity(backend, logits, labels, ignore_pixels)


@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_logits_and_labels_stride0_grad(backend):
    device = BACKEND_DEVICE[backend]
    base = torch.randn(2, 9, 11, 5, device=device)
    logits = base.permute(0, 3, 2, 1)  # (B, C, H, W) = (2, 5, 11, 9), channels innermost in memory
    labels = torch.randint(0, 5, (2, 9, 11), device=device).transpose(1, 2)
    assert not logits.is_contiguous() and not labels.is_contiguous()
    _check_parity(backend, logits, labels, ignore_pixels=False, grad="sum")


# Per-pixel accuracy of the fused float32 kernels against exact (float64, numerically stable) values: relative to the
# value (or, for the gradient, to the magnitude of its two terms) where that is a normal float32, absolute where it is
# subnormal (1e-44 = 7 subnormal steps). Measured: cpp 5e-7 relative (about 4 ulp), 3e-45 absolute; triton (under the
# interpreter, whose exp and log are numpy's) 5.1e-7 relative.
PIXEL_RTOL, PIXEL_SUBNORMAL_ATOL = 1e-6, 1e-44
_FLOAT32_TINY = torch.finfo(torch.float32).tiny


def _exact_pixel_terms(x, is_target, cotangent):
    """Focal term, sigmoid and logit gradient of each pixel in float64 from stable formulas (softplus, sigmoid and
    log sigmoid from u = exp(-|x|)), and the magnitude of the gradient's two terms."""
    x = x.double()
    u = torch.exp(-x.abs())
    tail = torch.log1p(u)
    p = torch.where(x >= 0, 1 / (1 + u), u / (1 + u))
    q = torch.where(x >= 0, u / (1 + u), 1 / (1 + u))
    bce = torch.where(is_target, (-x).clamp(min=0) + tail, x.clamp(min=0) + tail)
    focal = torch.where(is_target, 0.25 * q * q * bce, 0.75 * p * p * bce)
    log_p, log_q = x.clamp(max=0) - tail, (-x).clamp(max=0) - tail
    d_focal = torch.where(is_target, 0.25 * q * q * (2 * p * log_p - q), 0.75 * p * p * (p - 2 * q * log_q))
    focal_part = cotangent[0] * d_focal
    prob_part = (cotangent[1] + cotangent[2] * is_target.double()) * p * q
    return focal, p, focal_part + prob_part, focal_part.abs() + prob_part.abs()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("label", [0, 255])
def test_per_pixel_accuracy(backend, label):
    """One pixel per image, so each sum is one pixel's value: float32 logits across [-104, 104] (dense in [-30, 30]),
    a target (label 0) or not (255). Both fused backends take p and 1 - p from one exp(-|x|) (1 - p itself loses a
    confident target's focal weight) and add the BCE's tail last; the float32 reference, which rounds
    x - log(1 + exp(-|x|)) first, is off by up to 300% there. The C++ kernels evaluate exp and log1p with their own
    polynomials; the Triton kernels with tl.exp and tl.log, which the interpreter computes with numpy (on an NVIDIA GPU
    they lower to approximate instructions, so the bound is checked under the interpreter only), at fewer points."""
    if backend == "triton" and HAS_CUDA:
        pytest.skip("tl.exp and tl.log are approximate on NVIDIA GPUs (ex2.approx, lg2.approx); checked under the "
                    "interpreter")
    steps = (60001, 2081) if backend == "cpp" else (301, 105)
    x = torch.cat([torch.linspace(-30, 30, steps[0]), torch.linspace(-104, 104, steps[1])])
    N = x.numel()
    cotangent = torch.tensor([0.3, -0.7, 1.1, 0.0])
    logits = x.view(N, 1, 1, 1).clone().requires_grad_()
    sums = ops.loss_sums(logits, torch.full((N, 1, 1), label), backend=backend)[:, 0]
    sums.backward(cotangent.expand(N, 4))
    focal, prob, grad, grad_scale = _exact_pixel_terms(x, torch.full((N,), label == 0), cotangent.double())
    for name, got, exact, scale in (("focal", sums[:, 0], focal, focal.abs()), ("sigmoid", sums[:, 1], prob, prob),
                                    ("dlogits", logits.grad.flatten(), grad, grad_scale)):
        err = (got.detach().double() - exact).abs()
        normal = scale >= _FLOAT32_TINY
        bad = torch.where(normal, err > PIXEL_RTOL * scale, err > PIXEL_SUBNORMAL_ATOL)
        assert not bad.any(), (f"{name}: {int(bad.sum())} pixels out of tolerance, e.g. x = {x[bad][:5].tolist()}: "
                               f"{got[bad][:5].tolist()} != {exact[bad][:5].tolist()}")


@pytest.mark.skipif("cpp" not in _AVAILABLE, reason="the cpp backend did not load")
def test_cpp_results_do_not_depend_on_the_thread_count():
    """Per-tile partial sums reduced in a fixed order: the same bits with 1 or 2 threads, forward and backward."""
    logits, labels = _inputs(2, 7, 128, 130, torch.float32, backend="cpp")  # 9 tiles per image
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_()
            sums = ops.loss_sums(x, labels, backend="cpp")
            sums.backward(torch.ones_like(sums))
            results.append((sums, x.grad))
    finally:
        torch.set_num_threads(threads)
    for sums, grad in results[1:]:
        assert torch.equal(sums, results[0][0]) and torch.equal(grad, results[0][1])


@pytest.mark.skipif("cpp" not in _AVAILABLE, reason="the cpp backend did not load")
def test_cpp_gradcheck_float64():
    logits, labels = _inputs(2, 3, 4, 5, torch.float64, backend="cpp")
    for ignore_pixels in (False, True):
        assert torch.autograd.gradcheck(
            lambda x: ops.loss_sums(x, labels, ignore_pixels=ignore_pixels, backend="cpp"),
            (logits.clone().requires_grad_(),))


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
    for backend in ["reference", *FUSED]:
        device = BACKEND_DEVICE[backend]
        expected = torch.tensor(_hand_sums(logits, labels, ignore_pixels), dtype=torch.float32, device=device)
        x = torch.tensor(logits, device=device).view(1, 2, 2, 3)
        y = torch.tensor(labels, device=device).view(1, 2, 3)
        sums = ops.loss_sums(x, y, ignore_pixels=ignore_pixels, backend=backend)[0]
        _assert_close(f"{backend} sums (ignore_pixels={ignore_pixels})", sums, expected, SUMS_TOLERANCE)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("ignore_pixels", [False, True])
def test_segmentation_loss_same_on_every_backend(backend, ignore_pixels):
    """The whole loss (focal x100 + dice) and its gradient through the fused backend's sums and the reference's."""
    logits, labels = _inputs(2, 6, 16, 15, torch.float32, backend=backend)
    results = {}
    for name in ("reference", backend):
        x = logits.clone().requires_grad_()
        losses = segmentation_loss(x, labels, ignore_pixels=ignore_pixels, backend=name)
        losses["loss"].backward()
        results[name] = (losses, x.grad)
    (ref, ref_grad), (fused, fused_grad) = results["reference"], results[backend]
    for key in ("loss_mask", "loss_dice", "loss"):
        _assert_close(key, fused[key], ref[key], SUMS_TOLERANCE)
    _assert_close("dlogits", fused_grad, ref_grad, GRAD_TOLERANCES[torch.float32])


def test_bad_inputs_are_named():
    logits, labels = _inputs(2, 3, 4, 5, torch.float32)  # CPU tensors: ops.loss_sums checks before any backend
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) = \(2, 4, 5\), got \(2, 4, 6\)"):
        ops.loss_sums(logits, torch.zeros(2, 4, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must be an integer tensor \(uint8, int8, int16, int32, int64\), "
                                         r"got float32"):
        ops.loss_sums(logits, labels.float())
    with pytest.raises(ValueError, match=r"logits must be \(B, C, H, W\)"):
        ops.loss_sums(logits[0], labels)
    with pytest.raises(ValueError, match="at most 254 classes"):
        ops.loss_sums(torch.zeros(1, 255, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long))


@needs_triton
def test_opcheck_loss_sums_triton():
    from cascade_clip.kernels.loss_sums import loss_sums_op

    logits, labels = _inputs(2, 3, 5, 7, torch.float32, backend="triton")
    for ignore_pixels in (False, True):
        torch.library.opcheck(loss_sums_op, (logits.clone().requires_grad_(), labels, ignore_pixels))


@pytest.mark.skipif("cpp" not in _AVAILABLE, reason="the cpp backend did not load")
def test_opcheck_loss_sums_cpp():
    logits, labels = _inputs(2, 3, 5, 7, torch.float32, backend="cpp")
    lib = torch.ops.cascade_clip
    for ignore_pixels in (False, True):
        torch.library.opcheck(lib.loss_sums, (logits.clone().requires_grad_(), labels, ignore_pixels))
        torch.library.opcheck(lib.loss_sums_backward, (torch.randn(2, 3, 4), logits, labels, ignore_pixels))


@needs_triton
def test_eager_path_equals_custom_op():
    """Eager mode runs an autograd.Function, torch.compile the custom op: the same launchers, bitwise-equal results."""
    from cascade_clip.kernels import loss_sums as module

    logits, labels = _inputs(2, 4, 9, 8, torch.float32, backend="triton")
    outs = []
    for fn in (module.loss_sums, module.loss_sums_op):
        x = logits.clone().requires_grad_()
        y = fn(x, labels, False)
        y.backward(torch.ones_like(y))
        outs.append((y, x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@gpu
@needs_triton
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("classes", [15, 171])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_sums_parity_training_shapes(classes, dtype):
    """B=2, 512 x 512 (the training crop), VOC's 15 and COCO-Stuff's 171 classes."""
    _check_parity("triton", *_inputs(2, classes, 512, 512, dtype, backend="triton"), ignore_pixels=False)


@pytest.mark.parametrize("backend", FUSED)
def test_loss_compiles_without_graph_breaks(backend):
    """segmentation_loss (without the label check, which reads a value back) under torch.compile(fullgraph=True):
    dynamo sees the backend's loss_sums custom op, and the loss and the logit gradient equal eager."""
    torch._dynamo.reset()
    ops.available_backends()
    dtype = torch.bfloat16 if HAS_CUDA and backend == "triton" else torch.float32
    logits, labels = _inputs(2, 5, 12, 11, dtype, backend=backend)
    op_name = {"triton": "cascade_clip_triton.loss_sums", "cpp": "cascade_clip.loss_sums"}[backend]
    seen_ops = set()

    def recording_backend(gm, example_inputs):
        seen_ops.update(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    def loss_fn(x, labels):
        return segmentation_loss(x, labels, backend=backend, validate_labels=False)["loss"]

    x = logits.clone().requires_grad_()
    loss_c = torch.compile(loss_fn, fullgraph=True, backend=recording_backend)(x, labels)
    assert op_name in seen_ops or f"{op_name}.default" in seen_ops, sorted(seen_ops)  # the packet or its overload
    loss_c.backward()
    y = logits.clone().requires_grad_()
    loss_e = loss_fn(y, labels)
    loss_e.backward()
    _assert_close("loss", loss_c, loss_e, SUMS_TOLERANCE)
    _assert_close("dlogits", x.grad, y.grad, GRAD_TOLERANCES[dtype])
