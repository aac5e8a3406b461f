"""The fits a report needs, as a plan, and running that plan without a Python start per fit.

``fit_plan`` lists, for every cache under a cache root, the stage-2 fits the tables and figures need
(what ``pipeline report --list-fits`` prints); ``run_plan`` runs them through stage 2's library functions
(``fit_head`` then ``record_fit``: the same validation, results rows and artifacts as ``pipeline fit-head``),
reading each cache once and keeping one ``fit_head`` memo per cache and process (a multi-ncm fit takes the
centroids of the learned-ncm fit before it).  On a CPU it forks one worker per core: a fit is a chain of
small ops that one thread runs as fast as two (measured: 17.7 s vs 17.9 s for the 21 fits of one CIFAR
cache), so the second core is only useful for a second fit.  ``run_all.sh`` used to start Python (and
import torch) once per fit; ``pipeline report --fit`` runs the whole plan and the report in one start.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import UserError
from .fmt import fmt1
from .paper import BN_COMPARE_HEADS, TRAIN_PLAIN_DATASETS, TRAIN_PLAIN_SPECS, H, Spec, needed_specs
from .runs import fit_args, load_context


@dataclass(frozen=True)
class FitJob:
    cache_dir: str
    spec: Spec
    options: tuple = field(default=())  # extra fit_head keyword arguments, ((name, value), ...)

    def args(self) -> list:
        """`pipeline fit-head` options (after --cache) that make the same fit."""
        out = fit_args(self.spec)
        if dict(self.options).get("p") == "auto":
            out += ["--p", "auto"]
        return out

    def kwargs(self) -> dict:
        """Keyword arguments of stage 2's ``fit_head`` (tau None = the head's default, as on the CLI)."""
        return dict(head=self.spec.head, variant=self.spec.variant, tau=self.spec.tau or None,
                    **dict(self.spec.hparams), **dict(self.options))

    def label(self) -> str:
        return f"{Path(self.cache_dir).name} {' '.join(self.args())}"


def fit_plan(cache_root="cache", quick: bool = False) -> list:
    """Every fit the tables and figures need, on every cache under ``cache_root``, in table order, then
    BN_COMPARE_HEADS on each BN re-estimation variant the cache holds (bn_recal fits only where the cache
    has those features; tau-norm's p picked on the val split where the cache has one), then on BALMS's CIFAR
    datasets TRAIN_PLAIN_SPECS (the NCM family fitted on the test images: the report's leak diagnostic)."""
    ctx = load_context(cache_root)
    jobs = []
    for c in ctx.infos:
        specs = needed_specs(quick)
        if not quick:  # each BN re-estimation method the cache holds, on the heads that compare them
            compare = [H(h, variant=v) for v in c.cache.variants if v != "plain" for h in BN_COMPARE_HEADS]
            specs += [s for s in compare if s not in specs]
            if c.dataset in TRAIN_PLAIN_DATASETS:
                specs += TRAIN_PLAIN_SPECS
        for spec in specs:
            if spec.variant not in c.cache.variants:
                continue
            opts = (("p", "auto"),) if spec.head == "tau-norm" and "val" in c.cache.splits(spec.variant) else ()
            jobs.append(FitJob(str(c.dir), spec, opts))
    return jobs


def can_fork_workers() -> bool:
    """Linux (fork is safe with torch there once a worker keeps to one thread) and no GPU: a CUDA fit cannot
    run in a process forked after CUDA was touched, and on a GPU the fits are better off in one process."""
    import torch
    return sys.platform.startswith("linux") and not torch.cuda.is_available()


def default_workers(jobs) -> int:
    """Processes for ``run_plan``: one per CPU core (each fit runs in one thread), at most one per group of
    jobs; 1 (this process) where :func:`can_fork_workers` says no."""
    if not jobs or not can_fork_workers():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, len(job_groups(jobs))))


def job_groups(jobs) -> list:
    """Job indices that share one process: a multi-ncm fit with the learned-ncm fit of the same cache,
    variant, tau and fit split (it takes that fit's centroids from the memo); every other job alone.  Plan
    order."""
    groups, where = [], {}
    for i, job in enumerate(jobs):
        key = ((job.cache_dir, job.spec.variant, job.spec.tau, dict(job.spec.hparams).get("fit_split", "train"))
               if job.spec.head in MEMO_HEADS else None)
        if key is not None and key in where:
            groups[where[key]].append(i)
            continue
        if key is not None:
            where[key] = len(groups)
        groups.append([i])
    return groups


MEMO_HEADS = ("learned-ncm", "multi-ncm")  # heads whose fits share work through fit_head's memo

_caches, _memos = {}, {}  # the caches read and fit_head memos of one run_plan call (per process), per folder


def _cache(cache_dir):
    from ..cache import read_cache  # stage 2's modules: only when fits are run
    if cache_dir not in _caches:
        _caches[cache_dir] = read_cache(cache_dir)  # metadata only: no HDF5 file stays open (safe to fork)
    return _caches[cache_dir]


def _fit_one(job):
    """(FitResult, seconds), or (the UserError's message, seconds): one job, in this process."""
    from ..stage2.fit import fit_head
    t = time.monotonic()
    try:
        res = fit_head(_cache(job.cache_dir), memo=_memos.setdefault(job.cache_dir, {}), **job.kwargs())
    except UserError as e:
        return str(e), time.monotonic() - t
    return res, time.monotonic() - t


def _fit_group(jobs):
    """A worker process's task: the group's jobs in order, up to the first failure, each as ``_fit_one``
    returns it but without the head's predict (its code does not cross processes)."""
    out = []
    for job in jobs:
        res, seconds = _fit_one(job)
        out.append((res if isinstance(res, str) else dataclasses.replace(res, predictor=None), seconds))
        if isinstance(res, str):
            break
    return out


def _worker_init():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the pool, no traceback per worker


def run_plan(jobs, echo=print, workers=None) -> list:
    """Fit and record every job; returns the results rows, in plan order.

    With ``workers`` > 1 (default :func:`default_workers`), that many forked processes fit the groups of
    :func:`job_groups` side by side.  Every fit runs in one CPU thread (``fit_head``'s default) wherever it
    runs, so the rows are the same bit for bit as with one process; this process records them in plan order
    as they arrive.  Stops at the first fit that fails, with a UserError naming it (the rows of the fits
    before it are recorded)."""
    from ..stage2.fit import record_fit
    jobs = list(jobs)
    if workers is None:
        workers = default_workers(jobs)
    elif int(workers) > 1 and not can_fork_workers():
        echo(f"note: fitting in this process, not {int(workers)} workers (they need Linux and no GPU)")
        workers = 1
    start = time.monotonic()
    rows, pool, done = [], None, {}
    _caches.clear()  # a cache re-extracted since an earlier call is read again
    _memos.clear()
    try:
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor
            from concurrent.futures.process import BrokenProcessPool
            groups = job_groups(jobs)
            # what the workers are sent, pickled here first: an object that cannot be pickled fails now, not
            # in the executor's feeder thread, where it leaves shutdown() waiting forever (CPython 3.11)
            pickle.dumps((_fit_group, jobs))
            with warnings.catch_warnings():
                # Python >= 3.12 warns when forking a process with threads (here BLAS's idle pool); a worker
                # touches no inherited thread: its fits run in one thread
                warnings.filterwarnings("ignore", message=r".*fork\(\) may lead to deadlocks",
                                        category=DeprecationWarning)
                pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_worker_init)
                tasks = [(g, pool.submit(_fit_group, [jobs[i] for i in g])) for g in groups]  # forks here
            group_of = {i: k for k, (g, _) in enumerate(tasks) for i in g}
        for i, job in enumerate(jobs):
            if pool is None:
                done[i] = _fit_one(job)
            elif i not in done:  # wait for this job's group (submitted in plan order, so mostly done)
                members, task = tasks[group_of[i]]
                try:
                    done.update(zip(members, task.result()))
                except BrokenProcessPool:  # a worker was killed (out of memory?): every pending fit is lost
                    raise UserError(f"a fit worker process died before fit {i + 1} of {len(jobs)} came back "
                                    f"({job.label()}); rerun with workers=1 (one process, less memory)"
                                    ) from None
            res, seconds = done.pop(i, ("not fitted (an earlier fit of its group failed)", 0.0))
            echo(f"==> fit {i + 1}/{len(jobs)}: {job.label()}")
            if isinstance(res, str):
                raise UserError(f"fit {i + 1} of {len(jobs)} failed ({job.label()}): {res}")
            try:
                row = record_fit(_cache(job.cache_dir), res)
            except UserError as e:
                raise UserError(f"fit {i + 1} of {len(jobs)} failed ({job.label()}): {e}") from None
            rows.append(row)
            chosen = f"  p {res.hparams['p']:g} (chosen on val)" if res.hparams.get("p_select") == "val" else ""
            accs = " / ".join(f"{m.capitalize()} {fmt1(res.acc[m]) or 'n/a'}"
                              for m in ("many", "medium", "few", "all"))
            echo(f"    {accs}{chosen}  (fit {res.fit_seconds:.1f} s on {res.device}, done in {seconds:.1f} s; "
                 f"row {row['fit_id']})")
    finally:
        if pool is not None:  # after a failure or Ctrl-C the queued fits are dropped, the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
        _memos.clear()  # fitted centroids: not kept past the call
    if jobs:
        workers_s = f" in {workers} processes" if pool is not None else ""
        echo(f"==> {len(jobs)} fits in {time.monotonic() - start:.1f} s{workers_s}")
    return rows
