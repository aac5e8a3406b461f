"""Stage 2 fitted on the test images (``fit_head(fit_split="test")``, `pipeline fit-head --fit-split test`): what
BALMS's CIFAR code hands a second stage as ``train_plain``.  Checked against direct computations: which
features a head learns from, which class counts it keeps (the training set's: the prior of +LA), how the fit
is recorded, and how the report keeps these fits out of the paper's tables and shows them beside the cells."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline import report as rp
from pipeline.cache import read_cache
from pipeline.cli import cli
from pipeline.stage2.fit import fit_head as _fit_head
from pipeline.stage2.fit import fit_id
from pipeline.stage2.heads import HEADS, HeadData
from pipeline.synthetic import make_synthetic_cache
from pipeline.utils import UserError, cpu_threads, fp32_matmul
from tests.test_report import _paper_like_cache, write_fit


def fit_head(*args, **kw):
    return _fit_head(*args, **{"device": "cpu", **kw})


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # 60 test images per class against 500..5 training images: the test split's counts are not N_y
    return read_cache(make_synthetic_cache(tmp_path_factory.mktemp("c") / "features.h5", num_classes=6, dim=5,
                                           n_max=500, imbalance=100.0, n_test=60, tail_spread=3.0, bn_recal=False))


def _class_means(x, y, C):
    x = x.astype(np.float64)
    return np.stack([x[y == k].mean(0) for k in range(C)])


def test_ncm_on_the_test_split_takes_the_test_class_means(cache):
    tx, ty = cache.split("train")
    ex, ey = cache.split("test")
    C = cache.num_classes
    res = fit_head(cache, "ncm", fit_split="test")
    np.testing.assert_allclose(res.params["centroids"], _class_means(ex, ey, C), rtol=1e-5, atol=1e-5)
    # the direct rule on those means, evaluated on the same test images
    d = ((ex[:, None, :].astype(np.float64) - _class_means(ex, ey, C)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(res.pred, d.argmin(1))
    own = fit_head(cache, "ncm")
    np.testing.assert_allclose(own.params["centroids"], _class_means(tx, ty, C), rtol=1e-5, atol=1e-5)
    assert not np.allclose(own.params["centroids"], res.params["centroids"], atol=1e-3)


def test_cl2n_ncm_on_the_test_split_averages_over_the_test_images(cache):
    ex, ey = cache.split("test")
    res = fit_head(cache, "ncm", fit_split="test", cl2n=True)
    x = ex.astype(np.float64) - ex.astype(np.float64).mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(res.params["centroids"], _class_means(x, ey, cache.num_classes), atol=1e-5)


def test_learned_ncm_on_the_test_split_keeps_the_training_counts_as_its_prior(cache):
    """Bit for bit the head run directly on the test features with N_y of the training set; with the test
    split's own (balanced) counts the +LA fit would be another one."""
    ex, ey = cache.split("test")
    res = fit_head(cache, "learned-ncm", tau=0.125, epochs=3, fit_split="test")

    def direct(counts):
        t = torch.as_tensor
        data = HeadData(t(ex), t(ey), t(ex), t(np.asarray(counts, np.float32)), t(cache.classifier_weight),
                        t(cache.classifier_bias), seed=0)
        hp = {**HEADS["learned-ncm"].defaults, "epochs": 3}
        with cpu_threads(1), fp32_matmul():
            return HEADS["learned-ncm"].fn(data, hp, 0.125)

    ref = direct(cache.train_counts)
    np.testing.assert_array_equal(res.params["centroids"], ref.params["centroids"])
    np.testing.assert_array_equal(res.pred, ref.pred.numpy())
    balanced = direct(np.bincount(ey, minlength=cache.num_classes))
    assert not np.array_equal(res.params["centroids"], balanced.params["centroids"])
    # the groups (Many / Medium / Few) are the training set's: the same as a fit on train
    assert res.acc.keys() == fit_head(cache, "learned-ncm", epochs=1).acc.keys()
    assert np.array_equal(res.train_counts, cache.train_counts)


def test_fit_split_is_recorded_and_gives_another_fit_id(cache):
    a = fit_head(cache, "learned-ncm", epochs=2)
    b = fit_head(cache, "learned-ncm", epochs=2, fit_split="test")
    assert "fit_split" not in a.hparams  # a fit on train records what it always did: its fit_id is unchanged
    assert b.hparams["fit_split"] == "test"
    assert fit_id(cache.fingerprint, a) != fit_id(cache.fingerprint, b)


def test_the_memo_never_hands_centroids_across_fit_splits(cache):
    memo = {}
    fit_head(cache, "learned-ncm", tau=0.125, epochs=2, memo=memo)  # on train
    a = fit_head(cache, "multi-ncm", tau=0.125, epochs=2, num_centroids=3, memo=memo, fit_split="test")
    b = fit_head(cache, "multi-ncm", tau=0.125, epochs=2, num_centroids=3, fit_split="test")
    for k in b.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)


@pytest.mark.parametrize("head", ["softmax", "tau-norm", "posthoc-la"])
def test_heads_that_do_not_read_features_refuse_another_fit_split(cache, head):
    with pytest.raises(UserError, match="does not fit on features"):
        fit_head(cache, head, fit_split="test")


def test_an_unknown_fit_split_is_refused(cache):
    with pytest.raises(UserError, match="fit_split must be one of"):
        fit_head(cache, "ncm", fit_split="val")


def test_cli_fit_split_says_it_is_a_leak_and_records_it(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    make_synthetic_cache(d / "features.h5", num_classes=4, dim=4, n_max=60, imbalance=10.0, n_test=10,
                         bn_recal=False)
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(d), "--head", "ncm", "--fit-split", "test",
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "fitted on the test split" in r.output and "a leak, not a result" in r.output
    assert '""fit_split"":""test""' in (d / "results.csv").read_text()
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(d), "--head", "softmax", "--fit-split", "test"])
    assert r.exit_code == 2 and "use --fit-split train" in r.output and "Traceback" not in r.output


# ----------------------------------------------------------------------------------------------------
# The report: never a table cell, shown beside the cell it would replace

def test_report_keeps_test_split_fits_out_of_the_tables_and_compares_them(tmp_path):
    root = tmp_path / "cache"
    full = _paper_like_cache(root, 13000, None, beta=200.0, name="full", counts=(150,) * 7 + (30,) * 3)
    # Table 7, CIFAR-10-LT beta=200: NCM 79.7 / 82.2 / 73.8, Learned NCM 80.8 / 82.2 / 77.6
    write_fit(full, "ncm", acc={"all": 59.0, "many": 74.6, "medium": 22.4})
    write_fit(full, "ncm", hparams={"fit_split": "test"}, acc={"all": 79.2, "many": 79.5, "medium": 66.9},
              timestamp="2030-01-01T00:00:00+00:00")  # newer: must still not replace the table cell
    write_fit(full, "learned-ncm", acc={"all": 60.5, "many": 76.0, "medium": 24.3})
    write_fit(full, "learned-ncm", hparams={"fit_split": "test"}, acc={"all": 77.5, "many": 79.4, "medium": 73.2})
    write_fit(full, "learned-ncm", tau=0.125, hparams={"fit_split": "test"}, acc={"all": 78.1})  # no train fit
    res = rp.build_report(str(root), tmp_path / "out", figures=False)
    t7 = res.tables["table7"]
    cell = t7[(t7["method"] == "NCM") & (t7["imbalance"] == "200") & (t7["metric"] == "all")].iloc[0]
    assert cell["ours"] == "59.0"
    readme = (tmp_path / "out" / "README.md").read_text()
    section = readme.split("### Stage 2 fitted on the test images")[1].split("\n## ")[0]
    assert "| `full` | NCM | 59.0 / 79.2 / 79.7 | 74.6 / 79.5 / 82.2 | 22.4 / 66.9 / 73.8 |" in section
    assert "| `full` | Learned NCM | 60.5 / 77.5 / 80.8 | 76.0 / 79.4 / 82.2 | 24.3 / 73.2 / 77.6 |" in section
    assert "Learned NCM + LA" not in section  # only heads fitted both ways
    # |59.0-79.7| + |74.6-82.2| + |22.4-73.8| + |60.5-80.8| + |76.0-82.2| + |24.3-77.6| = 159.5 over 6 cells;
    # fitted on test: 0.5 + 2.7 + 6.9 + 3.3 + 2.8 + 4.4 = 20.6 -> 3.4, one cell within 1 point (79.2 vs 79.7)
    assert ("mean |ours − paper| 26.6 fitted on the training images, 3.4 fitted on the test images; within 1 "
            "point: 0 vs 1.") in section
    heads = res.heads["full"]
    leaks = heads[heads["options"] == "fitted on the test images (a leak)"]
    assert set(leaks["command"]) >= {f"pipeline fit-head --cache {root}/full --head ncm --fit-split test"}
    assert (leaks["paper"] == "").all()  # never beside a paper value


def test_the_plan_fits_the_ncm_family_on_the_test_split_for_balms_cifar_datasets_only(tmp_path):
    for ds in ("cifar10-lt", "cifar20-lt"):
        d = tmp_path / ds / f"{ds}-b100-synthetic-s0"
        d.mkdir(parents=True)
        make_synthetic_cache(d / "features.h5", dataset=ds, num_classes=6, dim=4, n_max=60, imbalance=10.0,
                             n_test=6, bn_recal=False)
    leak = lambda root: [j.args() for j in rp.fit_plan(str(root)) if "--fit-split" in j.args()]  # noqa: E731
    assert leak(tmp_path / "cifar10-lt") == [
        ["--head", "ncm", "--fit-split", "test"], ["--head", "learned-ncm", "--fit-split", "test"],
        ["--head", "learned-ncm", "--tau", "0.125", "--fit-split", "test"],
        ["--head", "multi-ncm", "--fit-split", "test"], ["--head", "multi-ncm", "--tau", "0.125", "--fit-split", "test"]]
    assert leak(tmp_path / "cifar20-lt") == []  # BALMS has no CIFAR-20
    assert not any("--fit-split" in j.args() for j in rp.fit_plan(str(tmp_path / "cifar10-lt"), quick=True))
    jobs = rp.fit_plan(str(tmp_path / "cifar10-lt"))
    for g in rp.fitplan.job_groups(jobs):  # a multi-ncm shares a worker with the learned-ncm of its own split
        assert len({dict(jobs[i].spec.hparams).get("fit_split") for i in g}) == 1
