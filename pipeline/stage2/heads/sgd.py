"""The SGD loop every trained head shares, over class-balanced batches (pipeline/sampling.py: an epoch =
N_train i.i.d. draws of a uniform class, then one of its samples)."""
from __future__ import annotations

import math

import numpy as np
import torch

from ...sampling import BalancedSampler
from .registry import HeadData


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

