"""The fits of a report from one Python start (pipeline.report.fitplan, `pipeline report --fit`, run_all.sh's
default): the same results rows as one `pipeline fit-head` per fit, with one Python start instead of one
per fit."""
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from pipeline import report as rp
from pipeline.cli import cli
from pipeline.synthetic import make_synthetic_cache
from tests.test_report import REPO

KEY = ["fit_id", "head", "variant", "tau", "hparams", "acc_all", "acc_many", "acc_medium", "acc_few", "artifact"]


def _cache(root, with_val=True, bn=True):
    d = Path(root) / "cifar10-lt-b100-synthetic-s0"
    d.mkdir(parents=True)
    make_synthetic_cache(d / "features.h5", dataset="cifar10-lt", num_classes=6, dim=6, imbalance=100.0,
                         n_max=120, n_test=12, seed=0, bn_recal=bn, with_val=with_val)
    return d


@pytest.mark.parametrize("workers", [1, 3])
def test_the_plan_equals_one_fit_head_per_fit(tmp_path, workers):
    """In this process or in forked workers (3: more than CI's cores), the rows are those of one
    `pipeline fit-head` per fit, bit for bit and in plan order."""
    a = _cache(tmp_path / "a")
    b = tmp_path / "b" / a.name
    shutil.copytree(a, b)
    wanted = {("ncm", "plain", 0.0), ("learned-ncm", "plain", 0.125), ("tau-norm", "plain", 0.0),
              ("metric-ncm", "plain", 0.0), ("multi-ncm", "bn_recal", 0.0), ("posthoc-la", "plain", 1.0),
              ("multi-ncm", "plain", 0.125)}  # a group of two: learned-ncm and multi-ncm at tau 1/8
    jobs = [j for j in rp.fit_plan(str(tmp_path / "a")) if (j.spec.head, j.spec.variant, j.spec.tau) in wanted]
    # metric-ncm: global, local; ncm, learned-ncm and multi-ncm at tau 1/8 also on the test split
    assert {j.spec.head for j in jobs} == {h for h, _, _ in wanted} and len(jobs) == 8 + 3
    assert ["--head", "learned-ncm", "--tau", "0.125", "--fit-split", "test"] in [j.args() for j in jobs]
    assert ["--head", "tau-norm", "--p", "auto"] in [j.args() for j in jobs]
    lines = []
    rows = rp.run_plan(jobs, echo=lines.append, workers=workers)
    assert len(rows) == len(jobs) and lines[-1].startswith(f"==> {len(jobs)} fits in")
    assert lines[-1].endswith(" in 3 processes") == (workers == 3)
    assert [ln for ln in lines if ln.startswith("==> fit ")] == [f"==> fit {i}/{len(jobs)}: {j.label()}"
                                                              for i, j in enumerate(jobs, 1)]
    for j in jobs:  # the same fits through the CLI, one invocation each
        r = CliRunner().invoke(cli, ["fit-head", "--cache", str(b), *j.args()])
        assert r.exit_code == 0, r.output
    ra = pd.read_csv(a / "results.csv", dtype=str, keep_default_na=False)[KEY]
    rb = pd.read_csv(b / "results.csv", dtype=str, keep_default_na=False)[KEY]
    pd.testing.assert_frame_equal(ra, rb)
    assert "p_select" in ra.loc[ra["head"] == "tau-norm", "hparams"].iloc[0]  # p chosen on val, as --p auto


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_fit_is_named_and_the_earlier_rows_are_kept(tmp_path, workers):
    d = _cache(tmp_path, bn=False)
    ok = rp.FitJob(str(d), rp.fit_plan(str(tmp_path), quick=True)[0].spec)
    bad = rp.FitJob(str(d), rp.paper.H("learned-ncm", variant="bn_recal"))
    with pytest.raises(rp.UserError, match=r"fit 2 of 2 failed \(cifar10-lt-b100-synthetic-s0 --head learned-ncm "
                                           r"--variant bn_recal\)"):
        rp.run_plan([ok, bad], echo=lambda *_: None, workers=workers)
    assert len(pd.read_csv(d / "results.csv")) == 1


def _counting_python(tmp_path):
    """A `python` that logs each start, then runs the real interpreter."""
    log = tmp_path / "starts.log"
    py = tmp_path / "python"
    py.write_text(f'#!/bin/sh\necho "$*" >> "{log}"\nexec "{sys.executable}" "$@"\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return py, log


@pytest.mark.slow
def test_run_all_starts_python_once_for_all_the_fits(tmp_path):
    """run_all.sh used to start Python (and import torch) once per fit: 19 starts on the shipped cache."""
    py, log = _counting_python(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("PYTHON", None)
    out = {}
    for mode in ("default", "per-fit"):
        root = tmp_path / mode / "cache"
        _cache(root, with_val=False)
        log.write_text("")
        cmd = ["bash", str(REPO / "run_all.sh"), "--quick", "--no-figures", "--python", str(py),
               "--cache-root", str(root), "--out", str(tmp_path / mode / "rep")]
        if mode == "per-fit":
            cmd.append("--per-fit-processes")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        starts = [line for line in log.read_text().splitlines() if "pipeline.cli" in line]
        out[mode] = (starts, _tables(tmp_path / mode / "rep"), pd.read_csv(root / "cifar10-lt-b100-synthetic-s0" /
                                                                            "results.csv", dtype=str)[KEY])
    assert len(out["default"][0]) == 1 and "report --fit --quick" in out["default"][0][0]
    assert len(out["per-fit"][0]) == 1 + 3 + 1  # --list-fits, three fit-head, report
    pd.testing.assert_frame_equal(out["default"][2], out["per-fit"][2])  # the same fits either way
    # the tables differ only in the cache root written into the commands
    for name, text in out["default"][1].items():
        assert text.replace(str(tmp_path / "default"), "R") == out["per-fit"][1][name].replace(
            str(tmp_path / "per-fit"), "R"), name


def _tables(rep):
    return {p.name: p.read_text() for p in sorted(Path(rep).glob("table*.csv"))}


def test_job_groups_keep_multi_ncm_with_its_learned_ncm(tmp_path):
    """A worker's fit_head memo only helps a multi-ncm fit if its learned-ncm fit (same cache, variant and tau)
    ran in the same process."""
    jobs = rp.fit_plan(str(_cache(tmp_path).parent))
    groups = rp.fitplan.job_groups(jobs)
    assert sorted(i for g in groups for i in g) == list(range(len(jobs)))
    for g in groups:
        heads = {jobs[i].spec.head for i in g}
        assert len(g) == 1 or heads <= {"learned-ncm", "multi-ncm"}
        assert len({(jobs[i].spec.variant, jobs[i].spec.tau) for i in g}) == 1
    multi = [i for i, j in enumerate(jobs) if j.spec.head == "multi-ncm"]
    assert multi and all(len(next(g for g in groups if i in g)) == 2 for i in multi)


def test_with_a_gpu_the_plan_runs_in_this_process(tmp_path, monkeypatch):
    """A CUDA fit cannot run in a process forked after CUDA was touched: workers are asked for, none forked."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    d = _cache(tmp_path, bn=False)
    jobs = [rp.FitJob(str(d), s.spec) for s in rp.fit_plan(str(tmp_path), quick=True)][:2]
    jobs = [rp.FitJob(j.cache_dir, j.spec, (("device", "cpu"),)) for j in jobs]  # no GPU here after all
    assert rp.fitplan.default_workers(jobs) == 1
    lines = []
    rows = rp.run_plan(jobs, echo=lines.append, workers=3)
    assert lines[0] == "note: fitting in this process, not 3 workers (they need Linux and no GPU)"
    assert len(rows) == 2 and not lines[-1].endswith("processes")


_DIE_ON = {}


def _dying_group(group):
    """run_plan's worker task, except that a worker given _DIE_ON's fit exits at once (module level: the
    executor pickles the task by name)."""
    if group[0].spec == _DIE_ON["spec"]:
        os._exit(9)
    return _REAL_FIT_GROUP(group)


_REAL_FIT_GROUP = rp.fitplan._fit_group


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path, monkeypatch):
    """A worker killed mid-fit (the OOM killer) sends nothing back: the plan stops with one line saying what
    to do instead of waiting for it forever; the rows that came back before it are kept."""
    d = _cache(tmp_path, bn=False)
    jobs = rp.fit_plan(str(tmp_path), quick=True)[:3]
    monkeypatch.setitem(_DIE_ON, "spec", jobs[1].spec)
    monkeypatch.setattr(rp.fitplan, "_fit_group", _dying_group)  # inherited by the forked workers
    with pytest.raises(rp.UserError, match=r"a fit worker process died before fit [12] of 3 came back .*; rerun "
                                           r"with workers=1"):
        rp.run_plan(jobs, echo=lambda *_: None, workers=2)
    kept = pd.read_csv(d / "results.csv") if (d / "results.csv").exists() else []
    assert len(kept) <= 1  # at most fit 1, the one before the worker died
