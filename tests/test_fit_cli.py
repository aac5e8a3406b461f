"""`pipeline fit-head` and the results.csv / artifact contract (pipeline.stage2.fit)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cache import read_cache, write_cache
from pipeline.cli import cli
from pipeline.config import RESULT_COLUMNS
from pipeline.stage2.fit import fit_head, record_fit
from pipeline.stage2.heads import HEADS
from pipeline.stage2.heads.bf16 import resolve_matmul
from pipeline.synthetic import make_synthetic_cache, synthetic_features
from pipeline.utils import UserError

EXPECTED_COLUMNS = ["fit_id", "timestamp", "head", "variant", "tau", "seed", "hparams", "cache_path",
                    "cache_fingerprint", "dataset", "imbalance", "backbone", "train_seed", "stage1_epochs",
                    "acc_all", "acc_many", "acc_medium", "acc_few", "fit_seconds", "device", "git_commit",
                    "artifact"]
FAST = ["--epochs", "2", "--device", "cpu"]  # quick trained heads; --epochs is ignored (with a note) by the others

# what each head's artifact must hold besides per_class_acc and train_counts
ARTIFACT_KEYS = {
    "softmax": set(),
    "ncm": {"centroids", "empirical_centroids"},
    "learned-ncm": {"centroids", "empirical_centroids", "cdnv_per_epoch", "loss_per_epoch"},
    "multi-ncm": {"centroids", "empirical_centroids", "displacements", "loss_per_epoch"},
    "local-projection": {"local_weights", "loss_per_epoch"},
    "metric-ncm": {"centroids", "empirical_centroids", "loss_per_epoch"},
    "crt": {"weight", "bias", "loss_per_epoch"},
    "tau-norm": {"weight"},
    "lws": {"weight", "bias", "scales", "loss_per_epoch"},
    "posthoc-la": set(),
}


def run(*args):
    return CliRunner().invoke(cli, ["fit-head", *map(str, args)])


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "synthetic-b100-s0"
    d.mkdir()
    make_synthetic_cache(d / "features.h5", num_classes=8, dim=6, n_max=200, n_test=10, with_val=True)
    return d


def test_every_head_appends_a_row_with_its_artifact(cache_dir):
    assert set(ARTIFACT_KEYS) == set(HEADS), "a new head needs its artifact keys listed here"
    results = cache_dir / "results.csv"
    for i, head in enumerate(sorted(HEADS)):
        before = results.read_bytes() if results.exists() else b""
        r = run("--cache", cache_dir, "--head", head, *FAST)
        assert r.exit_code == 0, r.output
        assert f"head {head}" in r.stdout and "Many " in r.stdout and " / Few " in r.stdout
        assert "on cpu" in r.stdout
        with open(results, newline="") as f:
            assert next(csv.reader(f)) == EXPECTED_COLUMNS
        assert results.read_bytes().startswith(before or b"fit_id,")  # earlier rows untouched
        rs = rows(results)
        assert len(rs) == i + 1
        row = rs[-1]
        assert row["head"] == head and row["variant"] == "plain" and row["seed"] == "0"
        assert row["dataset"] == "synthetic-lt" and row["backbone"] == "synthetic"
        assert float(row["imbalance"]) == 100 and row["train_seed"] == "0" and row["stage1_epochs"] == "3"
        assert row["cache_fingerprint"] == read_cache(cache_dir).fingerprint
        assert row["artifact"] == f"fits/{row['fit_id']}.npz"
        hp = json.loads(row["hparams"])
        assert list(hp) == sorted(hp) and hp["eval_split"] == "test"
        assert not {"tau", "seed", "variant"} & set(hp)
        if "epochs" in HEADS[head].defaults:
            assert hp["epochs"] == 2
        else:
            assert "epochs" not in hp and "does not use --epochs" in r.stderr
        for m in ("all", "many", "medium", "few"):
            assert 0 <= float(row[f"acc_{m}"]) <= 100
        z = np.load(cache_dir / row["artifact"])
        assert {"per_class_acc", "train_counts"} | ARTIFACT_KEYS[head] <= set(z.files), head
        assert len(z["per_class_acc"]) == 8
    assert len({r["fit_id"] for r in rows(results)}) == len(HEADS)


def test_row_values_and_options(cache_dir, tmp_path):
    out = tmp_path / "elsewhere" / "res.csv"
    r = run("--cache", cache_dir / "features.h5", "--head", "multi-ncm", "--tau", "0.125", "--seed", "3",
            "--num-centroids", "4", "--epochs", "2", "--batch-size", "64", "--lr", "2.5", "--eval-split", "val",
            "--results", out, "--device", "cpu")
    assert r.exit_code == 0, r.output
    (row,) = rows(out)
    assert not (cache_dir / "results.csv").exists()
    assert float(row["tau"]) == 0.125 and row["seed"] == "3" and row["device"] == "cpu"
    assert json.loads(row["hparams"]) == dict(batch_size=64, clip=0.1, epochs=2, eval_split="val", lr=2.5,
                                              momentum=0.9, num_centroids=4, cpu_threads=1,  # the default
                                              matmul=resolve_matmul("auto", "cpu"))  # the GEMM precision used
    z = np.load(cache_dir / row["artifact"])  # artifacts stay next to the cache
    assert z["displacements"].shape == (4, 6) and z["cdnv_per_epoch"].shape == (3,)

    r = run("--cache", cache_dir, "--head", "learned-ncm", "--epochs", "1", "--threads", "2", "--results", out)
    assert r.exit_code == 0 and json.loads(rows(out)[-1]["hparams"])["cpu_threads"] == 2, r.output
    r = run("--cache", cache_dir, "--head", "learned-ncm", "--threads", "0", "--results", out)
    assert r.exit_code == 2 and "--threads" in r.output and len(rows(out)) == 2
    r = run("--cache", cache_dir, "--head", "posthoc-la", "--results", out)
    assert r.exit_code == 0 and float(rows(out)[-1]["tau"]) == 1.0  # this head's default tau
    r = run("--cache", cache_dir, "--head", "ncm", "--cl2n", "--results", out)
    assert r.exit_code == 0 and json.loads(rows(out)[-1]["hparams"])["cl2n"] is True
    r = run("--cache", cache_dir, "--head", "tau-norm", "--p", "0.5", "--results", out)
    assert r.exit_code == 0 and json.loads(rows(out)[-1]["hparams"])["p"] == 0.5
    r = run("--cache", cache_dir, "--head", "tau-norm", "--p", "auto", "--results", out)
    hp = json.loads(rows(out)[-1]["hparams"])
    assert r.exit_code == 0 and hp["p_select"] == "val" and 0 <= hp["p"] <= 2, r.output
    assert f"p {hp['p']:g} (chosen on val)" in r.stdout
    r = run("--cache", cache_dir, "--head", "metric-ncm", "--distance", "euclidean", "--epochs", "1",
            "--results", out)
    assert r.exit_code == 0 and json.loads(rows(out)[-1]["hparams"])["distance"] == "euclidean"
    r = run("--cache", cache_dir, "--head", "lws", "--results", out)
    assert r.exit_code == 0 and json.loads(rows(out)[-1]["hparams"])["epochs"] == 5  # Decoupling's LWS
    r = run("--cache", cache_dir, "--head", "learned-ncm", "--variant", "bn_recal", "--epochs", "1",
            "--results", out)
    assert r.exit_code == 0 and rows(out)[-1]["variant"] == "bn_recal"


def test_empty_group_is_nan_not_zero(tmp_path):
    # imbalance 5 with n_max 200: smallest class has 40 images -> no Few class
    make_synthetic_cache(tmp_path / "features.h5", num_classes=6, dim=4, n_max=200, imbalance=5, n_test=10)
    r = run("--cache", tmp_path, "--head", "ncm")
    assert r.exit_code == 0, r.output
    assert "Few n/a" in r.stdout
    row = rows(tmp_path / "results.csv")[0]
    assert row["acc_few"] == "" and row["acc_all"] != ""


# ----------------------------------------------------------------------------------------------------
# Bad input: one-line error, non-zero exit, no traceback, nothing recorded

def _nan_cache(path):
    tx, ty, vx, vy, counts, means, _ = synthetic_features(num_classes=5, dim=4, n_max=100, n_test=5)
    vx[3, 1] = np.nan
    return write_cache(path, provenance=dict(dataset="x", imbalance=100.0, backbone="b", seed=0, epochs=1),
                       class_names=list("abcde"), train_counts=counts, classifier_weight=means,
                       classifier_bias=np.zeros(5), features={"plain": {"train": (tx, ty), "test": (vx, vy)}})


def _foreign_h5(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.arange(10))
    return path


BAD = {
    "unknown head": (lambda d: d, ["--head", "bogus"], "bogus"),
    "missing cache": (lambda d: d / "nope", ["--head", "ncm"], "no feature cache"),
    "foreign h5": (lambda d: _foreign_h5(d / "other.h5"), ["--head", "ncm"], "not a feature cache"),
    "not hdf5": (lambda d: (d / "notes.h5").write_text("hi") and d / "notes.h5", ["--head", "ncm"],
                 "not an HDF5"),
    "negative tau": (lambda d: d, ["--head", "learned-ncm", "--tau", "-0.5"], "--tau"),
    "tau on a head without tau": (lambda d: d, ["--head", "ncm", "--tau", "0.5"], "got --tau 0.5"),
    "nan features": (lambda d: _nan_cache(d / "nan" / "features.h5"), ["--head", "ncm"], "NaN"),
    "missing split": (lambda d: d, ["--head", "ncm", "--eval-split", "val"], "no 'val' split"),
    "missing variant": (lambda d: d, ["--head", "ncm", "--variant", "bn_recal"], "no 'bn_recal'"),
    "bad epochs": (lambda d: d, ["--head", "learned-ncm", "--epochs", "0"], "--epochs"),
    "cuda absent": (lambda d: d, ["--head", "ncm", "--device", "cuda"], "cuda"),
    "bad device": (lambda d: d, ["--head", "ncm", "--device", "gpu0"], "--device"),
    "p auto without val": (lambda d: d, ["--head", "tau-norm", "--p", "auto"], "no 'val' split"),
    "bad p": (lambda d: d, ["--head", "tau-norm", "--p", "-1"], "--p"),
    "bad distance": (lambda d: d, ["--head", "metric-ncm", "--distance", "cosine"], "--distance"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_error_and_writes_nothing(tmp_path, case):
    if case == "cuda absent":
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    d = tmp_path / "run"
    (d / "nan").mkdir(parents=True)
    make_synthetic_cache(d / "features.h5", num_classes=5, dim=4, n_max=100, n_test=5, bn_recal=False)
    make_target, args, needle = BAD[case]
    target = make_target(d)
    r = run("--cache", target, *args)
    assert r.exit_code != 0
    assert "Traceback" not in r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and needle.lower() in errors[0].lower(), r.output
    assert not list(tmp_path.rglob("results.csv")) and not list(tmp_path.rglob("*.npz"))


def test_refuses_to_append_to_a_foreign_csv(cache_dir):
    foreign = cache_dir / "results.csv"
    foreign.write_text("a,b\n1,2\n")
    r = run("--cache", cache_dir, "--head", "ncm")
    assert r.exit_code == 2 and "columns differ" in r.output
    assert foreign.read_text() == "a,b\n1,2\n"
    assert not list((cache_dir / "fits").glob("*.npz"))  # no orphan artifact


def test_api_validates_before_fitting(cache_dir):
    c = read_cache(cache_dir)
    with pytest.raises(UserError, match="unknown hyperparameter"):
        fit_head(c, "learned-ncm", epoch=3)
    with pytest.raises(UserError, match="unknown head"):
        fit_head(c, "nope")
    with pytest.raises(UserError, match="metric must be one of"):
        fit_head(c, "metric-ncm", metric="diagonal")
    res = fit_head(c, "ncm", device="cpu")
    row = record_fit(c, res)
    assert tuple(row) == RESULT_COLUMNS == tuple(EXPECTED_COLUMNS)


def test_fit_id_is_derived_from_the_content(cache_dir):
    """The same fit twice: the same fit_id (and artifact); another seed or option: another id."""
    ids = []
    for args in (["--seed", "1"], ["--seed", "1"], ["--seed", "2"], ["--seed", "1", "--lr", "2"]):
        r = run("--cache", cache_dir, "--head", "learned-ncm", "--epochs", "1", "--device", "cpu", *args)
        assert r.exit_code == 0, r.output
        ids.append(rows(cache_dir / "results.csv")[-1]["fit_id"])
    assert ids[0] == ids[1] and len(set(ids)) == 3 and ids[0].startswith("learned-ncm-")
    assert len(list((cache_dir / "fits").glob("*.npz"))) == 3


def test_help_is_fast_and_imports_no_torch():
    repo = Path(__file__).resolve().parents[1]
    code = ("import sys, time; t = time.perf_counter(); from pipeline.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NOTORCH', time.perf_counter() - t)")
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo,
                       env={"PYTHONPATH": str(repo), "PATH": ""})
    wall = time.perf_counter() - t
    assert r.returncode == 0, r.stderr
    assert "fit-head" in r.stdout and "NOTORCH" in r.stdout, r.stdout[-300:]
    assert wall < 3.0  # under 1 s on an idle machine; the margin is for a loaded CI runner


def test_device_is_validated_the_same_way_by_every_command(tmp_path):
    for cmd in (["extract", "--dataset", "cifar10-lt", "--data-root", str(tmp_path)],
                ["fit-head", "--cache", str(tmp_path), "--head", "ncm"]):
        r = CliRunner().invoke(cli, [*cmd, "--device", "cuda:x"])
        assert r.exit_code == 2 and "must be auto, cpu, cuda or cuda:N" in r.output, r.output
