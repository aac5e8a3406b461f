"""Reports: the paper's tables (ours beside the published values) and figures, from caches + fit results.

Inputs (nothing else is read):
  <cache_root>/<run>/features.h5   stage-1 caches (pipeline.cache)
  <cache_root>/<run>/results.csv   one row per stage-2 fit (pipeline fit-head), artifacts under fits/

Outputs under ``out_dir`` (built in a temporary folder, swapped in when complete):
  table{1,2,3,5,6,7}.csv / .md / .tex   long CSV, one row per (method, dataset, beta, metric) cell; Markdown
                                   and booktabs LaTeX in the paper's layout, one value per cell
  heads/<run>.csv / .md / .tex     every head, variant and setting fitted on one cache, with the paper's value
  figures/fig*.png + .csv + .json  each figure, the numbers behind it, and a sidecar with its title, caption
                                   and provenance (source caches, fingerprints, fit ids)
  README.md                        what the numbers come from, headline, reproduced / missed cells, figures
  provenance.local.json            when and with which commit each fit ran, the report's commit: changes on
                                   every rerun, so git-ignored (.gitignore); everything else is a function of
                                   the inputs (caches' fingerprints, fit ids and accuracies) alone

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
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import BN_RECAL_DEFAULT
from ..config import RESULT_COLUMNS  # noqa: F401  (re-exported: the contract the report reads)
from ..utils import UserError, atomic_dir, atomic_path, check_writable_dir
from .everyhead import HEAD_COLUMNS, build_every_head, every_head_latex, every_head_markdown
from .figures import build_figures
from .fitplan import FitJob, fit_plan, run_plan
from .paper import BN_CONFIGS, FAMILY, NEEDED_CONFIGS, TABLES
from .readme import build_readme, features_by_class
from .runs import ReportContext, inputs_digest, load_context, volatile_provenance
from .tables import LONG_COLUMNS, build_table, table_latex, table_markdown  # noqa: F401  (LONG_COLUMNS: the CSV contract)

__all__ = ["ReportContext", "ReportResult", "TABLES", "LONG_COLUMNS", "HEAD_COLUMNS", "RESULT_COLUMNS", "UserError",
           "FitJob", "build_report", "filled_cells", "filled_cells_on_disk", "fit_plan", "inputs_digest",
           "missing_extract_commands", "needed_fits", "parse_data_roots", "run_plan"]


@dataclass
class ReportResult:
    out_dir: Path
    tables: dict  # the paper's tables: name -> long DataFrame
    figures: list
    warnings: list
    files: list
    heads: dict = None  # the every-head tables: run -> long DataFrame

    @property
    def filled(self) -> int:
        """Table cells with a number of ours (paper tables + every-head tables): what --force guards."""
        return filled_cells(self.tables) + filled_cells(self.heads or {})

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
            raise UserError(f"data_roots= entries must look like DATASET=DIR, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _write_text(path: Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# What `pipeline report` writes into --out (anything else there is someone's file: never swap it away).
_OWN_TOP = re.compile(r"(README\.md|table\d+\.(csv|md|tex)|heads|stage1|figures|\.gitignore|provenance\.local\.json)")
_OWN_SUB = {"figures": re.compile(r"fig\w*[-\w.]*\.(png|pdf|csv|json)"), "heads": re.compile(r"[-\w.]+\.(csv|md|tex)"),
            "stage1": re.compile(r"[-\w.]+\.csv")}


def _check_out_dir(out_dir: Path):
    """``out_dir`` must be absent, empty, or a folder of report outputs: it is replaced as a whole."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file, not a folder; choose another out_dir=...")
    foreign = []
    for p in sorted(out_dir.iterdir()):
        if not _OWN_TOP.fullmatch(p.name):
            foreign.append(p.name)
        elif p.name in _OWN_SUB:
            if not p.is_dir():
                foreign.append(p.name)
                continue
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if not _OWN_SUB[p.name].fullmatch(q.name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(f"{out_dir} holds files that `pipeline report` did not write ({shown}); the report "
                        "replaces the whole folder, so choose an empty or report-only out_dir=...")


def filled_cells(tables: dict) -> int:
    """Table cells with a number of ours (every long-format table: the paper's tables and the every-head
    tables)."""
    return int(sum((df["ours"].astype(str) != "").sum() for df in tables.values() if "ours" in df.columns))


def filled_cells_on_disk(out_dir) -> int:
    """:func:`filled_cells` of the report already in ``out_dir`` (0 when there is none)."""
    out_dir = Path(out_dir)
    n = 0
    for f in sorted(out_dir.glob("table*.csv")) + sorted(out_dir.glob("heads/*.csv")):
        try:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError):
            continue
        if "ours" in df.columns:
            n += int((df["ours"] != "").sum())
    return n


def build_report(cache_root="cache", out_dir="reports", figures: bool = True, tolerance: float = 1.0,
                 data_roots: dict | None = None, tsne_per_class: int = 300, force: bool = False) -> ReportResult:
    """Write every table (CSV + Markdown), the figures and README.md under ``out_dir``.

    Never loses output: refuses (UserError) when ``cache_root`` holds no readable cache, or when the new
    report would fill fewer table cells or draw fewer figures than the one in ``out_dir`` unless ``force``;
    builds everything in a temporary folder next to ``out_dir`` and swaps it in only when complete.

    ``data_roots`` maps dataset -> data root for the `pipeline extract` commands of cells not run;
    ``tsne_per_class`` caps the samples per class in the Figure 1 t-SNE.
    """
    out_dir = Path(out_dir)
    if out_dir.is_symlink():  # swap the folder it points to, not the link
        out_dir = out_dir.resolve()
    if not Path(cache_root).exists():
        raise UserError(f"cache root {cache_root} does not exist; run `pipeline extract` first or pass another "
                        "cache_root=...")
    ctx = load_context(cache_root, data_roots, tolerance)
    if not ctx.infos:
        why = f" ({'; '.join(ctx.warnings)})" if ctx.warnings else ""
        raise UserError(f"nothing to report: no readable cache under {cache_root}/<run>/features.h5{why}; "
                        f"{out_dir} is left as it is. Create caches with `pipeline extract` (`pipeline report "
                        "--list-missing` prints the commands) or pass the right cache_root=...")
    _check_out_dir(out_dir)
    check_writable_dir(out_dir.parent, "out_dir")
    tables = {t.name: build_table(ctx, t) for t in TABLES}
    heads = build_every_head(ctx)
    new, old = filled_cells(tables) + filled_cells(heads), filled_cells_on_disk(out_dir)
    if new < old and not force:
        raise UserError(f"this report would fill {new} table cells, the one in {out_dir} fills {old} (fewer "
                        f"caches or fits under {cache_root} than last time?); {out_dir} is left as it is. Pass "
                        "force=True to replace it")
    files = []
    with atomic_dir(out_dir) as tmp:
        for t in TABLES:
            df = tables[t.name]
            buf = io.StringIO()
            df.to_csv(buf, index=False, lineterminator="\n")
            _write_text(tmp / f"{t.name}.csv", buf.getvalue())
            _write_text(tmp / f"{t.name}.md", table_markdown(t, df, tolerance))
            _write_text(tmp / f"{t.name}.tex", table_latex(t, df, tolerance))
            files += [f"{t.name}.csv", f"{t.name}.md", f"{t.name}.tex"]
        if heads:
            (tmp / "heads").mkdir()
        for run, df in heads.items():
            buf = io.StringIO()
            df.to_csv(buf, index=False, lineterminator="\n")
            _write_text(tmp / "heads" / f"{run}.csv", buf.getvalue())
            _write_text(tmp / "heads" / f"{run}.md", every_head_markdown(run, df, ctx, tolerance))
            _write_text(tmp / "heads" / f"{run}.tex", every_head_latex(run, df, ctx, tolerance))
            files += [f"heads/{run}.{ext}" for ext in ("csv", "md", "tex")]
        per_class = {c.run: features_by_class(c) for c in sorted(ctx.infos, key=lambda c: c.run)}
        if per_class:
            (tmp / "stage1").mkdir()
        for run, df in per_class.items():
            buf = io.StringIO()
            df.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
            _write_text(tmp / "stage1" / f"{run}.csv", buf.getvalue())
            files.append(f"stage1/{run}.csv")
        figs = build_figures(ctx, tmp, tsne_per_class) if figures else []
        for f in figs:
            files += f.files
        drawn, had = sum(1 for f in figs if f.files), len(list(out_dir.glob("figures/*.png")))
        if drawn < had and not force:
            raise UserError(f"this report would draw {drawn} figures, the one in {out_dir} has {had}"
                            + (" (figures=False)" if not figures else "") + f"; {out_dir} is left as it is. "
                            "Pass force=True to replace it")
        _write_text(tmp / "README.md", build_readme(ctx, tables, figs, heads, per_class))
        # what changes on every rerun of the same fits (when, which commit) stays out of the tracked files
        _write_text(tmp / "provenance.local.json",
                    json.dumps(volatile_provenance(ctx), indent=1, ensure_ascii=False) + "\n")
        _write_text(tmp / ".gitignore", "# written by `pipeline report`: changes on every rerun, never commit it\n"
                                        "provenance.local.json\n")
        files += ["README.md", "provenance.local.json", ".gitignore"]
    return ReportResult(out_dir, tables, figs, ctx.warnings, files, heads)


def missing_extract_commands(cache_root="cache", data_roots: dict | None = None) -> list:
    """`pipeline extract` commands for the configurations the tables/figures need but no cache of the paper's
    recipe and budget has (a shorter run, e.g. a 2,000-iteration cache, fills cells meanwhile but
    does not count), and for caches whose bn_recal features are missing or made by another method than
    config.BN_RECAL_DEFAULT (extract adds them from the cache's weights, without training)."""
    ctx = load_context(cache_root, data_roots)
    cmds = []
    for ds, b in NEEDED_CONFIGS:
        g = ctx.choose_group(ds, b)
        bn = (ds, b) in BN_CONFIGS or FAMILY[ds] == "cifar"  # BN recalibration is cheap: always add for CIFAR
        if g is None or g.caches[0].recipe_deviations():
            cmds.append(ctx.extract_command(ds, b, bn=bn))
        if g is not None and (ds, b) in BN_CONFIGS:
            cmds += [ctx.extract_command(ds, b, seed=c.seed, bn=True, like=c)
                     for c in g.caches if not _bn_recal_current(c.cache)]
    return cmds


def _bn_recal_current(cache) -> bool:
    """Whether the cache has bn_recal features not known to come from another method than
    config.BN_RECAL_DEFAULT (a method not recorded at all, as in synthetic caches, is taken as it is)."""
    if "bn_recal" not in cache.variants:
        return False
    m = cache.variant_method("bn_recal")
    return m is None or all(m.get(k) == v for k, v in BN_RECAL_DEFAULT.items())


def needed_fits(cache_root="cache", quick: bool = False) -> list:
    """(cache dir, fit-head options) for every fit the tables and figures need, on every cache under
    ``cache_root`` (the plan of :func:`fit_plan`, as `pipeline report --list-fits` prints it)."""
    return [(job.cache_dir, job.args()) for job in fit_plan(cache_root, quick)]
