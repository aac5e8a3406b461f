"""Data-parallel stage 1 under `torchrun`: the process group, rank agreement on errors, and SyncBatchNorm.

`torchrun --nproc-per-node N -m pipeline.cli extract ...` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK in their environment; :func:`init_distributed` turns that into a :class:`Dist` (NCCL on CUDA,
gloo on CPU) and a plain single-process run is the same code with ``Dist(world=1)``.  The training step is
PyTorch's own ``DistributedDataParallel``; nothing here launches processes or reduces gradients.

Errors: bad input found while setting up must stop every rank with the same one-line error and no rank may
be left waiting in a collective.  Work that every rank does (loading the data) runs under
:meth:`Dist.agreed`, which all-gathers each rank's error (or None) before anyone continues; work that only
rank 0 does (reading the checkpoint, the existing cache, hashing the data) runs through
:meth:`Dist.on_main`, which broadcasts rank 0's result *or its error*.  A rank that crashes outright is
stopped by torchrun, which then stops the others (torchrun exits non-zero and prints its own failure
summary).

SyncBatchNorm: ``torch.nn.SyncBatchNorm`` synchronises CUDA tensors only (its forward raises on CPU), so on
CPU/gloo the BatchNorm layers become :class:`GlooSyncBatchNorm`, a SyncBatchNorm subclass whose training
forward all-reduces the per-channel sums through an autograd-aware ``dist.all_reduce`` (two passes:
mean, then centred sum of squares).  Both keep BatchNorm's state-dict keys, so checkpoints move freely
between a single-process run and a SyncBN run.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as tdist
import torch.nn as nn

from ..config import SYNC_BN_MODES
from ..utils import UserError, resolve_device

SMALL_RANK_BATCH = 32  # --sync-bn auto turns SyncBN on when the per-rank batch falls below this
DIST_TIMEOUT = "2h"     # collective timeout: rank 0 alone decodes images / hashes data / writes the cache
DIST_TIMEOUT_ENV = "LNCM_DIST_TIMEOUT"  # overrides DIST_TIMEOUT ('2h30m', '90m', seconds)


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait: NCCL's default (10 minutes) is shorter than rank 0's solo work on a
    large dataset (decoding ImageNet-LT or iNaturalist, writing the cache), during which the other ranks wait
    in a barrier or broadcast.  $LNCM_DIST_TIMEOUT overrides the 2 h default."""
    from .pause import parse_duration
    text = os.environ.get(DIST_TIMEOUT_ENV) or DIST_TIMEOUT
    try:
        return datetime.timedelta(seconds=parse_duration(text))
    except UserError:
        raise UserError(f"${DIST_TIMEOUT_ENV} must look like 2h30m, 90m or a number of seconds, got {text!r}")


@dataclass
class Dist:
    """This process's place in the job (world 1 = a plain single-process run: every method is local)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        """Provenance of the job's shape (not part of the run identity)."""
        return dict(world_size=self.world, backend=self.backend,
                    nnodes=int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", "1")) or 1)
                    if self.active else 1)

    # -- agreement on errors ---------------------------------------------------------------------------
    def agree(self, error: Exception | None):
        """Collective: raise the first failing rank's UserError on every rank (no-op when none failed)."""
        if not self.active:
            if error is not None:
                raise error
            return
        msgs = [None] * self.world
        tdist.all_gather_object(msgs, None if error is None else str(error))
        for r, m in enumerate(msgs):
            if m is not None:
                raise UserError(m if r == 0 or self.world == 1 else f"{m} (on rank {r})")

    @contextlib.contextmanager
    def agreed(self):
        """Run the block on every rank; a UserError on any rank is raised on all of them afterwards."""
        err = None
        try:
            yield
        except UserError as e:
            err = e
        self.agree(err)

    def on_main(self, fn, *args, **kwargs):
        """Run fn on rank 0 only and broadcast its (picklable) result, or its UserError, to every rank."""
        if not self.active:
            return fn(*args, **kwargs)
        box = [None]
        if self.is_main:
            try:
                box = [("ok", fn(*args, **kwargs))]
            except UserError as e:
                box = [("error", str(e))]
        tdist.broadcast_object_list(box, src=0)
        kind, value = box[0]
        if kind == "error":
            raise UserError(value)
        return value

    def all_gather_object(self, obj) -> list:
        """Every rank's obj, in rank order ([obj] for one process)."""
        if not self.active:
            return [obj]
        out = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.active:
            tdist.barrier()

    def any_rank(self, why: str | None, device) -> str | None:
        """A reason (to pause) agreed by all ranks: every rank has one when any rank has one (a signal, its
        clock); one process: its own."""
        if not self.active:
            return why
        votes = self.all_reduce_sum(torch.tensor([float(why is not None)], device=device))
        return why or ("another rank" if float(votes[0]) > 0 else None)

    def close(self):
        if self.active and tdist.is_initialized():
            tdist.destroy_process_group()

    # -- data layout -----------------------------------------------------------------------------------
    def bounds(self, n: int) -> np.ndarray:
        """Contiguous near-equal blocks of n items over the ranks: rank r holds [bounds[r], bounds[r+1])."""
        return np.array([n * r // self.world for r in range(self.world + 1)], dtype=np.int64)

    def block(self, n: int) -> tuple[int, int]:
        b = self.bounds(n)
        return int(b[self.rank]), int(b[self.rank + 1])

    # -- collectives on tensors ------------------------------------------------------------------------
    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            tdist.all_reduce(t)
        return t

    def gather_rows(self, local: np.ndarray, n: int, to_all: bool = False) -> np.ndarray | None:
        """Concatenate every rank's block (rank r holds rows bounds(n)[r]:bounds(n)[r+1]) in rank order: on
        rank 0 (or on every rank with ``to_all``); None on the other ranks.  Padded to the largest block."""
        if not self.active:
            return local
        b = self.bounds(n)
        sizes = np.diff(b)
        width = int(sizes.max())
        t = torch.zeros((width,) + local.shape[1:], dtype=torch.from_numpy(local[:0]).dtype, device=self.device)
        t[:local.shape[0]] = torch.from_numpy(np.ascontiguousarray(local)).to(self.device)
        if to_all:
            parts = [torch.empty_like(t) for _ in range(self.world)]
            tdist.all_gather(parts, t)
        else:
            parts = [torch.empty_like(t) for _ in range(self.world)] if self.is_main else None
            tdist.gather(t, parts, dst=0)
            if not self.is_main:
                return None
        return np.concatenate([p[:s].cpu().numpy() for p, s in zip(parts, sizes)])


SINGLE = Dist()


def load_on_ranks(dist: Dist, load):
    """load() on local rank 0 of every node first (it decodes into the image store), then on the other
    ranks (which memory-map what it stored); a UserError on any rank stops all of them."""
    out = None
    with dist.agreed():
        if dist.local_rank == 0:
            out = load()
    with dist.agreed():
        if out is None:
            out = load()
    return out


def init_distributed(device: str = "auto") -> Dist:
    """The job this process belongs to: torchrun's environment, or a single process when it is absent.

    Under torchrun each rank uses cuda:LOCAL_RANK (NCCL) when CUDA is asked for or available, else the CPU
    (gloo); an explicit --device cuda:N would put every rank on one GPU and is refused."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(device=resolve_device(device))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device={device!r} under torchrun would put every rank on one device; use device='cuda' "
                        "(each rank takes cuda:LOCAL_RANK), 'cpu' or 'auto'")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError("device='cuda' asks for CUDA, but no CUDA device is available; use device='auto' or "
                            "device='cpu'")
        if local >= torch.cuda.device_count():
            raise UserError(f"local rank {local} has no GPU ({torch.cuda.device_count()} visible); start at most "
                            f"{torch.cuda.device_count()} processes per node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        tdist.init_process_group("nccl", device_id=dev, timeout=dist_timeout())
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        tdist.init_process_group("gloo", timeout=dist_timeout())
        backend = "gloo"
    return Dist(rank=rank, world=world, local_rank=local, backend=backend, device=dev)


# ----------------------------------------------------------------------------------------------------
# SyncBatchNorm

def resolve_sync_bn(mode: str, backbone: str, batch_size: int, world: int) -> bool:
    """--sync-bn: on/off, or auto = on when the job has more than one rank and either the backbone is the
    CIFAR ResNet-32 (its recipes' per-rank batches shrink to 64/N...512/N images; a 0.46 M-parameter net
    whose BN statistics over 8-16 images would make an N-rank run a different model from the 1-GPU one) or
    the per-rank batch is under SMALL_RANK_BATCH; off otherwise (ImageNet recipes keep >= 64 images per
    GPU at batch 512 on 8 GPUs -- per-GPU BN, as in Goyal et al. 2017 -- and save one all-reduce per BN
    layer per step).  Off with N > 1 changes the maths: it is part of the run identity (bn_groups)."""
    if mode not in SYNC_BN_MODES:
        raise UserError(f"sync_bn must be one of {', '.join(SYNC_BN_MODES)}, got {mode!r}")
    if world <= 1:
        return False
    if mode == "auto":
        return backbone == "resnet32" or batch_size // world < SMALL_RANK_BATCH
    return mode == "on"


def bn_groups(world: int, sync: bool) -> int | None:
    """Run-identity value: None when BatchNorm normalises over the whole global batch (one process, or N
    with SyncBN -- the same model), else the number of per-rank groups the global batch is split into."""
    return None if world <= 1 or sync else world


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients (every rank's loss
    depends on the global sum)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        tdist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad)
        return grad


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """SyncBatchNorm for CPU tensors (gloo): training-mode statistics over the global batch.  A BatchNorm2d
    subclass (DistributedDataParallel refuses nn.SyncBatchNorm in a CPU module), same state dict.

    In training mode on the CPU it always normalises with its own two-pass arithmetic (the sums are
    all-reduced when a process group of more than one rank exists), so a one-process model converted with
    convert_sync_bn computes exactly what N ranks compute -- tests/test_distributed.py uses that as the
    reference: torch's native CPU batch_norm in channels_last was measured ~1e-2 off an fp64 gradient in
    ResNet-32's first stage where this arithmetic (and native contiguous BN) is ~3e-3 off."""

    def forward(self, x):
        if not (self.training and x.device.type == "cpu"):
            return super().forward(x)
        sync = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
        reduce = _AllReduceSum.apply if sync else (lambda t: t)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float()
        count = torch.tensor([float(xf.numel() // xf.shape[1])])
        s1 = reduce(torch.cat([xf.sum(dims), count]))
        n = s1[-1]
        mean = s1[:-1] / n
        shape = [1, -1] + [1] * (x.dim() - 2)
        centred = xf - mean.view(shape)
        var = reduce((centred * centred).sum(dims)) / n  # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach(), alpha=f)
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_var.mul_(1 - f).add_(unbiased, alpha=f)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device) -> nn.Module:
    """In place: every BatchNorm2d becomes torch.nn.SyncBatchNorm on CUDA (torch's convert_sync_batchnorm,
    sharing parameters and buffers) or GlooSyncBatchNorm on CPU (the same module object, its class
    swapped: nothing else differs).  Returns the model."""
    if torch.device(device).type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlooSyncBatchNorm
    return model


def revert_sync_bn(module: nn.Module) -> nn.Module:
    """In place: SyncBatchNorm layers back to BatchNorm2d, sharing parameters and buffers (inverse of
    convert_sync_bn; the state dict is unchanged).  Returns the module."""
    if type(module) is GlooSyncBatchNorm:
        module.__class__ = nn.BatchNorm2d
        return module
    if isinstance(module, nn.SyncBatchNorm):
        bn = nn.BatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        for name in ("weight", "bias"):
            setattr(bn, name, getattr(module, name))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(bn, name, getattr(module, name))
        bn.train(module.training)
        return bn
    for name, child in module.named_children():
        module.add_module(name, revert_sync_bn(child))
    return module


def wrap_ddp(model: nn.Module, dist: Dist, sync_bn: bool) -> nn.Module:
    """The module the training step calls: the model itself for one process, else
    DistributedDataParallel around it (after SyncBN conversion when asked)."""
    if not dist.active:
        return model
    if sync_bn:
        convert_sync_bn(model, dist.device)
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
