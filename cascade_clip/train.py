"""``cascade-clip train``: the official Cascade-CLIP training recipe, iteration-based, on one or many GPUs (or CPU).

* Inductive (``voc``, ``context``, ``coco``): seen text rows only, unseen pixels ignored, seen labels re-indexed.
* Transductive (``*-st``): all text rows, unseen pixels pseudo-labelled by the model; start it with ``--load-from``
  an inductive checkpoint (weights only: optimizer and schedule restart, as officially).
* AdamW (lr 2e-4, weight decay 0.01 for every trainable parameter), poly 0.9 with a 1500-iteration linear warm-up;
  only parameters that receive gradients are optimised, so DDP needs no ``find_unused_parameters``.
* bf16 autocast on GPU by default (``train.precision``: fp32, or fp16 with a GradScaler); fp32 on CPU.
* Several processes: ``torchrun --nproc_per_node N -m cascade_clip.cli train ...`` (NCCL on GPU, gloo on CPU).
* Checkpoints ``WORK_DIR/iter_<N>.pt`` + ``latest.pt`` every ``train.checkpoint_interval`` iterations; ``--resume``
  (a path, or ``auto``) continues exactly where the checkpoint was written.

Examples::

    cascade-clip train --config voc --data-root data --set model.clip_pretrained=ViT-B-16.pt
    cascade-clip train --config voc-st --data-root data --load-from work_dirs/voc/iter_10000.pt
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import sys
import time
import traceback
import warnings
from contextlib import nullcontext
from typing import Any, Callable, Dict, List, Optional

import torch

from . import distributed
from .checkpoint import write_text_atomic
from .clip_arch import TINY_MODEL_NAME
from .train_config import AUTOCAST_DTYPES, PRESETS, Config, autocast_dtype, resolve, torch_compile_mode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cascade-clip train", description="Train Cascade-CLIP (official recipe).")
    p.add_argument("--config", default="voc", help=f"preset ({', '.join(PRESETS)}) or a saved config .json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted key, e.g. train.iters=1000 (repeatable)")
    p.add_argument("--data-root", help="dataset folder (sets data.root)")
    p.add_argument("--work-dir", help="checkpoints and logs (sets train.work_dir)")
    p.add_argument("--text-embeddings", help="(C, D) .npy of the dataset's class embeddings (sets data.text_embeddings)")
    p.add_argument("--resume", help="training checkpoint to continue from, or 'auto' (WORK_DIR/latest.pt if present)")
    p.add_argument("--load-from", help="initial weights only (ours or an official checkpoint); optimizer/schedule restart")
    p.add_argument("--kernels", choices=("auto", "triton", "cpp", "reference"), help="ops backend (sets train.kernels)")
    return p


class Logger:
    """Rank-0 progress: a tqdm bar on a terminal (else plain lines), JSONL metrics, optional TensorBoard."""

    def __init__(self, cfg: Config, enabled: bool, total: int, start: int):
        self.enabled = enabled
        self.bar = None
        self.jsonl = None
        self.tb = None
        if not enabled:
            return
        os.makedirs(cfg.train.work_dir, exist_ok=True)
        path = os.path.join(cfg.train.work_dir, "metrics.jsonl")
        _keep_records_until(path, start, drop_final_eval=cfg.train.eval_at_end)
        self.jsonl = open(path, "a", encoding="utf-8")
        if cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(cfg.train.work_dir, "tb"))
            except ImportError as exc:
                self.print(f"TensorBoard logging off ({exc}); pip install tensorboard")
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def record(self, values: Dict[str, Any], line: bool) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(values) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and key not in ("iter", "iters"):
                    self.tb.add_scalar(f"train/{key}", value, values["iter"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{values['img_s']:.1f}")
        elif line:
            eta = values["eta_s"]
            print(
                f"iter {values['iter']}/{values['iters']}  loss {values['loss']:.4f} (focal {values['loss_mask']:.4f} "
                f"dice {values['loss_dice']:.4f})  lr {values['lr']:.3e}  {values['img_s']:.1f} img/s  "
                f"ETA {int(eta // 3600):d}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}",
                flush=True,
            )

    def record_eval(self, values: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(values) + "\n")
        self.jsonl.flush()
        if self.tb is not None:  # the summary metrics (mIoU, mIoU_seen, ...; undefined ones are None and skipped)
            for key, value in values.items():
                if isinstance(value, (int, float)) and key != "iter" and math.isfinite(value):
                    self.tb.add_scalar(f"eval/{key}", value, values["iter"])
            self.tb.flush()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _keep_records_until(path: str, iteration: int, drop_final_eval: bool) -> None:
    """Drop the records of ``path`` (JSONL) logged after ``iteration`` (and the final evaluation when
    ``drop_final_eval``), atomically: a resumed run logs those iterations and, if it evaluates at the end, its final
    evaluation again (also when it resumes at its last iteration); a fresh run (``iteration`` 0) starts an empty
    file instead of appending to an old run's."""
    if not os.path.isfile(path):
        return
    kept = []
    if iteration > 0:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    logged = record.get("iter", 0)
                except (ValueError, AttributeError):
                    continue  # a line a killed run left half-written
                final_eval = record.get("eval") == "after training"
                if isinstance(logged, int) and logged <= iteration and not (final_eval and drop_final_eval):
                    kept.append(line if line.endswith("\n") else line + "\n")
    write_text_atomic(path, "".join(kept))


def load_weights(model, path: str) -> str:
    """``--load-from``: weights of ours or an official checkpoint into ``model``; returns a one-line report."""
    from .checkpoint import read_any_checkpoint

    raw = read_any_checkpoint(path)
    if "official_state_dict" in raw:
        report = model.load_official_state_dict(raw["official_state_dict"])
        return f"loaded official weights from {path} ({report})" if str(report) else f"loaded official weights from {path}"
    try:
        model.load_state_dict(raw["model"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"--load-from {path}: weights do not fit this model configuration:\n{exc}") from exc
    return f"loaded weights from {path} (iteration {raw.get('iteration', '?')})"


def run(cfg: Config, *, resume: Optional[str] = None, load_from: Optional[str] = None,
        log: Callable[[str], None] = None) -> Dict[str, Any]:
    """Train with ``cfg`` (resolved); returns ``{"iteration", "losses", "metrics", "metrics_before"}`` on every rank."""
    from . import ops
    from .datasets import build_dataset
    from .evaluate import evaluate_model
    from .accumulation import AccumulatedNormalizer
    from .loss import loss_terms, normalized_loss
    from .model import CascadeCLIP
    from .sampler import BatchStream
    from .schedule import build_optimizer, build_scheduler, load_optimizer_state
    from .text_source import load_text
    from .train_state import (
        clean_stale_temporaries, read_resume_checkpoint, resolve_resume, rng_state, save_training_checkpoint,
        set_rng_state,
    )
    from .transforms import TrainTransform
    from .zero_shot import TrainingLabels, training_text
    from . import distributed as dist_utils

    info = dist_utils.setup()
    net = None
    try:
        ops.set_backend(cfg.train.kernels)
        work_dir = cfg.train.work_dir
        if info.is_main:  # the folder itself is made once the inputs are known to be good (Logger)
            clean_stale_temporaries(work_dir)
        # rank 0 decides which checkpoint (`auto` finds the latest one): every rank then resumes from the same file,
        # or every rank stops with rank 0's reason
        resolved = None
        if info.is_main:
            try:
                resolved = ("path", resolve_resume(resume, work_dir))
            except ValueError as exc:
                resolved = ("error", str(exc))
        kind, value = dist_utils.broadcast_object(resolved)
        if kind == "error":
            raise ValueError(value)
        resume_path = value
        state = read_resume_checkpoint(resume_path, cfg.to_dict()) if resume_path else None

        if state is not None:
            # the batch of an iteration and each rank's place in the sample order depend on the process count
            written_by = state.get("world_size", len(state.get("rng") or []))
            if written_by and written_by != info.world_size:
                raise ValueError(
                    f"{resume_path}: written by {written_by} process(es), this run has {info.world_size}: the images "
                    f"per iteration and the sample order would change; resume with {written_by} process(es), or start "
                    "a new run from its weights with --load-from"
                )
        device = info.device
        mcfg = cfg.model
        ops.resolve(cfg.train.kernels, device)  # a backend that cannot run here fails now, not at step 1
        if state is None and not load_from and mcfg.clip_pretrained is None and mcfg.clip_model != TINY_MODEL_NAME:
            warnings.warn(
                f"model.clip_pretrained is not set: the frozen {mcfg.clip_model} image tower keeps random weights and "
                "cannot learn; set model.clip_pretrained=FILE or an open_clip tag (e.g. ViT-B-16.pt, openai)",
                stacklevel=2,
            )
        if state is None and not load_from and cfg.train.transductive:
            # the pseudo-labels of unseen pixels are the model's own argmax: from an untrained head they are noise
            warnings.warn(
                "train.transductive=true without --load-from: self-training labels unseen pixels with the model's own "
                "predictions, and this run starts from an untrained head; the paper starts it from an inductive "
                "checkpoint (--load-from INDUCTIVE_WORK_DIR/latest.pt)",
                stacklevel=2,
            )

        # Same init on every rank (DDP also broadcasts rank 0's weights); then per-rank seeds for dropout. On resume
        # the checkpoint holds every weight: the CLIP file is not read again (it may have moved since).
        torch.manual_seed(cfg.train.seed)
        model = CascadeCLIP(dataclasses.replace(mcfg, clip_pretrained=None) if state is not None else mcfg)
        model.cfg = mcfg  # the checkpoints record the run's configuration (its CLIP file embeds new class names)
        loaded_report = load_weights(model, load_from) if load_from and not state else None
        model.to(device)
        torch.manual_seed(cfg.train.seed + info.rank)

        # Class embeddings: those stored in the checkpoint on resume (same vectors), else from file / text tower.
        if state is not None and state.get("text_embeddings") is not None:
            text = torch.as_tensor(state["text_embeddings"]).float()
        else:
            text = load_text(mcfg.class_names, embed_dim=model.embed_dim, clip_model=mcfg.clip_model,
                             clip_pretrained=mcfg.clip_pretrained, templates=cfg.data.templates,
                             path=cfg.data.text_embeddings, quick_gelu=mcfg.quick_gelu)
        text = text.to(device)
        train_text = training_text(text, mcfg.seen, cfg.train.transductive)
        num_classes = len(mcfg.class_names)
        to_training_labels = TrainingLabels(mcfg.seen, num_classes, transductive=cfg.train.transductive, device=device)

        transform = TrainTransform(crop=mcfg.img_size, scale=tuple(cfg.data.scale), ratio_range=tuple(cfg.data.ratio_range),
                                   cat_max_ratio=cfg.data.cat_max_ratio, flip_prob=cfg.data.flip_prob,
                                   photometric=cfg.data.photometric)
        dataset = build_dataset(cfg.data.dataset, cfg.data.root, cfg.data.train_split, num_classes=num_classes,
                                transform=transform)
        # logs and the config only once the inputs are known to be good: bad input leaves an existing run untouched
        logger = Logger(cfg, info.is_main, cfg.train.iters, state["iteration"] if state else 0)
        say = log or logger.print
        if info.is_main:
            write_text_atomic(os.path.join(work_dir, "config.json"), cfg.to_json())
            if load_from and not state:
                say(loaded_report)

        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.iters)
        dtype = autocast_dtype(cfg.train.precision, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
        start = 0
        if state is not None:
            model.load_state_dict(state["model"], strict=True)
            load_optimizer_state(optimizer, state["optimizer"], cfg.optim)
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start = int(state["iteration"])
            if state.get("rng"):  # one state per rank; the process count was checked above
                set_rng_state(state["rng"][info.rank])
            say(f"resumed from {resume_path} at iteration {start}")

        net = model
        if info.distributed:
            net = distributed.wrap_ddp(model, device)
        if cfg.train.compile != "none":
            # the forward only (loss and optimizer stay eager); `model` stays uncompiled for checkpoints and eval
            net = torch.compile(net, mode=torch_compile_mode(cfg.train.compile))
        accum = cfg.train.grad_accum
        stream = BatchStream(dataset, batch_size=cfg.train.batch_size, rank=info.rank, world_size=info.world_size,
                             seed=cfg.train.seed, num_workers=cfg.data.num_workers, consumed=start * accum,
                             pin_memory=device.type == "cuda")
        images_per_iter = cfg.train.batch_size * accum * info.world_size
        trainable = sum(p.numel() for p in params)
        say(f"{len(dataset)} training images, {num_classes} classes ({len(mcfg.seen)} seen), "
            f"{'transductive' if cfg.train.transductive else 'inductive'}; {trainable:,} parameters optimised; "
            f"{info.world_size} process(es) on {device.type}, {images_per_iter} images/iteration, "
            f"precision {cfg.train.precision if dtype else 'fp32'}, kernels {ops.get_backend()}, "
            f"compile {cfg.train.compile}")

        def evaluate(tag: str):
            metrics = evaluate_model(
                model, text, dataset=cfg.data.dataset, root=cfg.data.root, split=cfg.data.val_split,
                class_names=list(mcfg.class_names), seen=list(mcfg.seen), calibrate=list(mcfg.seen),
                short_side=cfg.eval.short_side, device=device, num_workers=min(cfg.data.num_workers, 2),
                autocast_dtype=AUTOCAST_DTYPES[cfg.eval.precision], dist_info=info, progress=True,
            )
            if info.is_main:
                say(f"--- evaluation {tag} ({cfg.data.val_split}) ---\n{metrics.table(mcfg.seen)}")
                logger.record_eval({"iter": start if tag == "before training" else cfg.train.iters, "eval": tag,
                                    **metrics.to_dict()})
            return metrics.to_dict()

        result: Dict[str, Any] = {"metrics_before": None, "metrics": None, "losses": []}
        if cfg.train.eval_at_start and start == 0:
            result["metrics_before"] = evaluate("before training")

        model.train()
        window_start, window_iters = time.perf_counter(), 0
        run_start = time.perf_counter()
        normalizer = AccumulatedNormalizer(info.world_size)
        weights = torch.tensor([mcfg.focal_weight, mcfg.dice_weight], device=device)
        for it in range(start, cfg.train.iters):
            # the weighted focal and dice sums of this step's micro-batches, normalised at the end (for the log)
            sums = torch.zeros(2, device=device)
            normalizer.reset()
            for micro in range(accum):
                images, labels = next(stream)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if not cfg.train.transductive:
                    labels = to_training_labels(labels)
                sync = nullcontext() if (micro == accum - 1 or not info.distributed) else net.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        out = net(images, train_text)
                    if cfg.train.transductive:
                        labels = to_training_labels(labels, out["mask_logits"])
                    # labels were checked when read and mapped by construction: no per-step check (a GPU sync)
                    terms = loss_terms(out["mask_logits"], labels, ignore_pixels=mcfg.loss_ignores_ignore_pixels,
                                       validate_labels=False)
                    # the official normalisation of one batch of all micro-batches (see cascade_clip.accumulation)
                    divisor = normalizer.add(terms["masks"], (p.grad for p in params))
                    losses = normalized_loss(terms, divisor, focal_weight=mcfg.focal_weight,
                                             dice_weight=mcfg.dice_weight)
                    scaler.scale(losses["loss"]).backward()
                sums += torch.stack([terms["focal"].detach(), terms["dice"].detach()]) * weights
            step_losses = sums / normalizer.divisor
            totals = torch.cat([step_losses.sum().view(1), step_losses])  # loss, loss_mask, loss_dice
            if cfg.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
            lr = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = it + 1
            window_iters += 1
            logger.step()

            is_checkpoint = done % cfg.train.checkpoint_interval == 0 or done == cfg.train.iters
            # checkpoint iterations are logged too: the loss is checked to be finite before weights are written
            is_log = done % cfg.train.log_interval == 0 or is_checkpoint or done == start + 1
            if is_log:
                distributed.all_reduce_sum(totals)
                totals /= info.world_size
                values = totals.tolist()
                if not all(math.isfinite(v) for v in values):
                    raise FloatingPointError(f"loss is {values[0]} at iteration {done}; stopping")
                elapsed = time.perf_counter() - window_start
                img_s = window_iters * images_per_iter / max(elapsed, 1e-9)
                per_iter = (time.perf_counter() - run_start) / (done - start)
                record = {"iter": done, "iters": cfg.train.iters, "loss": values[0], "loss_mask": values[1],
                          "loss_dice": values[2], "lr": lr, "img_s": img_s, "eta_s": per_iter * (cfg.train.iters - done),
                          "epoch": stream.epoch}
                if device.type == "cuda":
                    record["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.record(record, line=True)
                result["losses"].append((done, values[0]))
                window_start, window_iters = time.perf_counter(), 0

            if is_checkpoint:
                rngs = distributed.all_gather_objects(rng_state())
                failure = None
                if info.is_main:
                    try:
                        save_training_checkpoint(
                            work_dir, done, model, keep=cfg.train.keep_checkpoints,
                            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                            scaler=scaler.state_dict() if scaler.is_enabled() else None, rng=rngs,
                            train_config=cfg.to_dict(), text_embeddings=text.detach().cpu(),
                            class_names=list(mcfg.class_names), world_size=info.world_size,
                        )
                    except OSError as exc:  # a full disk, a lost mount: every rank stops instead of waiting
                        failure = f"checkpoint at iteration {done} could not be written to {work_dir}: {exc}"
                failure = dist_utils.broadcast_object(failure)
                if failure is not None:
                    raise RuntimeError(failure)
        result["iteration"] = cfg.train.iters
        if cfg.train.eval_at_end:
            result["metrics"] = evaluate("after training")
        logger.close()
        return result
    finally:
        # DDP's Reducer holds the process group. Freed only when run() returns, after destroy_process_group, it is the
        # group's last owner, and its destructor joins gloo's threads while holding the GIL that one of them waits
        # for: torch 2.11 hung there at the end of every 2-process gloo run. Freed here, the group outlives it. An
        # error raised inside the DDP forward keeps that frame (its `self`) in the traceback: clear the finished
        # frames first, or a failing rank hangs instead of exiting (the traceback still prints, without locals).
        failure = sys.exc_info()[1]
        if failure is not None:
            traceback.clear_frames(failure.__traceback__)
        net = None
        gc.collect()
        distributed.cleanup()


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.kernels:
        overrides.append(f"train.kernels={args.kernels}")
    cfg = resolve(args.config, overrides, data_root=args.data_root, work_dir=args.work_dir,
                  text_embeddings=args.text_embeddings)
    if args.resume and args.load_from:
        raise ValueError("--resume and --load-from exclude each other (resume restores the weights too)")
    return run(cfg, resume=args.resume, load_from=args.load_from)


if __name__ == "__main__":
    main()
