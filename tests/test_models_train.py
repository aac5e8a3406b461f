import hashlib

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import read_cache
from pipeline.cli import cli
from pipeline.models import resnet10, resnet32
from pipeline.train import BatchAugment, extract, lr_at, recalibrate_bn, resolve_config, to_device_uint8, train

from .conftest import CIFAR10_JPEG, needs_cifar_jpeg, tiny_dataset


def test_resnet32_matches_ldam():
    m = resnet32(10)
    n = sum(p.numel() for p in m.parameters())
    assert 0.45e6 < n < 0.47e6  # LDAM-DRW's resnet32: 464,154 parameters for 10 classes
    assert n == 464154
    # option-A shortcuts are parameter-free: only convs, BN and fc carry weights
    assert not any(isinstance(x, torch.nn.Conv2d) and x.kernel_size == (1, 1) for x in m.modules())
    x = torch.randn(2, 3, 32, 32)
    f = m.forward_features(x)
    assert f.shape == (2, 64)
    torch.testing.assert_close(m(x), m.fc(f))


def test_resnet10_features():
    m = resnet10(1000)
    f = m.forward_features(torch.randn(2, 3, 64, 64))
    assert f.shape == (2, 512) and m.fc.in_features == 512
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 1 + 8 + 3  # stem, 4x2 convs, 3 downsamples


def test_cifar_augment_is_pad_crop_flip():
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment((0, 0, 0), (1 / 255,) * 3, torch.device("cpu"), "cifar", generator=g)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).add(1).to(torch.uint8).view(2, 3, 32, 32)
    out = aug(x)  # normalize with mean 0, std 1/255 -> raw pixel values
    assert out.shape == x.shape
    for b in range(2):
        xp = torch.nn.functional.pad(x[b].float(), (4, 4, 4, 4))
        hits = [(i, j, fl) for i in range(9) for j in range(9) for fl in (False, True)
                if torch.equal((xp[:, i:i + 32, j:j + 32].flip(2) if fl else xp[:, i:i + 32, j:j + 32]), out[b])]
        assert len(hits) == 1  # every output is exactly one padded crop (optionally flipped)


def test_imagenet_augment_shapes():
    g = torch.Generator().manual_seed(0)
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), "imagenet", out_size=24, generator=g)
    out = aug(torch.randint(0, 255, (3, 3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 3, 24, 24) and torch.isfinite(out).all()


def test_lr_schedule():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.01)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.05)
    assert lr_at(99, 100, 10, 0.1) < 0.001


def _cfg(ds, epochs=4):
    return resolve_config(ds, epochs=epochs, batch_size=8, warmup_epochs=1, precision="fp32", seed=3)


def test_resume_matches_uninterrupted(tmp_path):
    ds = tiny_dataset()
    cfg = _cfg(ds)
    full, _ = train(ds, cfg, tmp_path / "a", "cpu", deterministic=True, log=lambda *a: None)
    (tmp_path / "b").mkdir()
    stopped, rows = train(ds, cfg, tmp_path / "b", "cpu", deterministic=True, stop_after=2, log=lambda *a: None)
    assert stopped is None and len(rows) == 2
    resumed, rows = train(ds, cfg, tmp_path / "b", "cpu", deterministic=True, log=lambda *a: None)
    assert len(rows) == 4 and [r["epoch"] for r in rows] == [1, 2, 3, 4]
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and training actually changed the weights from a fresh init
    torch.manual_seed(3)
    fresh = resnet32(ds.num_classes).state_dict()
    assert not torch.equal(fresh["conv1.weight"], sa["conv1.weight"])


def test_resume_refuses_other_config(tmp_path):
    from pipeline.utils import UserError
    ds = tiny_dataset()
    train(ds, _cfg(ds, epochs=2), tmp_path, "cpu", deterministic=True, log=lambda *a: None)
    with pytest.raises(UserError, match="different configuration"):
        train(ds, _cfg(ds, epochs=3), tmp_path, "cpu", deterministic=True, log=lambda *a: None)


def test_bn_recalibration_changes_stats_not_weights(tmp_path):
    ds = tiny_dataset()
    model, _ = train(ds, _cfg(ds, 2), tmp_path, "cpu", deterministic=True, log=lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    recalibrate_bn(model, to_device_uint8(ds.train.images, "cpu"), aug)
    after = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)
    changed = [k for k in after if "running_mean" in k and not torch.equal(before[k], after[k])]
    assert len(changed) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not model.training


def test_deterministic_cpu_repeats(tmp_path):
    ds = tiny_dataset()
    a = extract(ds, tmp_path / "x", epochs=2, batch_size=8, warmup_epochs=1, precision="fp32",
                deterministic=True, device="cpu", log=lambda *a: None)
    b = extract(ds, tmp_path / "y", epochs=2, batch_size=8, warmup_epochs=1, precision="fp32",
                deterministic=True, device="cpu", log=lambda *a: None)
    fa, fb = read_cache(a).split("test")[0], read_cache(b).split("test")[0]
    np.testing.assert_array_equal(fa, fb)
    assert read_cache(a).fingerprint == read_cache(b).fingerprint


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@needs_cifar_jpeg
def test_extract_cli_end_to_end_real_jpeg(tmp_path):
    """A tiny real run: 30 source images per class of CIFAR-10 (JPEG), beta 10, one epoch."""
    args = ["extract", "--dataset", "cifar10-lt", "--data-root", str(CIFAR10_JPEG), "--imbalance", "10",
            "--train-limit", "30", "--test-limit", "10", "--epochs", "1", "--batch-size", "32",
            "--cache-dir", str(tmp_path), "--bn-recalibrate", "--device", "cpu"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    path = tmp_path / "cifar10-lt-b10-resnet32-s0" / "features.h5"
    c = read_cache(path)
    p = c.provenance
    for key in ("dataset", "imbalance", "subset_seed", "backbone", "epochs", "seed", "config",
                "checkpoint_sha256", "git_commit", "torch_version", "created", "data_source"):
        assert p.get(key) not in (None, ""), key
    assert p["dataset"] == "cifar10-lt" and p["imbalance"] == 10 and p["epochs"] == 1 and p["subset_seed"] == 0
    assert p["checkpoint_sha256"] == _sha(path.parent / "checkpoint.pt")
    assert set(c.variants) == {"plain", "bn_recal"}
    counts = np.array([int(30 * 0.1 ** (i / 9)) for i in range(10)])
    np.testing.assert_array_equal(c.train_counts, counts)
    assert c.class_names[:2] == ["airplane", "automobile"]
    np.testing.assert_array_equal(c.groups, np.where(counts < 20, 2, 1))  # none reaches 100 (Many)
    for v in c.variants:
        for split, n in (("train", counts.sum()), ("test", 100)):
            x, y = c.split(split, v)
            assert x.shape == (n, 64) and x.dtype == np.float32 and y.dtype == np.int64
    assert not np.allclose(c.split("test", "plain")[0], c.split("test", "bn_recal")[0])
    assert c.classifier_weight.shape == (10, 64) and c.classifier_bias.shape == (10,)
    assert list(c.learning_curve()["epoch"]) == [1.0]
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 1
    assert (path.parent / "learning_curve.csv").exists()
    # re-running the same command is a no-op that says so
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "up to date" in r.output


def test_cli_bad_inputs_leave_files_untouched(tmp_path):
    runner = CliRunner()
    base = ["extract", "--dataset", "cifar10-lt", "--epochs", "1", "--device", "cpu"]

    def check(args, needle):
        r = runner.invoke(cli, base + args)
        assert r.exit_code != 0, r.output
        assert "Traceback" not in r.output
        err = [line for line in r.output.strip().splitlines() if line.startswith("Error")]
        assert len(err) == 1 and needle in err[0], r.output

    check(["--data-root", str(tmp_path / "missing")], "does not exist")
    check(["--data-root", str(tmp_path), "--imbalance", "0.5"], ">= 1")
    r = runner.invoke(cli, ["extract", "--dataset", "mnist-lt", "--data-root", str(tmp_path)])
    assert r.exit_code != 0 and "Invalid value for '--dataset'" in r.output
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    check(["--data-root", str(tmp_path), "--cache-dir", str(blocker / "sub")], "cannot create directory")

    # an existing cache with a different provenance is refused and left byte-identical
    ds = tiny_dataset()
    path = extract(ds, tmp_path / "c", run="r", epochs=1, batch_size=8, warmup_epochs=0, precision="fp32",
                   device="cpu", log=lambda *a: None)
    before = {p.name: _sha(p) for p in path.parent.iterdir()}
    from pipeline.utils import UserError
    with pytest.raises(UserError, match="different"):
        extract(ds, tmp_path / "c", run="r", epochs=2, batch_size=8, warmup_epochs=0, precision="fp32",
                device="cpu", log=lambda *a: None)
    assert {p.name: _sha(p) for p in path.parent.iterdir()} == before


def test_read_cache_refuses_foreign_and_mismatch(tmp_path):
    from pipeline.synthetic import make_synthetic_cache
    from pipeline.utils import UserError
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UserError, match="not a feature cache"):
        read_cache(foreign)
    (tmp_path / "junk.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="not an HDF5"):
        read_cache(tmp_path / "junk.h5")
    p = make_synthetic_cache(tmp_path / "s.h5", dataset="cifar10-lt", imbalance=100)
    assert read_cache(p, expect={"dataset": "cifar10-lt", "imbalance": 100}).num_classes == 10
    with pytest.raises(UserError, match="imbalance"):
        read_cache(p, expect={"imbalance": 200})
    with h5py.File(p, "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        read_cache(p)
