"""The image encoder: open_clip's CLIP ViT with deep visual prompt tuning and tapped intermediate layers.

Computes what the official ``VPTCLIPVisionTransformer`` computes (MODEL_SPEC.md section 2), on open_clip's modules:
the patch embedding, ``ln_pre``, the residual blocks, ``ln_post`` and ``proj`` are open_clip's own (so CLIP weights load
through open_clip), run batch-first. Around them sit the VPT parameters and the per-tap projections.

Official quirks reproduced on purpose (MODEL_SPEC.md section 7): the CLS token is ``2 * class_embedding + pos[0]``;
every tap and the final layer pass through ``prompt_norm`` and then a frozen LayerNorm; the tap projections
``proj_layers`` are drawn at random and frozen (they are not in CLIP); stochastic depth is off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, like the official backbone's LayerNorm subclass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def _drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth on a residual branch ``x`` (B, L, W): drop whole samples with probability ``p``."""
    if p == 0.0 or not training:
        return x
    keep = torch.empty(x.shape[0], 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


def resize_pos_grid(grid: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Resize positional rows ``grid`` (G*G, W) of a square G x G grid to ``size`` (h, w) -> (h*w, W).

    Bilinear, ``align_corners=False``, no antialias: the official resize (an identity when the size is unchanged).
    """
    side = math.isqrt(grid.shape[0])
    if side * side != grid.shape[0]:
        raise ValueError(f"positional embedding has {grid.shape[0]} grid rows, not a square grid")
    if (side, side) == tuple(size):
        return grid
    as_image = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(as_image.float(), size=size, mode="bilinear", align_corners=False).to(grid.dtype)
    return resized.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)


def plain_self_attention_block(block: nn.Module) -> bool:
    """True for an open_clip ``ResidualAttentionBlock`` whose forward :func:`residual_attention_block` reproduces:
    self-attention through a batch-first ``nn.MultiheadAttention`` with packed q/k/v projections, no extra key/value
    biases, no attention dropout (CLIP's blocks)."""
    from open_clip.transformer import ResidualAttentionBlock

    attn = getattr(block, "attn", None)
    return (
        type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
        and isinstance(attn, nn.MultiheadAttention) and attn.batch_first and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None and attn.bias_k is None and attn.bias_v is None
        and not attn.add_zero_attn and attn.dropout == 0.0
    )


def residual_attention_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``block(x)`` for a :func:`plain_self_attention_block` on (B, L, W) tokens, with its attention written out.

    The same computation (packed q/k/v projection, ``scaled_dot_product_attention``, output projection, then the
    MLP), without ``nn.MultiheadAttention``'s generic path: its Python checks, the transposes to and from
    sequence-first and their copies cost 17 of the block's 58 ATen calls forward and 23 of 109 backward under bf16
    autocast. A training step runs the 12 blocks forward and backward (the prompts need input gradients), and an
    eager bf16 step is host-bound, so this is host time saved. Inference uses it too: ``nn.MultiheadAttention``'s
    fused inference path computes the attention with materialised logits on the CPU, where this (SDPA) path makes a
    ViT-B/16 ``segment`` of a 512x682 image 1.17x faster in fp32 and 22x under bf16 autocast (bench/RESULTS.md).
    """
    attn = block.attn
    batch, tokens, width = x.shape
    heads = attn.num_heads
    qkv = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)
    q, k, v = qkv.view(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    x = x + block.ls_1(F.linear(out, attn.out_proj.weight, attn.out_proj.bias))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@dataclass
class BackboneOutput:
    """taps ``(T, B, N, D)``: L2-normalised projected patch features of each tapped block (N = h*w, row-major);
    final ``(B, N, D)``: the same for the last block; global_embedding ``(B, D)``: normalised CLS; grid ``(h, w)``."""

    taps: torch.Tensor
    final: torch.Tensor
    global_embedding: torch.Tensor
    grid: Tuple[int, int]


class VPTBackbone(nn.Module):
    """CLIP ViT image tower with VPT-deep prompts.

    Args:
        visual: an open_clip ``VisionTransformer`` (its modules and weights are taken over, not copied).
        grid_size: patch grid G of the stored positional embedding (training crop / patch).
        num_prompt_tokens: prompt tokens per block.
        deep_prompt_layers: blocks 1..n receive fresh prompt tokens.
        tap_layers: 0-based block indices whose outputs are tapped.
        prompt_dropout: dropout on projected prompts (drawn per image, token and channel).
        drop_path_rate: stochastic depth, linearly increasing over blocks (0 = official).
    """

    def __init__(
        self,
        *,
        visual: nn.Module,
        grid_size: int,
        num_prompt_tokens: int,
        deep_prompt_layers: int,
        tap_layers: Sequence[int],
        prompt_dropout: float,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        width = visual.conv1.out_channels
        embed_dim = visual.proj.shape[1]
        num_blocks = len(visual.transformer.resblocks)
        patch = visual.conv1.kernel_size[0]
        if max(tap_layers) >= num_blocks:
            raise ValueError(f"tap_layers {tuple(tap_layers)} exceed the {num_blocks} blocks of the CLIP model")
        if not 0 <= deep_prompt_layers <= num_blocks - 1:
            raise ValueError(f"deep_prompt_layers must be in [0, {num_blocks - 1}], got {deep_prompt_layers}")
        self.patch_size = patch
        self.num_prompt_tokens = num_prompt_tokens
        self.tap_layers = tuple(tap_layers)

        # open_clip's modules, weights included.
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.ln_pre = visual.ln_pre
        self.transformer = visual.transformer
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        # The stored grid follows the training crop; CLIP's grid is resized once, as in the official init_weights.
        pos = visual.positional_embedding.detach()
        self.positional_embedding = nn.Parameter(
            torch.cat([pos[:1], resize_pos_grid(pos[1:], (grid_size, grid_size))]).clone()
        )

        # Not in CLIP: random at construction and frozen in official training (MODEL_SPEC.md section 7, item 1).
        self.proj_layers = nn.Parameter(width**-0.5 * torch.randn(len(tap_layers), width, embed_dim))
        self.ln_layers = nn.ModuleList([LayerNorm32(width, eps=1e-5) for _ in tap_layers])

        # VPT-deep prompts (the trainable part of the backbone).
        bound = math.sqrt(6.0 / (3 * patch * patch + width))
        self.prompt_embeddings = nn.Parameter(torch.empty(1, num_prompt_tokens, width).uniform_(-bound, bound))
        self.deep_prompt_embeddings = nn.Parameter(
            torch.empty(deep_prompt_layers, num_prompt_tokens, width).uniform_(-bound, bound)
        )
        self.prompt_proj = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.prompt_proj.weight, a=0, mode="fan_out")
        self.prompt_norm = LayerNorm32(width, eps=1e-6)
        self.prompt_dropout = nn.Dropout(prompt_dropout)
        self.drop_path_rates = [float(r) for r in torch.linspace(0, drop_path_rate, num_blocks)]
        self.plain_blocks = [plain_self_attention_block(block) for block in self.transformer.resblocks]

    def _prompts(self, batch: int) -> torch.Tensor:
        """The projected prompt tokens of every block that receives them, (1 + deep_prompt_layers, B, T, W): the input
        prompts, then block i's deep prompts at index i. One projection and one dropout for all blocks (the official
        code projects per block: the same values, in a dozen fewer operators per block of a host-bound step); dropout
        after broadcasting, so each image draws its own mask. The masks have the official distribution; on the CPU
        they are even the same draws as per block, on CUDA one call over all blocks may draw other masks than one
        call per block (a run resumed across this change does not replay its dropout there)."""
        embeddings = torch.cat([self.prompt_embeddings, self.deep_prompt_embeddings])  # (1 + L, T, W)
        return self.prompt_dropout(self.prompt_proj(embeddings).unsqueeze(1).expand(-1, batch, -1, -1))

    def _embed(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """images (B, 3, H, W) -> tokens (B, 1+h*w, W) after ln_pre, and the grid (h, w)."""
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, W, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W), token p = y * w + x
        pos = self.positional_embedding.to(x.dtype)
        patches = x + resize_pos_grid(pos[1:], grid)
        # The official code adds a position row holding the class embedding to a CLS token that already is it.
        cls = (2 * self.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        return self.ln_pre(torch.cat([cls, patches], dim=1)), grid

    def _block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.transformer.resblocks[index]
        p = self.drop_path_rates[index]
        if p == 0.0 or not self.training:
            if self.plain_blocks[index]:
                return residual_attention_block(block, x)
            return block(x)
        x = x + _drop_path(block.ls_1(block.attention(q_x=block.ln_1(x))), p, True)
        return x + _drop_path(block.ls_2(block.mlp(block.ln_2(x))), p, True)

    def _project(self, x: torch.Tensor, norm: nn.Module, proj: torch.Tensor) -> torch.Tensor:
        """Tokens (B, L, W) -> L2-normalised (B, L, D) through prompt_norm, ``norm`` and ``proj``."""
        return F.normalize(norm(self.prompt_norm(x)) @ proj.to(x.dtype), dim=-1)

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        x, grid = self._embed(images)
        batch, n_prompt = x.shape[0], self.num_prompt_tokens
        prompts = self._prompts(batch)
        x = torch.cat([x[:, :1], prompts[0], x[:, 1:]], dim=1)
        taps = []
        for index in range(len(self.transformer.resblocks)):
            if 1 <= index <= self.deep_prompt_embeddings.shape[0]:
                deep = prompts[index]
                x = torch.cat([x[:, :1], deep, x[:, 1 + n_prompt :]], dim=1)
            elif index > self.deep_prompt_embeddings.shape[0] and x.shape[1] > 1 + grid[0] * grid[1]:
                # Official behaviour when prompts stop early: later blocks run without the prompt tokens.
                x = torch.cat([x[:, :1], x[:, 1 + n_prompt :]], dim=1)
            x = self._block(index, x)
            if index in self.tap_layers:
                k = self.tap_layers.index(index)
                # Only patch tokens are used downstream; the norms are per token, so prompts and CLS are skipped.
                taps.append(self._project(x[:, -grid[0] * grid[1] :], self.ln_layers[k], self.proj_layers[k]))
        hw = grid[0] * grid[1]
        final = self._project(torch.cat([x[:, :1], x[:, -hw:]], dim=1), self.ln_post, self.proj)
        return BackboneOutput(
            taps=torch.stack(taps), final=final[:, 1:], global_embedding=final[:, 0], grid=grid
        )
