"""The "every head" table of each cache: All / Many / Medium / Few of every head, variant, tau and
hyperparameter setting fitted on it (the latest row of each, as everywhere in the report), beside the
paper's value where the paper has one for that method on that dataset and beta.

The paper's tables show only the rows the paper has; fits such as tau-norm, LWS, post-hoc logit adjustment,
the metric-NCM variants, the BN-recalibrated features or the tau sweep of Figure 5 would otherwise appear
in no table on a dataset the paper did not tabulate them for.  Written as ``heads/<run>.csv`` (long: one
row per fit and metric), ``.md`` and ``.tex``.
"""
from __future__ import annotations

import json
import math

import pandas as pd

from ..cache import describe_variant
from .fmt import diff1, fmt1, fmt_diff
from .latex import booktabs, tex
from .paper import METRIC_LABEL, METRICS, TABLES, Spec, dataset_label, fmt_tau, needed_specs
from .runs import COMPUTE_DETAILS, HEADS, ReportContext, _same, fit_command, parse_hparams, pick_row

HEAD_COLUMNS = ["run", "dataset", "imbalance", "method", "head", "variant", "tau", "hparams", "options",
                "eval_split", "metric", "ours", "paper", "diff", "paper_table", "status", "fit_id",
                "cache_fingerprint", "command"]
HEAD_LABEL = {"softmax": "Softmax (stage-1 classifier)", "ncm": "NCM", "learned-ncm": "Learned NCM",
              "multi-ncm": "Multi-NCM", "metric-ncm": "Metric NCM", "local-projection": "Local projection",
              "crt": "cRT", "tau-norm": "τ-norm", "lws": "LWS", "posthoc-la": "Post-hoc logit adjustment"}
_NOT_OPTIONS = set(COMPUTE_DETAILS) | {"eval_split", "p_select"}


def _options(head: str, hp: dict) -> str:
    """Hyperparameters that differ from the head's defaults (what sets this fit apart), e.g. 'metric=local'."""
    defaults = dict(HEADS[head].defaults) if head in HEADS else {}
    parts = []
    for k, v in sorted(hp.items()):
        if k in _NOT_OPTIONS or (k in defaults and _same(v, defaults[k])):
            continue
        if k == "fit_split":  # `fit-head --fit-split test`: BALMS's CIFAR train_plain, never a paper cell
            parts.append(f"fitted on the {v} images (a leak)")
            continue
        parts.append(f"{k}={v}" + (" (chosen on val)" if k == "p" and hp.get("p_select") == "val" else ""))
    return ", ".join(parts)


def _label(head, variant, tau, options) -> str:
    s = HEAD_LABEL.get(head, head)
    if variant != "plain":
        s += " (BN)" if variant == "bn_recal" else f" ({variant})"
    if tau:
        s += f", τ = {fmt_tau(tau)}"
    return s + (f", {options}" if options else "")


def _paper_methods() -> dict:
    """Spec -> [(table name, method name, {(dataset, beta, metric): value})] in table order."""
    out: dict = {}
    for t in TABLES:
        for r in t.rows:
            if r.spec is None:
                continue
            vals = {col: v for col, v in zip(t.columns, r.paper) if v is not None}
            out.setdefault(r.spec, []).append((t.name, r.method, vals))
    return out


def _paper_value(entries, dataset, imbalance, metric):
    """(value, table) from the first table of the paper with this cell, or (None, '')."""
    for name, _, vals in entries:
        for (ds, b, m), v in vals.items():
            if ds == dataset and m == metric and (b is None or imbalance is None or math.isclose(b, imbalance)):
                return v, name
    return None, ""


def build_every_head(ctx: ReportContext) -> dict:
    """{run: long DataFrame (HEAD_COLUMNS)} for every cache with at least one fit row."""
    papers = _paper_methods()
    order = {s: i for i, s in enumerate(needed_specs())}
    out = {}
    for c in sorted(ctx.infos, key=lambda c: c.run):
        if c.rows is None or c.rows.empty:
            continue
        # which row each spec of the tables and figures uses (the one that gets the paper's value)
        chosen = {}
        for spec in list(order) + [s for s in papers if s not in order]:
            r = pick_row(c.rows, spec)
            if r is not None:
                chosen.setdefault(r["fit_id"] + "\0" + str(r["_order"]), spec)
        fits = []
        for _, r in c.rows.iterrows():
            hp = parse_hparams(r["hparams"])
            tau = float(r["_tau"])
            spec = chosen.get(r["fit_id"] + "\0" + str(r["_order"]))
            opts = _options(r["head"], hp)
            entries = papers.get(spec, []) if spec is not None else []
            method = entries[0][1] if entries else _label(r["head"], r["_variant"], tau, opts)
            extra = ", ".join(o for o in opts.split(", ") if o and o.split("=")[0] not in dict(spec.hparams)) \
                if entries else ""
            if extra:  # e.g. tau-norm's p chosen on val (the table's method name does not say it)
                method += f" ({extra})"
            key = (order.get(spec, len(order)) if spec is not None else len(order), r["head"], r["_variant"], tau,
                   r["_hp"])
            fits.append((key, r, hp, tau, spec, opts, entries, method))
        recs = []
        for _, r, hp, tau, spec, opts, entries, method in sorted(fits, key=lambda f: f[0]):
            split = hp.get("eval_split", "test")
            for m in METRICS:
                ours = fmt1(r[f"_{m}"])
                paper, table = (_paper_value(entries, c.dataset, c.imbalance, m) if split == "test"
                                else (None, ""))
                d = diff1(ours, paper) if ours and paper is not None else None
                if not ours:
                    status = "empty group"
                elif d is None:
                    status = "ours only (no paper value)"
                else:
                    status = "reproduced" if abs(float(d)) <= ctx.tolerance + 1e-9 else "missed"
                recs.append(dict(
                    run=c.run, dataset=c.dataset, imbalance="" if c.imbalance is None else fmt_tau(c.imbalance),
                    method=method, head=r["head"], variant=r["_variant"], tau=fmt_tau(tau),
                    hparams=json.dumps(hp, sort_keys=True), options=opts, eval_split=split, metric=m, ours=ours,
                    paper=fmt1(paper), diff=fmt_diff(d), paper_table=table, status=status, fit_id=r["fit_id"],
                    cache_fingerprint=c.fingerprint,
                    command=fit_command(c.rel, spec if spec is not None else Spec(r["head"], r["_variant"], tau),
                                        hp, r["seed"])))
        out[c.run] = pd.DataFrame(recs, columns=HEAD_COLUMNS)
    return out


def _blocks(df: pd.DataFrame, with_diff=True):
    """[(method, options, [(row label, [(text, bold)] per metric)])] in the table's order."""
    blocks = []
    for _, g in df.groupby(["fit_id", "hparams", "variant", "tau"], sort=False):
        by = {r["metric"]: r for _, r in g.iterrows()}
        first = g.iloc[0]
        ours = [(by[m]["ours"] or "n/a", by[m]["status"] == "reproduced") for m in METRICS]
        rows = [("ours" + ("" if first["eval_split"] == "test" else f" ({first['eval_split']} split)"), ours)]
        if any(by[m]["paper"] for m in METRICS):
            tables = sorted({by[m]["paper_table"] for m in METRICS if by[m]["paper_table"]})
            rows.append((f"paper ({', '.join(t.replace('table', 'Table ') for t in tables)})",
                         [(by[m]["paper"] or "–", False) for m in METRICS]))
            if with_diff:
                rows.append(("ours − paper", [(by[m]["diff"], False) for m in METRICS]))
        blocks.append((first["method"], "--head " + first["command"].split(" --head ", 1)[-1], rows))
    return blocks


def every_head_markdown(run: str, df: pd.DataFrame, ctx: ReportContext, tolerance) -> str:
    c = next(i for i in ctx.infos if i.run == run)
    title = f"Every head fitted on `{run}` ({dataset_label(c.dataset, c.imbalance)}, {c.data_label()})"
    L = [f"# {title}", "",
         "Test accuracy (%) to one decimal of every head, feature variant, τ and hyperparameter setting fitted on "
         "this cache (the latest fit of each), with the paper's value where one of the paper's tables has this "
         f"method on this dataset and β (the first such table). **bold** = within {tolerance:g} point of the "
         "paper; n/a = no class of that group in the split; – = no value in the paper. Also as "
         f"[CSV]({run}.csv) (one row per fit and metric, with fit ids and the command that reruns each fit) "
         f"and [LaTeX]({run}.tex).", ""]
    devs = c.recipe_deviations()
    if devs:
        L += [f"**Warning:** NOT THE PAPER'S STAGE-1 RECIPE: {', '.join(devs)}.", ""]
    L += ["| Method | | " + " | ".join(METRIC_LABEL[m] for m in METRICS) + " | fit-head options |",
          "|---|---|" + "---:|" * len(METRICS) + "---|"]
    for method, opts, rows in _blocks(df):
        for i, (label, cells) in enumerate(rows):
            vals = [f"**{t}**" if bold and t else t for t, bold in cells]
            L.append(f"| {method if i == 0 else ''} | {label} | " + " | ".join(vals) +
                     f" | {'`' + opts + '`' if i == 0 else ''} |")
    L += [""] + [f"Feature variant `{v}`: {describe_variant(v, c.cache.variant_method(v))}."
                 for v in c.cache.variants]
    L += ["", f"Cache fingerprint `{c.fingerprint}`; [back to the report](../README.md).", ""]
    return "\n".join(L)


def every_head_latex(run: str, df: pd.DataFrame, ctx: ReportContext, tolerance) -> str:
    c = next(i for i in ctx.infos if i.run == run)
    body = []
    for method, _, rows in _blocks(df, with_diff=False):
        block = []
        for i, (label, cells) in enumerate(rows):
            vals = []
            for text, bold in cells:
                v = "--" if text in ("–", "") else tex(text)
                vals.append(f"\\textbf{{{v}}}" if bold else v)
            block.append([tex(method) if i == 0 else "", tex(label)] + vals)
        body.append(block)
    caption = f"Every head fitted on {dataset_label(c.dataset, c.imbalance)} ({c.data_label()}), run {run}"
    notes = (f"bold: within {tolerance:g} point of the paper; n/a: no class of that group in the split; "
             "--: no value in the paper.")
    return booktabs(caption, f"tab:heads-{run}", ["Method", ""], [], [METRIC_LABEL[m] for m in METRICS], body,
                    notes)
