"""Stage-2 classifier heads on frozen, cached features (paper Sec. 3.1, 4.2-4.4, 5.2, A.3; Decoupling).

Every head is one function registered with ``@register_head(name, ...)``; :data:`HEADS` maps the name to a
:class:`Head` (the function, the hyperparameters it uses with their defaults, whether it takes ``tau``).
A head receives a :class:`HeadData` (train/eval features already on the device) and returns a
:class:`HeadOutput` (eval predictions + the fitted parameters as numpy arrays).  ``pipeline.stage2.fit`` does the
validation, timing, evaluation and bookkeeping; nothing here reads or writes files.

Heads
-----
softmax           the stage-1 linear classifier stored in the cache, argmax(W x + b).  The baseline.
ncm               empirical class means (Eq. 1), prediction argmin_y ||x - mu_y|| (Eq. 2).  ``cl2n=True``
                  is Decoupling/SimpleShot's CL2N variant: subtract the mean train feature, L2-normalise
                  every feature, then take class means and Euclidean distances in that space.
learned-ncm       centroids initialised at the empirical means and learned by SGD on the cross-entropy of
                  logits -1/2 d(x, mu_y), d the Euclidean (NOT squared) distance (Sec. 4.2, Eq. 6);
                  prediction argmin d.  With ``tau`` > 0 the training logits are -1/2 d + tau log N_y
                  (logit adjustment, Eq. 9); prediction is still argmin d.  Records the average pairwise
                  CDNV of the centroids after every epoch (epoch 0 = empirical means; Sec. 6, Fig. 6b).
multi-ncm         K shared learned displacements delta_i plus one fixed null displacement (Eq. 10):
                  d_xy = min_i ||x - (mu_y + delta_i)||, the mu_y frozen at the learned-ncm solution, which
                  is fitted first inside the same call with the same seed, tau and hyperparameters (so the
                  stored centroids equal a separate learned-ncm fit).  delta_i ~ N(0, s^2 I/d) with
                  s = 0.01 * sqrt(mean_y Var_y), i.e. ||delta_i|| is about 1% of the typical distance of a
                  train feature to its class mean: small enough that the start is (almost) learned-ncm,
                  non-zero so that the K copies receive different gradients (symmetry breaking).
local-projection  Eq. 4: d^_xy = (x-mu_y)^T Q_y diag(sigmoid(w_y)) Q_y^T (x-mu_y) with Q_y the eigenvectors
                  (columns) of the MLE class covariance (Eq. 1; the paper writes Q_y^T with eigenvectors as
                  rows) and mu_y the empirical means (both fixed); only w_y
                  is learned (CE on -1/2 d^).  w starts at 0 (sigmoid = 1/2, i.e. plain squared-Euclidean
                  NCM up to scale, where the sigmoid is steepest).  Saved ``local_weights`` = sigmoid(w_y)
                  with columns in ascending eigenvalue order (higher index = higher eigenvalue, as in
                  Fig. 3).  Cost O(B C d^2) per step: an analysis head for CIFAR-sized C and d.
metric-ncm        A.3 / Table 5: the Mahalanobis distance of Eq. 3 learned jointly with the centroids,
                  ``distance="squared"`` (default, A.3 as written): d = (x-mu_y)^T W^T W (x-mu_y);
                  ``"euclidean"``: d = ||W (x - mu_y)||, the non-squared form Learned NCM trains with (Sec.
                  4.2: "stable gradient"), kept because with W = I it starts exactly at learned-ncm.
                  ``metric="global"`` one W (init identity), ``"local"`` one W_y per class (init identity;
                  O(B C d^2) per step, O(C d^2) memory).
crt               Decoupling's classifier re-training: a freshly initialised linear layer (nn.Linear's
                  default init) trained with class-balanced sampling, SGD momentum 0.9, weight decay 5e-4,
                  lr 0.2 with a per-epoch cosine schedule, 10 epochs, batch 512 (Decoupling's cRT config).
                  Unlike Decoupling it trains on the cached, un-augmented features (no backbone re-forward).
                  ``tau`` > 0 adds tau log N_y to the training logits (loss-based logit adjustment).
lws               Decoupling's learnable weight scaling: logits f_y (W_y x + b_y) on the frozen stage-1
                  classifier, only the scales f (init 1) are learned, same recipe as crt but 5 epochs
                  (Decoupling's cls_lws.yaml; 10 is cRT's); ``tau`` as crt.
tau-norm          Decoupling's tau-normalisation (classifier-balancing, tau_norm.py): logits
                  x . (W / ||W||^p)^T with the bias dropped for every p (also p = 0).  ``p`` default 1;
                  ``p="auto"`` sweeps config.TAU_NORM_P_GRID (0..2 step 0.1, Decoupling's sweep) and keeps
                  the p with the best mean per-class accuracy on the *val* split (never the test split).
posthoc-la        Menon et al.'s post-hoc logit adjustment of the stage-1 classifier:
                  argmax(W x + b - tau log pi_y), pi the train class prior; ``tau`` defaults to 1 here.

Shared optimisation recipe (learned-ncm, multi-ncm, local-projection, metric-ncm; paper Sec. 5.2): SGD,
lr 5, momentum 0.9, total gradient-norm clipping at 0.1 (torch.nn.utils.clip_grad_norm_), constant lr.
The paper gives no epoch count or batch size.  We use 30 epochs of batch 512 (config.HEAD_DEFAULTS), an
"epoch" being N_train class-balanced draws.  With clipping, a step moves the centroids by at most
lr * clip = 0.5 in total (times the momentum gain), so the budget is counted in steps: 30 epochs are 660
steps on CIFAR-100-LT and 6.8k on ImageNet-LT.  On a CIFAR-100-LT-sized synthetic cache the CDNV and the
test accuracy have levelled off by then (90 epochs: same accuracy, CDNV 0.304 -> 0.299, while the train
loss still creeps down, 0.46 -> 0.39), and an ImageNet-LT-sized fit stays a GEMM-bound ~7 TFLOP (47 s in
bf16, 59 s in fp32 on two uncontended AVX-512 cores; see benchmarks/stage2_speed.py).  Batch 512 is Decoupling's
stage-2 batch size.

Class-balanced ("uniform") sampling: every draw picks a class uniformly at random, then one of its
training samples uniformly at random (i.i.d. with replacement; an epoch = N_train such draws).  In
expectation this is Decoupling's class-aware sampler; it needs no per-class queues and is one vectorised
call on the device.

Speed: distances use the ||x||^2 - 2 x.mu + ||mu||^2 expansion (one GEMM per batch, never a [B, C, d]
tensor); learned-ncm's loss has a fused closed-form backward (Eq. 6, :class:`_NCMCrossEntropy`; one
log_softmax instead of logsumexp's five passes).  learned-ncm and multi-ncm train on features centred on
the mean class mean, and with ``matmul`` "bf16" (the default on a CPU with avx512_bf16/amx_bf16; recorded
in hparams) both GEMMs of a step run in bf16, the forward one on augmented rows whose product is the whole
squared distance (:func:`augment_rows`: no cancellation after the bf16 rounding).  multi-ncm computes
||x - mu||^2 once for the train set (mu is frozen), finds the nearest displacement of all (sample, class)
pairs with one cdist call (:func:`max_plus`), and has a closed-form displacement backward
(:class:`_MultiNCMCrossEntropy`).  No Python loop runs over samples (only over epochs, batches, row blocks
at prediction, and classes in class_eigh).

Determinism: all randomness goes through torch.Generator objects seeded from ``seed`` (initial values are
drawn on the CPU and then moved, so CPU and CUDA start identically); CPU fits are bit-for-bit repeatable,
CUDA fits are repeatable up to the non-determinism of index_add/scatter kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..analysis import cdnv as _cdnv
from ..config import HEAD_DEFAULTS, METRIC_DISTANCES, METRIC_KINDS, TAU_NORM_P_GRID
from ..metrics import balanced_accuracy
from ..utils import UserError, cpu_has_bf16

# ----------------------------------------------------------------------------------------------------
# Registry


@dataclass
class Head:
    name: str
    fn: Callable
    defaults: dict            # hyperparameters the head uses, with their defaults
    uses_tau: bool = False    # whether ``tau`` changes what the head does
    default_tau: float = 0.0
    summary: str = ""
    needs_val: Callable = lambda hp: False  # whether the fit (not the evaluation) reads the val split


HEADS: dict[str, Head] = {}


def register_head(name, *, defaults=None, uses_tau=False, default_tau=0.0, needs_val=None):
    """Register ``fn(data: HeadData, hp: dict, tau: float) -> HeadOutput`` under ``name``.

    ``needs_val(hp)`` says whether the head selects something on the val split (then ``data.val_x/val_y``
    are filled; a cache without one is refused before fitting).
    """
    def deco(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        HEADS[name] = Head(name, fn, dict(defaults or {}), uses_tau, float(default_tau), doc[0] if doc else "",
                           needs_val or (lambda hp: False))
        return fn
    return deco


# Hyperparameter sets.  The paper's recipe for every NCM-family head (Sec. 5.2) ...
SGD_DEFAULTS = {k: HEAD_DEFAULTS[k] for k in ("epochs", "batch_size", "lr", "momentum", "clip")}
# ... and Decoupling's cRT recipe (configs/ImageNet_LT/*_crt.yaml: lr 0.2, cosine, 10 epochs, batch 512);
# LWS uses the same recipe for 5 epochs (cls_lws.yaml).
DECOUPLING_DEFAULTS = dict(epochs=10, batch_size=512, lr=0.2, momentum=0.9, weight_decay=5e-4)
LWS_DEFAULTS = dict(DECOUPLING_DEFAULTS, epochs=5)
MULTI_INIT_SCALE = 0.01  # ||delta_i|| ~ 1% of the typical feature-to-centroid distance
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
            raise UserError(f"--{k.replace('_', '-')} {msg}, got {v!r}")


# ----------------------------------------------------------------------------------------------------
# Data handed to a head


@dataclass
class HeadData:
    """Features on the device (float32) plus what heads need from the cache."""
    train_x: torch.Tensor          # [N, d]
    train_y: torch.Tensor          # [N] int64
    eval_x: torch.Tensor           # [M, d]
    train_counts: torch.Tensor     # [C] float32, N_y
    classifier_weight: torch.Tensor  # [C, d] stage-1 classifier
    classifier_bias: torch.Tensor    # [C]
    seed: int = 0
    val_x: torch.Tensor | None = None  # [V, d], only for heads that select on the val split
    val_y: torch.Tensor | None = None
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


def generators(seed: int, device, stream: int = 0):
    """(CPU generator for initial values, device generator for sampling) of one random stream."""
    s = int(seed) * 1000 + stream  # distinct, reproducible streams per seed
    cpu = torch.Generator().manual_seed(s)
    dev = cpu if torch.device(device).type == "cpu" else torch.Generator(device=device).manual_seed(s)
    return cpu, dev


# ----------------------------------------------------------------------------------------------------
# Distances and predictions (plain functions: the tests use them directly)

EVAL_CHUNK = 8192  # rows per prediction chunk; identical for all NCM predictors (identical float rounding)


D2_FLOOR = 1e-12  # squared-distance floor before sqrt: a sample exactly on a centroid has no direction


def sq_dists(x: torch.Tensor, mu: torch.Tensor, x2: torch.Tensor | None = None) -> torch.Tensor:
    """||x_b - mu_c||^2 for all pairs [B, C] via ||x||^2 - 2 x.mu + ||mu||^2 (one GEMM, no [B,C,d]).

    Not clamped: cancellation can make it slightly negative; :func:`euclid` clamps before the sqrt, and
    argmin is unaffected.
    """
    if x2 is None:
        x2 = (x * x).sum(1)
    mu2 = (mu * mu).sum(1)
    return torch.addmm(x2[:, None] + mu2[None, :], x, mu.t(), alpha=-2.0)


def euclid(d2: torch.Tensor) -> torch.Tensor:
    # the floor keeps the gradient finite for a sample sitting exactly on a centroid (it is 0 there)
    return d2.clamp_min(D2_FLOOR).sqrt()


def ncm_logits(x, mu, offsets=None, x2=None):
    """Learned-NCM training logits -1/2 ||x - mu_y|| (+ offsets_y, e.g. tau log N_y) [B, C]."""
    logits = -0.5 * euclid(sq_dists(x, mu, x2))
    return logits if offsets is None else logits + offsets


def ncm_loss(x, y, mu, offsets=None, x2=None):
    """Mean cross-entropy of :func:`ncm_logits` (Eq. 3 with Euclidean d; Eq. 9 with offsets).

    The plain-autograd reference; training uses :func:`ncm_loss_fast` (same value and gradient).
    """
    return F.cross_entropy(ncm_logits(x, mu, offsets, x2), y)


def _softmax_ce(d: torch.Tensor, y: torch.Tensor, offsets):
    """(mean CE of logits -1/2 d (+ offsets), softmax [B, C]) in three passes over [B, C] after the distance:
    one fused log_softmax, one gather, one exp (logsumexp on the CPU is five separate passes)."""
    logits = d.mul(-0.5) if offsets is None else torch.add(offsets, d, alpha=-0.5)
    logp = torch.log_softmax(logits, 1)
    loss = -logp.gather(1, y[:, None]).mean()
    return loss, logp.exp_()


def _grad_over_d(p: torch.Tensor, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """G / d with G = softmax - onehot(y), in place of ``p`` (p is not needed afterwards)."""
    p[torch.arange(p.shape[0], device=p.device), y] -= 1.0
    return p.div_(d)


class _NCMCrossEntropy(torch.autograd.Function):
    """:func:`ncm_loss` with the closed-form centroid gradient of Eq. 6, fused to cut [B, C] passes.

    With G = softmax(logits) - onehot(y):  dL/dmu_z = 1/(2B) sum_b G_bz (x_b - mu_z) / d_bz
    = (H^T X)_z - mu_z sum_b H_bz,  H = G / (2 B d).  One GEMM forward, one backward, about half the
    element-wise passes of autograd (this loop is GEMM + memory bound: ImageNet-LT is 6.8k steps of
    [512, 1000]).  Only the centroids get a gradient.

    The split H^T X - mu sum_b H cancels: for a sample on (or within rounding of) a centroid -- every
    sample of a one-sample class at the start -- H = G / d is huge (d = 1e-6 after the floor) while the
    exact term G (x - mu) / d is below |G|, and fp32 rounding of the huge products left a gradient of
    garbage that moved one-sample classes' centroids by ~1 unit in the first steps.  So the backward uses
    max(d, ``grad_floor``), by default FP32_GRAD_FLOOR (2^-12) times the rms norm of the batch rows: the
    error stays below ~2^-11 |G| per term, and only pairs closer than that floor (autograd's clamp gives
    them 0 at d = 0) get their pull damped by d / floor.
    """

    @staticmethod
    def forward(ctx, mu, x, x2, y, offsets, grad_floor):
        d = sq_dists(x, mu, x2).clamp_min_(D2_FLOOR).sqrt_()
        loss, p = _softmax_ce(d, y, offsets)
        ctx.save_for_backward(mu, x, d, p, y, grad_floor)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mu, x, d, p, y, grad_floor = ctx.saved_tensors
        H = _grad_over_d(p, d.clamp_min_(grad_floor), y)
        scale = grad_out / (2 * x.shape[0])  # folded into the [C] and GEMM-output passes, not a [B, C] one
        grad_mu = (H.t() @ x).mul_(scale).addcmul_(mu, (H.sum(0) * scale)[:, None], value=-1)
        return grad_mu, None, None, None, None, None


FP32_GRAD_FLOOR = 2.0 ** -12  # relative to the rms row norm; see _NCMCrossEntropy


def ncm_loss_fast(x, y, mu, offsets=None, x2=None, grad_floor=None):
    """Same as :func:`ncm_loss` (value and centroid gradient), fused; ``x`` gets no gradient.
    ``grad_floor`` (tensor or float; default FP32_GRAD_FLOOR * rms ||x||) bounds 1/d in the backward."""
    if x2 is None:
        x2 = (x * x).sum(1)
    if grad_floor is None:
        grad_floor = FP32_GRAD_FLOOR * x2.mean().sqrt()  # a tensor: no device sync per step
    return _NCMCrossEntropy.apply(mu, x, x2, y, offsets, torch.as_tensor(grad_floor, dtype=x.dtype,
                                                                         device=x.device))


# ----------------------------------------------------------------------------------------------------
# bf16 GEMMs for the learned-ncm / multi-ncm fits
#
# torch's CPU bf16 matmul accumulates in fp32 but rounds its *output* to bf16 (8 significant bits).  The
# cross term x.mu of the expansion ||x||^2 - 2 x.mu + ||mu||^2 is as large as ||x|| ||mu||, so rounding it
# costs 2^-9 ||x|| ||mu|| of absolute error in d^2 -- far more than d^2 itself can afford when the features
# share a large mean (post-ReLU features do), and still ~0.1 logit on centred data.  Instead the whole
# squared distance is made the output of ONE bf16 GEMM on augmented rows (no cancellation after rounding):
#     x_aug  = [ -2 x~ ,  n1  n2  n3 ,  1  1  1 , 0 ... ]      x~ = bf16(x - c),  n1+n2+n3 = ||x~||^2
#     mu_aug = [  mu~  ,  1   1   1  ,  m1 m2 m3, 0 ... ]      mu~ = bf16(mu - c), m1+m2+m3 = ||mu~||^2
# so x_aug . mu_aug = ||x~ - mu~||^2 accumulated in fp32 and rounded once: a relative error of 2^-9 on d^2
# (2^-10 on d, ~0.03 on a logit of -1/2 d at d ~ 50) whatever the magnitude of x and mu.  The norms are
# split into three bf16 pieces (8 + 8 + 8 bits = fp32's 24) so that they enter the fp32 accumulator
# exactly, and are computed from the *rounded* x~, mu~, so the result is the exact distance between two
# points each moved by at most 2^-9 of their coordinates.  The shared centre c (the mean of the empirical
# class means) keeps those coordinates, and hence both that move and the fp32 accumulation error, at the
# scale of the class spread instead of the feature mean; it matters most in the backward GEMM,
# grad_mu = H^T x~ - mu~ sum_b H, whose bf16-rounded first term cancels against the second by a factor of
# ||x~|| / ||x~ - mu~||.  The backward GEMM H^T x~ runs in bf16 too (the gradient tolerates 2^-9 relative
# rounding); H is rounded to bf16 on input.  That cancellation is unbounded for a sample (almost) on a
# centroid -- every sample of a one-sample class at the start -- where H = G / d is huge while the exact
# term G (x - mu) / d stays below |G|: its rounding error (2^-9 |G| ||x~|| / d) would swamp the whole step.
# So the backward uses max(d, BF16_GRAD_FLOOR * rms ||x~||) there: the error stays below ~3% of |G| per
# term, and the pull of a sample closer than the floor to a centroid is damped by d / floor (autograd's
# own clamp sets it to 0 at d = 0).  Pairs that close are rare (d ~ ||x~|| for almost all of them).

BF16_GRAD_FLOOR = 2.0 ** -4  # relative to the rms centred feature norm; see above
_AUG_EXTRA = 6    # three norm pieces, three ones
_AUG_ALIGN = 32   # pad the inner dimension: the bf16 GEMM kernels run fastest on multiples of 32


def _aug_width(d: int) -> int:
    return -(-(d + _AUG_EXTRA) // _AUG_ALIGN) * _AUG_ALIGN


def _split3(n: torch.Tensor) -> torch.Tensor:
    """[..., 3] bf16 pieces whose sum, accumulated in fp32, is ``n`` (fp32) to fp32 precision."""
    h1 = n.to(torch.bfloat16)
    r = n - h1.float()
    h2 = r.to(torch.bfloat16)
    h3 = (r - h2.float()).to(torch.bfloat16)
    return torch.stack([h1, h2, h3], -1)


def augment_rows(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """x_aug (see above) of rows ``x`` [N, d] centred on ``center``: bf16 [N, _aug_width(d)]."""
    N, d = x.shape
    out = torch.zeros(N, _aug_width(d), dtype=torch.bfloat16, device=x.device)
    for s in range(0, N, 65536):  # in blocks: no fp32 copy of the whole train set at once
        xb = (x[s:s + 65536] - center).to(torch.bfloat16)
        xf = xb.float()
        out[s:s + 65536, :d] = xb * -2           # exact in bf16 (a power of two)
        out[s:s + 65536, d:d + 3] = _split3((xf * xf).sum(1))
        out[s:s + 65536, d + 3:d + 6] = 1
    return out


def augment_centroids(mu_c: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """mu_aug (see above) of already-centred centroids ``mu_c`` [C, d]: bf16 [C, _aug_width(d)]."""
    C, d = mu_c.shape
    if out is None:
        out = torch.zeros(C, _aug_width(d), dtype=torch.bfloat16, device=mu_c.device)
        out[:, d:d + 3] = 1
    out[:, :d] = mu_c
    mf = out[:, :d].float()
    out[:, d + 3:d + 6] = _split3((mf * mf).sum(1))
    return out


def aug_sq_dists(xa: torch.Tensor, mua: torch.Tensor) -> torch.Tensor:
    """||x~ - mu~||^2 [B, C] (bf16, relative error 2^-9) from augmented rows: one bf16 GEMM."""
    return xa @ mua.t()


class _NCMCrossEntropyBF16(torch.autograd.Function):
    """:class:`_NCMCrossEntropy` on augmented bf16 rows ``xa`` (:func:`augment_rows`) and centred centroids
    ``mu_c`` (fp32 master copy): both GEMMs in bf16, everything element-wise in fp32."""

    @staticmethod
    def forward(ctx, mu_c, xa, y, offsets, mua_buf, grad_floor):
        d = aug_sq_dists(xa, augment_centroids(mu_c.detach(), mua_buf)).float().clamp_min_(D2_FLOOR).sqrt_()
        loss, p = _softmax_ce(d, y, offsets)
        ctx.save_for_backward(mu_c, xa, d, p, y)
        ctx.grad_floor = grad_floor
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mu_c, xa, d, p, y = ctx.saved_tensors
        dim = mu_c.shape[1]
        H = _grad_over_d(p, d.clamp_min_(ctx.grad_floor), y)
        scale = grad_out / (2 * xa.shape[0])
        HtX = (H.to(torch.bfloat16).t() @ xa[:, :dim]).float()   # = -2 H^T x~
        grad_mu = HtX.mul_(-0.5 * scale).addcmul_(mu_c, (H.sum(0) * scale)[:, None], value=-1)
        return grad_mu, None, None, None, None, None


def bf16_grad_floor(xa: torch.Tensor, dim: int) -> float:
    """BF16_GRAD_FLOOR times the rms norm of the centred rows x~ of augmented ``xa`` (see above)."""
    return BF16_GRAD_FLOOR * math.sqrt(float(xa[:, dim:dim + 3].float().sum(1).mean()))


def ncm_loss_bf16(xa, y, mu_c, offsets=None, mua_buf=None, grad_floor=None):
    """:func:`ncm_loss` of centred centroids ``mu_c`` on augmented bf16 rows ``xa``: bf16 GEMMs, see above.
    ``grad_floor`` (default: :func:`bf16_grad_floor` of this batch) bounds 1/d in the backward."""
    if grad_floor is None:
        grad_floor = bf16_grad_floor(xa, mu_c.shape[1])
    return _NCMCrossEntropyBF16.apply(mu_c, xa, y, offsets, mua_buf, grad_floor)


def resolve_matmul(mode: str, device) -> str:
    """The GEMM precision a fit uses: "bf16" or "fp32" (``mode`` "auto": bf16 only on a bf16-capable CPU)."""
    if mode != "auto":
        return mode
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_bf16() else "fp32"


@torch.no_grad()
def ncm_predict(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """argmin_y ||x - mu_y|| (Eq. 2), in chunks of EVAL_CHUNK rows."""
    return torch.cat([sq_dists(c, mu).argmin(1) for c in x.split(EVAL_CHUNK)])


def multi_min_sq(A, xD, muD, DD):
    """min over displacements of ||x - (mu_y + delta_i)||^2 (unclamped) and its argmin, both [B, C].

    ||x - mu_y - delta_i||^2 = A_by + e_byi with A = ||x - mu||^2 (the big GEMM, shared by all K+1
    displacements) and e_byi = 2 mu_y.delta_i + ||delta_i||^2 - 2 x_b.delta_i, so only the small
    [B, C, K+1] tensor e is built and A is added once after the min.  Column 0 of xD/muD/DD is the null
    displacement (exactly zero); with all displacements zero, e == 0 and the result is exactly A.
    """
    e = (2.0 * muD + DD)[None] - 2.0 * xD[:, None, :]
    emin, arg = e.min(-1)
    return A + emin, arg


def _with_null(delta: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.zeros_like(delta[:1]), delta])


def multi_ncm_loss(x, y, mu, delta, offsets=None, x2=None):
    """Mean CE of the Multi-NCM training logits -1/2 min_i ||x - (mu_y + delta_i)|| (+ offsets), Eq. 10,
    the minimum over the K learned displacements *and* the fixed null one; only ``delta`` gets a gradient.
    """
    if x2 is None:
        x2 = (x * x).sum(1)
    D = _with_null(delta)
    xD, muD, DD = x @ D.t(), mu @ D.t(), (D * D).sum(1)   # the only terms depending on delta
    with torch.no_grad():  # which displacement is nearest for every (sample, class)
        A = sq_dists(x, mu, x2)
        _, arg = multi_min_sq(A, xD, muD, DD)
    # re-evaluate the chosen distances with gradient: same value as the min, and the gradient autograd
    # would give through min (it flows to the chosen displacement only); gathers, not indexing,
    # because their backward (scatter_add) is much cheaper than index_put
    d2 = A + (2.0 * muD + DD).t().gather(0, arg) - 2.0 * xD.gather(1, arg)
    logits = -0.5 * euclid(d2)
    return F.cross_entropy(logits if offsets is None else logits + offsets, y)


def max_plus(u: torch.Tensor, v: torch.Tensor):
    """(max_i (u_bi - v_yi), its argmax i) for all pairs [B, C] without a [B, C, K] tensor.

    The (max, +) product has no GEMM; torch.cdist with p = inf computes max_i |u_bi - v_yi| in one
    cache-blocked kernel (about 5x faster than broadcasting, no [B, C, K] temporary).  To get the argmax
    from the same call, both operands are put on an integer grid with i in the low 5 bits of u:
        U_bi = 32 round((u_bi - min u) s) + i,   V_yi = 32 round((v_yi - max v) s)   (U - V >= 0: |.| = id)
    with s a power of two small enough that every |U - V| < 2^(mantissa bits), so the subtraction and the max
    are exact; the max then carries the argmax (ties: the largest i) in its low 5 bits.  The only error is
    the grid step 1/s, at most 2^-18 (fp32; 2^-47 in fp64) of the spread of u plus that of v.  K <= 32.
    """
    K = u.shape[1]
    if K > 32:
        raise ValueError(f"max_plus handles at most 32 terms, got {K}")
    umin, vmax = u.min(), v.max()
    span = float(u.max() - umin) + float(vmax - v.min())
    bits = round(-math.log2(torch.finfo(u.dtype).eps)) + 1  # significand bits: 24 (fp32), 53 (fp64)
    s = 2.0 ** math.floor(math.log2((2.0 ** (bits - 5) - 2) / span)) if span > 0 else 1.0
    idx = torch.arange(K, device=u.device, dtype=u.dtype)
    U = ((u - umin) * s).round_().mul_(32).add_(idx)
    V = ((v - vmax) * s).round_().mul_(32)
    r = torch.cdist(U, V, p=float("inf"))
    arg = r.remainder(32)
    val = (r - arg).mul_(1.0 / (32 * s)).add_(umin - vmax)
    return val, arg.long()


def multi_min_sq_fast(A, xD, muD, DD):
    """:func:`multi_min_sq` through :func:`max_plus`: e_byi = (2 mu_y.delta_i + ||delta_i||^2) - 2 x_b.delta_i,
    min_i e = -max_i (2 xD_bi - (2 muD + DD)_yi).  Returns (A + min e, argmin) [B, C].  More than 32
    displacements (null included) fall back to the broadcast :func:`multi_min_sq`."""
    if xD.shape[1] > 32:
        return multi_min_sq(A, xD, muD, DD)
    val, arg = max_plus(2.0 * xD, 2.0 * muD + DD)
    return A - val, arg


class _MultiNCMCrossEntropy(torch.autograd.Function):
    """:func:`multi_ncm_loss` with the nearest-displacement search by :func:`max_plus` and a closed-form
    displacement gradient, for ``A`` = ||x - mu||^2 given (precomputed once per fit: mu is frozen).

    d2_by = A_by + e_{b,y,a}, a = argmin_i, e_byi = 2 mu_y.D_i + ||D_i||^2 - 2 x_b.D_i, so with
    W_by = dL/d(d2_by):  dL/dD_i = 2 sum_{(b,y): a_by = i} W_by (mu_y + D_i - x_b)
                                 = 2 (c_i^T mu + (sum_y c_iy) D_i - r_i^T x),
    c_iy = sum_b W_by [a_by = i] and r_ib = sum_y W_by [a_by = i]: two scatter-adds and two small GEMMs
    instead of autograd through gathers.  Row 0 of D is the fixed null displacement (no gradient).
    """

    @staticmethod
    def forward(ctx, delta, A, x, y, mu, offsets):
        D = _with_null(delta.detach())
        d2, arg = multi_min_sq_fast(A, x @ D.t(), mu @ D.t(), (D * D).sum(1))
        d = d2.clamp_min_(D2_FLOOR).sqrt_()
        loss, p = _softmax_ce(d, y, offsets)
        ctx.save_for_backward(D, x, mu, d, p, y, arg)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        D, x, mu, d, p, y, arg = ctx.saved_tensors
        Wg = _grad_over_d(p, d, y)                       # G / d; dL/d(d2) = -G / (4 B d)
        c = torch.zeros(D.shape[0], mu.shape[0], dtype=Wg.dtype, device=Wg.device).scatter_add_(0, arg, Wg)
        r = torch.zeros(x.shape[0], D.shape[0], dtype=Wg.dtype, device=Wg.device).scatter_add_(1, arg, Wg)
        g = c @ mu + c.sum(1)[:, None] * D - r.t() @ x
        return g[1:] * (-2.0 * grad_out / (4 * x.shape[0])), None, None, None, None, None


def multi_ncm_loss_fast(x, y, mu, delta, offsets=None, A=None):
    """Same as :func:`multi_ncm_loss` (value to max_plus's grid step; the same gradient but at near-ties), fused."""
    if A is None:
        A = sq_dists(x, mu)
    return _MultiNCMCrossEntropy.apply(delta, A, x, y, mu, offsets)


@torch.no_grad()
def multi_ncm_predict(x: torch.Tensor, mu: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """argmin_y min_i ||x - (mu_y + delta_i)|| with the null displacement included (Eq. 10).

    A is computed on the same EVAL_CHUNK row blocks as :func:`ncm_predict` (identical rounding); the
    nearest displacement comes from :func:`max_plus` (no [rows, C, K+1] tensor; exact A when all
    displacements are zero, since the min is then exactly 0).
    """
    D = _with_null(delta)
    muD, DD = mu @ D.t(), (D * D).sum(1)
    out = []
    for c in x.split(EVAL_CHUNK):
        out.append(multi_min_sq_fast(sq_dists(c, mu), c @ D.t(), muD, DD)[0].argmin(1))
    return torch.cat(out)


def cdnv_readings(mu: np.ndarray, class_means: np.ndarray, within: np.ndarray) -> tuple[float, float]:
    """The average pairwise CDNV (:func:`pipeline.analysis.cdnv`) of centroids ``mu``, read two ways:

    Var_y = mean squared distance of class-y train features to the centroid mu_y being evaluated
    (= within_y + ||xbar_y - mu_y||^2), and Var_y fixed at the empirical within-class variance (the paper's
    "we assume the intra-class variance does not change", Sec. 6).  float64 throughout.
    """
    mu = np.asarray(mu, np.float64)
    var_mu = within + ((np.asarray(class_means, np.float64) - mu) ** 2).sum(1)
    return _cdnv(mu, var_mu), _cdnv(mu, within)


# ----------------------------------------------------------------------------------------------------
# Class-balanced sampling and the shared SGD loop


class BalancedSampler:
    """Draw a class uniformly, then one of its samples uniformly (i.i.d., with replacement)."""

    def __init__(self, y: torch.Tensor, num_classes: int, generator: torch.Generator):
        self.order = torch.argsort(y, stable=True)  # indices grouped by class
        self.counts = torch.bincount(y, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.C, self.gen, self.device = num_classes, generator, y.device

    def draw(self, n: int) -> torch.Tensor:
        c = torch.randint(self.C, (n,), generator=self.gen, device=self.device)
        u = torch.rand(n, generator=self.gen, device=self.device, dtype=torch.float64)
        cnt = self.counts[c]
        j = torch.minimum((u * cnt).long(), cnt - 1)
        return self.order[self.starts[c] + j]


def train_sgd(params, batch_loss, data: HeadData, hp: dict, gen: torch.Generator, *, tensors=None,
              clip=None, weight_decay=0.0, cosine=False, on_epoch=None) -> np.ndarray:
    """Minimise ``batch_loss(*batch)`` over class-balanced batches; returns the mean loss of every epoch.

    ``tensors`` (default (train_x, train_y)) are indexed by the epoch's draws once per epoch and split into
    batches of ``batch_size`` (the last one smaller), which are handed to ``batch_loss``: one gather per
    epoch instead of several per step.  ``clip`` is the total gradient-norm threshold; ``cosine`` anneals
    the lr per epoch to 0 (Decoupling's schedule).
    """
    tensors = (data.train_x, data.train_y) if tensors is None else tensors
    opt = torch.optim.SGD(params, lr=hp["lr"], momentum=hp["momentum"], weight_decay=weight_decay)
    sampler = BalancedSampler(data.train_y, data.num_classes, gen)
    n, bs, epochs = data.train_x.shape[0], hp["batch_size"], hp["epochs"]
    losses = []
    for epoch in range(epochs):
        if cosine:
            for g in opt.param_groups:
                g["lr"] = 0.5 * hp["lr"] * (1 + math.cos(math.pi * epoch / epochs))
        idx = sampler.draw(n)
        total = torch.zeros((), device=data.device)
        for batch in zip(*(t[idx].split(bs) for t in tensors)):
            loss = batch_loss(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            total += loss.detach() * batch[0].shape[0]  # stays on the device: no sync per step
        losses.append(float(total) / n)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return np.asarray(losses, dtype=np.float64)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def _offsets(data: HeadData, tau: float):
    """tau log N_y (Eq. 9), or None for tau = 0 (then the logits are exactly the plain ones)."""
    return None if tau == 0 else tau * torch.log(data.train_counts)


# ----------------------------------------------------------------------------------------------------
# Heads on the stage-1 classifier


def _stage1_logits(data: HeadData, x):
    return torch.addmm(data.classifier_bias, x, data.classifier_weight.t())


@register_head("softmax")
def softmax_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Stage-1 softmax classifier from the cache, argmax(W x + b) (baseline)."""
    return HeadOutput(_stage1_logits(data, data.eval_x).argmax(1), {})


def tau_norm_weight(W: torch.Tensor, p: float) -> torch.Tensor:
    """Decoupling's pnorm: every class weight row divided by its L2 norm to the power p (p = 0: W)."""
    return W / W.norm(dim=1, keepdim=True).pow(p)


@register_head("tau-norm", defaults=dict(p=1.0), needs_val=lambda hp: hp["p"] == "auto")
def tau_norm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Decoupling's tau-normalised classifier x . (W/||W||^p)^T, no bias; p = "auto": best p on val."""
    W = data.classifier_weight
    chosen, extra = {}, {}
    p = hp["p"]
    if p == "auto":  # Decoupling's sweep, scored on the val split only (never on the test split)
        val_y = _np(data.val_y)
        accs = [balanced_accuracy(_np((data.val_x @ tau_norm_weight(W, q).t()).argmax(1)), val_y,
                                  data.num_classes) for q in TAU_NORM_P_GRID]
        p = TAU_NORM_P_GRID[int(np.argmax(accs))]  # ties: the smallest p
        chosen = dict(p=p, p_select="val")
        extra = dict(p_grid=np.asarray(TAU_NORM_P_GRID), p_val_acc=np.asarray(accs))
    Wn = tau_norm_weight(W, p)
    pred = (data.eval_x @ Wn.t()).argmax(1)
    return HeadOutput(pred, dict(weight=_np(Wn), **extra), chosen)


@register_head("posthoc-la", uses_tau=True, default_tau=1.0)
def posthoc_la_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Post-hoc logit adjustment argmax(W x + b - tau log pi_y) (Menon et al. 2021)."""
    adjust = -tau * torch.log(data.train_counts / data.train_counts.sum())
    pred = (_stage1_logits(data, data.eval_x) + adjust).argmax(1)
    return HeadOutput(pred, dict(adjustment=_np(adjust)))


def _balanced_linear(data, hp, tau, W, b, scales, train_params):
    """Train (a subset of) W, b, scales of logits scales * (W x + b) with Decoupling's recipe."""
    _, gen = generators(data.seed, data.device)
    offsets = _offsets(data, tau)

    def batch_loss(x, y):
        logits = scales * torch.addmm(b, x, W.t())
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd(train_params, batch_loss, data, hp, gen, weight_decay=hp["weight_decay"], cosine=True)
    with torch.no_grad():
        pred = (scales * torch.addmm(b, data.eval_x, W.t())).argmax(1)
    return pred, losses


@register_head("crt", defaults=DECOUPLING_DEFAULTS, uses_tau=True)
def crt_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Decoupling's cRT: re-initialised linear classifier, class-balanced sampling."""
    cpu_gen, _ = generators(data.seed, data.device, stream=1)
    bound = 1.0 / math.sqrt(data.dim)  # nn.Linear's default init, drawn from our generator
    W = ((torch.rand(data.num_classes, data.dim, generator=cpu_gen) * 2 - 1) * bound).to(data.device)
    b = ((torch.rand(data.num_classes, generator=cpu_gen) * 2 - 1) * bound).to(data.device)
    W.requires_grad_(True)
    b.requires_grad_(True)
    one = torch.ones(data.num_classes, device=data.device)
    pred, losses = _balanced_linear(data, hp, tau, W, b, one, [W, b])
    return HeadOutput(pred, dict(weight=_np(W), bias=_np(b), loss_per_epoch=losses))


@register_head("lws", defaults=LWS_DEFAULTS, uses_tau=True)
def lws_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Decoupling's LWS: learned per-class scales f_y on the frozen stage-1 classifier."""
    scales = torch.ones(data.num_classes, device=data.device, requires_grad=True)
    W, b = data.classifier_weight, data.classifier_bias
    pred, losses = _balanced_linear(data, hp, tau, W, b, scales, [scales])
    return HeadOutput(pred, dict(weight=_np(W), bias=_np(b), scales=_np(scales), loss_per_epoch=losses))


# ----------------------------------------------------------------------------------------------------
# NCM family


@register_head("ncm", defaults=dict(cl2n=False))
def ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Nearest empirical class mean, Euclidean (Eq. 1-2); cl2n: centre on the train mean + L2-normalise."""
    if not hp["cl2n"]:
        mu, _ = data.class_stats()
        return HeadOutput(ncm_predict(data.eval_x, mu), dict(centroids=_np(mu), empirical_centroids=_np(mu)))
    center = data.train_x.mean(0, keepdim=True)

    def cl2n(x):
        x = x - center
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    tx = cl2n(data.train_x)
    C = data.num_classes
    mu = torch.zeros(C, data.dim, device=data.device).index_add_(0, data.train_y, tx)
    mu = mu / data.train_counts[:, None]
    return HeadOutput(ncm_predict(cl2n(data.eval_x), mu),
                      dict(centroids=_np(mu), empirical_centroids=_np(mu), cl2n_center=_np(center[0])))


class _NCMTrain:
    """What the learned-ncm / multi-ncm fits share: features centred on ``center`` (the mean of the empirical
    class means; distances are translation invariant, so the fit is the same, but the GEMM operands shrink
    to the class spread) in the representation the GEMM precision wants, gathered batch by batch."""

    def __init__(self, data: HeadData, matmul: str):
        emp, _ = data.class_stats()
        self.matmul = matmul
        self.center = emp.mean(0)
        if matmul == "bf16":
            self.xa = augment_rows(data.train_x, self.center)            # bf16 [N, aug]
            self.tensors = (self.xa, data.train_y)
            self.grad_floor = bf16_grad_floor(self.xa, data.dim)
        else:
            self.xc = data.train_x - self.center
            self.tensors = (self.xc, data.train_y, (self.xc * self.xc).sum(1))
            self.grad_floor = FP32_GRAD_FLOOR * self.tensors[2].mean().sqrt()

    def x_of(self, batch):
        """Centred fp32 rows of a batch (for bf16: the rounded x~ the GEMMs see)."""
        if self.matmul == "bf16":
            return batch[0][:, :self.center.numel()].float().mul_(-0.5)
        return batch[0]

    @torch.no_grad()
    def sq_dists_all(self, mu_c: torch.Tensor) -> torch.Tensor:
        """||x~ - mu~||^2 for every train row [N, C] (bf16 for bf16 GEMMs), in row blocks."""
        if self.matmul == "bf16":
            mua = augment_centroids(mu_c)
            return torch.cat([aug_sq_dists(b, mua) for b in self.xa.split(EVAL_CHUNK)])
        return torch.cat([sq_dists(b, mu_c, n) for b, n in zip(self.xc.split(EVAL_CHUNK),
                                                               self.tensors[2].split(EVAL_CHUNK))])


def fit_learned_ncm(data: HeadData, hp: dict, tau: float, prep: _NCMTrain | None = None):
    """Learned-NCM centroids (Sec. 4.2) -> (centroids tensor, params dict).

    Trained as centred centroids mu - c (same gradients and SGD steps as mu: the loss is translation
    invariant); ``hp["matmul"]`` "bf16" runs both GEMMs of a step in bf16 (see :func:`augment_rows`).
    """
    _, gen = generators(data.seed, data.device)
    emp, within = data.class_stats()
    emp_np = _np(emp)
    prep = prep or _NCMTrain(data, resolve_matmul(hp.get("matmul", "fp32"), data.device))
    c = prep.center
    mu_c = (emp - c).requires_grad_(True)
    offsets = _offsets(data, tau)
    cd = [cdnv_readings(emp_np, emp_np, within)]
    if prep.matmul == "bf16":
        mua = augment_centroids(mu_c.detach())  # reused buffer: its constant columns are written once

        def batch_loss(xa, y):
            return ncm_loss_bf16(xa, y, mu_c, offsets, mua, prep.grad_floor)
    else:
        def batch_loss(x, y, x2):
            return ncm_loss_fast(x, y, mu_c, offsets, x2, prep.grad_floor)

    def on_epoch(_):
        cd.append(cdnv_readings(_np(mu_c + c), emp_np, within))

    losses = train_sgd([mu_c], batch_loss, data, hp, gen, tensors=prep.tensors, clip=hp["clip"],
                       on_epoch=on_epoch)
    mu = (mu_c.detach() + c)
    cd = np.asarray(cd, dtype=np.float64)
    return mu, dict(centroids=_np(mu), empirical_centroids=emp_np, cdnv_per_epoch=cd[:, 0],
                    cdnv_fixed_var_per_epoch=cd[:, 1], loss_per_epoch=losses)


@register_head("learned-ncm", defaults=NCM_SGD_DEFAULTS, uses_tau=True)
def learned_ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Learned-NCM: centroids learned by SGD on CE(-1/2 ||x - mu_y||) (+ tau log N_y), argmin d."""
    matmul = resolve_matmul(hp["matmul"], data.device)
    mu, params = fit_learned_ncm(data, hp, tau, _NCMTrain(data, matmul))
    return HeadOutput(ncm_predict(data.eval_x, mu), params, dict(matmul=matmul))


A_MAX_BYTES = 4 << 30  # multi-ncm keeps ||x - mu||^2 of the whole train set up to this size


@register_head("multi-ncm", defaults=dict(NCM_SGD_DEFAULTS, num_centroids=HEAD_DEFAULTS["num_centroids"]),
               uses_tau=True)
def multi_ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Multi-NCM (Eq. 10): K shared displacements + a null one around frozen learned-ncm centroids."""
    matmul = resolve_matmul(hp["matmul"], data.device)
    prep = _NCMTrain(data, matmul)
    mu, ncm_params = fit_learned_ncm(data, hp, tau, prep)
    cpu_gen, gen = generators(data.seed, data.device, stream=2)
    _, within = data.class_stats()
    scale = MULTI_INIT_SCALE * math.sqrt(float(within.mean())) / math.sqrt(data.dim)
    K = hp["num_centroids"]
    delta = (torch.randn(K, data.dim, generator=cpu_gen) * scale).to(data.device).requires_grad_(True)
    offsets = _offsets(data, tau)
    mu_c = mu - prep.center
    N = data.train_x.shape[0]
    # mu is frozen, so ||x - mu||^2 (the big GEMM of every step) is computed once for the whole train set
    # and gathered with the batches; the steps are then left with the nearest-displacement search
    keep_A = N * data.num_classes * (2 if matmul == "bf16" else 4) <= A_MAX_BYTES
    A_all = prep.sq_dists_all(mu_c) if keep_A else None
    rows = torch.arange(N, device=data.device)

    def batch_loss(idx, *batch):
        A = A_all[idx].float() if keep_A else None
        x = prep.x_of(batch)
        if A is None:
            A = sq_dists(x, mu_c)
        return multi_ncm_loss_fast(x, batch[1], mu_c, delta, offsets, A)

    losses = train_sgd([delta], batch_loss, data, hp, gen, tensors=(rows, *prep.tensors), clip=hp["clip"])
    delta = delta.detach()
    params = dict(centroids=ncm_params["centroids"], empirical_centroids=ncm_params["empirical_centroids"],
                  displacements=_np(delta), loss_per_epoch=losses,
                  centroid_loss_per_epoch=ncm_params["loss_per_epoch"],
                  cdnv_per_epoch=ncm_params["cdnv_per_epoch"],
                  cdnv_fixed_var_per_epoch=ncm_params["cdnv_fixed_var_per_epoch"])
    return HeadOutput(multi_ncm_predict(data.eval_x, mu, delta), params, dict(matmul=matmul))


def class_eigh(data: HeadData):
    """Per-class MLE covariance (Eq. 1) eigendecomposition: (eigenvalues [C,d] ascending, Q [C,d,d])."""
    mu, _ = data.class_stats()
    order = torch.argsort(data.train_y, stable=True)
    counts = torch.bincount(data.train_y, minlength=data.num_classes).tolist()
    covs = []
    for y, block in enumerate(data.train_x[order].split(counts)):  # loop over classes, not samples
        z = (block - mu[y]).double()
        covs.append(z.t() @ z / z.shape[0])
    evals, Q = torch.linalg.eigh(torch.stack(covs))
    return evals.float(), Q.float()


def local_coords(x: torch.Tensor, mu: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """z[b, y, k] = q_yk . (x_b - mu_y), q_yk = Q[y, :, k] the k-th eigenvector (column) of class y: [B, C, d].

    One GEMM against all classes' eigenbases side by side (column y*d + k of Qcat is q_yk), minus mu_y
    projected on its own basis.  Eq. 4's distance is then (z^2 * sigmoid(w)).sum(-1).
    """
    C, d = mu.shape
    Qcat = Q.permute(1, 0, 2).reshape(d, C * d)
    m = torch.einsum("cd,cdk->ck", mu, Q)
    return (x @ Qcat).view(-1, C, d) - m


def local_projection_dist(x, mu, Q, s):
    """Eq. 4: d^_xy = (x-mu_y)^T Q_y diag(s_y) Q_y^T (x-mu_y), s = sigmoid(w), for all pairs [B, C]."""
    return (local_coords(x, mu, Q).square() * s).sum(-1)


@register_head("local-projection", defaults=SGD_DEFAULTS, uses_tau=True)
def local_projection_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Local projection (Eq. 4): learned sigmoid weights per class eigendimension, squared distance."""
    _, gen = generators(data.seed, data.device)
    mu, _ = data.class_stats()
    evals, Q = class_eigh(data)
    C, d = data.num_classes, data.dim
    w = torch.zeros(C, d, device=data.device, requires_grad=True)
    offsets = _offsets(data, tau)

    def batch_loss(x, y):
        with torch.no_grad():  # the coordinates do not depend on w
            z2 = local_coords(x, mu, Q).square()
        logits = -0.5 * (z2 * torch.sigmoid(w)).sum(-1)
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd([w], batch_loss, data, hp, gen, clip=hp["clip"])
    with torch.no_grad():
        s = torch.sigmoid(w)
        chunk = max(1, 2 ** 24 // (C * d))
        pred = torch.cat([local_projection_dist(c, mu, Q, s).argmin(1) for c in data.eval_x.split(chunk)])
    return HeadOutput(pred, dict(local_weights=_np(s), eigenvalues=_np(evals), centroids=_np(mu),
                                 empirical_centroids=_np(mu), loss_per_epoch=losses))


def metric_sq(x: torch.Tensor, mu: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """(x-mu_y)^T W_y^T W_y (x-mu_y) = ||W_y (x - mu_y)||^2 for all pairs [B, C]; W [d, d] (global, one GEMM
    in the projected space) or [C, d, d] (local, one W_y per class)."""
    if W.dim() == 2:
        return sq_dists(x @ W.t(), mu @ W.t())
    C, d = mu.shape
    u = (x @ W.reshape(C * d, d).t()).view(-1, C, d) - torch.einsum("cij,cj->ci", W, mu)
    return u.square().sum(-1)


def metric_logits(x, mu, W, distance: str = "squared"):
    """-1/2 d^W_xy: Eq. 3's squared Mahalanobis distance, or its square root (``"euclidean"``)."""
    d2 = metric_sq(x, mu, W)
    return -0.5 * (d2 if distance == "squared" else euclid(d2))


@register_head("metric-ncm", defaults=dict(SGD_DEFAULTS, metric="global", distance="squared"), uses_tau=True)
def metric_ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Learned Mahalanobis metric + centroids (A.3, Eq. 3): W global or per class, squared or not."""
    _, gen = generators(data.seed, data.device)
    emp, _ = data.class_stats()
    C, d = data.num_classes, data.dim
    mu = emp.clone().requires_grad_(True)
    local = hp["metric"] == "local"
    eye = torch.eye(d, device=data.device)
    W = (eye.expand(C, d, d).clone() if local else eye.clone()).requires_grad_(True)
    offsets = _offsets(data, tau)

    def batch_loss(x, y):
        logits = metric_logits(x, mu, W, hp["distance"])
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd([mu, W], batch_loss, data, hp, gen, clip=hp["clip"])
    with torch.no_grad():  # argmin of the squared distance = argmin of its square root
        chunk = EVAL_CHUNK if not local else max(1, 2 ** 24 // (C * d))
        pred = torch.cat([metric_sq(c, mu, W).argmin(1) for c in data.eval_x.split(chunk)])
    return HeadOutput(pred, dict(centroids=_np(mu), empirical_centroids=_np(emp), metric_weight=_np(W),
                                 loss_per_epoch=losses))
