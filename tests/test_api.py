"""The Python API: from pipeline import read_cache, fit_head, load_results; a fitted head predicts."""
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline.metrics import evaluate
from pipeline.synthetic import make_synthetic_cache

QUICK = dict(epochs=2)  # SGD heads: a short fit is enough to compare predict() with the fit's own predictions
HEAD_ARGS = [("softmax", {}), ("ncm", {}), ("ncm", dict(cl2n=True)), ("learned-ncm", QUICK),
             ("multi-ncm", dict(epochs=5, num_centroids=3)), ("crt", QUICK), ("lws", QUICK), ("tau-norm", {}),
             ("posthoc-la", {}), ("local-projection", QUICK), ("metric-ncm", QUICK),
             ("metric-ncm", dict(QUICK, metric="local"))]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("api") / "run"
    d.mkdir()
    return make_synthetic_cache(d / "features.h5", num_classes=5, dim=8, imbalance=10, n_max=60, n_test=20)


@pytest.mark.parametrize("head,kw", HEAD_ARGS, ids=[f"{h}{kw.get('metric', '')}{'-cl2n' if kw.get('cl2n') else ''}"
                                                    for h, kw in HEAD_ARGS])
def test_fitted_head_predicts_as_it_evaluated(cache, head, kw):
    from pipeline import fit_head, read_cache
    c = read_cache(cache)
    res = fit_head(c, head, device="cpu", **kw)
    x, y = c.split("test")
    pred = res.predict(x)
    assert pred.shape == y.shape and pred.dtype == np.int64
    assert (pred == res.pred).all()  # exactly the predictions the fit was scored on
    assert evaluate(pred, y, c.groups)["all"] == pytest.approx(res.acc["all"], abs=1e-9)
    # and it is the head's own function of its input: another input, other predictions
    assert (res.predict(x[::-1]) == pred[::-1]).all()


def test_readme_api_example_runs(cache, tmp_path):
    """The README's API example, run as written (paths swapped for a synthetic cache)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"```python\n(from pipeline import .*?)```", readme, re.S)
    assert block, "README has no ```python block with the API example"
    code = block.group(1).replace('"cache/cifar10-lt-b200-resnet32-paper-s0"', repr(str(cache.parent)))
    code = code.replace('load_results("cache")', f"load_results({str(cache.parent.parent)!r})")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    df = ns["df"]
    assert {"run", "head", "acc_all"} <= set(df.columns) and (df["head"] == "learned-ncm").any()
    assert df["acc_all"].dtype.kind == "f" and not any(c.startswith("_") for c in df.columns)
    assert not list(cache.parent.glob("*.lock")), "record_fit left a lock file behind"
    row = df[df["head"] == "learned-ncm"].iloc[-1]
    assert row["acc_all"] == pytest.approx(ns["res"].acc["all"], abs=1e-4) and row["run"] == cache.parent.name


def test_load_results_refuses_a_missing_path(tmp_path):
    from pipeline import load_results
    from pipeline.utils import UserError
    with pytest.raises(UserError, match="neither"):
        load_results(tmp_path / "nope")
