"""The Python API (for notebooks): ``from pipeline import read_cache, fit_head, load_results``.

    c = read_cache("cache/cifar10-lt-b200-resnet32-paper-s0")
    res = fit_head(c, "learned-ncm", tau=0.125)         # res.acc: all / many / medium / few
    pred = res.predict(c.split("test")[0])               # the fitted head on any features [M, d]
    df = load_results("cache")                           # every recorded fit, one row each
"""
from __future__ import annotations

from pathlib import Path

from .utils import UserError

ACC_COLUMNS = ("acc_all", "acc_many", "acc_medium", "acc_few")


def load_results(path="cache", latest: bool = True):
    """Recorded fits as a pandas DataFrame (results.csv's columns, acc_* and tau as floats, plus ``run``),
    from one results.csv, a run folder, or every ``<run>/results.csv`` under a cache root.  ``latest``: the latest row per fit
    configuration whose cache is still the one on disk (what the report uses); else every row."""
    import pandas as pd
    from .cache import CACHE_FILE, read_cache
    from .report.runs import features_fingerprints, read_results
    p = Path(path)
    if p.is_file():
        files = [p]
    elif (p / "results.csv").exists():
        files = [p / "results.csv"]
    elif p.is_dir():
        files = sorted(p.glob("*/results.csv"))
    else:
        raise UserError(f"{path} is neither a results.csv, a run folder nor a cache root")
    frames = []
    for f in files:
        if latest:
            fp = (features_fingerprints(read_cache(f.parent / CACHE_FILE)) if (f.parent / CACHE_FILE).exists()
                  else None)
            df = read_results(f, fp)[0]
        else:
            df = pd.read_csv(f, dtype=str, keep_default_na=False)
        df = df.drop(columns=[c for c in df.columns if c.startswith("_")])  # the report's working columns
        frames.append(df.assign(run=f.parent.name))
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run", *ACC_COLUMNS])
    for c in (*ACC_COLUMNS, "tau"):
        if c in out.columns:
            out[c] = pd.to_numeric(out[c], errors="coerce")
    return out
