"""Class-balanced ("uniform") sampling, shared by stage 2's trained heads and stage 1's BatchNorm re-estimation.

Every draw picks a class uniformly at random, then one of its training samples uniformly at random (i.i.d.
with replacement; an epoch = N_train such draws).  In expectation this is Decoupling's class-aware sampler; it
needs no per-class queues and is one vectorised call on the host (a CPU generator on every device: CPU and
CUDA draw the same indices) and one copy per epoch.
"""
from __future__ import annotations

import torch


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
