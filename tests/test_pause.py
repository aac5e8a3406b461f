"""Time-limited, signal-safe stage 1: pause at an epoch end, resume to the same weights, distinct exit statuses."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.stage1.pause import EXIT_PAUSED, PauseControl, RunPaused, parse_duration
from pipeline.stage1.plan import resolve_config
from pipeline.stage1.train import train
from pipeline.utils import UserError

from .conftest import tiny_dataset, write_cifar_python

QUIET = dict(log=lambda *a: None)


def _cfg(ds, epochs=4, **kw):
    return resolve_config(ds, epochs=epochs, batch_size=8, warmup_epochs=1, precision="fp32", seed=3, **kw)


def test_parse_duration():
    assert parse_duration("2h30m") == 9000 and parse_duration("90m") == 5400 and parse_duration("45s") == 45
    assert parse_duration("1h5m10s") == 3910 and parse_duration("600") == 600
    for bad in ("", "abc", "2h30", "0", "-5m", "5x", "m"):
        with pytest.raises(UserError, match="a duration must"):
            parse_duration(bad)


def test_signal_pause_then_resume_matches_uninterrupted(tmp_path):
    """A pause signal during epoch 2 loses nothing of it: the run stops after epoch 2 with its checkpoint,
    and resuming to the end gives the same weights as a run never paused (--deterministic)."""
    ds = tiny_dataset()
    cfg = _cfg(ds)
    full, _ = train(ds, cfg, tmp_path / "a", "cpu", deterministic=True, **QUIET)

    pause = PauseControl()
    lines = []

    def log(msg):  # a real signal to this process while epoch 2 is being logged
        lines.append(msg)
        if msg.startswith("epoch   2/"):
            os.kill(os.getpid(), signal.SIGUSR1)

    with pause, pytest.raises(RunPaused) as info:
        train(ds, _cfg(ds), tmp_path / "b", "cpu", deterministic=True, log=log, pause=pause)
    assert info.value.epoch == 2 and info.value.reason == "SIGUSR1"
    assert "paused at epoch 2/4" in str(info.value) and "re-run the same command" in str(info.value)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["epoch"] == 2
    assert signal.getsignal(signal.SIGUSR1) is not pause._handler  # handlers restored after the run

    resumed, rows = train(ds, _cfg(ds), tmp_path / "b", "cpu", deterministic=True, **QUIET)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    sa, sb = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_time_limit_pauses_before_an_epoch_that_would_not_fit(tmp_path):
    ds = tiny_dataset()
    # a limit already spent: the first epoch of a fresh run has no estimate and runs; then it pauses
    pause = PauseControl(limit=1e-3)
    with pytest.raises(RunPaused) as info:
        train(ds, _cfg(ds), tmp_path, "cpu", pause=pause, **QUIET)
    assert info.value.epoch == 1 and info.value.reason == "time limit"
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 1
    # a generous limit lets the run finish
    model, rows = train(ds, _cfg(ds), tmp_path, "cpu", pause=PauseControl(limit=3600), **QUIET)
    assert model is not None and len(rows) == 4


def test_time_limit_estimate_uses_measured_epochs():
    pause = PauseControl(limit=100.0, start=0.0)
    pause.elapsed = lambda: 50.0
    assert pause.reason(None) is None                  # unknown: the epoch runs
    assert pause.reason(30.0) is None                  # 50 + 1.15 * 30 + 5 = 89.5 <= 100
    assert pause.reason(40.0) == "time limit"          # 50 + 46 + 5 > 100
    assert PauseControl().reason(1e9) is None          # no limit
    pause.signalled = "SIGTERM"
    assert pause.reason(None) == "SIGTERM"


def test_precision_change_on_resume_is_refused_then_recorded(tmp_path):
    ds = tiny_dataset()
    cfg16 = _cfg(ds)
    cfg16["precision"] = "bf16"
    train(ds, cfg16, tmp_path, "cpu", stop_after=1, **QUIET)
    with pytest.raises(UserError, match="allow_precision_change=True"):
        train(ds, _cfg(ds), tmp_path, "cpu", **QUIET)
    cfg = _cfg(ds)
    model, rows = train(ds, cfg, tmp_path, "cpu", allow_precision_change=True, **QUIET)
    assert model is not None and len(rows) == 4
    # the identity keeps the precision the run started in; the segments say what trained when
    assert cfg["precision"] == "bf16" and cfg["precision_segments"] == [[0, "bf16"], [1, "fp32"]]
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["identity"]["precision"] == "bf16" and ck["precision_segments"] == [[0, "bf16"], [1, "fp32"]]


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], **kw)


@pytest.mark.slow
def test_cli_exit_statuses_are_distinct(tmp_path):
    """0 finished, 2 error, 3 paused: a script (or run_all.sh) can tell them apart."""
    write_cifar_python(tmp_path / "data", "cifar10", per_class_train=12, per_class_test=2)
    base = ["extract", "--dataset", "cifar10-lt", "--data-root", str(tmp_path / "data"), "--imbalance", "2",
            "--epochs", "3", "--batch-size", "16", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    paused = _cli(base + ["--time-limit", "0.001"])
    assert paused.returncode == EXIT_PAUSED, paused.stdout + paused.stderr
    assert "paused at epoch 1/3" in paused.stdout and "Traceback" not in paused.stderr
    bad = _cli(base + ["--time-limit", "soon"])
    assert bad.returncode == 2 and bad.stderr.strip().startswith("Error: --time-limit")
    done = _cli(base + ["--time-limit", "1h"])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout and (tmp_path / "c" / "cifar10-lt-b2-resnet32-paper-s0" / "features.h5").exists()


def test_second_sigint_aborts_at_once():
    pause = PauseControl(log=lambda *a: None)
    pause._handler(signal.SIGTERM, None)
    assert pause.reason(None) == "SIGTERM"
    pause._handler(signal.SIGINT, None)  # the first Ctrl-C asks for a pause (the first reason is kept)
    assert pause.reason(None) == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
        pause._handler(signal.SIGINT, None)


def test_progress_lines_when_no_terminal(tmp_path, monkeypatch):
    """Under nohup/sbatch (stderr not a terminal) a line reports the epoch's progress every PROGRESS_SECONDS."""
    import pipeline.stage1.train as tr
    monkeypatch.setattr(tr, "PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(tr.sys.stderr, "isatty", lambda: False, raising=False)
    ds = tiny_dataset()
    lines = []
    train(ds, _cfg(ds, epochs=1), tmp_path, "cpu", log=lines.append)
    prog = [s for s in lines if "iteration" in s and "left in this epoch" in s]
    assert prog and prog[0].startswith("  epoch 1/1: iteration 1/")


def test_budget_warning_when_warmup_takes_the_budget():
    from pipeline.stage1.plan import budget_warning
    ds = tiny_dataset()
    assert budget_warning(resolve_config(ds, epochs=20, batch_size=8, warmup_epochs=20, precision="fp32")) is not None
    assert budget_warning(resolve_config(ds, epochs=21, batch_size=8, warmup_epochs=20, precision="fp32")) is None
    # the paper recipe's warm-up is 800 iterations: a 20-epoch run of it never reaches the peak
    assert "never reaches its peak" in budget_warning(resolve_config(ds, epochs=20, precision="fp32"))
