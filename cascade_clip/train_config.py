"""Typed, nested training configuration (torchtitan style) with the paper's presets and dotted overrides.

``Config`` = ``model`` (:class:`cascade_clip.config.ModelConfig`) + ``data`` + ``optim`` + ``train`` + ``eval``.
Presets ``voc``, ``context``, ``coco`` (inductive) and ``voc-st``, ``context-st``, ``coco-st`` (transductive
self-training, started with ``--load-from`` an inductive checkpoint) hold the official values (MODEL_SPEC.md sections
1 and 6). ``apply_override(cfg, "train.iters=100")`` sets any field, parsing the value by the field's type.

Batch: ``train.batch_size`` is images per GPU (process) per micro-step, as mmseg's ``samples_per_gpu``; the effective
batch is batch_size x grad_accum x world size. The paper used 4 GPUs x 4 images (VOC-st: 4 x 8); on fewer GPUs,
raise ``train.grad_accum`` to keep the effective batch (e.g. one GPU: ``--set train.grad_accum=4``): the micro-batches
are normalised together (:mod:`cascade_clip.accumulation`), so the step's gradient is that of the paper's 4 GPUs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from .catalog import DATASET_NAMES, dataset_info
from .config import ModelConfig
from .schedule import adamw_flags

# Precision names of train, eval and predict -> the torch.autocast dtype (None: no autocast, float32).
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16/fp16 autocast on GPU; fp32 on CPU (CPU autocast is slow and not what the recipe measures)."""
    return AUTOCAST_DTYPES[precision] if device.type == "cuda" else None


@dataclass
class DataConfig:
    dataset: str = "voc"  # layout and class list: voc, context, coco
    root: str = "data"  # folder holding the layout root (data/VOCdevkit/VOC2012) or the layout root itself
    train_split: str = "train+aug"  # VOC trains on train + SegmentationClassAug, as officially
    val_split: str = "val"
    text_embeddings: Optional[str] = None  # (C, D) .npy of the dataset's classes; None = open_clip text tower
    templates: str = "single"  # prompt templates when embedding class names: single (VOC) or multi (Context, COCO)
    scale: Tuple[int, int] = (2048, 512)  # mmseg img_scale of the random rescale (train only; the test scale is eval.short_side)
    ratio_range: Tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    num_workers: int = 4  # loader processes per rank


@dataclass
class OptimConfig:
    """AdamW with the effective official groups: every trainable parameter lr 2e-4 and weight decay 0.01."""

    lr: float = 2e-4
    weight_decay: float = 0.01
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    power: float = 0.9  # poly decay
    min_lr: float = 1e-6
    warmup_iters: int = 1500  # linear warm-up
    warmup_ratio: float = 1e-6  # warm-up starts at lr x warmup_ratio
    grad_clip: Optional[float] = None  # official: none
    implementation: str = "fused"  # torch's AdamW kernel: fused, foreach or for-loop (schedule.build_optimizer)


COMPILE_MODES = ("none", "default", "reduce-overhead")


def torch_compile_mode(name: str) -> Optional[str]:
    """``train.compile`` -> the ``mode`` argument of ``torch.compile`` (its default mode is ``None``)."""
    return None if name == "default" else name


@dataclass
class TrainSection:
    iters: int = 20000  # optimiser steps
    batch_size: int = 4  # images per process per micro-step (mmseg samples_per_gpu)
    grad_accum: int = 1  # micro-steps per optimiser step
    transductive: bool = False  # self-training with pseudo-labels for unseen pixels (the -st presets)
    precision: str = "bf16"  # bf16 (autocast, GPU only; fp32 on CPU), fp16 (autocast + GradScaler), fp32
    kernels: str = "auto"  # ops backend: auto, triton, cpp, reference
    # torch.compile of the forward: none, default, or reduce-overhead (CUDA graphs). A bf16 step of the small head is
    # partly host-bound (Python and launch overhead), which compiling removes; the eager path stays the default.
    compile: str = "none"
    seed: int = 0  # model init uses it on every rank; rank r then runs with seed + r (dropout)
    work_dir: str = "work_dirs/run"
    checkpoint_interval: int = 2000  # iterations between checkpoints (and the last one always)
    keep_checkpoints: int = 0  # iter_<N>.pt files to keep (0 = all; latest.pt is always kept)
    log_interval: int = 50
    tensorboard: bool = False  # also write TensorBoard scalars (needs the tensorboard package)
    eval_at_start: bool = False  # evaluate the initial model first (a baseline, e.g. before self-training)
    eval_at_end: bool = True  # evaluate the final model on data.val_split


@dataclass
class EvalSection:
    short_side: int = 512  # test scale: short side resized to this (official Resize min_size=512 in (2048, 512))
    save_preds: Optional[str] = None
    # autocast of the evaluations inside `train` (GPU or CPU, as `cascade-clip eval --precision`): fp32 (official; the
    # same numbers as `cascade-clip eval`, whose --precision defaults to fp32 too), bf16 or fp16. Training precision
    # does not carry over.
    precision: str = "fp32"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "Config":
        sections = [f.name for f in dataclasses.fields(cls)]
        unknown_sections = sorted(set(values) - set(sections))
        if unknown_sections:
            raise ValueError(f"unknown config sections {unknown_sections}; known: {sections}")
        cfg = cls()
        for section in dataclasses.fields(cls):
            if section.name not in values:
                continue
            current = getattr(cfg, section.name)
            known = {f.name for f in dataclasses.fields(current)}
            unknown = sorted(set(values[section.name]) - known)
            if unknown:
                raise ValueError(f"unknown config keys {[section.name + '.' + k for k in unknown]}")
            merged = {**dataclasses.asdict(current), **values[section.name]}
            setattr(cfg, section.name, type(current)(**_coerce_section(type(current), merged)))
        return cfg


PRESETS = tuple(DATASET_NAMES) + tuple(f"{n}-st" for n in DATASET_NAMES)
_TEMPLATES = {"voc": "single", "context": "multi", "coco": "multi"}
_SPLITS = {"voc": "train+aug", "context": "train", "coco": "train"}


def preset(name: str) -> Config:
    """The paper's configuration ``name`` (``voc``, ``context``, ``coco``, or a ``-st`` transductive variant)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; known: {list(PRESETS)}")
    base, _, variant = name.partition("-")
    transductive = variant == "st"
    info = dataset_info(base)
    iters = info.transductive_iters if transductive else info.inductive_iters
    return Config(
        model=ModelConfig.preset(name),
        data=DataConfig(dataset=base, train_split=_SPLITS[base], templates=_TEMPLATES[base]),
        optim=OptimConfig(),
        train=TrainSection(
            iters=iters,
            batch_size=8 if name == "voc-st" else 4,
            transductive=transductive,
            checkpoint_interval=min(2000, iters),
            work_dir=f"work_dirs/{name}",
        ),
        eval=EvalSection(),
    )


# ----------------------------------------------------------------------------- overrides
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(text: Any, tp: Any, key: str) -> Any:
    """Parse ``text`` (a string from the command line, or an already-typed value) as type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if isinstance(text, str) and text.strip().lower() in ("none", "null", ""):
            return None
        if text is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse(text, inner[0], key)
    if origin in (tuple, Tuple, list, List):
        if isinstance(text, str):
            stripped = text.strip()
            if stripped.startswith("["):
                items = json.loads(stripped)
            elif stripped.startswith("("):
                items = [s for s in stripped[1:-1].split(",") if s.strip()]
            else:
                items = [s for s in stripped.split(",") if s.strip()]
        else:
            items = list(text)
        elem = args[0] if args else str
        if args and len(args) > 1 and args[-1] is not Ellipsis:
            if len(items) != len(args):
                raise ValueError(f"{key} needs {len(args)} values, got {items}")
            return tuple(_parse(v, a, key) for v, a in zip(items, args))
        return tuple(_parse(v, elem, key) for v in items)
    if tp is bool:
        if isinstance(text, bool):
            return text
        value = str(text).strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}: expected a boolean (true/false), got {text!r}")
    if tp in (int, float, str):
        if tp is int and isinstance(text, float):  # a JSON 7.9 would silently become 7
            if not text.is_integer():
                raise ValueError(f"{key}: expected an integer, got {text!r}")
            return int(text)
        if tp is int and isinstance(text, bool):
            raise ValueError(f"{key}: expected an integer, got {text!r}")
        try:
            if tp is int and isinstance(text, str):
                return int(text.strip(), 0)
            return tp(text.strip() if isinstance(text, str) else text)
        except ValueError as exc:
            raise ValueError(f"{key}: expected {tp.__name__}, got {text!r}") from exc
    return text


def _coerce_section(cls, values: Dict[str, Any]) -> Dict[str, Any]:
    hints = _hints(cls)
    return {k: _parse(v, hints[k], k) if k in hints else v for k, v in values.items()}


def model_override(assignment: str) -> Tuple[str, Any]:
    """``FIELD=VALUE`` or ``model.FIELD=VALUE`` (eval's and predict's ``--set``) -> (ModelConfig field, value parsed
    to the field's type); a named ValueError otherwise."""
    key, sep, value = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"expected FIELD=VALUE, got {assignment!r}")
    name = key.removeprefix("model.")
    hints = _hints(ModelConfig)
    if name not in hints:
        raise ValueError(f"unknown model config key {key!r}")
    return name, _parse(value, hints[name], key)


def keys(cfg: Config) -> List[str]:
    """Every dotted key of the configuration."""
    return [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]


def get_value(cfg: Config, key: str) -> Any:
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _parse_assignment(cfg: Config, assignment: str):
    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, _, text = assignment.partition("=")
    key = key.strip()
    section_name, _, name = key.partition(".")
    sections = {f.name for f in dataclasses.fields(cfg)}
    if section_name not in sections or not name:
        raise ValueError(f"unknown config key {key!r}; keys look like train.iters (see `cascade-clip config show`)")
    hints = _hints(type(getattr(cfg, section_name)))
    if name not in hints:
        close = [k for k in keys(cfg) if k.startswith(section_name + ".")]
        raise ValueError(f"unknown config key {key!r}; known in {section_name}: {close}")
    return section_name, name, _parse(text, hints[name], key)


def apply_overrides(cfg: Config, assignments: List[str]) -> Config:
    """Set every ``section.field=value`` of ``assignments`` on ``cfg`` (a new Config). Values are parsed by the
    field's type; each section is rebuilt once, so fields checked together (class_names and seen) may change together."""
    changes: Dict[str, Dict[str, Any]] = {}
    for assignment in assignments:
        section_name, name, value = _parse_assignment(cfg, assignment)
        changes.setdefault(section_name, {})[name] = value
    for section_name, values in changes.items():
        try:
            new_section = dataclasses.replace(getattr(cfg, section_name), **values)
        except (TypeError, ValueError) as exc:
            shown = ", ".join(f"{section_name}.{k}={v!r}" for k, v in values.items())
            raise ValueError(f"invalid {section_name} settings ({shown}): {exc}") from exc
        cfg = dataclasses.replace(cfg, **{section_name: new_section})
    return cfg


def apply_override(cfg: Config, assignment: str) -> Config:
    """Set one ``section.field=value`` on ``cfg`` (a new Config)."""
    return apply_overrides(cfg, [assignment])


def validate(cfg: Config) -> None:
    """Cross-field checks that a dataclass cannot express."""
    t, o = cfg.train, cfg.optim
    if t.iters <= 0 or t.batch_size <= 0 or t.grad_accum <= 0 or t.checkpoint_interval <= 0:
        raise ValueError("train.iters, train.batch_size, train.grad_accum and train.checkpoint_interval must be > 0")
    if t.precision not in AUTOCAST_DTYPES:
        raise ValueError(f"train.precision must be bf16, fp16 or fp32, got {t.precision!r}")
    if t.kernels not in ("auto", "triton", "cpp", "reference"):
        raise ValueError(f"train.kernels must be auto, triton, cpp or reference, got {t.kernels!r}")
    if cfg.eval.precision not in AUTOCAST_DTYPES:
        raise ValueError(f"eval.precision must be bf16, fp16 or fp32, got {cfg.eval.precision!r}")
    if t.compile not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {', '.join(COMPILE_MODES)}, got {t.compile!r}")
    adamw_flags(o)  # raises for an unknown optim.implementation
    if o.lr <= 0 or o.warmup_iters < 0 or not 0 < o.warmup_ratio <= 1:
        raise ValueError(f"optim: lr {o.lr}, warmup_iters {o.warmup_iters}, warmup_ratio {o.warmup_ratio} invalid")
    if not 0 <= o.min_lr <= o.lr:  # a larger min_lr would make the poly schedule rise
        raise ValueError(f"optim.min_lr must be in [0, optim.lr = {o.lr}], got {o.min_lr}")
    if o.power < 0:  # a negative power divides by zero on the last step
        raise ValueError(f"optim.power must be >= 0, got {o.power}")
    if o.grad_clip is not None and o.grad_clip < 0:  # clip_grad_norm_ with a negative norm flips the gradient
        raise ValueError(f"optim.grad_clip must be >= 0 (0 or none: no clipping), got {o.grad_clip}")
    if t.log_interval <= 0 or t.keep_checkpoints < 0:
        raise ValueError(f"train.log_interval must be > 0 and train.keep_checkpoints >= 0, got {t.log_interval}, "
                         f"{t.keep_checkpoints}")
    if cfg.eval.short_side <= 0:
        raise ValueError(f"eval.short_side must be > 0, got {cfg.eval.short_side}")
    if cfg.data.templates not in ("single", "multi"):
        raise ValueError(f"data.templates must be single or multi, got {cfg.data.templates!r}")
    if cfg.model.img_size % 16 and cfg.model.clip_model in ("ViT-B-16", "cascade-tiny"):
        raise ValueError(f"model.img_size {cfg.model.img_size} must be a multiple of the patch size 16")
    if not cfg.model.seen:
        raise ValueError("model.seen is empty: no class to train on")
    if t.transductive and cfg.model.seen_calibration:
        warnings.warn(
            f"train.transductive=true with model.seen_calibration={cfg.model.seen_calibration}: the official "
            "self-training models are evaluated without the seen calibration (the -st presets set it to 0); set "
            "model.seen_calibration=0 to match them",
            stacklevel=2,
        )


def resolve(name: str, overrides: List[str] = (), **flags: Optional[str]) -> Config:
    """Preset ``name`` (or a saved JSON config file) + ``--set`` overrides + the command-line flags
    (``data_root``, ``work_dir``, ``text_embeddings``), validated."""
    if name.endswith(".json"):
        try:
            with open(name, encoding="utf-8") as f:
                cfg = Config.from_dict(json.load(f))
        except (OSError, ValueError) as exc:  # unreadable, not JSON, or unknown sections/keys
            raise ValueError(f"cannot read config file {name}: {exc}") from exc
    else:
        cfg = preset(name)
    flag_keys = {"data_root": "data.root", "work_dir": "train.work_dir", "text_embeddings": "data.text_embeddings"}
    assignments = list(overrides) + [f"{key}={flags[flag]}" for flag, key in flag_keys.items() if flags.get(flag) is not None]
    cfg = apply_overrides(cfg, assignments)
    clip_file = cfg.model.clip_pretrained
    if clip_file and os.path.isfile(clip_file):
        # checkpoints record it (to embed new class names later): an absolute path works from any folder
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, clip_pretrained=os.path.abspath(clip_file)))
    validate(cfg)
    return cfg
