"""``CascadeCLIP``: the composition root that joins the VPT backbone and the cascade head."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .backbone import VPTBackbone
from .clip_arch import create_clip
from .config import ModelConfig
from .head import CascadeHead
from .inference import slide_inference
from .loss import segmentation_loss
from .official import LOSS_BUFFER_KEY, LoadReport, convert_official_state_dict, loss_buffer, read_checkpoint, to_official_key


def build_backbone(cfg: ModelConfig) -> VPTBackbone:
    """The VPT backbone around open_clip's ``cfg.clip_model`` image tower (random or ``cfg.clip_pretrained``)."""
    clip = create_clip(cfg.clip_model, cfg.clip_pretrained, cfg.quick_gelu)
    visual = clip.visual
    patch = visual.conv1.kernel_size[0]
    if cfg.img_size % patch:
        raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {patch}")
    num_blocks = len(visual.transformer.resblocks)
    return VPTBackbone(
        visual=visual,
        grid_size=cfg.img_size // patch,
        num_prompt_tokens=cfg.num_prompt_tokens,
        deep_prompt_layers=num_blocks - 1 if cfg.deep_prompt_layers is None else cfg.deep_prompt_layers,
        tap_layers=cfg.tap_layers,
        prompt_dropout=cfg.prompt_dropout,
        drop_path_rate=cfg.drop_path_rate,
    )


def build_head(cfg: ModelConfig, embed_dim: int) -> CascadeHead:
    return CascadeHead(
        dim=embed_dim,
        taps_per_stage=cfg.taps_per_stage,
        nga_sigma=cfg.nga_sigma,
        heads=cfg.decoder_heads or max(1, embed_dim // 64),
        ffn_dim=cfg.decoder_ffn_dim or 4 * embed_dim,
        dropout=cfg.decoder_dropout,
        num_layers=cfg.decoder_layers,
    )


class CascadeCLIP(nn.Module):
    """Cascade-CLIP zero-shot segmentor.

    ``CascadeCLIP(cfg)`` builds its parts from the config (random weights unless ``cfg.clip_pretrained`` names CLIP
    weights; nothing is downloaded for a local file or random init). ``backbone``/``head`` may be handed in instead.

    Trainable, as officially: the backbone's prompt parameters (``prompt_embeddings``, ``deep_prompt_embeddings``,
    ``prompt_proj``, ``prompt_norm``) and the head, less the head parameters that never receive a gradient.
    """

    def __init__(self, cfg: ModelConfig, *, backbone: Optional[VPTBackbone] = None, head: Optional[CascadeHead] = None):
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone if backbone is not None else build_backbone(cfg)
        self.embed_dim = self.backbone.proj.shape[1]
        self.head = head if head is not None else build_head(cfg, self.embed_dim)
        self._freeze_clip()
        # Load the ops backends now: their first load takes a lock and imports modules, which torch.compile cannot
        # trace, so it must not happen inside a compiled forward.
        ops.available_backends()

    def _freeze_clip(self) -> None:
        # Official rule (exclude_key='prompt'): in the backbone only names containing "prompt" train.
        for name, param in self.backbone.named_parameters():
            param.requires_grad_("prompt" in name)

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    # ------------------------------------------------------------------ checks
    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, H, W), got {shape}")
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 channels (RGB), got {images.shape[1]} in shape {tuple(images.shape)}")

    def _check_text(self, text: torch.Tensor) -> None:
        if not isinstance(text, torch.Tensor) or text.dim() != 2 or not text.is_floating_point():
            shape = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
            raise ValueError(f"text must be a float tensor (C, {self.embed_dim}) of class embeddings, got {shape}")
        if text.shape[0] == 0:
            raise ValueError("text has zero classes: give at least one class embedding")
        if text.shape[1] != self.embed_dim:
            raise ValueError(f"text embeddings must be {self.embed_dim} wide for this model, got {text.shape[1]}")

    # ------------------------------------------------------------------ forward
    def forward(self, images: torch.Tensor, text: torch.Tensor, return_intermediates: bool = False) -> Dict:
        """images (B, 3, H, W) normalised, H and W multiples of the patch; text (C, d) L2-normalised embeddings.

        Returns ``{"mask_logits": (B, C, H, W)}`` (pre-sigmoid; the official ``pred_masks``), plus the backbone and
        head intermediates when ``return_intermediates``.
        """
        self._check_images(images)
        self._check_text(text)
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                "use segment() for arbitrary sizes"
            )
        features = self.backbone(images)
        head_out = self.head(features, text, return_intermediates=return_intermediates)
        grid_h, grid_w = features.grid
        low_res = head_out.mask_logits.unflatten(-1, (grid_h, grid_w))
        out = {"mask_logits": F.interpolate(low_res, size=(height, width), mode="bilinear", align_corners=False)}
        if return_intermediates:
            out.update(
                taps=features.taps,
                final=features.final,
                global_embedding=features.global_embedding,
                stage_memory=head_out.stage_memory,
                stage_query_in=head_out.stage_query_in,
                stage_q=head_out.stage_q,
                stage_k=head_out.stage_k,
                low_res_mask_logits=low_res,
            )
        return out

    def loss(self, out: Mapping[str, torch.Tensor], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Official focal (x100) + dice (x1) loss of ``out["mask_logits"]`` against labels (B, H, W), 255 = ignore."""
        return segmentation_loss(
            out["mask_logits"],
            labels,
            focal_weight=self.cfg.focal_weight,
            dice_weight=self.cfg.dice_weight,
            ignore_pixels=self.cfg.loss_ignores_ignore_pixels,
        )

    @torch.no_grad()
    def segment(self, images: torch.Tensor, text: torch.Tensor, seen: Optional[Sequence[int]] = None,
                window_batch: int = 4) -> torch.Tensor:
        """Calibrated per-class scores (B, C, H, W) by sliding-window inference, for images of any size.

        ``seen``: indices of text rows to calibrate (minus ``cfg.seen_calibration`` on their sigmoid scores). None
        means the config's seen classes when ``text`` has as many rows as the config has classes (taken to be those
        classes, in the config's order: the official test), and no calibration otherwise; pass ``seen`` for any
        other class list. The argmax over C is the label map. ``window_batch``: windows run through the model
        together (the same scores; fewer, larger forward calls).

        Inference always runs in eval mode (no dropout), as the official test does; every submodule gets its own mode
        back afterwards.
        """
        self._check_images(images)
        self._check_text(text)
        if seen is None:
            seen = self.cfg.seen if text.shape[0] == len(self.cfg.class_names) else ()
        seen = [int(i) for i in seen]
        if any(not 0 <= i < text.shape[0] for i in seen):
            raise ValueError(f"seen indices {seen} out of range for {text.shape[0]} classes")
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            return slide_inference(
                lambda window: self(window, text)["mask_logits"],
                images,
                num_classes=text.shape[0],
                crop=self.cfg.crop_size,
                stride=self.cfg.stride,
                patch=self.patch_size,
                seen=seen,
                calibration=self.cfg.seen_calibration,
                window_batch=window_batch,
            )
        finally:
            for module, training in modes:
                module.training = training

    # ------------------------------------------------------------------ official checkpoints
    def load_official_state_dict(self, state_dict: Union[str, os.PathLike, Mapping]) -> LoadReport:
        """Load an official Cascade-CLIP checkpoint (a state dict, an mmcv checkpoint dict, or a path to a .pth).

        Skipped keys and why: :data:`cascade_clip.official.SKIPPED_KEY_PATTERNS`. Any other mismatch raises
        ValueError listing the keys.
        """
        converted, report = convert_official_state_dict(read_checkpoint(state_dict), self.state_dict())
        self.load_state_dict(converted, strict=True)
        return report

    def official_state_dict(self) -> Dict[str, torch.Tensor]:
        """This model's weights under the official checkpoint's names, plus the official loss buffer (the other skipped
        keys absent: the text tower, the decoders' self-attention and norm1).

        The buffer is sized as the official configs size it, the seen classes + 1 for an inductive model, and all
        classes + 1 for a self-training one (no seen calibration, ``cfg.seen_calibration == 0``: the ``-st`` presets;
        the VOC-st convention, so that :func:`cascade_clip.checkpoint.official_preset` recognises the export of every
        dataset's ``-st`` model)."""
        state = {to_official_key(k): v for k, v in self.state_dict().items()}
        trained = len(self.cfg.seen) if self.cfg.seen_calibration and self.cfg.seen else len(self.cfg.class_names)
        state[LOSS_BUFFER_KEY] = loss_buffer(trained).to(self.head.weights_s1.device)
        return state
