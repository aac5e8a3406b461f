"""Shipping caches: float16 storage, compression, model weights; the repack keeps identity and accuracy."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import read_cache, repack_cache, write_cache
from pipeline.cli import cli
from pipeline.fit import fit_head
from pipeline.heads import HEADS
from pipeline.synthetic import make_synthetic_cache
from pipeline.train import extract

from .conftest import tiny_dataset


def test_float16_features_keep_every_head_within_a_tenth_of_a_point(tmp_path):
    """Every registered head fitted on float16-stored features scores within 0.1 point (All and each group)
    of the same fit on float32 features (10,000 test points: one changed prediction is 0.01 point)."""
    src = make_synthetic_cache(tmp_path / "f32.h5", num_classes=10, dim=64, n_max=1000, n_test=1000,
                               separation=0.4, tail_spread=2.0, with_val=True)  # a hard task: ~40% All
    dst = repack_cache(src, tmp_path / "f16.h5", "float16")
    a, b = read_cache(src), read_cache(dst)
    assert a.fingerprint == b.fingerprint and b.provenance["feature_dtype"] == "float16"
    xa, xb = a.split("test")[0], b.split("test")[0]
    assert xb.dtype == np.float32 and not np.array_equal(xa, xb)  # really rounded
    np.testing.assert_allclose(xa, xb, rtol=1e-3, atol=1e-3)
    for head in sorted(HEADS):
        kw = dict(seed=0, device="cpu", epochs=3)
        ra, rb = fit_head(a, head, **kw), fit_head(b, head, **kw)
        for k in ("all", "many", "medium", "few"):
            if np.isfinite(ra.acc[k]):
                assert abs(ra.acc[k] - rb.acc[k]) < 0.1, (head, k, ra.acc[k], rb.acc[k])


def test_extract_stores_model_weights_and_pack_cache_cli(tmp_path):
    ds = tiny_dataset()
    path = extract(ds, tmp_path, run="r", epochs=1, batch_size=8, warmup_epochs=0, precision="fp32",
                   device="cpu", log=lambda *a: None)
    c = read_cache(path)
    state = c.model_state()
    ckpt = torch.load(path.parent / "checkpoint.pt", weights_only=False)["model"]
    assert set(state) == set(ckpt)
    assert all(np.array_equal(state[k], ckpt[k].numpy()) for k in ckpt)
    out = tmp_path / "ship" / "features.h5"
    r = CliRunner().invoke(cli, ["pack-cache", str(path), "--out", str(out), "--checkpoint",
                                 str(path.parent / "checkpoint.pt")])
    assert r.exit_code == 0, r.output
    p = read_cache(out)
    assert p.fingerprint == c.fingerprint and p.provenance["feature_dtype"] == "float16"
    np.testing.assert_allclose(p.split("train")[0], c.split("train")[0], rtol=1e-3, atol=1e-3)
    # a checkpoint of other weights is refused, and nothing is written
    other = tmp_path / "other.pt"
    bad = torch.load(path.parent / "checkpoint.pt", weights_only=False)
    bad["model"]["fc.bias"] += 1
    torch.save(bad, other)
    r = CliRunner().invoke(cli, ["pack-cache", str(path), "--out", str(tmp_path / "x.h5"), "--checkpoint", str(other)])
    assert r.exit_code != 0 and "weights_sha256" in r.output and not (tmp_path / "x.h5").exists()
    assert "Traceback" not in r.output


def test_write_cache_rejects_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="feature_dtype"):
        write_cache(tmp_path / "x.h5", provenance={}, class_names=["a"], train_counts=[1],
                    classifier_weight=np.zeros((1, 2)), classifier_bias=np.zeros(1),
                    features={"plain": {"train": (np.zeros((1, 2)), np.zeros(1))}}, feature_dtype="int8")
