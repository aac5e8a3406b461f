"""Batched, per-sample training augmentation on the training device (CPU or CUDA), on uint8 NCHW tensors.

No PIL, no DataLoader workers, no per-image Python loop: every random draw is made for the whole batch at
once with the run's seeded generator, and each deterministic image operation runs once per *group* of
images that drew the same parameters.

Kinds (``BatchAugment(kind=...)``, the recipe's ``augment`` field):
  cifar          RandomCrop(32, padding=4) on zero padding + RandomHorizontalFlip         (LDAM-DRW)
  cifar-autoaug  the above + AutoAugment (CIFAR-10 policy) + Cutout(1 hole, 16 px)        (Balanced Meta-Softmax)
  cifar-autoaug-balms  the same draws, with the geometric ops of BALMS's own AutoAugment (DeepVoltaire's PIL
                 copy): grey fill, Rotate counter-clockwise only, Shear bicubic, Translate rounded  (recipe balms)
  imagenet       RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + RandomHorizontalFlip   (Decoupling)

AutoAugment: each image draws its own sub-policy (uniform over torchvision's 25 CIFAR-10 sub-policies), and
for each of the sub-policy's two ops whether it applies (its probability) and, for signed ops, the sign
(1/2 each), exactly as ``torchvision.transforms.v2.AutoAugment.forward`` does for one image.  The op
itself is torchvision's own (``_apply_image_or_video_transform``, nearest interpolation, fill 0) on the
group of images that drew it, so probabilities, magnitudes and pixel results are torchvision's.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from ..config import AUGMENT_KINDS as KINDS
from ..config import CUTOUT_LENGTH

_AA = v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)  # holds the policy table and applies single ops
CIFAR10_POLICY = _AA._policies                      # 25 x ((op, prob, magnitude bin), (op, prob, bin))
NUM_BINS = 10                                       # torchvision's AutoAugment magnitude bins


def op_magnitude(op: str, bin_idx, height: int, width: int) -> tuple[float, bool]:
    """torchvision's magnitude of `op` at `bin_idx` (0.0 for ops without one) and whether it is signed."""
    fn, signed = _AA._AUGMENTATION_SPACE[op]
    mags = fn(NUM_BINS, height, width)
    return (float(mags[bin_idx]) if mags is not None else 0.0), bool(signed and mags is not None)


def apply_op(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One AutoAugment op with one magnitude on a uint8 batch [B,3,H,W], via torchvision v2."""
    return _AA._apply_image_or_video_transform(x, op, magnitude, interpolation=_AA.interpolation,
                                               fill=_AA._fill)


# BALMS's AutoAugment (DeepVoltaire's CIFAR10Policy on PIL images): the same 25 sub-policies, probabilities
# and magnitude bins as torchvision's; it differs in the geometric ops and in Solarize's thresholds.
BALMS_FILL = 128  # fillcolor=(128, 128, 128) of Shear / Translate, and rotate_with_fill's grey
_BALMS_FILL_ARG = {"others": [float(BALMS_FILL)] * 3}  # torchvision's per-type fill (cf. _AA._fill)
BALMS_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Solarize")  # where the two differ


def balms_magnitude(op: str, bin_idx, height: int, width: int) -> tuple[float, bool]:
    """BALMS's magnitude of `op` at `bin_idx` and whether it is signed (see op_magnitude)."""
    mag, signed = op_magnitude(op, bin_idx, height, width)
    if op == "Rotate":
        return mag, False  # rotate_with_fill(img, magnitude): always counter-clockwise
    if op.startswith("Translate"):
        # PIL's nearest AFFINE at a fractional offset is the rounded shift (torchvision truncates: int())
        return float(math.floor(mag + 0.5)), signed
    if op == "Solarize":
        return mag * 256 / 255, signed  # thresholds np.linspace(256, 0, 10) (torchvision: 255 -> 0)
    return mag, signed


def shear_bicubic(x: torch.Tensor, op: str, m: float, fill: int = BALMS_FILL) -> torch.Tensor:
    """PIL's ``img.transform(size, AFFINE, (1, m, 0, 0, 1, 0) or (1, 0, 0, m, 1, 0), BICUBIC, fillcolor)`` on a
    uint8 batch: the output pixel centred at (u, v) (from the top-left corner) reads the input at (u + m v, v)
    (ShearX) or (u, v + m u) (ShearY), bicubic with the border pixels repeated, and is `fill` where that point
    lies outside the image.  grid_sample's bicubic kernel has a = -0.75 (PIL's: -0.5)."""
    b, c, h, w = x.shape
    v, u = torch.meshgrid(torch.arange(h, device=x.device) + 0.5, torch.arange(w, device=x.device) + 0.5,
                          indexing="ij")
    if op == "ShearX":
        u = u + m * v
    else:
        v = v + m * u
    grid = torch.stack((2 * u / w - 1, 2 * v / h - 1), -1).expand(b, h, w, 2)
    y = F.grid_sample(x.float(), grid, mode="bicubic", padding_mode="border", align_corners=False)
    outside = (u < 0) | (u >= w) | (v < 0) | (v >= h)
    return y.round().clamp(0, 255).to(torch.uint8).masked_fill(outside, fill)


def apply_op_balms(x: torch.Tensor, op: str, magnitude: float) -> torch.Tensor:
    """One op of BALMS's AutoAugment on a uint8 batch (magnitude from balms_magnitude)."""
    if op in ("ShearX", "ShearY"):
        return shear_bicubic(x, op, magnitude)
    if op == "Solarize" and magnitude > 1:  # threshold 256: no pixel reaches it (torchvision refuses > 255)
        return x
    return _AA._apply_image_or_video_transform(x, op, magnitude, interpolation=_AA.interpolation,
                                               fill=_BALMS_FILL_ARG)


def draw_autoaugment(b: int, device, generator=None):
    """Per-image draws: sub-policy index [b], op applied [b,2] (bool), op negated [b,2] (bool)."""
    sub = torch.randint(0, len(CIFAR10_POLICY), (b,), device=device, generator=generator)
    probs = torch.tensor([[p for _, p, _ in pol] for pol in CIFAR10_POLICY], device=device)[sub]
    # torchvision applies an op when rand <= p and negates a signed magnitude when rand <= 0.5
    applied = torch.rand(b, 2, device=device, generator=generator) <= probs
    negated = torch.rand(b, 2, device=device, generator=generator) <= 0.5
    return sub, applied, negated


def autoaugment_groups(sub, applied, negated) -> list[tuple[str, float, np.ndarray]]:
    """The (op, signed magnitude, row indices) applications of the drawn sub-policies, grouped on the host.

    Order: sub-policies ascending, then the sub-policy's two ops, then sign + before -, the order in which
    they were always applied (each image's two ops in policy order; groups are disjoint, so the order
    between groups changes no pixel).  The draws are brought to the host once (no copy if already there)."""
    sub, applied, negated = (np.asarray(t.cpu()) if torch.is_tensor(t) else np.asarray(t)
                             for t in (sub, applied, negated))
    groups = []
    for k in np.unique(sub).tolist():
        members = np.flatnonzero(sub == k)
        for j, (op, _, bin_idx) in enumerate(CIFAR10_POLICY[k]):
            groups.append((k, j, op, bin_idx, members, applied[members, j], negated[members, j]))
    return groups


def autoaugment(x: torch.Tensor, sub, applied, negated, balms: bool = False) -> torch.Tensor:
    """Apply the drawn CIFAR-10 AutoAugment sub-policies to a uint8 batch [B,3,H,W] (a new tensor); with
    ``balms`` the ops of BALMS's own AutoAugment (balms_magnitude, apply_op_balms) on the same draws.

    The decisions are grouped on the host (numpy) and every group's row indices reach the device in one
    copy, so on CUDA there is no host sync per group (the draws themselves should be host tensors: see
    :class:`BatchAugment`)."""
    h, w = x.shape[-2:]
    magnitude, apply = (balms_magnitude, apply_op_balms) if balms else (op_magnitude, apply_op)
    out = x.clone()
    todo, index = [], []
    for k, j, op, bin_idx, members, app, neg in autoaugment_groups(sub, applied, negated):
        mag, signed = magnitude(op, bin_idx, h, w)
        for sign in ((1.0, -1.0) if signed else (1.0,)):
            sel = app & (neg == (sign < 0)) if signed else app
            rows = members[sel]
            if rows.size:
                todo.append((op, sign * mag, sum(a.size for a in index), rows.size))
                index.append(rows)
    if not todo:
        return out
    flat = torch.from_numpy(np.concatenate(index).astype(np.int64))
    if x.device.type == "cuda":
        flat = flat.pin_memory().to(x.device, non_blocking=True)
    for op, mag, start, n in todo:
        rows = flat[start:start + n]
        out[rows] = apply(out[rows], op, mag)
    return out


def draw_cutout(b: int, h: int, w: int, device, generator=None):
    """Cutout centres (y, x), each uniform over the image, as DeVries & Taylor's np.random.randint(h)."""
    y = torch.randint(0, h, (b,), device=device, generator=generator)
    x = torch.randint(0, w, (b,), device=device, generator=generator)
    return y, x


def cutout(x: torch.Tensor, cy, cx, length: int = CUTOUT_LENGTH) -> torch.Tensor:
    """Zero a length x length box centred at (cy, cx), clipped at the border (so edge boxes are smaller).

    The reference fills 0 after ToTensor and before Normalize, i.e. black pixels: 0 in uint8."""
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= (cy - length // 2).clamp(0, h)[:, None]) & (rows < (cy + length // 2).clamp(0, h)[:, None])
    in_cols = (cols >= (cx - length // 2).clamp(0, w)[:, None]) & (cols < (cx + length // 2).clamp(0, w)[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :]  # [B,H,W]
    return x.masked_fill(box[:, None], 0)


def pad_crop_flip(x: torch.Tensor, i, j, flip, pad: int = 4) -> torch.Tensor:
    """RandomCrop(size, padding=pad) at offsets (i, j) in [0, 2*pad] on zero padding, then a horizontal flip
    where `flip` is set; one gather for the whole batch."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dev = x.device
    rows = (i[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = j[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return xp[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows, cols]


def rrc_params(b: int, height: int, width: int, device, generator=None, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3), tries: int = 10):
    """Crop boxes (top, left, h, w) with torchvision's RandomResizedCrop.get_params semantics, batched.

    Per image: up to `tries` draws of (area fraction ~ U(scale), log aspect ~ U(log ratio)), w = round(sqrt(
    area*ratio)), h = round(sqrt(area/ratio)); the first draw that fits is kept, its top-left uniform over the
    valid positions; when none fits, the centre crop of the largest box whose aspect is within `ratio`."""
    area = height * width
    target = area * torch.empty(b, tries, device=device).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(b, tries, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                           generator=generator)
    ar = torch.exp(logr)
    w = torch.sqrt(target * ar).round().long()
    h = torch.sqrt(target / ar).round().long()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((b,), -1, device=device))
    # fallback (torchvision): centre crop, aspect clamped into `ratio`
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    sel = first.clamp(min=0)[:, None]
    cw = torch.where(first >= 0, w.gather(1, sel).squeeze(1), torch.full_like(first, fw))
    ch = torch.where(first >= 0, h.gather(1, sel).squeeze(1), torch.full_like(first, fh))
    u = torch.rand(b, 2, device=device, generator=generator)
    top = torch.where(first >= 0, (u[:, 0] * (height - ch + 1)).floor().long(), (height - ch) // 2)
    left = torch.where(first >= 0, (u[:, 1] * (width - cw + 1)).floor().long(), (width - cw) // 2)
    return top, left, ch, cw


def resized_crop(x: torch.Tensor, top, left, h, w, flip, out_size: int) -> torch.Tensor:
    """Bilinear resize of each crop box to out_size x out_size (optionally flipped), one affine resampling
    for the whole batch.  Works on any float batch [B,C,H,W]."""
    b, _, H, W = x.shape
    sx, sy = w.float() / W, h.float() / H                      # box size in normalised units (half-extent)
    tx = (2 * left.float() + w.float()) / W - 1                # box centre in [-1, 1] (align_corners=False)
    ty = (2 * top.float() + h.float()) / H - 1
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = torch.where(flip, -sx, sx)
    theta[:, 0, 2] = tx
    theta[:, 1, 1] = sy
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, (b, x.shape[1], out_size, out_size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def draw_device(generator) -> torch.device:
    """Where the random decisions are drawn: on the generator's device (a CPU generator, the default, draws
    on the host: no device sync), on the host without one."""
    return torch.device("cpu") if generator is None else generator.device


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """One host-to-device copy (pinned, asynchronous on CUDA); the tensor itself where it already is."""
    device = torch.device(device)
    if t.device == device or (device.type == t.device.type == "cuda" and device.index is None):
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class BatchAugment:
    """uint8 NCHW batches -> normalised float batches, augmented on the device with a seeded generator.

    The random decisions are drawn with ``generator`` on its own device: a CPU generator (what a CPU run
    has always used) makes every draw on the host, groups the AutoAugment decisions in numpy and copies
    the integer decisions to the training device once per batch, so a CUDA step never waits on the GPU
    for them; a CPU run's draws and pixels are those of the per-group implementation it replaced."""

    def __init__(self, mean, std, device, kind="cifar", out_size=None, generator=None):
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation {kind!r}; expected one of {KINDS}")
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.kind, self.out_size, self.g, self.device = kind, out_size, generator, device

    def reseeded(self, kind: str, generator) -> "BatchAugment":
        """The same normalisation with augmentation ``kind`` drawn from ``generator`` (e.g. a run's training
        augmentation for BatchNorm re-estimation, with its own fixed seed)."""
        if kind not in KINDS:
            raise ValueError(f"unknown augmentation {kind!r}; expected one of {KINDS}")
        out = copy.copy(self)
        out.kind, out.g = kind, generator
        return out

    def normalize(self, x_uint8):
        return (x_uint8.float() - self.mean) / self.std

    def __call__(self, x, rows=None):
        """Augment and normalise a uint8 batch.  ``rows=(lo, hi, total)``: x holds rows lo:hi of a batch of
        ``total`` images (one rank's slice of a data-parallel global batch); the random draws are made for
        all ``total`` images, in the single-process order, and rows lo:hi of them are applied, so each rank
        augments its slice exactly as one process augments the whole batch."""
        n, _, h, w = x.shape
        b, keep = (n, slice(None)) if rows is None else (rows[2], slice(rows[0], rows[1]))
        g = self.g
        hd = draw_device(g)
        # every draw first, on the generator's device (the image ops below consume no random numbers), then
        # the ops on the kept rows; the integer decisions reach the training device in one copy
        flip = torch.rand(b, device=hd, generator=g) < 0.5
        if self.kind.startswith("cifar"):
            autoaug = self.kind.startswith("cifar-autoaug")
            i = torch.randint(0, 9, (b,), device=hd, generator=g)
            j = torch.randint(0, 9, (b,), device=hd, generator=g)
            ints = [i, j, flip.long()]
            if autoaug:
                aa = draw_autoaugment(b, hd, g)
                ints += draw_cutout(b, h, w, hd, g)
            i, j, flip, *cyx = to_device(torch.stack([t[keep] for t in ints]), self.device)
            x = pad_crop_flip(x, i, j, flip.bool())
            if autoaug:
                # BALMS order: crop, flip, AutoAugment (PIL, uint8), ToTensor, Cutout, Normalize
                x = autoaugment(x, *(t[keep] for t in aa), balms=self.kind == "cifar-autoaug-balms")
                x = cutout(x, *cyx)
            return self.normalize(x)
        top, left, ch, cw, flip = to_device(torch.stack([t[keep] for t in (*rrc_params(b, h, w, hd, g),
                                                                            flip.long())]), self.device)
        return resized_crop(self.normalize(x), top, left, ch, cw, flip.bool(), self.out_size or w)
