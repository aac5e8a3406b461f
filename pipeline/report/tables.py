"""The paper's tables with our values beside the published ones: one long CSV row per (method, dataset,
beta, metric) cell, and a wide Markdown rendering."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .fmt import diff1, fmt1, fmt_diff
from .latex import booktabs, tex
from .paper import METRIC_LABEL, LIT, Spec, TableSpec, dataset_label, fmt_beta, fmt_tau
from .runs import ReportContext, as_float, expected_run, fit_command, parse_hparams, pick_row

LONG_COLUMNS = ["table", "section", "dataset", "imbalance", "method", "head", "variant", "tau", "hparams",
                "metric", "ours", "ours_std", "n_seeds", "paper", "diff", "status", "note", "data", "command",
                "fit_ids", "runs", "cache_fingerprints", "stage1_epochs"]
# (which commit ran each fit, and when, is in provenance.local.json: it changes on every rerun of the same fit)


@dataclass
class CellResult:
    rows: list = field(default_factory=list)  # (CacheInfo, row)
    missing: list = field(default_factory=list)  # commands


def resolve_cell(ctx: ReportContext, dataset, imbalance, spec: Spec):
    """Our values of one (dataset, beta, spec) across stage-1 seeds; commands for what is missing."""
    g = ctx.choose_group(dataset, imbalance)
    res = CellResult()
    if g is None:
        res.missing.append(ctx.extract_command(dataset, imbalance, bn=spec.variant == "bn_recal")
                           + " && " + fit_command(ctx.rel(expected_run(dataset, imbalance)), spec))
        return g, res
    for c in g.caches:
        if spec.variant not in c.cache.variants:
            res.missing.append(ctx.extract_command(dataset, imbalance, seed=c.seed, bn=True, like=c)
                               + " && " + fit_command(c.rel, spec))
            continue
        r = pick_row(c.rows, spec)
        if r is None:
            res.missing.append(fit_command(c.rel, spec))
            continue
        res.rows.append((c, r))
    return g, res


def _chosen_note(spec: Spec, rows) -> str:
    """Which tau-norm p the cell's fits used, and how it was chosen (the report must say)."""
    if spec.head != "tau-norm":
        return ""
    used = []
    for _, r in rows:
        hp = parse_hparams(r["hparams"])
        used.append(f"p = {hp.get('p')} ({'chosen on the val split' if hp.get('p_select') == 'val' else 'fixed'})")
    return "; ".join(dict.fromkeys(used))


def build_table(ctx: ReportContext, t: TableSpec) -> pd.DataFrame:
    out = []
    cache: dict = {}
    for row in t.rows:
        for (dataset, imb, metric), paper in zip(t.columns, row.paper):
            section = dataset_label(dataset, imb)
            rec = dict(table=t.name, section=section, dataset=dataset, imbalance=fmt_beta(imb) if imb else "",
                       method=row.method, head="", variant="", tau="", hparams="", metric=metric, ours="",
                       ours_std="", n_seeds="", paper=fmt1(paper), diff="", status="", note="", data="",
                       command="", fit_ids="", runs="", cache_fingerprints="", stage1_epochs="")
            if row.spec is None:
                rec["status"] = ("literature (not run here)" if row.kind == LIT else
                                 "paper only (not mapped to a method here)")
                out.append(rec)
                continue
            spec = row.spec
            rec.update(head=spec.head, variant=spec.variant, tau=fmt_tau(spec.tau),
                       hparams=json.dumps(dict(spec.hparams), sort_keys=True) if spec.hparams else "")
            key = (dataset, imb, spec)
            if key not in cache:
                cache[key] = resolve_cell(ctx, dataset, imb, spec)
            g, res = cache[key]
            if not res.rows:
                rec["status"] = "not run"
                rec["command"] = " ; ".join(res.missing)
                if g is not None:
                    rec.update(runs=";".join(c.run for c in g.caches),
                               cache_fingerprints=";".join(c.fingerprint for c in g.caches),
                               stage1_epochs=str(g.epochs))
                out.append(rec)
                continue
            vals = np.array([as_float(r[f"_{metric}"]) for _, r in res.rows], dtype=np.float64)
            finite = vals[np.isfinite(vals)]
            n = len(res.rows)
            mean = float(finite.mean()) if finite.size else float("nan")
            std = float(finite.std(ddof=1)) if finite.size >= 2 else float("nan")
            rec.update(ours=fmt1(mean), ours_std=fmt1(std), n_seeds=str(n),
                       fit_ids=";".join(str(r["fit_id"]) for _, r in res.rows),
                       runs=";".join(c.run for c, _ in res.rows),
                       cache_fingerprints=";".join(c.fingerprint for c, _ in res.rows),
                       stage1_epochs=";".join(sorted({str(c.epochs) for c, _ in res.rows})),
                       data=";".join(sorted({c.data_label() for c, _ in res.rows})),
                       command=" ; ".join(fit_command(c.rel, spec, parse_hparams(r["hparams"]), r["seed"])
                                          for c, r in res.rows))
            notes = [n for n in [_chosen_note(spec, res.rows)] if n]
            if res.missing:
                notes.append(f"partial: {n} of {n + len(res.missing)} stage-1 seeds fitted; missing: "
                             + " ; ".join(res.missing))
            if not finite.size:
                rec["status"] = "empty group"
                notes.append(f"no {metric} class in this split")
            elif paper is None:
                rec["status"] = "ours only (no paper value)"
            else:
                d = diff1(mean, paper)  # between the one-decimal values the tables show
                rec["diff"] = fmt_diff(d)
                rec["status"] = "reproduced" if abs(float(d)) <= ctx.tolerance + 1e-9 else "missed"
            devs = sorted({d for c, _ in res.rows for d in c.recipe_deviations()})
            if devs:
                notes.append("NOT THE PAPER'S STAGE-1 RECIPE: " + ", ".join(devs))
            rec["note"] = " | ".join(notes)
            out.append(rec)
    return pd.DataFrame(out, columns=LONG_COLUMNS)


# ----------------------------------------------------------------------------------------------------
# Wide renderings (Markdown, LaTeX): the paper's layout, one value per cell.  Each method is a block of
# rows: the paper's value, ours, and (Markdown) ours − paper; with several stage-1 seeds also their std and
# count.  A cell of ours within the tolerance of the paper is bold.

NOT_RUN, NO_GROUP, NO_PAPER = "not run", "n/a", "–"


def _ours_text(r) -> str:
    st = r["status"]
    if st == "not run":
        return NOT_RUN
    return r["ours"] or NO_GROUP


def wide_blocks(df: pd.DataFrame, with_diff: bool = True):
    """(columns [(section, metric)], blocks [(method, [(row label, [(text, bold)])])])."""
    cols = list(dict.fromkeys(zip(df["section"], df["metric"])))
    idx = {(r["method"], r["section"], r["metric"]): r for _, r in df.iterrows()}
    blocks = []
    for meth in dict.fromkeys(df["method"]):
        cells = [idx.get((meth, s, m)) for s, m in cols]
        present = [c for c in cells if c is not None]
        rows = [("paper", [((c["paper"] or NO_PAPER) if c is not None else "", False) for c in cells])]
        ours_run = [c for c in present if not (c["status"].startswith("literature") or c["status"].startswith("paper only"))]
        if ours_run:
            rows.append(("ours", [(_ours_text(c), c["status"] == "reproduced") if c is not None else ("", False)
                                  for c in cells]))
            if any(c["n_seeds"] not in ("", "1") for c in ours_run):
                rows.append(("± std", [(c["ours_std"] if c is not None else "", False) for c in cells]))
                rows.append(("seeds", [(c["n_seeds"] if c is not None else "", False) for c in cells]))
            if with_diff:
                rows.append(("ours − paper", [(c["diff"] if c is not None else "", False) for c in cells]))
        elif present and present[0]["status"].startswith("literature"):
            rows[0] = ("paper (literature, not run here)", rows[0][1])
        elif present:
            rows[0] = ("paper (no method of ours)", rows[0][1])
        blocks.append((meth, rows))
    return cols, blocks


def wide_markdown(df: pd.DataFrame) -> str:
    cols, blocks = wide_blocks(df)
    head = "| Method | | " + " | ".join(f"{s} {METRIC_LABEL[m]}" for s, m in cols) + " |"
    lines = [head, "|---|---|" + "---:|" * len(cols)]
    for meth, rows in blocks:
        for i, (label, cells) in enumerate(rows):
            vals = [f"**{t}**" if bold and t else t for t, bold in cells]
            lines.append(f"| {meth if i == 0 else ''} | {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def table_latex(t: TableSpec, df: pd.DataFrame, tolerance) -> str:
    cols, blocks = wide_blocks(df, with_diff=False)
    groups = []
    for s, _ in cols:
        if groups and groups[-1][0] == s:
            groups[-1][1] += 1
        else:
            groups.append([s, 1])
    body = []
    for meth, rows in blocks:
        block = []
        for i, (label, cells) in enumerate(rows):
            vals = []
            for text, bold in cells:
                v = "--" if text in (NO_PAPER, "") else ("n/r" if text == NOT_RUN else tex(text))
                vals.append(f"\\textbf{{{v}}}" if bold else v)
            block.append([tex(meth) if i == 0 else "", tex(label)] + vals)
        body.append(block)
    notes = (f"ours: this toolkit (mean over stage-1 seeds); bold: within {tolerance:g} point of the paper; "
             "n/r: not run; n/a: no class of that group in the split; --: no value in the paper.")
    return booktabs(t.title, f"tab:{t.name}", ["Method", ""], [(g, n) for g, n in groups],
                    [METRIC_LABEL[m] for _, m in cols], body, notes)


def missing_commands(df: pd.DataFrame) -> list:
    """Commands behind the 'not run' and partial cells: stage-1 extracts first, then the fits (deduplicated)."""
    raw = []
    for v in df.loc[df["status"] == "not run", "command"]:
        raw += [c for c in v.split(" ; ") if c]
    for n in df["note"]:
        if n.startswith("partial"):
            raw += n.split("missing: ", 1)[1].split(" | ")[0].split(" ; ")
    extracts, fits = [], []
    for c in raw:
        for part in c.split(" && "):
            (extracts if part.startswith("pipeline extract") else fits).append(part.strip())
    return sorted(set(extracts)) + sorted(set(fits))


def table_markdown(t: TableSpec, df: pd.DataFrame, tolerance) -> str:
    lines = [f"# {t.title}", "",
             "Accuracy (%) to one decimal, one value per cell. Per method: the paper's value, ours (mean over "
             f"stage-1 seeds), and ours − paper; **bold** = within {tolerance:g} point of the paper; not run = "
             "no cache or fit yet (commands below); n/a = no class of that group in the split; – = no value "
             f"in the paper. Also as [CSV]({t.name}.csv) (one row per cell, full provenance) and "
             f"[LaTeX]({t.name}.tex) (booktabs).", "", wide_markdown(df), ""]
    data = sorted({d for v in df["data"] for d in v.split(";") if d})
    if data:
        lines += [f"Data behind our numbers: {', '.join(data)}.", ""]
    notes = sorted({n.split(" | ")[-1] for n in df["note"] if "NOT THE PAPER'S STAGE-1 RECIPE" in n})
    for n in notes:
        lines.append(f"**Warning:** {n}")
    if notes:
        lines.append("")
    used = df[df["runs"] != ""][["runs", "cache_fingerprints"]].drop_duplicates()
    if len(used):
        lines += ["Stage-1 caches (run: fingerprint):", ""]
        seen = set()
        for _, r in used.iterrows():
            for run, fp in zip(r["runs"].split(";"), r["cache_fingerprints"].split(";")):
                if run not in seen:
                    seen.add(run)
                    lines.append(f"- `{run}`: `{fp}`")
        lines.append("")
    cmds = missing_commands(df)
    if cmds:
        lines += ["Commands that would produce the missing cells (stage 1 first, then the fits):", "", "```"]
        lines += cmds + ["```", ""]
    lines += ["Full provenance of every cell (fit ids, fingerprints, commands): "
              f"[{t.name}.csv]({t.name}.csv).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Figures
