"""Class-balanced sampling and the SGD loop every trained head shares.

Class-balanced ("uniform") sampling: every draw picks a class uniformly at random, then one of its training
samples uniformly at random (i.i.d. with replacement; an epoch = N_train such draws).  In expectation this is
Decoupling's class-aware sampler; it needs no per-class queues and is one vectorised call on the host (a CPU
generator on every device: CPU and CUDA fits draw the same batches) and one copy per epoch.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .registry import HeadData


class BalancedSampler:
    """Draw a class uniformly, then one of its samples uniformly (i.i.d., with replacement).

    The draws are made on the host with a CPU generator whatever the fit's device, so a CUDA fit trains on
    exactly the batches of the CPU fit with the same seed; the epoch's indices reach the device in one copy."""

    def __init__(self, y: torch.Tensor, num_classes: int, generator: torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("BalancedSampler draws on the host: pass a CPU generator (see generators())")
        self.device = y.device
        y = y.cpu()
        self.order = torch.argsort(y, stable=True)  # indices grouped by class
        self.counts = torch.bincount(y, minlength=num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.C, self.gen = num_classes, generator

    def draw(self, n: int) -> torch.Tensor:
        c = torch.randint(self.C, (n,), generator=self.gen)
        u = torch.rand(n, generator=self.gen, dtype=torch.float64)
        cnt = self.counts[c]
        j = torch.minimum((u * cnt).long(), cnt - 1)
        idx = self.order[self.starts[c] + j]
        if self.device.type == "cuda":
            return idx.pin_memory().to(self.device, non_blocking=True)
        return idx.to(self.device)


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

