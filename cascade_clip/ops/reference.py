"""The ``"reference"`` backend: the three head ops in plain PyTorch.

This is the explicit math path that every fused backend is tested against (timm keeps the same kind of path beside
its fused attention). Each op upcasts to float32, computes, and casts the result back once, so the reference is never
computed in low precision. Autograd comes from PyTorch itself.

Shapes (the API of :mod:`cascade_clip.ops`):

* ``nga``:         feats ``(S, K, B, N, D)``, weights ``(S, K)``                  -> ``(S, B, N, D)``
* ``descriptor``:  text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)``
* ``mask_logits``: q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)``         -> ``(B, C, N)``
* ``loss_sums``:   logits ``(B, C, H, W)``, labels ``(B, H, W)``, ignore_pixels    -> ``(B, C, 4)`` float32
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..catalog import IGNORE_INDEX


def _acc_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float32, or float64 when an input is float64 (gradcheck)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[s] = sum_k weights[s, k] * feats[s, k]``, accumulated in float32."""
    acc = _acc_dtype(feats, weights)
    out = torch.einsum("skbnd,sk->sbnd", feats.to(acc), weights.to(acc))
    return out.to(feats.dtype)


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``concat(text * g[b], text) @ weight[s].T + bias[s]`` for every stage ``s`` and image ``b``."""
    acc = _acc_dtype(text, g, weight, bias)
    text_a, g_a = text.to(acc), g.to(acc)
    num_images, num_classes = g.shape[0], text.shape[0]
    relation = torch.cat(
        [text_a.unsqueeze(0) * g_a.unsqueeze(1), text_a.unsqueeze(0).expand(num_images, num_classes, -1)], dim=-1
    )  # (B, C, 2d)
    out = torch.einsum("bcf,sef->sbce", relation, weight.to(acc)) + bias.to(acc)[:, None, None, :]
    return out.to(g.dtype)


def mask_logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum_s scale[s] * <q_hat[s, b, c], k_hat[s, b, n]>`` with optional L2 normalisation along ``d``."""
    acc = _acc_dtype(q, k, scale)
    q_a, k_a = q.to(acc), k.to(acc)
    if normalize:
        q_a = F.normalize(q_a, dim=-1)
        k_a = F.normalize(k_a, dim=-1)
    out = torch.einsum("sbcd,sbnd,s->bcn", q_a, k_a, scale.to(acc))
    return out.to(q.dtype)


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, ignore_pixels: bool) -> torch.Tensor:
    """Per-(image, class) pixel sums of the official loss, ``(B, C, 4)``: focal term, sigmoid, sigmoid * target,
    target; the official formulation (one-hot targets, BCE with logits, ``(1 - p_t)^2 * alpha_t``) in float32.

    Label-255 pixels are negatives of every class, or (``ignore_pixels``) left out of the first three sums."""
    acc = _acc_dtype(logits)
    x = logits.to(acc)
    classes = torch.arange(x.shape[1], device=x.device).view(1, -1, 1, 1)
    target = (labels.unsqueeze(1) == classes).to(acc)  # label 255 matches no class (C < 255)
    prob = torch.sigmoid(x)
    bce = F.binary_cross_entropy_with_logits(x, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = 0.25 * target + 0.75 * (1 - target)
    focal = bce * (1 - p_t) ** 2 * alpha_t
    if ignore_pixels:
        keep = (labels != IGNORE_INDEX).unsqueeze(1).to(acc)
        focal = focal * keep
        prob = prob * keep
    sums = [focal, prob, prob * target, target]
    return torch.stack([t.sum(dim=(2, 3)) for t in sums], dim=-1)
