"""The ``"reference"`` backend: the three head ops in plain PyTorch.

This is the explicit math path that every fused backend is tested against (timm keeps the same kind of path beside
its fused attention). Each op upcasts to float32, computes, and casts the result back once, so the reference is never
computed in low precision. Autograd comes from PyTorch itself.

Shapes (the API of :mod:`cascade_clip.ops`):

* ``nga``:         feats ``(S, K, B, N, D)``, weights ``(S, K)``                  -> ``(S, B, N, D)``
* ``descriptor``:  text ``(C, d)``, g ``(B, d)``, weight ``(S, e, 2d)``, bias ``(S, e)`` -> ``(S, B, C, e)``
* ``mask_logits``: q ``(S, B, C, d)``, k ``(S, B, N, d)``, scale ``(S,)``         -> ``(B, C, N)``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nga(feats: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[s] = sum_k weights[s, k] * feats[s, k]``, accumulated in float32."""
    out = torch.einsum("skbnd,sk->sbnd", feats.float(), weights.float())
    return out.to(feats.dtype)


def descriptor(text: torch.Tensor, g: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``concat(text * g[b], text) @ weight[s].T + bias[s]`` for every stage ``s`` and image ``b``."""
    out_dtype = g.dtype
    text32, g32 = text.float(), g.float()
    num_images, num_classes = g.shape[0], text.shape[0]
    relation = torch.cat(
        [text32.unsqueeze(0) * g32.unsqueeze(1), text32.unsqueeze(0).expand(num_images, num_classes, -1)], dim=-1
    )  # (B, C, 2d)
    out = torch.einsum("bcf,sef->sbce", relation, weight.float()) + bias.float()[:, None, None, :]
    return out.to(out_dtype)


def mask_logits(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``sum_s scale[s] * <q_hat[s, b, c], k_hat[s, b, n]>`` with optional L2 normalisation along ``d``."""
    q32, k32 = q.float(), k.float()
    if normalize:
        q32 = F.normalize(q32, dim=-1)
        k32 = F.normalize(k32, dim=-1)
    out = torch.einsum("sbcd,sbnd,s->bcn", q32, k32, scale.float())
    return out.to(q.dtype)
