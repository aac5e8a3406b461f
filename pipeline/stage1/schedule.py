"""The stage-1 learning-rate schedules (a recipe's ``schedule`` field, config.RECIPES).

  "balms"   Balanced Meta-Softmax's CosineAnnealingLRWarmup, stepped once per epoch (:func:`balms_lr`)
  "cosine"  per iteration: linear warm-up, then cosine to 0 (:func:`cosine_lr`)
"""
from __future__ import annotations

import math

from ..utils import UserError

SCHEDULES = ("balms", "cosine")


def cosine_lr(it: int, total_iters: int, warmup_iters: int, base_lr: float) -> float:
    """Schedule "cosine": linear warm-up for `warmup_iters` iterations, then cosine decay to 0 at `total_iters`."""
    if it < warmup_iters:
        return base_lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def balms_lr(epoch: int, epochs: int, warmup_epochs: int, start_lr: float, peak_lr: float) -> float:
    """Schedule "balms": BALMS's CosineAnnealingLRWarmup (utils.py) for 1-based `epoch` (their scheduler is
    stepped at the start of each epoch, so training epoch e runs at last_epoch = e).  Warm-up epochs
    1..W-1 go linearly from start_lr to peak_lr; from epoch W, cosine from peak_lr to 0 at the last epoch."""
    if epoch < warmup_epochs:  # (BALMS asserts W >= 2; W <= 1 means no warm-up here)
        return start_lr + (peak_lr - start_lr) * (epoch - 1) / (warmup_epochs - 1)
    t = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * t))


def lr_for(cfg: dict, epoch: int, batch: int, iters_per_epoch: int) -> float:
    """Learning rate of 0-based `batch` of 0-based `epoch` under the config's schedule."""
    if cfg["schedule"] == "balms":
        return balms_lr(epoch + 1, cfg["epochs"], cfg["warmup_epochs"], cfg["warmup_start_lr"], cfg["lr"])
    if cfg["schedule"] == "cosine":
        return cosine_lr(epoch * iters_per_epoch + batch, cfg["epochs"] * iters_per_epoch,
                         cfg["warmup_epochs"] * iters_per_epoch, cfg["lr"])
    raise UserError(f"unknown schedule {cfg['schedule']!r}; expected one of {', '.join(SCHEDULES)}")
