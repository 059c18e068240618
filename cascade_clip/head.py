"""The Cascade-CLIP decode head (official ``ATMSingleHeadSeg``, MODEL_SPEC.md section 3).

Neighborhood Gaussian Aggregation fuses each stage's taps into one memory, the relationship descriptor
``[T * g, T]`` gives each stage's initial class queries, three cascaded decoders refine them against their stage's
memory, and the head-averaged pre-softmax logits of each decoder's last layer, summed over stages, are the mask logits.
The three hot steps go through :mod:`cascade_clip.ops`, so a fused backend replaces them without touching this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from . import ops
from .backbone import BackboneOutput
from .decoder import CascadeDecoder, run_stages


def gaussian_weights(count: int, sigma: float) -> torch.Tensor:
    """exp(-x^2 / (2 sigma^2)) for x = count-1, ..., 1, 0: the deepest tap of a stage weighs most."""
    x = torch.arange(count - 1, -1, -1, dtype=torch.float64)
    return torch.exp(-(x**2) / (2 * sigma**2)).float()


@dataclass
class HeadOutput:
    """mask_logits ``(B, C, N)`` summed over stages; the rest only with ``return_intermediates``:
    stage_memory ``(S, B, N, d)``, stage_query_in ``(S, B, C, d)``, stage_q ``(S, B, C, d)`` and
    stage_k ``(S, B, N, d)`` (last decoder layer's projections)."""

    mask_logits: torch.Tensor
    stage_memory: Optional[torch.Tensor] = None
    stage_query_in: Optional[torch.Tensor] = None
    stage_q: Optional[torch.Tensor] = None
    stage_k: Optional[torch.Tensor] = None


class CascadeHead(nn.Module):
    """Args: dim (embedding width d), taps_per_stage (K), nga_sigma, heads, ffn_dim, dropout, num_layers."""

    def __init__(
        self, *, dim: int, taps_per_stage: int, nga_sigma: float, heads: int, ffn_dim: int, dropout: float, num_layers: int
    ):
        super().__init__()
        self.taps_per_stage = taps_per_stage
        # Learnable, unnormalised, and identical at the start for both stages (official).
        self.weights_s1 = nn.Parameter(gaussian_weights(taps_per_stage, nga_sigma))
        self.weights_s2 = nn.Parameter(gaussian_weights(taps_per_stage, nga_sigma))
        num_stages = 3  # two NGA stages and the last layer
        self.q_projs = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(num_stages)])
        self.cascade_decoders = nn.ModuleList(
            [
                CascadeDecoder(dim=dim, heads=heads, ffn_dim=ffn_dim, dropout=dropout, num_layers=num_layers)
                for _ in range(num_stages)
            ]
        )

    def forward(self, features: BackboneOutput, text: torch.Tensor, return_intermediates: bool = False) -> HeadOutput:
        """features: backbone output (taps ``(2K, B, N, d)``); text ``(C, d)`` -> :class:`HeadOutput`."""
        taps = features.taps
        stacked = taps.view(2, self.taps_per_stage, *taps.shape[1:])
        nga_weights = torch.stack([self.weights_s1, self.weights_s2])
        fused = ops.nga(stacked, nga_weights)  # (2, B, N, d)
        memories = torch.cat([fused, features.final.unsqueeze(0).to(fused.dtype)])  # (3, B, N, d)

        g = features.global_embedding
        weight = torch.stack([proj.weight for proj in self.q_projs])
        bias = torch.stack([proj.bias for proj in self.q_projs])
        queries = ops.descriptor(text.to(g.dtype), g, weight.to(g.dtype), bias.to(g.dtype))  # (3, B, C, d)

        # each stage's decoder on its memory, all stages batched into one pass
        stage_q, stage_k = run_stages(self.cascade_decoders, queries, memories)
        scale = self.cascade_decoders[0].logit_scale
        logits = ops.mask_logits(stage_q, stage_k, scale)  # (B, C, N)
        if not return_intermediates:
            return HeadOutput(mask_logits=logits)
        return HeadOutput(
            mask_logits=logits,
            stage_memory=memories,
            stage_query_in=queries,
            stage_q=stage_q,
            stage_k=stage_k,
        )
