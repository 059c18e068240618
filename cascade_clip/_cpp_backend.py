"""The ``"cpp"`` backend of :mod:`cascade_clip.ops`: the C++ extension ``cascade_clip._C`` (``csrc/``).

``cascade_clip._C`` registers the operators ``torch.ops.cascade_clip.{nga, descriptor, mask_logits, loss_sums}`` and
their ``*_backward`` operators with CPU kernels. This module adds what PyTorch needs around them: autograd formulas
(``torch.library.register_autograd``) and fake kernels (``torch.library.register_fake``) so that ``torch.compile`` and
``torch.library.opcheck`` can trace them. It is imported lazily by the ops registry through :func:`load_backend`; if
the extension is missing or was built for another torch, :func:`load_backend` raises ``ImportError`` saying why (and
warns once), and the registry simply leaves ``"cpp"`` out of ``available_backends()``.

Shapes (the API of :mod:`cascade_clip.ops`):

* ``nga``:         feats ``(S, K, B, N, D)``, weights ``(S, K)``                       -> ``(S, B, N, D)``
* ``descriptor``:  text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)``
* ``mask_logits``: q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)``, normalize      -> ``(B, C, N)``
* ``loss_sums``:   logits ``(B, C, H, W)``, labels ``(B, H, W)``, ignore_pixels            -> ``(B, C, 4)`` float32
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

import torch

from .ops.first_order import first_order_only

# Every operator csrc/ registers (a forward and its backward each); a build from older sources may lack some.
_OPERATORS = tuple(f"{op}{suffix}" for op in ("nga", "descriptor", "mask_logits", "loss_sums")
                   for suffix in ("", "_backward"))
_load_error: Optional[str] = None  # why _C did not load (None: loaded or not tried yet)
_loaded = False
_warned = False
_registered = False


def _release(version: str) -> tuple:
    """``"2.14.1+cu130"`` -> ``(2, 14, 1)``: the part of a torch version that decides C++ ABI compatibility."""
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


def _built_for_from_binary() -> Optional[str]:
    """The torch version compiled into ``_C*.so`` (read from the file, for when it cannot even be loaded)."""
    import glob
    import os

    for path in glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C*.so")):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        # csrc/ops.cpp embeds this marker (cascade_clip_build_info) for exactly this purpose.
        match = re.search(rb"CASCADE_CLIP_BUILT_FOR_TORCH=([0-9A-Za-z.+_-]+)", data)
        if match:
            return match.group(1).decode()
    return None


def _load_extension() -> None:
    """Import ``cascade_clip._C`` once; record why it failed instead of raising."""
    global _loaded, _load_error
    if _loaded or _load_error is not None:
        return
    try:
        from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        built_for = _built_for_from_binary()
        if "No module named" in str(exc):
            _load_error = "cascade_clip._C is not built (run `pip install --no-build-isolation -e .` or `make install`)"
        elif built_for and _release(built_for) != _release(torch.__version__):
            _load_error = f"cascade_clip._C was built for torch {built_for}, you have {torch.__version__}; rebuild it ({exc})"
        else:
            _load_error = f"cascade_clip._C failed to load: {exc}"
        return
    except OSError as exc:
        _load_error = f"cascade_clip._C failed to load: {exc}"
        return
    built_for = getattr(_C, "TORCH_VERSION", "unknown")
    if built_for != "unknown" and _release(built_for) != _release(torch.__version__):
        _load_error = f"cascade_clip._C was built for torch {built_for}, you have {torch.__version__}; rebuild it"
        return
    missing = [name for name in _OPERATORS if not hasattr(torch.ops.cascade_clip, name)]
    if len(missing) == len(_OPERATORS):
        _load_error = "cascade_clip._C loaded but registered no torch.ops.cascade_clip operators"
        return
    if missing:
        _load_error = (f"cascade_clip._C lacks the operators {missing} (built from older sources); rebuild it "
                       "(`pip install --no-build-isolation -e .`)")
        return
    _loaded = True


def status() -> tuple:
    """``(loaded, reason)``: whether ``_C`` loaded, and why not (``None`` when it did)."""
    _load_extension()
    return _loaded, _load_error


def extension_torch_version() -> Optional[str]:
    """The torch version ``_C`` was built for (``None`` if unknown)."""
    if _loaded:
        from . import _C

        return getattr(_C, "TORCH_VERSION", None)
    return _built_for_from_binary()


# ---------------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd. Every op returns fresh tensors; masked-out gradients come back as empty (0,) tensors.
# ---------------------------------------------------------------------------------------------------------------------


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of the C++ kernels: double if any input is double, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _empty_like_dtype(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty((0,))


def _nga_fake(feats, weights):
    return feats.new_empty((feats.shape[0], feats.shape[2], feats.shape[3], feats.shape[4]))


def _nga_backward_fake(grad, feats, weights, output_mask):
    grad_feats = feats.new_empty(feats.shape) if output_mask[0] else _empty_like_dtype(feats)
    grad_weights = weights.new_empty(weights.shape) if output_mask[1] else _empty_like_dtype(weights)
    return grad_feats, grad_weights


def _descriptor_fake(text, g, weight, bias):
    return g.new_empty((weight.shape[0], g.shape[0], text.shape[0], weight.shape[1]))


def _descriptor_backward_fake(grad, text, g, weight, bias, output_mask):
    return tuple(
        t.new_empty(t.shape) if need else _empty_like_dtype(t) for t, need in zip((text, g, weight, bias), output_mask)
    )


def _mask_logits_fake(q, k, scale, normalize):
    out = q.new_empty((q.shape[1], q.shape[2], k.shape[2]))
    ct = _compute_dtype(q, k)
    rk = k.new_empty((k.shape[0], k.shape[1], k.shape[2]), dtype=ct) if normalize else k.new_empty((0,), dtype=ct)
    return out, rk


def _mask_logits_backward_fake(grad, q, k, scale, rk, normalize, output_mask):
    return tuple(t.new_empty(t.shape) if need else _empty_like_dtype(t) for t, need in zip((q, k, scale), output_mask))


def _loss_sums_fake(logits, labels, ignore_pixels):
    return logits.new_empty((logits.shape[0], logits.shape[1], 4), dtype=_compute_dtype(logits))


def _loss_sums_backward_fake(grad, logits, labels, ignore_pixels):
    return logits.new_empty(logits.shape)


def _nga_setup(ctx, inputs, output):
    feats, weights = inputs
    ctx.save_for_backward(feats, weights)


@first_order_only("nga", "cpp")
def _nga_bwd(ctx, saved, grad):
    feats, weights = saved
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    grad_feats, grad_weights = torch.ops.cascade_clip.nga_backward(grad, feats, weights, mask)
    return (grad_feats if mask[0] else None, grad_weights if mask[1] else None)


def _descriptor_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


@first_order_only("descriptor", "cpp")
def _descriptor_bwd(ctx, saved, grad):
    mask = [bool(x) for x in ctx.needs_input_grad[:4]]
    grads = torch.ops.cascade_clip.descriptor_backward(grad, *saved, mask)
    return tuple(gr if need else None for gr, need in zip(grads, mask))


def _mask_logits_setup(ctx, inputs, output):
    q, k, scale, normalize = inputs
    ctx.normalize = bool(normalize)
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(q, k, scale, output[1])


@first_order_only("mask_logits", "cpp")
def _mask_logits_bwd(ctx, saved, grad, _grad_rk):
    q, k, scale, rk = saved
    mask = [bool(x) for x in ctx.needs_input_grad[:3]]
    grads = torch.ops.cascade_clip.mask_logits_backward(grad, q, k, scale, rk, ctx.normalize, mask)
    return tuple(gr if need else None for gr, need in zip(grads, mask)) + (None,)


def _loss_sums_setup(ctx, inputs, output):
    logits, labels, ignore_pixels = inputs
    ctx.ignore_pixels = bool(ignore_pixels)
    ctx.save_for_backward(logits, labels)


@first_order_only("loss_sums", "cpp")
def _loss_sums_bwd(ctx, saved, grad):
    logits, labels = saved  # autograd calls this only when logits (the one differentiable input) needs a gradient
    return torch.ops.cascade_clip.loss_sums_backward(grad, logits, labels, ctx.ignore_pixels), None, None


def _register_python_parts() -> None:
    """Fake kernels for every op and autograd for the four forward ops (once per process)."""
    global _registered
    if _registered:
        return
    lib = "cascade_clip::"
    torch.library.register_fake(lib + "nga")(_nga_fake)
    torch.library.register_fake(lib + "nga_backward")(_nga_backward_fake)
    torch.library.register_fake(lib + "descriptor")(_descriptor_fake)
    torch.library.register_fake(lib + "descriptor_backward")(_descriptor_backward_fake)
    torch.library.register_fake(lib + "mask_logits")(_mask_logits_fake)
    torch.library.register_fake(lib + "mask_logits_backward")(_mask_logits_backward_fake)
    torch.library.register_fake(lib + "loss_sums")(_loss_sums_fake)
    torch.library.register_fake(lib + "loss_sums_backward")(_loss_sums_backward_fake)
    torch.library.register_autograd(lib + "nga", _nga_bwd, setup_context=_nga_setup)
    torch.library.register_autograd(lib + "descriptor", _descriptor_bwd, setup_context=_descriptor_setup)
    torch.library.register_autograd(lib + "mask_logits", _mask_logits_bwd, setup_context=_mask_logits_setup)
    torch.library.register_autograd(lib + "loss_sums", _loss_sums_bwd, setup_context=_loss_sums_setup)
    _registered = True


# ---------------------------------------------------------------------------------------------------------------------
# The backend functions (signatures of cascade_clip.ops.reference).
# ---------------------------------------------------------------------------------------------------------------------


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """feats ``(S, K, B, N, D)``, weights ``(S, K)`` -> ``(S, B, N, D)`` in feats' dtype."""
    return torch.ops.cascade_clip.nga(feats, weights)


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)`` in g's dtype."""
    return torch.ops.cascade_clip.descriptor(text, g, weight, bias)


def mask_logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)`` -> ``(B, C, N)`` in q's dtype."""
    return torch.ops.cascade_clip.mask_logits(q, k, scale, normalize)[0]


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool) -> torch.Tensor:
    """logits ``(B, C, H, W)``, labels ``(B, H, W)`` integers -> ``(B, C, 4)`` float32 (float64 for float64 logits)."""
    return torch.ops.cascade_clip.loss_sums(logits, labels, ignore_pixels)


def load_backend():
    """The ``"cpp"`` :class:`~cascade_clip.ops.registry.Backend`; ``ImportError`` (warned once) if ``_C`` is unusable."""
    global _warned
    from .ops.registry import Backend

    _load_extension()
    if not _loaded:
        if not _warned:
            _warned = True
            warnings.warn(f"cascade_clip: the 'cpp' ops backend is unavailable: {_load_error}", stacklevel=2)
        raise ImportError(_load_error)
    _register_python_parts()
    return Backend("cpp", nga, descriptor, mask_logits, devices=("cpu",), loss_sums=loss_sums)
