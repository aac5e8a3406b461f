"""The head registry, the hyperparameters heads accept, and what a head receives and returns.

A head is one function ``fn(data: HeadData, hp: dict, tau: float) -> HeadOutput`` registered with
``@register_head(name, ...)``: :data:`HEADS` maps the name to a :class:`Head` (the function, the
hyperparameters it uses with their defaults, whether it takes ``tau``).  ``pipeline.stage2.fit`` validates,
times, evaluates and records; nothing here reads or writes files.

Determinism: all randomness goes through torch.Generator objects seeded from ``seed`` (:func:`generators`;
initial values and the class-balanced batch indices are drawn on the CPU and then moved, so CPU and CUDA
fits start identically and train on the same batches); CPU fits are bit-for-bit repeatable, CUDA fits are
repeatable up to the non-determinism of index_add/scatter kernels and the GEMMs' reduction order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ...config import HEAD_DEFAULTS, METRIC_DISTANCES, METRIC_KINDS
from ...utils import UserError


@dataclass
class Head:
    name: str
    fn: Callable
    defaults: dict            # hyperparameters the head uses, with their defaults
    uses_tau: bool = False    # whether ``tau`` changes what the head does
    default_tau: float = 0.0
    summary: str = ""
    needs_val: Callable = lambda hp: False  # whether the fit (not the evaluation) reads the val split
    reads_train: bool = True  # whether the fit reads the training features (not so: the stage-1 classifier's)


HEADS: dict[str, Head] = {}


def register_head(name, *, defaults=None, uses_tau=False, default_tau=0.0, needs_val=None, reads_train=True):
    """Register ``fn(data: HeadData, hp: dict, tau: float) -> HeadOutput`` under ``name``.

    ``needs_val(hp)`` says whether the head selects something on the val split (then ``data.val_x/val_y``
    are filled; a cache without one is refused before fitting).  ``reads_train``: False for a head that only
    rescales the stage-1 classifier (it ignores ``train_x``, so fitting it on another split means nothing).
    """
    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        HEADS[name] = Head(name, fn, dict(defaults or {}), uses_tau, float(default_tau), doc[0] if doc else "",
                           needs_val or (lambda hp: False), bool(reads_train))
        return fn
    return deco


# Hyperparameter sets.  The paper's recipe for every NCM-family head (learned-ncm, multi-ncm, local-projection,
# metric-ncm; Sec. 5.2): SGD lr 5, momentum 0.9, total gradient-norm clipping at 0.1, constant lr.  The paper
# gives no epoch count or batch size: 30 epochs of batch 512 (config.HEAD_DEFAULTS), an epoch being N_train
# class-balanced draws.  With clipping a step moves the centroids by at most lr * clip = 0.5 in total (times the
# momentum gain), so the budget is counted in steps: 660 on CIFAR-100-LT, 6.8k on ImageNet-LT.  On a
# CIFAR-100-LT-sized synthetic cache the CDNV and the test accuracy have levelled off by then (90 epochs: same
# accuracy, CDNV 0.304 -> 0.299, while the train loss still creeps down, 0.46 -> 0.39).  Batch 512 is
# Decoupling's stage-2 batch size.  (Fit times: docs/performance.md.)
SGD_DEFAULTS = {k: HEAD_DEFAULTS[k] for k in ("epochs", "batch_size", "lr", "momentum", "clip")}
# ... and Decoupling's cRT recipe (configs/ImageNet_LT/*_crt.yaml: lr 0.2, cosine, 10 epochs, batch 512);
# LWS uses the same recipe for 5 epochs (cls_lws.yaml).
DECOUPLING_DEFAULTS = dict(epochs=10, batch_size=512, lr=0.2, momentum=0.9, weight_decay=5e-4)
LWS_DEFAULTS = dict(DECOUPLING_DEFAULTS, epochs=5)
# GEMM precision of the learned-ncm / multi-ncm fits: "auto" = bf16 on a CPU with native bf16 dot products
# (avx512_bf16 / amx_bf16), fp32 elsewhere (CUDA included: its bf16 GEMMs may reduce in bf16, untested here)
MATMUL_MODES = ("auto", "bf16", "fp32")
NCM_SGD_DEFAULTS = dict(SGD_DEFAULTS, matmul="auto")

# every hyperparameter any head accepts, with its validator (value -> error message or None)
HPARAM_CHECKS = {
    "epochs": lambda v: None if isinstance(v, int) and v >= 1 else "must be an integer >= 1",
    "batch_size": lambda v: None if isinstance(v, int) and v >= 1 else "must be an integer >= 1",
    "lr": lambda v: None if math.isfinite(v) and v > 0 else "must be > 0",
    "momentum": lambda v: None if 0 <= v < 1 else "must be in [0, 1)",
    "clip": lambda v: None if math.isfinite(v) and v > 0 else "must be > 0",
    "weight_decay": lambda v: None if math.isfinite(v) and v >= 0 else "must be >= 0",
    "num_centroids": lambda v: None if isinstance(v, int) and v >= 1 else "must be an integer >= 1",
    "metric": lambda v: None if v in METRIC_KINDS else f"must be one of {METRIC_KINDS}",
    "distance": lambda v: None if v in METRIC_DISTANCES else f"must be one of {METRIC_DISTANCES}",
    "p": lambda v: None if v == "auto" or (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0)
    else "must be a number >= 0 or 'auto'",
    "cl2n": lambda v: None if isinstance(v, bool) else "must be true or false",
    "matmul": lambda v: None if v in MATMUL_MODES else f"must be one of {MATMUL_MODES}",
}


def check_hparams(hp: dict) -> None:
    for k, v in hp.items():
        if k not in HPARAM_CHECKS:
            raise UserError(f"unknown hyperparameter {k!r}; known: {sorted(HPARAM_CHECKS)}")
        msg = HPARAM_CHECKS[k](v)
        if msg:
            raise UserError(f"{k} {msg}, got {v!r}")


# ----------------------------------------------------------------------------------------------------
# Data handed to a head


@dataclass
class HeadData:
    """Features on the device (float32) plus what heads need from the cache."""
    train_x: torch.Tensor          # [N, d]
    train_y: torch.Tensor          # [N] int64
    eval_x: torch.Tensor           # [M, d]
    train_counts: torch.Tensor     # [C] float32, N_y of the training set (the prior of logit adjustment; with
                                   # fit_split "test", train_x/train_y are the test split and this stays N_y)
    classifier_weight: torch.Tensor  # [C, d] stage-1 classifier
    classifier_bias: torch.Tensor    # [C]
    seed: int = 0
    val_x: torch.Tensor | None = None  # [V, d], only for heads that select on the val split
    val_y: torch.Tensor | None = None
    memo: dict | None = field(default=None, repr=False)  # results of earlier fits on these train features
    _stats: tuple | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def num_classes(self) -> int:
        return int(self.train_counts.numel())

    @property
    def dim(self) -> int:
        return int(self.train_x.shape[1])

    def class_stats(self):
        """(empirical means [C,d] float32 on device, within-class mean squared distance to them [C] f64).

        Accumulated in float64 so that the variance (a difference of large sums) stays accurate.
        """
        if self._stats is None:
            x = self.train_x.double()
            C = self.num_classes
            n = torch.bincount(self.train_y, minlength=C).double()
            s = torch.zeros(C, self.dim, dtype=torch.float64, device=self.device).index_add_(0, self.train_y, x)
            ss = torch.zeros(C, dtype=torch.float64, device=self.device).index_add_(0, self.train_y, (x * x).sum(1))
            mean = s / n[:, None]
            within = (ss / n - (mean * mean).sum(1)).clamp_min(0)
            self._stats = (mean.float(), within.cpu().numpy())
        return self._stats


@dataclass
class HeadOutput:
    pred: torch.Tensor | np.ndarray   # [M] predicted class per eval sample
    params: dict                      # name -> numpy array, saved in the fit artifact
    chosen: dict = field(default_factory=dict)  # hyperparameters the head chose itself (e.g. p auto)
    predict: object = None            # features [M, d] tensor -> predicted classes [M]: the fitted head itself
    reused_seconds: float = 0.0       # fit time of work taken from ``HeadData.memo`` (added to fit_seconds)


def generators(seed: int, device, stream: int = 0):
    """(generator for initial values, generator for sampling) of one random stream: the same CPU generator,
    whatever ``device`` (kept in the signature for the callers), so initial values and class-balanced
    batches are drawn on the host in the same order on every device and a CUDA fit trains on the CPU fit's
    batches."""
    s = int(seed) * 1000 + stream  # distinct, reproducible streams per seed
    cpu = torch.Generator().manual_seed(s)
    return cpu, cpu


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def logit_offsets(data: HeadData, tau: float):
    """tau log N_y (Eq. 9), or None for tau = 0 (then the logits are exactly the plain ones)."""
    return None if tau == 0 else tau * torch.log(data.train_counts)

