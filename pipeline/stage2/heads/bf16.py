"""bf16 GEMMs for the learned-ncm / multi-ncm fits (``hp["matmul"]`` "bf16", the default on a CPU with native
bf16: :func:`pipeline.utils.cpu_has_bf16`).

torch's CPU bf16 matmul accumulates in fp32 but rounds its *output* to bf16 (8 significant bits).  The
cross term x.mu of the expansion ||x||^2 - 2 x.mu + ||mu||^2 is as large as ||x|| ||mu||, so rounding it
costs 2^-9 ||x|| ||mu|| of absolute error in d^2 -- far more than d^2 itself can afford when the features
share a large mean (post-ReLU features do), and still ~0.1 logit on centred data.  Instead the whole
squared distance is made the output of ONE bf16 GEMM on augmented rows (no cancellation after rounding):
    x_aug  = [ -2 x~ ,  n1  n2  n3 ,  1  1  1 , 0 ... ]      x~ = bf16(x - c),  n1+n2+n3 = ||x~||^2
    mu_aug = [  mu~  ,  1   1   1  ,  m1 m2 m3, 0 ... ]      mu~ = bf16(mu - c), m1+m2+m3 = ||mu~||^2
so x_aug . mu_aug = ||x~ - mu~||^2 accumulated in fp32 and rounded once: a relative error of 2^-9 on d^2
(2^-10 on d, ~0.03 on a logit of -1/2 d at d ~ 50) whatever the magnitude of x and mu.  The norms are
split into three bf16 pieces (8 + 8 + 8 bits = fp32's 24) so that they enter the fp32 accumulator
exactly, and are computed from the *rounded* x~, mu~, so the result is the exact distance between two
points each moved by at most 2^-9 of their coordinates.  The shared centre c (the mean of the empirical
class means) keeps those coordinates, and hence both that move and the fp32 accumulation error, at the
scale of the class spread instead of the feature mean; it matters most in the backward GEMM,
grad_mu = H^T x~ - mu~ sum_b H, whose bf16-rounded first term cancels against the second by a factor of
||x~|| / ||x~ - mu~||.  The backward GEMM H^T x~ runs in bf16 too (the gradient tolerates 2^-9 relative
rounding); H is rounded to bf16 on input.  That cancellation is unbounded for a sample (almost) on a
centroid -- every sample of a one-sample class at the start -- where H = G / d is huge while the exact
term G (x - mu) / d stays below |G|: its rounding error (2^-9 |G| ||x~|| / d) would swamp the whole step.
So the backward uses max(d, BF16_GRAD_FLOOR * rms ||x~||) there: the error stays below ~3% of |G| per
term, and the pull of a sample closer than the floor to a centroid is damped by d / floor (autograd's
own clamp sets it to 0 at d = 0).  Pairs that close are rare (d ~ ||x~|| for almost all of them).
"""
from __future__ import annotations

import math

import torch

from ...utils import cpu_has_bf16
from .kernels import D2_FLOOR, grad_over_d, softmax_ce

BF16_GRAD_FLOOR = 2.0 ** -4  # relative to the rms centred feature norm; see the module docstring
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
    """x_aug (see the module docstring) of rows ``x`` [N, d] centred on ``center``: bf16 [N, _aug_width(d)]."""
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
    """mu_aug (see the module docstring) of already-centred centroids ``mu_c`` [C, d]: bf16 [C, _aug_width(d)]."""
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
        loss, p = softmax_ce(d, y, offsets)
        ctx.save_for_backward(mu_c, xa, d, p, y)
        ctx.grad_floor = grad_floor
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mu_c, xa, d, p, y = ctx.saved_tensors
        dim = mu_c.shape[1]
        H = grad_over_d(p, d.clamp_min_(ctx.grad_floor), y)
        scale = grad_out / (2 * xa.shape[0])
        HtX = (H.to(torch.bfloat16).t() @ xa[:, :dim]).float()   # = -2 H^T x~
        grad_mu = HtX.mul_(-0.5 * scale).addcmul_(mu_c, (H.sum(0) * scale)[:, None], value=-1)
        return grad_mu, None, None, None, None, None


def bf16_grad_floor(xa: torch.Tensor, dim: int) -> float:
    """BF16_GRAD_FLOOR times the rms norm of the centred rows x~ of augmented ``xa`` (see the module docstring)."""
    return BF16_GRAD_FLOOR * math.sqrt(float(xa[:, dim:dim + 3].float().sum(1).mean()))


def ncm_loss_bf16(xa, y, mu_c, offsets=None, mua_buf=None, grad_floor=None):
    """:func:`ncm_loss` of centred centroids ``mu_c`` on augmented bf16 rows ``xa``: bf16 GEMMs, see the module docstring.
    ``grad_floor`` (default: :func:`bf16_grad_floor` of this batch) bounds 1/d in the backward."""
    if grad_floor is None:
        grad_floor = bf16_grad_floor(xa, mu_c.shape[1])
    return _NCMCrossEntropyBF16.apply(mu_c, xa, y, offsets, mua_buf, grad_floor)


def resolve_matmul(mode: str, device) -> str:
    """The GEMM precision a fit uses: "bf16" or "fp32" (``mode`` "auto": bf16 only on a bf16-capable CPU)."""
    if mode != "auto":
        return mode
    return "bf16" if torch.device(device).type == "cpu" and cpu_has_bf16() else "fp32"


