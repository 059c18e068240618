"""Fused Triton kernels for the head ops, installed as ``cascade_clip.kernels``.

The ``"triton"`` backend of :mod:`cascade_clip.ops` is loaded through :func:`load_backend`. Each op lives in its own
module (``nga``, ``descriptor``, ``mask_logits``, ``loss_sums``) as three layers: ``@triton.jit`` kernels, a plain-Python launcher,
and a ``torch.library.custom_op`` in the ``cascade_clip_triton`` namespace with a fake and an autograd formula, so
``torch.compile(fullgraph=True)`` traces through it. Launch settings come from :mod:`.launch`.

Importing this package does not import Triton; :func:`load_backend` does. Under ``TRITON_INTERPRET=1`` the kernels
run on CPU tensors (that is how the CPU tests run them); ``"auto"`` only routes CUDA tensors here.
"""


def load_backend():
    """The ``"triton"`` :class:`~cascade_clip.ops.registry.Backend`; ImportError when Triton is missing."""
    try:
        import triton
    except ImportError as exc:  # registry reports the reason and keeps the other backends
        raise ImportError(f"triton is not installed: {exc}") from exc

    import torch

    from cascade_clip.ops.registry import Backend

    from .launch import check_interpreter, is_interpreter

    try:
        from .descriptor import descriptor
        from .loss_sums import loss_sums
        from .mask_logits import mask_logits
        from .nga import nga
    except RuntimeError as exc:
        if is_interpreter() and "active drivers" in str(exc):  # triton.autotune of Triton 3.2 asks for a GPU driver
            raise RuntimeError(
                f"Triton {triton.__version__}'s autotuner needs a GPU driver even under TRITON_INTERPRET=1 ({exc}); "
                "the CPU interpreter runs these kernels with Triton >= 3.5 (tested: 3.5, 3.6, 3.8)"
            ) from exc
        raise

    # compiled kernels need CUDA tensors; the interpreter runs them on CPU tensors (explicit backend="triton" only:
    # "auto" routes CPU tensors to the C++ backend)
    if is_interpreter():
        check_interpreter()  # a Triton/numpy pair whose interpreter cannot run kernels: a named error, not 90 failures
    devices = ("cuda", "cpu") if is_interpreter() else ("cuda",)
    # the kernels accumulate in float32 and feed tl.dot 16/32-bit operands: float64 goes to the reference
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return Backend("triton", nga, descriptor, mask_logits, devices=devices, dtypes=dtypes, loss_sums=loss_sums)
