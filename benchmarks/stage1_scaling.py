"""Stage-1 training throughput of `pipeline extract` on 1..N ranks and with the data on the device vs on the host.

Each --run "NPROC[:extra extract flags]" runs the real command (under torchrun when NPROC > 1) into a fresh run
folder of one shared --cache-dir (so the images are decoded once, into the image store, by the first run) and
reads the per-epoch seconds from its learning_curve.csv.  images/s = training images / median epoch seconds
over the epochs that neither start the run nor evaluate (use >= 4 epochs and --eval-every >= epochs).

    # CPU: 1 process (both cores) vs 2 gloo processes (one core each), real CIFAR-10 JPEGs
    python benchmarks/stage1_scaling.py --run 1 --run 2 -- --dataset cifar10-lt \\
        --data-root ../shared/data/cifar10-jpeg --train-limit 500 --imbalance 1 --epochs 5 --eval-every 5 \\
        --batch-size 128 --augment cifar --precision fp32 --device cpu
    # GPU: ImageNet-LT-sized synthetic JPEGs, data on the device vs streamed from pinned host memory
    python benchmarks/stage1_scaling.py --make-jpegs /tmp/synth --images 115846 --classes 1000
    python benchmarks/stage1_scaling.py --run "1:--data-on device" --run "1:--data-on host" -- \\
        --dataset imagefolder --data-root /tmp/synth --imbalance 1 --image-size 224 --epochs 4 --eval-every 4
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_jpegs(root: Path, images: int, classes: int, test_per_class: int, side: int, seed: int = 0):
    """An ImageFolder of random smooth JPEGs (q90), ~side x 1.25 side, train/<class>/ and test/<class>/."""
    from concurrent.futures import ProcessPoolExecutor
    jobs = [("train", c, i) for c in range(classes) for i in range(images // classes + (c < images % classes))]
    jobs += [("test", c, i) for c in range(classes) for i in range(test_per_class)]
    chunks = [jobs[k::os.cpu_count() or 1] for k in range(os.cpu_count() or 1)]
    with ProcessPoolExecutor() as ex:
        list(ex.map(_write_chunk, [(root, ch, side, seed + k) for k, ch in enumerate(chunks)]))
    print(f"wrote {len(jobs)} JPEGs under {root}")


def _write_chunk(args):
    import numpy as np
    from PIL import Image
    root, chunk, side, seed = args
    rng = np.random.default_rng(seed)
    for split, c, i in chunk:
        d = root / split / f"c{c:04d}"
        d.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (side // 16, side * 5 // 64, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side * 5 // 4, side), Image.BILINEAR)
        img.save(d / f"{i}.jpg", quality=90)


def run_one(nproc: int, extra: list, common: list, cache: Path, name: str) -> dict:
    # the same cores for every run: each of the NPROC ranks gets cores / NPROC threads
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m"]
              if nproc > 1 else [sys.executable, "-m"])
    cmd = launch + ["pipeline.cli", "extract", *common, *extra, "--cache-dir", str(cache), "--run-name", name]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = list(csv.DictReader(open(cache / name / "learning_curve.csv")))
    timed = [float(x["seconds"]) for x in rows[1:-1]] or [float(x["seconds"]) for x in rows]
    n = int(next(line for line in r.stdout.splitlines() if line.startswith("stage 1:")).split("(")[1].split()[0])
    return dict(nproc=nproc, extra=" ".join(extra), images=n, epoch_s=statistics.median(timed),
                ips=n / statistics.median(timed), wall=time.time() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help='"NPROC[:extra flags]", repeatable')
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    ap.add_argument("--make-jpegs", type=Path, default=None, help="write a synthetic ImageFolder and exit")
    ap.add_argument("--images", type=int, default=115846)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--test-per-class", type=int, default=2)
    ap.add_argument("--side", type=int, default=256)
    ap.add_argument("extract_args", nargs=argparse.REMAINDER, help="-- then the flags common to every run")
    a = ap.parse_args()
    if a.make_jpegs:
        make_jpegs(a.make_jpegs, a.images, a.classes, a.test_per_class, a.side)
        return
    common = [x for x in a.extract_args if x != "--"]
    cache = a.cache_dir or Path(tempfile.mkdtemp(prefix="stage1_scaling_"))
    results = []
    for k, spec in enumerate(a.run):
        nproc, _, extra = spec.partition(":")
        res = run_one(int(nproc), extra.split(), common, cache, f"run{k}-{time.strftime('%Y%m%d-%H%M%S')}")
        results.append(res)
        print(f"{res['nproc']} rank(s) {res['extra'] or '':24s} {res['images']} images: {res['epoch_s']:.2f} s/epoch "
              f"= {res['ips']:.0f} images/s   (whole command {res['wall']:.0f} s)", flush=True)
    if len(results) > 1:
        base = results[0]["ips"]
        for res in results[1:]:
            print(f"run {res['nproc']} rank(s) {res['extra']}: {res['ips'] / base:.2f}x the first run")


if __name__ == "__main__":
    main()
