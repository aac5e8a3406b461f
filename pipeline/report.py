"""Reports: the paper's tables (ours beside the published values) and figures, from caches + fit results.

Inputs (nothing else is read):
  <cache_root>/<run>/features.h5   stage-1 caches (pipeline.cache)
  <cache_root>/<run>/results.csv   one row per stage-2 fit (pipeline fit-head), artifacts under fits/

Outputs under ``out_dir``:
  table{1,2,3,5,6,7}.csv / .md     long format, one row per (method, dataset, beta, metric) cell
  figures/fig*.png + fig*.csv      each figure with the numbers behind it (header names source + fingerprint)
  README.md                        what the numbers come from, headline, reproduced / missed cells, figures

Rules: a configuration with no cache or no fit is a "not run" row with the command that would produce it
(never dropped, never filled from the paper).  Per (cache, head, variant, tau, hparams) only the latest
results row counts.  Caches that differ only in the stage-1 seed are averaged (mean, std with ddof=1, n).
Tables never contain wall-clock times, so a second report on the same inputs is byte-identical.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cache import read_cache, run_name
from .config import HEAD_DEFAULTS, TRAIN_DEFAULTS
from .utils import UserError, atomic_path, check_writable_dir, git_commit

# ----------------------------------------------------------------------------------------------------
# Contract with stage 2 (pipeline fit-head): columns of results.csv

RESULT_COLUMNS = ("fit_id", "timestamp", "head", "variant", "tau", "seed", "hparams", "cache_path",
                  "cache_fingerprint", "dataset", "imbalance", "backbone", "train_seed", "stage1_epochs",
                  "acc_all", "acc_many", "acc_medium", "acc_few", "fit_seconds", "device", "git_commit",
                  "artifact")
REQUIRED_COLUMNS = ("fit_id", "timestamp", "head", "variant", "tau", "hparams", "cache_fingerprint",
                    "acc_all", "acc_many", "acc_medium", "acc_few")
METRICS = ("all", "many", "medium", "few")
METRIC_LABEL = {"all": "All", "many": "Many", "medium": "Med", "few": "Few"}
TAU_SWEEP = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # Fig. 5
LA_TAU = 0.125  # "+LA" rows of the paper (Sec. 4.3: tau = 1/8)

DATASET_LABEL = {"cifar10-lt": "CIFAR-10-LT", "cifar100-lt": "CIFAR-100-LT", "cifar20-lt": "CIFAR-20-LT",
                 "imagenet-lt": "ImageNet-LT", "places-lt": "Places-LT", "inat2018": "iNaturalist-2018",
                 "imagefolder": "ImageFolder"}
FAMILY = {"cifar10-lt": "cifar", "cifar100-lt": "cifar", "cifar20-lt": "cifar", "imagenet-lt": "imagenet",
          "places-lt": "imagenet", "inat2018": "imagenet", "imagefolder": "cifar"}
NATURAL_SPLIT = ("imagenet-lt", "places-lt", "inat2018")  # beta is fixed by the split files
PAPER_EPOCHS = {"cifar": 200, "imagenet": TRAIN_DEFAULTS["imagenet"]["epochs"]}
DEFAULT_DATA_ROOTS = {"cifar10-lt": "../shared/data/cifar10-jpeg", "cifar100-lt": "<CIFAR100_ROOT>",
                      "cifar20-lt": "<CIFAR100_ROOT>", "imagenet-lt": "<IMAGENET_LT_ROOT>",
                      "places-lt": "<PLACES_LT_ROOT>", "inat2018": "<INAT2018_ROOT>"}
# fit-head flags for the hyperparameters that select a table row
HPARAM_FLAGS = {"metric": "--metric", "num_centroids": "--num-centroids", "p": "--p"}


def dataset_label(dataset, imbalance=None) -> str:
    name = DATASET_LABEL.get(dataset, dataset)
    if dataset in NATURAL_SPLIT or imbalance is None:
        return name
    return f"{name} β={_fmt_beta(imbalance)}"


def _fmt_beta(b) -> str:
    b = float(b)
    return str(int(b)) if b.is_integer() else f"{b:g}"


def _fmt_tau(t) -> str:
    return f"{float(t):g}"


# ----------------------------------------------------------------------------------------------------
# The paper's tables, transcribed (None = "-" in the paper)

@dataclass(frozen=True)
class Spec:
    """Which fits make a table row: head, feature variant, logit-adjustment tau, required hparams."""
    head: str
    variant: str = "plain"
    tau: float = 0.0
    hparams: tuple = ()  # ((key, value), ...) that the row's hparams JSON must contain

    def label(self) -> str:
        s = self.head + ("" if self.variant == "plain" else f" [{self.variant}]")
        s += "" if self.tau == 0 else f" τ={_fmt_tau(self.tau)}"
        return s + "".join(f" {k}={v}" for k, v in self.hparams)


def H(head, tau=0.0, variant="plain", **hp) -> Spec:
    return Spec(head, variant, float(tau), tuple(sorted(hp.items())))


@dataclass
class TableRow:
    method: str
    spec: Spec | None  # None: not run here
    paper: list
    kind: str = "ours"  # ours | literature | paper-only


@dataclass
class TableSpec:
    name: str
    title: str
    columns: list  # [(dataset, imbalance or None, metric)]
    rows: list


def _cols(dataset, beta, metrics):
    return [(dataset, None if beta is None else float(beta), m) for m in metrics]


A4 = METRICS
A3 = ("all", "many", "medium")
LIT = "literature"

TABLES = [
    TableSpec("table1", "Table 1: Ablation study for CIFAR-100-LT (+LA = logit adjustment, τ = 1/8)",
              _cols("cifar100-lt", 200, A4) + _cols("cifar100-lt", 100, A4) + _cols("cifar100-lt", 10, A3), [
                  TableRow("Softmax", H("softmax"), [41.2, 76.1, 46.6, 10.2, 46.0, 73.8, 46.0, 13.6, 62.3, 68.7, 48.0]),
                  TableRow("NCM", H("ncm"), [43.4, 64.6, 50.4, 21.6, 48.7, 60.7, 52.1, 30.8, 59.0, 61.7, 52.9]),
                  TableRow("Learned NCM", H("learned-ncm"),
                           [45.7, 66.2, 52.4, 24.6, 50.7, 64.6, 53.1, 31.7, 62.1, 64.5, 56.8]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU),
                           [45.9, 62.9, 50.8, 28.9, 50.9, 60.5, 52.9, 37.2, 62.4, 63.7, 59.7]),
                  TableRow("Multi-NCM", H("multi-ncm"),
                           [45.7, 67.3, 51.8, 24.3, 50.8, 64.5, 53.0, 32.3, 62.4, 64.8, 57.3]),
                  TableRow("Multi-NCM + LA", H("multi-ncm", LA_TAU),
                           [46.0, 66.1, 51.9, 25.7, 51.0, 64.7, 53.0, 32.6, 62.5, 64.6, 57.9]),
              ]),
    TableSpec("table2", "Table 2: All accuracy on CIFAR-10-LT and CIFAR-100-LT (β = 200, 100, 10)",
              _cols("cifar10-lt", 200, ["all"]) + _cols("cifar10-lt", 100, ["all"]) + _cols("cifar10-lt", 10, ["all"])
              + _cols("cifar100-lt", 200, ["all"]) + _cols("cifar100-lt", 100, ["all"])
              + _cols("cifar100-lt", 10, ["all"]), [
                  TableRow("Focal (Lin et al. 2017)", None, [65.3, 70.4, 86.7, 35.6, 38.4, 55.8], LIT),
                  TableRow("LDAM (Cao et al. 2019)", None, [None, 77.0, 88.2, None, 42.0, 58.7], LIT),
                  TableRow("Decoupling (cRT) †", H("crt"), [80.2, 81.4, 91.3, 45.3, 50.7, 62.5]),
                  TableRow("NCM", H("ncm"), [79.7, 79.8, 91.2, 43.4, 48.7, 59.0]),
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 81.6, 91.4, 45.7, 50.7, 62.1]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU), [81.3, 81.4, 91.7, 45.9, 50.9, 62.4]),
              ]),
    TableSpec("table3", "Table 3: CIFAR-100-LT (β = 200) and ImageNet-LT",
              _cols("cifar100-lt", 200, A4) + _cols("imagenet-lt", None, A4), [
                  TableRow("Focal (Lin et al. 2017)", None, [35.6, 60.4, 41.7, 15.7, 30.5, 36.4, 29.9, 16.0], LIT),
                  TableRow("Decoupling (cRT) †", H("crt"), [45.3, 69.5, 50.6, 22.4, 41.2, 51.7, 37.9, 23.1]),
                  TableRow("Decoupling (τ-norm)", H("tau-norm"), [None] * 8),
                  TableRow("Decoupling (LWS)", H("lws"), [None] * 8),
                  TableRow("Post-hoc logit adjustment (τ = 1)", H("posthoc-la", 1.0), [None] * 8),
                  TableRow("CB Experts (Sharma et al. 2020)", None, [None] * 4 + [39.2, 48.2, 37.0, 21.5], LIT),
                  TableRow("LFME (Xiang et al. 2020)", None, [None] * 4 + [38.8, 47.0, 37.9, 19.2], LIT),
                  TableRow("OLTR (Liu et al. 2019)", None, [None] * 4 + [35.6, 43.2, 35.1, 18.5], LIT),
                  TableRow("NCM", H("ncm"), [43.4, 64.6, 50.4, 21.6, 34.4, 42.5, 32.1, 19.7]),
                  TableRow("Learned NCM", H("learned-ncm"), [45.7, 66.2, 52.4, 24.6, 40.0, 48.4, 37.7, 24.5]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU),
                           [45.9, 62.9, 50.8, 28.9, 39.6, 45.1, 38.1, 29.2]),
              ]),
    # Table 5's last line is two rows merged by the text extraction ("76.6 80.2 | 83.1 82.1 | ..."): the
    # first number of each pair follows the "Local Metric + Learned NCM" label; the second set of numbers
    # lost its label (the text mentions a third strategy that it never names) and is shown unmapped.
    TableSpec("table5", "Table 5: jointly learned distance metric and NCM (β = 200)",
              _cols("cifar10-lt", 200, A3) + _cols("cifar100-lt", 200, A4), [
                  TableRow("NCM", H("ncm"), [79.7, 82.2, 73.8, 43.4, 64.6, 50.4, 21.6]),
                  TableRow("Global Metric + Learned NCM", H("metric-ncm", metric="global"),
                           [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
                  TableRow("Local Metric + Learned NCM", H("metric-ncm", metric="local"),
                           [76.6, 83.1, 61.3, 43.4, 69.7, 48.8, 18.9]),
                  TableRow("(unlabelled row: label lost in the paper text extraction)", None,
                           [80.2, 82.1, 75.9, 43.8, 69.9, 51.0, 18.0], "paper-only"),
                  TableRow("Learned NCM (reference; paper values of Tables 1/7)", H("learned-ncm"),
                           [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
              ]),
    TableSpec("table6", "Table 6: post-hoc BatchNorm re-estimation (BN), β = 200",
              _cols("cifar10-lt", 200, A3) + _cols("cifar100-lt", 200, A4), [
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 82.2, 77.6, 45.7, 66.2, 52.4, 24.6]),
                  TableRow("Learned NCM (BN)", H("learned-ncm", variant="bn_recal"),
                           [79.7, 78.2, 83.2, 45.6, 63.4, 52.6, 26.5]),
                  TableRow("Multi-NCM", H("multi-ncm"), [80.8, 82.2, 77.6, 45.7, 67.3, 51.8, 24.2]),
                  TableRow("Multi-NCM (BN)", H("multi-ncm", variant="bn_recal"),
                           [81.4, 81.1, 82.2, 45.8, 65.3, 52.1, 25.8]),
              ]),
    TableSpec("table7", "Table 7: detailed results on CIFAR-10-LT",
              _cols("cifar10-lt", 200, A3) + _cols("cifar10-lt", 100, A3) + _cols("cifar10-lt", 10, ["all"]), [
                  TableRow("Softmax", H("softmax"), [74.0, 83.0, 52.9, 80.3, 81.7, 74.6, 90.3]),
                  TableRow("NCM", H("ncm"), [79.7, 82.2, 73.8, 79.8, 79.0, 82.8, 91.2]),
                  TableRow("Learned NCM", H("learned-ncm"), [80.8, 82.2, 77.6, 81.6, 81.0, 83.9, 91.4]),
                  TableRow("Learned NCM + LA", H("learned-ncm", LA_TAU), [81.3, 81.8, 79.9, 81.4, 79.6, 87.4, 91.7]),
                  TableRow("Multi-NCM", H("multi-ncm"), [80.8, 82.2, 77.6, 81.6, 81.2, 83.1, 91.3]),
                  TableRow("Multi-NCM + LA", H("multi-ncm", LA_TAU), [81.1, 82.4, 77.8, 81.4, 80.1, 87.0, 91.6]),
              ]),
]
for _t in TABLES:  # transcription sanity: one paper value per column in every row
    for _r in _t.rows:
        assert len(_r.paper) == len(_t.columns), (_t.name, _r.method)

# configurations the tables and figures need (dataset, beta): used for "not run" and --list-missing
NEEDED_CONFIGS = [("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0),
                  ("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar100-lt", 10.0),
                  ("cifar20-lt", 200.0), ("cifar20-lt", 100.0), ("cifar20-lt", 10.0),
                  ("imagenet-lt", None)]
BN_CONFIGS = {("cifar10-lt", 200.0), ("cifar100-lt", 200.0)}  # Table 6


# ----------------------------------------------------------------------------------------------------
# Discovering caches and fit rows

@dataclass
class CacheInfo:
    dir: Path
    rel: str  # the cache folder as written in commands: <cache_root>/<run>
    run: str
    cache: object  # FeatureCache
    dataset: str  # table dataset (an ImageFolder of cifar10-jpeg counts as cifar10-lt)
    imbalance: float | None
    seed: int
    epochs: int | None
    group_key: str
    rows: pd.DataFrame = None  # latest row per configuration, fingerprint-matched
    stale_rows: int = 0
    all_rows: int = 0

    @property
    def prov(self) -> dict:
        return self.cache.provenance

    @property
    def fingerprint(self) -> str:
        return self.cache.fingerprint

    def data_label(self) -> str:
        return data_label(self.prov, self.dataset)


def data_label(prov: dict, dataset: str | None = None) -> str:
    """Human label of the images behind a cache; 'CIFAR-10 (JPEG q75)' for the offline JPEG copy."""
    cfg = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    src = f"{prov.get('data_source', '')} {prov.get('source', '')} {cfg.get('source', '')}"
    ds = dataset or prov.get("dataset")
    if ds in ("cifar10-lt", "imagefolder") and ("cifar10-jpeg" in src or "jpeg" in src.lower()):
        return "CIFAR-10 (JPEG q75)"
    if "synthetic" in src.lower():
        return "synthetic features (pipeline.synthetic)"
    if ds in ("cifar10-lt",):
        return "CIFAR-10"
    if ds in ("cifar100-lt", "cifar20-lt"):
        return "CIFAR-100"
    return DATASET_LABEL.get(ds, str(ds))


_NON_IDENTITY_CONFIG = {"seed", "precision", "source", "device", "data_root", "cache_dir", "run_name",
                        "overwrite", "deterministic"}


def _group_key(prov: dict, dataset: str, imbalance) -> str:
    cfg = prov.get("config") if isinstance(prov.get("config"), dict) else {}
    cfg = {k: v for k, v in cfg.items() if k not in _NON_IDENTITY_CONFIG}
    ident = dict(dataset=dataset, imbalance=imbalance, subset_seed=prov.get("subset_seed"),
                 backbone=prov.get("backbone"), epochs=prov.get("epochs"), config=cfg)
    return json.dumps(ident, sort_keys=True, default=str)


def _as_float(v):
    try:
        if v is None or (isinstance(v, str) and v.strip() == ""):
            return float("nan")
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _parse_hparams(s) -> dict:
    if isinstance(s, dict):
        return s
    if s is None or str(s).strip() == "":
        return {}
    try:
        v = json.loads(s)
        return v if isinstance(v, dict) else {}
    except (TypeError, ValueError):
        return {}


def _canon_hparams(s) -> str:
    return json.dumps(_parse_hparams(s), sort_keys=True, default=str)


_RESULT_IDENTITY = ("seed", "acc_all", "acc_many", "acc_medium", "acc_few")


def read_results(path, fingerprint: str | None = None, warnings: list | None = None):
    """Rows of one results.csv, latest per (head, variant, tau, hparams); returns (rows, stale, total).

    When the latest row only repeats the accuracies (and seed) of the rows right before it, the first row of
    that streak is returned (same numbers, a stable fit_id: re-running deterministic fits changes nothing).
    Rows whose cache_fingerprint differs from the cache's (the cache was re-extracted since) are stale
    and dropped.  "Latest" is by timestamp; equal timestamps go to the row written later in the file.
    """
    warnings = [] if warnings is None else warnings
    path = Path(path)
    empty = pd.DataFrame(columns=list(RESULT_COLUMNS))
    if not path.exists():
        return empty, 0, 0
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        warnings.append(f"{path}: unreadable results file ({type(e).__name__}); ignored")
        return empty, 0, 0
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        warnings.append(f"{path}: missing columns {missing}; ignored")
        return empty, 0, len(df)
    for c in RESULT_COLUMNS:
        if c not in df.columns:
            df[c] = ""
    total = len(df)
    df["_order"] = np.arange(len(df))
    stale = 0
    if fingerprint is not None:
        keep = df["cache_fingerprint"].str.strip() == fingerprint
        stale = int((~keep).sum())
        df = df[keep]
    df = df.copy()
    df["_tau"] = df["tau"].map(_as_float).fillna(0.0).round(8)
    df["_hp"] = df["hparams"].map(_canon_hparams)
    df["_variant"] = df["variant"].replace("", "plain")
    df["_ts"] = pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="mixed")
    for m in METRICS:
        df[f"_{m}"] = df[f"acc_{m}"].map(_as_float)
    df = df.sort_values(["_ts", "_order"], na_position="first", kind="mergesort")
    keep = []
    for _, g in df.groupby(["head", "_variant", "_tau", "_hp"], sort=False):
        # the latest row decides the result; re-fits that repeat it exactly (deterministic fits re-run by
        # run_all.sh) are the same result, so the row cited is the first one of that trailing streak
        same = g[list(_RESULT_IDENTITY)].astype(str).agg("\x1f".join, axis=1).to_numpy()
        i = len(g) - 1
        while i > 0 and same[i - 1] == same[-1]:
            i -= 1
        keep.append(g.index[i])
    df = df.loc[keep]
    return df.sort_values("_order", kind="mergesort").reset_index(drop=True), stale, total


def discover(cache_root, warnings: list) -> list:
    """Every readable cache under cache_root/*/features.h5 with its fit rows."""
    root = Path(cache_root)
    infos = []
    if not root.is_dir():
        return infos
    for h5 in sorted(root.glob("*/features.h5")):
        try:
            c = read_cache(h5)
        except UserError as e:
            warnings.append(f"skipped {h5}: {e}")
            continue
        prov = c.provenance
        ds = prov.get("dataset")
        src = f"{prov.get('data_source', '')}"
        if ds == "imagefolder" and "cifar10-jpeg" in src and c.num_classes == 10:
            ds = "cifar10-lt"  # the offline CIFAR-10 JPEG copy read as a plain ImageFolder
        imb = prov.get("imbalance")
        imb = None if ds in NATURAL_SPLIT or imb is None else float(imb)
        rel = f"{str(cache_root).rstrip('/')}/{h5.parent.name}"
        info = CacheInfo(dir=h5.parent, rel=rel, run=h5.parent.name, cache=c, dataset=ds, imbalance=imb,
                         seed=int(prov.get("seed", 0) or 0), epochs=prov.get("epochs"),
                         group_key=_group_key(prov, ds, imb))
        info.rows, info.stale_rows, info.all_rows = read_results(h5.parent / "results.csv", c.fingerprint,
                                                                 warnings)
        if info.stale_rows:
            warnings.append(f"{info.rel}/results.csv: {info.stale_rows} row(s) were fitted on an older cache "
                            f"(fingerprint differs from {c.fingerprint}) and are ignored")
        infos.append(info)
    return infos


@dataclass
class Group:
    """Caches of one stage-1 configuration that differ only in the training seed."""
    key: str
    caches: list  # CacheInfo, sorted by seed

    @property
    def dataset(self):
        return self.caches[0].dataset

    @property
    def imbalance(self):
        return self.caches[0].imbalance

    @property
    def epochs(self):
        return self.caches[0].epochs


def make_groups(infos, warnings: list) -> list:
    by_key: dict = {}
    for i in infos:
        by_key.setdefault(i.group_key, []).append(i)
    groups = []
    for key, members in sorted(by_key.items()):
        by_seed: dict = {}
        for m in members:
            by_seed.setdefault(m.seed, []).append(m)
        chosen = []
        for seed, ms in sorted(by_seed.items()):
            ms = sorted(ms, key=lambda m: (str(m.prov.get("created", "")), m.run))
            if len(ms) > 1:
                warnings.append(f"caches {', '.join(m.rel for m in ms)} repeat stage-1 seed {seed} of one "
                                f"configuration; only the newest ({ms[-1].rel}) is used")
            chosen.append(ms[-1])
        groups.append(Group(key, chosen))
    return groups


def choose_group(groups, dataset, imbalance):
    """The group a table cell uses: the paper's dataset/beta, most stage-1 epochs, then most seeds."""
    cands = [g for g in groups if g.dataset == dataset
             and (dataset in NATURAL_SPLIT or imbalance is None
                  or (g.imbalance is not None and math.isclose(g.imbalance, imbalance)))]
    if not cands:
        return None
    paper_backbone = TRAIN_DEFAULTS[FAMILY.get(dataset, "cifar")]["backbone"]
    cands.sort(key=lambda g: (-(g.epochs or 0), -len(g.caches), g.caches[0].prov.get("backbone") != paper_backbone,
                              g.key))
    return cands[0]


# ----------------------------------------------------------------------------------------------------
# Commands

def extract_command(dataset, imbalance, cache_root="cache", data_roots=None, seed=0, bn=False,
                    epochs=None) -> str:
    roots = {**DEFAULT_DATA_ROOTS, **(data_roots or {})}
    fam = FAMILY.get(dataset, "cifar")
    parts = ["pipeline extract", f"--dataset {dataset}", f"--data-root {roots.get(dataset, '<DATA_ROOT>')}"]
    if dataset not in NATURAL_SPLIT and imbalance is not None:
        parts.append(f"--imbalance {_fmt_beta(imbalance)}")
    parts += [f"--seed {seed}", f"--epochs {epochs or PAPER_EPOCHS[fam]}"]
    if bn:
        parts.append("--bn-recalibrate")
    if str(cache_root).rstrip("/") != "cache":
        parts.append(f"--cache-dir {cache_root}")
    return " ".join(parts)


def expected_run(dataset, imbalance, seed=0) -> str:
    fam = FAMILY.get(dataset, "cifar")
    beta = imbalance if imbalance is not None else 256  # ImageNet-LT split files: 1280 / 5
    return run_name(dataset, beta, TRAIN_DEFAULTS[fam]["backbone"], seed)


def fit_command(cache_rel: str, spec: Spec, hparams: dict | None = None, seed=None) -> str:
    parts = ["pipeline fit-head", f"--cache {cache_rel}", f"--head {spec.head}"]
    if spec.variant != "plain":
        parts.append(f"--variant {spec.variant}")
    if spec.tau:
        parts.append(f"--tau {_fmt_tau(spec.tau)}")
    hp = dict(spec.hparams)
    for k, v in (hparams or {}).items():
        if k in HPARAM_FLAGS and k not in hp:
            hp[k] = v
    for k, v in sorted(hp.items()):
        if k in HPARAM_FLAGS:
            parts.append(f"{HPARAM_FLAGS[k]} {v}")
    if (hparams or {}).get("cl2n"):
        parts.append("--cl2n")
    if seed not in (None, "", "0", 0):
        parts.append(f"--seed {seed}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Picking the fit row of a table cell

_DEFAULTS = {k: v for k, v in HEAD_DEFAULTS.items() if k != "tau"}


def pick_row(rows: pd.DataFrame, spec: Spec):
    """The latest row for ``spec``; with several hparams settings, the one closest to the defaults."""
    if rows is None or rows.empty:
        return None
    sel = rows[(rows["head"] == spec.head) & (rows["_variant"] == spec.variant)
               & np.isclose(rows["_tau"].astype(float), spec.tau, atol=1e-6)]
    if sel.empty:
        return None
    want = dict(spec.hparams)
    cands = []
    for _, r in sel.iterrows():
        hp = _parse_hparams(r["hparams"])
        if any(str(hp.get(k)) != str(v) for k, v in want.items()):
            continue
        if hp.get("eval_split", "test") != "test":  # the paper's numbers are test-set numbers
            continue
        cands.append((hp, r))
    if len(cands) > 1:  # several hyperparameter settings: prefer the head's defaults, then the newest
        defaults = _head_defaults(spec.head)
        ranked = []
        for hp, r in cands:
            conflicts = sum(1 for k, v in hp.items() if k in defaults and not _same(v, defaults[k]))
            ts = r["_ts"]
            ranked.append((conflicts, -(ts.value if not pd.isna(ts) else -1), -r["_order"], r))
        ranked.sort(key=lambda c: c[:3])
        return ranked[0][3]
    return cands[0][1] if cands else None


def _head_defaults(head) -> dict:
    """Stage 2's defaults of ``head`` (pipeline.heads registry), else the config's HEAD_DEFAULTS."""
    try:
        from .heads import HEADS
        if head in HEADS:
            return dict(HEADS[head].defaults)
    except ImportError:  # stage 2 not installed: the config's defaults are the best guess
        pass
    return dict(_DEFAULTS)


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return str(a) == str(b)


# ----------------------------------------------------------------------------------------------------
# Tables

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
class CellResult:
    values: list = field(default_factory=list)
    rows: list = field(default_factory=list)  # (CacheInfo, row)
    missing: list = field(default_factory=list)  # commands


def resolve_cell(groups, dataset, imbalance, spec: Spec, cache_root, data_roots):
    """Our values of one (dataset, beta, spec) across stage-1 seeds; commands for what is missing."""
    g = choose_group(groups, dataset, imbalance)
    res = CellResult()
    if g is None:
        run = expected_run(dataset, imbalance)
        res.missing.append(extract_command(dataset, imbalance, cache_root, data_roots,
                                           bn=spec.variant == "bn_recal")
                           + " && " + fit_command(f"{str(cache_root).rstrip('/')}/{run}", spec))
        return g, res
    for c in g.caches:
        if spec.variant not in c.cache.variants:
            res.missing.append(extract_command(dataset, imbalance, cache_root, data_roots, seed=c.seed, bn=True,
                                               epochs=c.epochs)
                               + (f" --run-name {c.run}" if c.run != expected_run(dataset, imbalance, c.seed)
                                  else "")
                               + " && " + fit_command(c.rel, spec))
            continue
        r = pick_row(c.rows, spec)
        if r is None:
            res.missing.append(fit_command(c.rel, spec))
            continue
        res.rows.append((c, r))
    return g, res


def build_table(t: TableSpec, groups, cache_root, data_roots, tolerance) -> pd.DataFrame:
    out = []
    cache: dict = {}
    for row in t.rows:
        for (dataset, imb, metric), paper in zip(t.columns, row.paper):
            section = dataset_label(dataset, imb)
            rec = dict(table=t.name, section=section, dataset=dataset, imbalance=_fmt_beta(imb) if imb else "",
                       method=row.method, head="", variant="", tau="", hparams="", metric=metric, ours="",
                       ours_std="", n_seeds="", paper=_f(paper, 1), diff="", status="", note="", data="",
                       command="", fit_ids="", runs="", cache_fingerprints="", stage1_epochs="", commits="")
            if row.spec is None:
                rec["status"] = ("literature (not run here)" if row.kind == LIT else
                                 "paper only (not mapped to a method here)")
                out.append(rec)
                continue
            spec = row.spec
            rec.update(head=spec.head, variant=spec.variant, tau=_fmt_tau(spec.tau),
                       hparams=json.dumps(dict(spec.hparams), sort_keys=True) if spec.hparams else "")
            key = (dataset, imb, spec)
            if key not in cache:
                cache[key] = resolve_cell(groups, dataset, imb, spec, cache_root, data_roots)
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
            vals = np.array([_as_float(r[f"_{metric}"]) for _, r in res.rows], dtype=np.float64)
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
                       command=" ; ".join(fit_command(c.rel, spec, _parse_hparams(r["hparams"]), r["seed"])
                                          for c, r in res.rows))
            notes = []
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
                rec["status"] = "reproduced" if abs(round(d, 6)) <= tolerance else "missed"
            epochs = {c.epochs for c, _ in res.rows}
            fam_epochs = PAPER_EPOCHS[FAMILY.get(dataset, "cifar")]
            if any((e or 0) < fam_epochs for e in epochs):
                notes.append(f"REDUCED stage-1 budget: {'/'.join(str(e) for e in sorted(epochs, key=str))} "
                             f"epochs (recipe: {fam_epochs})")
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
    notes = sorted({n for n in df["note"] if n and "REDUCED" in n})
    for n in notes:
        lines.append(f"**Warning:** {n.split(' | ')[-1]}")
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

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "lncm", "figure.dpi": 100})
    return plt


def _save_fig(fig, path: Path):
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)


def _save_csv(df: pd.DataFrame, path: Path, header: list):
    buf = io.StringIO()
    for h in header:
        buf.write(f"# {h}\n")
    df.to_csv(buf, index=False, float_format="%.6g", lineterminator="\n")
    with atomic_path(path, suffix=".csv") as tmp:
        tmp.write_text(buf.getvalue())


def _src_header(fig: str, caches) -> list:
    out = [fig]
    for c in caches:
        out.append(f"source: {c.rel}/features.h5 fingerprint {c.fingerprint} dataset {c.dataset} "
                   f"imbalance {_fmt_beta(c.imbalance) if c.imbalance else 'natural'} stage1_epochs {c.epochs} "
                   f"seed {c.seed} data {c.data_label()}")
    return out


def _pref_groups(groups, prefs):
    """Groups in preference order: the (dataset, beta) pairs in prefs first, then anything else."""
    out = []
    for ds, b in prefs:
        g = choose_group(groups, ds, b)
        if g is not None and g not in out:
            out.append(g)
    for g in sorted(groups, key=lambda g: (g.dataset, -(g.imbalance or 0), g.key)):
        if g not in out:
            out.append(g)
    return out


def _title_ds(g) -> str:
    s = dataset_label(g.dataset, g.imbalance)
    if g.caches[0].data_label() == "CIFAR-10 (JPEG q75)":
        s += " [CIFAR-10 (JPEG q75)]"
    if (g.epochs or 0) < PAPER_EPOCHS[FAMILY.get(g.dataset, "cifar")]:
        s += f" [stage 1: {g.epochs} epochs, reduced]"
    return s


@dataclass
class FigureResult:
    name: str
    title: str
    files: list = field(default_factory=list)
    skipped: str = ""  # reason + command when not produced
    caption: str = ""


def fig_tsne(groups, figdir, cache_root, data_roots, per_class=300) -> FigureResult:
    from . import analysis
    fr = FigureResult("fig1", "Figure 1: t-SNE of one tail and two head classes")
    prefs = [("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0)]
    for g in _pref_groups(groups, prefs):
        c = g.caches[0]
        if c.cache.num_classes < 3:
            continue
        x, y = c.cache.split("train", "plain")
        tail, h1, h2 = analysis.tsne_classes(c.cache.train_counts)
        emb, lab, idx = analysis.tsne_embed(x, y, (tail, h1, h2), max_per_class=per_class, random_state=0)
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
        ax.set_title(f"t-SNE of train features, {_title_ds(g)}")
        ax.legend(fontsize=8)
        sp = analysis.spread(emb, lab)
        _save_fig(fig, figdir / "fig1_tsne.png")
        df = pd.DataFrame({"index": idx, "label": lab, "class": [names[i] for i in lab],
                           "train_count": [int(counts[i]) for i in lab], "tsne_x": emb[:, 0], "tsne_y": emb[:, 1]})
        _save_csv(df, figdir / "fig1_tsne.csv", _src_header(
            f"fig1: t-SNE (sklearn, random_state=0, <={per_class} train samples per class) of one tail and two head "
            "classes",
            [c]) + ["mean distance to 2-D class centre: " + ", ".join(f"{names[k]} {v:.3f}" for k, v in sp.items())])
        fr.files = ["figures/fig1_tsne.png", "figures/fig1_tsne.csv"]
        fr.caption = (f"{_title_ds(g)}, run `{c.run}`: tail class {names[tail]} (N={int(counts[tail])}) vs head "
                      f"classes {names[h1]}, {names[h2]}; mean 2-D spread " +
                      ", ".join(f"{names[k]} {v:.2f}" for k, v in sp.items()) + ".")
        return fr
    fr.skipped = ("no cache; produce one with `" + extract_command("cifar10-lt", 200, cache_root, data_roots) + "`")
    return fr


VAR_FIGS = (("fig2", "cifar10-lt", "Figure 2"), ("fig7", "cifar100-lt", "Figure 7"), ("fig8", "cifar20-lt", "Figure 8"))


def fig_variance(groups, figdir, fig, dataset, label, cache_root, data_roots) -> FigureResult:
    from . import analysis
    fr = FigureResult(fig, f"{label}: intra-class variance vs class size, {DATASET_LABEL[dataset]}")
    gs = [g for g in groups if g.dataset == dataset]
    betas = sorted({g.imbalance for g in gs if g.imbalance is not None}, reverse=True)
    chosen = [choose_group(groups, dataset, b) for b in betas]
    if not chosen:
        fr.skipped = "no cache; produce with " + " ; ".join(
            f"`{extract_command(dataset, b, cache_root, data_roots)}`" for b in (200, 100, 10))
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
        ax.set_title(f"{_title_ds(g)}", fontsize=10)
        ax.legend(fontsize=7)
        df = pd.DataFrame({"imbalance": _fmt_beta(g.imbalance), "run": c.run, "fingerprint": c.fingerprint,
                           "class": np.arange(len(counts)), "class_name": c.cache.class_names,
                           "train_count": counts})
        for est in analysis.ESTIMATORS:
            df[f"sigma_{est}"] = res["sigma"][est]
        frames.append((df, c, res))
        captions.append(f"β={_fmt_beta(g.imbalance)}: ρ = " + ", ".join(
            f"{analysis.ESTIMATOR_LABELS[e]} {res['rho'][e]:.2f}" for e in analysis.ESTIMATORS))
    fig_.suptitle(f"Intra-class variance vs class size, {DATASET_LABEL[dataset]} (train features, stage 1)")
    stem = f"{fig}_variance_{dataset}"
    _save_fig(fig_, figdir / f"{stem}.png")
    header = _src_header(f"{fig}: sigma_y = largest eigenvalue of the class covariance (Eq. 1) per estimator",
                         [c for _, c, _ in frames])
    for df, c, res in frames:
        header.append(f"spearman rho(N_y, sigma_y) beta={_fmt_beta(c.imbalance)}: " + ", ".join(
            f"{e} {res['rho'][e]:.4f} (p={res['pvalue'][e]:.3g}, n={res['n'][e]})" for e in analysis.ESTIMATORS))
    _save_csv(pd.concat([f for f, _, _ in frames], ignore_index=True), figdir / f"{stem}.csv", header)
    fr.files = [f"figures/{stem}.png", f"figures/{stem}.csv"]
    fr.caption = "; ".join(captions) + "."
    missing = [b for b in (200.0, 100.0, 10.0) if b not in betas]
    if missing:
        fr.caption += " Not run: " + " ; ".join(f"`{extract_command(dataset, b, cache_root, data_roots)}`"
                                                for b in missing) + "."
    return fr


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


def fig_local_projection(groups, figdir, cache_root, data_roots) -> FigureResult:
    fr = FigureResult("fig3", "Figure 3: learned local projections (sigmoid weights per eigendimension)")
    spec = H("local-projection")
    for g in _pref_groups(groups, [("cifar10-lt", 200.0), ("cifar10-lt", 100.0), ("cifar10-lt", 10.0)]):
        for c in g.caches:
            r = pick_row(c.rows, spec)
            art = _artifact(c, r) if r is not None else None
            if art is None or "local_weights" not in art:
                continue
            w = np.asarray(art["local_weights"], dtype=np.float64)
            counts = c.cache.train_counts
            plt = _plt()
            fig, ax = plt.subplots(figsize=(8, max(3.0, 0.3 * w.shape[0] + 1.5)))
            im = ax.imshow(w, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xlabel("eigendimension i (ascending eigenvalue of Σ_y)")
            ax.set_ylabel("class y (label order; N_y)")
            if w.shape[0] <= 40:
                ax.set_yticks(range(w.shape[0]))
                ax.set_yticklabels([f"{i} (N={int(n)})" for i, n in enumerate(counts)], fontsize=7)
            ax.set_title(f"Local projection weights σ(w_y^i), {_title_ds(g)}")
            fig.colorbar(im, ax=ax, label="σ(w)")
            _save_fig(fig, figdir / "fig3_local_projection.png")
            df = pd.DataFrame(w, columns=[f"dim{i}" for i in range(w.shape[1])])
            df.insert(0, "train_count", counts)
            df.insert(0, "class", np.arange(w.shape[0]))
            _save_csv(df, figdir / "fig3_local_projection.csv",
                      _src_header(f"fig3: local-projection sigmoid weights, fit_id {r['fit_id']}", [c]))
            fr.files = ["figures/fig3_local_projection.png", "figures/fig3_local_projection.csv"]
            half = w.shape[1] // 2
            top = w[:, half:].mean(1)
            fr.caption = (f"{_title_ds(g)}, run `{c.run}`, fit `{r['fit_id']}`. Mean weight of the upper half "
                          f"of eigendimensions: head class {top[int(np.argmax(counts))]:.2f}, "
                          f"tail class {top[int(np.argmin(counts))]:.2f}.")
            return fr
    fr.skipped = "no local-projection fit with weights; produce with `" + _fit_or_extract(
        groups, "cifar10-lt", 200.0, spec, cache_root, data_roots) + "`"
    return fr


def _fit_or_extract(groups, dataset, imb, spec, cache_root, data_roots) -> str:
    g = choose_group(groups, dataset, imb)
    if g is None:
        return (extract_command(dataset, imb, cache_root, data_roots) + " && "
                + fit_command(f"{str(cache_root).rstrip('/')}/{expected_run(dataset, imb)}", spec))
    return fit_command(g.caches[0].rel, spec)


def fig_learning_curve(groups, figdir, cache_root, data_roots) -> FigureResult:
    fr = FigureResult("fig4", "Figure 4: stage-1 learning curve (test accuracy per group)")
    for g in _pref_groups(groups, [("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar10-lt", 200.0)]):
        c = g.caches[0]
        lc = c.cache.learning_curve()
        if not lc or "epoch" not in lc or len(lc["epoch"]) == 0:
            continue
        plt = _plt()
        fig, ax = plt.subplots(figsize=(6, 4))
        cols = {}
        for m, style in (("many", "-"), ("medium", "--"), ("few", ":"), ("all", "-")):
            if m in lc and np.isfinite(np.asarray(lc[m], dtype=float)).any():
                ax.plot(lc["epoch"], lc[m], style, label=METRIC_LABEL[m] if m != "medium" else "Medium",
                        lw=2.2 if m == "all" else 1.5)
                cols[m] = lc[m]
        ax.set_xlabel("stage-1 epoch")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Stage-1 learning curve, {_title_ds(g)} ({c.epochs} epochs)")
        ax.legend()
        _save_fig(fig, figdir / "fig4_learning_curve.png")
        df = pd.DataFrame({k: np.asarray(v) for k, v in lc.items()})
        _save_csv(df, figdir / "fig4_learning_curve.csv", _src_header("fig4: stage-1 learning curve", [c]))
        fr.files = ["figures/fig4_learning_curve.png", "figures/fig4_learning_curve.csv"]
        last = {k: float(np.asarray(v)[-1]) for k, v in cols.items()}
        fr.caption = (f"{_title_ds(g)}, run `{c.run}`, {c.epochs} epochs; final " +
                      ", ".join(f"{k} {v:.1f}" for k, v in last.items()) + ".")
        return fr
    fr.skipped = "no cache with a learning curve; produce with `" + extract_command(
        "cifar100-lt", 200, cache_root, data_roots) + "`"
    return fr


def fig_tau(groups, figdir, cache_root, data_roots) -> FigureResult:
    fr = FigureResult("fig5", "Figure 5: effect of the logit-adjustment weight τ (Learned NCM)")
    labels = ["0", "1/16", "1/8", "1/4", "1/2", "1"]
    for g in _pref_groups(groups, [("cifar100-lt", 200.0), ("cifar100-lt", 100.0), ("cifar100-lt", 10.0)]):
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
                v = np.array([_as_float(r[f"_{m}"]) for _, r in got])
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
        ax.set_title(f"Effect of τ, Learned NCM, {_title_ds(g)}")
        ax.legend()
        _save_fig(fig, figdir / "fig5_tau.png")
        _save_csv(df, figdir / "fig5_tau.csv", _src_header("fig5: learned-ncm accuracy vs tau (mean over seeds)",
                                                           g.caches))
        fr.files = ["figures/fig5_tau.png", "figures/fig5_tau.csv"]
        fr.caption = f"{_title_ds(g)}; τ values fitted: {', '.join(df['tau_label'])}."
        if missing:
            fr.caption += " Not run: " + " ; ".join(f"`{m}`" for m in missing) + "."
        return fr
    g = choose_group(groups, "cifar100-lt", 200.0)
    cmds = ([fit_command(g.caches[0].rel, H("learned-ncm", t)) for t in TAU_SWEEP] if g else
            [extract_command("cifar100-lt", 200, cache_root, data_roots)] +
            [fit_command(f"{str(cache_root).rstrip('/')}/{expected_run('cifar100-lt', 200)}", H("learned-ncm", t))
             for t in TAU_SWEEP])
    fr.skipped = "fewer than two τ values fitted; produce with " + " ; ".join(f"`{c}`" for c in cmds)
    return fr


def fig_centroids(groups, figdir, cache_root, data_roots) -> list:
    from . import analysis
    fa = FigureResult("fig6a", "Figure 6a: displacement of learned from empirical centroids")
    fb = FigureResult("fig6b", "Figure 6b: CDNV of Learned NCM per epoch")
    spec = H("learned-ncm")
    prefs = [("cifar100-lt", 200.0), ("cifar10-lt", 200.0), ("cifar100-lt", 100.0)]
    for g in _pref_groups(groups, prefs):
        for c in g.caches:
            r = pick_row(c.rows, spec)
            art = _artifact(c, r) if r is not None else None
            if art is None:
                continue
            counts = np.asarray(art.get("train_counts", c.cache.train_counts))
            hdr = _src_header(f"fit_id {r['fit_id']} (learned-ncm, tau 0, plain)", [c])
            if not fa.files and "centroids" in art and "empirical_centroids" in art:
                disp = analysis.centroid_displacement(art["centroids"], art["empirical_centroids"])
                rho, p, n = analysis.spearman(counts, disp)
                plt = _plt()
                fig, ax = plt.subplots(figsize=(6, 4))
                ax.scatter(counts, disp, s=14)
                ax.set_xscale("log")
                ax.set_xlabel("class size $N_y$ (train images, log scale)")
                ax.set_ylabel("‖learned − empirical centroid‖₂")
                ax.set_title(f"Centroid displacement, {_title_ds(g)} (Spearman ρ={rho:.2f})")
                _save_fig(fig, figdir / "fig6a_displacement.png")
                _save_csv(pd.DataFrame({"class": np.arange(len(counts)), "train_count": counts,
                                        "displacement": disp}), figdir / "fig6a_displacement.csv",
                          ["fig6a: ||learned - empirical centroid||_2 per class", *hdr[1:],
                           f"spearman rho(N_y, displacement) {rho:.4f} (p={p:.3g}, n={n})"])
                fa.files = ["figures/fig6a_displacement.png", "figures/fig6a_displacement.csv"]
                fa.caption = (f"{_title_ds(g)}, run `{c.run}`, fit `{r['fit_id']}`: Spearman ρ(N_y, displacement)"
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
                    ax.legend(fontsize=8)
                ax.set_xlabel("Learned NCM epoch (0 = empirical centroids)")
                ax.set_ylabel("average pairwise CDNV")
                ax.set_title(f"CDNV during Learned NCM training, {_title_ds(g)}")
                _save_fig(fig, figdir / "fig6b_cdnv.png")
                _save_csv(pd.DataFrame(data), figdir / "fig6b_cdnv.csv",
                          ["fig6b: average pairwise CDNV per epoch (index 0 = empirical centroids)", *hdr[1:]])
                fb.files = ["figures/fig6b_cdnv.png", "figures/fig6b_cdnv.csv"]
                fb.caption = (f"{_title_ds(g)}, run `{c.run}`, fit `{r['fit_id']}`: CDNV {cd[0]:.4f} (empirical) → "
                              f"{cd[-1]:.4f} after {len(cd) - 1} epochs.")
            if fa.files and fb.files:
                return [fa, fb]
    cmd = _fit_or_extract(groups, "cifar100-lt", 200.0, spec, cache_root, data_roots)
    for f in (fa, fb):
        if not f.files:
            f.skipped = f"no learned-ncm fit artifact with the needed arrays; produce with `{cmd}`"
    return [fa, fb]


FIG_FILES = ("fig1_tsne", "fig2_variance_cifar10-lt", "fig7_variance_cifar100-lt", "fig8_variance_cifar20-lt",
             "fig3_local_projection", "fig4_learning_curve", "fig5_tau", "fig6a_displacement", "fig6b_cdnv")


def build_figures(groups, out_dir: Path, cache_root, data_roots, warnings, tsne_per_class=300) -> list:
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for stem in FIG_FILES:  # a figure whose data disappeared must not linger from an earlier report
        for ext in (".png", ".csv"):
            (figdir / f"{stem}{ext}").unlink(missing_ok=True)
    results = []
    jobs = [("fig1", lambda: fig_tsne(groups, figdir, cache_root, data_roots, tsne_per_class))]
    for fig, ds, label in VAR_FIGS:
        jobs.append((fig, lambda fig=fig, ds=ds, label=label:
                     fig_variance(groups, figdir, fig, ds, label, cache_root, data_roots)))
    jobs += [("fig3", lambda: fig_local_projection(groups, figdir, cache_root, data_roots)),
             ("fig4", lambda: fig_learning_curve(groups, figdir, cache_root, data_roots)),
             ("fig5", lambda: fig_tau(groups, figdir, cache_root, data_roots)),
             ("fig6", lambda: fig_centroids(groups, figdir, cache_root, data_roots))]
    for name, job in jobs:
        try:
            r = job()
        except (ValueError, UserError, np.linalg.LinAlgError) as e:
            warnings.append(f"{name}: could not be drawn ({type(e).__name__}: {e})")
            r = FigureResult(name, name, skipped=f"failed: {e}")
        results += r if isinstance(r, list) else [r]
    order = {"fig1": 1, "fig2": 2, "fig3": 3, "fig4": 4, "fig5": 5, "fig6a": 6, "fig6b": 6.5, "fig7": 7, "fig8": 8}
    return sorted(results, key=lambda f: order.get(f.name, 99))


# ----------------------------------------------------------------------------------------------------
# README

def _machine(c) -> str:
    p = c.prov
    parts = [str(p[k]) for k in ("device", "platform", "cpu", "gpu", "hostname") if p.get(k)]
    devs = sorted({str(d) for d in c.rows["device"] if d}) if c.rows is not None and len(c.rows) else []
    s = "; ".join(parts) if parts else "not recorded"
    if devs:
        s += f" (stage 2: {', '.join(devs)})"
    return s


def _epochs_flag(c) -> str:
    fam = PAPER_EPOCHS[FAMILY.get(c.dataset, "cifar")]
    e = c.epochs
    cfg = c.prov.get("config") if isinstance(c.prov.get("config"), dict) else {}
    s = str(e)
    if e is None or int(e) < fam:
        s += f" **⚠ REDUCED (paper recipe: {fam})**"
    if cfg.get("train_limit") or cfg.get("test_limit"):
        s += f" **⚠ TINY RUN (train_limit={cfg.get('train_limit')}, test_limit={cfg.get('test_limit')})**"
    return s


def build_readme(out_dir, infos, groups, tables, figures, warnings, tolerance, cache_root) -> str:
    used_runs = set()
    for df in tables.values():
        for v in df["runs"]:
            used_runs.update(r for r in v.split(";") if r)
    stamps = []
    for c in infos:
        if c.prov.get("created"):
            stamps.append(str(c.prov["created"]))
        if c.rows is not None and len(c.rows):
            stamps += [str(t) for t in c.rows["timestamp"] if t]
    as_of = max(stamps) if stamps else "no inputs"
    L = ["# Reproduction report: Learned Nearest-Class-Mean for long-tailed recognition", "",
         f"Generated by `pipeline report` (toolkit commit `{git_commit()}`) from the inputs under `{cache_root}/`; "
         f"newest input: {as_of}. Tables are byte-stable for the same inputs.", ""]
    reduced = [c for c in infos if c.run in used_runs and
               (c.epochs is None or int(c.epochs) < PAPER_EPOCHS[FAMILY.get(c.dataset, "cifar")])]
    if reduced:
        L += ["> **⚠ REDUCED STAGE-1 BUDGET.** These runs were trained for fewer epochs than the paper's recipe "
              "(200 for CIFAR-LT): " + ", ".join(f"`{c.run}` ({c.epochs} epochs)" for c in reduced)
              + ". Numbers from them are not comparable one-to-one with the paper.", ""]
    jpeg = [c for c in infos if c.run in used_runs and c.data_label() == "CIFAR-10 (JPEG q75)"]
    if jpeg:
        L += ["> CIFAR-10 numbers come from **CIFAR-10 (JPEG q75)** (the offline copy re-encoded as JPEG quality 75); "
              "they can sit slightly below numbers on the lossless images.", ""]
    L += ["## Runs behind the numbers", ""]
    if infos:
        L += ["| run | dataset | data | β | stage-1 epochs | seed | variants | machine | created | commit | "
              "fingerprint | fit rows (used/stale/total) | in tables |", "|" + "---|" * 13]
        for c in sorted(infos, key=lambda c: c.run):
            L.append(f"| `{c.run}` | {DATASET_LABEL.get(c.dataset, c.dataset)} | {c.data_label()} | "
                     f"{_fmt_beta(c.imbalance) if c.imbalance else 'natural'} | {_epochs_flag(c)} | {c.seed} | "
                     f"{', '.join(c.cache.variants)} | {_machine(c)} | {c.prov.get('created', '')} | "
                     f"`{c.prov.get('git_commit', '')}` | `{c.fingerprint}` | "
                     f"{len(c.rows) if c.rows is not None else 0}/{c.stale_rows}/{c.all_rows} | "
                     f"{'yes' if c.run in used_runs else 'no'} |")
        L.append("")
        multi = [g for g in groups if len(g.caches) > 1]
        for g in multi:
            L.append(f"- {dataset_label(g.dataset, g.imbalance)}: {len(g.caches)} stage-1 seeds "
                     f"({', '.join(str(c.seed) for c in g.caches)}) averaged: mean ± std (ddof=1).")
        if multi:
            L.append("")
    else:
        L += [f"No caches under `{cache_root}/`: every table cell below is \"not run\".", ""]
    # headline
    L += ["## Headline: Table 2 (All accuracy), ours vs paper", "",
          "Cell: **ours** / paper (ours − paper); ✗ = more than "
          f"{tolerance:g} point away; lit. = literature value, not run here.", "",
          wide_markdown(tables["table2"]), ""]
    # reproduction summary
    allc = pd.concat(tables.values(), ignore_index=True)
    L += ["## Which paper cells we reproduce", "",
          f"Tolerance: |ours − paper| ≤ {tolerance:g} point (All/Many/Medium/Few accuracy, %).", "",
          "| table | reproduced | missed | not run | ours only | literature / unmapped |", "|---|---|---|---|---|---|"]
    for name, df in tables.items():
        st = df["status"]
        L.append(f"| [{name}]({name}.md) | {(st == 'reproduced').sum()} | {(st == 'missed').sum()} | "
                 f"{(st == 'not run').sum()} | {st.str.startswith('ours only').sum() + (st == 'empty group').sum()} | "
                 f"{st.str.startswith('literature').sum() + st.str.startswith('paper only').sum()} |")
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
              "| method | data | metric | ours | paper | ours − paper | tables |", "|---|---|---|---|---|---|---|"]
        for _, r in sel.iterrows():
            ours = r["ours"] + (f" ± {r['ours_std']}" if r["ours_std"] else "")
            ours += f" (n={r['n_seeds']})" if r["n_seeds"] != "1" else ""
            L.append(f"| {r['method']} | {r['section']} | {METRIC_LABEL[r['metric']]} | {ours} | {r['paper']} | "
                     f"{r['diff']} | {r['_tables']} |")
        L.append("")
    # figures
    L += ["## Figures", ""]
    for f in figures:
        L.append(f"### {f.title}")
        L.append("")
        if f.files:
            png = [p for p in f.files if p.endswith(".png")][0]
            csv = [p for p in f.files if p.endswith(".csv")][0]
            L += [f"![{f.title}]({png})", "", f"{f.caption} Data: [{csv}]({csv}).", ""]
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
    L += ["## Tables", ""] + [f"- [{t.title}]({t.name}.md) ([csv]({t.name}.csv))" for t in TABLES] + [""]
    if warnings:
        L += ["## Warnings", ""] + [f"- {w}" for w in warnings] + [""]
    return "\n".join(L)


# ----------------------------------------------------------------------------------------------------
# Entry points

@dataclass
class ReportResult:
    out_dir: Path
    tables: dict
    figures: list
    warnings: list
    files: list

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
            raise UserError(f"--data-root expects DATASET=DIR, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _write_text(path: Path, text: str):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def build_report(cache_root="cache", out_dir="reports", figures: bool = True, tolerance: float = 1.0,
                 data_roots: dict | None = None, tsne_per_class: int = 300) -> ReportResult:
    """Write every table (CSV + Markdown), the figures and README.md under ``out_dir``.

    ``data_roots`` maps dataset -> data root for the `pipeline extract` commands of cells not run;
    ``tsne_per_class`` caps the samples per class in the Figure 1 t-SNE.
    """
    out_dir = check_writable_dir(out_dir, "--out")
    cache_root = str(cache_root)
    if not Path(cache_root).exists():
        raise UserError(f"cache root {cache_root} does not exist; run `pipeline extract` first or pass --cache-root")
    warnings: list = []
    infos = discover(cache_root, warnings)
    groups = make_groups(infos, warnings)
    tables, files = {}, []
    for t in TABLES:
        df = build_table(t, groups, cache_root, data_roots, tolerance)
        tables[t.name] = df
        buf = io.StringIO()
        df.to_csv(buf, index=False, lineterminator="\n")
        _write_text(out_dir / f"{t.name}.csv", buf.getvalue())
        _write_text(out_dir / f"{t.name}.md", table_markdown(t, df, tolerance))
        files += [f"{t.name}.csv", f"{t.name}.md"]
    figs = build_figures(groups, out_dir, cache_root, data_roots, warnings, tsne_per_class) if figures else []
    for f in figs:
        files += f.files
    _write_text(out_dir / "README.md",
                build_readme(out_dir, infos, groups, tables, figs, warnings, tolerance, cache_root))
    files.append("README.md")
    return ReportResult(out_dir, tables, figs, warnings, files)


def missing_extract_commands(cache_root="cache", data_roots: dict | None = None) -> list:
    """`pipeline extract` commands for the configurations the tables/figures need but no cache has."""
    warnings: list = []
    groups = make_groups(discover(cache_root, warnings), warnings) if Path(cache_root).exists() else []
    cmds = []
    for ds, b in NEEDED_CONFIGS:
        g = choose_group(groups, ds, b)
        bn = (ds, b) in BN_CONFIGS or FAMILY[ds] == "cifar"  # BN recalibration is cheap: always add for CIFAR
        if g is None:
            cmds.append(extract_command(ds, b, cache_root, data_roots, bn=bn))
        elif (ds, b) in BN_CONFIGS:
            for c in g.caches:
                if "bn_recal" not in c.cache.variants:
                    cmd = extract_command(ds, b, cache_root, data_roots, seed=c.seed, bn=True, epochs=c.epochs)
                    if c.run != expected_run(ds, b, c.seed):
                        cmd += f" --run-name {c.run}"
                    cmds.append(cmd)
    return cmds
