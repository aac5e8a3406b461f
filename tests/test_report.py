"""Reports (pipeline.report, run_all.sh) on small synthetic caches with hand-written fit rows.

The fit rows follow stage 2's results.csv contract (columns, npz artifacts) without calling stage 2, so
these tests do not depend on pipeline.stage2.fit; the end-to-end run_all.sh test further down does.
"""
import csv
import json
import os
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import report as rp
from pipeline.cache import read_cache, run_name, write_cache
from pipeline.synthetic import make_synthetic_cache

REPO = Path(__file__).resolve().parent.parent
PNG_SIG = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# helpers: a results.csv row + artifact exactly as `pipeline fit-head` writes them

def write_fit(cache_dir, head, *, variant="plain", tau=0.0, hparams=None, acc=None, fit_id=None,
              timestamp="2024-01-01T00:00:00+00:00", fingerprint=None, seed=0):
    cache_dir = Path(cache_dir)
    c = read_cache(cache_dir)
    p = c.provenance
    hparams = dict(hparams or {})
    fit_id = fit_id or (f"{head}-{variant}-{tau:g}-{zlib.crc32(json.dumps(hparams, sort_keys=True).encode()):08x}-"
                        f"{timestamp[:19].replace(':', '')}")
    acc = dict(acc or {})
    base = 50.0 + 10 * tau + len(head) + (3 if variant == "bn_recal" else 0) + len(json.dumps(hparams)) / 10
    vals = {m: acc.get(m, base + i) for i, m in enumerate(("all", "many", "medium", "few"))}
    groups = c.groups
    for g, m in enumerate(("many", "medium", "few")):
        if not (groups == g).any():
            vals[m] = None
    C = c.num_classes
    d = c.split("train", "plain")[0].shape[1]
    rng = np.random.default_rng(zlib.crc32(fit_id.encode()))
    arrays = dict(per_class_acc=rng.uniform(0, 1, C), train_counts=c.train_counts)
    if head in ("ncm", "learned-ncm", "multi-ncm", "metric-ncm"):
        emp = rng.normal(size=(C, d))
        arrays.update(empirical_centroids=emp, centroids=emp + rng.normal(scale=0.3, size=(C, d)))
    if head == "learned-ncm":
        arrays["cdnv_per_epoch"] = np.linspace(0.5, 0.2, 6)
    if head == "multi-ncm":
        arrays["displacements"] = rng.normal(size=(4, d))
    if head == "local-projection":
        arrays["local_weights"] = rng.uniform(0, 1, (C, d))
    (cache_dir / "fits").mkdir(exist_ok=True)
    np.savez(cache_dir / "fits" / f"{fit_id}.npz", **arrays)
    row = dict(fit_id=fit_id, timestamp=timestamp, head=head, variant=variant, tau=tau, seed=seed,
               hparams=json.dumps(hparams, sort_keys=True), cache_path=str(cache_dir / "features.h5"),
               cache_fingerprint=fingerprint or c.variant_fingerprint(variant), dataset=p["dataset"], imbalance=p["imbalance"],
               backbone=p["backbone"], train_seed=p["seed"], stage1_epochs=p["epochs"],
               **{f"acc_{m}": ("" if v is None else f"{v:.4f}") for m, v in vals.items()},
               fit_seconds=1.5, device="cpu", git_commit="abc123", artifact=f"fits/{fit_id}.npz")
    path = cache_dir / "results.csv"
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rp.RESULT_COLUMNS))
        if new:
            w.writeheader()
        w.writerow(row)
    return fit_id


ALL_FITS = [("softmax", {}, "plain", 0.0), ("ncm", {}, "plain", 0.0), ("learned-ncm", {}, "plain", 0.0),
            ("learned-ncm", {}, "plain", 0.125), ("multi-ncm", {}, "plain", 0.0),
            ("multi-ncm", {}, "plain", 0.125), ("local-projection", {}, "plain", 0.0),
            ("metric-ncm", {"metric": "global"}, "plain", 0.0), ("metric-ncm", {"metric": "local"}, "plain", 0.0),
            ("crt", {}, "plain", 0.0), ("tau-norm", {}, "plain", 0.0), ("lws", {}, "plain", 0.0),
            ("posthoc-la", {}, "plain", 1.0)] + [("learned-ncm", {}, "plain", t) for t in (0.0625, 0.25, 0.5, 1.0)]


def make_cache(root, dataset, beta, seed=0, bn=True, num_classes=10, dim=8, n_max=300):
    d = Path(root) / run_name(dataset, beta, "synthetic", seed)
    d.mkdir(parents=True, exist_ok=True)
    make_synthetic_cache(d / "features.h5", dataset=dataset, num_classes=num_classes, dim=dim, imbalance=beta,
                         n_max=n_max, n_test=20, seed=seed, bn_recal=bn, tail_spread=3.0)
    return d


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """cifar100-lt beta 200 (two seeds, BN), cifar100-lt beta 100, cifar10-lt beta 200 (no BN) and 100."""
    root = tmp_path_factory.mktemp("caches") / "cache"
    c100a = make_cache(root, "cifar100-lt", 200, seed=0, bn=True, num_classes=12)
    c100b = make_cache(root, "cifar100-lt", 200, seed=1, bn=True, num_classes=12)
    c100_100 = make_cache(root, "cifar100-lt", 100, seed=0, bn=False, num_classes=12)
    c10 = make_cache(root, "cifar10-lt", 200, seed=0, bn=False)
    c10_100 = make_cache(root, "cifar10-lt", 100, seed=0, bn=True)
    for d in (c100a, c100b, c100_100, c10, c10_100):
        for head, hp, variant, tau in ALL_FITS:
            if head == "learned-ncm" and tau == 0 and d in (c100a, c100b):
                continue  # written below with known values
            if head == "ncm" and d == c10:
                continue
            if head == "multi-ncm" and tau == 0.125 and d == c100b:
                continue  # one of two stage-1 seeds not fitted: a partial cell
            write_fit(d, head, variant=variant, tau=tau, hparams=hp)
    for d in (c100a, c100b):
        for variant in ("bn_recal",):
            write_fit(d, "learned-ncm", variant=variant)
            write_fit(d, "multi-ncm", variant=variant)
    # two stage-1 seeds with known Learned NCM accuracy: mean 41, std sqrt(2)
    write_fit(c100a, "learned-ncm", acc={"all": 40.0}, fit_id="lncm-s0")
    write_fit(c100b, "learned-ncm", acc={"all": 42.0}, fit_id="lncm-s1")
    # latest row per configuration: the newer NCM row must win even when an older one is appended later
    write_fit(c10, "ncm", acc={"all": 79.7, "many": 82.2, "medium": 73.8}, fit_id="ncm-new",
              timestamp="2024-03-01T00:00:00+00:00")
    write_fit(c10, "ncm", acc={"all": 11.0, "many": 11.0, "medium": 11.0}, fit_id="ncm-old",
              timestamp="2024-02-01T00:00:00+00:00")
    # a row fitted on an older cache (fingerprint differs) is ignored
    write_fit(c10, "softmax", acc={"all": 99.0}, fit_id="softmax-stale", timestamp="2030-01-01T00:00:00+00:00",
              fingerprint="0000000000000000")
    # a non-default hyperparameter setting never replaces the default row of a table cell
    write_fit(c10, "multi-ncm", hparams={"num_centroids": 3}, acc={"all": 1.0}, fit_id="mncm-k3",
              timestamp="2030-01-01T00:00:00+00:00")
    out = tmp_path_factory.mktemp("reports") / "reports"
    res = rp.build_report(str(root), out, tsne_per_class=60)
    return dict(root=root, out=out, res=res, c10=c10, c100a=c100a)


def _table(out, name):
    return pd.read_csv(out / f"{name}.csv", dtype=str, keep_default_na=False)


def _cell(df, method, dataset, beta, metric):
    sel = df[(df["method"] == method) & (df["dataset"] == dataset) & (df["imbalance"] == beta)
             & (df["metric"] == metric)]
    assert len(sel) == 1, (method, dataset, beta, metric, len(sel))
    return sel.iloc[0]


def test_every_table_has_all_rows_and_columns(world):
    out = world["out"]
    for t in rp.TABLES:
        df = _table(out, t.name)
        assert list(df.columns) == rp.LONG_COLUMNS
        assert len(df) == len(t.rows) * len(t.columns), t.name
        assert set(df["method"]) == {r.method for r in t.rows}
        assert (out / f"{t.name}.md").read_text().startswith(f"# {t.title}")
        # paper values transcribed, never our numbers in the paper column
        for r in t.rows:
            vals = [v for v in df.loc[df["method"] == r.method, "paper"]]
            assert vals == ["" if p is None else f"{p:.1f}" for p in r.paper]
    t1 = _table(out, "table1")
    assert _cell(t1, "Learned NCM + LA", "cifar100-lt", "200", "few")["paper"] == "28.9"
    t7 = _table(out, "table7")
    assert _cell(t7, "Softmax", "cifar10-lt", "200", "all")["paper"] == "74.0"
    assert _cell(t7, "Multi-NCM + LA", "cifar10-lt", "10", "all")["paper"] == "91.6"


def test_not_run_rows_carry_the_command(world):
    out = world["out"]
    t2 = _table(out, "table2")
    cell = _cell(t2, "NCM", "cifar10-lt", "10", "all")
    assert cell["status"] == "not run" and cell["ours"] == ""
    assert "pipeline extract --dataset cifar10-lt" in cell["command"]
    assert "--imbalance 10" in cell["command"] and "--recipe paper" in cell["command"]
    assert "pipeline fit-head --cache" in cell["command"] and "--head ncm" in cell["command"]
    t3 = _table(out, "table3")
    cell = _cell(t3, "Learned NCM + LA", "imagenet-lt", "", "few")
    assert cell["status"] == "not run" and "--dataset imagenet-lt" in cell["command"]
    assert "--tau 0.125" in cell["command"]
    # the cache exists but has no BN-recalibrated features: re-extract with --bn-recalibrate
    t6 = _table(out, "table6")
    cell = _cell(t6, "Learned NCM (BN)", "cifar10-lt", "200", "all")
    assert cell["status"] == "not run" and "--bn-recalibrate" in cell["command"]
    assert "--epochs 3" in cell["command"]  # the existing run's budget, so extract resumes instead of clashing
    # literature rows are labelled, never ours
    focal = t2[t2["method"].str.startswith("Focal")]
    assert (focal["status"] == "literature (not run here)").all() and (focal["ours"] == "").all()
    readme = (out / "README.md").read_text()
    assert "## Not run" in readme and "pipeline extract --dataset cifar100-lt" in readme


def test_two_stage1_seeds_give_mean_std_n(world):
    t1 = _table(world["out"], "table1")
    cell = _cell(t1, "Learned NCM", "cifar100-lt", "200", "all")
    assert cell["ours"] == "41.0" and cell["ours_std"] == "1.4" and cell["n_seeds"] == "2"
    assert cell["fit_ids"] == "lncm-s0;lncm-s1"
    assert len(cell["cache_fingerprints"].split(";")) == 2
    assert cell["diff"] == "-4.7" and cell["status"] == "missed"
    single = _cell(t1, "NCM", "cifar100-lt", "100", "all")
    assert single["n_seeds"] == "1" and single["ours_std"] == ""


def test_one_rounding_rule():
    from pipeline.report.fmt import diff1, fmt1, fmt_diff
    # half away from zero on the shortest decimal form, whatever the binary float underneath
    assert [fmt1(v) for v in (18.85, 67.7625, 67.725, 0.05, -0.05, 41.0, float("nan"), None, "")] == \
        ["18.9", "67.8", "67.7", "0.1", "-0.1", "41.0", "", "", ""]
    # exact binary halves: Python's format would round half to even (58.2, 0.2)
    assert [fmt1(v) for v in (58.25, 0.25, "58.25", -58.25)] == ["58.3", "0.3", "58.3", "-58.3"]
    assert fmt1(-0.04) == "0.0"  # never "-0.0"
    # a difference is taken between the values shown: 79.66 shows as 79.7, so 79.7 - 79.7 = +0.0
    assert fmt_diff(diff1(79.66, 79.7)) == "+0.0" and fmt_diff(diff1(58.03, 80.3)) == "-22.3"


NUM = r"[+-]?\d+\.\d"


def test_tables_one_decimal_one_value_per_cell_and_latex(world):
    import re
    out = world["out"]
    for t in rp.TABLES:
        df = _table(out, t.name)
        for col in ("ours", "ours_std", "paper", "diff"):
            bad = [v for v in df[col] if v and not re.fullmatch(NUM, v)]
            assert not bad, (t.name, col, bad[:3])  # one decimal, like the paper
        md = (out / f"{t.name}.md").read_text()
        rows = [l for l in md.splitlines() if l.startswith("| ") and not l.startswith("| Method")]
        assert rows
        for line in rows:
            for cell in line.strip("|").split("|")[2:]:
                assert len(re.findall(r"\d+\.\d+", cell)) <= 1, (t.name, line)  # one value per cell
        tex = (out / f"{t.name}.tex").read_text()
        assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex and "\\begin{tabular}" in tex
        assert tex.count("\\begin{table}") == 1 and tex.count("\\end{table}") == 1
        assert "τ" not in tex and "β" not in tex and "±" not in tex  # escaped for LaTeX
        # every value of ours in the CSV appears, the same, in the Markdown and the LaTeX
        for v in df.loc[df["ours"] != "", "ours"]:
            assert re.search(rf"(?<![\d.]){re.escape(v)}(?![\d])", md) and v in tex, (t.name, v)
    t1 = _table(out, "table1")
    md = (out / "table1.md").read_text()
    block = md[md.index("| Learned NCM | paper"):]
    assert block.splitlines()[1].startswith("|  | ours | 41.0 |")  # mean of 40 and 42, one decimal
    assert block.splitlines()[2].startswith("|  | ± std | 1.4 |") and block.splitlines()[3].startswith("|  | seeds | 2 |")
    assert "**79.7**" in (out / "table7.md").read_text()  # within the tolerance: bold
    readme = (out / "README.md").read_text()
    assert "(table1.tex)" in readme


def _heads(out, run):
    return pd.read_csv(out / "heads" / f"{run}.csv", dtype=str, keep_default_na=False)


def test_every_head_table_per_cache(world):
    """Every fit of every cache is in a table, with the paper's value where the paper has one: 7 of the 19
    fits run_all.sh makes (tau-norm, lws, posthoc-la, metric-ncm global/local, bn_recal) used to be only in
    results.csv for a cache like the shipped CIFAR-10-LT beta=100 one."""
    out, res = world["out"], world["res"]
    readme = (out / "README.md").read_text()
    assert set(res.heads) == {p.name for p in world["root"].iterdir()}
    for run in res.heads:
        assert f"(heads/{run}.md)" in readme
        assert (out / "heads" / f"{run}.md").exists() and (out / "heads" / f"{run}.tex").exists()
    df = _heads(out, "cifar10-lt-b100-synthetic-s0")
    assert list(df.columns) == rp.HEAD_COLUMNS
    fits = df.drop_duplicates("fit_id")
    assert len(df) == 4 * len(fits) and len(fits) == len(ALL_FITS)  # every fit, All/Many/Medium/Few
    assert {"tau-norm", "lws", "posthoc-la", "metric-ncm", "local-projection", "crt"} <= set(fits["head"])
    assert sorted(fits.loc[fits["head"] == "learned-ncm", "tau"], key=float) == ["0", "0.0625", "0.125", "0.25",
                                                                                "0.5", "1"]

    def cell(df, method, metric):
        sel = df[(df["method"] == method) & (df["metric"] == metric)]
        assert len(sel) == 1, (method, metric, len(sel))
        return sel.iloc[0]
    assert cell(df, "Softmax", "all")["paper"] == "80.3" and cell(df, "Softmax", "all")["paper_table"] == "table7"
    assert cell(df, "NCM", "all")["paper"] == "79.8"
    tn = cell(df, "Decoupling (τ-norm)", "all")  # the paper has τ-norm only on CIFAR-100 / ImageNet
    assert tn["paper"] == "" and tn["status"] == "ours only (no paper value)" and tn["ours"]
    assert cell(df, "Local Metric + Learned NCM", "all")["ours"] != cell(df, "Global Metric + Learned NCM", "all")["ours"]
    assert cell(df, "Learned NCM, τ = 0.0625", "all")["paper"] == ""
    # the value of a fit is the same as in the paper's tables
    t7 = _table(out, "table7")
    assert cell(df, "Learned NCM", "many")["ours"] == _cell(t7, "Learned NCM", "cifar10-lt", "100", "many")["ours"]
    # BN-recalibrated fits, with Table 6's values; a non-default setting is its own row without one
    bn = _heads(out, "cifar100-lt-b200-synthetic-s0")
    b = cell(bn, "Learned NCM (BN)", "all")
    assert b["variant"] == "bn_recal" and b["paper"] == "45.6" and b["paper_table"] == "table6"
    c10 = _heads(out, "cifar10-lt-b200-synthetic-s0")
    k3 = cell(c10, "Multi-NCM, num_centroids=3", "all")
    assert k3["fit_id"] == "mncm-k3" and k3["paper"] == "" and "--num-centroids 3" in k3["command"]
    assert cell(c10, "Multi-NCM", "all")["paper"] == "80.8"
    md = (out / "heads" / "cifar10-lt-b100-synthetic-s0.md").read_text()
    assert "| Decoupling (LWS) | ours |" in md and "| Post-hoc logit adjustment (τ = 1) | ours |" in md
    assert "| Learned NCM (BN) | ours |" in (out / "heads" / "cifar100-lt-b200-synthetic-s0.md").read_text()


def test_latest_row_per_configuration_and_stale_rows(world):
    t7 = _table(world["out"], "table7")
    cell = _cell(t7, "NCM", "cifar10-lt", "200", "all")
    assert cell["fit_ids"] == "ncm-new" and cell["ours"] == "79.7"
    assert cell["status"] == "reproduced" and cell["diff"] == "+0.0"
    soft = _cell(t7, "Softmax", "cifar10-lt", "200", "all")
    assert soft["fit_ids"] != "softmax-stale" and soft["ours"] != "99.0"
    mn = _cell(t7, "Multi-NCM", "cifar10-lt", "200", "all")
    assert mn["fit_ids"] != "mncm-k3"
    t5 = _table(world["out"], "table5")
    g = _cell(t5, "Global Metric + Learned NCM", "cifar10-lt", "200", "all")
    loc = _cell(t5, "Local Metric + Learned NCM", "cifar10-lt", "200", "all")
    assert g["ours"] and loc["ours"] and g["fit_ids"] != loc["fit_ids"]
    assert any("older features" in w for w in world["res"].warnings)


def test_bn_variant_and_partial_seeds(world):
    t6 = _table(world["out"], "table6")
    bn = _cell(t6, "Multi-NCM (BN)", "cifar100-lt", "200", "many")
    assert bn["status"] in ("reproduced", "missed") and bn["n_seeds"] == "2" and bn["variant"] == "bn_recal"
    plain = _cell(t6, "Multi-NCM", "cifar100-lt", "200", "many")
    assert plain["fit_ids"] != bn["fit_ids"]
    t1 = _table(world["out"], "table1")
    part = _cell(t1, "Multi-NCM + LA", "cifar100-lt", "200", "all")
    assert part["n_seeds"] == "1" and part["ours"] != "" and part["ours_std"] == ""
    assert part["note"].startswith("partial: 1 of 2 stage-1 seeds")
    assert "cifar100-lt-b200-synthetic-s1 --head multi-ncm --tau 0.125" in part["note"]
    md = (world["out"] / "table1.md").read_text()
    assert "cifar100-lt-b200-synthetic-s1 --head multi-ncm --tau 0.125" in md


def test_figures_are_valid_pngs_with_data(world):
    out = world["out"]
    figs = {f.name: f for f in world["res"].figures}
    for name in ("fig1", "fig2", "fig3", "fig4", "fig5", "fig6a", "fig6b", "fig7"):
        assert figs[name].files, (name, figs[name].skipped)
        png = out / [p for p in figs[name].files if p.endswith(".png")][0]
        data = png.read_bytes()
        assert data[:8] == PNG_SIG and len(data) > 5000, name
        csvf = out / [p for p in figs[name].files if p.endswith(".csv")][0]
        assert len(pd.read_csv(csvf)) > 0, name  # a plain CSV: no comment lines to skip
        side = json.loads((out / [p for p in figs[name].files if p.endswith(".json")][0]).read_text())
        assert side["sources"] and all(s["fingerprint"] for s in side["sources"]), name
    assert not figs["fig8"].files and "pipeline extract --dataset cifar20-lt" in figs["fig8"].skipped
    fig2 = pd.read_csv(out / "figures/fig2_variance_cifar10-lt.csv")
    assert set(fig2["imbalance"].astype(str)) == {"200", "100"}
    assert {"sigma_mle", "sigma_ledoit-wolf", "sigma_oas"} <= set(fig2.columns)
    readme = (out / "README.md").read_text()
    assert "![" in readme and "(figures/fig2_variance_cifar10-lt.png)" in readme
    assert "Figure 8" in readme and "Not produced" in readme


def test_readme_summary(world):
    readme = (world["out"] / "README.md").read_text()
    assert "NOT THE PAPER'S STAGE-1 RECIPE" in readme  # synthetic caches record no recipe
    assert "Headline" in readme and "Which paper cells we reproduce" in readme
    assert "**Reproduced**" in readme and "**Missed**" in readme
    c = read_cache(world["c10"])
    assert c.fingerprint in readme
    assert f"inputs digest `{rp.inputs_digest(rp.load_context(str(world['root'])))}`" in readme


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_report_twice_is_byte_identical(world, tmp_path):
    """Every output file -- tables, every-head tables, figures (PNG, PDF, CSV, sidecar), README -- is a
    function of the inputs alone."""
    out2 = tmp_path / "again"
    rp.build_report(str(world["root"]), out2, tsne_per_class=60)
    a, b = _snapshot(world["out"]), _snapshot(out2)
    assert sorted(a) == sorted(b)
    assert [k for k in a if a[k] != b[k]] == []
    assert any(k.endswith(".png") for k in a) and any(k.startswith("heads/") for k in a)


def test_rerunning_the_same_fits_changes_no_tracked_output(tmp_path, monkeypatch):
    """The Quick start reruns every fit: new rows with new timestamps and the current commit, same fit ids and
    numbers.  Only the git-ignored provenance.local.json may change (it records when and with which commit);
    the report's own commit is in no tracked file."""
    import shutil
    import pipeline.utils
    root = tmp_path / "cache"
    d = make_cache(root, "cifar10-lt", 100, bn=False, n_max=120, dim=6)
    for head in ("softmax", "ncm", "learned-ncm"):
        write_fit(d, head, fit_id=f"{head}-fixed", timestamp="2024-01-01T00:00:00+00:00")
    monkeypatch.setattr(pipeline.utils, "git_commit", lambda: "c0ffee1111111111111111111111111111111111")
    rp.build_report(str(root), tmp_path / "r1", tsne_per_class=30)
    first = _snapshot(tmp_path / "r1")
    # the rerun: same fits, later, from another commit (a copy of the artifact under the same fit id)
    rows = (d / "results.csv").read_text().splitlines()
    rerun = [r.replace("2024-01-01T00:00:00+00:00", "2025-06-01T12:00:00+00:00").replace("abc123", "f00d")
             for r in rows[1:]]
    (d / "results.csv").write_text("\n".join(rows + rerun) + "\n")
    monkeypatch.setattr(pipeline.utils, "git_commit", lambda: "beef222222222222222222222222222222222222")
    rp.build_report(str(root), tmp_path / "r1", tsne_per_class=30)
    second = _snapshot(tmp_path / "r1")
    tracked = [k for k in first if k != "provenance.local.json"]
    assert [k for k in tracked if first[k] != second.get(k)] == []
    assert first["provenance.local.json"] != second["provenance.local.json"]
    assert b"beef2222" in second["provenance.local.json"] and b"f00d" in second["provenance.local.json"]
    assert b"provenance.local.json" in second[".gitignore"]
    for k in tracked:
        assert b"c0ffee11" not in first[k] and b"beef2222" not in second[k], k
        assert b"2025-06-01" not in second[k], k


def test_report_outputs_honour_the_umask(world, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "rep"
        rp.build_report(str(world["root"]), out, figures=False)
    finally:
        os.umask(old)
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {m for k, m in modes.items() if (out / k).is_file()} == {0o644}, modes
    assert {m for k, m in modes.items() if (out / k).is_dir()} == {0o755}, modes


def test_no_caches_is_nothing_to_report_but_lists_the_extracts(tmp_path):
    (tmp_path / "cache").mkdir()
    with pytest.raises(rp.UserError, match="nothing to report"):
        rp.build_report(str(tmp_path / "cache"), tmp_path / "rep", figures=False)
    assert not (tmp_path / "rep").exists()
    cmds = rp.missing_extract_commands(str(tmp_path / "cache"))
    assert any("--dataset cifar10-lt" in c and "--imbalance 200" in c and "--bn-recalibrate" in c for c in cmds)
    assert any("--dataset imagenet-lt" in c for c in cmds)
    with pytest.raises(rp.UserError):
        rp.build_report(str(tmp_path / "nope"), tmp_path / "rep")


def _paper_like_cache(root, iterations, bn_method, beta=200.0, name="r", curve=None, counts=(2,) * 10,
                      recipe="paper"):
    """A cifar10-lt cache whose provenance is the paper recipe (or ``recipe``) at ``iterations``, with a
    bn_recal variant made by ``bn_method`` (None: the method recorded the way older code did, clean images),
    and ``counts`` train images per class (2 each: every class Few)."""
    from pipeline.config import RECIPES
    cfg = {k: v for k, v in RECIPES[recipe].items() if k != "family"}
    cfg.update(recipe=recipe, iterations=iterations, dataset="cifar10-lt", imbalance=beta, subset_seed=0, seed=0)
    prov = dict(dataset="cifar10-lt", imbalance=beta, subset_seed=0, backbone="resnet32", epochs=10, seed=0,
                config=cfg, weights_sha256="w")
    if bn_method is None:
        prov["bn_recal_method"] = "swa_utils.update_bn over a fixed permutation of the training set (seed 0)"
    rng = np.random.default_rng(0)
    ty = np.repeat(np.arange(10), counts)
    f = {"train": (rng.normal(size=(len(ty), 4)).astype(np.float32), ty),
         "test": (rng.normal(size=(10, 4)).astype(np.float32), np.arange(10))}
    d = Path(root) / name
    d.mkdir(parents=True)
    write_cache(d / "features.h5", provenance=prov, class_names=[str(i) for i in range(10)],
                train_counts=list(counts), classifier_weight=np.zeros((10, 4)), classifier_bias=np.zeros(10),
                features={"plain": f, "bn_recal": f}, variant_methods={"bn_recal": bn_method}, learning_curve=curve)
    return d


@pytest.mark.parametrize("iterations,bn,paper_listed,bn_listed", [
    (2000, "default", True, False),   # a shorter budget does not count as the paper's run
    (13000, "default", False, False),
    (13000, None, False, True),       # bn_recal of the older clean-image method: re-estimate it
    (13000, "clean", False, True),
])
def test_list_missing_counts_only_the_papers_budget_and_the_default_bn(tmp_path, iterations, bn, paper_listed,
                                                                        bn_listed):
    from pipeline.config import BN_RECAL_DEFAULT
    method = {"default": dict(BN_RECAL_DEFAULT, seed=0), "clean": dict(BN_RECAL_DEFAULT, data="clean", seed=0),
              None: None}[bn]
    _paper_like_cache(tmp_path / "cache", iterations, method)
    cmds = [c for c in rp.missing_extract_commands(str(tmp_path / "cache"))
            if "--dataset cifar10-lt" in c and "--imbalance 200" in c]
    assert any("--recipe paper" in c and "--epochs" not in c for c in cmds) == paper_listed, cmds
    assert any("--epochs 10" in c and "--run-name r" in c and "--bn-recalibrate" in c for c in cmds) == bn_listed, cmds


def test_cli_report_and_list_missing(world, tmp_path):
    from click.testing import CliRunner

    from pipeline.cli import cli
    runner = CliRunner()
    r = runner.invoke(cli, ["report", "--cache-root", str(world["root"]), "--out", str(tmp_path / "r"),
                            "--no-figures"])
    assert r.exit_code == 0, r.output
    assert "cells reproduced" in r.output and (tmp_path / "r" / "table1.csv").exists()
    r = runner.invoke(cli, ["report", "--cache-root", str(world["root"]), "--list-missing",
                            "--data-root", "cifar100-lt=/data/c100"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip().splitlines()
    assert any("--dataset cifar100-lt --data-root /data/c100 --imbalance 10" in l for l in lines)
    # the synthetic caches fill cells but are not the paper's runs: the paper's extract is still listed
    assert any("--dataset cifar100-lt" in l and "--imbalance 200" in l and "--recipe paper" in l for l in lines)
    assert not any("--dataset cifar100-lt" in l and "--imbalance 200" in l and "--epochs" in l
                   for l in lines)  # has BN already: nothing to add to the existing runs
    assert any("--dataset cifar10-lt" in l and "--imbalance 200" in l and "--bn-recalibrate" in l for l in lines)
    assert not (tmp_path / "reports").exists()
    r = runner.invoke(cli, ["report", "--cache-root", str(tmp_path / "none")])
    assert r.exit_code == 2 and "Error: cache root" in r.output


# ----------------------------------------------------------------------------------------------------
# run_all.sh

STUB = r"""#!{py} -S
# Stand-in for `pipeline` (standard library only, so it starts in milliseconds): fit-head appends one
# deterministic results.csv row following stage 2's column contract; every other command is the real CLI.
import csv, json, os, sys, zlib
argv = sys.argv[1:]
if argv and argv[0] == "extract":  # record, never train
    open(os.environ["STUB_LOG"], "a").write(" ".join(argv) + "\n")
    sys.exit(0)
if argv and argv[0] == "report" and os.environ.get("STUB_FAKE_REPORT"):
    if "--list-missing" in argv:
        print(os.environ["STUB_FAKE_REPORT"])
    sys.exit(0)
if not argv or argv[0] != "fit-head":
    os.execv("{py}", ["{py}", "-m", "pipeline.cli", *argv])
args = dict(zip(argv[1::2], argv[2::2]))
head, variant = args["--head"], args.get("--variant", "plain")
tau = float(args.get("--tau", 1 if head == "posthoc-la" else 0))  # stage 2's default tau
if os.environ.get("STUB_FAIL_HEAD") == head:
    sys.exit("stub: simulated failure of " + head)
hp = {"metric": args["--metric"]} if "--metric" in args else {}
hp.update({"fit_split": args["--fit-split"]} if "--fit-split" in args else {})
cache = args["--cache"].rstrip("/")
fp = json.load(open(os.environ["STUB_FINGERPRINTS"]))[os.path.basename(cache)]
path = os.path.join(cache, "results.csv")
n = sum(1 for _ in open(path)) if os.path.exists(path) else 0
base = 50 + 10 * tau + zlib.crc32(json.dumps([head, variant, hp]).encode()) % 300 / 10
row = dict(fit_id="stub-" + "-".join(argv[3:]), timestamp="2024-01-01T00:%02d:%02d+00:00" % divmod(n, 60),
           head=head, variant=variant, tau=tau, seed=0, hparams=json.dumps(hp, sort_keys=True),
           cache_path=cache + "/features.h5", cache_fingerprint=fp, dataset="", imbalance="", backbone="",
           train_seed=0, stage1_epochs=3, acc_all=base, acc_many=base + 1, acc_medium=base + 2, acc_few=base + 3,
           fit_seconds=0.1, device="cpu", git_commit="stub", artifact="")
with open(path, "a", newline="") as f:
    w = csv.DictWriter(f, fieldnames={cols})
    if n == 0:
        w.writeheader()
    w.writerow(row)
"""


def _env_with_stub(tmp_path, caches):
    stub_dir = tmp_path / "bin"
    stub_dir.mkdir()
    stub = stub_dir / "pipeline"
    stub.write_text(STUB.replace("{py}", sys.executable).replace("{cols}", repr(list(rp.RESULT_COLUMNS))))
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    fps = tmp_path / "fingerprints.json"
    fps.write_text(json.dumps({Path(d).name: read_cache(d).fingerprint for d in caches}))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), STUB_FINGERPRINTS=str(fps),
                PATH=f"{stub_dir}:{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")


def test_run_all_orchestration_with_stub(tmp_path):
    """run_all.sh's own logic (which heads, BN variants, rerun, failing step) with a stand-in fit-head, in the
    one-process-per-fit mode (tests/test_fitplan.py runs the default one-process mode with the real fits)."""
    root = tmp_path / "cache"
    c10 = make_cache(root, "cifar10-lt", 200, bn=True)
    c100 = make_cache(root, "cifar100-lt", 200, bn=False, num_classes=12)
    env = _env_with_stub(tmp_path, [c10, c100])
    cmd = ["bash", str(REPO / "run_all.sh"), "--cache-root", str(root), "--out", str(tmp_path / "rep"),
           "--no-figures", "--per-fit-processes"]  # the stub stands in for `pipeline fit-head` processes
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "total time" in r.stdout and "==> [" in r.stdout
    rows10 = pd.read_csv(c10 / "results.csv")
    rows100 = pd.read_csv(c100 / "results.csv")
    # 17 plain fits; where the cache has bn_recal, Table 6's 2 fits + softmax and ncm (BN_COMPARE_HEADS); on
    # BALMS's CIFAR datasets the NCM family fitted on the test images (paper.TRAIN_PLAIN_SPECS)
    assert len(rows10) == 21 + 5 and len(rows100) == 17 + 5
    assert rows10["hparams"].str.contains('"fit_split": "test"').sum() == 5
    assert set(rows10["head"]) == {"softmax", "ncm", "learned-ncm", "multi-ncm", "local-projection",
                                   "metric-ncm", "crt", "tau-norm", "lws", "posthoc-la"}
    assert sorted(rows10.loc[rows10["head"] == "learned-ncm", "tau"].unique()) == [0, 0.0625, 0.125, 0.25, 0.5, 1]
    assert set(rows10["variant"]) == {"plain", "bn_recal"} and set(rows100["variant"]) == {"plain"}
    t6 = _table(tmp_path / "rep", "table6")
    assert _cell(t6, "Multi-NCM (BN)", "cifar10-lt", "200", "all")["ours"] != ""
    assert _cell(t6, "Multi-NCM (BN)", "cifar100-lt", "200", "all")["status"] == "not run"
    first = {t.name: (tmp_path / "rep" / f"{t.name}.csv").read_bytes() for t in rp.TABLES}
    # rerun (quick, to keep the test short): new rows are appended, the tables do not change
    r = subprocess.run(cmd + ["--quick"], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert len(pd.read_csv(c10 / "results.csv")) == 21 + 5 + 3
    for t in rp.TABLES:
        assert (tmp_path / "rep" / f"{t.name}.csv").read_bytes() == first[t.name], t.name
    # a failing step stops the script with a non-zero status that names it
    r = subprocess.run(cmd + ["--quick"], capture_output=True, text=True,
                       env=dict(env, STUB_FAIL_HEAD="learned-ncm"), cwd=REPO)
    assert r.returncode != 0 and "FAILED at step 2" in r.stderr and "learned-ncm" in r.stderr


def test_run_all_extract_missing_warns_and_skips_unknown_roots(tmp_path):
    root = tmp_path / "cache"
    env = _env_with_stub(tmp_path, [])
    log = tmp_path / "extract.log"
    cmds = ["pipeline extract --dataset cifar10-lt --data-root /d/c10 --imbalance 10 --seed 0 --epochs 200",
            "pipeline extract --dataset imagenet-lt --data-root <IMAGENET_LT_ROOT> --seed 0 --epochs 90"]
    env.update(STUB_LOG=str(log), STUB_FAKE_REPORT="\n".join(cmds))
    r = subprocess.run(["bash", str(REPO / "run_all.sh"), "--extract-missing", "--cache-root", str(root),
                        "--out", str(tmp_path / "rep")], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "WARNING" in r.stderr and "hours" in r.stderr
    assert "skip (no data root" in r.stderr and "imagenet-lt" in r.stderr
    # a run begun elsewhere in another precision continues here (recorded as precision_segments)
    assert log.read_text().splitlines() == [cmds[0].replace("pipeline ", "", 1) + " --allow-precision-change"]


def test_run_all_rejects_unknown_option():
    r = subprocess.run(["bash", str(REPO / "run_all.sh"), "--bogus"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unknown option" in r.stderr


@pytest.mark.slow
def test_run_all_quick_end_to_end(tmp_path):
    """The real CLI end to end (never skipped): run_all.sh --quick twice gives byte-identical tables."""
    root = tmp_path / "cache"
    make_cache(root, "cifar10-lt", 200, bn=True, n_max=200, dim=8)
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    cmd = ["bash", str(REPO / "run_all.sh"), "--quick", "--cache-root", str(root), "--out", str(tmp_path / "rep"),
           "--python", sys.executable, "--no-figures"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    first = {t.name: (tmp_path / "rep" / f"{t.name}.csv").read_bytes() for t in rp.TABLES}
    t7 = _table(tmp_path / "rep", "table7")
    assert _cell(t7, "Learned NCM", "cifar10-lt", "200", "all")["ours"] != ""
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for t in rp.TABLES:
        assert (tmp_path / "rep" / f"{t.name}.csv").read_bytes() == first[t.name], t.name




def test_list_fits_is_the_tables_and_figures_needs(world):
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.report.paper import needed_specs
    r = CliRunner().invoke(cli, ["report", "--cache-root", str(world["root"]), "--list-fits"])
    assert r.exit_code == 0, r.output
    lines = [line.split("\t") for line in r.output.strip().splitlines()]
    by_cache = {}
    for d, args in lines:
        by_cache.setdefault(Path(d).name, []).append(args)
    # every table row with a method of ours, and the figures' fits (tau sweep, local projection), per cache
    assert set(by_cache["cifar10-lt-b100-synthetic-s0"]) >= {
        "--head softmax", "--head learned-ncm --tau 0.125", "--head metric-ncm --metric local",
        "--head learned-ncm --variant bn_recal", "--head posthoc-la --tau 1", "--head learned-ncm --tau 0.0625",
        "--head local-projection", "--head tau-norm"}
    # + softmax and ncm on bn_recal: the heads that compare BN re-estimation methods (learned-ncm and multi-ncm
    # on bn_recal are Table 6's)
    # + the NCM family fitted on the test images (BALMS's CIFAR train_plain, paper.TRAIN_PLAIN_SPECS)
    assert len(by_cache["cifar10-lt-b100-synthetic-s0"]) == len(needed_specs()) + 2 + 5
    assert sum("--fit-split test" in a for a in by_cache["cifar10-lt-b100-synthetic-s0"]) == 5
    assert {"--head softmax --variant bn_recal", "--head ncm --variant bn_recal"} <= set(
        by_cache["cifar10-lt-b100-synthetic-s0"])
    assert not any("bn_recal" in a for a in by_cache["cifar10-lt-b200-synthetic-s0"])  # no BN features there
    q = CliRunner().invoke(cli, ["report", "--cache-root", str(world["root"]), "--list-fits", "--quick"])
    assert len(q.output.strip().splitlines()) == 3 * len(by_cache)


def test_tau_norm_p_is_stated_and_val_choice_preferred(tmp_path):
    root = tmp_path / "cache"
    d = root / "cifar100-lt-b200-synthetic-s0"
    d.mkdir(parents=True)
    make_synthetic_cache(d / "features.h5", dataset="cifar100-lt", num_classes=12, dim=8, imbalance=200,
                         n_max=300, n_test=20, with_val=True)
    write_fit(d, "tau-norm", hparams={"p": 1.0}, acc={"all": 30.0}, fit_id="tn-fixed",
              timestamp="2030-01-01T00:00:00+00:00")
    write_fit(d, "tau-norm", hparams={"p": 0.7, "p_select": "val"}, acc={"all": 33.0}, fit_id="tn-auto")
    assert ("\t--head tau-norm --p auto" in "\n".join(f"{a}\t{' '.join(b)}" for a, b in rp.needed_fits(str(root))))
    res = rp.build_report(str(root), tmp_path / "rep", figures=False)
    cell = _cell(res.tables["table3"].astype(str), "Decoupling (τ-norm)", "cifar100-lt", "200", "all")
    assert cell["fit_ids"] == "tn-auto" and cell["ours"] == "33.0"
    assert "p = 0.7 (chosen on the val split)" in cell["note"] and "--p auto" in cell["command"]


def test_seeds_are_grouped_by_recipe_identity(tmp_path):
    """Runs that differ only in seed or precision are repeats of one recipe (averaged); a different lr is not."""
    from pipeline.cache import write_cache
    from pipeline.synthetic import synthetic_features
    root = tmp_path / "cache"
    base = dict(dataset="cifar10-lt", imbalance=100.0, subset_seed=0, backbone="resnet32", recipe="paper",
                epochs=520, batch_size=512, lr=0.1, data_hash="d0")
    for run, seed, over in (("a", 0, dict(precision="bf16")), ("b", 1, dict(precision="fp32")),
                            ("c", 2, dict(precision="bf16", lr=0.2))):
        tx, ty, test_x, test_y, counts, means, _ = synthetic_features(num_classes=10, dim=4, n_max=200, seed=seed)
        cfg = dict(base, seed=seed, **over)
        (root / run).mkdir(parents=True)
        write_cache(root / run / "features.h5", provenance=dict(cfg, config=cfg, weights_sha256=f"w{seed}"),
                    class_names=[str(i) for i in range(10)], train_counts=counts, classifier_weight=means,
                    classifier_bias=np.zeros(10), features={"plain": {"train": (tx, ty), "test": (test_x, test_y)}})
    ctx = rp.load_context(str(root))
    assert sorted(sorted(c.run for c in g.caches) for g in ctx.groups) == [["a", "b"], ["c"]]
    assert len({c.fingerprint for c in ctx.infos}) == 3


def test_figure_sidecars_record_their_provenance(world):
    side = json.loads((world["out"] / "figures" / "fig6b_cdnv.json").read_text())
    assert side["figure"] == "fig6b" and side["title"] and side["caption"]
    assert "fig6b_cdnv.csv" in side["files"] and "fit_id" in side["what"] and "hparams" in side["what"]
    src = side["sources"][0]
    assert {"cache", "fingerprint", "seed", "stage1_commit", "stage1_epochs", "stage1_iterations"} <= set(src)
    assert src["fingerprint"] in {read_cache(d).fingerprint for d in world["root"].iterdir()}


def test_learning_curve_skips_epochs_without_evaluation():
    from pipeline.report.figures import finite_curve
    x, y = finite_curve([1, 2, 3, 4], [float("nan"), 20.0, float("nan"), 40.0])
    assert list(x) == [2.0, 4.0] and list(y) == [20.0, 40.0]


def test_pick_row_treats_matmul_as_a_computation_detail():
    """A newer learned-ncm row computed with bf16 GEMMs (matmul "auto" resolved to bf16) is preferred to an
    older row written before matmul was recorded: matmul is how a fit was computed, not a hyperparameter
    that departs from the defaults."""
    import json

    import pandas as pd

    from pipeline.stage2.heads import HEADS
    from pipeline.report.paper import Spec
    from pipeline.report.runs import pick_row
    hp = {k: v for k, v in HEADS["learned-ncm"].defaults.items() if k != "matmul"}
    rows = pd.DataFrame([
        dict(head="learned-ncm", _variant="plain", _tau=0.0, hparams=json.dumps(hp),
             _ts=pd.Timestamp("2026-01-01"), _order=0, acc=1),
        dict(head="learned-ncm", _variant="plain", _tau=0.0, hparams=json.dumps({**hp, "matmul": "bf16"}),
             _ts=pd.Timestamp("2026-02-01"), _order=1, acc=2),
    ])
    assert pick_row(rows, Spec("learned-ncm"))["acc"] == 2


def test_a_rerun_computed_another_way_replaces_the_row_of_its_configuration(tmp_path):
    """An older 2-thread fit (rows before cpu_threads was recorded, or --threads 2) and the same configuration
    refitted in 1 thread are one configuration: the every-head table lists it once, from the newest row."""
    from pipeline.config import RESULT_COLUMNS
    from pipeline.report.runs import read_results
    hp = dict(batch_size=512, epochs=30, eval_split="test", lr=5.0, momentum=0.9, clip=0.1)
    base = {c: "" for c in RESULT_COLUMNS}
    rows = [dict(base, fit_id="multi-ncm-old", timestamp="2026-01-01T00:00:00+00:00", head="multi-ncm",
                 tau="0.125", hparams=json.dumps({**hp, "matmul": "fp32"}), acc_all="60.2"),
            dict(base, fit_id="multi-ncm-two", timestamp="2026-01-02T00:00:00+00:00", head="multi-ncm",
                 tau="0.125", hparams=json.dumps({**hp, "matmul": "fp32", "cpu_threads": 2}), acc_all="60.3"),
            dict(base, fit_id="multi-ncm-new", timestamp="2026-01-03T00:00:00+00:00", head="multi-ncm",
                 tau="0.125", hparams=json.dumps({**hp, "matmul": "bf16", "cpu_threads": 1}), acc_all="60.1"),
            dict(base, fit_id="multi-ncm-k4", timestamp="2026-01-01T00:00:00+00:00", head="multi-ncm",
                 tau="0.125", hparams=json.dumps({**hp, "num_centroids": 4, "cpu_threads": 1}), acc_all="59.0")]
    pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).to_csv(tmp_path / "results.csv", index=False)
    got, stale, total = read_results(tmp_path / "results.csv")
    assert (stale, total) == (0, 4)
    assert sorted(got["fit_id"]) == ["multi-ncm-k4", "multi-ncm-new"]  # another K is another configuration


def test_best_test_epoch_is_the_first_maximum_of_the_evaluated_epochs():
    from pipeline.report.readme import best_test_epoch
    nan = float("nan")
    lc = dict(epoch=np.arange(1, 9), all=np.array([nan, 50.0, nan, 61.0, nan, 61.0, 58.0, nan]),
              many=np.array([nan, 70.0, nan, 75.0, nan, 74.0, 73.0, nan]),
              medium=np.array([nan, 20.0, nan, 35.0, nan, 36.0, 30.0, nan]), few=np.full(8, nan))
    b = best_test_epoch(lc)
    assert b["evaluated"] == 4
    assert b["final"]["epoch"] == 7 and b["final"]["all"] == 58.0 and b["final"]["medium"] == 30.0
    assert b["best"]["epoch"] == 4 and b["best"]["many"] == 75.0  # ties: the first, as BALMS keeps it
    assert np.isnan(b["best"]["few"])
    assert best_test_epoch(dict(epoch=np.arange(1, 3), all=np.full(2, nan))) is None
    assert best_test_epoch({}) is None


def test_readme_shows_final_and_optimistic_best_epoch(world):
    readme = (world["out"] / "README.md").read_text()
    sec = readme.split("### Stage-1 classifier: final epoch vs best test epoch")[1].split("##")[0]
    assert "optimistic" in sec
    c = read_cache(world["c10"])
    lc = c.learning_curve()
    last = len(lc["epoch"])  # the synthetic curves rise every epoch: best = final
    row = [ln for ln in sec.splitlines() if f"`{world['c10'].name}`" in ln][0]
    assert f"| {last} of {last} | {last} | {last} | +0.0 / +0.0 / +0.0 / +0.0 |" in row


def test_gains_over_softmax_compare_what_a_head_adds_on_the_same_features(tmp_path):
    """ours − our Softmax beside paper − the paper's Softmax, per cell of a table that has a Softmax cell of the
    same data and metric (Table 7), on the one-decimal values; counted apart on the paper's recipe."""
    from pipeline.config import BN_RECAL_DEFAULT
    root = tmp_path / "cache"
    counts = (150,) * 7 + (30,) * 3  # Many and Medium classes, like CIFAR-10-LT
    full = _paper_like_cache(root, 13000, dict(BN_RECAL_DEFAULT, seed=0), beta=200.0, name="full", counts=counts)
    short = _paper_like_cache(root, 2000, dict(BN_RECAL_DEFAULT, seed=0), beta=100.0, name="short", counts=counts)
    # Table 7, CIFAR-10-LT All. beta=200: Softmax 74.0, NCM 79.7, Learned NCM 80.8; beta=100: 80.3 / 79.8 / 81.6
    write_fit(full, "softmax", acc={"all": 73.04, "many": 80.0})      # 73.0; Many: paper 83.0
    write_fit(full, "learned-ncm", acc={"all": 80.46, "many": 82.0})  # 80.5: +7.5 vs paper +6.8 -> +0.7, within 1
    write_fit(full, "ncm", acc={"all": 70.0})           # -3.0 vs +5.7 -> -8.7
    write_fit(short, "softmax", acc={"all": 58.0})
    write_fit(short, "learned-ncm", acc={"all": 60.0})  # +2.0 vs +1.3 -> +0.7, within 1, but a 2,000-iteration run
    write_fit(short, "ncm", acc={"all": 50.0})          # -8.0 vs -0.5 -> -7.5
    rp.build_report(str(root), tmp_path / "out", figures=False)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "Within 1 point: 2 of 12; on the paper's recipe and budget: 1 of 6." in readme
    for line in ["| Learned NCM | CIFAR-10-LT β=200 | Many | +2.0 | -0.8 | +2.8 | no | yes | table7 |",  # 82.2 - 83.0
                 "| Learned NCM | CIFAR-10-LT β=200 | All | +7.5 | +6.8 | +0.7 | **yes** | yes | table7 |",
                 "| NCM | CIFAR-10-LT β=200 | All | -3.0 | +5.7 | -8.7 | no | yes | table7 |",
                 "| Learned NCM | CIFAR-10-LT β=100 | All | +2.0 | +1.3 | +0.7 | **yes** | no | table7 |",
                 "| NCM | CIFAR-10-LT β=100 | All | -8.0 | -0.5 | -7.5 | no | no | table7 |"]:
        assert line in readme, line
    section = readme.split("### Gains over the stage-1 Softmax")[1].split("## ")[0]
    assert section.count("| Softmax |") == 0 and "| Learned NCM + LA |" not in section  # no head without a fit


def test_stage1_features_per_class_and_group_in_the_report(tmp_path):
    """reports/stage1/<run>.csv: one row per class (train_test_gap on the plain features); the README's rows
    are the group means of that file."""
    from pipeline.config import BN_RECAL_DEFAULT
    root = tmp_path / "cache"
    _paper_like_cache(root, 13000, dict(BN_RECAL_DEFAULT, seed=0), name="full", counts=(150,) * 7 + (30,) * 3)
    from pipeline.report.fmt import fmt1
    rp.build_report(str(root), tmp_path / "out", figures=False)
    df = pd.read_csv(tmp_path / "out" / "stage1" / "full.csv")
    assert list(df["class_index"]) == list(range(10)) and list(df["train_images"]) == [150] * 7 + [30] * 3
    assert list(df["group"]) == ["many"] * 7 + ["medium"] * 3
    readme = (tmp_path / "out" / "README.md").read_text()
    for g, sel, n in (("Many", df.iloc[:7], "150–150"), ("Medium", df.iloc[7:], "30–30")):
        m = sel.mean(numeric_only=True)
        line = (f"| `full` | {g} | {len(sel)} | {n} | {fmt1(m['softmax_train'])} / {fmt1(m['softmax_test'])} | "
                f"{fmt1(m['ncm_test'])} | {m['norm_train']:.2f} / {m['norm_test']:.2f} |")
        assert line in readme, line
    assert df["norm_train"].round(4).tolist() != df["norm_test"].round(4).tolist()


def test_reproduction_summary_counts_the_papers_recipe_apart(tmp_path):
    from pipeline.config import BN_RECAL_DEFAULT
    root = tmp_path / "cache"
    nan = float("nan")
    curve = dict(epoch=np.arange(1, 5, dtype=float), all=np.array([nan, 61.25, 60.0, 58.0]),
                 many=np.array([nan, 75.0, 74.0, 74.5]), medium=np.array([nan, 30.0, 28.0, 20.0]),
                 few=np.full(4, nan))
    full = _paper_like_cache(root, 13000, dict(BN_RECAL_DEFAULT, seed=0), beta=200.0, name="full", curve=curve)
    short = _paper_like_cache(root, 2000, dict(BN_RECAL_DEFAULT, seed=0), beta=100.0, name="short")
    # Table 7, Learned NCM, CIFAR-10-LT All: paper 80.8 at beta=200 and 81.6 at beta=100
    write_fit(full, "learned-ncm", acc={"all": 80.5})   # within 1.0: reproduced, on the paper's recipe
    write_fit(full, "ncm", acc={"all": 70.0})           # missed, on the paper's recipe
    write_fit(short, "learned-ncm", acc={"all": 81.0})  # within 1.0, but from a 2,000-iteration run
    write_fit(short, "ncm", acc={"all": 60.0})
    rp.build_report(str(root), tmp_path / "out", figures=False)
    readme = (tmp_path / "out" / "README.md").read_text()
    row = [ln for ln in readme.splitlines() if ln.startswith("| [table2](table2.md)")][0].split("|")
    # reproduced, missed, ..., reproduced on the paper's recipe, missed on the paper's recipe
    assert [c.strip() for c in row[2:4]] == ["2", "2"] and [c.strip() for c in row[7:9]] == ["1", "1"], row
    # the final epoch vs the best test epoch, on the learning curve's one-decimal values: 61.3 - 58.0
    assert "| `full` | 3 of 10 | 4 | 2 | +3.3 / +0.5 / +10.0 / n/a |" in readme


def test_a_beta10_cache_every_class_many_fills_its_all_cells_and_nothing_else(tmp_path):
    """CIFAR-10-LT beta=10 (5,000 down to 500 images): every class is Many, so the paper has All only (Tables 2,
    7) and the report shows Many beside n/a for Medium / Few instead of failing on the empty groups."""
    from pipeline.config import BN_RECAL_DEFAULT
    root = tmp_path / "cache"
    nan = float("nan")
    curve = dict(epoch=np.arange(1, 5, dtype=float), all=np.array([nan, 88.0, 90.04, 89.0]),
                 many=np.array([nan, 88.0, 90.04, 89.0]), medium=np.full(4, nan), few=np.full(4, nan))
    d = _paper_like_cache(root, 13000, dict(BN_RECAL_DEFAULT, seed=0), beta=10.0, name="b10", curve=curve,
                          counts=(150,) * 10)
    # paper beta=10 All: Softmax 90.3, NCM 91.2, cRT 91.3
    write_fit(d, "softmax", acc={"all": 89.04, "many": 89.04})  # 89.0: -1.3
    write_fit(d, "ncm", acc={"all": 91.04, "many": 91.04})      # 91.0: -0.2, within 1; gain +2.0 vs +0.9
    write_fit(d, "crt", acc={"all": 80.0, "many": 80.0})
    rp.build_report(str(root), tmp_path / "out", figures=False)
    csv7 = pd.read_csv(tmp_path / "out" / "table7.csv")
    b10 = csv7[(csv7["imbalance"] == 10.0) & csv7["ours"].notna()]
    assert sorted(zip(b10["method"], b10["metric"], b10["ours"].round(1))) == [
        ("NCM", "all", 91.0), ("Softmax", "all", 89.0)], b10
    csv2 = pd.read_csv(tmp_path / "out" / "table2.csv")
    b10 = csv2[(csv2["dataset"] == "cifar10-lt") & (csv2["imbalance"] == 10.0) & csv2["ours"].notna()]
    assert sorted(zip(b10["method"], b10["paper"], b10["ours"].round(1))) == [
        ("Decoupling (cRT) †", 91.3, 80.0), ("NCM", 91.2, 91.0)], b10
    readme = (tmp_path / "out" / "README.md").read_text()
    assert "| NCM | CIFAR-10-LT β=10 | All | +2.0 | +0.9 | +1.1 | no | yes | table7 |" in readme
    assert "| `b10` | 3 of 10 | 4 | 3 | +1.0 / +1.0 / n/a / n/a |" in readme
    stage1 = readme.split("### Stage-1 features")[1].split("## ")[0]
    assert [ln.split("|")[2].strip() for ln in stage1.splitlines() if ln.startswith("| `b10`")] == ["Many"]


def test_a_recipe_ablation_sits_beside_its_paper_recipe_twin(tmp_path):
    """A `balms` run with a `paper` twin (same data, beta, seed) gets its own section: each Table 7 head on both
    caches, paper's recipe -> ablation (difference); it fills no table cell, and a run on other data has no twin."""
    from pipeline.config import BN_RECAL_DEFAULT
    root = tmp_path / "cache"
    counts = (150,) * 7 + (30,) * 3
    bn = dict(BN_RECAL_DEFAULT, seed=0)
    paper = _paper_like_cache(root, 13000, bn, beta=100.0, name="paper100", counts=counts)
    balms = _paper_like_cache(root, 13000, bn, beta=100.0, name="balms100", counts=counts, recipe="balms")
    lone = _paper_like_cache(root, 13000, bn, beta=200.0, name="balms200", counts=counts, recipe="balms")
    write_fit(paper, "softmax", acc={"all": 70.24, "many": 77.1, "medium": 42.5})
    write_fit(balms, "softmax", acc={"all": 74.96, "many": 78.0, "medium": 55.04})
    write_fit(paper, "ncm", acc={"all": 67.9})
    write_fit(balms, "learned-ncm", acc={"all": 71.0})  # no twin fit: no row
    write_fit(lone, "softmax", acc={"all": 60.0})
    rp.build_report(str(root), tmp_path / "out", figures=False)
    readme = (tmp_path / "out" / "README.md").read_text()
    section = readme.split("### Stage-1 recipe ablations")[1].split("\n## ")[0].split("\n### ")[0]
    assert "`balms100` vs `paper100` (recipe balms (paper: paper); augment cifar-autoaug-balms (paper: " \
           "cifar-autoaug); drop_last True (paper: None); fc_init default (paper: None)):" in section
    assert "| Softmax | 70.2 → 75.0 (+4.8) | 77.1 → 78.0 (+0.9) | 42.5 → 55.0 (+12.5) |" in section
    assert "NCM" not in section and "balms200" not in section
    t7 = pd.read_csv(tmp_path / "out" / "table7.csv")
    used = set(t7.loc[(t7["dataset"] == "cifar10-lt") & (t7["imbalance"] == 100), "runs"].dropna())
    assert used == {"paper100"}  # the paper's recipe fills the beta=100 cells; its twin none
