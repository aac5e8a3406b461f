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
    step = SGDStep(params, hp["momentum"], weight_decay, clip)
    lr = hp["lr"]
    sampler = BalancedSampler(data.train_y, data.num_classes, gen)
    n, bs, epochs = data.train_x.shape[0], hp["batch_size"], hp["epochs"]
    losses = []
    for epoch in range(epochs):
        if cosine:
            lr = 0.5 * hp["lr"] * (1 + math.cos(math.pi * epoch / epochs))
        idx = sampler.draw(n)
        total = torch.zeros((), device=data.device)
        for batch in zip(*(t[idx].split(bs) for t in tensors)):
            loss = batch_loss(*batch)
            loss.backward()
            step(lr)
            total += loss.detach() * batch[0].shape[0]  # stays on the device: no sync per step
        losses.append(float(total) / n)
        if on_epoch is not None:
            on_epoch(epoch + 1)
    return np.asarray(losses, dtype=np.float64)


class SGDStep:
    """``clip_grad_norm_(params, clip)`` then ``torch.optim.SGD(params, lr, momentum, weight_decay).step()``
    and ``zero_grad``, as the same tensor ops (bit-identical: tests/test_sgd_step.py).  Why not the library:
    a head has 1-2 small tensors, so the library's Python wrappers are ~0.2 ms of a ~0.8 ms learned-NCM step
    on CPU, and the first ``torch.optim.SGD`` of a process imports torch._dynamo (~2 s); benchmarks/sgd_step.py
    measures both.  Every parameter must get a gradient at every step (those of every head here do)."""

    def __init__(self, params, momentum: float, weight_decay: float = 0.0, clip: float | None = None):
        self.params, self.momentum, self.weight_decay, self.clip = list(params), momentum, weight_decay, clip
        self.bufs = None  # momentum buffers, created from the first step's gradients as torch does

    @torch.no_grad()
    def __call__(self, lr: float):
        grads = [p.grad for p in self.params]
        if self.clip is not None:  # clip_grad_norm_: total 2-norm over all gradients, scale capped at 1
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
            torch._foreach_mul_(grads, torch.clamp(self.clip / (total + 1e-6), max=1.0))
        if self.weight_decay:
            grads = torch._foreach_add(grads, self.params, alpha=self.weight_decay)
        if self.momentum:
            if self.bufs is None:
                self.bufs = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(self.bufs, self.momentum)
                torch._foreach_add_(self.bufs, grads)
            grads = self.bufs
        torch._foreach_add_(self.params, grads, alpha=-lr)
        for p in self.params:
            p.grad = None
