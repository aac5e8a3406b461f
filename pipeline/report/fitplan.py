"""The fits a report needs, as a plan, and running that plan in one process.

``fit_plan`` lists, for every cache under a cache root, the stage-2 fits the tables and figures need
(what ``pipeline report --list-fits`` prints); ``run_plan`` runs them in this process through stage 2's
library functions (``fit_head`` then ``record_fit``: the same validation, results rows and artifacts as
``pipeline fit-head``), reading each cache once and keeping one ``fit_head`` memo per cache (a multi-ncm fit
takes the centroids of the learned-ncm fit before it).  ``run_all.sh`` used to start Python (and import torch) once
per fit; ``pipeline report --fit`` runs the whole plan and the report in one start.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from ..utils import UserError
from .fmt import fmt1
from .paper import BN_COMPARE_HEADS, H, Spec, needed_specs
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
    has those features; tau-norm's p picked on the val split where the cache has one)."""
    ctx = load_context(cache_root)
    jobs = []
    for c in ctx.infos:
        specs = needed_specs(quick)
        if not quick:  # each BN re-estimation method the cache holds, on the heads that compare them
            compare = [H(h, variant=v) for v in c.cache.variants if v != "plain" for h in BN_COMPARE_HEADS]
            specs += [s for s in compare if s not in specs]
        for spec in specs:
            if spec.variant not in c.cache.variants:
                continue
            opts = (("p", "auto"),) if spec.head == "tau-norm" and "val" in c.cache.splits(spec.variant) else ()
            jobs.append(FitJob(str(c.dir), spec, opts))
    return jobs


def run_plan(jobs, echo=print) -> list:
    """Fit and record every job in this process; returns the results rows.  Stops at the first fit that
    fails, with a UserError naming it (the rows of the fits before it are recorded)."""
    from ..cache import read_cache  # stage 2's modules: only when fits are run
    from ..stage2.fit import fit_head, record_fit
    caches, memos, rows = {}, {}, []
    start = time.monotonic()
    for i, job in enumerate(jobs, 1):
        echo(f"==> fit {i}/{len(jobs)}: {job.label()}")
        t = time.monotonic()
        try:
            if job.cache_dir not in caches:
                caches[job.cache_dir] = read_cache(job.cache_dir)
            cache = caches[job.cache_dir]
            res = fit_head(cache, memo=memos.setdefault(job.cache_dir, {}), **job.kwargs())
            row = record_fit(cache, res)
        except UserError as e:
            raise UserError(f"fit {i} of {len(jobs)} failed ({job.label()}): {e}") from None
        rows.append(row)
        chosen = f"  p {res.hparams['p']:g} (chosen on val)" if res.hparams.get("p_select") == "val" else ""
        accs = " / ".join(f"{m.capitalize()} {fmt1(res.acc[m]) or 'n/a'}" for m in ("many", "medium", "few", "all"))
        echo(f"    {accs}{chosen}  (fit {res.fit_seconds:.1f} s on {res.device}, done in "
             f"{time.monotonic() - t:.1f} s; row {row['fit_id']})")
    if jobs:
        echo(f"==> {len(jobs)} fits in {time.monotonic() - start:.1f} s")
    return rows
