"""Typed model configuration and the paper's presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

from .catalog import DATASET_NAMES, dataset_info


@dataclass
class ModelConfig:
    """Everything that shapes a :class:`cascade_clip.CascadeCLIP`. Defaults are the official VOC inductive model."""

    # --- classes ---
    dataset: str = "voc"  # which class list / split this model was built for ("voc", "context", "coco")
    class_names: Tuple[str, ...] = ()  # all classes of the dataset, in label order
    seen: Tuple[int, ...] = ()  # indices into class_names trained on (inductive); the rest are unseen

    # --- backbone: open_clip CLIP ViT with deep visual prompts ---
    clip_model: str = "ViT-B-16"  # open_clip architecture name (also "cascade-tiny", registered by this package)
    clip_pretrained: Optional[str] = None  # open_clip pretrained tag (e.g. "openai") or a local file; None = random
    quick_gelu: bool = True  # OpenAI's CLIP weights were trained with QuickGELU
    img_size: int = 512  # training crop; sets the stored positional-embedding grid (img_size / patch)
    num_prompt_tokens: int = 10  # VPT tokens per layer (official: VOC 10, Context 35, COCO 50)
    deep_prompt_layers: Optional[int] = None  # blocks 1..n get fresh prompts; None = every block after the first
    prompt_dropout: float = 0.1
    tap_layers: Tuple[int, ...] = (5, 6, 7, 8, 9, 10)  # 0-based blocks whose outputs feed the head
    drop_path_rate: float = 0.0  # stochastic depth; dead code (so 0) in the official model

    # --- head ---
    taps_per_stage: int = 3  # NGA groups consecutive taps: (5,6,7) and (8,9,10); the last layer is the 3rd stage
    nga_sigma: float = 1.0  # NGA weights start at exp(-x^2 / (2 sigma^2)), x = distance to the stage's last block
    decoder_layers: int = 3
    decoder_heads: Optional[int] = None  # None = embed_dim // 64 (8 for ViT-B/16)
    decoder_ffn_dim: Optional[int] = None  # None = 4 * embed_dim (2048 for ViT-B/16)
    decoder_dropout: float = 0.1

    # --- inference ---
    seen_calibration: float = 0.1  # subtracted from seen classes' sigmoid scores (0 for transductive models)
    crop_size: int = 512  # sliding-window crop
    stride: int = 426  # sliding-window stride

    # --- loss (official SegLossPlus) ---
    focal_weight: float = 100.0
    dice_weight: float = 1.0
    loss_ignores_ignore_pixels: bool = False  # True = deviation: 255 pixels excluded from focal and dice terms

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        """The official configuration of ``name`` (``"voc"``, ``"context"``, ``"coco"``), with field overrides.

        A ``-st`` suffix (e.g. ``"voc-st"``) gives the transductive (self-training) variant: no seen calibration.
        """
        base, _, variant = name.partition("-")
        if base not in DATASET_NAMES or variant not in ("", "st"):
            raise ValueError(f"unknown preset {name!r}; known: {[*DATASET_NAMES, *(n + '-st' for n in DATASET_NAMES)]}")
        info = dataset_info(base)
        values = dict(
            dataset=base,
            class_names=info.classes,
            seen=info.seen,
            num_prompt_tokens=info.num_prompt_tokens,
            seen_calibration=0.0 if variant == "st" else 0.1,
        )
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown ModelConfig field(s) {unknown}")
        values.update(overrides)
        return cls(**values)

    @property
    def unseen(self) -> Tuple[int, ...]:
        seen = set(self.seen)
        return tuple(i for i in range(len(self.class_names)) if i not in seen)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.seen = tuple(int(i) for i in self.seen)
        self.tap_layers = tuple(int(i) for i in self.tap_layers)
        if self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be >= 0, got {self.num_prompt_tokens}")
        if len(self.tap_layers) != 2 * self.taps_per_stage:
            raise ValueError(
                f"tap_layers {self.tap_layers} must hold two NGA stages of taps_per_stage={self.taps_per_stage}"
            )
        if self.seen and (min(self.seen) < 0 or max(self.seen) >= len(self.class_names)):
            raise ValueError(f"seen indices {self.seen} out of range for {len(self.class_names)} classes")
        if not 0 < self.stride <= self.crop_size:  # a longer stride leaves pixels outside every window
            raise ValueError(f"sliding windows need 0 < stride <= crop_size, got crop_size {self.crop_size}, "
                             f"stride {self.stride}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})
