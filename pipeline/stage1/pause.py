"""Pausing a stage-1 run: a wall-clock limit (`--time-limit`) and signals, both honoured at an epoch end.

A paused run has written its checkpoint; re-running the same command continues it.  The three ways a
`pipeline extract` ends are told apart by the exit status: 0 finished, 2 error, EXIT_PAUSED paused (and
130 for an abort by a second Ctrl-C).
"""
from __future__ import annotations

import re
import signal
import threading
import time

from ..utils import UserError

EXIT_PAUSED = 3  # `pipeline extract` paused (time limit or signal): the checkpoint is written, re-run to continue
PAUSE_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # SLURM's --signal, preemption notices, Ctrl-C
MARGIN = 1.15  # an epoch is started only if 1.15x its estimated time (+ a few seconds to save) still fits


def parse_duration(text) -> float:
    """'2h30m', '90m', '45s', '1h', '1h5m10s' or a plain number of seconds -> seconds (> 0)."""
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", s):
        s += "s"
    m = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?", s)
    if not s or not m or not any(m.groups()):
        raise UserError(f"a duration must look like 2h30m, 90m, 45s or a number of seconds, got {text!r}")
    h, mi, se = (float(g) if g else 0.0 for g in m.groups())
    total = 3600 * h + 60 * mi + se
    if total <= 0:
        raise UserError(f"a duration must be > 0, got {text!r}")
    return total


def fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class PauseControl:
    """Decides at each epoch end whether to pause: a pause signal arrived, or the next step would not fit.

    ``limit`` is seconds from ``start`` (a time.monotonic() value, default now).  Signal handlers are
    installed by ``with control:`` (main thread only) and the previous ones restored after; the first
    SIGINT asks for a pause, a second one raises KeyboardInterrupt at once.
    """

    def __init__(self, limit: float | None = None, start: float | None = None, log=print):
        self.limit, self.start, self.log = limit, time.monotonic() if start is None else start, log
        self.signalled: str | None = None
        self._sigint = False
        # measured by training (test evaluation seconds per image): the estimate of the feature extraction
        self.eval_seconds_per_image: float | None = None
        self._old = {}

    # -- signals ----------------------------------------------------------------------------------
    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        if name == "SIGINT" and self._sigint:
            raise KeyboardInterrupt  # the second Ctrl-C aborts at once
        self._sigint = self._sigint or name == "SIGINT"
        if self.signalled is None:
            self.signalled = name
            self.log(f"{name}: pausing at the end of this epoch"
                     + (" (Ctrl-C again to abort now)" if name == "SIGINT" else ""))

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in PAUSE_SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
        return False

    # -- time -------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fits(self, seconds: float | None) -> bool:
        """Whether work estimated at ``seconds`` (None: unknown, assumed to fit) ends within the limit."""
        if self.limit is None or seconds is None:
            return True
        return self.elapsed() + MARGIN * seconds + 5.0 <= self.limit

    def reason(self, next_seconds: float | None) -> str | None:
        """Why to pause now (None: go on): the signal's name, or 'time limit'."""
        if self.signalled:
            return self.signalled
        if not self.fits(next_seconds):
            return "time limit"
        return None


class RunPaused(Exception):
    """Raised out of stage 1 when it paused (the checkpoint is written); the CLI exits with EXIT_PAUSED."""

    def __init__(self, epoch: int, epochs: int, elapsed: float, reason: str, what: str = ""):
        self.epoch, self.epochs, self.elapsed, self.reason = epoch, epochs, elapsed, reason
        super().__init__(f"paused at epoch {epoch}/{epochs} after {fmt_duration(elapsed)} ({reason}{what}); "
                         "re-run the same command to continue")
