"""reports/README.md: the runs behind the numbers, the headline table, which paper cells we reproduce or
miss, the figures inline, and the commands for everything not run."""
from __future__ import annotations

from decimal import Decimal

import numpy as np
import pandas as pd

from .. import __version__, analysis
from ..config import GROUP_NAMES
from .fmt import dec1, diff1, fmt1, fmt_diff
from .everyhead import _paper_methods, _paper_value
from .paper import (DATASET_LABEL, METRIC_LABEL, METRICS, TABLES, TRAIN_PLAIN_DATASETS, TRAIN_PLAIN_SPECS,
                    dataset_label, fmt_beta)
from .runs import ReportContext, budget, inputs_digest, pick_row
from .tables import missing_commands, wide_markdown


def _machine(c) -> str:
    p = c.prov
    parts = [str(p[k]) for k in ("device", "platform", "cpu", "gpu", "hostname") if p.get(k)]
    devs = sorted({str(d) for d in c.rows["device"] if d}) if c.rows is not None and len(c.rows) else []
    s = "; ".join(parts) if parts else "not recorded"
    if devs:
        s += f" (stage 2: {', '.join(devs)})"
    return s


def _recipe_flag(c) -> str:
    devs = c.recipe_deviations()
    return budget(c) + (f" **⚠ NOT THE PAPER'S RECIPE** ({'; '.join(devs)})" if devs else "")


def best_test_epoch(lc: dict) -> dict | None:
    """The stage-1 learning curve's last evaluated epoch (our protocol: the final model) and its first epoch
    of highest All test accuracy (BALMS's protocol: the checkpoint chosen on the test set, so optimistic);
    None when no epoch was evaluated.  Each: epoch and All/Many/Medium/Few (NaN where a group is empty)."""
    acc = np.asarray(lc.get("all", []), dtype=float)
    ev = np.flatnonzero(np.isfinite(acc))
    if not len(ev):
        return None

    def at(i):
        return {"epoch": int(lc["epoch"][i]), **{m: float(np.asarray(lc[m], dtype=float)[i]) if m in lc
                                                 else float("nan") for m in ("all", "many", "medium", "few")}}
    return {"evaluated": len(ev), "final": at(ev[-1]), "best": at(ev[int(np.argmax(acc[ev]))])}


def _best_epoch_section(infos) -> list:
    rows = []
    for c in sorted(infos, key=lambda c: c.run):
        b = best_test_epoch(c.cache.learning_curve() or {})
        if b is None:
            continue
        gain = [fmt_diff(diff1(b["best"][m], b["final"][m])) or "n/a" for m in ("all", "many", "medium", "few")]
        rows.append(f"| `{c.run}` | {b['evaluated']} of {c.epochs} | {b['final']['epoch']} | {b['best']['epoch']} | "
                    f"{' / '.join(gain)} |")
    if not rows:
        return []
    return ["### Stage-1 classifier: final epoch vs best test epoch", "",
            "The tables' Softmax is the **final epoch** (the model is the last one; nothing is chosen on the test "
            "set). BALMS's code, which the paper's stage 1 follows, reports the epoch of best test accuracy, which "
            "is **optimistic** (chosen on the test set). What that choice would add, from each cache's learning "
            "curve (test accuracy evaluated during training, in the training precision; one-decimal values):", "",
            "| run | epochs evaluated | final epoch | best test epoch (optimistic) | best − final: All / Many / Med "
            "/ Few |", "|---|---|---|---|---|"] + rows + [""]


def features_by_class(c) -> pd.DataFrame:
    """Per class of a cache, its ``plain`` features on the training images vs the test images
    (:func:`pipeline.analysis.train_test_gap`): one row per class, accuracies in %, mean feature norms."""
    cache = c.cache
    tx, ty = cache.split("train")
    ex, ey = cache.split("test")
    gap = analysis.train_test_gap(tx, ty, ex, ey, cache.classifier_weight, cache.classifier_bias, cache.num_classes)
    df = pd.DataFrame(dict(run=c.run, fingerprint=c.fingerprint, class_index=np.arange(cache.num_classes),
                           class_name=cache.class_names, train_images=np.asarray(cache.train_counts),
                           group=[GROUP_NAMES[g] for g in cache.groups], **gap))
    return df


def _features_section(per_class: dict) -> list:
    rows = []
    for run, df in per_class.items():
        for g in GROUP_NAMES:
            d = df[df["group"] == g]
            if d.empty:
                continue
            n = d["train_images"]
            rows.append(f"| `{run}` | {g.capitalize()} | {len(d)} | {n.min()}–{n.max()} | "
                        f"{fmt1(d['softmax_train'].mean())} / {fmt1(d['softmax_test'].mean())} | "
                        f"{fmt1(d['ncm_test'].mean())} | {d['norm_train'].mean():.2f} / {d['norm_test'].mean():.2f} |")
    if not rows:
        return []
    return ["### Stage-1 features: training images vs test images", "",
            "Per class group (mean over its classes) of each cache's `plain` features: the training images as "
            "the cache holds them (eval mode, no augmentation) against the test images. A stage 1 that memorises "
            "its tail shows ~100% on the training images there, training-feature norms above the test norms, and "
            "a low NCM test accuracy: the class means of the training features do not sit where the test images "
            "fall. Per class: `stage1/<run>.csv`.", "",
            "| run | group | classes | train images per class | stage-1 classifier: train / test | NCM: test | "
            "mean ‖f(x)‖: train / test |", "|---|---|---|---|---|---|---|"] + rows + [""]


def on_paper_recipe(cells: pd.DataFrame, infos) -> pd.Series:
    """Per table cell: whether it has stage-1 runs and every one of them has the paper's recipe and budget."""
    paper_runs = {c.run for c in infos if not c.recipe_deviations()}
    return cells["runs"].map(lambda v: bool(v) and all(r in paper_runs for r in v.split(";") if r))


def gains_over_softmax(tables: dict, infos, tolerance: float) -> pd.DataFrame:
    """Per paper cell with ours and the paper's value, in a table whose same data and metric also have a
    Softmax cell with both: ours − our Softmax beside paper − the paper's Softmax (one-decimal values).  What a
    head adds on the *same* stage-1 features, apart from how good those features are: a stage-1 gap moves
    every head's cell, the gain isolates stage 2.  One row per distinct cell (the first table that has it)."""
    out = []
    for name, df in tables.items():
        pr = on_paper_recipe(df, infos)
        num = df[df["ours"].map(lambda v: dec1(v) is not None) & df["paper"].map(lambda v: dec1(v) is not None)]
        soft = num[(num["head"] == "softmax") & (num["variant"] == "plain")]
        base = {(r["section"], r["metric"]): r for _, r in soft.iterrows()}
        for i, r in num.iterrows():
            b = base.get((r["section"], r["metric"]))
            if b is None or r["head"] == "softmax" or r["head"] == "":
                continue
            ours, paper = diff1(r["ours"], b["ours"]), diff1(r["paper"], b["paper"])
            out.append(dict(table=name, method=r["method"], section=r["section"], head=r["head"],
                            variant=r["variant"], tau=r["tau"], hparams=r["hparams"], metric=r["metric"],
                            ours_gain=ours, paper_gain=paper, diff=ours - paper,
                            within=abs(ours - paper) <= Decimal(str(tolerance)),
                            paper_recipe=bool(pr[i] and pr[b.name])))
    cols = ["table", "method", "section", "head", "variant", "tau", "hparams", "metric", "ours_gain",
            "paper_gain", "diff", "within", "paper_recipe"]
    df = pd.DataFrame(out, columns=cols)
    return df.drop_duplicates(["section", "head", "variant", "tau", "hparams", "metric"])


def _gains_section(tables: dict, infos, tolerance: float) -> list:
    g = gains_over_softmax(tables, infos, tolerance)
    if g.empty:
        return []
    rows = [f"| {r.method} | {r.section} | {METRIC_LABEL[r.metric]} | {fmt_diff(r.ours_gain)} | "
            f"{fmt_diff(r.paper_gain)} | {fmt_diff(r.diff)} | {'**yes**' if r.within else 'no'} | "
            f"{'yes' if r.paper_recipe else 'no'} | {r.table} |" for r in g.itertuples()]
    pr = g[g["paper_recipe"]]
    return ["### Gains over the stage-1 Softmax, ours vs paper", "",
            "A head's cell minus the Softmax cell of the same data and metric, ours beside the paper's: what the "
            "head adds on the same frozen features, apart from how good the features are (a stage-1 gap moves "
            f"every cell of a cache together). Within {tolerance:g} point: {int(g['within'].sum())} of {len(g)}; "
            f"on the paper's recipe and budget: {int(pr['within'].sum())} of {len(pr)}.", "",
            "| method | data | metric | ours − our Softmax | paper − paper's Softmax | difference | within "
            f"{tolerance:g} | paper's recipe | table |", "|---|---|---|---:|---:|---:|---|---|---|"] + rows + [""]


def train_plain_comparison(ctx: ReportContext) -> pd.DataFrame:
    """Per cache of BALMS's CIFAR datasets and head of TRAIN_PLAIN_SPECS with both fits: the head fitted on the
    training images (the table cell) and on the test images (BALMS's `train_plain`), beside the paper's value
    of the first table with that method and data; one-decimal strings, '' where absent."""
    papers, out = _paper_methods(), []
    for c in sorted(ctx.infos, key=lambda c: c.run):
        if c.dataset not in TRAIN_PLAIN_DATASETS:
            continue
        for spec in TRAIN_PLAIN_SPECS:
            base = spec.without("fit_split")
            leak, own = pick_row(c.rows, spec), pick_row(c.rows, base)
            if leak is None or own is None:
                continue
            method = next((m for _, m, _ in papers.get(base, [])), base.label())
            for m in METRICS:
                paper = _paper_value(papers.get(base, []), c.dataset, c.imbalance, m)[0]
                out.append(dict(run=c.run, paper_recipe=not c.recipe_deviations(), method=method, metric=m,
                                train=fmt1(own[f"_{m}"]), test=fmt1(leak[f"_{m}"]), paper=fmt1(paper),
                                train_fit=own["fit_id"], test_fit=leak["fit_id"]))
    return pd.DataFrame(out, columns=["run", "paper_recipe", "method", "metric", "train", "test", "paper",
                                      "train_fit", "test_fit"])


def _train_plain_section(ctx: ReportContext, tolerance: float) -> list:
    df = train_plain_comparison(ctx)
    if df.empty:
        return []
    L = ["### Stage 2 fitted on the test images: BALMS's CIFAR `train_plain` (a leak; diagnostic, not a result)", "",
         "BALMS's code, whose CIFAR recipe the paper's stage 1 follows, builds the `train_plain` split (the images a "
         "second stage takes class means from: `get_knncentroids`, `centroids_cal`, `--save_feat train_plain`) with "
         "`IMBALANCECIFAR10(phase='train_plain')`, and that class loads the CIFAR **test** set (`train = phase == "
         "\"train\"`). The paper does not say which images its stage 2 read. Each head below is fitted both ways on "
         "the same frozen features and evaluated on the test images: on the training images (our table cell) and "
         "on the test images (`pipeline fit-head --fit-split test`; the long-tailed class counts stay the prior of "
         "+LA and define the groups). Cells: fitted on train / fitted on test / paper.", ""]
    shown = [m for m in METRICS if (df.loc[df["metric"] == m, "test"] != "").any()]
    L += ["| run | method | " + " | ".join(METRIC_LABEL[m] for m in shown) + " |", "|---|---|" + "---|" * len(shown)]
    for (run, method), g in df.groupby(["run", "method"], sort=False):
        by = {r.metric: r for r in g.itertuples()}
        L.append(f"| `{run}` | {method} | " + " | ".join(
            f"{by[m].train or 'n/a'} / {by[m].test or 'n/a'} / {by[m].paper or '–'}" for m in shown) + " |")
    L.append("")
    num = df[(df["paper"] != "") & (df["test"] != "") & (df["train"] != "")]
    pr = num[num["paper_recipe"]]
    for label, sel in (("on the paper's recipe and budget", pr), ("all runs", num if len(num) > len(pr) else pr[:0])):
        if sel.empty:
            continue
        dtr = sel.apply(lambda r: abs(diff1(r["train"], r["paper"])), axis=1)
        dte = sel.apply(lambda r: abs(diff1(r["test"], r["paper"])), axis=1)
        tol = Decimal(str(tolerance))
        L.append(f"- {label.capitalize()} ({len(sel)} cells with a paper value): mean |ours − paper| "
                 f"{fmt1(float(dtr.mean()))} fitted on the training images, {fmt1(float(dte.mean()))} fitted on the "
                 f"test images; within {tolerance:g} point: {int((dtr <= tol).sum())} vs {int((dte <= tol).sum())}.")
    return L + [""]


def recipe_ablations(ctx: ReportContext) -> pd.DataFrame:
    """Per run on another recipe with a twin on the paper's recipe (same dataset, beta, seed and images), each
    Table 7 head fitted on both: one-decimal values and other − paper recipe, per metric with both values."""
    twins = {(c.dataset, c.imbalance, c.seed, c.config.get("data_hash")): c
             for c in ctx.infos if not c.recipe_deviations()}
    t7, out = next(t for t in TABLES if t.name == "table7"), []
    for c in sorted(ctx.infos, key=lambda c: c.run):
        base = twins.get((c.dataset, c.imbalance, c.seed, c.config.get("data_hash")))
        if base is None or base is c:
            continue
        departures = "; ".join(c.recipe_deviations())
        for r in t7.rows:
            a, b = pick_row(base.rows, r.spec), pick_row(c.rows, r.spec)
            for m in METRICS:
                if a is None or b is None or not (np.isfinite(a[f"_{m}"]) and np.isfinite(b[f"_{m}"])):
                    continue
                out.append(dict(run=c.run, base=base.run, departures=departures,
                                method=r.method, metric=m, paper_recipe=fmt1(a[f"_{m}"]), other=fmt1(b[f"_{m}"]),
                                diff=fmt_diff(diff1(b[f"_{m}"], a[f"_{m}"]))))
    return pd.DataFrame(out, columns=["run", "base", "departures", "method", "metric", "paper_recipe", "other",
                                      "diff"])


def _ablation_section(ctx: ReportContext) -> list:
    df = recipe_ablations(ctx)
    if df.empty:
        return []
    L = ["### Stage-1 recipe ablations: the same data and seed on another recipe", "",
         "Each run below shares dataset, β, seed and images with a run on the paper's recipe and departs from it "
         "as listed (`--recipe balms`: BALMS's own code where ours deviates on purpose). Table 7's heads fitted "
         "on both caches; cells: paper's recipe → this run (difference). One seed each: how far another seed "
         "would move a cell is not measured here.", ""]
    for (run, base), g in df.groupby(["run", "base"], sort=False):
        shown = [m for m in METRICS if (g["metric"] == m).any()]
        L += [f"`{run}` vs `{base}` ({g['departures'].iloc[0]}):", "",
              "| method | " + " | ".join(METRIC_LABEL[m] for m in shown) + " |", "|---|" + "---|" * len(shown)]
        for method, h in g.groupby("method", sort=False):
            by = {r.metric: r for r in h.itertuples()}
            L.append(f"| {method} | " + " | ".join(
                f"{by[m].paper_recipe} → {by[m].other} ({by[m].diff})" if m in by else "n/a" for m in shown) + " |")
        L.append("")
    return L


def build_readme(ctx: ReportContext, tables: dict, figures: list, heads: dict | None = None,
                 per_class: dict | None = None) -> str:
    infos, groups, tolerance, cache_root = ctx.infos, ctx.groups, ctx.tolerance, ctx.cache_root
    used_runs = set()
    for df in tables.values():
        for v in df["runs"]:
            used_runs.update(r for r in v.split(";") if r)
    nrows = sum(0 if c.rows is None else len(c.rows) for c in infos)
    L = ["# Reproduction report: Learned Nearest-Class-Mean for long-tailed recognition", "",
         f"Generated by `pipeline report` (toolkit {__version__}) from {len(infos)} cache(s) and the {nrows} fit(s) "
         f"they use under `{cache_root}/` (inputs digest `{inputs_digest(ctx)}`: the caches' fingerprints and "
         "the fits' ids and accuracies). Every file here is a function of those inputs alone, byte-identical "
         "when they are unchanged; when each fit ran and with which commit: `provenance.local.json` (not "
         "tracked).", ""]
    other = [c for c in infos if c.run in used_runs and c.recipe_deviations()]
    if other:
        L += ["> **⚠ NOT THE PAPER'S STAGE-1 RECIPE.** These runs differ from the recipe the paper's numbers come "
              "from (`pipeline extract --recipe paper` for CIFAR-LT): " + "; ".join(
                  f"`{c.run}` ({', '.join(c.recipe_deviations())})" for c in other)
              + ". Numbers from them are not comparable one-to-one with the paper.", ""]
    jpeg = [c for c in infos if c.run in used_runs and c.data_label() == "CIFAR-10 (JPEG q75)"]
    if jpeg:
        # not "slightly below lossless": with no lossless copy offline that gap is unmeasured (README, deviations)
        L += ["> CIFAR-10 numbers come from **CIFAR-10 (JPEG q75)** (the offline copy re-encoded as JPEG quality 75); "
              "how far that moves them from numbers on the lossless images is not measured here.", ""]
    L += ["## Runs behind the numbers", ""]
    if infos:
        L += ["| run | dataset | data | β | stage-1 budget | seed | variants | machine | created | commit | "
              "fingerprint | fits used | stale fit rows | in tables |", "|" + "---|" * 14]
        for c in sorted(infos, key=lambda c: c.run):
            L.append(f"| `{c.run}` | {DATASET_LABEL.get(c.dataset, c.dataset)} | {c.data_label()} | "
                     f"{fmt_beta(c.imbalance) if c.imbalance else 'natural'} | {_recipe_flag(c)} | {c.seed} | "
                     f"{', '.join(c.cache.variants)} | {_machine(c)} | {c.prov.get('created', '')} | "
                     f"`{c.prov.get('git_commit', '')}` | `{c.fingerprint}` | "
                     f"{len(c.rows) if c.rows is not None else 0} | {c.stale_rows} | "
                     f"{'yes' if c.run in used_runs else 'no'} |")
        L.append("")
        multi = [g for g in groups if len(g.caches) > 1]
        for g in multi:
            L.append(f"- {dataset_label(g.dataset, g.imbalance)}: {len(g.caches)} stage-1 seeds "
                     f"({', '.join(str(c.seed) for c in g.caches)}) averaged: mean ± std (ddof=1).")
        if multi:
            L.append("")
        L += _best_epoch_section(infos)
        L += _features_section(per_class or {})
    else:
        L += [f"No caches under `{cache_root}/`: every table cell below is \"not run\".", ""]
    # headline
    L += ["## Headline: Table 2 (All accuracy), ours vs paper", "",
          "Accuracy (%), one decimal; per method the paper's value, ours and ours − paper; **bold** = within "
          f"{tolerance:g} point of the paper; not run = no cache or fit yet (commands under *Not run*).", "",
          wide_markdown(tables["table2"]), ""]
    # reproduction summary
    allc = pd.concat(tables.values(), ignore_index=True)
    L += ["## Which paper cells we reproduce", "",
          f"Tolerance: |ours − paper| ≤ {tolerance:g} point (All/Many/Medium/Few accuracy, %). The last two "
          "columns count only the cells whose every stage-1 run has the paper's recipe and budget: the "
          "fidelity of this toolkit; a cell from a shorter run is no verdict on it.", "",
          "| table | reproduced | missed | not run | ours only | literature / unmapped | reproduced, paper's recipe "
          "| missed, paper's recipe |", "|---|---|---|---|---|---|---|---|"]
    for name, df in tables.items():
        st, pr = df["status"], on_paper_recipe(df, infos)
        L.append(f"| [{name}]({name}.md) | {(st == 'reproduced').sum()} | {(st == 'missed').sum()} | "
                 f"{(st == 'not run').sum()} | {st.str.startswith('ours only').sum() + (st == 'empty group').sum()} | "
                 f"{st.str.startswith('literature').sum() + st.str.startswith('paper only').sum()} | "
                 f"{((st == 'reproduced') & pr).sum()} | {((st == 'missed') & pr).sum()} |")
    L.append("")
    for label, status in (("Reproduced", "reproduced"), ("Missed", "missed")):
        sel = allc[allc["status"] == status].copy()
        if sel.empty:
            L += [f"**{label}:** none.", ""]
            continue
        # the same cell (method, data, metric, paper value) often appears in several tables: list it once
        key = ["section", "head", "variant", "tau", "hparams", "metric", "paper"]
        sel["_tables"] = sel.groupby(key, sort=False)["table"].transform(lambda v: ", ".join(dict.fromkeys(v)))
        sel = sel.drop_duplicates(key)
        sel["_ad"] = sel["diff"].astype(float).abs()
        sel = sel.sort_values(["_ad", "section", "method", "metric"],
                              ascending=[status == "reproduced", True, True, True])
        L += [f"**{label}** ({len(sel)} distinct cells, by |ours − paper|):", "",
              "| method | data | metric | ours | paper | ours − paper | std over seeds | seeds | tables |",
              "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for _, r in sel.iterrows():
            L.append(f"| {r['method']} | {r['section']} | {METRIC_LABEL[r['metric']]} | {r['ours']} | {r['paper']} | "
                     f"{r['diff']} | {r['ours_std']} | {r['n_seeds']} | {r['_tables']} |")
        L.append("")
    L += _gains_section(tables, infos, tolerance)
    L += _train_plain_section(ctx, tolerance)
    L += _ablation_section(ctx)
    # figures
    L += ["## Figures", ""]
    for f in figures:
        L.append(f"### {f.title}")
        L.append("")
        if f.files:
            png, pdf, csv, side = ([p for p in f.files if p.endswith(ext)][0] for ext in (".png", ".pdf", ".csv", ".json"))
            L += [f"![{f.title}]({png})", "", f"{f.caption}", "",
                  f"Vector: [{pdf}]({pdf}); data: [{csv}]({csv}); title, caption and provenance: [{side}]({side}).", ""]
        else:
            L += [f"Not produced: {f.skipped}", ""]
    # not run
    cmds = missing_commands(allc)
    L += ["## Not run", ""]
    if cmds:
        L += ["Commands that would fill the missing table cells, stage 1 first (`run_all.sh --extract-missing` runs "
              "the `pipeline extract` lines whose data root is known, then `run_all.sh` fits every head):", "",
              "```"] + cmds + ["```", ""]
    else:
        L += ["Every table cell that this toolkit can run has a value.", ""]
    unused = [c for c in infos if c.run not in used_runs]
    if unused:
        L += ["Caches present but not used by any table (another configuration was preferred, or the paper "
              "has no table for them): " + ", ".join(f"`{c.run}`" for c in unused) + ".", ""]
    L += ["## Tables", ""] + [f"- [{t.title}]({t.name}.md) ([csv]({t.name}.csv), [LaTeX]({t.name}.tex))"
                              for t in TABLES] + [""]
    L += ["## Every head fitted, per cache", "",
          "All / Many / Medium / Few of every head, feature variant, τ and setting fitted on each cache (also "
          "those in none of the paper's tables on this dataset: τ-norm, LWS, post-hoc logit adjustment, the "
          "metric-NCM variants, the BN-recalibrated features, the τ sweep), beside the paper's value where it "
          "has one:", ""]
    if heads:
        for run, df in heads.items():
            L.append(f"- [`{run}`](heads/{run}.md) ([csv](heads/{run}.csv), [LaTeX](heads/{run}.tex)): "
                     f"{df['fit_id'].nunique()} fits")
    else:
        L.append("- none: no cache has a fit yet (`./run_all.sh` fits every head the tables need)")
    L.append("")
    if ctx.warnings:
        L += ["## Warnings", ""] + [f"- {w}" for w in ctx.warnings] + [""]
    return "\n".join(L)


