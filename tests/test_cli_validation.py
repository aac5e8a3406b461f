"""Every stage-1 / stage-2 flag is checked before any work: one 'Error' line, status 2, nothing written."""
import pytest
from click.testing import CliRunner

from pipeline.cli import cli

from .conftest import write_cifar_python

BAD_EXTRACT = [
    (["--lr", "-1"], "--lr"), (["--lr", "0"], "--lr"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--iterations", "0"], "--iterations"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "1"], "--batch-size"),
    (["--warmup-epochs", "-3"], "--warmup-epochs"), (["--eval-every", "0"], "--eval-every"),
    (["--train-limit", "0"], "--train-limit"), (["--subset-seed", "-1"], "--subset-seed"),
    (["--seed", "-2"], "--seed"), (["--imbalance", "0.5"], "--imbalance"),
    (["--run-name", "../escape"], "--run-name"), (["--run-name", "a/b"], "--run-name"),
    (["--run-name", ".."], "--run-name"), (["--time-limit", "soon"], "--time-limit"),
]


@pytest.mark.parametrize("args,flag", BAD_EXTRACT, ids=[" ".join(a) for a, _ in BAD_EXTRACT])
def test_extract_refuses_bad_flags_before_any_work(tmp_path, args, flag):
    write_cifar_python(tmp_path / "data", "cifar10", per_class_train=4, per_class_test=1)
    cache = tmp_path / "cache"
    r = CliRunner().invoke(cli, ["extract", "--dataset", "cifar10-lt", "--data-root", str(tmp_path / "data"),
                                 "--epochs", "1", "--device", "cpu", "--cache-dir", str(cache), *args])
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and flag in errors[0] and "Traceback" not in r.output, r.output
    assert not cache.exists() or not any(cache.rglob("*")), "a refused command wrote files"
    assert not (tmp_path / "escape").exists()


BAD_FIT = [(["--tau", "-0.5"], "--tau"), (["--epochs", "0"], "--epochs"), (["--lr", "0"], "--lr"),
           (["--batch-size", "0"], "--batch-size"), (["--num-centroids", "0"], "--num-centroids")]


@pytest.mark.parametrize("args,flag", BAD_FIT, ids=[" ".join(a) for a, _ in BAD_FIT])
def test_fit_head_refuses_bad_flags(tmp_path, args, flag):
    r = CliRunner().invoke(cli, ["fit-head", "--cache", str(tmp_path / "nothing-here"), "--head", "ncm", *args])
    assert r.exit_code == 2
    errors = [line for line in r.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and flag in errors[0], r.output
