"""Heads that learn the distance itself: local-projection (Eq. 4) and metric-ncm (A.3, Table 5).

local-projection  d^_xy = (x-mu_y)^T Q_y diag(sigmoid(w_y)) Q_y^T (x-mu_y), Q_y the eigenvectors (columns) of
                  the MLE class covariance (Eq. 1; the paper writes Q_y^T with eigenvectors as rows) and mu_y
                  the empirical means, both fixed; only w_y is learned (CE on -1/2 d^), from w = 0 (sigmoid
                  = 1/2: squared-Euclidean NCM up to scale, where the sigmoid is steepest).  Saved
                  ``local_weights`` = sigmoid(w_y), columns in ascending eigenvalue order (as in Fig. 3).
                  O(B C d^2) per step: an analysis head for CIFAR-sized C and d.
metric-ncm        Eq. 3's Mahalanobis distance learned jointly with the centroids: ``distance="squared"``
                  (default, A.3 as written) d = (x-mu_y)^T W^T W (x-mu_y), or ``"euclidean"`` d = ||W (x-mu_y)||,
                  the non-squared form Learned NCM trains with (kept because with W = I it starts exactly at
                  learned-ncm).  ``metric="global"``: one W (init I); ``"local"``: one W_y per class (init I;
                  O(B C d^2) per step, O(C d^2) memory).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import EVAL_CHUNK, euclid, prediction_centre, sq_dists
from .registry import SGD_DEFAULTS, HeadData, HeadOutput, generators, logit_offsets, register_head, to_numpy
from .sgd import train_sgd


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
    offsets = logit_offsets(data, tau)

    def batch_loss(x, y):
        with torch.no_grad():  # the coordinates do not depend on w
            z2 = local_coords(x, mu, Q).square()
        logits = -0.5 * (z2 * torch.sigmoid(w)).sum(-1)
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd([w], batch_loss, data, hp, gen, clip=hp["clip"])
    s = torch.sigmoid(w.detach())
    chunk = max(1, 2 ** 24 // (C * d))
    c0 = prediction_centre(mu)  # centred: Q.x - Q.mu cancels less (see prediction_centre)
    predict = lambda x: torch.cat([local_projection_dist(c - c0, mu - c0, Q, s).argmin(1)  # noqa: E731
                                   for c in x.split(chunk)])
    with torch.no_grad():
        pred = predict(data.eval_x)
    return HeadOutput(pred, dict(local_weights=to_numpy(s), eigenvalues=to_numpy(evals), centroids=to_numpy(mu),
                                 empirical_centroids=to_numpy(mu), loss_per_epoch=losses), predict=predict)


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
    offsets = logit_offsets(data, tau)

    def batch_loss(x, y):
        logits = metric_logits(x, mu, W, hp["distance"])
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd([mu, W], batch_loss, data, hp, gen, clip=hp["clip"])
    mu, W = mu.detach(), W.detach()
    chunk = EVAL_CHUNK if not local else max(1, 2 ** 24 // (C * d))
    c0 = prediction_centre(mu)  # centred before the expansion (translation-invariant, smaller rounding)
    # argmin of the squared distance = argmin of its square root
    predict = lambda x: torch.cat([metric_sq(c - c0, mu - c0, W).argmin(1) for c in x.split(chunk)])  # noqa: E731
    with torch.no_grad():
        pred = predict(data.eval_x)
    return HeadOutput(pred, dict(centroids=to_numpy(mu), empirical_centroids=to_numpy(emp), metric_weight=to_numpy(W),
                                 loss_per_epoch=losses), predict=predict)
