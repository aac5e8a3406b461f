"""How much of stage 1's training input the AutoAugment deviations from BALMS touch (a size, not a speed).

BALMS's CIFAR10Policy (DeepVoltaire's copy, data/autoaugment.py) and ours (torchvision's ops) differ only in
the geometric ops: fill 128 grey vs 0 black for the pixels Shear / Translate / Rotate bring in, Rotate always
counter-clockwise vs a random sign, Shear bicubic vs nearest, Translate by a fractional offset vs int().
This draws the training pipeline's own sub-policies (`draw_autoaugment`) for N images, applies only the
geometric ops to white images, and counts the fill pixels and the images each op reaches.

    python benchmarks/aa_fill_share.py [--n 20000] [--seed 0]
"""
from __future__ import annotations

import argparse
import collections
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from pipeline.stage1.augment import apply_op, autoaugment_groups, draw_autoaugment, op_magnitude  # noqa: E402

GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")


def measure(n: int, seed: int, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    sub, applied, negated = draw_autoaugment(n, "cpu", g)
    x = torch.full((n, 1, size, size), 255, dtype=torch.uint8)
    reached = collections.defaultdict(set)
    for _, _, op, bin_idx, members, app, neg in autoaugment_groups(sub, applied, negated):
        if op not in GEOMETRIC:
            continue
        mag, signed = op_magnitude(op, bin_idx, size, size)
        for sign in ((1.0, -1.0) if signed else (1.0,)):
            rows = members[app & (neg == (sign < 0))] if signed else members[app]
            if rows.size:
                idx = torch.from_numpy(rows)
                x[idx] = apply_op(x[idx], op, sign * mag)
                reached[op.rstrip("XY")].update(rows.tolist())
    fill = (x[:, 0] == 0).flatten(1).float()          # white images: the only 0s are fill
    has = fill.sum(1) > 0
    return dict(images_with_fill=has.float().mean().item(), fill_share=fill.mean().item(),
                fill_share_where_any=fill[has].mean(1).mean().item(),
                images_reached={op: len(r) / n for op, r in sorted(reached.items())})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    m = measure(a.n, a.seed)
    print(f"AutoAugment (CIFAR-10 policy) over {a.n} draws, seed {a.seed}:")
    print(f"  fill pixels: {100 * m['fill_share']:.1f}% of all training pixels; {100 * m['images_with_fill']:.1f}% "
          f"of images have some, {100 * m['fill_share_where_any']:.1f}% of their pixels on average")
    print("  images reached: " + ", ".join(f"{op} {100 * v:.1f}%" for op, v in m["images_reached"].items()))


if __name__ == "__main__":
    main()
