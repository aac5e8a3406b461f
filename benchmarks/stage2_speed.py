"""Stage-2 speed: fitting heads on cached features vs one re-forward of the backbone.

Why it matters: Decoupling's cRT re-forwards the frozen backbone over the (augmented) training set every
epoch; our stage 2 reads features once from the cache.  This prints, in one run, the fit time of ncm,
learned-ncm and multi-ncm (defaults: 30 epochs, batch 512; including the eval-set prediction) and the time
of one forward pass of a ResNet-32 over the same number of 32x32 images, and their ratio.

Sizes (features built in memory, no HDF5):
  (a) CIFAR-100-LT (beta 100): 10,847 x 64, 100 classes (LDAM counts), 10,000 eval samples
  (b) ImageNet-LT:            115,846 x 512, 1,000 classes (counts 1280..5), 50,000 eval samples
The features of (b) are made as hard as real ones (class means 0.45 N(0, I), spread 1 (head) .. 2 (tail):
NCM ~67% All) and share a mean of +3 per dimension (post-ReLU features are positive), so that the
accuracy of the fast fit (bf16 GEMMs where the CPU has them, hparams "matmul") against the fp32 fit of the
same head (``matmul="fp32"``, same draws) is a meaningful check; it is printed as "All fast - fp32".
For (b) the ResNet-32 pass is timed on the (a)-sized subset and extrapolated linearly.  --extrapolate times
multi-ncm at 1 and 2 epochs and extrapolates linearly to 30 instead of running it (then marked "~").
--full also fits multi-ncm with fp32 GEMMs for its accuracy difference.

    python benchmarks/stage2_speed.py            # CPU targets: learned-ncm (a) <= 5 s, (b) <= 60 s; multi <= 3x
    python benchmarks/stage2_speed.py --quick    # smoke run, smaller sizes
    python benchmarks/stage2_speed.py --sizes b --threads 2   # what --threads 2 buys at ImageNet-LT size
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from pipeline.stage1.data import lt_counts
from pipeline.stage2.heads import HEADS, HeadData
from pipeline.stage1.models import resnet10, resnet32
from pipeline.utils import resolve_device

TARGETS = {"a": 5.0, "b": 60.0}  # CPU targets for learned-ncm, seconds


def imagenet_lt_counts(num_classes=1000, total=115_846, n_max=1280, n_min=5):
    """Counts falling from n_max to n_min, log N_y linear in rank**gamma, summing exactly to ``total``.

    gamma = 1 is the CIFAR-LT exponential profile (230k images for these end points); a smaller gamma
    front-loads the decay, as ImageNet-LT's Pareto counts do.  gamma is found by bisection.
    """
    rank = np.arange(num_classes) / (num_classes - 1)

    def counts(gamma):
        return np.round(n_max * (n_min / n_max) ** (rank ** gamma)).astype(np.int64)
    lo, hi = 1e-3, 1.0
    for _ in range(60):  # the sum grows with gamma
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if counts(mid).sum() < total else (lo, mid)
    c = counts(lo)  # sum just below total; the rounding remainder goes to the largest classes below n_max
    c[np.flatnonzero(c < n_max)[: total - c.sum()]] += 1
    assert c.sum() == total and c.max() == n_max and c.min() == n_min, (c.sum(), c.max(), c.min())
    return c


def make_data(counts, dim, n_eval_per_class, device, seed=0, separation=3.0 / np.sqrt(2), offset=0.0):
    """Long-tailed Gaussian features (class means separation * N(0, I), spread 1 .. 2 towards the tail,
    plus a shared ``offset``) and a balanced eval set, float32 on ``device``; returns (HeadData, eval labels)."""
    g = torch.Generator().manual_seed(seed)
    C = len(counts)
    means = torch.randn(C, dim, generator=g) * separation + offset
    logc = np.log(counts)
    spread = torch.as_tensor(1 + (logc.max() - logc) / max(logc.max() - logc.min(), 1e-9), dtype=torch.float32)
    ty = torch.repeat_interleave(torch.arange(C), torch.as_tensor(counts))
    ey = torch.arange(C).repeat_interleave(n_eval_per_class)
    tx = means[ty] + spread[ty, None] * torch.randn(len(ty), dim, generator=g)
    ex = means[ey] + spread[ey, None] * torch.randn(len(ey), dim, generator=g)
    n = torch.as_tensor(counts, dtype=torch.float32)
    return HeadData(tx.to(device), ty.to(device), ex.to(device), n.to(device), means.to(device),
                    torch.zeros(C, device=device)), ey.numpy()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_head(name, data, device, ey=None, **over):
    """(seconds, All accuracy in % or None, hparams the head chose) of one fit + eval-set prediction."""
    spec = HEADS[name]
    hp = {**spec.defaults, **over}
    sync(device)
    t = time.perf_counter()
    out = spec.fn(data, hp, 0.0)
    pred = torch.as_tensor(out.pred).cpu().numpy()
    sync(device)
    dt = time.perf_counter() - t
    acc = None if ey is None else 100 * np.mean([(pred[ey == c] == c).mean() for c in np.unique(ey)])
    return dt, acc, out.chosen


def time_forward(model_fn, n_images, size, device, batch=256, max_images=None):
    """Seconds of one eval-mode, no-grad forward over n_images (timed on max_images, then scaled)."""
    model = model_fn().to(device).eval()
    timed = min(n_images, max_images or n_images)
    x = torch.randn(batch, 3, size, size, device=device)
    with torch.no_grad():
        model(x[:8])  # warm-up (allocator, cuDNN autotune)
        sync(device)
        t = time.perf_counter()
        done = 0
        while done < timed:
            b = min(batch, timed - done)
            model(x[:b])
            done += b
        sync(device)
    dt = time.perf_counter() - t
    return dt * n_images / timed, timed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes and 3 epochs (a smoke run)")
    ap.add_argument("--extrapolate", action="store_true", help="multi-ncm on (b): 1 and 2 epochs, extrapolated")
    ap.add_argument("--full", action="store_true", help="also fit multi-ncm with fp32 GEMMs (accuracy reference)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    ap.add_argument("--sizes", default="a,b", help="which of a,b to run")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, as `fit_head` runs a CPU fit; more pays at size (b))")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    epochs = 3 if args.quick else HEADS["learned-ncm"].defaults["epochs"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})  load average {load:.1f} on "
          f"{os.cpu_count()} CPUs -- other work on the machine slows every number below")
    print(f"heads: {epochs} epochs x batch 512, class-balanced; times include the eval-set prediction")

    # (name, counts, dim, eval per class, make_data options)
    hard = dict(separation=0.45, offset=3.0)
    sizes = {"a": ("CIFAR-100-LT", np.array(lt_counts(500, 100, 100)), 64, 100, {}),
             "b": ("ImageNet-LT", imagenet_lt_counts(), 512, 50, hard)}
    if args.quick:
        sizes = {"a": ("CIFAR-100-LT/4", np.array(lt_counts(125, 25, 100)), 32, 20, {}),
                 "b": ("ImageNet-LT/10", imagenet_lt_counts(100, 11_585, 1280, 5), 128, 10, hard)}

    per_image, timed = None, 0
    for key in args.sizes.split(","):
        name, counts, dim, n_eval, opts = sizes[key]
        data, ey = make_data(counts, dim, n_eval, device, **opts)
        N, C = int(counts.sum()), len(counts)
        steps = -(-N // 512)
        print(f"\n({key}) {name} size: train {N:,} x {dim}, {C} classes (N_y {counts.max()}..{counts.min()}), "
              f"eval {C * n_eval:,}; {steps} steps/epoch; features {opts or 'separation 2.1'}")
        fits, accs = {}, {}
        t, accs["ncm"], _ = time_head("ncm", data, device, ey)
        fits["ncm"] = (t, False)
        t, accs["learned-ncm"], chosen = time_head("learned-ncm", data, device, ey, epochs=epochs)
        fits["learned-ncm"] = (t, False)
        mm = chosen.get("matmul")
        if key == "b" and args.extrapolate and not args.quick:
            t1 = time_head("multi-ncm", data, device, epochs=1)[0]
            t2 = time_head("multi-ncm", data, device, epochs=2)[0]
            fits["multi-ncm"] = ((t1 - (t2 - t1)) + epochs * (t2 - t1), True)  # intercept + epochs * slope
            note = f"   (~: measured {t1:.1f} s at 1 epoch, {t2:.1f} s at 2, extrapolated linearly)"
        else:
            t, accs["multi-ncm"], _ = time_head("multi-ncm", data, device, ey, epochs=epochs)
            fits["multi-ncm"] = (t, False)
            note = ""
        for h, (t, extra) in fits.items():
            target = ""
            if h == "learned-ncm" and device.type == "cpu" and not args.quick:
                target = f"   CPU target <= {TARGETS[key]:.0f} s: {'met' if t <= TARGETS[key] else 'MISSED'}"
            acc = f"   All {accs[h]:.2f}%" if accs.get(h) is not None else ""
            mmx = f" [matmul {mm}]" if h != "ncm" else ""
            print(f"  {h:12s} {'~' if extra else ' '}{t:8.2f} s{mmx}{acc}{target}{note if h == 'multi-ncm' else ''}")
        ratio = fits["multi-ncm"][0] / fits["learned-ncm"][0]
        print(f"  multi-ncm / learned-ncm: {'~' if fits['multi-ncm'][1] else ''}{ratio:.2f}x"
              + (f"   target <= 3x: {'met' if ratio <= 3 else 'MISSED'}" if key == "b" and not args.quick else ""))
        if mm == "bf16":  # the same fit with fp32 GEMMs: the accuracy reference of the bf16 fast path
            t32, a32, _ = time_head("learned-ncm", data, device, ey, epochs=epochs, matmul="fp32")
            print(f"  learned-ncm with fp32 GEMMs: {t32:8.2f} s   All {a32:.2f}%   "
                  f"All fast - fp32: {accs['learned-ncm'] - a32:+.2f} points (target |.| <= 0.1)")
            if args.full or args.quick:
                t32, a32, _ = time_head("multi-ncm", data, device, ey, epochs=epochs, matmul="fp32")
                print(f"  multi-ncm with fp32 GEMMs:   {t32:8.2f} s   All {a32:.2f}%   "
                      + (f"All fast - fp32: {accs['multi-ncm'] - a32:+.2f} points" if "multi-ncm" in accs else ""))
        if per_image is None:
            fwd, timed = time_forward(resnet32, N, 32, device, max_images=10_847)
        else:  # (b): reuse the per-image time of the (a)-sized pass
            fwd = per_image * N
        per_image = fwd / N
        scaled = f"  (~: timed on {timed:,} images, scaled linearly)" if timed < N else ""
        print(f"  ResNet-32 forward over {N:,} images 32x32 (eval, no grad, batch 256): "
              f"{'~' if scaled else ' '}{fwd:.2f} s{scaled}")
        print("  fit from cache vs one backbone re-forward (cRT-style epoch): " +
              ", ".join(f"{h} {t / fwd:.3g}x" for h, (t, _) in fits.items()))
        if key == "b":
            n10 = 32 if device.type == "cpu" else 1024
            fwd10, n10 = time_forward(resnet10, N, 224, device, batch=min(n10, 64), max_images=n10)
            print(f"  ResNet-10 at 224x224, the ImageNet-LT backbone: ~{fwd10:.0f} s per pass over {N:,} images "
                  f"(timed on {n10} and scaled); fit / one cRT-style ResNet-10 re-forward epoch: "
                  + ", ".join(f"{h} {t / fwd10:.3g}x" for h, (t, _) in fits.items()))


if __name__ == "__main__":
    main()
