"""Heads on a linear classifier: the stage-1 one (softmax, tau-norm, posthoc-la, lws) or a re-trained one (crt).

softmax     the stage-1 classifier stored in the cache, argmax(W x + b): the baseline.
tau-norm    Decoupling's tau-normalisation (tau_norm.py): logits x . (W / ||W||^p)^T with the bias dropped for
            every p (p = 0 too).  ``p="auto"`` sweeps config.TAU_NORM_P_GRID (Decoupling's sweep) and keeps the
            p with the best mean per-class accuracy on the *val* split (never the test split).
posthoc-la  Menon et al.'s post-hoc logit adjustment argmax(W x + b - tau log pi_y), pi the train prior;
            ``tau`` defaults to 1 here.
crt         Decoupling's classifier re-training: a freshly initialised linear layer (nn.Linear's default init)
            trained with class-balanced sampling, SGD momentum 0.9, weight decay 5e-4, lr 0.2 with a per-epoch
            cosine schedule, 10 epochs, batch 512 (Decoupling's cRT config), on the cached, un-augmented
            features (no backbone re-forward).  ``tau`` > 0 adds tau log N_y to the training logits.
lws         Decoupling's learnable weight scaling: logits f_y (W_y x + b_y) on the frozen stage-1 classifier,
            only the scales f (init 1) learned, crt's recipe for 5 epochs (cls_lws.yaml); ``tau`` as crt.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ...config import TAU_NORM_P_GRID
from ...metrics import balanced_accuracy
from .registry import (DECOUPLING_DEFAULTS, LWS_DEFAULTS, HeadData, HeadOutput, generators, logit_offsets,
                       register_head, to_numpy)
from .sgd import train_sgd


def _stage1_logits(data: HeadData, x):
    return torch.addmm(data.classifier_bias, x, data.classifier_weight.t())


@register_head("softmax", reads_train=False)
def softmax_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Stage-1 softmax classifier from the cache, argmax(W x + b) (baseline)."""
    predict = lambda x: _stage1_logits(data, x).argmax(1)  # noqa: E731
    return HeadOutput(predict(data.eval_x), {}, predict=predict)


def tau_norm_weight(W: torch.Tensor, p: float) -> torch.Tensor:
    """Decoupling's pnorm: every class weight row divided by its L2 norm to the power p (p = 0: W)."""
    return W / W.norm(dim=1, keepdim=True).pow(p)


@register_head("tau-norm", defaults=dict(p=1.0), needs_val=lambda hp: hp["p"] == "auto", reads_train=False)
def tau_norm_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Decoupling's tau-normalised classifier x . (W/||W||^p)^T, no bias; p = "auto": best p on val."""
    W = data.classifier_weight
    chosen, extra = {}, {}
    p = hp["p"]
    if p == "auto":  # Decoupling's sweep, scored on the val split only (never on the test split)
        val_y = to_numpy(data.val_y)
        accs = [balanced_accuracy(to_numpy((data.val_x @ tau_norm_weight(W, q).t()).argmax(1)), val_y,
                                  data.num_classes) for q in TAU_NORM_P_GRID]
        p = TAU_NORM_P_GRID[int(np.argmax(accs))]  # ties: the smallest p
        chosen = dict(p=p, p_select="val")
        extra = dict(p_grid=np.asarray(TAU_NORM_P_GRID), p_val_acc=np.asarray(accs))
    Wn = tau_norm_weight(W, p)
    predict = lambda x: (x @ Wn.t()).argmax(1)  # noqa: E731
    return HeadOutput(predict(data.eval_x), dict(weight=to_numpy(Wn), **extra), chosen, predict)


@register_head("posthoc-la", uses_tau=True, default_tau=1.0, reads_train=False)
def posthoc_la_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Post-hoc logit adjustment argmax(W x + b - tau log pi_y) (Menon et al. 2021)."""
    adjust = -tau * torch.log(data.train_counts / data.train_counts.sum())
    predict = lambda x: (_stage1_logits(data, x) + adjust).argmax(1)  # noqa: E731
    return HeadOutput(predict(data.eval_x), dict(adjustment=to_numpy(adjust)), predict=predict)


def _balanced_linear(data, hp, tau, W, b, scales, train_params):
    """Train (a subset of) W, b, scales of logits scales * (W x + b) with Decoupling's recipe."""
    _, gen = generators(data.seed, data.device)
    offsets = logit_offsets(data, tau)

    def batch_loss(x, y):
        logits = scales * torch.addmm(b, x, W.t())
        return F.cross_entropy(logits if offsets is None else logits + offsets, y)

    losses = train_sgd(train_params, batch_loss, data, hp, gen, weight_decay=hp["weight_decay"], cosine=True)
    W, b, scales = W.detach(), b.detach(), scales.detach()
    predict = lambda x: (scales * torch.addmm(b, x, W.t())).argmax(1)  # noqa: E731
    with torch.no_grad():
        return predict(data.eval_x), losses, predict


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
    pred, losses, predict = _balanced_linear(data, hp, tau, W, b, one, [W, b])
    return HeadOutput(pred, dict(weight=to_numpy(W), bias=to_numpy(b), loss_per_epoch=losses), predict=predict)


@register_head("lws", defaults=LWS_DEFAULTS, uses_tau=True)
def lws_head(data: HeadData, hp: dict, tau: float) -> HeadOutput:
    """Decoupling's LWS: learned per-class scales f_y on the frozen stage-1 classifier."""
    scales = torch.ones(data.num_classes, device=data.device, requires_grad=True)
    W, b = data.classifier_weight, data.classifier_bias
    pred, losses, predict = _balanced_linear(data, hp, tau, W, b, scales, [scales])
    return HeadOutput(pred, dict(weight=to_numpy(W), bias=to_numpy(b), scales=to_numpy(scales), loss_per_epoch=losses),
                      predict=predict)

