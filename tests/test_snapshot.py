"""`pipeline snapshot`: a cache of an earlier epoch of a finished run, from a checkpoint the run wrote.  Its
features are the checkpoint's weights run over the run's images exactly as `pipeline extract` runs the final
ones; a snapshot of the last checkpoint is the run's own cache."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import read_cache
from pipeline.stage1.augment import BatchAugment
from pipeline.stage1.evaluate import predict_features
from pipeline.stage1.extract import extract
from pipeline.stage1.models import create_model
from pipeline.stage1.shards import Shard
from pipeline.stage1.snapshot import snapshot_cache
from pipeline.utils import UserError
from tests.conftest import tiny_dataset

KW = dict(epochs=3, batch_size=8, warmup_epochs=0, precision="fp32", device="cpu", log=lambda *a: None)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 3-epoch run, and the checkpoint it wrote after epoch 1."""
    root = tmp_path_factory.mktemp("cache")
    ds = tiny_dataset(size=32)
    assert extract(ds, root, run="r", stop_after=1, **KW) is None
    early = root / "epoch1.pt"
    shutil.copy(root / "r" / "checkpoint.pt", early)
    path = extract(ds, root, run="r", **KW)
    return dict(ds=ds, cache=read_cache(path), early=early, last=root / "r" / "checkpoint.pt")


def test_snapshot_features_are_the_checkpoints_weights_on_the_runs_images(run):
    ds, c = run["ds"], run["cache"]
    path = snapshot_cache(c, run["early"], ds, log=lambda *a: None)
    assert path == c.path.parent / "snapshots" / "epoch-0001" / "features.h5"
    s = read_cache(path)
    ck = torch.load(run["early"], map_location="cpu", weights_only=False)
    model = create_model("resnet32", ds.num_classes)
    model.load_state_dict(ck["model"])
    model = model.to(memory_format=torch.channels_last).eval()
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    for split, sp in (("train", ds.train), ("test", ds.test)):
        ref = predict_features(model, Shard(sp.images, "cpu").local, aug)[0]
        np.testing.assert_allclose(s.split(split)[0], ref, rtol=1e-6, atol=1e-6, err_msg=split)
        np.testing.assert_array_equal(s.split(split)[1], sp.labels)
    np.testing.assert_array_equal(s.classifier_weight, ck["model"]["fc.weight"].numpy())
    assert not np.allclose(s.split("test")[0], c.split("test")[0], atol=1e-3)  # another epoch: other features
    snap = s.provenance["snapshot"]
    assert snap["epoch"] == 1 and snap["epochs"] == 3 and snap["source_fingerprint"] == c.fingerprint
    assert s.fingerprint != c.fingerprint  # other weights
    assert list(s.learning_curve()["epoch"]) == [1.0]  # the curve up to that epoch


def test_a_snapshot_of_the_last_checkpoint_is_the_runs_cache(run, tmp_path):
    c = run["cache"]
    s = read_cache(snapshot_cache(c, run["last"], run["ds"], out=tmp_path / "last", log=lambda *a: None))
    assert s.fingerprint == c.fingerprint
    for split in ("train", "test"):
        np.testing.assert_array_equal(s.split(split)[0], c.split(split)[0])


def test_a_shipped_plain_only_cache_snapshots_like_the_full_one(run, tmp_path):
    """A cache packed with `pack-cache --variant plain` (its bn_recal dropped) snapshots to the same features, and
    the snapshot's provenance does not claim the dropped variant (a snapshot has plain features only)."""
    from pipeline.cache import add_variants, repack_cache
    from pipeline.config import BN_RECAL_DEFAULT
    c = run["cache"]
    full = tmp_path / "full" / "r" / "features.h5"
    full.parent.mkdir(parents=True)
    shutil.copy(c.path, full)
    add_variants(full, {"bn_recal": {s: c.split(s) for s in c.splits("plain")}}, {"bn_recal": BN_RECAL_DEFAULT})
    packed = read_cache(repack_cache(full, tmp_path / "ship.h5", variants=["plain"]))
    assert packed.provenance["dropped_variants"] == {"bn_recal": BN_RECAL_DEFAULT}
    a = read_cache(snapshot_cache(full, run["early"], run["ds"], out=tmp_path / "a.h5", log=lambda *a: None))
    b = read_cache(snapshot_cache(packed, run["early"], run["ds"], out=tmp_path / "b.h5", log=lambda *a: None))
    assert "dropped_variants" not in b.provenance and b.variants == ["plain"] and a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.split("test")[0], b.split("test")[0])


def test_snapshot_refuses_other_runs_other_images_and_other_files(run, tmp_path):
    ds, c = run["ds"], run["cache"]
    other = tmp_path / "other"
    extract(ds, other, run="o", **dict(KW, epochs=1, seed=1))
    with pytest.raises(UserError, match="is not a checkpoint of the run of"):
        snapshot_cache(c, other / "o" / "checkpoint.pt", ds, out=tmp_path / "x", log=lambda *a: None)
    with pytest.raises(UserError, match="data_hash differs"):
        snapshot_cache(c, run["early"], tiny_dataset(size=32, seed=1), out=tmp_path / "x", log=lambda *a: None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a readable checkpoint"):
        snapshot_cache(c, junk, ds, out=tmp_path / "x", log=lambda *a: None)
    before = c.path.read_bytes()
    with pytest.raises(UserError, match="is the run's own cache"):
        snapshot_cache(c, run["early"], ds, out=c.path.parent, log=lambda *a: None)
    assert c.path.read_bytes() == before
    assert not (tmp_path / "x").exists()


def test_the_report_flags_a_snapshot_and_never_reads_it_as_the_run(run, tmp_path):
    from pipeline.report.runs import load_context
    c = run["cache"]
    path = snapshot_cache(c, run["early"], run["ds"], log=lambda *a: None)
    ctx = load_context(str(c.path.parent.parent))  # the cache root: the snapshot sits below <run>/
    assert [i.run for i in ctx.infos] == ["r"]
    root = tmp_path / "root"
    (root / "snap").mkdir(parents=True)
    shutil.copy(path, root / "snap" / "features.h5")
    info = load_context(str(root)).infos[0]
    assert any(d.startswith("SNAPSHOT (the weights of epoch 1 of 3)") for d in info.recipe_deviations())


def test_snapshot_cli_writes_and_stage2_fits_on_it(tmp_path):
    from pipeline.cli import cli
    from tests.conftest import write_cifar_python
    write_cifar_python(tmp_path / "data", "cifar10", per_class_train=6, per_class_test=1)
    common = ["--dataset", "cifar10-lt", "--data-root", str(tmp_path / "data"), "--imbalance", "2",
              "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--precision", "fp32",
              "--cache-dir", str(tmp_path / "cache"), "--run-name", "r", "--no-image-store"]
    runner = CliRunner()
    assert runner.invoke(cli, ["extract", *common]).exit_code == 0
    run = tmp_path / "cache" / "r"
    assert "keep_best_test" not in read_cache(run).provenance["config"]  # no flag: the config as before it existed
    r = runner.invoke(cli, ["snapshot", str(run), str(run / "checkpoint.pt"), "--data-root", str(tmp_path / "data")])
    assert r.exit_code == 0, r.output
    assert "the weights of epoch 1 of 1" in r.output
    snap = run / "snapshots" / "epoch-0001"
    r = runner.invoke(cli, ["info", str(snap)])
    assert r.exit_code == 0 and "SNAPSHOT: the weights of epoch 1 of 1" in r.output, r.output
    r = runner.invoke(cli, ["fit-head", "--cache", str(snap), "--head", "ncm"])
    assert r.exit_code == 0, r.output
    assert (snap / "results.csv").exists()
    r = runner.invoke(cli, ["snapshot", str(run), str(run / "nope.pt"), "--data-root", str(tmp_path / "data")])
    assert r.exit_code == 2 and "no checkpoint at" in r.output and "Traceback" not in r.output


def test_keep_best_test_keeps_the_first_best_evaluated_epoch(tmp_path, monkeypatch):
    """--keep-best-test: best_test_checkpoint.pt holds the weights of the first epoch with the best test
    accuracy (scripted here: 50, 70, NaN (not evaluated), 70, 60), the same weights as a run stopped there;
    without the flag there is no such file and the config has no key for it."""
    from pipeline.stage1 import train as tr
    from pipeline.stage1.checkpoint import BEST_TEST_FILE
    script = {0: 50.0, 1: 70.0, 2: float("nan"), 3: 70.0, 4: 60.0}

    def scripted(t, epoch, pause):
        return dict(all=script[epoch], many=script[epoch], medium=script[epoch], few=float("nan"))
    monkeypatch.setattr(tr, "_evaluate_epoch", scripted)
    ds = tiny_dataset(size=32)
    kw = dict(KW, epochs=5, deterministic=True)
    extract(ds, tmp_path / "a", run="r", keep_best_test=True, **kw)
    best = torch.load(tmp_path / "a" / "r" / BEST_TEST_FILE, map_location="cpu", weights_only=False)
    assert best["epoch"] == 2 and read_cache(tmp_path / "a" / "r").provenance["config"]["keep_best_test"] is True
    assert best["optimizer"] is None  # snapshotted, never resumed: weights only, half the size in git
    extract(ds, tmp_path / "b", run="r", stop_after=2, **kw)  # the same run, stopped after epoch 2
    at2 = torch.load(tmp_path / "b" / "r" / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert at2["epoch"] == 2
    for k, v in at2["model"].items():
        assert torch.equal(best["model"][k], v), k
    assert not (tmp_path / "b" / "r" / BEST_TEST_FILE).exists()
    assert "keep_best_test" not in at2["config"]
    snap = read_cache(snapshot_cache(tmp_path / "a" / "r", tmp_path / "a" / "r" / BEST_TEST_FILE, ds,
                                     log=lambda *a: None))  # what the weights-only file is for
    assert snap.provenance["snapshot"]["epoch"] == 2
    assert all(np.array_equal(snap.model_state()[k], v.numpy()) for k, v in at2["model"].items())
