"""The hot ops of Cascade-CLIP (the head's three and the loss's sums), behind a backend switch.

Every function validates its inputs here, once, and then hands them to the selected backend
(``"reference"`` PyTorch, ``"triton"`` fused kernels, ``"cpp"`` C++ extension). Model code only calls these functions,
so a new backend never touches the model. Gradients flow to every floating-point input.

* ``nga(feats, weights)``: feats ``(S, K, B, N, D)``, weights ``(S, K)`` float32 -> ``(S, B, N, D)``;
  ``out[s] = sum_k weights[s, k] * feats[s, k]``, accumulated in float32 (float64 for float64 inputs), returned in
  feats' dtype.
* ``descriptor(text, g, weight, bias)``: text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)``
  -> ``(S, B, C, e)``; ``concat(text * g[b], text) @ weight[s].T + bias[s]``, in g's dtype.
* ``mask_logits(q, k, scale, normalize=False)``: q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale a float or ``(S,)``
  -> ``(B, C, N)``; ``sum_s scale[s] * <q_hat[s, b, c], k_hat[s, b, n]>`` where ``x_hat = x / max(|x|, 1e-12)``
  if ``normalize`` else ``x``. The decoder's head-averaged attention logits are this op with
  ``scale = head_dim ** -0.5 / heads``.
* ``loss_sums(logits, labels, ignore_pixels=False)``: logits ``(B, C, H, W)``, labels ``(B, H, W)`` integers in
  ``[0, C)`` or 255 -> ``(B, C, 4)`` float32 (float64 for float64 logits): per image and class, the pixel sums of
  the official loss's focal term, of ``p = sigmoid(x)``, of ``p * t`` and of ``t`` (``t`` = one-hot target; 255 =
  negative everywhere, or skipped in the first three sums with ``ignore_pixels``).
  :func:`cascade_clip.loss.segmentation_loss` builds the loss from them.

The ops ignore ``torch.autocast``: every backend computes from its inputs' dtypes as above (the model casts what it
passes), so a region under autocast gets the same numbers from every backend as outside it. Floating-point inputs are
float16, bfloat16, float32 or float64 (float64 is computed by the reference and C++ backends; ``"auto"`` sends it to
the reference on CUDA).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from .registry import available_backends, get_backend, resolve, set_backend, unavailable_reason

__all__ = [
    "nga",
    "descriptor",
    "mask_logits",
    "loss_sums",
    "available_backends",
    "set_backend",
    "get_backend",
    "unavailable_reason",
]


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


# Floating-point dtypes the ops accept (every backend's kernels or the reference compute them); label dtypes of
# loss_sums. Others (float8, complex, uint16/32/64 labels) are refused with the argument's name.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
# Device types that have an autocast state (torch.is_autocast_enabled raises for others, e.g. "meta").
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla", "mtia", "maia")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _without_autocast(fn, device: torch.device, *args):
    """Call a backend op with autocast off on ``device``: its dtypes are the op's contract, and the ATen matmuls
    inside the reference and C++ backends would otherwise be recast (a different result, or a dtype clash)."""
    if device.type in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type):
        with torch.autocast(device.type, enabled=False):
            return fn(*args)
    return fn(*args)


def _check_float(name: str, t: torch.Tensor) -> None:
    # every op call passes here: the messages are only formatted on failure
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor ({', '.join(_dtype_name(d) for d in FLOAT_DTYPES)}), "
                         f"got {_dtype_name(t.dtype)}")


def _check_same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    _require(all(d == first for d in devices.values()), f"inputs must share one device, got {devices}")
    return first


def nga(feats: torch.Tensor, weights: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Neighborhood Gaussian Aggregation: weighted sum of each stage's taps.

    feats ``(S, K, B, N, D)``, weights ``(S, K)`` -> ``(S, B, N, D)`` in feats' dtype, float32 accumulation.
    """
    _check_float("feats", feats)
    _check_float("weights", weights)
    _require(feats.dim() == 5, f"nga: feats must be (S, K, B, N, D), got shape {tuple(feats.shape)}")
    _require(
        weights.shape == feats.shape[:2],
        f"nga: weights must be (S, K) = {tuple(feats.shape[:2])}, got {tuple(weights.shape)}",
    )
    device = _check_same_device(feats=feats, weights=weights)
    # the dtypes that set the computation (weights, bias and scale are read in their own dtype and cast to float32)
    op = resolve(backend, device, (feats.dtype,)).nga
    return _without_autocast(op, device, feats, weights)


def descriptor(
    text: torch.Tensor,
    g: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Relationship descriptor ``[T * g, T]`` through each stage's query projection.

    text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)`` in g's dtype.
    """
    for name, t in (("text", text), ("g", g), ("weight", weight), ("bias", bias)):
        _check_float(name, t)
    _require(text.dim() == 2, f"descriptor: text must be (C, d), got shape {tuple(text.shape)}")
    _require(g.dim() == 2, f"descriptor: g must be (B, d), got shape {tuple(g.shape)}")
    d = text.shape[1]
    _require(g.shape[1] == d, f"descriptor: g width {g.shape[1]} != text width {d}")
    _require(
        weight.dim() == 3 and weight.shape[2] == 2 * d,
        f"descriptor: weight must be (S, e, 2d) with 2d = {2 * d}, got shape {tuple(weight.shape)}",
    )
    _require(
        bias.shape == weight.shape[:2],
        f"descriptor: bias must be (S, e) = {tuple(weight.shape[:2])}, got {tuple(bias.shape)}",
    )
    device = _check_same_device(text=text, g=g, weight=weight, bias=bias)
    op = resolve(backend, device, (text.dtype, g.dtype, weight.dtype)).descriptor
    return _without_autocast(op, device, text, g, weight, bias)


def mask_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: Union[float, torch.Tensor],
    *,
    normalize: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Stage-summed (optionally cosine) logits ``sum_s scale[s] * q_hat[s] @ k_hat[s].T``.

    q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale a float or ``(S,)`` tensor -> ``(B, C, N)`` in q's dtype.
    """
    _check_float("q", q)
    _check_float("k", k)
    _require(q.dim() == 4, f"mask_logits: q must be (S, B, C, d), got shape {tuple(q.shape)}")
    _require(k.dim() == 4, f"mask_logits: k must be (S, B, N, d), got shape {tuple(k.shape)}")
    _require(
        k.shape[0] == q.shape[0] and k.shape[1] == q.shape[1] and k.shape[3] == q.shape[3],
        f"mask_logits: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on S, B and d",
    )
    if not isinstance(scale, torch.Tensor):
        scale = torch.full((q.shape[0],), float(scale), dtype=torch.float32, device=q.device)
    _check_float("scale", scale)
    if scale.dim() == 0:
        scale = scale.expand(q.shape[0])
    _require(scale.shape == (q.shape[0],), f"mask_logits: scale must be a float or (S,) = ({q.shape[0]},), got {tuple(scale.shape)}")
    device = _check_same_device(q=q, k=k, scale=scale)
    op = resolve(backend, device, (q.dtype, k.dtype)).mask_logits
    return _without_autocast(op, device, q, k, scale, bool(normalize))


def loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_pixels: bool = False, backend: Optional[str] = None
) -> torch.Tensor:
    """Pixel sums of the official focal + dice loss per image and class channel.

    logits ``(B, C, H, W)`` (computed in float32, or float64 for float64 logits), labels ``(B, H, W)`` integers in
    ``[0, C)`` or 255 -> ``(B, C, 4)`` in that dtype ``[sum focal, sum p, sum p * t, sum t]``; differentiable in
    ``logits``.
    """
    _check_float("logits", logits)
    if not (isinstance(labels, torch.Tensor) and labels.dtype in LABEL_DTYPES):
        got = _dtype_name(labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"loss_sums: labels must be an integer tensor "
                         f"({', '.join(_dtype_name(d) for d in LABEL_DTYPES)}), got {got}")
    _require(logits.dim() == 4, f"loss_sums: logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    _require(
        labels.shape == (logits.shape[0], *logits.shape[2:]),
        f"loss_sums: labels must be (B, H, W) = {(logits.shape[0], *logits.shape[2:])}, got {tuple(labels.shape)}",
    )
    _require(logits.shape[1] < 255, f"loss_sums: at most 254 classes (255 is the ignore label), got {logits.shape[1]}")
    device = _check_same_device(logits=logits, labels=labels)
    op = resolve(backend, device, (logits.dtype,)).loss_sums
    return _without_autocast(op, device, logits, labels, bool(ignore_pixels))
