"""Stage 2's optimiser step: pipeline.stage2.heads.sgd.SGDStep against what it replaces,
``clip_grad_norm_`` + ``torch.optim.SGD.step()`` + ``zero_grad``, in one run.

A learned-NCM head has one [C, d] tensor; its steps are ~0.5 ms of maths, so the library's per-call Python
costs show.  Prints the time per step of each and the ratio, the one-off cost of the first library step in
a fresh process (the first optimizer imports torch._dynamo), and whether both give bit-identical parameters.

    python benchmarks/sgd_step.py                     # CIFAR-10 size: C=10, d=64, batch 512
    python benchmarks/sgd_step.py --classes 1000 --dim 512   # ImageNet-LT size
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from pipeline.stage2.heads.sgd import SGDStep

FIRST_STEP = """
import time, torch
p = torch.zeros(10, 64, requires_grad=True)
p.sum().backward()
t = time.perf_counter()
opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)  # the first optimizer of a process imports torch._dynamo
opt.step()
print(time.perf_counter() - t)
"""


def run(library: bool, steps: int, classes: int, dim: int, batch: int) -> tuple[float, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(classes, dim, generator=gen).requires_grad_(True)
    x = torch.randn(batch, dim, generator=gen)
    y = torch.randint(classes, (batch,), generator=gen)
    if library:
        opt = torch.optim.SGD([mu], lr=0.5, momentum=0.9)
    else:
        step = SGDStep([mu], 0.9, 0.0, 0.1)
    t = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(-0.5 * torch.cdist(x, mu) ** 2, y)
        if library:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([mu], 0.1)
            opt.step()
        else:
            loss.backward()
            step(0.5)
    return (time.perf_counter() - t) / steps, mu.detach()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="alternating library / SGDStep; the best of each")
    a = ap.parse_args()
    first = float(subprocess.run([sys.executable, "-c", FIRST_STEP], capture_output=True, text=True,
                                 check=True).stdout)
    lib, ours = [], []
    for r in range(a.rounds):
        for library in ((True, False) if r % 2 == 0 else (False, True)):
            sec, mu = run(library, a.steps, a.classes, a.dim, a.batch)
            (lib if library else ours).append((sec, mu))
    same = all(torch.equal(m, lib[0][1]) for _, m in lib + ours)
    tl, to = min(s for s, _ in lib), min(s for s, _ in ours)
    print(f"C={a.classes} d={a.dim} batch {a.batch}, {a.steps} steps x {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"  library (clip_grad_norm_ + SGD.step + zero_grad): {tl * 1e3:.3f} ms/step (whole step, forward and "
          f"backward included)")
    print(f"  SGDStep:                                           {to * 1e3:.3f} ms/step")
    print(f"  ratio library / SGDStep: {tl / to:.2f}x; first library optimizer + step in a fresh process: {first:.2f} s; "
          f"bit-identical parameters: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
