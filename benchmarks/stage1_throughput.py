"""Stage-1 training throughput on the paper recipe: our loop vs a standard DataLoader loop vs pure compute.

All loops train the same model (ResNet-32 by default) with the same batch size (512), precision, optimiser
and channels_last layout on the same uint8 CIFAR-shaped images; only the input pipeline differs:
  ours      uint8 tensor on the device, randperm + batched per-sample augmentation on the device
            (exactly pipeline.stage1.train's loop; --augment cifar-autoaug = crop + flip + AutoAugment + Cutout)
  standard  PIL images -> RandomCrop(32, 4) + RandomHorizontalFlip + torchvision v2 AutoAugment(CIFAR10) +
            ToTensor + Cutout(16) + Normalize per image in a torch.utils.data.DataLoader (shuffle=True,
            --workers processes), copied to the device (the BALMS input pipeline)
  resident  the same train step on one batch already augmented and resident on the device: the pure
            compute rate, an upper bound for any input pipeline
Prints images/s of each, ours/standard and ours/resident, measured in this one run.  --compile adds the
same three with the train step under torch.compile.

    python benchmarks/stage1_throughput.py --data-root ../shared/data/cifar10-jpeg   # real JPEG images
    python benchmarks/stage1_throughput.py --augment cifar --batch-size 128          # the ldam recipe
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


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


def main():
    from pipeline.config import CIFAR_MEAN, CIFAR_STD
    from pipeline.stage1.models import create_model
    from pipeline.stage1.augment import BatchAugment
    from pipeline.stage1.train import resolve_device, resolve_precision, to_device_uint8, train_step

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--backbone", default="resnet32")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--augment", default="cifar-autoaug", choices=["cifar", "cifar-autoaug"])
    ap.add_argument("--images", type=int, default=5120, help="images per timed pass (multiple of batch)")
    ap.add_argument("--compile", action="store_true", help="also time the three loops under torch.compile")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (standard loop)")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 JPEG ImageFolder to take real images from")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dev = resolve_device(args.device)
    precision = resolve_precision(args.precision, dev)
    rng = np.random.default_rng(args.seed)
    if args.data_root:
        from pipeline.stage1.data import load_cifar
        per_class = -(-args.images // 10)
        ds = load_cifar("cifar10-lt", args.data_root, imbalance=1, train_limit=per_class, test_limit=1)
        images, labels = ds.train.images[: args.images], ds.train.labels[: args.images]
        source = f"real CIFAR-10 JPEG ({args.data_root})"
    else:
        images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.images)
        source = "synthetic uint8 images"
    n_batches = len(labels) // args.batch_size

    def run(loop, compiled=False):
        torch.manual_seed(args.seed)
        model = create_model(args.backbone, 10).to(dev).to(memory_format=torch.channels_last)
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

    x_dev = to_device_uint8(images, dev, channels_last=True)
    y_dev = torch.from_numpy(labels).to(dev)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    aug = BatchAugment(CIFAR_MEAN, CIFAR_STD, dev, args.augment, generator=gen)

    def ours(model, opt, warm):
        perm = torch.randperm(len(labels), device=dev, generator=gen)
        steps = 3 if warm else n_batches
        for b in range(steps):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = aug(x_dev[idx]).contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y_dev[idx], precision)
        return steps * args.batch_size

    loader = standard_loader(images, labels, args.batch_size, args.workers, CIFAR_MEAN, CIFAR_STD, args.seed,
                             args.augment)

    def standard(model, opt, warm):
        steps = 0
        for x, y in loader:
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y.to(dev, non_blocking=True), precision)
            steps += 1
            if warm and steps == 3:
                break
        return steps * args.batch_size

    x_res = aug(x_dev[: args.batch_size]).contiguous(memory_format=torch.channels_last)
    y_res = y_dev[: args.batch_size]

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


if __name__ == "__main__":
    main()
