"""Finding the caches and fit rows behind a report, choosing the ones a cell uses, and the commands that
would produce what is missing.

Everything a report needs about its inputs travels in one :class:`ReportContext` (cache root, data roots,
tolerance, the discovered caches grouped by stage-1 recipe, warnings), built once by :func:`load_context`.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..cache import CACHE_FILE, provenance_config, read_cache, run_name
from ..config import DEFAULT_RECIPE, RECIPES, RESULT_COLUMNS, recipe_identity
from ..stage2.heads import HEADS
from ..utils import UserError
from .paper import DATASET_LABEL, FAMILY, METRICS, NATURAL_SPLIT, Spec, fmt_beta, fmt_tau

REQUIRED_COLUMNS = ("fit_id", "timestamp", "head", "variant", "tau", "hparams", "cache_fingerprint",
                    "acc_all", "acc_many", "acc_medium", "acc_few")
DEFAULT_DATA_ROOTS = {"cifar10-lt": "../shared/data/cifar10-jpeg", "cifar100-lt": "<CIFAR100_ROOT>",
                      "cifar20-lt": "<CIFAR100_ROOT>", "imagenet-lt": "<IMAGENET_LT_ROOT>",
                      "places-lt": "<PLACES_LT_ROOT>", "inat2018": "<INAT2018_ROOT>"}
# fit-head flags for the hyperparameters that select a table row
HPARAM_FLAGS = {"metric": "--metric", "distance": "--distance", "num_centroids": "--num-centroids", "p": "--p",
                "fit_split": "--fit-split"}


# ----------------------------------------------------------------------------------------------------
# Caches

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
    def config(self) -> dict:
        cfg = self.prov.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def fingerprint(self) -> str:
        return self.cache.fingerprint

    def data_label(self) -> str:
        return data_label(self.prov, self.dataset)

    def recipe_deviations(self) -> list:
        """How this run's stage-1 config differs from the paper's recipe for its family ([] = it is it)."""
        name = DEFAULT_RECIPE[FAMILY.get(self.dataset, "cifar")]
        cfg = provenance_config(self.prov)
        out = [] if cfg.get("recipe") == name else [f"recipe {cfg.get('recipe') or 'not recorded'} (paper: {name})"]
        paper = RECIPES[name]
        for k in dict.fromkeys([*paper, *RECIPES.get(cfg.get("recipe"), {})]):  # e.g. balms's drop_last, fc_init
            if k != "family" and cfg.get(k) != paper.get(k):
                out.append(f"{k} {cfg.get(k)} (paper: {paper.get(k)})")
        if cfg.get("train_limit") or cfg.get("test_limit"):
            out.append(f"TINY RUN (train_limit {cfg.get('train_limit')}, test_limit {cfg.get('test_limit')})")
        snap = self.prov.get("snapshot")
        if snap:  # `pipeline snapshot`: an earlier epoch's weights, not the run's model
            out.append(f"SNAPSHOT (the weights of epoch {snap.get('epoch')} of {snap.get('epochs')})")
        return out


def budget(c) -> str:
    """Stage 1's budget in iterations, as the recipes define it: '2,000 iterations (80 epochs of 25 steps)'."""
    it, spe = c.config.get("iterations"), c.config.get("steps_per_epoch")
    if spe and c.epochs:
        done = int(c.epochs) * int(spe)  # whole epochs: a budget that is not a multiple of an epoch rounds up
        more = f"; the recipe's {int(it):,} rounded up to whole epochs" if it and done != int(it) else ""
        if c.config.get("drop_last") and it:  # recipe balms: epochs counted with the partial batch, then skipped
            more = f"; the recipe's {int(it):,} counted with each epoch's partial batch, which it skips as BALMS does"
        return f"{done:,} iterations ({c.epochs} epochs of {int(spe)} steps{more})"
    if it and not c.epochs:
        return f"{int(it):,} iterations"
    return f"{c.epochs} epochs"


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


def group_key(prov: dict, dataset: str) -> str:
    """Runs with the same key are repeats of one recipe (config.recipe_identity: all but seed and precision)."""
    ident = recipe_identity(provenance_config(prov))
    ident["dataset"] = dataset  # the table's dataset (an ImageFolder of the CIFAR-10 JPEGs is cifar10-lt)
    return json.dumps(ident, sort_keys=True, default=str)


def as_float(v):
    try:
        if v is None or (isinstance(v, str) and v.strip() == ""):
            return float("nan")
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def parse_hparams(s) -> dict:
    if isinstance(s, dict):
        return s
    if s is None or str(s).strip() == "":
        return {}
    try:
        v = json.loads(s)
        return v if isinstance(v, dict) else {}
    except (TypeError, ValueError):
        return {}


def features_fingerprints(cache) -> dict:
    """variant -> the fingerprint its fit rows must carry (FeatureCache.variant_fingerprint)."""
    return {v: cache.variant_fingerprint(v) for v in cache.variants}


def read_results(path, fingerprint: str | dict | None = None, warnings: list | None = None):
    """Rows of one results.csv, the latest per (head, variant, tau, hparams other than COMPUTE_DETAILS);
    returns (rows, stale, total).

    Rows whose cache_fingerprint differs from the cache's (the cache was re-extracted since) are stale and
    dropped; ``fingerprint`` is one for every row, or a dict variant -> fingerprint (features_fingerprints:
    a variant re-estimated since, or no longer in the cache, makes its rows stale).  "Latest" is by timestamp;
    equal timestamps go to the row written later in the file.  A rerun of a fit has the same content-derived
    fit_id, so re-running deterministic fits changes no table.
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
        if isinstance(fingerprint, dict):
            want = df["variant"].replace("", "plain").map(fingerprint).fillna("\0")
        else:
            want = fingerprint
        keep = df["cache_fingerprint"].str.strip() == want
        stale = int((~keep).sum())
        df = df[keep]
    df = df.copy()
    df["_tau"] = df["tau"].map(as_float).fillna(0.0).round(8)
    # a configuration is what was fitted: a rerun computed another way (threads, GEMM precision) replaces it
    df["_hp"] = df["hparams"].map(lambda s: json.dumps({k: v for k, v in parse_hparams(s).items()
                                                        if k not in COMPUTE_DETAILS}, sort_keys=True, default=str))
    df["_variant"] = df["variant"].replace("", "plain")
    df["_ts"] = pd.to_datetime(df["timestamp"], utc=True, errors="coerce", format="mixed")
    for m in METRICS:
        df[f"_{m}"] = df[f"acc_{m}"].map(as_float)
    df = df.sort_values(["_ts", "_order"], na_position="first", kind="mergesort")
    df = df.groupby(["head", "_variant", "_tau", "_hp"], sort=False).tail(1)
    return df.sort_values("_order", kind="mergesort").reset_index(drop=True), stale, total


@dataclass
class Group:
    """Caches of one stage-1 recipe that differ only in the training seed."""
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


def discover(cache_root, warnings: list) -> list:
    """Every readable cache under cache_root/*/features.h5 (cache.CACHE_FILE) with its fit rows."""
    root = Path(cache_root)
    infos = []
    if not root.is_dir():
        return infos
    for h5 in sorted(root.glob(f"*/{CACHE_FILE}")):
        try:
            c = read_cache(h5)
        except UserError as e:
            warnings.append(f"skipped {h5}: {e}")
            continue
        prov = c.provenance
        ds = prov.get("dataset")
        if ds == "imagefolder" and "cifar10-jpeg" in f"{prov.get('data_source', '')}" and c.num_classes == 10:
            ds = "cifar10-lt"  # the offline CIFAR-10 JPEG copy read as a plain ImageFolder
        imb = prov.get("imbalance")
        imb = None if ds in NATURAL_SPLIT or imb is None else float(imb)
        rel = f"{str(cache_root).rstrip('/')}/{h5.parent.name}"
        info = CacheInfo(dir=h5.parent, rel=rel, run=h5.parent.name, cache=c, dataset=ds, imbalance=imb,
                         seed=int(prov.get("seed", 0) or 0), epochs=prov.get("epochs"),
                         group_key=group_key(prov, ds))
        info.rows, info.stale_rows, info.all_rows = read_results(h5.parent / "results.csv",
                                                                 features_fingerprints(c), warnings)
        if info.stale_rows:
            warnings.append(f"{info.rel}/results.csv: {info.stale_rows} row(s) were fitted on older features "
                            f"(fingerprint differs from {c.fingerprint} or its variant's) and are ignored")
        infos.append(info)
    return infos


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


# ----------------------------------------------------------------------------------------------------
# Picking the fit row of a table cell

COMPUTE_DETAILS = ("matmul", "cpu_threads")  # hparams that record how a fit was computed, not what was fitted


def pick_row(rows: pd.DataFrame, spec: Spec):
    """The latest test-split row for ``spec``; with several hparams settings: a value chosen on the val
    split first (tau-norm's p auto), then the one closest to the head's defaults, then the newest."""
    if rows is None or rows.empty:
        return None
    sel = rows[(rows["head"] == spec.head) & (rows["_variant"] == spec.variant)
               & np.isclose(rows["_tau"].astype(float), spec.tau, atol=1e-6)]
    want = dict(spec.hparams)
    defaults = dict(HEADS[spec.head].defaults) if spec.head in HEADS else {}
    ranked = []
    for _, r in sel.iterrows():
        hp = parse_hparams(r["hparams"])
        if any(str(hp.get(k)) != str(v) for k, v in want.items()):
            continue
        if hp.get("eval_split", "test") != "test":  # the paper's numbers are test-set numbers
            continue
        if hp.get("fit_split", "train") != want.get("fit_split", "train"):  # a fit on the test images is no cell
            continue
        # how the GEMMs were computed (bf16 / fp32, chosen by matmul "auto") is not a hyperparameter
        conflicts = sum(1 for k, v in hp.items() if k in defaults and k not in COMPUTE_DETAILS
                        and not _same(v, defaults[k]))
        ts = r["_ts"]
        ranked.append((hp.get("p_select") != "val", conflicts, -(ts.value if not pd.isna(ts) else -1),
                       -r["_order"], r))
    ranked.sort(key=lambda c: c[:4])
    return ranked[0][4] if ranked else None


def _same(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b))
    except (TypeError, ValueError):
        return str(a) == str(b)


# ----------------------------------------------------------------------------------------------------
# Commands

def fit_args(spec: Spec, hparams: dict | None = None, seed=None) -> list:
    """`pipeline fit-head` options (after --cache) that make ``spec``'s fit (with ``hparams``'s selectors)."""
    parts = ["--head", spec.head]
    if spec.variant != "plain":
        parts += ["--variant", spec.variant]
    if spec.tau:
        parts += ["--tau", fmt_tau(spec.tau)]
    hp = dict(spec.hparams)
    hparams = dict(hparams or {})
    if hparams.get("p_select") == "val":
        hparams["p"] = "auto"  # rerunning picks p on val again
    defaults = dict(HEADS[spec.head].defaults) if spec.head in HEADS else {}
    for k, v in hparams.items():  # the selectors that differ from the head's defaults (the rest is implied)
        if k in HPARAM_FLAGS and k not in hp and not (k in defaults and _same(v, defaults[k])):
            hp[k] = v
    for k, v in sorted(hp.items()):
        if k in HPARAM_FLAGS:
            parts += [HPARAM_FLAGS[k], str(v)]
    if hparams.get("cl2n"):
        parts.append("--cl2n")
    if int(hparams.get("cpu_threads", 1)) != 1:  # another thread count is another fit, bit for bit
        parts += ["--threads", str(hparams["cpu_threads"])]
    if seed not in (None, "", "0", 0):
        parts += ["--seed", str(seed)]
    return parts


def fit_command(cache_rel: str, spec: Spec, hparams: dict | None = None, seed=None) -> str:
    return " ".join(["pipeline fit-head", f"--cache {cache_rel}", *fit_args(spec, hparams, seed)])


def expected_run(dataset, imbalance, seed=0) -> str:
    fam = FAMILY.get(dataset, "cifar")
    beta = imbalance if imbalance is not None else 256  # ImageNet-LT split files: 1280 / 5
    return run_name(dataset, beta, RECIPES[DEFAULT_RECIPE[fam]]["backbone"], seed, DEFAULT_RECIPE[fam])


@dataclass
class ReportContext:
    """What every table, figure and command of one report needs."""
    cache_root: str = "cache"
    data_roots: dict = field(default_factory=dict)
    tolerance: float = 1.0
    infos: list = field(default_factory=list)
    groups: list = field(default_factory=list)
    warnings: list = field(default_factory=list)

    def choose_group(self, dataset, imbalance):
        """The group a cell uses: the paper's dataset/beta, the paper's recipe first, then the most stage-1
        epochs, then the most seeds."""
        cands = [g for g in self.groups if g.dataset == dataset
                 and (dataset in NATURAL_SPLIT or imbalance is None
                      or (g.imbalance is not None and math.isclose(g.imbalance, imbalance)))]
        if not cands:
            return None
        cands.sort(key=lambda g: (len(g.caches[0].recipe_deviations()) > 0, -(g.epochs or 0), -len(g.caches),
                                  g.key))
        return cands[0]

    def pref_groups(self, prefs):
        """Groups in preference order: the (dataset, beta) pairs in prefs first, then anything else."""
        out = []
        for ds, b in prefs:
            g = self.choose_group(ds, b)
            if g is not None and g not in out:
                out.append(g)
        for g in sorted(self.groups, key=lambda g: (g.dataset, -(g.imbalance or 0), g.key)):
            if g not in out:
                out.append(g)
        return out

    def rel(self, run: str) -> str:
        return f"{str(self.cache_root).rstrip('/')}/{run}"

    def extract_command(self, dataset, imbalance, seed=0, bn=False, like: CacheInfo | None = None) -> str:
        """`pipeline extract` for the paper's recipe, or for the run ``like`` (to add BN features to it)."""
        roots = {**DEFAULT_DATA_ROOTS, **(self.data_roots or {})}
        parts = ["pipeline extract", f"--dataset {dataset}", f"--data-root {roots.get(dataset, '<DATA_ROOT>')}"]
        if dataset not in NATURAL_SPLIT and imbalance is not None:
            parts.append(f"--imbalance {fmt_beta(imbalance)}")
        parts.append(f"--seed {seed}")
        if like is None:
            parts.append(f"--recipe {DEFAULT_RECIPE[FAMILY.get(dataset, 'cifar')]}")
        else:  # the existing run's recipe and budget, so that extract reuses its checkpoint
            if like.config.get("recipe"):
                parts.append(f"--recipe {like.config['recipe']}")
            parts.append(f"--epochs {like.epochs}")
        if bn:
            parts.append("--bn-recalibrate")
        if str(self.cache_root).rstrip("/") != "cache":
            parts.append(f"--cache-dir {self.cache_root}")
        if like is not None and like.run != expected_run(dataset, imbalance, seed):
            parts.append(f"--run-name {like.run}")
        return " ".join(parts)

    def fit_or_extract(self, dataset, imb, spec: Spec) -> str:
        g = self.choose_group(dataset, imb)
        if g is None:
            return (self.extract_command(dataset, imb, bn=spec.variant == "bn_recal") + " && "
                    + fit_command(self.rel(expected_run(dataset, imb)), spec))
        return fit_command(g.caches[0].rel, spec)


def inputs_digest(ctx: ReportContext) -> str:
    """16 hex digits of sha256 over what the report is computed from: each cache's run name and fingerprint
    and the fit rows it uses (fit id, variant, tau, hparams, accuracies) -- not when the fits ran or which
    commit ran them, so rerunning deterministic fits leaves it (and every tracked output) unchanged."""
    what = []
    for c in sorted(ctx.infos, key=lambda c: c.run):
        rows = [] if c.rows is None else sorted(
            [str(r["fit_id"]), str(r["_variant"]), float(r["_tau"]), str(r["_hp"]),
             *[str(r[f"acc_{m}"]) for m in METRICS]] for _, r in c.rows.iterrows())
        what.append([c.run, c.fingerprint, rows])
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def volatile_provenance(ctx: ReportContext) -> dict:
    """What the tracked outputs leave out because it changes on every rerun of the same fits: the toolkit
    commit that built the report, and when and with which commit each fit used was run
    (provenance.local.json, git-ignored)."""
    from ..utils import git_commit
    fits = {}
    for c in sorted(ctx.infos, key=lambda c: c.run):
        for _, r in (c.rows if c.rows is not None else pd.DataFrame()).iterrows():
            fits[str(r["fit_id"])] = {"run": c.run, "timestamp": str(r["timestamp"]),
                                      "git_commit": str(r["git_commit"]), "device": str(r["device"]),
                                      "fit_seconds": str(r["fit_seconds"])}
    return {"report_toolkit_commit": git_commit(), "inputs_digest": inputs_digest(ctx),
            "results_rows": {c.run: {"used": 0 if c.rows is None else len(c.rows), "stale": c.stale_rows,
                                     "total": c.all_rows} for c in sorted(ctx.infos, key=lambda c: c.run)},
            "fits": dict(sorted(fits.items()))}


def load_context(cache_root="cache", data_roots: dict | None = None, tolerance: float = 1.0) -> ReportContext:
    ctx = ReportContext(str(cache_root), dict(data_roots or {}), tolerance)
    if Path(cache_root).exists():
        ctx.infos = discover(cache_root, ctx.warnings)
        ctx.groups = make_groups(ctx.infos, ctx.warnings)
    return ctx
