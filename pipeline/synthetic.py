"""Synthetic long-tailed feature caches (same schema as `pipeline extract`) for tests and benchmarks.

Class y has N_y = int(n_max * (1/beta)^(y/(C-1))) training points drawn from N(mu_y, s_y^2 I), where the
spread s_y grows towards the tail (the representation bias of the paper's Section 3), and a balanced test
set from the same distributions.  The stored "stage-1 classifier" is the softmax-like linear rule a
head-biased model would learn: w_y = mu_hat_y, b_y = -|mu_hat_y|^2/2 + log N_y.
"""
from __future__ import annotations

import hashlib

import numpy as np

from .cache import write_cache
from .stage1.data import lt_counts


def synthetic_features(num_classes=10, dim=16, imbalance=100.0, n_max=500, n_test=50, tail_spread=2.0,
                       separation=3.0, seed=0):
    """Return (train_x, train_y, test_x, test_y, counts, means, spreads)."""
    rng = np.random.default_rng(seed)
    counts = np.array(lt_counts(n_max, num_classes, imbalance), dtype=np.int64)
    means = rng.normal(size=(num_classes, dim)) * separation / np.sqrt(2)
    # spread rises linearly in log class size from 1 (head) to tail_spread (tail)
    logc = np.log(counts)
    t = (logc.max() - logc) / max(logc.max() - logc.min(), 1e-9)
    spreads = 1.0 + (tail_spread - 1.0) * t

    def draw(n_per_class):
        xs, ys = [], []
        for y, n in enumerate(n_per_class):
            xs.append(means[y] + spreads[y] * rng.normal(size=(n, dim)))
            ys.append(np.full(n, y))
        return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)

    tx, ty = draw(counts)
    test_x, test_y = draw([n_test] * num_classes)
    return tx, ty, test_x, test_y, counts, means, spreads


def _hash(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def make_synthetic_cache(path, *, dataset="synthetic-lt", num_classes=10, dim=16, imbalance=100.0,
                         n_max=500, n_test=50, tail_spread=2.0, separation=3.0, seed=0, bn_recal=True,
                         with_val=False, epochs=3):
    """Write a synthetic cache at ``path`` and return the path."""
    tx, ty, test_x, test_y, counts, means, spreads = synthetic_features(num_classes, dim, imbalance, n_max, n_test,
                                                                        tail_spread, separation, seed)
    mu = np.stack([tx[ty == c].mean(0) for c in range(num_classes)])
    weight = mu
    bias = -0.5 * (mu ** 2).sum(1) + np.log(counts)
    variants = {"plain": {"train": (tx, ty), "test": (test_x, test_y)}}
    if with_val:  # a separate draw from the same class distributions (never a subset of the test set)
        rng = np.random.default_rng(seed + 1)
        n_val = max(1, n_test // 2)
        vax = np.concatenate([means[y] + spreads[y] * rng.normal(size=(n_val, dim)) for y in range(num_classes)])
        vay = np.repeat(np.arange(num_classes), n_val)
        variants["plain"]["val"] = (vax.astype(np.float32), vay.astype(np.int64))
    if bn_recal:
        # a mild, deterministic re-normalisation stands in for BN re-estimation
        s = tx.std(0, keepdims=True) + 1e-6
        variants["bn_recal"] = {k: (x / s, y) for k, (x, y) in variants["plain"].items()}
    curve_epochs = np.arange(1, epochs + 1)
    provenance = dict(dataset=dataset, imbalance=float(imbalance), subset_seed=0, backbone="synthetic",
                      epochs=epochs, seed=seed, checkpoint_sha256="synthetic",
                      config=dict(num_classes=num_classes, dim=dim, n_max=n_max, n_test=n_test,
                                  tail_spread=tail_spread, separation=separation),
                      # stands in for the hash of trained weights: it makes the cache fingerprint tell apart
                      # synthetic caches that differ in anything but the run identity (dim, spread, ...)
                      weights_sha256=_hash(tx, ty, test_x, test_y),
                      data_source="synthetic Gaussian features (pipeline.synthetic)")
    return write_cache(path, provenance=provenance, class_names=[f"class{c}" for c in range(num_classes)],
                       train_counts=counts, classifier_weight=weight, classifier_bias=bias,
                       features=variants,
                       learning_curve=dict(epoch=curve_epochs, lr=np.linspace(0.1, 0.0, epochs),
                                           train_loss=np.linspace(2.0, 0.5, epochs),
                                           all=np.linspace(20, 60, epochs), many=np.linspace(40, 80, epochs),
                                           medium=np.linspace(10, 50, epochs), few=np.linspace(0, 30, epochs)))
