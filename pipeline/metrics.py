"""Many / Medium / Few bookkeeping shared by stage 1 (learning curves), stage 2 (heads) and reports."""
from __future__ import annotations

import math

import numpy as np

from .config import FEW_THRESHOLD, GROUP_NAMES, MANY_THRESHOLD


def class_groups(train_counts) -> np.ndarray:
    """Group id per class: 0 = Many (>= 100 train images), 1 = Medium, 2 = Few (< 20)."""
    counts = np.asarray(train_counts)
    return np.where(counts >= MANY_THRESHOLD, 0, np.where(counts < FEW_THRESHOLD, 2, 1)).astype(np.int8)


def per_class_accuracy(pred, labels, num_classes: int) -> np.ndarray:
    """Accuracy of each class on the test set; NaN for a class with no test sample."""
    pred = np.asarray(pred)
    labels = np.asarray(labels)
    correct = np.bincount(labels, weights=(pred == labels).astype(np.float64), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / total


def balanced_accuracy(pred, labels, num_classes: int) -> float:
    """Mean per-class accuracy (a fraction) over the classes present in ``labels``: the report's "All" / 100."""
    return float(np.nanmean(per_class_accuracy(pred, labels, num_classes)))


def shot_accuracy(per_class_acc, groups) -> dict:
    """Decoupling's shot_acc: mean of per-class accuracies within each group, in percent.

    'all' is the mean over every class (on a balanced test set it equals plain top-1).  A group with no
    class is NaN -- printed as n/a, never as 0.
    """
    acc = np.asarray(per_class_acc, dtype=np.float64)
    groups = np.asarray(groups)
    out = {"all": float(np.nanmean(acc) * 100)}
    for g, name in enumerate(GROUP_NAMES):
        sel = acc[groups == g]
        sel = sel[~np.isnan(sel)]
        out[name] = float(sel.mean() * 100) if sel.size else float("nan")
    return out


def evaluate(pred, labels, groups) -> dict:
    """Per-class and grouped accuracy of predictions against labels."""
    pca = per_class_accuracy(pred, labels, len(groups))
    return {**shot_accuracy(pca, groups), "per_class": pca}


def fmt_acc(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"
