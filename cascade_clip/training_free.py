"""Training-free dense CLIP segmentation (MaskCLIP's value-path features) on open_clip's image tower.

For users with CLIP weights but no Cascade-CLIP checkpoint. Per patch token, the last block's *value* path replaces its
attention output, whose tokens all look alike because they attend globally (MaskCLIP, Zhou et al. 2022). The last
block's residual and MLP are left out as well, a choice of this project: MaskCLIP's ViT variant keeps them, and later
training-free work reports cleaner dense features without them:

    x  = input of the last block (B, 1+N, W), after conv1 + positions + ln_pre and blocks 0..L-2
    v  = ln_1(x) @ W_v.T + b_v            (W_v, b_v: the value slice of the attention's in_proj)
    f  = ln_post(out_proj(v)) @ proj      (B, N, D); no residual, no MLP
    logits[b, c, n] = cos(text[c], f[b, n]) / temperature          via ops.mask_logits(normalize=True)

open_clip's modules are called directly (``conv1``, ``ln_pre``, ``transformer.resblocks``, ``ln_post``, ``proj``): no
hooks, no patched forward. The positional grid is resized bilinearly to each input's patch grid, so any size works.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backbone import resize_pos_grid
from .inference import slide_inference


class DenseCLIP(nn.Module):
    """Dense patch embeddings of an open_clip ``VisionTransformer`` (modules and weights shared, not copied).

    Args:
        visual: ``clip.visual`` of an open_clip CLIP ViT (``nn.MultiheadAttention`` blocks, class token, ``proj``).
        temperature: logits are cosine / temperature; CLIP's own is ``1 / logit_scale.exp()`` (0.01 for OpenAI CLIP).
    """

    def __init__(self, visual: nn.Module, *, temperature: float):
        super().__init__()
        last = visual.transformer.resblocks[-1]
        if not isinstance(getattr(last, "attn", None), nn.MultiheadAttention) or getattr(visual, "proj", None) is None:
            raise ValueError(
                "training-free mode needs an open_clip ViT with nn.MultiheadAttention blocks and a projection "
                f"(got {type(visual).__name__})"
            )
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("training-free mode does not support attention-pooled open_clip towers")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.visual = visual
        self.temperature = float(temperature)
        self.patch_size = visual.conv1.kernel_size[0]
        # open_clip towers are batch-first by default; older configs run sequence-first blocks.
        self.batch_first = getattr(visual.transformer, "batch_first", True)

    def _tokens(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """images (B, 3, H, W) -> tokens (B, 1+h*w, W) after ln_pre (plain CLIP embedding), and the grid (h, w)."""
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))  # (B, W, h, w)
        grid = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)  # (B, h*w, W), token p = y * w + x
        pos = visual.positional_embedding.to(x.dtype)
        cls = (visual.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x + resize_pos_grid(pos[1:], grid)], dim=1)
        return visual.ln_pre(x), grid

    def _blocks(self, x: torch.Tensor, blocks: Sequence[nn.Module]) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        for block in blocks:
            x = block(x)
        return x if self.batch_first else x.transpose(0, 1)

    def _value_path(self, x: torch.Tensor) -> torch.Tensor:
        """Last block's value embeddings through out_proj (and the block's layer scale, identity for CLIP)."""
        block = self.visual.transformer.resblocks[-1]
        attn = block.attn
        width = x.shape[-1]
        if attn.in_proj_weight is not None:
            weight = attn.in_proj_weight[2 * width :]
        else:  # separate q/k/v projections (kdim/vdim != embed_dim)
            weight = attn.v_proj_weight
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        values = F.linear(block.ln_1(x), weight, bias)
        layer_scale = getattr(block, "ls_1", None)
        out = attn.out_proj(values)
        return layer_scale(out) if layer_scale is not None else out

    def features(self, images: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """images (B, 3, H, W), sides multiples of the patch -> unnormalised patch embeddings (B, h*w, D), (h, w)."""
        x, grid = self._tokens(images)
        x = self._blocks(x, self.visual.transformer.resblocks[:-1])
        dense = self.visual.ln_post(self._value_path(x[:, 1:])) @ self.visual.proj
        return dense, grid

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), text (C, D) -> cosine logits / temperature (B, C, H, W), upsampled bilinearly."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}")
        dense, (grid_h, grid_w) = self.features(images)
        if text.dim() != 2 or text.shape[1] != dense.shape[-1]:
            raise ValueError(f"text must be (C, {dense.shape[-1]}) class embeddings, got {tuple(text.shape)}")
        q = text.to(dense.dtype).unsqueeze(0).unsqueeze(0).expand(1, dense.shape[0], -1, -1)  # (1, B, C, D)
        logits = ops.mask_logits(q, dense.unsqueeze(0), 1.0 / self.temperature, normalize=True)  # (B, C, h*w)
        logits = logits.unflatten(-1, (grid_h, grid_w))
        return F.interpolate(logits.float(), size=(height, width), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def segment(self, images: torch.Tensor, text: torch.Tensor, *, crop: int, stride: int) -> torch.Tensor:
        """Per-class softmax probabilities (B, C, H, W) by sliding windows, for images of any size.

        Windows are placed and averaged as in :func:`cascade_clip.inference.slide_inference`. That function takes the
        sigmoid of what it is given, so each window hands it ``logit(softmax)``: the sigmoid gives the softmax back.
        (A sigmoid of CLIP-scaled cosines would saturate at 1 and lose the ranking between classes.)
        """
        def window_logits(window: torch.Tensor) -> torch.Tensor:
            return torch.logit(self(window, text).softmax(dim=1))

        return slide_inference(
            window_logits, images, num_classes=text.shape[0], crop=crop, stride=stride,
            patch=self.patch_size, seen=(), calibration=0.0,
        )


def clip_temperature(clip_model: nn.Module, default: float = 0.01) -> float:
    """``1 / logit_scale.exp()`` of an open_clip model (0.01 for OpenAI CLIP), or ``default`` if it has none."""
    scale = getattr(clip_model, "logit_scale", None)
    if scale is None:
        return default
    return float(1.0 / scale.detach().float().exp())


def build_dense_clip(clip_model: str, weights: Optional[str], *, temperature: Optional[float] = None,
                     quick_gelu: bool = True) -> DenseCLIP:
    """A :class:`DenseCLIP` around the image tower of open_clip ``clip_model`` with ``weights`` (tag or file)."""
    from .clip_arch import create_clip

    clip = create_clip(clip_model, weights, quick_gelu).eval()
    return DenseCLIP(clip.visual, temperature=clip_temperature(clip) if temperature is None else temperature).eval()
