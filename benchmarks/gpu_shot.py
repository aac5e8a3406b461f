"""Python steps of benchmarks/gpu_shot.sh (see its header): env, datahash, checks, probe-report, pack.

    python benchmarks/gpu_shot.py env                                   # versions, TF32 flags, devices
    python benchmarks/gpu_shot.py datahash --data-root D --cache C      # data_hash of C's beta on D vs C's
    python benchmarks/gpu_shot.py checks --seconds 60                   # CUDA vs CPU (skipped on CPU)
    python benchmarks/gpu_shot.py probe-report CACHE_DIR                # s/step of the probe runs
    python benchmarks/gpu_shot.py pack --cache-dir C --logs L --out O --betas "200 100 10"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

MAX_FILE = 16 * 2 ** 20   # what the device machine sends back: files under 16 MiB ...
MAX_FILES = 8             # ... at most 8 of them
REAL_TRAIN_IMAGES = 50000  # the whole CIFAR-10 training set: a partial copy changes the long-tailed subset


def cmd_env(a):
    import torch
    info = dict(python=sys.version.split()[0], platform=platform.platform(), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version(), cpus=os.cpu_count(),
                cuda_available=torch.cuda.is_available(),
                devices=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                float32_matmul_precision=torch.get_float32_matmul_precision(),
                env={k: v for k, v in os.environ.items() if "TF32" in k or k.startswith(("CUDA", "NVIDIA", "TORCH"))})
    try:
        info["allow_tf32"] = dict(cuda_matmul=torch.backends.cuda.matmul.allow_tf32,
                                  cudnn=torch.backends.cudnn.allow_tf32)
    except RuntimeError as e:  # mixed legacy/new precision APIs
        info["allow_tf32"] = str(e)[:200]
    from pipeline.utils import git_commit
    b = torch.backends
    info["fp32_precision"] = {}
    for name in ("", "cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn", "mkldnn", "mkldnn.matmul"):
        obj = b
        for part in filter(None, name.split(".")):
            obj = getattr(obj, part, None)
        if obj is not None and hasattr(obj, "fp32_precision"):
            info["fp32_precision"][f"torch.backends.{name}".rstrip(".")] = obj.fp32_precision
    info["git_commit"] = git_commit()
    print(json.dumps(info, indent=1, default=str))


def cmd_datahash(a):
    """data_hash of the beta the shipped cache was made with, compared with the cache's provenance when the
    folder is the whole CIFAR-10 (exit 1 on a mismatch), reported only on other (tiny) data."""
    import h5py
    from pipeline.stage1.data import load_dataset
    from pipeline.stage1.plan import data_hash
    root = Path(a.data_root)
    n_train = sum(1 for p in (root / "train").rglob("*") if p.is_file())
    with h5py.File(a.cache, "r") as f:
        cfg = json.loads(f.attrs["provenance"])["config"]
    ds = load_dataset(cfg["dataset"], root, cfg["imbalance"], cfg["subset_seed"])
    got, want = data_hash(ds), cfg["data_hash"]
    real = n_train == REAL_TRAIN_IMAGES
    print(json.dumps(dict(train_images=n_train, real=real, data_hash=got, shipped=want, match=got == want)))
    if real and got != want:
        print(f"data_hash {got} != the shipped cache's {want}: not the data the CPU runs used", file=sys.stderr)
        return 1
    if not real:
        print(f"not the whole CIFAR-10 ({n_train} training images): hash compared for the record only")
    return 0


def _check(name, fn, results, deadline):
    if time.monotonic() > deadline:
        results.append(dict(check=name, skipped="out of time"))
        return
    t = time.monotonic()
    try:
        out = fn()
        results.append(dict(check=name, ok=bool(out.pop("ok", True)), seconds=round(time.monotonic() - t, 2), **out))
    except Exception as e:  # a check that crashes is a finding, not the end of the shot
        results.append(dict(check=name, ok=False, error=f"{type(e).__name__}: {e}"[:500]))
    print(json.dumps(results[-1]), flush=True)


def cmd_checks(a):
    """CUDA vs CPU: every AutoAugment op, host vs device augmented batches, every head, fp32 vs TF32 argmins."""
    import numpy as np
    import torch
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps(dict(checks="skipped", why="no CUDA device")))
        return 0
    from pipeline.stage1.augment import CIFAR10_POLICY, BatchAugment, apply_op, op_magnitude
    from pipeline.stage2.heads.kernels import ncm_predict, sq_dists
    from pipeline.utils import fp32_matmul
    deadline, results, cuda = time.monotonic() + a.seconds, [], torch.device(a.device)  # cpu: a smoke test
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def ops():
        bad = {}
        for pol in CIFAR10_POLICY:
            for op, _, b in pol:
                mag, signed = op_magnitude(op, b, 32, 32)
                for m in ((mag, -mag) if signed else (mag,)):
                    c, g = apply_op(x, op, m), apply_op(x.to(cuda), op, m).cpu()
                    diff = (c.int() - g.int()).abs()
                    if diff.max() > 0:
                        bad[f"{op}{m:+.3g}"] = dict(max=int(diff.max()), frac=float((diff > 0).float().mean()))
        return dict(ok=not bad, mismatches=bad)

    def batches():
        out = {}
        for kind in ("cifar", "cifar-autoaug"):
            ys = [BatchAugment((0.5,) * 3, (0.25,) * 3, dev, kind, None, torch.Generator().manual_seed(1))(x.to(dev))
                  for dev in ("cpu", cuda)]
            out[kind] = float((ys[0] - ys[1].cpu()).abs().max())
        return dict(ok=max(out.values()) < 1e-4, max_abs_diff=out)

    def heads():
        import tempfile
        from pipeline.cache import read_cache
        from pipeline.stage2.fit import fit_head
        from pipeline.stage2.heads import HEADS
        from pipeline.synthetic import make_synthetic_cache
        cache = read_cache(make_synthetic_cache(Path(tempfile.mkdtemp()) / "features.h5", num_classes=10, dim=16,
                                                n_test=200, bn_recal=False))
        out = {}
        for name in sorted(HEADS):
            r = [fit_head(cache, name, seed=0, device=d, epochs=2) for d in ("cpu", a.device)]
            pd = max((float(np.abs(np.asarray(r[0].params[k], float) - np.asarray(r[1].params[k], float)).max())
                      for k in r[0].params if np.asarray(r[0].params[k]).size), default=0.0)
            out[name] = dict(max_param_diff=pd, per_class_diff=float(np.nanmax(np.abs(r[0].per_class - r[1].per_class))))
        return dict(heads=out)

    def tf32():
        g = torch.Generator().manual_seed(0)
        mu = 30 + 0.05 * torch.randn(100, 512, generator=g, dtype=torch.float64)
        xs = mu[torch.randint(100, (20000,), generator=g)] + 0.03 * torch.randn(20000, 512, generator=g, dtype=torch.float64)
        ref = torch.cdist(xs, mu).argmin(1)
        xs, mu = xs.float().to(cuda), mu.float().to(cuda)
        out = {}
        prev = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision("high")
            out["tf32_uncentred"] = float((sq_dists(xs, mu).argmin(1).cpu() != ref).float().mean())
            out["tf32_centred"] = float((ncm_predict(xs, mu).cpu() != ref).float().mean())
            with fp32_matmul():
                out["fp32_uncentred"] = float((sq_dists(xs, mu).argmin(1).cpu() != ref).float().mean())
                out["fp32_centred"] = float((ncm_predict(xs, mu).cpu() != ref).float().mean())
        finally:
            torch.set_float32_matmul_precision(prev)
        return dict(argmin_disagreement_vs_fp64=out)

    for name, fn in (("autoaugment_ops", ops), ("host_vs_device_batches", batches), ("fp32_vs_tf32", tf32),
                     ("heads_cpu_vs_cuda", heads)):
        _check(name, fn, results, deadline)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0 if all(r.get("ok", True) or "error" not in r for r in results) else 1


def cmd_probe_report(a):
    """s/step of every finished probe run under CACHE_DIR (train_seconds / iterations, from its provenance)."""
    import h5py
    for f in sorted(Path(a.cache_dir).glob("*/features.h5")):
        with h5py.File(f, "r") as h:
            p = json.loads(h.attrs["provenance"])
        steps = p["config"]["steps_per_epoch"] * p["config"]["epochs"]
        print(f"{f.parent.name}: {steps} steps, {p['train_seconds']:.1f} s training, "
              f"{p['train_seconds'] / steps:.4f} s/step (compile {p['config'].get('compile')}, {p.get('device')})")


def cmd_pack(a):
    """One features.h5 (or, for a paused run, its checkpoint) per beta, plus one tar.gz of the logs: each
    under 16 MiB, at most 8 files, in --out."""
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    packed, notes = [], []
    for beta in a.betas.split():
        run = Path(a.cache_dir) / f"{a.prefix}{beta}"
        for name in ("features.h5", "checkpoint.pt"):
            src = run / name
            if src.is_file():
                if src.stat().st_size >= MAX_FILE:
                    notes.append(f"{src} is {src.stat().st_size / 2 ** 20:.1f} MiB: too large to send back")
                    continue
                dst = out / f"b{beta}-{name}"
                dst.write_bytes(src.read_bytes())
                packed.append(dst)
                break
        else:
            notes.append(f"beta {beta}: neither features.h5 nor checkpoint.pt in {run}")
    logs = Path(a.logs)
    (logs / "pack-notes.txt").write_text("\n".join(notes) + "\n")
    tar = out / "logs.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        t.add(logs, arcname="logs")
    packed.append(tar)
    for note in notes:
        print("pack:", note)
    too_big = [p for p in packed if p.stat().st_size >= MAX_FILE]
    if too_big or len(list(out.iterdir())) > MAX_FILES:
        print(f"pack: over the limits ({MAX_FILES} files, each < 16 MiB): {too_big or list(out.iterdir())}",
              file=sys.stderr)
        return 1
    for p in packed:
        print(f"pack: {p} ({p.stat().st_size / 2 ** 20:.2f} MiB)")
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env")
    p = sub.add_parser("datahash")
    p.add_argument("--data-root", required=True)
    p.add_argument("--cache", required=True, help="the shipped features.h5 whose provenance has data_hash")
    p = sub.add_parser("checks")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", help="compared with the CPU; cpu = a smoke test of the checks")
    p = sub.add_parser("probe-report")
    p.add_argument("cache_dir")
    p = sub.add_parser("pack")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("--logs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--betas", required=True)
    p.add_argument("--prefix", default="shot-b")
    a = ap.parse_args(argv)
    fn = {"env": cmd_env, "datahash": cmd_datahash, "checks": cmd_checks, "probe-report": cmd_probe_report,
          "pack": cmd_pack}[a.cmd]
    return fn(a) or 0


if __name__ == "__main__":
    sys.exit(main())
