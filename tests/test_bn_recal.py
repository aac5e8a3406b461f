"""Post-hoc BatchNorm re-estimation methods (issue 13): train-aug statistics against a slow direct reference,
the balanced sampler's class draws (chi-squared), variant names / methods / fingerprints through the cache,
and adding a method's variant to a finished cache without training (library and CLI)."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats

from pipeline.cache import add_variants, read_cache, write_cache
from pipeline.config import BN_RECAL_DEFAULT, bn_recal_method, bn_recal_variant, is_variant
from pipeline.stage1.augment import BatchAugment
from pipeline.stage1.data import LTDataset, Split
from pipeline.stage1.evaluate import recal_batches, recal_method, recalibrate_bn
from pipeline.stage1.models import resnet32
from pipeline.stage1.shards import Shard
from pipeline.utils import UserError

from .conftest import tiny_dataset, write_cifar_python


def _sorted_dataset(n_per_class=200, size=32):
    """Class-sorted 32x32 images (as our arrays are), class-dependent brightness."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), n_per_class)
    x = (rng.integers(0, 120, (len(y), size, size, 3)) + 40 * y[:, None, None, None]).astype(np.uint8)
    return LTDataset(name="cifar10-lt", class_names=list("abcd"), train=Split(x, y), test=Split(x[:4], y[:4]))


def _first_bn_input_stats(model, batches):
    """Population mean / variance over every pixel of the first BatchNorm layer's input (conv1 needs no BN
    statistics): the slow direct reference."""
    with torch.no_grad():
        pre = torch.cat([model.conv1(x).permute(1, 0, 2, 3).reshape(model.conv1.out_channels, -1)
                         for x in batches], 1)
    return pre.mean(1), pre.var(1)


def test_train_aug_statistics_are_the_population_statistics_of_augmented_batches():
    """The re-estimated first-layer running mean/var equal those of the run's augmentation (crop, flip,
    AutoAugment, Cutout) applied to two permutations of the training set, drawn here directly from a
    generator with the method's seed; and they are clearly not the clean images' (so a train-aug that
    silently used clean images goes red)."""
    ds = _sorted_dataset()
    method = recal_method(dict(augment="cifar-autoaug"), data="train-aug", sampler="instance", passes=2, seed=3,
                          batch_size=200)
    torch.manual_seed(0)
    model = resnet32(4)
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))  # normalisation only; the method brings the rest
    xt = Shard(ds.train.images, "cpu")
    recalibrate_bn(model, xt, aug, method, ds.train.labels, 4)

    g = torch.Generator().manual_seed(3)  # the reference: one permutation per pass, each batch augmented in turn
    ref_aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"), "cifar-autoaug", 32, g)
    augmented = []
    for _ in range(2):
        perm = torch.randperm(len(ds.train.labels), generator=g)
        for s in range(0, len(perm), 200):
            augmented.append(ref_aug(xt.local[perm[s:s + 200]]))
    mean, var = _first_bn_input_stats(model, augmented)
    bn = model.bn1
    np.testing.assert_allclose(bn.running_mean, mean, rtol=0.02, atol=0.01 * mean.abs().max().item())
    np.testing.assert_allclose(bn.running_var, var, rtol=0.03)
    clean_mean, clean_var = _first_bn_input_stats(model, [aug.normalize(xt.local)])
    gap = max(((clean_mean - mean).abs() / mean.abs().max()).max().item(),
              ((clean_var - var).abs() / var).max().item())
    assert gap > 0.1, gap  # the augmentation moves the statistics far more than the tolerance above


def test_clean_method_matches_clean_population():
    ds = _sorted_dataset(100)
    torch.manual_seed(0)
    model = resnet32(4)
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    xt = Shard(ds.train.images, "cpu")
    method = recal_method(dict(augment="cifar-autoaug"), data="clean", batch_size=100)
    assert method["augment"] is None
    recalibrate_bn(model, xt, aug, method, ds.train.labels, 4)
    mean, var = _first_bn_input_stats(model, [aug.normalize(xt.local)])
    np.testing.assert_allclose(model.bn1.running_mean, mean, rtol=0.02, atol=0.02 * mean.abs().max().item())
    np.testing.assert_allclose(model.bn1.running_var, var, rtol=0.02)


def test_balanced_draws_are_class_uniform_and_instance_passes_see_every_image_once():
    y = np.repeat(np.arange(5), [500, 150, 50, 12, 3])  # long-tailed, sorted by class
    method = dict(data="train-aug", sampler="balanced", passes=3, seed=0, batch_size=128, augment="cifar")
    idx = torch.cat(list(recal_batches(y, 5, method, torch.Generator().manual_seed(0)))).numpy()
    counts = np.bincount(y[idx], minlength=5)
    assert counts.sum() == 3 * len(y)
    assert stats.chisquare(counts).pvalue > 1e-3, counts  # uniform over classes, not over images
    # draws reach the whole of each class (~290 distinct of class 0's 500 in 429 draws with replacement)
    head = idx[y[idx] == 0]
    assert len(np.unique(head)) > 250 and head.min() < 10 and head.max() > 490
    inst = torch.cat(list(recal_batches(y, 5, dict(method, sampler="instance"),
                                        torch.Generator().manual_seed(0)))).numpy()
    np.testing.assert_array_equal(np.bincount(inst, minlength=len(y)), np.full(len(y), 3))
    assert stats.chisquare(np.bincount(y[inst], minlength=5)).pvalue < 1e-6  # the long tail itself


def test_variant_names():
    assert bn_recal_variant(**BN_RECAL_DEFAULT) == "bn_recal"
    assert bn_recal_method("bn_recal") == BN_RECAL_DEFAULT
    for data in ("train-aug", "clean"):
        for sampler in ("instance", "balanced"):
            for passes in (1, 3):
                v = bn_recal_variant(data, sampler, passes)
                assert is_variant(v) and bn_recal_method(v) == dict(data=data, sampler=sampler, passes=passes)
    for bad in ("bn_recal-train-aug-instance-x1", "bn_recal-clean-instance-x0", "bn_recal-clean-instance-x01",
                "bn_recal-dirty-instance-x1", "plain2", "", "bn_recal-clean-instance"):
        assert not is_variant(bad), bad
    with pytest.raises(ValueError):
        bn_recal_variant("clean", "instance", 0)


def _features(seed, n=20, d=4):
    rng = np.random.default_rng(seed)
    return {"train": (rng.normal(size=(n, d)).astype(np.float32), np.arange(n) % 2),
            "test": (rng.normal(size=(6, d)).astype(np.float32), np.arange(6) % 2)}


def _write(path, features, methods, prov=None):
    return write_cache(path, provenance=prov or dict(dataset="cifar10-lt", imbalance=1.0, seed=0,
                                                     weights_sha256="w" * 64),
                       class_names=["a", "b"], train_counts=[10, 10], classifier_weight=np.zeros((2, 4)),
                       classifier_bias=np.zeros(2), features=features, variant_methods=methods)


def test_variants_and_methods_round_trip_and_make_old_fits_stale(tmp_path):
    from pipeline.report.runs import features_fingerprints, read_results
    from pipeline.stage2.fit import fit_head, record_fit
    m_default = dict(BN_RECAL_DEFAULT, seed=0, batch_size=1024, augment="cifar-autoaug")
    m_clean = dict(data="clean", sampler="instance", passes=1, seed=0, batch_size=8, augment=None)
    (tmp_path / "r").mkdir()
    path = _write(tmp_path / "r" / "features.h5",
                  {"plain": _features(0), "bn_recal": _features(1), "bn_recal-clean-instance-x1": _features(2)},
                  {"bn_recal": m_default, "bn_recal-clean-instance-x1": m_clean})
    c = read_cache(path)
    assert c.variants == ["plain", "bn_recal", "bn_recal-clean-instance-x1"]
    assert c.recorded_method("bn_recal") == m_default and c.variant_method("bn_recal-clean-instance-x1") == m_clean
    assert c.provenance["bn_recal_methods"] == {"bn_recal": m_default, "bn_recal-clean-instance-x1": m_clean}
    import h5py
    with h5py.File(path) as f:
        assert "training augmentation" in f["bn_recal"].attrs["description"]
        assert "no augmentation" in f["bn_recal-clean-instance-x1"].attrs["description"]
    fps = features_fingerprints(c)
    assert fps["plain"] == c.fingerprint and len(set(fps.values())) == 3
    np.testing.assert_array_equal(c.split("test", "bn_recal-clean-instance-x1")[0], _features(2)["test"][0])

    row_old = record_fit(c, fit_head(c, "ncm", variant="bn_recal", device="cpu"))
    record_fit(c, fit_head(c, "ncm", variant="plain", device="cpu"))
    # re-estimate bn_recal another way: the fingerprint and the other variants stay, its old fits go stale
    add_variants(path, {"bn_recal": _features(3)}, {"bn_recal": dict(m_default, passes=2)})
    c2 = read_cache(path)
    assert c2.fingerprint == c.fingerprint and c2.variants == c.variants
    np.testing.assert_array_equal(c2.split("test", "bn_recal-clean-instance-x1")[0], _features(2)["test"][0])
    np.testing.assert_array_equal(c2.split("test", "bn_recal")[0], _features(3)["test"][0])
    rows, stale, total = read_results(path.parent / "results.csv", features_fingerprints(c2))
    assert (stale, total) == (1, 2) and list(rows["variant"]) == ["plain"]
    row_new = record_fit(c2, fit_head(c2, "ncm", variant="bn_recal", device="cpu"))
    assert row_new["fit_id"] != row_old["fit_id"]
    assert row_new["cache_fingerprint"] == c2.variant_fingerprint("bn_recal")


def test_cache_of_older_code_keeps_its_fits(tmp_path):
    """A bn_recal variant written before methods were recorded: its method is the one that code had, and
    its fingerprint is the cache's, so the fits made on it stay valid."""
    prov = dict(dataset="cifar10-lt", imbalance=1.0, seed=0, weights_sha256="w" * 64,
                bn_recal_method="swa_utils.update_bn over a fixed permutation of the training set (seed 0)")
    c = read_cache(_write(tmp_path / "features.h5", {"plain": _features(0), "bn_recal": _features(1)}, None, prov))
    assert c.recorded_method("bn_recal") is None
    assert c.variant_method("bn_recal")["data"] == "clean"
    assert c.variant_fingerprint("bn_recal") == c.fingerprint


def test_unknown_variant_is_refused_in_the_librarys_words(tmp_path):
    from pipeline.stage2.fit import fit_head
    c = read_cache(_write(tmp_path / "features.h5", {"plain": _features(0)}, None))
    with pytest.raises(UserError, match="variant must be") as e:
        fit_head(c, "ncm", variant="bn_recal-dirty")
    assert "--" not in str(e.value)
    with pytest.raises(UserError, match="pipeline recalibrate"):
        fit_head(c, "ncm", variant="bn_recal-clean-balanced-x1")
    with pytest.raises(ValueError, match="variant"):
        _write(tmp_path / "x.h5", {"bn_recal-x": _features(0)}, None)


def test_extract_adds_a_method_to_a_finished_cache_from_its_weights(tmp_path):
    """A finished run asked for another re-estimation method gets it from the weights in its cache: no
    training (the checkpoint is gone), the plain features and the fingerprint unchanged, the new variant
    equal to re-estimating the cache's weights directly."""
    from pipeline.stage1.extract import extract
    from pipeline.stage1.recalibrate import model_from_cache
    from pipeline.stage1.evaluate import predict_features
    ds = tiny_dataset(size=32)
    logs = []
    kw = dict(epochs=1, batch_size=8, warmup_epochs=0, precision="fp32", device="cpu", log=logs.append)
    path = extract(ds, tmp_path, run="r", bn_recalibrate=True, **kw)
    c = read_cache(path)
    assert c.variants == ["plain", "bn_recal"]
    assert c.recorded_method("bn_recal") == dict(BN_RECAL_DEFAULT, seed=0, batch_size=1024, augment="cifar-autoaug")
    (tmp_path / "r" / "checkpoint.pt").unlink()
    plain = c.split("test", "plain")[0]
    extract(ds, tmp_path, run="r", bn_recalibrate=True,
            bn_recal=[dict(data="clean", sampler="balanced", passes=2)], **kw)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()  # nothing trained
    assert any("adding its bn_recal-clean-balanced-x2 features" in line for line in logs)
    c2 = read_cache(path)
    assert c2.fingerprint == c.fingerprint
    assert c2.variants == ["plain", "bn_recal", "bn_recal-clean-balanced-x2"]
    np.testing.assert_array_equal(c2.split("test", "plain")[0], plain)
    method = c2.recorded_method("bn_recal-clean-balanced-x2")
    assert method == dict(data="clean", sampler="balanced", passes=2, seed=0, batch_size=1024, augment=None)
    model = model_from_cache(c2, torch.device("cpu"))
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    recalibrate_bn(model, Shard(ds.train.images, "cpu"), aug, method, ds.train.labels, ds.num_classes)
    ref = predict_features(model, Shard(ds.test.images, "cpu").local, aug)[0]
    np.testing.assert_allclose(c2.split("test", "bn_recal-clean-balanced-x2")[0], ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(c2.split("test", "bn_recal")[0], ref, atol=1e-3)  # another method, other features
    # a bn_recal made before methods were recorded (the clean-image method): extract re-estimates it
    add_variants(path, {"bn_recal": {s: c2.split(s, "bn_recal-clean-balanced-x2") for s in ("train", "test")}},
                 {"bn_recal": None})
    assert read_cache(path).recorded_method("bn_recal") is None
    logs.clear()
    extract(ds, tmp_path, run="r", bn_recalibrate=True, **kw)
    assert any("adding its bn_recal features" in line for line in logs), logs
    assert read_cache(path).recorded_method("bn_recal")["data"] == "train-aug"
    # asked again: nothing to do
    logs.clear()
    extract(ds, tmp_path, run="r", bn_recalibrate=True,
            bn_recal=[dict(data="clean", sampler="balanced", passes=2)], **kw)
    assert any("up to date" in line for line in logs)


def test_recalibrate_cli_adds_every_combination_and_checks_the_data(tmp_path):
    from pipeline.cli import cli
    write_cifar_python(tmp_path / "data", "cifar10", per_class_train=6, per_class_test=1)
    runner = CliRunner()
    common = ["--dataset", "cifar10-lt", "--data-root", str(tmp_path / "data"), "--imbalance", "2",
              "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--precision", "fp32",
              "--cache-dir", str(tmp_path / "cache"), "--run-name", "r", "--no-image-store"]
    r = runner.invoke(cli, ["extract", *common])
    assert r.exit_code == 0, r.output
    cache = tmp_path / "cache" / "r"
    r = runner.invoke(cli, ["recalibrate", str(cache), "--data-root", str(tmp_path / "data"),
                            "--bn-recal-data", "clean", "--bn-recal-data", "train-aug",
                            "--bn-recal-sampler", "balanced", "--bn-recal-passes", "2"])
    assert r.exit_code == 0, r.output
    c = read_cache(cache)
    assert c.variants == ["plain", "bn_recal-clean-balanced-x2", "bn_recal-train-aug-balanced-x2"]
    assert json.loads(json.dumps(c.provenance["bn_recal_methods"]))["bn_recal-train-aug-balanced-x2"]["augment"] \
        == "cifar-autoaug"
    r = runner.invoke(cli, ["fit-head", "--cache", str(cache), "--head", "ncm",
                            "--variant", "bn_recal-clean-balanced-x2"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["fit-head", "--cache", str(cache), "--head", "ncm", "--variant", "bn_recal-x"])
    assert r.exit_code == 2 and "--variant" in r.output and "Traceback" not in r.output
    # other images than the run's: one line, nothing changed
    write_cifar_python(tmp_path / "other", "cifar10", per_class_train=6, per_class_test=1, seed=1)
    before = (cache / "features.h5").read_bytes()
    r = runner.invoke(cli, ["recalibrate", str(cache), "--data-root", str(tmp_path / "other")])
    assert r.exit_code == 2 and "data_hash" in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert (cache / "features.h5").read_bytes() == before
