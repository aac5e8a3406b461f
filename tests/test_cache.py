"""Shipping caches: float16 storage, compression, model weights; the repack keeps identity and accuracy."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import read_cache, repack_cache, write_cache
from pipeline.cli import cli
from pipeline.stage2.fit import fit_head
from pipeline.synthetic import make_synthetic_cache
from pipeline.stage1.extract import extract

from .conftest import tiny_dataset


def test_repack_float32_is_lossless_and_float16_is_rounded(tmp_path):
    """The shipped caches are repacked in float32: features bit-identical, fingerprint unchanged.  float16
    storage only rounds (relative error <= 2^-11), but that is NOT harmless for every head: on a synthetic
    ~75% task local-projection moved by 0.22 point (eigenvectors of near-degenerate covariances rotate), so
    float16 is an option of pack-cache, not what we ship."""
    src = make_synthetic_cache(tmp_path / "src.h5", num_classes=10, dim=64, n_max=200, n_test=50, with_val=True)
    a = read_cache(src)
    for dtype in ("float32", "float16"):
        b = read_cache(repack_cache(src, tmp_path / f"{dtype}.h5", dtype))
        assert b.fingerprint == a.fingerprint and b.provenance["feature_dtype"] == dtype
        for v in a.variants:
            for split in a.splits(v):
                xa, ya = a.split(split, v)
                xb, yb = b.split(split, v)
                assert xb.dtype == np.float32 and np.array_equal(ya, yb)
                if dtype == "float32":
                    assert np.array_equal(xa, xb)
                else:
                    np.testing.assert_allclose(xb, xa, rtol=2 ** -11, atol=1e-7)
                    assert not np.array_equal(xa, xb)
    # the ncm head (closed form, well separated data) is unaffected by float16 storage
    f16 = read_cache(tmp_path / "float16.h5")
    assert fit_head(a, "ncm", device="cpu").acc == fit_head(f16, "ncm", device="cpu").acc


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
    assert p.fingerprint == c.fingerprint and p.provenance["feature_dtype"] == "float32"
    assert np.array_equal(p.split("train")[0], c.split("train")[0])
    assert all(np.array_equal(p.model_state()[k], state[k]) for k in state)
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


def test_schema1_cache_is_refused_with_a_hint_and_upgraded_by_pack_cache(tmp_path):
    import h5py

    from pipeline.utils import UserError
    src = make_synthetic_cache(tmp_path / "old.h5", num_classes=4, dim=8, n_max=40, n_test=5, imbalance=4)
    with h5py.File(src, "a") as f:  # what a schema-1 toolkit wrote: its own fingerprint definition
        f.attrs["schema_version"] = 1
        f.attrs["fingerprint"] = "0123456789abcdef"
    with pytest.raises(UserError, match="pack-cache"):
        read_cache(src)
    r = CliRunner().invoke(cli, ["pack-cache", str(src), "--out", str(tmp_path / "new.h5")])
    assert r.exit_code == 0, r.output
    new = read_cache(tmp_path / "new.h5")
    assert new.schema_version == 2 and new.provenance["upgraded_from_schema"] == 1
    assert new.provenance["upgraded_from_fingerprint"] == "0123456789abcdef"
    assert np.array_equal(new.split("train")[0], read_cache(src, upgrade=True).split("train")[0])


def test_identity_keys_added_later_keep_old_fingerprints():
    """A key of config.RUN_IDENTITY_ADDED at its default (None) leaves the fingerprint as it was before the
    key existed (the shipped caches stay valid); any other value changes it."""
    from pipeline.cache import fingerprint
    from pipeline.config import RUN_IDENTITY_ADDED
    base = dict(dataset="cifar10-lt", imbalance=100, weights_sha256="ab",
                config=dict(recipe="paper", epochs=80, data_hash="cd"))
    for key in RUN_IDENTITY_ADDED:
        same = dict(base, config=dict(base["config"], **{key: None}))
        other = dict(base, config=dict(base["config"], **{key: 2}))
        assert fingerprint(same) == fingerprint(base) != fingerprint(other)


def test_pack_cache_variant_keeps_only_the_named_variants(tmp_path):
    """`pack-cache --variant plain` ships a run in less room: the other variants leave the file (recorded under
    provenance dropped_variants with their method), the fingerprint and the kept features stay; re-adding a
    dropped variant (what `pipeline recalibrate` does) takes it off the list.  An unknown name: one line, no file."""
    from pipeline.cache import add_variants
    from pipeline.config import BN_RECAL_DEFAULT
    src = make_synthetic_cache(tmp_path / "src.h5", num_classes=6, dim=8, n_max=60, n_test=20, imbalance=10)
    add_variants(src, {"bn_recal": {s: read_cache(src).split(s, "bn_recal") for s in ("train", "test")}},
                 {"bn_recal": BN_RECAL_DEFAULT})
    a = read_cache(src)
    assert a.variants == ["plain", "bn_recal"]
    out = tmp_path / "ship" / "features.h5"
    r = CliRunner().invoke(cli, ["pack-cache", str(src), "--out", str(out), "--variant", "plain"])
    assert r.exit_code == 0 and "dropped bn_recal" in r.output, r.output
    b = read_cache(out)
    assert b.variants == ["plain"] and b.fingerprint == a.fingerprint
    assert b.provenance["dropped_variants"] == {"bn_recal": BN_RECAL_DEFAULT}
    assert "bn_recal_methods" not in b.provenance
    for s in a.splits("plain"):
        assert all(np.array_equal(u, v) for u, v in zip(a.split(s), b.split(s)))
    np.testing.assert_equal(fit_head(a, "ncm", device="cpu").acc, fit_head(b, "ncm", device="cpu").acc)  # nan == nan
    r = CliRunner().invoke(cli, ["info", str(out)])
    assert "bn_recal: dropped when the cache was packed" in r.output, r.output
    add_variants(out, {"bn_recal": {s: a.split(s, "bn_recal") for s in ("train", "test")}},
                 {"bn_recal": BN_RECAL_DEFAULT})
    c = read_cache(out)
    assert c.variants == ["plain", "bn_recal"] and "dropped_variants" not in c.provenance
    assert c.provenance["bn_recal_methods"] == {"bn_recal": BN_RECAL_DEFAULT}
    bad = tmp_path / "bad.h5"
    r = CliRunner().invoke(cli, ["pack-cache", str(src), "--out", str(bad), "--variant", "bn_recal-x"])
    assert r.exit_code != 0 and "no feature variant bn_recal-x" in r.output and "Traceback" not in r.output
    assert not bad.exists()
