"""Reports: the paper's tables (ours beside the published values) and figures, from caches + fit results.

Inputs (nothing else is read):
  <cache_root>/<run>/features.h5   stage-1 caches (pipeline.cache)
  <cache_root>/<run>/results.csv   one row per stage-2 fit (pipeline fit-head), artifacts under fits/

Outputs under ``out_dir``:
  table{1,2,3,5,6,7}.csv / .md     long format, one row per (method, dataset, beta, metric) cell
  figures/fig*.png + fig*.csv      each figure with the numbers behind it (header names source + fingerprint)
  README.md                        what the numbers come from, headline, reproduced / missed cells, figures

Rules: a configuration with no cache or no fit is a "not run" row with the command that would produce it
(never dropped, never filled from the paper).  Per (cache, head, variant, tau, hparams) only the latest
results row counts.  Caches that differ only in the stage-1 seed (config.recipe_identity) are averaged
(mean, std with ddof=1, n).  Tables never contain wall-clock times, so a second report on the same inputs
is byte-identical.

Modules: ``paper`` (the transcribed tables, pure data), ``runs`` (finding caches and rows, the
:class:`ReportContext`, commands), ``tables``, ``figures``, ``readme``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import RESULT_COLUMNS  # noqa: F401  (re-exported: the contract the report reads)
from ..utils import UserError, atomic_path, check_writable_dir
from .figures import build_figures
from .paper import BN_CONFIGS, FAMILY, NEEDED_CONFIGS, TABLES, needed_specs
from .readme import build_readme
from .runs import ReportContext, fit_args, load_context
from .tables import LONG_COLUMNS, build_table, table_markdown  # noqa: F401  (LONG_COLUMNS: the CSV contract)

__all__ = ["ReportContext", "ReportResult", "TABLES", "LONG_COLUMNS", "RESULT_COLUMNS", "UserError", "build_report",
           "missing_extract_commands", "needed_fits", "parse_data_roots"]


@dataclass
class ReportResult:
    out_dir: Path
    tables: dict
    figures: list
    warnings: list
    files: list

    def summary(self) -> str:
        allc = pd.concat(self.tables.values(), ignore_index=True)
        st = allc["status"]
        nfig = sum(1 for f in self.figures if f.files)
        return (f"report: {self.out_dir}/README.md — {int((st == 'reproduced').sum())} cells reproduced, "
                f"{int((st == 'missed').sum())} missed, {int((st == 'not run').sum())} not run; "
                f"{nfig} of {len(self.figures)} figures")


def parse_data_roots(items) -> dict:
    out = {}
    for it in items or ():
        if "=" not in it:
            raise UserError(f"--data-root expects DATASET=DIR, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _write_text(path: Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def build_report(cache_root="cache", out_dir="reports", figures: bool = True, tolerance: float = 1.0,
                 data_roots: dict | None = None, tsne_per_class: int = 300) -> ReportResult:
    """Write every table (CSV + Markdown), the figures and README.md under ``out_dir``.

    ``data_roots`` maps dataset -> data root for the `pipeline extract` commands of cells not run;
    ``tsne_per_class`` caps the samples per class in the Figure 1 t-SNE.
    """
    out_dir = check_writable_dir(out_dir, "--out")
    if not Path(cache_root).exists():
        raise UserError(f"cache root {cache_root} does not exist; run `pipeline extract` first or pass --cache-root")
    ctx = load_context(cache_root, data_roots, tolerance)
    tables, files = {}, []
    for t in TABLES:
        df = build_table(ctx, t)
        tables[t.name] = df
        buf = io.StringIO()
        df.to_csv(buf, index=False, lineterminator="\n")
        _write_text(out_dir / f"{t.name}.csv", buf.getvalue())
        _write_text(out_dir / f"{t.name}.md", table_markdown(t, df, tolerance))
        files += [f"{t.name}.csv", f"{t.name}.md"]
    figs = build_figures(ctx, out_dir, tsne_per_class) if figures else []
    for f in figs:
        files += f.files
    _write_text(out_dir / "README.md", build_readme(ctx, tables, figs))
    files.append("README.md")
    return ReportResult(out_dir, tables, figs, ctx.warnings, files)


def missing_extract_commands(cache_root="cache", data_roots: dict | None = None) -> list:
    """`pipeline extract` commands for the configurations the tables/figures need but no cache has."""
    ctx = load_context(cache_root, data_roots)
    cmds = []
    for ds, b in NEEDED_CONFIGS:
        g = ctx.choose_group(ds, b)
        bn = (ds, b) in BN_CONFIGS or FAMILY[ds] == "cifar"  # BN recalibration is cheap: always add for CIFAR
        if g is None:
            cmds.append(ctx.extract_command(ds, b, bn=bn))
        elif (ds, b) in BN_CONFIGS:
            cmds += [ctx.extract_command(ds, b, seed=c.seed, bn=True, like=c)
                     for c in g.caches if "bn_recal" not in c.cache.variants]
    return cmds


def needed_fits(cache_root="cache", quick: bool = False) -> list:
    """(cache dir, fit-head options) for every fit the tables and figures need, on every cache under
    ``cache_root`` (bn_recal fits only where the cache has those features; tau-norm's p picked on the val
    split where the cache has one)."""
    ctx = load_context(cache_root)
    out = []
    for c in ctx.infos:
        for spec in needed_specs(quick):
            if spec.variant not in c.cache.variants:
                continue
            args = fit_args(spec)
            if spec.head == "tau-norm" and "val" in c.cache.splits(spec.variant):
                args += ["--p", "auto"]
            out.append((str(c.dir), args))
    return out
