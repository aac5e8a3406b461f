"""Stage-1 training throughput on the paper recipe: our loop vs a standard DataLoader loop vs pure compute,
and our loop in this checkout vs another commit (the ratio after / before a change, in one run).

All loops train the same model (ResNet-32 by default) with the same batch size (512), precision, optimiser
and channels_last layout on the same uint8 CIFAR-shaped images; only the input pipeline differs:
  ours      the training epoch of `pipeline extract` itself (pipeline.stage1.train.train_one_epoch: the images
            in a Shard on the device, randperm + batched per-sample augmentation on the device; --augment
            cifar-autoaug = crop + flip + AutoAugment + Cutout)
  standard  PIL images -> RandomCrop(32, 4) + RandomHorizontalFlip + torchvision v2 AutoAugment(CIFAR10) +
            ToTensor + Cutout(16) + Normalize per image in a torch.utils.data.DataLoader (shuffle=True,
            --workers processes), copied to the device (the BALMS input pipeline)
  resident  the same train step on one batch already augmented and resident on the device: the pure
            compute rate, an upper bound for any input pipeline
Prints images/s of each, ours/standard and ours/resident, measured in this one run.  --compile adds the
same three with the train step under torch.compile.

--baseline REV times only `ours`, alternately in this checkout and in REV (a commit, checked out into a
temporary `git worktree`, or the path of a checkout), each in a fresh process, --rounds times (which goes
first alternates between rounds), and prints the median images/s of each, their ratio (this checkout / REV)
and the median of the per-round ratios.  A checkout from before the stage-1 move
(no pipeline/stage1/) runs its own loop of that time (pipeline.train: a uint8 tensor on the device).

    python benchmarks/stage1_throughput.py --data-root ../shared/data/cifar10-jpeg   # real JPEG images
    python benchmarks/stage1_throughput.py --augment cifar --batch-size 128          # the ldam recipe
    python benchmarks/stage1_throughput.py --baseline e1834df --rounds 3             # after / before
    python benchmarks/stage1_throughput.py --baseline e1834df --backbone input-only  # the input side alone
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from baseline import baseline_checkout  # benchmarks/baseline.py

REPO = Path(__file__).resolve().parents[1]


class Cutout:
    """DeVries & Taylor's Cutout as the BALMS code applies it: on the [0,1] tensor, before Normalize."""

    def __init__(self, length=16):
        self.length = length

    def __call__(self, img):
        h, w = img.shape[1:]
        y, x = np.random.randint(h), np.random.randint(w)
        y1, y2 = np.clip(y - self.length // 2, 0, h), np.clip(y + self.length // 2, 0, h)
        x1, x2 = np.clip(x - self.length // 2, 0, w), np.clip(x + self.length // 2, 0, w)
        img = img.clone()
        img[:, y1:y2, x1:x2] = 0.0
        return img


class InputOnly(torch.nn.Module):
    """--backbone input-only: a model whose compute is negligible (per-channel means, one linear layer), so an
    epoch's time is the input pipeline's; a change there shows up without the ~3 s ResNet-32 step's noise."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def forward_features(self, x):
        return x.float().mean((2, 3))

    def forward(self, x):
        return self.fc(self.forward_features(x))


def standard_loader(images, labels, batch_size, workers, mean, std, seed, augment):
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.transforms import v2

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
    if augment == "cifar-autoaug":
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps.append(T.ToTensor())
    if augment == "cifar-autoaug":
        steps.append(Cutout(16))
    tf = T.Compose(steps + [T.Normalize(mean, std)])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return tf(Image.fromarray(images[i])), int(labels[i])

    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(DS(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                       generator=g, drop_last=True, persistent_workers=workers > 0)


def our_epoch(images, labels, dev, args, precision):
    """``epoch(model, opt)``: one epoch over ``images`` of this checkout's own stage-1 training loop."""
    from pipeline.config import CIFAR_MEAN, CIFAR_STD
    try:
        from pipeline.stage1.data import LTDataset, Split
        from pipeline.stage1.distributed import SINGLE
        from pipeline.stage1.train import setup, train_one_epoch
    except ImportError:  # a checkout from before pipeline/stage1/
        return _legacy_epoch(images, labels, dev, args, precision)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    cfg = dict(batch_size=args.batch_size, epochs=10 ** 6, schedule="cosine", warmup_epochs=0, lr=0.05,
               augment=args.augment, image_size=images.shape[1], compile="off", eval_every=10 ** 6)
    ds = LTDataset("bench", [str(c) for c in range(10)], Split(images, labels), Split(images[:1], labels[:1]),
                   mean=CIFAR_MEAN, std=CIFAR_STD)
    trainers = {}

    def epoch(model, opt):
        if id(opt) not in trainers:  # one Trainer (data placed once) per model
            trainers[id(opt)] = setup(ds, cfg, model, opt, gen, dev, SINGLE, "device", False, precision)
        train_one_epoch(trainers[id(opt)], 0)
        return len(labels)
    return epoch


def _legacy_epoch(images, labels, dev, args, precision):
    """The epoch loop of pipeline/train.py before the stage-1 move (e1834df), one process, data on the device."""
    import math
    from tqdm import tqdm
    from pipeline.augment import BatchAugment
    from pipeline.config import CIFAR_MEAN, CIFAR_STD
    from pipeline.train import lr_for, to_device_uint8, train_step
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    aug = BatchAugment(CIFAR_MEAN, CIFAR_STD, dev, args.augment, images.shape[1], gen)
    x_dev = to_device_uint8(images, dev, channels_last=True)
    y_dev = torch.from_numpy(labels).to(dev)
    cfg = dict(epochs=10 ** 6, schedule="cosine", warmup_epochs=0, lr=0.05)

    def epoch(model, opt):
        n, bs = len(labels), args.batch_size
        iters = math.ceil(n / bs)
        model.train()
        perm = torch.randperm(n, device=dev, generator=gen)
        loss_sum, correct, seen = torch.zeros((), device=dev), torch.zeros((), device=dev), 0
        for b in tqdm(range(iters), leave=False, disable=None, mininterval=1):
            idx = perm[b * bs:(b + 1) * bs]
            if idx.numel() < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = lr_for(cfg, 0, b, iters)
            y = y_dev[idx]
            x = aug(x_dev[idx]).contiguous(memory_format=torch.channels_last)
            loss, logits = train_step(model, opt, x, y, precision)
            loss_sum += loss.detach() * y.numel()
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
        float(loss_sum), float(correct)  # the epoch's statistics reach the host, as in train()
        return n
    return epoch


def load_images(args):
    rng = np.random.default_rng(args.seed)
    if args.data_root:
        try:
            from pipeline.stage1.data import load_cifar
        except ImportError:
            from pipeline.data import load_cifar
        per_class = -(-args.images // 10)
        ds = load_cifar("cifar10-lt", args.data_root, imbalance=1, train_limit=per_class, test_limit=1)
        return ds.train.images[: args.images], ds.train.labels[: args.images], f"real CIFAR-10 JPEG ({args.data_root})"
    images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, args.images)
    return images, labels, "synthetic uint8 images"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--backbone", default="resnet32",
                    help="a model of create_model, or 'input-only': a near-zero-compute model (a mean and a linear "
                         "layer), so the rate is that of the input pipeline alone (crop, AutoAugment, gathers)")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--augment", default="cifar-autoaug", choices=["cifar", "cifar-autoaug"])
    ap.add_argument("--images", type=int, default=5120, help="images per timed pass (multiple of batch)")
    ap.add_argument("--compile", action="store_true", help="also time the three loops under torch.compile")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (standard loop)")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 JPEG ImageFolder to take real images from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-format", default="channels_last", choices=["channels_last", "contiguous"],
                    help="of the model and batches in the standard and resident loops (ours: channels_last)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="time our loop here and in REV (commit or checkout path), alternately; print the ratio")
    ap.add_argument("--rounds", type=int, default=3, help="with --baseline: runs of each checkout")
    ap.add_argument("--only-ours", action="store_true", help="time our loop only and print one JSON line")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.baseline:
        return compare(args, argv if argv is not None else sys.argv[1:])
    from pipeline.config import CIFAR_MEAN, CIFAR_STD
    from pipeline.utils import resolve_device
    try:
        from pipeline.stage1.augment import BatchAugment
        from pipeline.stage1.models import create_model
        from pipeline.stage1.precision import resolve_precision
        from pipeline.stage1.train import train_step
    except ImportError:  # a checkout from before pipeline/stage1/ (--baseline runs this script in it)
        from pipeline.augment import BatchAugment
        from pipeline.models import create_model
        from pipeline.train import resolve_precision, train_step

    dev = resolve_device(args.device)
    precision = resolve_precision(args.precision, dev)
    images, labels, source = load_images(args)
    n_batches = len(labels) // args.batch_size
    images, labels = images[:n_batches * args.batch_size], labels[:n_batches * args.batch_size]

    mf = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format

    def run(loop, compiled=False):
        torch.manual_seed(args.seed)
        fmt = torch.channels_last if loop is ours else mf
        model = (InputOnly() if args.backbone == "input-only" else create_model(args.backbone, 10))
        model = model.to(dev).to(memory_format=fmt)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        if compiled:
            model = torch.compile(model)
        loop(model, opt, warm=True)  # warm-up pass: allocator, kernels, worker start-up, compilation
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        seen = loop(model, opt, warm=False)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return seen / (time.perf_counter() - t)

    epoch = our_epoch(images, labels, dev, args, precision)

    def ours(model, opt, warm):  # the warm-up is a whole epoch too
        return epoch(model, opt)

    if args.only_ours:
        print(json.dumps(dict(images_per_s=run(ours), pipeline=__import__("pipeline").__file__)))
        return

    gen = torch.Generator(device=dev).manual_seed(args.seed)
    aug = BatchAugment(CIFAR_MEAN, CIFAR_STD, dev, args.augment, generator=gen)
    loader = standard_loader(images, labels, args.batch_size, args.workers, CIFAR_MEAN, CIFAR_STD, args.seed,
                             args.augment)

    def standard(model, opt, warm):
        steps = 0
        for x, y in loader:
            x = x.to(dev, non_blocking=True).contiguous(memory_format=mf)
            train_step(model, opt, x, y.to(dev, non_blocking=True), precision)
            steps += 1
            if warm and steps == 3:
                break
        return steps * args.batch_size

    x0 = torch.from_numpy(images[: args.batch_size]).to(dev).permute(0, 3, 1, 2)
    x_res = aug(x0.contiguous(memory_format=torch.channels_last)).contiguous(memory_format=mf)
    y_res = torch.from_numpy(labels[: args.batch_size]).to(dev)

    def resident(model, opt, warm):
        steps = 3 if warm else n_batches
        for _ in range(steps):
            train_step(model, opt, x_res, y_res, precision)
        return steps * args.batch_size

    res = {}
    for compiled in ((False, True) if args.compile else (False,)):
        for name, loop in (("standard", standard), ("ours", ours), ("resident", resident)):
            res[name, compiled] = run(loop, compiled)
    print(f"device {dev} ({torch.get_num_threads()} threads)  precision {precision}  {args.backbone}  "
          f"{args.memory_format} (standard, resident)  "
          f"batch {args.batch_size}  augment {args.augment}  {n_batches * args.batch_size} images/pass  {source}  "
          f"torch {torch.__version__}")
    for compiled in ((False, True) if args.compile else (False,)):
        tag = "torch.compile" if compiled else "eager"
        print(f"[{tag}] standard loop (PIL transforms in a DataLoader, {args.workers} workers): "
              f"{res['standard', compiled]:8.1f} images/s")
        print(f"[{tag}] our loop (uint8 on device, batched per-sample augmentation on device): "
              f"{res['ours', compiled]:8.1f} images/s")
        print(f"[{tag}] resident batch (pure compute of the same train step): {res['resident', compiled]:8.1f} images/s")
        print(f"[{tag}] ratio ours/standard: {res['ours', compiled] / res['standard', compiled]:.2f}x   "
              f"ours/resident: {100 * res['ours', compiled] / res['resident', compiled]:.1f}%")
    if args.compile:
        print(f"torch.compile effect on our loop: {res['ours', True] / res['ours', False]:.2f}x, on the resident "
              f"step: {res['resident', True] / res['resident', False]:.2f}x")


def compare(args, argv):
    """--baseline: time our loop in this checkout and in the baseline, alternately, in fresh processes."""
    strip = {"--baseline", "--rounds"}
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a.split("=")[0] in strip:
            skip = "=" not in a
            continue
        rest.append(a)
    with baseline_checkout(args.baseline) as base:
        rates = {"this checkout": [], f"baseline {args.baseline}": []}
        pairs = list(zip(rates, (REPO, base)))
        for r in range(args.rounds):
            # alternate which checkout goes first: a warming machine must not favour one side
            for (label, root) in (pairs if r % 2 == 0 else pairs[::-1]):
                env = dict(os.environ, PYTHONPATH=str(root))
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--only-ours", *rest],
                                     cwd=root, env=env, capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"{label} failed:\n{out.stdout}\n{out.stderr}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                rates[label].append(got["images_per_s"])
                print(f"round {r + 1}: {label:>24} {got['images_per_s']:8.1f} images/s  ({got['pipeline']})",
                      flush=True)
    (a_label, a), (b_label, b) = rates.items()
    print(f"our loop, median of {args.rounds}: this checkout {statistics.median(a):.1f} images/s, "
          f"{b_label} {statistics.median(b):.1f} images/s; ratio this/baseline "
          f"{statistics.median(a) / statistics.median(b):.3f}; median of the per-round ratios "
          f"{statistics.median(x / y for x, y in zip(a, b)):.3f}")


if __name__ == "__main__":
    main()
