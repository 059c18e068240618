"""``Segmenter``: load a model and class names once, then segment PIL images, arrays, tensors or files.

    seg = Segmenter.from_checkpoint("cascade_voc.pth", classes=["cat", "sofa", "tv monitor", "plant"])
    result = seg(Image.open("room.jpg"))        # result.labels (H, W), result.scores (C, H, W), result.areas()

    seg = Segmenter.training_free("openai", classes="cat,sofa,floor")   # MaskCLIP on plain CLIP, no checkpoint

Per image, as in the official test pipeline: normalise (ImageNet mean/std), resize so the short side is ``short_side``
(512 officially), sliding-window scores (calibrated for seen classes in checkpoint mode), scores resized back to the
original size, argmax over classes.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from .class_list import ClassList, official_templates, parse_classes
from .image_io import normalize_rgb, pil_to_rgb, read_rgb
from .inference import check_windows, official_test_size, scores_at_original_size
from .text import DEFAULT_CACHE_DIR
from .train_config import AUTOCAST_DTYPES
from .transforms import eval_resize

ImageLike = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
OFFICIAL_TEST_SHORT_SIDE = 512  # mmseg Resize(keep_ratio, min_size=512) of the official test pipeline
# Largest float32 score buffer (classes x test height x test width) an image may need: 16 GiB, far above any photo at
# the official 512 (a 4000x3000 photo with 171 classes needs 0.2 GiB), far below what a 1x1000 strip asks for.
MAX_SCORE_BUFFER_BYTES = 16 * 2**30


@dataclass
class Segmentation:
    """labels (H, W) int64 class indices at the input's size; scores (C, H, W) float32 or None; class names."""

    labels: torch.Tensor
    scores: Optional[torch.Tensor]
    class_names: Tuple[str, ...]

    def pixel_counts(self) -> Dict[int, int]:
        """Class index -> pixel count, for the classes present."""
        counts = torch.bincount(self.labels.flatten().cpu(), minlength=len(self.class_names))
        return {i: int(c) for i, c in enumerate(counts.tolist()) if c}

    def areas(self) -> Dict[str, float]:
        """Class name -> fraction of the image, for the classes present, largest first."""
        counts = self.pixel_counts()
        total = self.labels.numel()
        ordered = sorted(counts.items(), key=lambda item: -item[1])
        return {self.class_names[i]: count / total for i, count in ordered}


def as_rgb_uint8(image: ImageLike) -> np.ndarray:
    """Any supported image -> (H, W, 3) uint8 RGB.

    Paths are read from disk and PIL images converted (16-bit and float modes scaled, not clipped), both turned upright
    by their EXIF orientation (``seg(path)`` and ``seg(Image.open(path))`` agree); numpy arrays are (H, W) or
    (H, W, 1|3|4); tensors are (3|1|4, H, W) or (1, C, H, W) (the torchvision layout). Integer values are 0..255,
    float values 0..1 (torchvision's convention). Alpha is dropped, grayscale repeated.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_rgb(os.fspath(image), upright=True)
    if isinstance(image, Image.Image):
        return pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16
            tensor = tensor.float()
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() == 3:
            if tensor.shape[0] not in (1, 3, 4):
                raise ValueError(f"image tensors are (C, H, W) with C in 1, 3, 4; got shape {tuple(image.shape)}")
            tensor = tensor.permute(1, 2, 0)
        array = tensor.numpy()
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"unsupported image type {type(image).__name__}: give a path, PIL image, array or tensor")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or 0 in array.shape[:2]:
        raise ValueError(f"image arrays are (H, W) or (H, W, 1|3|4) and non-empty; got shape {array.shape}")
    if array.dtype == np.bool_:
        raise ValueError("boolean arrays are masks, not images: pass uint8 (0..255) or float (0..1) values")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError("the image holds NaN or inf values")
        if array.min() < 0 or array.max() > 1:
            raise ValueError(
                f"float images must hold values in [0, 1], got [{array.min():.9g}, {array.max():.9g}]; "
                "pass uint8 for 0..255"
            )
        array = np.round(array.astype(np.float64) * 255.0)  # as PIL float images (image_io.pil_to_rgb)
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"integer images must hold values in 0..255, got [{array.min()}, {array.max()}]")
    array = array.astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def labels_at_size(scores: torch.Tensor, size: Tuple[int, int], chunk: int = 16) -> torch.Tensor:
    """Argmax over classes of ``scores`` (1, C, h, w) resized bilinearly to ``size`` -> (H, W) int64.

    Resizes ``chunk`` classes at a time (bilinear resizing is per channel, so the result is exact): a large photo with
    171 classes would otherwise need C x H x W floats. Ties go to the lower index, as with ``argmax``.
    """
    best = labels = None
    for start in range(0, scores.shape[1], chunk):
        part = scores_at_original_size(scores[:, start : start + chunk], size)[0]
        value, index = part.max(dim=0)
        if best is None:
            best, labels = value, index
        else:
            better = value > best
            best = torch.where(better, value, best)
            labels = torch.where(better, index + start, labels)
    return labels


def _seen_indices(names: Sequence[str], trained_names: Sequence[str], trained_seen: Sequence[int],
                  seen: Optional[Sequence[str]]) -> Tuple[int, ...]:
    """Indices into ``names`` to calibrate: the named ``seen`` classes, or (None) those the model was trained on."""
    if seen is None:
        seen_names = {trained_names[i] for i in trained_seen}
        return tuple(i for i, name in enumerate(names) if name in seen_names)
    wanted = [str(s).strip() for s in seen]
    unknown = [s for s in wanted if s not in names]
    if unknown:
        raise ValueError(f"seen classes {unknown} are not in the class list {list(names)}")
    return tuple(names.index(s) for s in wanted)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Segmenter:
    """Segments images into ``class_names`` with a per-window score function (see the module docstring).

    Build it with :meth:`from_checkpoint` or :meth:`training_free`; the constructor takes the parts directly:
    ``score_fn`` maps normalised images (1, 3, h, w) on ``device`` to scores (1, C, h, w) whose argmax is the label.
    ``precision``: ``"fp32"`` (official), or ``"bf16"``/``"fp16"`` to run ``score_fn`` under ``torch.autocast`` (faster
    on a GPU; scores then differ from fp32 by the low precision's rounding).
    """

    def __init__(
        self,
        *,
        score_fn: Callable[[torch.Tensor], torch.Tensor],
        class_names: Sequence[str],
        device: Union[str, torch.device] = "cpu",
        short_side: Optional[int] = OFFICIAL_TEST_SHORT_SIDE,
        seen: Sequence[int] = (),
        preset: Optional[str] = None,
        description: str = "",
        precision: str = "fp32",
    ):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST_DTYPES)}, got {precision!r}")
        self.score_fn = score_fn
        self.precision = precision
        self.class_names = tuple(class_names)
        if len(self.class_names) == 1:
            warnings.warn(f"one class ({self.class_names[0]!r}): every pixel gets it (the label is the best-scoring "
                          "class); name the other things in the images too, e.g. 'background'", stacklevel=2)
        self.device = torch.device(device)
        self.short_side = short_side or None
        self.seen = tuple(seen)
        self.preset = preset
        self.description = description

    def _check_test_size(self, height: int, width: int) -> None:
        """Refuse an image whose official test size (short side ``short_side``, aspect kept, no cap on the long side,
        as mmseg's test resize) needs a score buffer beyond :data:`MAX_SCORE_BUFFER_BYTES`: a 1x1000 strip would
        become 512x512000, tens of GB per class list, and fail deep inside torch."""
        test_h, test_w = official_test_size(height, width, self.short_side) if self.short_side else (height, width)
        needed = len(self.class_names) * test_h * test_w * 4
        if needed > MAX_SCORE_BUFFER_BYTES:
            raise ValueError(
                f"a {width}x{height} image is tested at {test_w}x{test_h} (short side {self.short_side or 'kept'}), "
                f"where the scores of {len(self.class_names)} classes need {needed / 2**30:.0f} GiB; crop it to a "
                "less extreme aspect ratio or pass a smaller short side"
            )

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_checkpoint(
        cls,
        path: str,
        classes: Union[str, Sequence[str]],
        *,
        text_embeddings: Optional[str] = None,
        clip_weights: Optional[str] = None,
        templates: Union[None, str, Sequence[str]] = None,
        seen: Optional[Sequence[str]] = None,
        calibration: bool = True,
        short_side: Optional[int] = OFFICIAL_TEST_SHORT_SIDE,
        device: Union[None, str, torch.device] = None,
        cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
        precision: str = "fp32",
        config=None,
        **overrides,
    ) -> "Segmenter":
        """A Cascade-CLIP checkpoint (this project's or official) for ``classes``.

        ``classes``: names, a preset (``"voc"``), a class file or ``"a,b,c"``. Text: ``text_embeddings`` (.npy, one row
        per class); else, for exactly the classes a checkpoint of this project was trained on and no ``clip_weights``
        or ``templates``, the class embeddings it stores (the vectors it was trained with); else computed
        (``clip_weights`` > the checkpoint's ``text_encoder.*`` > its config's ``clip_pretrained``) with ``templates`` (default: the official set of the preset ``classes`` name, else of
        the checkpoint's dataset). ``seen``: class names to calibrate; None = those of the list the checkpoint was
        trained on, or none when ``classes`` is another dataset's preset (cross-dataset, as officially);
        ``calibration=False``: none.
        ``config``/``overrides``: as :func:`cascade_clip.checkpoint.load_model` (e.g. ``crop_size``). ``precision``: see
        the class (``"fp32"``, the official, by default).
        """
        from .checkpoint import AmbiguousCheckpointWarning, load_model
        from .text_weights import embeddings_for, embeddings_from_file, pick_text_weights

        import dataclasses

        from .config import ModelConfig

        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
        if unknown:  # load_model's from_dict would drop them silently
            raise ValueError(f"unknown ModelConfig field(s) {unknown}")
        class_list = classes if isinstance(classes, ClassList) else parse_classes(classes)
        device = torch.device(device) if device is not None else _default_device()
        # The checkpoint holds every image-tower weight, so the model is built without its CLIP weights: a tag would
        # be fetched and a file (possibly on another machine) read only to be overwritten.
        overrides.setdefault("clip_pretrained", None)
        try:
            with warnings.catch_warnings():
                if not calibration:  # inductive or -st only decides the calibration, which is off
                    warnings.simplefilter("ignore", AmbiguousCheckpointWarning)
                model, raw = load_model(path, config=config, map_location=str(device), **overrides)
        except ValueError as exc:
            raise ValueError(str(exc) if path in str(exc) else f"{path}: {exc}") from exc
        cfg = model.cfg
        stored_cfg = ModelConfig.from_dict(raw["model_config"]) if "model_config" in raw else cfg
        stored = raw.get("text_embeddings")
        if text_embeddings:
            text = embeddings_from_file(text_embeddings, class_list.names, dim=model.embed_dim)
        elif (stored is not None and clip_weights is None and templates is None
              and list(raw.get("class_names") or []) == list(class_list.names)):
            # the classes a checkpoint of this project was trained on: the vectors it was trained with (as eval)
            text = torch.as_tensor(stored).float()
        else:
            source = pick_text_weights(clip_model=cfg.clip_model, clip_weights=clip_weights, checkpoint_path=path,
                                       checkpoint_raw=raw, checkpoint_config=config or stored_cfg,
                                       quick_gelu=cfg.quick_gelu)
            # a preset class list is embedded as the official configs embed that dataset (eval does the same)
            default_templates = official_templates(class_list.preset or cfg.dataset)
            text = embeddings_for(class_list.names, source, templates=templates or default_templates,
                                  cache_dir=cache_dir, device=device)
        if text.shape[1] != model.embed_dim:
            raise ValueError(f"text embeddings are {text.shape[1]} wide, the model in {path} needs {model.embed_dim}")
        text = text.to(device)
        cross_dataset = seen is None and class_list.preset not in (None, cfg.dataset)
        if not calibration or cross_dataset:
            # cross-dataset (a COCO model on the voc/context list): every class counts as seen, as in the official
            # coco2voc/coco2context configs and `cascade-clip eval`; calibrating all rows alike changes no label
            seen_idx = ()
        else:
            seen_idx = _seen_indices(class_list.names, cfg.class_names, cfg.seen, seen)

        def score_fn(images: torch.Tensor) -> torch.Tensor:
            return model.segment(images, text, seen=seen_idx)

        if seen_idx and cfg.seen_calibration:
            seen_text = ", ".join(class_list.names[i] for i in seen_idx)
            calibration_text = f"calibrated (-{cfg.seen_calibration}) seen classes: {seen_text}"
        else:
            calibration_text = "no seen-class calibration"
        description = f"Cascade-CLIP {cfg.clip_model} from {path} ({cfg.dataset} preset), {calibration_text}"
        segmenter = cls(score_fn=score_fn, class_names=class_list.names, device=device, short_side=short_side,
                        seen=seen_idx, preset=class_list.preset, description=description, precision=precision)
        segmenter.model, segmenter.text = model, text
        return segmenter

    @classmethod
    def training_free(
        cls,
        clip_weights: Optional[str],
        classes: Union[str, Sequence[str]],
        *,
        clip_model: str = "ViT-B-16",
        text_embeddings: Optional[str] = None,
        templates: Union[str, Sequence[str]] = "multi",
        temperature: Optional[float] = None,
        short_side: Optional[int] = OFFICIAL_TEST_SHORT_SIDE,
        crop_size: int = 512,
        stride: int = 426,
        device: Union[None, str, torch.device] = None,
        cache_dir: Optional[str] = DEFAULT_CACHE_DIR,
        precision: str = "fp32",
        quick_gelu: bool = True,
    ) -> "Segmenter":
        """Dense CLIP (MaskCLIP recipe, :mod:`cascade_clip.training_free`) with ``clip_weights`` (tag or file).

        Scores are per-class softmax probabilities of cosine / ``temperature`` (default CLIP's ``1/logit_scale``),
        averaged over sliding windows of ``crop_size`` / ``stride``. ``quick_gelu``: the activation the weights were
        trained with (OpenAI's CLIP: QuickGELU; most other open_clip weights: GELU, ``False``).
        """
        from .text_weights import TextWeights, embeddings_for, embeddings_from_file
        from .training_free import build_dense_clip

        if not clip_weights:
            raise ValueError("training-free mode needs CLIP weights: an open_clip tag (e.g. 'openai') or a local file")
        check_windows(crop_size, stride)
        class_list = classes if isinstance(classes, ClassList) else parse_classes(classes)
        device = torch.device(device) if device is not None else _default_device()
        dense = build_dense_clip(clip_model, clip_weights, temperature=temperature, quick_gelu=quick_gelu).to(device)
        if text_embeddings:
            text = embeddings_from_file(text_embeddings, class_list.names, dim=dense.visual.proj.shape[1])
        else:
            text = embeddings_for(class_list.names, TextWeights(clip_model, pretrained=clip_weights, quick_gelu=quick_gelu),
                                  templates=templates, cache_dir=cache_dir, device=device)
        text = text.to(device)

        def score_fn(images: torch.Tensor) -> torch.Tensor:
            return dense.segment(images, text, crop=crop_size, stride=stride)

        description = (f"training-free dense CLIP {clip_model} ({clip_weights}), temperature {dense.temperature:.4g}, "
                       f"crop {crop_size} stride {stride}")
        segmenter = cls(score_fn=score_fn, class_names=class_list.names, device=device, short_side=short_side,
                        preset=class_list.preset, description=description, precision=precision)
        segmenter.model, segmenter.text = dense, text
        return segmenter

    # ------------------------------------------------------------------ use
    @torch.no_grad()
    def __call__(self, image: ImageLike, *, return_scores: bool = True) -> Segmentation:
        """Segment one image (path, PIL image, (H, W[, C]) array or (C, H, W) tensor) at its own size."""
        return self.segment_rgb(as_rgb_uint8(image), return_scores=return_scores)

    @torch.no_grad()
    def segment_rgb(self, rgb: np.ndarray, *, return_scores: bool = True) -> Segmentation:
        """(H, W, 3) uint8 RGB -> :class:`Segmentation` at (H, W)."""
        size = rgb.shape[:2]
        self._check_test_size(*size)
        if self.short_side:
            # the official test order: resize the 0..255 image, round it back to integers, then normalise
            pixels = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0).to(self.device)
            images = eval_resize(pixels, self.short_side)
        else:
            images = normalize_rgb(rgb).unsqueeze(0).to(self.device)
        dtype = AUTOCAST_DTYPES[self.precision]
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            scores = self.score_fn(images).float()
        if return_scores:
            full = scores_at_original_size(scores, size)[0]
            return Segmentation(full.argmax(dim=0).cpu(), full.cpu(), self.class_names)
        return Segmentation(labels_at_size(scores, size).cpu(), None, self.class_names)
