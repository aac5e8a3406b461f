"""Where the uint8 images of a split live during stage 1, and how a global batch reaches each rank.

Each rank keeps only its contiguous block of every split (``Dist.bounds``): on the training device
(``--data-on device``, the default when it fits) or in host memory (``--data-on host``), from where the
rows a batch needs are gathered on the CPU into one of two pinned staging buffers and copied with
``non_blocking=True`` (so gathering batch b+1 overlaps the copy and compute of batch b); the block itself
stays pageable.

Sampling: every rank draws the same seeded permutation per epoch (the single-process one) and each global
batch is cut into contiguous per-rank slices of the batch positions (``Dist.bounds(len(batch))``), as
DistributedSampler cuts the sample list.  A slice's images mostly live on other ranks, so :meth:`Shard.take`
swaps them with one ``all_to_all_single`` of uint8 rows (every rank derives all send/receive counts from
the shared permutation, no extra round trip).  Together with the augmentation drawing the whole global
batch's random numbers and keeping the slice (``BatchAugment(..., rows=)``), rank r sees exactly rows
slice_r of the single-process run's augmented batch.

One process is the same code: a job of one rank, whose block is the whole split and whose slice of every
batch is all of it (:meth:`Shard.take` indexes the block where it lives, no exchange).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as tdist

from ..config import DATA_ON
from ..utils import UserError
from .distributed import SINGLE, Dist

DEVICE_HEADROOM = 0.25  # --data-on auto: the data may use at most this much less than the free device memory


def resolve_data_on(mode: str, device, nbytes: int, log=print) -> str:
    """device or host for ``nbytes`` of images on ``device``, with one log line saying why."""
    if mode not in DATA_ON:
        raise UserError(f"data_on must be one of {', '.join(DATA_ON)}, got {mode!r}")
    device = torch.device(device)
    gib = nbytes / 2 ** 30
    if device.type != "cuda":
        if mode == "host":
            log(f"data on host: on a {device.type} device host memory is the device memory ({gib:.2f} GiB)")
        return "device" if mode == "auto" else mode
    free, total = torch.cuda.mem_get_info(device)
    budget = free - DEVICE_HEADROOM * total
    if mode == "auto":
        mode = "device" if nbytes <= budget else "host"
        log(f"data on {mode}: this rank's images take {gib:.1f} GiB, {device} has {free / 2 ** 30:.1f} GiB free of "
            f"{total / 2 ** 30:.1f} GiB (keeping {DEVICE_HEADROOM:.0%} for the model)" +
            ("; batches stream from pinned host memory" if mode == "host" else ""))
    elif mode == "device" and nbytes > free:
        raise UserError(f"data_on='device': this rank's images take {gib:.1f} GiB but {device} has only "
                        f"{free / 2 ** 30:.1f} GiB free; use data_on='host' (or 'auto'), or more processes")
    return mode


def pinned_empty(shape) -> torch.Tensor:
    """A page-locked uint8 staging buffer (the only pinned memory a host Shard holds)."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def copy_done_event(device: torch.device):
    """A CUDA event recorded on ``device``'s current stream, the stream the host-to-device copy just issued to
    ``device`` runs on (not the current device's stream: they differ with --device cuda:N, N != 0, when
    the current device is another), so waiting on it waits for that copy."""
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    return ev


class Shard:
    """This rank's block of one split's uint8 NHWC images, as NCHW channels_last (device or host)."""

    def __init__(self, images: np.ndarray, device, on: str = "device", dist: Dist = SINGLE):
        self.dist, self.device, self.on = dist, torch.device(device), on
        self.n = int(images.shape[0])
        self.bounds = dist.bounds(self.n)
        self.lo, self.hi = dist.block(self.n)
        block = torch.from_numpy(np.ascontiguousarray(images[self.lo:self.hi]))  # only this block is read
        if on == "device":
            self.nhwc = block.to(self.device)
        elif on == "host":
            # pageable: only the two staging buffers are pinned (pinning the block would round its size up
            # to a power of two of page-locked memory: 66 GB of iNaturalist would lock 128 GB)
            self.nhwc = block.clone()
        else:
            raise ValueError(f"on must be device or host, got {on!r}")
        self._staging, self._events, self._turn = [None, None], [None, None], 0

    @staticmethod
    def block_bytes(images: np.ndarray, dist: Dist = SINGLE) -> int:
        """Bytes of this rank's block of ``images`` (what a Shard of them holds)."""
        lo, hi = dist.block(int(images.shape[0]))
        return (hi - lo) * int(np.prod(images.shape[1:])) * images.itemsize

    @property
    def local(self) -> torch.Tensor:
        """The whole block as NCHW (channels_last), where it lives."""
        return self.nhwc.permute(0, 3, 1, 2)

    def _gather_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Rows (block-local indices) as a contiguous NHWC tensor on the device."""
        if self.on == "device":
            return self.nhwc[torch.from_numpy(rows).to(self.device)]
        idx = torch.from_numpy(rows)
        if self.device.type != "cuda":
            return self.nhwc.index_select(0, idx)
        k = self._turn = 1 - self._turn  # alternate two pinned staging buffers
        buf, ev = self._staging[k], self._events[k]
        if ev is not None:
            ev.synchronize()  # the copy that last read this buffer has finished
        if buf is None or buf.shape[0] < len(rows):
            buf = self._staging[k] = pinned_empty((max(len(rows), 1),) + tuple(self.nhwc.shape[1:]))
        torch.index_select(self.nhwc, 0, idx, out=buf[:len(rows)])
        out = buf[:len(rows)].to(self.device, non_blocking=True)
        self._events[k] = copy_done_event(self.device)
        return out

    def order(self, perm: torch.Tensor):
        """An epoch's permutation (a tensor on the training device) in the form :meth:`take` reads fastest:
        the tensor itself for one process with the data on the device (no host round trip per step), else
        numpy, copied to the host once per epoch."""
        if not self.dist.active and self.on == "device":
            return perm
        return perm.cpu().numpy()

    def gather(self, rows: np.ndarray, to_all: bool = False) -> np.ndarray | None:
        """Per-image results of this rank's block (e.g. its features), concatenated over the ranks in split
        order: on rank 0, or on every rank with ``to_all`` (None on the others); one process: ``rows``."""
        return self.dist.gather_rows(rows, self.n, to_all=to_all)

    def take(self, idx) -> torch.Tensor:
        """This rank's slice of the global batch ``idx`` (sample indices into the whole split: a slice of
        :meth:`order`'s result, or any index array), NCHW channels_last uint8 on the device; one process:
        all of it."""
        if not self.dist.active:
            if self.on == "device":
                return self.local[idx if torch.is_tensor(idx) else torch.from_numpy(np.asarray(idx))]
            return self._gather_rows(_np(idx)).permute(0, 3, 1, 2)
        return self.exchange(_np(idx)).permute(0, 3, 1, 2)

    def exchange(self, idx: np.ndarray) -> torch.Tensor:
        """all_to_all_single of the uint8 rows: rank q receives positions slice_q of ``idx`` in order."""
        d = self.dist
        b = len(idx)
        pos_bounds = d.bounds(b)
        owner = np.searchsorted(self.bounds, idx, side="right") - 1
        dest = np.searchsorted(pos_bounds, np.arange(b), side="right") - 1
        mine = owner == d.rank  # positions whose image this rank holds, ascending (so grouped by dest)
        send = self._gather_rows(idx[mine] - self.lo)
        send_counts = np.bincount(dest[mine], minlength=d.world).tolist()
        lo, hi = int(pos_bounds[d.rank]), int(pos_bounds[d.rank + 1])
        src = owner[lo:hi]
        recv_counts = np.bincount(src, minlength=d.world).tolist()
        recv = torch.empty((hi - lo,) + tuple(self.nhwc.shape[1:]), dtype=torch.uint8, device=self.device)
        tdist.all_to_all_single(recv, send, recv_counts, send_counts)
        order = torch.from_numpy(np.argsort(src, kind="stable")).to(self.device)  # recv is grouped by source
        out = torch.empty_like(recv)
        out[order] = recv
        return out


def _np(idx) -> np.ndarray:
    return idx.cpu().numpy() if torch.is_tensor(idx) else np.asarray(idx)
