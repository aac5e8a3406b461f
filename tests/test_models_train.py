import math
import hashlib

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cache import read_cache
from pipeline.cli import cli
from pipeline.stage1.models import resnet10, resnet32
from pipeline.stage1.augment import BatchAugment
from pipeline.stage1.evaluate import recal_method, recalibrate_bn
from pipeline.stage1.extract import extract
from pipeline.stage1.plan import resolve_config
from pipeline.stage1.schedule import balms_lr, cosine_lr, lr_for
from pipeline.stage1.shards import Shard
from pipeline.stage1.train import train

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


def test_lr_schedule():
    assert cosine_lr(0, 100, 10, 0.1) == pytest.approx(0.01)
    assert cosine_lr(9, 100, 10, 0.1) == pytest.approx(0.1)
    assert cosine_lr(55, 100, 10, 0.1) == pytest.approx(0.05)
    assert cosine_lr(99, 100, 10, 0.1) < 0.001


def _fake_cifar10_lt(n=12406):
    """An LTDataset with the CIFAR-10-LT beta=100 training-set size (1x1 images: only the size matters)."""
    from pipeline.stage1.data import LTDataset, Split
    return LTDataset(name="cifar10-lt", class_names=[str(i) for i in range(10)],
                     train=Split(np.zeros((n, 1, 1, 3), np.uint8), np.arange(n) % 10),
                     test=Split(np.zeros((10, 1, 1, 3), np.uint8), np.arange(10)), imbalance=100.0)


def test_paper_recipe_schedule_is_balms():
    """13,000 iterations at batch 512 on 12,406 images: 25 steps/epoch, 520 epochs, 32 warm-up epochs; lr
    0.05 at the first epoch rising linearly to 0.1 at epoch 32, cosine to exactly 0 at the last epoch, as
    BALMS's CosineAnnealingLRWarmup stepped at the start of each epoch (last_epoch = 1..520)."""
    cfg = resolve_config(_fake_cifar10_lt(), recipe="paper", precision="fp32")
    assert (cfg["steps_per_epoch"], cfg["epochs"], cfg["warmup_epochs"]) == (25, 520, 32)
    assert (cfg["batch_size"], cfg["weight_decay"], cfg["augment"]) == (512, 5e-4, "cifar-autoaug")

    def balms(last_epoch, T=520, W=32, base=0.05, warm=0.1):  # utils.CosineAnnealingLRWarmup.get_lr
        if last_epoch < W:
            return (warm - base) / (W - 1) * (last_epoch - 1) + base
        return warm * (1 + math.cos(math.pi * (last_epoch - W) / (T - W))) / 2

    lrs = [lr_for(cfg, e, b, 25) for e in range(520) for b in (0, 24)]
    assert lrs[0] == pytest.approx(0.05) and lrs[1] == lrs[0]       # constant within an epoch
    assert lr_for(cfg, 30, 0, 25) == pytest.approx(0.05 + 0.05 * 30 / 31)
    assert lr_for(cfg, 31, 0, 25) == pytest.approx(0.1)              # epoch 32: the peak
    assert lr_for(cfg, 519, 24, 25) == pytest.approx(0.0, abs=1e-12)  # the last iteration
    np.testing.assert_allclose(lrs[::2], [balms(e) for e in range(1, 521)], rtol=1e-12, atol=1e-15)
    assert balms_lr(1, 10, 0, 0.05, 0.1) == pytest.approx(0.1 * (1 + math.cos(math.pi / 10)) / 2)


def test_recipes_and_budget():
    from pipeline.utils import UserError
    ds = _fake_cifar10_lt()
    assert resolve_config(ds, recipe="paper", iterations=2000)["epochs"] == 80
    assert resolve_config(ds, recipe="paper", epochs=7)["epochs"] == 7
    ldam = resolve_config(ds, recipe="ldam")
    assert (ldam["epochs"], ldam["batch_size"], ldam["weight_decay"], ldam["augment"]) == (200, 128, 2e-4, "cifar")
    wb = resolve_config(ds, recipe="wb")
    assert (wb["epochs"], wb["batch_size"], wb["lr"], wb["weight_decay"], wb["warmup_epochs"]) == \
        (320, 64, 0.01, 5e-3, 0)
    assert resolve_config(ds)["recipe"] == "paper"
    with pytest.raises(UserError, match="not both"):
        resolve_config(ds, epochs=3, iterations=100)
    with pytest.raises(UserError, match="for imagenet data"):
        resolve_config(ds, recipe="decoupling")


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
    recalibrate_bn(model, Shard(ds.train.images, "cpu"), aug, recal_method(dict(augment="cifar")),
                   ds.train.labels, ds.num_classes)
    after = model.state_dict()
    params = {k for k, _ in model.named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)
    changed = [k for k in after if "running_mean" in k and not torch.equal(before[k], after[k])]
    assert len(changed) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not model.training


def test_bn_recalibration_on_class_sorted_data_matches_population():
    """Class-sorted training data (as our arrays are): the re-estimated running mean/var of the first BN
    layer are within 2% of the population statistics of its input over the whole training set."""
    from pipeline.stage1.data import LTDataset, Split
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 500)
    x = (rng.integers(0, 40, (2000, 8, 8, 3)) + 60 * y[:, None, None, None]).astype(np.uint8)  # sorted by class
    ds = LTDataset(name="cifar10-lt", class_names=list("abcd"), train=Split(x, y), test=Split(x[:4], y[:4]))
    torch.manual_seed(0)
    model = resnet32(4)
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    xt = Shard(ds.train.images, "cpu")
    recalibrate_bn(model, xt, aug, recal_method(dict(augment="cifar"), data="clean", batch_size=100), y, 4)
    with torch.no_grad():
        pre = model.conv1(aug.normalize(xt.local))  # input of the first BN layer, whole training set
    mean, var = pre.mean((0, 2, 3)), pre.var((0, 2, 3))
    bn = model.bn1
    np.testing.assert_allclose(bn.running_mean, mean, rtol=0.02, atol=0.02 * mean.abs().max().item())
    np.testing.assert_allclose(bn.running_var, var, rtol=0.02)


def test_changed_pixel_refuses_checkpoint_and_cache(tmp_path):
    from pipeline.utils import UserError
    ds = tiny_dataset()
    kw = dict(epochs=1, batch_size=8, warmup_epochs=0, precision="fp32", device="cpu", log=lambda *a: None)
    extract(ds, tmp_path, run="r", **kw)
    ds.train.images[0, 0, 0, 0] ^= 1  # one pixel of the source
    with pytest.raises(UserError, match="data_hash"):
        extract(ds, tmp_path, run="r", **kw)
    # a killed run does not resume on other data either
    ds2 = tiny_dataset()
    train(ds2, _cfg(ds2, 3), tmp_path / "k", "cpu", stop_after=1, log=lambda *a: None)
    ds2.test.labels[0] = (ds2.test.labels[0] + 1) % ds2.num_classes
    with pytest.raises(UserError, match="data_hash"):
        train(ds2, _cfg(ds2, 3), tmp_path / "k", "cpu", log=lambda *a: None)


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
    path = tmp_path / "cifar10-lt-b10-resnet32-paper-s0" / "features.h5"
    c = read_cache(path)
    p = c.provenance
    assert p["config"]["recipe"] == "paper" and p["config"]["augment"] == "cifar-autoaug"
    assert len(p["config"]["data_hash"]) == 32
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
        assert f.attrs["schema_version"] == 2
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
    check(["--data-root", str(tmp_path), "--imbalance", "0.5"], "x>=1")
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
    with h5py.File(p, "a") as f:  # an edited provenance no longer matches the fingerprint
        prov = f.attrs["provenance"]
        f.attrs["provenance"] = prov.replace('"imbalance": 100', '"imbalance": 50')
    with pytest.raises(UserError, match="fingerprint"):
        read_cache(p)
    with h5py.File(p, "a") as f:
        f.attrs["provenance"] = prov
        f.attrs["schema_version"] = 99
    with pytest.raises(UserError, match="schema version 99"):
        read_cache(p)


def test_balms_recipe_is_paper_with_balms_code_and_leaves_paper_identity_alone():
    """`--recipe balms` = `paper` + BALMS's AutoAugment, dropped partial batch and default final-layer init.
    Epochs and warm-up count the partial batch as BALMS does (ceil); the new identity keys are absent from a
    `paper` config, so no shipped cache or in-flight checkpoint changes fingerprint."""
    from pipeline.config import run_identity
    from pipeline.utils import UserError
    ds = _fake_cifar10_lt()
    paper = resolve_config(ds, recipe="paper", precision="fp32")
    balms = resolve_config(ds, recipe="balms", precision="fp32")
    assert (balms["steps_per_epoch"], balms["epochs"], balms["warmup_epochs"]) == (24, 520, 32)  # 12,480 steps
    assert (balms["augment"], balms["drop_last"], balms["fc_init"]) == ("cifar-autoaug-balms", True, "default")
    ip, ib = run_identity(paper), run_identity(balms)
    assert "drop_last" not in ip and "fc_init" not in ip
    assert {k for k in ib if ib[k] != ip.get(k)} == {"recipe", "augment", "drop_last", "fc_init"}
    with pytest.raises(UserError, match="smaller than one batch"):
        resolve_config(_fake_cifar10_lt(300), recipe="balms")


def test_fc_init_default_redraws_only_the_final_layer():
    from pipeline.stage1.models import create_model
    torch.manual_seed(0)
    ldam = create_model("resnet32", 10)
    torch.manual_seed(0)
    default = create_model("resnet32", 10, fc_init="default")
    assert torch.equal(ldam.conv1.weight, default.conv1.weight)  # the backbone's init is untouched
    assert ldam.fc.weight.abs().max() > 1 / 8
    assert ldam.fc.weight.std().item() == pytest.approx(math.sqrt(2 / 64), rel=0.15)  # kaiming normal
    # nn.Linear's default: kaiming-uniform a=sqrt(5), U(-1/sqrt(64), 1/sqrt(64)), std 1/sqrt(3*64)
    assert default.fc.weight.abs().max() <= 1 / 8
    assert default.fc.weight.std().item() == pytest.approx(1 / math.sqrt(3 * 64), rel=0.15)


def test_balms_recipe_trains_whole_batches_only(tmp_path, monkeypatch):
    """26 images at batch 8: `paper` takes 4 steps an epoch (8, 8, 8, 2), `balms` 3 (the partial batch
    skipped, as BALMS's loop stops at int(N / batch)); and `balms` builds its model with fc_init default."""
    import pipeline.stage1.train as tr
    ds = tiny_dataset(per_class=(12, 8, 4, 2))
    steps, inits = [], []
    real_step, real_create = tr.train_step, tr.create_model
    monkeypatch.setattr(tr, "train_step", lambda m, o, x, *a, **k: steps.append(len(x)) or real_step(m, o, x, *a, **k))
    monkeypatch.setattr(tr, "create_model", lambda *a: inits.append(a[2:]) or real_create(*a))
    for recipe in ("paper", "balms"):
        steps.clear()
        cfg = resolve_config(ds, recipe=recipe, epochs=2, batch_size=8, warmup_epochs=1, precision="fp32")
        train(ds, cfg, tmp_path / recipe, "cpu", deterministic=True, log=lambda *a: None)
        assert steps == ([8, 8, 8, 2] * 2 if recipe == "paper" else [8, 8, 8] * 2), recipe
    assert inits == [(None,), ("default",)]


def test_report_names_every_way_a_balms_run_differs_from_paper():
    """The report lists a `balms` cache's departures from `paper`, including the keys `paper` does not have."""
    from types import SimpleNamespace
    from pipeline.report.runs import CacheInfo
    ds = _fake_cifar10_lt()

    def info(recipe):
        prov = dict(config=resolve_config(ds, recipe=recipe, precision="fp32"))
        return CacheInfo(dir=None, rel="", run=recipe, cache=SimpleNamespace(provenance=prov), dataset="cifar10-lt",
                         imbalance=100.0, seed=0, epochs=520, group_key="")
    assert info("paper").recipe_deviations() == []
    assert info("balms").recipe_deviations() == [
        "recipe balms (paper: paper)", "augment cifar-autoaug-balms (paper: cifar-autoaug)",
        "drop_last True (paper: None)", "fc_init default (paper: None)"]
