"""The paper's figures from the caches and fit artifacts.  Each figure is a PNG plus the CSV of the numbers
behind it (plain: ``pandas.read_csv`` reads it as it is), written together by :func:`write_figure`, and a
sidecar ``<stem>.json`` with its title, caption and where every number came from (source cache fingerprint,
stage-1 seed, budget and commit, fit ids) -- all functions of the inputs, so a rerun is byte-identical."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import analysis
from ..cache import CACHE_FILE
from ..utils import UserError, atomic_path
from ..stage1.runinfo import precision_history
from .paper import DATASET_LABEL, METRIC_LABEL, METRICS, TAU_SWEEP, H, dataset_label, fmt_beta
from .fmt import fmt1
from .runs import ReportContext, as_float, budget, expected_run, fit_command, pick_row


def _plt():
    import matplotlib  # only when a figure is drawn
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "lncm", "figure.dpi": 100, "font.size": 10, "axes.titlesize": 11,
                         "axes.labelsize": 10, "xtick.labelsize": 9, "ytick.labelsize": 9, "legend.fontsize": 9,
                         "pdf.fonttype": 42, "ps.fonttype": 42})  # TrueType in the PDF: editable text
    return plt


PNG_DPI = 200


def source(c) -> dict:
    """Where a figure's numbers come from: the cache, its identity and the stage-1 run that made it."""
    return {"cache": f"{c.rel}/{CACHE_FILE}", "fingerprint": c.fingerprint, "dataset": c.dataset,
            "imbalance": fmt_beta(c.imbalance) if c.imbalance else "natural", "stage1_epochs": c.epochs,
            "stage1_iterations": c.config.get("iterations"), "seed": c.seed,
            "recipe": c.config.get("recipe") or "not recorded", "stage1_commit": c.prov.get("git_commit", ""),
            "data": c.data_label()}


def write_figure(fr, figdir: Path, stem: str, fig, df: pd.DataFrame, what: str, caches, extra=()) -> list:
    """Write ``<stem>.png`` (PNG_DPI), ``<stem>.pdf`` (vector) and ``<stem>.csv`` (the numbers behind it, a
    plain CSV) atomically and set ``fr.files``; ``what`` the figure shows, its source caches and any
    ``extra`` lines go to ``fr.meta``, which :func:`build_figures` writes with the title and caption into the
    sidecar ``<stem>.json``.  No date or software version in the files: same inputs, same bytes."""
    plt = _plt()
    # bbox_inches="tight" once for both files: savefig would lay the figure out to find the box for each
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    with atomic_path(figdir / f"{stem}.png", suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=PNG_DPI, bbox_inches=box, metadata={"Software": None})
    with atomic_path(figdir / f"{stem}.pdf", suffix=".pdf") as tmp:
        fig.savefig(tmp, format="pdf", bbox_inches=box,
                    metadata={"Creator": None, "Producer": None, "CreationDate": None})
    plt.close(fig)
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    with atomic_path(figdir / f"{stem}.csv", suffix=".csv") as tmp:
        tmp.write_text(buf.getvalue())
    fr.files = [f"figures/{stem}.png", f"figures/{stem}.pdf", f"figures/{stem}.csv"]
    fr.meta = {"what": what, "sources": [source(c) for c in caches], "notes": list(extra)}
    return fr.files


def title_ds(g) -> str:
    """The dataset part of a figure title, kept short (the provenance goes to the caption: stage1_note)."""
    return dataset_label(g.dataset, g.imbalance)


def stage1_note(c) -> str:
    """Where the features of a figure come from, for its caption."""
    s = f"run `{c.run}`; stage 1: {budget(c)}, recipe {c.config.get('recipe') or 'not recorded'}; {c.data_label()}"
    devs = c.recipe_deviations()
    return s + (f"; **not the paper's stage-1 recipe** ({', '.join(devs)})" if devs else "")


@dataclass
class FigureResult:
    name: str
    title: str
    files: list = field(default_factory=list)
    skipped: str = ""  # reason + command when not produced
    caption: str = ""
    meta: dict = field(default_factory=dict)  # provenance for the sidecar <stem>.json


def _fit_artifacts(ctx: ReportContext, prefs, spec):
    """(group, cache, row, artifact) for each cache of the preferred groups, in order, whose chosen fit row
    for ``spec`` has a readable artifact (the figures that draw from a fit's saved parameters)."""
    for g in ctx.pref_groups(prefs):
        for c in g.caches:
            r = pick_row(c.rows, spec)
            art = _artifact(c, r) if r is not None else None
            if art is not None:
                yield g, c, r, art


def _artifact(c, row):
    rel = str(row.get("artifact", "") or "")
    if not rel:
        return None
    p = c.dir / rel
    if not p.exists():
        return None
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------
# The figures

def start_tsne(ctx: ReportContext, per_class=300):
    """Figure 1's t-SNE started in the background: fig_tsne(..., started=) draws it after the other figures."""
    for g in ctx.pref_groups([("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0)]):
        c = g.caches[0]
        if c.cache.num_classes >= 3:
            classes = analysis.tsne_classes(c.cache.train_counts)
            x, y = c.cache.split("train", "plain")
            return g, c, classes, analysis.tsne_embed_start(x, y, classes, max_per_class=per_class, random_state=0)
    return None


def fig_tsne(ctx: ReportContext, figdir, per_class=300, started=None) -> FigureResult:
    fr = FigureResult("fig1", "Figure 1: t-SNE of one tail and two head classes")
    started = start_tsne(ctx, per_class) if started is None else started
    if started:
        g, c, (tail, h1, h2), future = started
        emb, lab, idx = future.result()
        names = c.cache.class_names
        counts = c.cache.train_counts
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for cl, col, kind in ((h1, "tab:blue", "head"), (h2, "tab:green", "head"), (tail, "tab:red", "tail")):
            m = lab == cl
            ax.scatter(emb[m, 0], emb[m, 1], s=10, c=col, alpha=0.7,
                       label=f"{names[cl]} ({kind}, N={int(counts[cl])})")
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_title(f"t-SNE of train features, {title_ds(g)}")
        ax.legend()
        sp = analysis.spread(emb, lab)
        df = pd.DataFrame({"index": idx, "label": lab, "class": [names[i] for i in lab],
                           "train_count": [int(counts[i]) for i in lab], "tsne_x": emb[:, 0], "tsne_y": emb[:, 1]})
        write_figure(
            fr, figdir, "fig1_tsne", fig, df,
            f"fig1: t-SNE (sklearn, random_state=0, <={per_class} train samples per class) of one tail and two "
            "head classes", [c],
            ["mean distance to 2-D class centre: " + ", ".join(f"{names[k]} {v:.3f}" for k, v in sp.items())])
        fr.caption = (f"{title_ds(g)} ({stage1_note(c)}): tail class {names[tail]} (N={int(counts[tail])}) vs head "
                      f"classes {names[h1]}, {names[h2]}; mean 2-D spread " +
                      ", ".join(f"{names[k]} {v:.2f}" for k, v in sp.items()) + ".")
        return fr
    fr.skipped = "no cache; produce one with `" + ctx.extract_command("cifar10-lt", 200) + "`"
    return fr


VAR_FIGS = (("fig2", "cifar10-lt", "Figure 2"), ("fig7", "cifar100-lt", "Figure 7"), ("fig8", "cifar20-lt", "Figure 8"))


def fig_variance(ctx: ReportContext, figdir, fig, dataset, label) -> FigureResult:
    fr = FigureResult(fig, f"{label}: intra-class variance vs class size, {DATASET_LABEL[dataset]}")
    betas = sorted({g.imbalance for g in ctx.groups if g.dataset == dataset and g.imbalance is not None},
                   reverse=True)
    chosen = [ctx.choose_group(dataset, b) for b in betas]
    if not chosen:
        fr.skipped = "no cache; produce with " + " ; ".join(
            f"`{ctx.extract_command(dataset, b)}`" for b in (200, 100, 10))
        return fr
    plt = _plt()
    fig_, axes = plt.subplots(1, len(chosen), figsize=(5 * len(chosen), 4.2), squeeze=False)
    frames, captions = [], []
    for ax, g in zip(axes[0], chosen):
        c = g.caches[0]
        x, y = c.cache.split("train", "plain")
        res = analysis.variance_analysis(x, y, c.cache.train_counts)
        counts = res["counts"]
        for est, marker in zip(analysis.ESTIMATORS, ("o", "s", "^")):
            ax.scatter(counts, res["sigma"][est], s=16, marker=marker, alpha=0.75,
                       label=f"{analysis.ESTIMATOR_LABELS[est]} (Spearman ρ={res['rho'][est]:.2f})")
        ax.set_xscale("log")
        ax.set_xlabel("class size $N_y$ (train images, log scale)")
        ax.set_ylabel("intra-class variance $\\sigma_y$ (largest eigenvalue)")
        ax.set_title(f"β={fmt_beta(g.imbalance)}")
        ax.legend(fontsize=8, loc="best", framealpha=0.8)
        df = pd.DataFrame({"imbalance": fmt_beta(g.imbalance), "run": c.run, "fingerprint": c.fingerprint,
                           "class": np.arange(len(counts)), "class_name": c.cache.class_names,
                           "train_count": counts})
        for est in analysis.ESTIMATORS:
            df[f"sigma_{est}"] = res["sigma"][est]
        frames.append((df, c, res))
        captions.append(f"β={fmt_beta(g.imbalance)} ({stage1_note(c)}): Spearman ρ(N_y, σ_y) = " + ", ".join(
            f"{analysis.ESTIMATOR_LABELS[e]} {res['rho'][e]:.2f}" for e in analysis.ESTIMATORS))
    fig_.suptitle(f"Intra-class variance vs class size, {DATASET_LABEL[dataset]}")
    extra = [f"spearman rho(N_y, sigma_y) beta={fmt_beta(c.imbalance)}: " + ", ".join(
        f"{e} {res['rho'][e]:.4f} (p={res['pvalue'][e]:.3g}, n={res['n'][e]})" for e in analysis.ESTIMATORS)
        for _, c, res in frames]
    write_figure(fr, figdir, f"{fig}_variance_{dataset}", fig_, pd.concat([f for f, _, _ in frames], ignore_index=True),
                 f"{fig}: sigma_y = largest eigenvalue of the class covariance (Eq. 1) per estimator",
                 [c for _, c, _ in frames], extra)
    fr.caption = "Train features of stage 1. " + "; ".join(captions) + "."
    missing = [b for b in (200.0, 100.0, 10.0) if b not in betas]
    if missing:
        fr.caption += " Not run: " + " ; ".join(f"`{ctx.extract_command(dataset, b)}`" for b in missing) + "."
    return fr


def fig_local_projection(ctx: ReportContext, figdir) -> FigureResult:
    fr = FigureResult("fig3", "Figure 3: learned local projections (sigmoid weights per eigendimension)")
    spec = H("local-projection")
    prefs = [("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0)]
    for g, c, r, art in _fit_artifacts(ctx, prefs, spec):
        if "local_weights" not in art:
            continue
        w = np.asarray(art["local_weights"], dtype=np.float64)
        counts = c.cache.train_counts
        names = list(c.cache.class_names)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(8, max(3.0, 0.32 * w.shape[0] + 1.5)))
        im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xlabel("eigendimension $i$ (ascending eigenvalue of $\\Sigma_y$)")
        ax.set_ylabel("class $y$ (train images $N_y$)")
        if w.shape[0] <= 40:  # class names; more classes would not be legible
            ax.set_yticks(range(w.shape[0]))
            ax.set_yticklabels([f"{names[i]} ({int(n)})" for i, n in enumerate(counts)])
        ax.set_title(f"Local projection weights, {title_ds(g)}")
        fig.colorbar(im, ax=ax, label="$\\sigma(w_y^i)$")
        df = pd.DataFrame(w, columns=[f"dim{i}" for i in range(w.shape[1])])
        df.insert(0, "train_count", counts)
        df.insert(0, "class_name", names)
        df.insert(0, "class", np.arange(w.shape[0]))
        write_figure(fr, figdir, "fig3_local_projection", fig, df,
                     f"fig3: local-projection sigmoid weights, fit_id {r['fit_id']} (hparams {r['hparams']})", [c])
        half = w.shape[1] // 2
        top = w[:, half:].mean(1)
        fr.caption = (f"{title_ds(g)} ({stage1_note(c)}), fit `{r['fit_id']}`: sigmoid weight σ(w_y^i) per class "
                      f"and eigendimension. Mean weight of the upper half "
                      f"of eigendimensions: head class {names[int(np.argmax(counts))]} "
                      f"{top[int(np.argmax(counts))]:.2f}, tail class {names[int(np.argmin(counts))]} "
                      f"{top[int(np.argmin(counts))]:.2f}.")
        return fr
    fr.skipped = ("no local-projection fit with weights; produce with `"
                  + ctx.fit_or_extract("cifar10-lt", 200.0, spec) + "`")
    return fr


def finite_curve(epochs, values):
    """The evaluated points of a learning-curve column: stage 1 logs test accuracy every --eval-every
    epochs and NaN in between, and matplotlib draws no line through NaN-separated points."""
    y = np.asarray(values, dtype=float)
    ok = np.isfinite(y)
    return np.asarray(epochs, dtype=float)[ok], y[ok]


def fig_learning_curve(ctx: ReportContext, figdir) -> FigureResult:
    fr = FigureResult("fig4", "Figure 4: stage-1 learning curve (test accuracy per group)")
    for g in ctx.pref_groups([("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar10-lt", 200.0)]):
        c = g.caches[0]
        lc = c.cache.learning_curve()
        if not lc or "epoch" not in lc or len(lc["epoch"]) == 0:
            continue
        spe = c.config.get("steps_per_epoch")
        epochs = np.asarray(lc["epoch"], dtype=float)
        steps = epochs * int(spe) if spe else epochs  # the budget in iterations, as the recipes define it
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        cols = {}
        for m, style in (("many", "-"), ("medium", "--"), ("few", ":"), ("all", "-")):
            x, y = finite_curve(steps, lc.get(m, []))
            if len(y):
                ax.plot(x, y, style, label=METRIC_LABEL[m] if m != "medium" else "Medium",
                        lw=2.2 if m == "all" else 1.5)
                cols[m] = y
        ax.set_ylabel("test accuracy (%)")
        if spe:
            ax.set_xlabel("stage-1 iteration")
            top = ax.secondary_xaxis("top", functions=(lambda it, k=int(spe): it / k, lambda e, k=int(spe): e * k))
            top.set_xlabel("epoch")
        else:
            ax.set_xlabel("stage-1 epoch")
        ax.set_title(f"Stage-1 learning curve, {title_ds(g)}")
        ax.legend()
        data = {k: np.asarray(v) for k, v in lc.items()}
        if spe:
            data = {"iteration": steps.astype(np.int64), **data}
        write_figure(fr, figdir, "fig4_learning_curve", fig, pd.DataFrame(data),
                     "fig4: stage-1 learning curve (test accuracy evaluated during training)", [c])
        segs = c.config.get("precision_segments") or []  # [[epochs done before, precision], ...] when it changed
        precision = (precision_history(segs, c.epochs) if len(segs) > 1
                     else c.config.get("precision") or "not recorded")
        fr.caption = (f"{title_ds(g)} ({stage1_note(c)}): test accuracy evaluated during training, every "
                      f"{c.config.get('eval_every') or '?'} epochs, in the training precision ({precision}).")
        soft = pick_row(c.rows, H("softmax"))
        if soft is not None:  # one number for the softmax accuracy in the whole report: the tables' one
            shown = [m for m in METRICS if fmt1(soft[f"_{m}"])]
            agree = all(m in cols and fmt1(cols[m][-1]) == fmt1(soft[f"_{m}"]) for m in shown)
            fr.caption += (" The accuracy of this stage-1 classifier that the tables use (Softmax, on the cache's "
                           "fp32 features) is " + ", ".join(f"{METRIC_LABEL[m]} {fmt1(soft[f'_{m}'])}" for m in shown)
                           + ("; the curve's last point agrees." if agree else
                              "; the curve's last point differs slightly (it was evaluated in the training "
                              "precision)."))
        else:
            last = {k: fmt1(np.asarray(v)[-1]) for k, v in cols.items()}
            fr.caption += " Last point: " + ", ".join(f"{METRIC_LABEL[k]} {v}" for k, v in last.items()) + "."
        return fr
    fr.skipped = ("no cache with a learning curve; produce with `" + ctx.extract_command("cifar100-lt", 200)
                  + "`")
    return fr


def fig_tau(ctx: ReportContext, figdir) -> FigureResult:
    fr = FigureResult("fig5", "Figure 5: effect of the logit-adjustment weight τ (Learned NCM)")
    labels = ["0", "1/16", "1/8", "1/4", "1/2", "1"]
    for g in ctx.pref_groups([("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar100-lt", 10.0)]):
        recs = []
        missing = []
        for tau, lab in zip(TAU_SWEEP, labels):
            spec = H("learned-ncm", tau)
            rows = [(c, pick_row(c.rows, spec)) for c in g.caches]
            got = [(c, r) for c, r in rows if r is not None]
            missing += [fit_command(c.rel, spec) for c, r in rows if r is None]
            if not got:
                continue
            rec = {"tau": tau, "tau_label": lab, "n_seeds": len(got),
                   "fit_ids": ";".join(str(r["fit_id"]) for _, r in got),
                   "runs": ";".join(c.run for c, _ in got)}
            for m in METRICS:
                v = np.array([as_float(r[f"_{m}"]) for _, r in got])
                rec[m] = float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
            recs.append(rec)
        if len(recs) < 2:
            continue
        df = pd.DataFrame(recs)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        xs = [labels.index(lab) for lab in df["tau_label"]]
        for m in METRICS:
            if np.isfinite(df[m]).any():
                ax.plot(xs, df[m], "o-", label="Medium" if m == "medium" else METRIC_LABEL[m])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels)
        ax.set_xlabel("logit-adjustment weight τ")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Effect of τ, Learned NCM, {title_ds(g)}")
        ax.legend()
        write_figure(fr, figdir, "fig5_tau", fig, df, "fig5: learned-ncm accuracy vs tau (mean over seeds)", g.caches)
        fr.caption = (f"{title_ds(g)} ({'; '.join(stage1_note(c) for c in g.caches)}): Learned NCM test accuracy "
                      f"(mean over stage-1 seeds) for τ = {', '.join(df['tau_label'])}.")
        if missing:
            fr.caption += " Not run: " + " ; ".join(f"`{m}`" for m in missing) + "."
        return fr
    g = ctx.choose_group("cifar100-lt", 200.0)
    cmds = ([fit_command(g.caches[0].rel, H("learned-ncm", t)) for t in TAU_SWEEP] if g else
            [ctx.extract_command("cifar100-lt", 200)] +
            [fit_command(ctx.rel(expected_run("cifar100-lt", 200)), H("learned-ncm", t)) for t in TAU_SWEEP])
    fr.skipped = "fewer than two τ values fitted; produce with " + " ; ".join(f"`{c}`" for c in cmds)
    return fr


def fig_centroids(ctx: ReportContext, figdir) -> list:
    fa = FigureResult("fig6a", "Figure 6a: displacement of learned from empirical centroids")
    fb = FigureResult("fig6b", "Figure 6b: CDNV of Learned NCM per epoch")
    spec = H("learned-ncm")
    prefs = [("cifar100-lt", 200.0), ("cifar10-lt", 200.0), ("cifar100-lt", 100.0)]
    for g, c, r, art in _fit_artifacts(ctx, prefs, spec):
        counts = np.asarray(art.get("train_counts", c.cache.train_counts))
        fit = f"fit_id {r['fit_id']} (learned-ncm, tau 0, plain, hparams {r['hparams']})"
        if not fa.files and "centroids" in art and "empirical_centroids" in art:
            disp = analysis.centroid_displacement(art["centroids"], art["empirical_centroids"])
            rho, p, n = analysis.spearman(counts, disp)
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.scatter(counts, disp, s=14)
            ax.set_xscale("log")
            ax.set_xlabel("class size $N_y$ (train images, log scale)")
            ax.set_ylabel("‖learned − empirical centroid‖₂")
            ax.set_title(f"Centroid displacement, {title_ds(g)}")
            ax.text(0.02, 0.97, f"Spearman ρ = {rho:.2f}", transform=ax.transAxes, va="top")
            df = pd.DataFrame({"class": np.arange(len(counts)), "train_count": counts, "displacement": disp})
            write_figure(fa, figdir, "fig6a_displacement", fig, df,
                         f"fig6a: ||learned - empirical centroid||_2 per class; {fit}", [c],
                         [f"spearman rho(N_y, displacement) {rho:.4f} (p={p:.3g}, n={n})"])
            fa.caption = (f"{title_ds(g)} ({stage1_note(c)}), fit `{r['fit_id']}`: Spearman ρ(N_y, displacement)"
                          f" = {rho:.2f}; mean displacement {float(np.mean(disp)):.3f}.")
        if not fb.files and "cdnv_per_epoch" in art and np.asarray(art["cdnv_per_epoch"]).size:
            cd = np.asarray(art["cdnv_per_epoch"], dtype=np.float64).ravel()
            data = {"epoch": np.arange(len(cd)), "cdnv": cd}
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(data["epoch"], cd, "o-", ms=3, label="Var_y around the learned centroid")
            fixed = np.asarray(art.get("cdnv_fixed_var_per_epoch", []), dtype=np.float64).ravel()
            if fixed.size == cd.size:
                data["cdnv_fixed_var"] = fixed
                ax.plot(data["epoch"], fixed, "s--", ms=3, label="Var_y fixed at the empirical variance")
                ax.legend()
            ax.set_xlabel("Learned NCM epoch (0 = empirical centroids)")
            ax.set_ylabel("average pairwise CDNV")
            ax.set_title(f"CDNV during Learned NCM training, {title_ds(g)}")
            write_figure(fb, figdir, "fig6b_cdnv", fig, pd.DataFrame(data),
                         "fig6b: average pairwise CDNV per epoch (index 0 = empirical centroids); " + fit, [c])
            fb.caption = (f"{title_ds(g)} ({stage1_note(c)}), fit `{r['fit_id']}`: CDNV {cd[0]:.4f} (empirical) → "
                          f"{cd[-1]:.4f} after {len(cd) - 1} epochs.")
        if fa.files and fb.files:
            return [fa, fb]
    cmd = ctx.fit_or_extract("cifar100-lt", 200.0, spec)
    for f in (fa, fb):
        if not f.files:
            f.skipped = f"no learned-ncm fit artifact with the needed arrays; produce with `{cmd}`"
    return [fa, fb]


FIG_FILES = ("fig1_tsne", "fig2_variance_cifar10-lt", "fig7_variance_cifar100-lt", "fig8_variance_cifar20-lt",
             "fig3_local_projection", "fig4_learning_curve", "fig5_tau", "fig6a_displacement", "fig6b_cdnv")


def build_figures(ctx: ReportContext, out_dir: Path, tsne_per_class=300) -> list:
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)  # a fresh folder (build_report swaps it in when complete)
    try:  # computed while the other figures are drawn, drawn last
        tsne = start_tsne(ctx, tsne_per_class)
    except (ValueError, UserError, np.linalg.LinAlgError):
        tsne = None  # fig_tsne starts it again in its job below, which reports the error
    jobs = [(fig, lambda fig=fig, ds=ds, label=label: fig_variance(ctx, figdir, fig, ds, label))
            for fig, ds, label in VAR_FIGS]
    jobs += [("fig3", lambda: fig_local_projection(ctx, figdir)), ("fig4", lambda: fig_learning_curve(ctx, figdir)),
             ("fig5", lambda: fig_tau(ctx, figdir)), ("fig6", lambda: fig_centroids(ctx, figdir)),
             ("fig1", lambda: fig_tsne(ctx, figdir, tsne_per_class, started=tsne))]
    results = []
    for name, job in jobs:
        try:
            r = job()
        except (ValueError, UserError, np.linalg.LinAlgError) as e:
            ctx.warnings.append(f"{name}: could not be drawn ({type(e).__name__}: {e})")
            r = FigureResult(name, name, skipped=f"failed: {e}")
        results += r if isinstance(r, list) else [r]
    for r in results:  # the sidecar: title, caption and provenance (the PNG and CSV carry none)
        if r.files:
            stem = Path(r.files[0]).stem
            side = {"figure": r.name, "title": r.title, "caption": r.caption,
                    "files": [Path(f).name for f in r.files], **r.meta}
            with atomic_path(figdir / f"{stem}.json", suffix=".json") as tmp:
                tmp.write_text(json.dumps(side, indent=1, ensure_ascii=False, default=str) + "\n")
            r.files.append(f"figures/{stem}.json")
    order = {"fig1": 1, "fig2": 2, "fig3": 3, "fig4": 4, "fig5": 5, "fig6a": 6, "fig6b": 6.5, "fig7": 7, "fig8": 8}
    return sorted(results, key=lambda f: order.get(f.name, 99))
