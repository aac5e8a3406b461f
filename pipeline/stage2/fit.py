"""Stage 2: fit one head on a cached feature split, evaluate it, and record the fit.

``fit_head`` validates everything *before* any fitting (so a bad request never produces a results row),
runs the head from :mod:`pipeline.stage2.heads` on the chosen device, and returns a :class:`FitResult`.
``record_fit`` writes the fit artifact ``<cache dir>/fits/<fit_id>.npz`` and appends one row to
``<cache dir>/results.csv`` (columns :data:`pipeline.config.RESULT_COLUMNS`, in that order).  Earlier rows
are never rewritten: the new file is the old bytes plus one line, written to a temporary file and moved
into place with os.replace, under an exclusive lock so that parallel fits cannot lose each other's rows.

``fit_id`` is derived from what the fit *is* (cache fingerprint, head, variant, tau, seed, hparams), not
from when it ran: re-running a fit appends a row with the same id (and rewrites the same artifact), so a
rerun is recognisable as one and the report's tables stay byte-stable.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, read_cache
from ..config import ACCURACY_KEYS, EVAL_SPLITS, FIT_SPLITS, RESULT_COLUMNS, VARIANT_FORMS, is_variant
from .heads import HEADS, HeadData, check_hparams
from ..metrics import evaluate
from ..utils import (UserError, atomic_path, cpu_threads, dir_lock, fp32_matmul, git_commit, now_iso,
                     resolve_device)


@dataclass
class FitResult:
    head: str
    variant: str
    tau: float
    seed: int
    eval_split: str
    acc: dict                  # all / many / medium / few, percent (NaN for an empty group)
    per_class: np.ndarray      # per-class accuracy on the eval split, fraction (NaN: no eval sample)
    params: dict               # fitted parameters, numpy arrays (saved in the artifact)
    fit_seconds: float
    device: str
    hparams: dict              # hyperparameters actually used (recorded as JSON), incl. eval_split
    ignored: list = field(default_factory=list)  # hyperparameters given but not used by this head
    train_counts: np.ndarray | None = None
    predictor: object = field(default=None, repr=False, compare=False)  # the head's own predict (not saved)
    pred: np.ndarray | None = field(default=None, repr=False, compare=False)  # eval-split predictions

    def predict(self, x) -> np.ndarray:
        """Predicted classes of features ``x`` [M, d] (numpy or tensor) with the fitted head, as it predicted
        the eval split (same device, fp32 GEMMs, same CPU threads).  Only in the process that fitted it: the
        artifact ``fits/<fit_id>.npz`` keeps the parameters, not the code."""
        if self.predictor is None:
            raise UserError(f"this {self.head} result has no predictor (it was not fitted in this process)")
        x = torch.as_tensor(np.ascontiguousarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
        if x.ndim != 2:
            raise UserError(f"predict expects features of shape [M, d], got {tuple(x.shape)}")
        threads = self.hparams.get("cpu_threads", torch.get_num_threads())
        with torch.no_grad(), fp32_matmul(), cpu_threads(threads):
            out = self.predictor(x.to(self.device))
        return (out.cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)).astype(np.int64)


def _finite(name, a):
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise UserError(f"{name} contain {bad} NaN/inf value(s); re-extract the cache")


def _load(cache: FeatureCache, variant: str, eval_split: str, need_val: bool = False, fit_split: str = "train"):
    """Read and validate train + eval (+ val) arrays (UserError on anything a fit cannot use).  The counts
    returned are always the training split's; with ``fit_split`` "test" the arrays returned as training
    features are the test split's."""
    if not is_variant(variant):
        raise UserError(f"variant must be {VARIANT_FORMS}; got {variant!r}")
    tx, ty = cache.split("train", variant)
    ex, ey = cache.split(eval_split, variant)
    vx = vy = None
    if need_val:
        if "val" not in cache.splits(variant):
            raise UserError(f"cache {cache.path} has no 'val' split, and this head selects a hyperparameter on "
                            "the val split (never on test); give the value instead (e.g. p=1)")
        vx, vy = cache.split("val", variant)
    C = cache.num_classes
    where = f"{cache.path} [{variant}]"
    checked = [("train", tx, ty), (eval_split, ex, ey)] + ([("val", vx, vy)] if need_val else [])
    for name, x, y in checked:
        if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
            raise UserError(f"{where} {name} split is malformed (features {x.shape}, labels {y.shape})")
        if y.min() < 0 or y.max() >= C:
            raise UserError(f"{where} {name} labels fall outside 0..{C - 1}")
        _finite(f"{where} {name} features", x)
    if ex.shape[1] != tx.shape[1] or cache.classifier_weight.shape != (C, tx.shape[1]) \
            or (need_val and vx.shape[1] != tx.shape[1]):
        raise UserError(f"{where}: feature/classifier dimensions disagree (train {tx.shape[1]}, "
                        f"{eval_split} {ex.shape[1]}, classifier {cache.classifier_weight.shape})")
    counts = np.bincount(ty, minlength=C)
    if (counts == 0).any():
        raise UserError(f"{where}: {int((counts == 0).sum())} class(es) have no training sample")
    if not np.array_equal(counts, np.asarray(cache.train_counts)):
        raise UserError(f"{where}: classes/train_counts disagree with the train labels; re-extract the cache")
    _finite(f"{where} stage-1 classifier", cache.classifier_weight)
    _finite(f"{where} stage-1 classifier bias", cache.classifier_bias)
    if fit_split != "train":
        tx, ty = cache.split(fit_split, variant) if fit_split != eval_split else (ex, ey)
        _finite(f"{where} {fit_split} features", tx)
        if (np.bincount(ty, minlength=C) == 0).any():
            raise UserError(f"{where}: a class has no sample in the {fit_split} split to fit on")
    return tx, ty, ex, ey, counts, vx, vy


def fit_head(cache, head: str, variant: str = "plain", tau: float | None = None, seed: int = 0,
             device: str = "auto", eval_split: str = "test", memo: dict | None = None, threads: int = 1,
             fit_split: str = "train", **hparams) -> FitResult:
    """Fit ``head`` on the train split of ``cache`` (a FeatureCache or a path) and evaluate on ``eval_split``.

    ``tau`` None means the head's default (0; 1 for posthoc-la).  ``hparams`` override the head's
    defaults (None values are ignored, so CLI options can be passed straight through); a known
    hyperparameter the head does not use is listed in ``FitResult.ignored`` and not recorded.
    ``memo``: a dict the caller keeps across fits (empty at first) in which heads leave work that a later fit
    on the same features can take instead of redoing it (multi-ncm takes learned-ncm's centroids); the results
    are the same bit for bit, and ``fit_seconds`` still counts the reused work.
    ``threads``: torch's CPU threads for a CPU fit (recorded as hparams ``cpu_threads``).  The default 1 makes
    a fit the same on every machine: the thread count changes how a GEMM splits its sums, and SGD carries
    that last-bit difference into a different fit.  More threads are faster only at ImageNet-LT size.
    ``fit_split`` "test" fits the head on the test split's features instead (the class counts N_y, Many /
    Medium / Few and logit adjustment's prior stay the training set's): what BALMS's CIFAR code hands a second
    stage as ``train_plain``.  A leak, for diagnosing published numbers only; recorded as hparams
    ``fit_split`` (a fit on "train" records nothing, so its fit_id is what it always was).
    """
    # -- validation: everything that can be wrong is checked before any fitting --------------------
    if head not in HEADS:
        raise UserError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
    spec = HEADS[head]
    if tau is None:
        tau = spec.default_tau
    tau = float(tau)
    if not math.isfinite(tau) or tau < 0:
        raise UserError(f"tau must be a finite number >= 0, got {tau}")
    if tau != 0 and not spec.uses_tau:
        raise UserError(f"head {head!r} does not use tau (got tau={tau:g}); heads that do: "
                        f"{sorted(n for n, h in HEADS.items() if h.uses_tau)}")
    if eval_split not in EVAL_SPLITS:
        raise UserError(f"eval_split must be one of {EVAL_SPLITS}, got {eval_split!r}")
    if fit_split not in FIT_SPLITS:
        raise UserError(f"fit_split must be one of {FIT_SPLITS}, got {fit_split!r}")
    if fit_split != "train" and not spec.reads_train:
        raise UserError(f"head {head!r} does not fit on features (it rescales the stage-1 classifier), so "
                        f"fit_split={fit_split!r} changes nothing; use fit_split='train'")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be an integer >= 1, got {threads!r}")
    given = {k: v for k, v in hparams.items() if v is not None}
    check_hparams(given)
    hp = {**spec.defaults, **{k: v for k, v in given.items() if k in spec.defaults}}
    ignored = sorted(k for k in given if k not in spec.defaults)
    need_val = bool(spec.needs_val(hp))
    if need_val and eval_split == "val":
        raise UserError(f"head {head!r} with these options selects a hyperparameter on the val split; "
                        "evaluating on that same split would report a tuned number: use eval_split='test'")
    dev = resolve_device(device)
    if not isinstance(cache, FeatureCache):
        cache = read_cache(cache)
    tx, ty, ex, ey, counts, vx, vy = _load(cache, variant, eval_split, need_val, fit_split)

    # -- fit + evaluate --------------------------------------------------------------------------------
    on_cpu = dev.type == "cpu"
    t = lambda a, dt=torch.float32: torch.as_tensor(a, dtype=dt).to(dev)  # noqa: E731
    with cpu_threads(threads) if on_cpu else contextlib.nullcontext():
        data = HeadData(train_x=t(tx), train_y=t(ty, torch.int64), eval_x=t(ex), train_counts=t(counts),
                        classifier_weight=t(cache.classifier_weight), classifier_bias=t(cache.classifier_bias),
                        seed=int(seed), val_x=None if vx is None else t(vx),
                        val_y=None if vy is None else t(vy, torch.int64),
                        memo=None if memo is None else memo.setdefault(  # work done in other threads differs
                            (str(cache.path), variant, cache.variant_fingerprint(variant), fit_split, str(dev),
                             threads if on_cpu else None), {}))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        with fp32_matmul():  # fp32 GEMMs stay fp32 (no TF32, no bf16 reductions) whatever the environment sets
            out = spec.fn(data, hp, tau)
        pred = out.pred.cpu().numpy() if isinstance(out.pred, torch.Tensor) else np.asarray(out.pred)
        seconds = time.perf_counter() - start + out.reused_seconds  # .cpu() above synchronises a CUDA fit
    res = evaluate(pred, ey, cache.groups)
    acc = {k: res[k] for k in ACCURACY_KEYS}
    compute = dict(cpu_threads=threads) if on_cpu else {}  # the thread count changes the bits: recorded
    fitted_on = {} if fit_split == "train" else dict(fit_split=fit_split)  # another fit, so another fit_id
    return FitResult(head=head, variant=variant, tau=tau, seed=int(seed), eval_split=eval_split, acc=acc,
                     per_class=res["per_class"], params=out.params, fit_seconds=seconds, device=str(dev),
                     hparams={**hp, **out.chosen, **compute, **fitted_on, "eval_split": eval_split}, ignored=ignored,
                     train_counts=counts, predictor=out.predict, pred=pred.astype(np.int64))


# ----------------------------------------------------------------------------------------------------
# Recording


def fit_id(cache_fingerprint: str, result: FitResult) -> str:
    """``<head>-<12 hex>``: a hash of what the fit is (cache, head, variant, tau, seed, hparams), so the same
    fit run twice gets the same id."""
    what = dict(cache=cache_fingerprint, head=result.head, variant=result.variant, tau=float(result.tau),
                seed=int(result.seed), hparams=result.hparams)
    if torch.device(result.device).type != "cpu":  # a GPU fit is another fit (CPU ids stay as they were)
        what["device"] = torch.device(result.device).type
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{result.head}-{digest}"


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(round(v, 6))
    return str(v)


def _header_line() -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(RESULT_COLUMNS)
    return buf.getvalue()


def append_row(results_path, row: dict) -> None:
    """Append one row (a dict over RESULT_COLUMNS) atomically; refuse a CSV with other columns."""
    results_path = Path(results_path)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row[c]) for c in RESULT_COLUMNS])
    line = buf.getvalue()
    try:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        with dir_lock(results_path.parent):  # a lock on the folder: no results.csv.lock left behind
            old = results_path.read_text() if results_path.exists() else ""
            if old:
                header = next(csv.reader(io.StringIO(old)), None)
                if tuple(header or ()) != RESULT_COLUMNS:
                    raise UserError(f"{results_path} is not a results file of this toolkit (its columns "
                                    "differ); pass another results_path=...")
                if not old.endswith("\n"):
                    old += "\n"
            else:
                old = _header_line()
            with atomic_path(results_path, suffix=".csv") as tmp:
                tmp.write_text(old + line)
    except OSError as e:
        raise UserError(f"cannot write {results_path}: {e.strerror or e}") from None


def record_fit(cache, result: FitResult, results_path=None) -> dict:
    """Save the artifact and append the results row; returns the row (dict over RESULT_COLUMNS)."""
    if not isinstance(cache, FeatureCache):
        cache = read_cache(cache)
    cache_dir = Path(cache.path).resolve().parent
    results_path = Path(results_path) if results_path else cache_dir / "results.csv"
    features_fp = cache.variant_fingerprint(result.variant)  # the cache's, plus a re-estimation's method
    fid = fit_id(features_fp, result)
    artifact = Path("fits") / f"{fid}.npz"
    arrays = {"per_class_acc": np.asarray(result.per_class, dtype=np.float64),
              "train_counts": np.asarray(result.train_counts if result.train_counts is not None
                                         else cache.train_counts, dtype=np.int64)}
    arrays.update({k: np.asarray(v) for k, v in result.params.items()})
    existed = (cache_dir / artifact).exists()  # a rerun of this fit: earlier rows cite that file
    try:
        (cache_dir / "fits").mkdir(exist_ok=True)
        with atomic_path(cache_dir / artifact, suffix=".npz") as tmp:
            with open(tmp, "wb") as fh:  # a file handle: np.savez would append .npz to a path
                np.savez(fh, **arrays)
    except OSError as e:
        raise UserError(f"cannot write the fit artifact under {cache_dir / 'fits'}: {e.strerror or e}") from None
    prov = cache.provenance
    row = dict(fit_id=fid, timestamp=now_iso(), head=result.head, variant=result.variant, tau=result.tau,
               seed=result.seed, hparams=json.dumps(result.hparams, sort_keys=True, separators=(",", ":")),
               cache_path=str(Path(cache.path).resolve()), cache_fingerprint=features_fp,
               dataset=prov.get("dataset"), imbalance=prov.get("imbalance"), backbone=prov.get("backbone"),
               train_seed=prov.get("seed"), stage1_epochs=prov.get("epochs"),
               acc_all=result.acc["all"], acc_many=result.acc["many"], acc_medium=result.acc["medium"],
               acc_few=result.acc["few"], fit_seconds=round(result.fit_seconds, 3), device=result.device,
               git_commit=git_commit(), artifact=artifact.as_posix())
    try:
        append_row(results_path, row)
    except BaseException:
        if not existed:
            (cache_dir / artifact).unlink(missing_ok=True)  # no row -> no orphan artifact
        raise
    return row
