"""Figures a paper can use, on the shipped full-budget CIFAR-10-LT beta=200 cache (a real stage-1 run with its
budget in iterations and the real class names): a vector PDF beside each PNG at a readable dpi, short titles with
the provenance in the caption and sidecar, class names on Figure 3's axis, the budget in iterations in
Figure 4, plain CSVs, and one value for the softmax accuracy in the whole report."""
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from pipeline import report as rp
from pipeline.report import figures
from pipeline.report.paper import TAU_SWEEP
from tests.test_report import REPO, write_fit

SHIPPED = REPO / "cache" / "cifar10-lt-b200-resnet32-paper-s0" / "features.h5"
# `fit-head --head softmax` on this cache's fp32 features (results.csv of `./run_all.sh`), to full precision
SOFTMAX = {"all": 62.99, "many": 76.542857, "medium": 31.366667}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    if not SHIPPED.exists():
        pytest.fail(f"the shipped cache {SHIPPED} is tracked in git and must be there")
    base = tmp_path_factory.mktemp("shipped")
    d = base / "cache" / SHIPPED.parent.name
    d.mkdir(parents=True)
    os.symlink(SHIPPED, d / "features.h5")
    write_fit(d, "softmax", acc=SOFTMAX)
    write_fit(d, "local-projection")
    for tau in TAU_SWEEP:
        write_fit(d, "learned-ncm", tau=tau)
    seen = {}
    orig = figures.write_figure

    def spy(fr, figdir, stem, fig, *a, **k):
        seen[stem] = dict(
            titles=[ax.get_title() for ax in fig.axes if ax.get_title()]
            + ([fig._suptitle.get_text()] if fig._suptitle is not None else []),
            xlabels=[ax.get_xlabel() for ax in fig.axes],
            yticks=[(t.get_text(), t.get_fontsize()) for ax in fig.axes[:1] for t in ax.get_yticklabels()],
            xmax=max((max(line.get_xdata()) for ax in fig.axes for line in ax.get_lines()), default=None))
        return orig(fr, figdir, stem, fig, *a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "write_figure", spy)
        res = rp.build_report(str(base / "cache"), base / "reports", tsne_per_class=30)
    return dict(out=base / "reports", res=res, seen=seen)


def test_every_figure_has_a_vector_pdf_a_readable_png_and_a_plain_csv(shipped):
    from PIL import Image
    out = shipped["out"]
    drawn = [f for f in shipped["res"].figures if f.files]
    assert {f.name for f in drawn} >= {"fig1", "fig2", "fig3", "fig4", "fig5", "fig6a", "fig6b"}
    for f in drawn:
        by_ext = {Path(p).suffix: out / p for p in f.files}
        assert set(by_ext) == {".png", ".pdf", ".csv", ".json"}, f.files
        pdf = by_ext[".pdf"].read_bytes()
        assert pdf.startswith(b"%PDF") and b"CreationDate" not in pdf, f.name
        with Image.open(by_ext[".png"]) as im:
            assert min(im.info["dpi"]) >= 150, (f.name, im.info.get("dpi"))
        df = pd.read_csv(by_ext[".csv"])  # as it is: no comment lines
        assert len(df) and not any(str(c).startswith("#") for c in df.columns), f.name
        side = json.loads(by_ext[".json"].read_text())
        assert side["caption"] == f.caption and side["sources"][0]["stage1_iterations"] == 13000
    tau = pd.read_csv(out / "figures" / "fig5_tau.csv")
    assert list(tau["tau_label"]) == ["0", "1/16", "1/8", "1/4", "1/2", "1"]


def test_short_titles_and_the_provenance_in_the_caption(shipped):
    for stem, s in shipped["seen"].items():
        for t in s["titles"]:
            assert len(t) <= 60 and not any(w in t for w in ("[", "epochs", "recipe", "JPEG")), (stem, t)
    for f in shipped["res"].figures:
        if f.files:
            # 591 epochs of 22 steps: the budget as trained, and the recipe's as rounded up
            assert "13,002 iterations (591 epochs of 22 steps; the recipe's 13,000 rounded up" in f.caption, f.name
            assert "CIFAR-10 (JPEG q75)" in f.caption and "not the paper's stage-1 recipe" not in f.caption, f.name


def test_figure3_names_the_classes_legibly(shipped):
    ticks = shipped["seen"]["fig3_local_projection"]["yticks"]
    assert [t for t, _ in ticks][0].startswith("airplane") and [t for t, _ in ticks][-1].startswith("truck")
    assert min(size for _, size in ticks) >= 8
    df = pd.read_csv(shipped["out"] / "figures" / "fig3_local_projection.csv")
    assert df["class_name"].tolist()[:2] == ["airplane", "automobile"]


def test_figure4_budget_in_iterations(shipped):
    s = shipped["seen"]["fig4_learning_curve"]
    assert "stage-1 iteration" in s["xlabels"] and s["xmax"] == 591 * 22
    assert s["titles"] == ["Stage-1 learning curve, CIFAR-10-LT β=200"]
    df = pd.read_csv(shipped["out"] / "figures" / "fig4_learning_curve.csv")
    assert df["iteration"].iloc[-1] == 591 * 22 and df["epoch"].iloc[-1] == 591


def test_one_softmax_accuracy_in_the_whole_report(shipped):
    """The Softmax row is 62.99 / 76.542857 / 31.366667 at full precision; everywhere in the report it is
    63.0 / 76.5 / 31.4 (one rounding rule), and Figure 4 says what the curve was evaluated in."""
    out = shipped["out"]
    t7 = pd.read_csv(out / "table7.csv", dtype=str, keep_default_na=False)
    soft = t7[(t7["method"] == "Softmax") & (t7["imbalance"] == "200")].set_index("metric")["ours"]
    assert soft.to_dict() == {"all": "63.0", "many": "76.5", "medium": "31.4"}
    cap = next(f.caption for f in shipped["res"].figures if f.name == "fig4")
    assert "All 63.0, Many 76.5, Med 31.4; the curve's last point agrees." in cap
    assert "training precision (bf16 for epochs 1–380, fp32 for 381–591)" in cap
    import re
    for p in [out / "README.md", out / "table7.md", out / "table7.tex", *out.glob("heads/*")]:
        for other in ("62.99", "76.54", "31.37", "76.543", "31.367", "76.542857", "31.366667"):
            assert not re.search(rf"(?<![\d.+-]){re.escape(other)}(?![\d])", p.read_text()), (p.name, other)


def test_figure4_says_when_the_curve_and_the_table_disagree(tmp_path):
    """A curve evaluated in bf16 ends a few tenths from the fp32 Softmax row: the caption says so, and still
    quotes only the table's value."""
    d = tmp_path / "cache" / SHIPPED.parent.name
    d.mkdir(parents=True)
    os.symlink(SHIPPED, d / "features.h5")
    write_fit(d, "softmax", acc={"all": 63.2, "many": 76.7, "medium": 31.6})
    ctx = rp.runs.load_context(str(tmp_path / "cache"))
    (tmp_path / "figs").mkdir()
    fr = figures.fig_learning_curve(ctx, tmp_path / "figs")
    assert "All 63.2, Many 76.7, Med 31.6; the curve's last point differs slightly" in fr.caption
    assert "63.0" not in fr.caption
