"""The reference caches shipped in git (cache/<run>/features.h5): valid, self-consistent, and their stored
weights reproduce their stored features from the real images."""
import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cache import read_cache, weights_sha256
from pipeline.config import BN_RECAL_DEFAULT, BN_RECAL_SEED, EXTRACT_BATCH
from pipeline.metrics import evaluate

from .conftest import CIFAR10_JPEG, needs_cifar_jpeg

ROOT = Path(__file__).resolve().parents[1]


def _shipped():
    out = subprocess.run(["git", "ls-files", "cache/*/features.h5"], cwd=ROOT, capture_output=True, text=True)
    return [ROOT / p for p in out.stdout.split()]


SHIPPED = _shipped()


def test_there_is_a_shipped_cache():
    assert SHIPPED, "no cache/<run>/features.h5 is tracked in git; run_all.sh on a fresh clone would have no input"


def test_shipped_caches_fit_the_budget():
    """Issue 12: every shipped cache together <= 50 MB, so a clone (and the working tree a GPU session
    carries, <= 64 MiB) stays small; the next cache to ship must fit beside the others."""
    total = sum(p.stat().st_size for p in SHIPPED)
    assert total <= 50e6, (f"shipped caches take {total / 1e6:.1f} MB together (> 50 MB): "
                           + ", ".join(f"{p.parent.name} {p.stat().st_size / 1e6:.1f}" for p in SHIPPED))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_cache_is_valid_and_consistent(path):
    c = read_cache(path)
    p = c.provenance
    assert c.schema_version == 2 and p["config"]["data_hash"] and p["git_commit"] and p["weights_sha256"]
    # the chosen BN re-estimation (config.BN_RECAL_DEFAULT: train-aug, README) and only it; a run on another
    # recipe, whose bn_recal no table reads, may ship without it (`pack-cache --variant plain`), method recorded
    dropped = p.get("dropped_variants") or {}
    assert c.variants + sorted(dropped) == ["plain", "bn_recal"]
    assert "bn_recal" in c.variants or p["config"]["recipe"] != "paper"  # Table 6 reads the paper runs' bn_recal
    method = c.recorded_method("bn_recal") if "bn_recal" in c.variants else dropped["bn_recal"]
    assert method == dict(BN_RECAL_DEFAULT, seed=BN_RECAL_SEED, batch_size=EXTRACT_BATCH,
                          augment=p["config"]["augment"])
    # the stored stage-1 classifier on the stored test features is the Softmax row of the run's own log
    x, y = c.split("test")
    acc = evaluate((x @ c.classifier_weight.T + c.classifier_bias).argmax(1), y, c.groups)
    assert abs(acc["all"] - p["final_test_accuracy"]["all"]) < 0.3  # the log evaluated in bf16, features fp32
    assert np.isfinite(c.learning_curve()["train_loss"]).all()


@needs_cifar_jpeg
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
def test_shipped_weights_reproduce_shipped_features(path):
    from pipeline.stage1.data import load_dataset
    from pipeline.stage1.models import create_model
    c = read_cache(path)
    p = c.provenance
    model = create_model(p["backbone"], c.num_classes)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in c.model_state().items()})
    assert weights_sha256(model) == p["weights_sha256"]
    k = 8
    ds = load_dataset(p["dataset"], CIFAR10_JPEG, p["imbalance"], p["subset_seed"], train_limit=60, test_limit=k)
    x = torch.from_numpy(ds.test.images).permute(0, 3, 1, 2).float()
    mean = torch.tensor(p["config"]["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(p["config"]["std"]).view(1, 3, 1, 1) * 255
    model.eval()
    with torch.no_grad():
        f = model.forward_features((x - mean) / std).numpy()
    # the first k test images of every class are rows [c * 1000, c * 1000 + k) of the full test split
    per_class = np.bincount(c.split("test")[1])
    rows = np.concatenate([np.arange(k) + per_class[:i].sum() for i in range(c.num_classes)])
    np.testing.assert_allclose(f, c.split("test", "plain")[0][rows], rtol=1e-4, atol=1e-4)


def test_committed_reports_come_from_the_shipped_caches():
    """Shipping a cache means rebuilding reports/ (./run_all.sh) in the same commit: every shipped run has its
    reports/heads/<run>.csv fitted on that very cache, and no table cell comes from a cache that is not shipped."""
    shipped = {p.parent.name: read_cache(p).fingerprint for p in SHIPPED}
    heads = {p.stem: p for p in (ROOT / "reports" / "heads").glob("*.csv")}
    assert sorted(heads) == sorted(shipped), "reports/heads/ and cache/ disagree: run ./run_all.sh and commit reports/"
    for run, path in heads.items():
        assert set(pd.read_csv(path, dtype=str)["cache_fingerprint"]) == {shipped[run]}, run
    for table in sorted((ROOT / "reports").glob("table*.csv")):
        cells = pd.read_csv(table, dtype=str)["cache_fingerprints"].dropna()
        used = {fp for cell in cells for fp in re.findall(r"[0-9a-f]{16}", cell)}
        unshipped = used - set(shipped.values())
        assert not unshipped, f"{table.name} has cells from caches not shipped: {unshipped}"
