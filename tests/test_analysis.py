"""Representation analysis (pipeline.analysis): variance estimators, Spearman, displacement, CDNV, t-SNE."""
import numpy as np
import pytest

from pipeline import analysis
from pipeline.synthetic import synthetic_features


def _features_with_spreads(counts, spreads, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c, (n, s) in enumerate(zip(counts, spreads)):
        mu = rng.normal(size=dim) * 5
        xs.append(mu + s * rng.normal(size=(n, dim)))
        ys.append(np.full(n, c))
    return np.concatenate(xs), np.concatenate(ys)


def test_mle_is_eq1_largest_eigenvalue():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 5)) * np.array([3.0, 1, 1, 0.5, 0.2])
    y = np.zeros(50, dtype=int)
    want = np.linalg.eigvalsh(np.cov(x.T, bias=True)).max()
    assert analysis.intra_class_variance(x, y, 1, "mle")[0] == pytest.approx(want)
    # shrinkage estimators pull the top eigenvalue towards the mean eigenvalue, never above the MLE
    for est in ("ledoit-wolf", "oas"):
        assert analysis.intra_class_variance(x, y, 1, est)[0] <= want + 1e-9


def test_too_small_class_is_nan_and_unknown_estimator_rejected():
    x = np.arange(12, dtype=float).reshape(6, 2)
    y = np.array([0, 0, 0, 0, 0, 1])
    s = analysis.intra_class_variance(x, y, 3, "mle")
    assert np.isfinite(s[0]) and np.isnan(s[1]) and np.isnan(s[2])
    with pytest.raises(ValueError):
        analysis.class_covariance(x, "nope")


@pytest.mark.parametrize("reverse", [False, True])
def test_spearman_recovers_sign_of_variance_vs_size(reverse):
    counts = np.array([400, 250, 160, 100, 64, 40, 25, 16, 10, 6])
    spreads = np.linspace(1.0, 3.0, len(counts))  # tail classes more diffuse (the paper's finding)
    if reverse:
        spreads = spreads[::-1]
    x, y = _features_with_spreads(counts, spreads)
    res = analysis.variance_analysis(x, y, counts)
    for est in analysis.ESTIMATORS:
        rho = res["rho"][est]
        assert (rho > 0.7) if reverse else (rho < -0.7), (est, rho)
        assert res["n"][est] == len(counts)


def test_synthetic_cache_features_have_negative_correlation():
    tx, ty, *_ , counts, _, _ = synthetic_features(num_classes=10, dim=8, imbalance=100, n_max=300,
                                                   tail_spread=3.0, seed=0)
    res = analysis.variance_analysis(tx, ty, counts)
    assert all(res["rho"][e] < 0 for e in analysis.ESTIMATORS)


def test_spearman_ignores_nan_and_degenerate():
    rho, p, n = analysis.spearman([1, 2, 3, 4, np.nan], [4, 3, 2, 1, 0])
    assert rho == pytest.approx(-1.0) and n == 4
    assert np.isnan(analysis.spearman([1, 2], [2, 1])[0])
    assert np.isnan(analysis.spearman([1, 1, 1, 1], [1, 2, 3, 4])[0])


def test_centroid_displacement_and_cdnv():
    emp = np.zeros((3, 2))
    learned = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    assert analysis.centroid_displacement(learned, emp) == pytest.approx([5.0, 0.0, 1.0])
    with pytest.raises(ValueError):
        analysis.centroid_displacement(learned, np.zeros((2, 2)))
    # two classes, known variance and distance
    x = np.array([[-1.0, 0], [1, 0], [9, 0], [11, 0]])
    y = np.array([0, 0, 1, 1])
    assert analysis.class_variances(x, y) == pytest.approx([1.0, 1.0])
    mu, var = analysis.class_means(x, y), analysis.class_variances(x, y)
    assert analysis.cdnv(mu, var) == pytest.approx((1 + 1) / (2 * 100))
    # moving the centroids apart (variances fixed) lowers CDNV by the squared distance ratio
    assert analysis.cdnv(variances=[1.0, 1.0], centroids=[[0.0, 0], [20, 0]]) == pytest.approx(2 / (2 * 400))


def test_tsne_classes_and_embedding_deterministic():
    counts = np.array([50, 500, 5, 300])
    assert analysis.tsne_classes(counts) == (0, 1, 3)  # 5 samples are too few to show a spread
    assert analysis.tsne_classes(counts, min_tail=1) == (2, 1, 3)
    assert analysis.tsne_classes(np.array([3, 2, 1])) == (2, 0, 1)
    x, y = _features_with_spreads([40, 40, 10], [0.5, 0.5, 3.0], dim=6)
    e1, l1, i1 = analysis.tsne_embed(x, y, (2, 0, 1), max_per_class=30, random_state=0)
    e2, _, _ = analysis.tsne_embed(x, y, (2, 0, 1), max_per_class=30, random_state=0)
    assert e1.shape == (70, 2) and len(l1) == 70 and (np.bincount(l1) == [30, 30, 10]).all()
    np.testing.assert_allclose(e1, e2)
    e3, l3, i3 = analysis.tsne_embed_start(x, y, (2, 0, 1), max_per_class=30, random_state=0).result()
    assert np.array_equal(e3, e1) and np.array_equal(l3, l1) and np.array_equal(i3, i1)  # the report's thread
    sp = analysis.spread(e1, l1)
    assert set(sp) == {0, 1, 2}


def test_train_test_gap_against_a_per_sample_loop():
    """Per class: the linear classifier's accuracy on train and on test, NCM's test accuracy with the class means
    of the *training* features, and the mean feature norm of each split, checked sample by sample."""
    rng = np.random.default_rng(3)
    C, d = 4, 5
    ty = np.repeat(np.arange(C), [30, 12, 6, 3])
    tx = rng.normal(size=(len(ty), d)) + 2 * np.eye(C, d)[ty] * (1 + ty[:, None])  # tail classes: larger norms
    ey = rng.integers(0, C, 80)
    ex = rng.normal(size=(80, d)) * 1.5 + np.eye(C, d)[ey]
    W, b = rng.normal(size=(C, d)), rng.normal(size=C) * 3  # a large bias: dropping it changes predictions
    got = analysis.train_test_gap(tx, ty, ex, ey, W, b, C)
    mu = [tx[ty == k].mean(0) for k in range(C)]
    for k in range(C):
        tr, te = np.where(ty == k)[0], np.where(ey == k)[0]
        lin = lambda x: int(np.argmax([x @ W[j] + b[j] for j in range(C)]))  # noqa: E731
        ncm = lambda x: int(np.argmin([np.linalg.norm(x - mu[j]) for j in range(C)]))  # noqa: E731
        assert got["softmax_train"][k] == pytest.approx(100 * np.mean([lin(tx[i]) == k for i in tr]))
        assert got["softmax_test"][k] == pytest.approx(100 * np.mean([lin(ex[i]) == k for i in te]))
        assert got["ncm_test"][k] == pytest.approx(100 * np.mean([ncm(ex[i]) == k for i in te]))
        assert got["norm_train"][k] == pytest.approx(np.mean([np.linalg.norm(tx[i]) for i in tr]))
        assert got["norm_test"][k] == pytest.approx(np.mean([np.linalg.norm(ex[i]) for i in te]))
    assert len({tuple(v) for v in got.values()}) == 5  # five different readings, none a copy of another
