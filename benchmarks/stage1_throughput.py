"""Stage-1 training throughput: our loop vs a standard torchvision-transforms + DataLoader loop.

Both loops train the same model (ResNet-32 by default) with the same batch size, precision and optimiser
on the same uint8 CIFAR-shaped images; only the input pipeline differs:
  ours      uint8 tensor on the device, randperm + batch augmentation on the device, channels_last
            (exactly pipeline.train's loop)
  standard  PIL images -> RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize per image in a
            torch.utils.data.DataLoader (shuffle=True, --workers processes), copied to the device
Prints images/s of each and the ratio ours / standard, measured in this one run.

    python benchmarks/stage1_throughput.py                 # CPU, synthetic CIFAR-sized images
    python benchmarks/stage1_throughput.py --data-root ../shared/data/cifar10-jpeg   # real JPEG images
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def standard_loader(images, labels, batch_size, workers, mean, std, seed):
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

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
    from pipeline.models import create_model
    from pipeline.train import BatchAugment, resolve_device, resolve_precision, to_device_uint8, train_step

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--backbone", default="resnet32")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=3840, help="images per timed pass (multiple of batch)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (standard loop)")
    ap.add_argument("--data-root", default=None, help="CIFAR-10 JPEG ImageFolder to take real images from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--channels-last-standard", action="store_true",
                    help="give the standard loop channels_last too (isolates the input pipeline's share)")
    args = ap.parse_args()

    dev = resolve_device(args.device)
    precision = resolve_precision(args.precision, dev)
    rng = np.random.default_rng(args.seed)
    if args.data_root:
        from pipeline.data import load_cifar
        per_class = -(-args.images // 10)
        ds = load_cifar("cifar10-lt", args.data_root, imbalance=1, train_limit=per_class, test_limit=1)
        images, labels = ds.train.images[: args.images], ds.train.labels[: args.images]
        source = f"real CIFAR-10 JPEG ({args.data_root})"
    else:
        images = rng.integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.images)
        source = "synthetic uint8 images"
    n_batches = len(labels) // args.batch_size

    def run(loop):
        torch.manual_seed(args.seed)
        model = create_model(args.backbone, 10).to(dev)
        if loop is ours or args.channels_last_standard:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        loop(model, opt, warm=True)  # warm-up pass: allocator, kernels, worker start-up
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
    aug = BatchAugment(CIFAR_MEAN, CIFAR_STD, dev, "cifar", generator=gen)

    def ours(model, opt, warm):
        perm = torch.randperm(len(labels), device=dev, generator=gen)
        steps = 3 if warm else n_batches
        for b in range(steps):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            x = aug(x_dev[idx]).contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y_dev[idx], precision)
        return steps * args.batch_size

    loader = standard_loader(images, labels, args.batch_size, args.workers, CIFAR_MEAN, CIFAR_STD, args.seed)

    def standard(model, opt, warm):
        steps = 0
        for x, y in loader:
            x = x.to(dev, non_blocking=True)
            if args.channels_last_standard:
                x = x.contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y.to(dev, non_blocking=True), precision)
            steps += 1
            if warm and steps == 3:
                break
        return steps * args.batch_size

    std_ips = run(standard)
    our_ips = run(ours)
    print(f"device {dev} ({torch.get_num_threads()} threads)  precision {precision}  {args.backbone}  "
          f"batch {args.batch_size}  {n_batches * args.batch_size} images/pass  {source}  torch {torch.__version__}")
    layout = "channels_last" if args.channels_last_standard else "default contiguous layout"
    print(f"standard loop (torchvision transforms + DataLoader, {args.workers} workers, {layout}): "
          f"{std_ips:8.1f} images/s")
    print(f"our loop (uint8 on device, batch augmentation on device, channels_last): {our_ips:8.1f} images/s")
    print(f"ratio ours/standard: {our_ips / std_ips:.2f}x")


if __name__ == "__main__":
    main()
