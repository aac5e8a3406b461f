"""The training precision of a stage-1 run: what ``auto`` means on a device, the autocast context, and the
precision segments of a run resumed in another precision (``--allow-precision-change``)."""
from __future__ import annotations

import torch

from ..config import PRECISIONS
from ..utils import UserError, cpu_has_bf16


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast on GPUs that support it and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """bf16 autocast on ``device`` when ``precision`` is bf16 (a no-op context for fp32)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def continue_precision(ckpt_identity: dict, ckpt_segments, cfg: dict, start_epoch: int):
    """A resumed run keeps the precision it started with in its identity (cfg['precision']); the precision
    each epoch range actually trained in goes to cfg['precision_segments'] = [[first epoch, precision], ...]
    once it changes.  Returns the precision to train the remaining epochs in."""
    train_precision = cfg["precision"]
    first = ckpt_identity.get("precision", train_precision)
    segments = [list(s) for s in (ckpt_segments or [[0, first]])]
    if segments[-1][1] != train_precision and start_epoch < cfg["epochs"]:  # (a finished run trains no more)
        segments.append([start_epoch, train_precision])
    cfg["precision"] = first
    if len(segments) > 1:
        cfg["precision_segments"] = segments
    return train_precision
