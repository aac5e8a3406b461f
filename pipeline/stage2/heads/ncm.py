"""The nearest-class-mean family: ncm, learned-ncm, multi-ncm (paper Sec. 3.1, 4.2, 4.4).

ncm          empirical class means (Eq. 1), prediction argmin_y ||x - mu_y|| (Eq. 2).  ``cl2n=True`` is
             Decoupling/SimpleShot's CL2N: subtract the mean train feature and L2-normalise every feature first.
learned-ncm  centroids initialised at the empirical means, learned by SGD on the cross-entropy of logits
             -1/2 d(x, mu_y), d the Euclidean (NOT squared) distance (Sec. 4.2, Eq. 6); prediction argmin d.
             ``tau`` > 0 trains on -1/2 d + tau log N_y (Eq. 9); prediction is still argmin d.  Records the
             average pairwise CDNV of the centroids after every epoch (epoch 0 = empirical means; Fig. 6b).
multi-ncm    K shared learned displacements delta_i plus a fixed null one (Eq. 10): d_xy = min_i ||x - (mu_y +
             delta_i)||, the mu_y frozen at a learned-ncm fit made first in the same call (same seed, tau and
             hyperparameters, so its centroids equal a separate learned-ncm fit; taken from that fit when
             ``fit_head(memo=...)`` has it: :func:`learned_centroids`).  delta_i ~ N(0, s^2 I/d) with
             s = MULTI_INIT_SCALE * sqrt(mean_y Var_y): ||delta_i|| ~ 1% of the typical feature-to-centroid
             distance, so the start is (almost) learned-ncm but the K copies get different gradients.

learned-ncm and multi-ncm train on features centred on the mean class mean (:class:`CentredFeatures`), with
both GEMMs of a step in bf16 when ``matmul`` is "bf16" (``bf16.py``); multi-ncm computes ||x - mu||^2 once for
the train set (mu is frozen) and keeps it while it fits in A_MAX_BYTES.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ...analysis import cdnv
from ...config import HEAD_DEFAULTS
from .bf16 import aug_sq_dists, augment_centroids, augment_rows, bf16_grad_floor, ncm_loss_bf16, resolve_matmul
from .kernels import (EVAL_CHUNK, FP32_GRAD_FLOOR, multi_ncm_loss_fast, multi_ncm_predict, ncm_loss_fast,
                      ncm_predict, sq_dists)
from .registry import NCM_SGD_DEFAULTS, HeadData, HeadOutput, generators, logit_offsets, register_head, to_numpy
from .sgd import train_sgd

MULTI_INIT_SCALE = 0.01  # ||delta_i|| ~ 1% of the typical feature-to-centroid distance
A_MAX_BYTES = 4 << 30  # multi-ncm keeps ||x - mu||^2 of the whole train set up to this size


def cdnv_readings(mu: np.ndarray, class_means: np.ndarray, within: np.ndarray) -> tuple[float, float]:
    """The average pairwise CDNV (:func:`pipeline.analysis.cdnv`) of centroids ``mu``, read two ways:

    Var_y = mean squared distance of class-y train features to the centroid mu_y being evaluated
    (= within_y + ||xbar_y - mu_y||^2), and Var_y fixed at the empirical within-class variance (the paper's
    "we assume the intra-class variance does not change", Sec. 6).  float64 throughout.
    """
    mu = np.asarray(mu, np.float64)
    var_mu = within + ((np.asarray(class_means, np.float64) - mu) ** 2).sum(1)
    return cdnv(mu, var_mu), cdnv(mu, within)


@register_head("ncm", defaults=dict(cl2n=False))
def ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Nearest empirical class mean, Euclidean (Eq. 1-2); cl2n: centre on the train mean + L2-normalise."""
    if not hp["cl2n"]:
        mu, _ = data.class_stats()
        return HeadOutput(ncm_predict(data.eval_x, mu), dict(centroids=to_numpy(mu), empirical_centroids=to_numpy(mu)),
                          predict=lambda x: ncm_predict(x, mu))
    center = data.train_x.mean(0, keepdim=True)

    def cl2n(x):
        x = x - center
        return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)

    tx = cl2n(data.train_x)
    C = data.num_classes
    mu = torch.zeros(C, data.dim, device=data.device).index_add_(0, data.train_y, tx)
    mu = mu / torch.bincount(data.train_y, minlength=C).to(mu.dtype)[:, None]  # the samples averaged (not N_y)
    return HeadOutput(ncm_predict(cl2n(data.eval_x), mu),
                      dict(centroids=to_numpy(mu), empirical_centroids=to_numpy(mu), cl2n_center=to_numpy(center[0])),
                      predict=lambda x: ncm_predict(cl2n(x), mu))


class CentredFeatures:
    """The training features as the learned-ncm / multi-ncm fits read them: centred on ``center`` (the mean of
    the empirical class means; distances are translation invariant, so the fit is the same, but the GEMM
    operands shrink to the class spread), in the representation the GEMM precision wants (``tensors``, split
    into batches by train_sgd).  Holds data only; the fits train the centroids and displacements."""

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


def fit_learned_ncm(data: HeadData, hp: dict, tau: float, prep: CentredFeatures | None = None):
    """Learned-NCM centroids (Sec. 4.2) -> (centroids tensor, params dict).

    Trained as centred centroids mu - c (same gradients and SGD steps as mu: the loss is translation
    invariant); ``hp["matmul"]`` "bf16" runs both GEMMs of a step in bf16 (see :func:`augment_rows`).
    """
    _, gen = generators(data.seed, data.device)
    emp, within = data.class_stats()
    emp_np = to_numpy(emp)
    prep = prep or CentredFeatures(data, resolve_matmul(hp.get("matmul", "fp32"), data.device))
    c = prep.center
    mu_c = (emp - c).requires_grad_(True)
    offsets = logit_offsets(data, tau)
    cd = [cdnv_readings(emp_np, emp_np, within)]
    if prep.matmul == "bf16":
        mua = augment_centroids(mu_c.detach())  # reused buffer: its constant columns are written once

        def batch_loss(xa, y):
            return ncm_loss_bf16(xa, y, mu_c, offsets, mua, prep.grad_floor)
    else:
        def batch_loss(x, y, x2):
            return ncm_loss_fast(x, y, mu_c, offsets, x2, prep.grad_floor)

    def on_epoch(_):
        cd.append(cdnv_readings(to_numpy(mu_c + c), emp_np, within))

    losses = train_sgd([mu_c], batch_loss, data, hp, gen, tensors=prep.tensors, clip=hp["clip"],
                       on_epoch=on_epoch)
    mu = (mu_c.detach() + c)
    cd = np.asarray(cd, dtype=np.float64)
    return mu, dict(centroids=to_numpy(mu), empirical_centroids=emp_np, cdnv_per_epoch=cd[:, 0],
                    cdnv_fixed_var_per_epoch=cd[:, 1], loss_per_epoch=losses)


def learned_centroids(data: HeadData, hp: dict, tau: float, prep: CentredFeatures):
    """:func:`fit_learned_ncm` -> (centroids, params, reused_seconds), or the result of an earlier fit kept in
    ``data.memo`` (a fit-head call on the same train features with the same tau, seed, SGD hyperparameters
    and GEMM precision: the same centroids bit for bit, so multi-ncm after learned-ncm does not refit them).
    ``reused_seconds`` is what that earlier fit took (0.0 when fitted now), so a fit's recorded time stays
    what it costs on its own."""
    key = ("learned-ncm", float(tau), data.seed, prep.matmul, *(hp[k] for k in sorted(NCM_SGD_DEFAULTS)
                                                                 if k != "matmul"))
    if data.memo is not None and key in data.memo:
        return data.memo[key]
    start = time.perf_counter()
    mu, params = fit_learned_ncm(data, hp, tau, prep)  # params holds numpy copies: the device has synchronised
    if data.memo is not None:
        data.memo[key] = (mu, params, time.perf_counter() - start)
    return mu, params, 0.0


@register_head("learned-ncm", defaults=NCM_SGD_DEFAULTS, uses_tau=True)
def learned_ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Learned-NCM: centroids learned by SGD on CE(-1/2 ||x - mu_y||) (+ tau log N_y), argmin d."""
    matmul = resolve_matmul(hp["matmul"], data.device)
    mu, params, reused_seconds = learned_centroids(data, hp, tau, CentredFeatures(data, matmul))
    return HeadOutput(ncm_predict(data.eval_x, mu), params, dict(matmul=matmul), lambda x: ncm_predict(x, mu),
                      reused_seconds)


@register_head("multi-ncm", defaults=dict(NCM_SGD_DEFAULTS, num_centroids=HEAD_DEFAULTS["num_centroids"]),
               uses_tau=True)
def multi_ncm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Multi-NCM (Eq. 10): K shared displacements + a null one around frozen learned-ncm centroids."""
    matmul = resolve_matmul(hp["matmul"], data.device)
    prep = CentredFeatures(data, matmul)
    mu, ncm_params, reused_seconds = learned_centroids(data, hp, tau, prep)
    cpu_gen, gen = generators(data.seed, data.device, stream=2)
    _, within = data.class_stats()
    scale = MULTI_INIT_SCALE * math.sqrt(float(within.mean())) / math.sqrt(data.dim)
    K = hp["num_centroids"]
    delta = (torch.randn(K, data.dim, generator=cpu_gen) * scale).to(data.device).requires_grad_(True)
    offsets = logit_offsets(data, tau)
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
                  displacements=to_numpy(delta), loss_per_epoch=losses,
                  centroid_loss_per_epoch=ncm_params["loss_per_epoch"],
                  cdnv_per_epoch=ncm_params["cdnv_per_epoch"],
                  cdnv_fixed_var_per_epoch=ncm_params["cdnv_fixed_var_per_epoch"])
    return HeadOutput(multi_ncm_predict(data.eval_x, mu, delta), params, dict(matmul=matmul),
                      lambda x: multi_ncm_predict(x, mu, delta), reused_seconds)

