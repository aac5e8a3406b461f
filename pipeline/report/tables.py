"""The paper's tables with our values beside the published ones: one long CSV row per (method, dataset,
beta, metric) cell, and a wide Markdown rendering."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .paper import METRIC_LABEL, LIT, Spec, TableSpec, dataset_label, fmt_beta, fmt_tau
from .runs import ReportContext, as_float, expected_run, fit_command, parse_hparams, pick_row

LONG_COLUMNS = ["table", "section", "dataset", "imbalance", "method", "head", "variant", "tau", "hparams",
                "metric", "ours", "ours_std", "n_seeds", "paper", "diff", "status", "note", "data", "command",
                "fit_ids", "runs", "cache_fingerprints", "stage1_epochs", "commits"]


def _f(x, nd=2) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{nd}f}"


def _fd(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.2f}"


@dataclass
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
                       ours_std="", n_seeds="", paper=_f(paper, 1), diff="", status="", note="", data="",
                       command="", fit_ids="", runs="", cache_fingerprints="", stage1_epochs="", commits="")
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
            rec.update(ours=_f(mean), ours_std=_f(std), n_seeds=str(n),
                       fit_ids=";".join(str(r["fit_id"]) for _, r in res.rows),
                       runs=";".join(c.run for c, _ in res.rows),
                       cache_fingerprints=";".join(c.fingerprint for c, _ in res.rows),
                       stage1_epochs=";".join(sorted({str(c.epochs) for c, _ in res.rows})),
                       commits=";".join(sorted({str(r["git_commit"]) for _, r in res.rows if r["git_commit"]})),
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
                d = mean - paper
                rec["diff"] = _fd(d)
                rec["status"] = "reproduced" if abs(round(d, 6)) <= ctx.tolerance else "missed"
            devs = sorted({d for c, _ in res.rows for d in c.recipe_deviations()})
            if devs:
                notes.append("NOT THE PAPER'S STAGE-1 RECIPE: " + ", ".join(devs))
            rec["note"] = " | ".join(notes)
            out.append(rec)
    return pd.DataFrame(out, columns=LONG_COLUMNS)


def _cell_md(r) -> str:
    paper = r["paper"] or "–"
    st = r["status"]
    if st.startswith("literature"):
        return f"lit. / {paper}"
    if st.startswith("paper only"):
        return f"? / {paper}"
    if st == "not run":
        return f"not run / {paper}"
    ours = r["ours"] or "n/a"
    if r["ours_std"]:
        ours += f" ± {r['ours_std']}"
    ours += f" (n={r['n_seeds']})" if r["n_seeds"] not in ("", "1") else ""
    if r["diff"]:
        flag = "" if st == "reproduced" else " ✗"
        return f"**{ours}** / {paper} ({r['diff']}){flag}"
    return f"**{ours}** / {paper}"


def wide_markdown(df: pd.DataFrame) -> str:
    cols = list(dict.fromkeys(zip(df["section"], df["metric"])))
    methods = list(dict.fromkeys(df["method"]))
    head = "| Method | " + " | ".join(f"{s} {METRIC_LABEL[m]}" for s, m in cols) + " |"
    sep = "|---|" + "---|" * len(cols)
    lines = [head, sep]
    idx = {(r["method"], r["section"], r["metric"]): r for _, r in df.iterrows()}
    for meth in methods:
        cells = [_cell_md(idx[(meth, s, m)]) if (meth, s, m) in idx else "" for s, m in cols]
        lines.append(f"| {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
             f"Cell: **ours** (mean ± std over stage-1 seeds, n when > 1) / paper (ours − paper); ✗ = more than "
             f"{tolerance:g} point from the paper; lit. = literature value, not run here; ? = paper row whose "
             "label was lost in the text extraction.", "", wide_markdown(df), ""]
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
    lines += ["Full provenance of every cell (fit ids, fingerprints, commits, commands): "
              f"[{t.name}.csv]({t.name}.csv).", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Figures
