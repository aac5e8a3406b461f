"""benchmarks/gpu_shot.sh end to end on the CPU at tiny budgets (issue 16): the same files a GPU shot packs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = "--epochs 1 --train-limit 20 --test-limit 5"


def make_tiny_cifar_tgz(tmp: Path, classes=10, train=20, test=5) -> Path:
    """A tiny CIFAR-shaped JPEG ImageFolder (train/<class>/, test/<class>/) packed as one tar.gz."""
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp / "cifar10-jpeg"
    for split, n in (("train", train), ("test", test)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(25 * c, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    tgz = tmp / "cifar10-jpeg.tgz"
    with tarfile.open(tgz, "w:gz") as t:
        t.add(root, arcname="cifar10-jpeg")
    shutil.rmtree(root)
    return tgz


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout")
def test_gpu_shot_end_to_end_on_cpu(tmp_path):
    tgz = make_tiny_cifar_tgz(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, DEVICE="cpu", EXTRA_FLAGS=TINY, PROBE_FLAGS=TINY,
               PROBE_COMPILE="off", CHECK_SECONDS="5", TIME_LIMIT="10m", RUN_TIMEOUT="280", OUT=str(out),
               SHOT_WORK=str(tmp_path / "work"), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_shot.sh"), str(tgz)], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["b10-features.h5", "b100-features.h5", "b200-features.h5", "logs.tar.gz"], names
    assert all(p.stat().st_size < 16 * 2 ** 20 for p in out.iterdir())
    with tarfile.open(out / "logs.tar.gz") as t:
        logs = {Path(n).name for n in t.getnames()}
    assert {"env.txt", "datahash.txt", "checks.txt", "summary.txt", "extract-b100.log",
            "probe-compile-off.log"} <= logs, logs
    summary = (tmp_path / "work" / "logs" / "summary.txt").read_text()
    assert "s/step" in summary and "beta=200 exit 0: finished" in summary, summary
    assert '"real": false' in (tmp_path / "work" / "logs" / "datahash.txt").read_text()


@pytest.mark.slow
def test_shot_checks_run_on_cpu_as_a_smoke_test(tmp_path, capsys):
    """The CUDA-vs-CPU checks compare CPU with CPU here: every check runs (the shot has one try) and agrees."""
    import json
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_shot
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert gpu_shot.main(["checks", "--device", "cpu", "--seconds", "120", "--json", str(tmp_path / "c.json")]) == 0
    results = json.loads((tmp_path / "c.json").read_text())
    assert [r["check"] for r in results] == ["autoaugment_ops", "host_vs_device_batches", "fp32_vs_tf32",
                                             "heads_cpu_vs_cuda"]
    assert all(r["ok"] for r in results), results
    assert gpu_shot.main(["checks", "--seconds", "1"]) == 0  # --device cuda without CUDA: skipped
