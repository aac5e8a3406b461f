"""Representation analysis behind the paper's figures (Sec. 3, 5.6, 6 and A.2).

* intra-class variance sigma_y = largest eigenvalue of the class covariance (Eq. 1), with the maximum-
  likelihood estimator of the paper ("mle", divides by N_y) or the shrinkage estimators of A.2
  ("ledoit-wolf", "oas", from sklearn.covariance);
* Spearman rank correlation of a per-class quantity with the class size N_y;
* centroid displacement ||learned - empirical|| per class (Fig. 6a);
* class-distance normalised variance, CDNV (Sec. 6, Galanti et al. 2021; Fig. 6b);
* a 2-D t-SNE of one tail class and two head classes (Fig. 1);
* per class, the features on the training images against the test images (:func:`train_test_gap`): does
  stage 1 memorise the tail?

Everything here is plain numpy / scipy / scikit-learn on arrays, so it is usable on any cache.
"""
from __future__ import annotations

import numpy as np

from .metrics import per_class_accuracy

ESTIMATORS = ("mle", "ledoit-wolf", "oas")
ESTIMATOR_LABELS = {"mle": "MLE (Eq. 1)", "ledoit-wolf": "Ledoit-Wolf", "oas": "OAS"}


# ----------------------------------------------------------------------------------------------------
# Intra-class variance (Eq. 1, A.2)

def class_covariance(x, estimator: str = "mle") -> np.ndarray:
    """Covariance [d, d] of the rows of ``x`` (one class) with the chosen estimator.

    "mle" is Eq. 1: (X - mu)^T (X - mu) / N.  "ledoit-wolf" and "oas" are sklearn's shrinkage estimators
    (both shrink the same MLE towards a scaled identity).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of features, got shape {x.shape}")
    if estimator == "mle":
        xc = x - x.mean(0, keepdims=True)
        return xc.T @ xc / x.shape[0]
    if estimator == "ledoit-wolf":
        from sklearn.covariance import ledoit_wolf
        return ledoit_wolf(x)[0]
    if estimator == "oas":
        from sklearn.covariance import oas
        return oas(x)[0]
    raise ValueError(f"unknown covariance estimator {estimator!r}; choose one of {ESTIMATORS}")


def intra_class_variance(x, y, num_classes: int | None = None, estimator: str = "mle",
                         min_samples: int = 2) -> np.ndarray:
    """sigma_y = max_i |Delta_y^i| (Eq. 1) for every class; NaN for a class with fewer than ``min_samples``."""
    x = np.asarray(x)
    y = np.asarray(y)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    out = np.full(num_classes, np.nan)
    for c in range(num_classes):
        xc = x[y == c]
        if xc.shape[0] < min_samples:
            continue
        cov = class_covariance(xc, estimator)
        out[c] = float(np.abs(np.linalg.eigvalsh(cov)).max())
    return out


def spearman(a, b) -> tuple[float, float, int]:
    """(rho, p-value, n) of scipy.stats.spearmanr over the pairs where both are finite; NaN if n < 3."""
    from scipy.stats import spearmanr
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan"), float("nan"), n
    r = spearmanr(a[ok], b[ok])
    return float(r.statistic if hasattr(r, "statistic") else r[0]), float(r.pvalue if hasattr(r, "pvalue") else r[1]), n


def variance_analysis(x, y, train_counts, estimators=ESTIMATORS) -> dict:
    """Per-class sigma_y for each estimator and its Spearman rho with N_y.

    Returns ``{"counts": [C], "sigma": {est: [C]}, "rho": {est: rho}, "pvalue": {est: p}, "n": {est: n}}``.
    """
    counts = np.asarray(train_counts)
    out = {"counts": counts, "sigma": {}, "rho": {}, "pvalue": {}, "n": {}}
    for est in estimators:
        s = intra_class_variance(x, y, len(counts), est)
        rho, p, n = spearman(counts, s)
        out["sigma"][est], out["rho"][est], out["pvalue"][est], out["n"][est] = s, rho, p, n
    return out


# ----------------------------------------------------------------------------------------------------
# Centroids: displacement (Fig. 6a) and CDNV (Sec. 6, Fig. 6b)

def class_means(x, y, num_classes: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    num_classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    sums = np.zeros((num_classes, x.shape[1]))
    np.add.at(sums, y, x)
    n = np.bincount(y, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / n[:, None]


def centroid_displacement(learned, empirical) -> np.ndarray:
    """||mu_learned_y - mu_empirical_y||_2 per class (Fig. 6a)."""
    learned = np.asarray(learned, dtype=np.float64)
    empirical = np.asarray(empirical, dtype=np.float64)
    if learned.shape != empirical.shape:
        raise ValueError(f"learned {learned.shape} and empirical {empirical.shape} centroids differ in shape")
    return np.linalg.norm(learned - empirical, axis=1)


def class_variances(x, y, num_classes: int | None = None) -> np.ndarray:
    """Var(y) = E ||f(x) - mu_y||^2 over the class's samples (Galanti et al.'s class variance)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    mu = class_means(x, y, num_classes)
    sq = ((x - mu[y]) ** 2).sum(1)
    n = np.bincount(y, minlength=mu.shape[0]).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.bincount(y, weights=sq, minlength=mu.shape[0]) / n


def cdnv(centroids, variances) -> float:
    """Average pairwise class-distance normalised variance (Sec. 6, Galanti et al. 2021) -- the one
    definition in the toolkit (stage 2 records it per epoch through it):

        CDNV(i, j) = (Var(i) + Var(j)) / (2 ||mu_i - mu_j||^2),   averaged over pairs i < j.

    ``variances`` [C] are the per-class variances to use (e.g. :func:`class_variances` around the empirical
    means, or around the centroids being scored); pairs at distance 0 are left out.  float64.
    """
    mu = np.asarray(centroids, dtype=np.float64)
    var = np.asarray(variances, dtype=np.float64)
    sq = (mu ** 2).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2 * mu @ mu.T
    iu = np.triu_indices(len(mu), k=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = (var[:, None] + var[None, :])[iu] / (2 * np.maximum(d2[iu], 1e-30))
    vals = vals[np.isfinite(vals)]
    return float(vals.mean()) if vals.size else float("nan")


# ----------------------------------------------------------------------------------------------------
# t-SNE of one tail and two head classes (Fig. 1)

def tsne_classes(train_counts, min_tail: int = 10) -> tuple[int, int, int]:
    """(tail, head1, head2): the smallest class with at least ``min_tail`` samples (the smallest class if
    none has that many; a 1-2 point "cloud" shows no spread) and the two largest (ties broken by label)."""
    counts = np.asarray(train_counts)
    order = np.lexsort((np.arange(len(counts)), -counts))  # largest first, then by label
    if len(counts) < 3:
        raise ValueError("t-SNE figure needs at least 3 classes")
    by_size = np.lexsort((np.arange(len(counts)), counts))  # smallest first
    big_enough = [int(c) for c in by_size if counts[c] >= min_tail]
    tail = big_enough[0] if big_enough and big_enough[0] not in order[:2] else int(by_size[0])
    heads = [int(c) for c in order if c != tail][:2]
    return tail, heads[0], heads[1]


def tsne_embed(x, y, classes, max_per_class: int = 300, random_state: int = 0, perplexity: float = 30.0):
    """2-D t-SNE of the samples of ``classes`` (at most ``max_per_class`` each, a fixed random subsample).

    Returns (embedding [n, 2], labels [n], indices into x [n]).  Deterministic for a fixed random_state.
    """
    from sklearn.manifold import TSNE
    x = np.asarray(x)
    y = np.asarray(y)
    rng = np.random.default_rng(random_state)
    idx = []
    for c in classes:
        ci = np.where(y == c)[0]
        if ci.size > max_per_class:
            ci = np.sort(rng.choice(ci, max_per_class, replace=False))
        idx.append(ci)
    idx = np.concatenate(idx)
    if idx.size < 5:
        raise ValueError(f"t-SNE needs at least 5 samples, the chosen classes have {idx.size}")
    perp = float(min(perplexity, max(2.0, (idx.size - 1) / 3.0)))
    emb = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto",
               random_state=random_state).fit_transform(np.asarray(x[idx], dtype=np.float64))
    return emb, y[idx], idx


def tsne_embed_start(x, y, classes, max_per_class: int = 300, random_state: int = 0, perplexity: float = 30.0):
    """:func:`tsne_embed` in a background thread: a Future of its result.  The report draws the other figures
    meanwhile; sklearn's Barnes-Hut gradient runs without the GIL, on the core matplotlib leaves idle."""
    from concurrent.futures import ThreadPoolExecutor
    pool = ThreadPoolExecutor(1, thread_name_prefix="tsne")
    future = pool.submit(tsne_embed, x, y, classes, max_per_class, random_state, perplexity)
    pool.shutdown(wait=False)  # the thread ends with its one task
    return future


def spread(emb, labels) -> dict:
    """Mean distance to the class's 2-D centroid, per class (a number to check Fig. 1 against)."""
    out = {}
    for c in np.unique(labels):
        e = emb[labels == c]
        out[int(c)] = float(np.linalg.norm(e - e.mean(0), axis=1).mean())
    return out


# ----------------------------------------------------------------------------------------------------
# Train vs test, per class: memorisation of the tail by stage 1

def train_test_gap(train_x, train_y, test_x, test_y, weight, bias, num_classes: int) -> dict:
    """Per class [C]: accuracy (%) of the stage-1 linear classifier (``weight`` [C, d], ``bias`` [C]) on the
    training images as the cache holds them (eval mode, no augmentation) and on the test images, accuracy (%)
    of the nearest empirical class mean (Euclidean, means of the training features) on the test images, and
    the mean feature norm ||f(x)|| on train and on test.  A class whose training images are memorised shows
    ~100% on train, a train norm above its test norm, and test features far from its training mean."""
    def per_class(pred, y):
        return 100.0 * per_class_accuracy(pred, y, num_classes)

    def mean_norm(x, y):
        n = np.bincount(y, minlength=num_classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.bincount(y, weights=np.linalg.norm(x, axis=1), minlength=num_classes) / n

    tx, ex = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    ty, ey = np.asarray(train_y), np.asarray(test_y)
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    mu = class_means(tx, ty, num_classes)
    d2 = (ex * ex).sum(1)[:, None] - 2 * ex @ mu.T + (mu * mu).sum(1)[None]
    return dict(softmax_train=per_class((tx @ w.T + b).argmax(1), ty),
                softmax_test=per_class((ex @ w.T + b).argmax(1), ey),
                ncm_test=per_class(d2.argmin(1), ey),
                norm_train=mean_norm(tx, ty), norm_test=mean_norm(ex, ey))
