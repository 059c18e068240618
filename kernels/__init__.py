"""Fused Triton kernels for the head ops, installed as ``cascade_clip.kernels``.

The ``"triton"`` backend of :mod:`cascade_clip.ops` is loaded through :func:`load_backend`.
"""


def load_backend():
    raise ImportError("the Triton kernels are not implemented yet")
