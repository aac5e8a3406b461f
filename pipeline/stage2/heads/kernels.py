"""The fp32 distance kernels of the NCM-family heads: squared distances, the fused Learned-NCM and Multi-NCM
cross-entropies with closed-form backwards, and the predictors (plain functions: the tests call them).

Distances use the ||x||^2 - 2 x.mu + ||mu||^2 expansion (one GEMM per batch, never a [B, C, d] tensor);
learned-ncm's loss has a fused closed-form backward (Eq. 6, :class:`_NCMCrossEntropy`; one log_softmax
instead of logsumexp's five passes).  Multi-NCM finds the nearest displacement of all (sample, class) pairs
with one cdist call (:func:`max_plus`) and has a closed-form displacement backward
(:class:`_MultiNCMCrossEntropy`).  No Python loop runs over samples.  The bf16 variants are in ``bf16.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

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


def softmax_ce(d: torch.Tensor, y: torch.Tensor, offsets):
    """(mean CE of logits -1/2 d (+ offsets), softmax [B, C]) in three passes over [B, C] after the distance:
    one fused log_softmax, one gather, one exp (logsumexp on the CPU is five separate passes)."""
    logits = d.mul(-0.5) if offsets is None else torch.add(offsets, d, alpha=-0.5)
    logp = torch.log_softmax(logits, 1)
    loss = -logp.gather(1, y[:, None]).mean()
    return loss, logp.exp_()


def grad_over_d(p: torch.Tensor, d: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
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
        loss, p = softmax_ce(d, y, offsets)
        ctx.save_for_backward(mu, x, d, p, y, grad_floor)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mu, x, d, p, y, grad_floor = ctx.saved_tensors
        H = grad_over_d(p, d.clamp_min_(grad_floor), y)
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
# Predictions and the Multi-NCM nearest-displacement search


def prediction_centre(mu: torch.Tensor) -> torch.Tensor:
    """The common centre the predictors subtract from features and means before the distance expansion: the
    mean of the class means.  ||x||^2 - 2 x.mu + ||mu||^2 carries a rounding error of about eps ||x|| ||mu||
    (eps = 2^-24 in fp32, 2^-11 under TF32): post-ReLU features share a large mean, so uncentred the error
    scales with that mean and can flip argmins; centred it scales with the spread around the classes.
    Distances (and so predictions) are translation-invariant: only the rounding changes."""
    return mu.mean(0)


@torch.no_grad()
def ncm_predict(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """argmin_y ||x - mu_y|| (Eq. 2), in chunks of EVAL_CHUNK rows, features and means centred on
    :func:`prediction_centre` before the expansion."""
    c0 = prediction_centre(mu)
    mu_c = mu - c0
    return torch.cat([sq_dists(c - c0, mu_c).argmin(1) for c in x.split(EVAL_CHUNK)])


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
    cache-blocked kernel (faster than broadcasting, see docs/performance.md; no [B, C, K] temporary).  To get the argmax
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
        loss, p = softmax_ce(d, y, offsets)
        ctx.save_for_backward(D, x, mu, d, p, y, arg)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        D, x, mu, d, p, y, arg = ctx.saved_tensors
        Wg = grad_over_d(p, d, y)                       # G / d; dL/d(d2) = -G / (4 B d)
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
    displacements are zero, since the min is then exactly 0).  Features and means centred on
    :func:`prediction_centre` first.
    """
    D = _with_null(delta)
    c0 = prediction_centre(mu)
    mu = mu - c0  # centred (see prediction_centre): the displacements are translation-invariant
    muD, DD = mu @ D.t(), (D * D).sum(1)
    out = []
    for c in x.split(EVAL_CHUNK):
        c = c - c0
        out.append(multi_min_sq_fast(sq_dists(c, mu), c @ D.t(), muD, DD)[0].argmin(1))
    return torch.cat(out)

