"""The fast learned-ncm / multi-ncm fitting paths (bf16 GEMMs on augmented rows, max_plus displacement search,
closed-form backwards) against direct slow references: distances, losses and gradients against float64,
whole fits against a straightforward fp32 fit, and the bf16/fp32 choice recorded in hparams."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import pipeline.stage2.heads.bf16 as bf16
import pipeline.stage2.heads.ncm as ncm
from pipeline.cache import read_cache
from pipeline.stage2.fit import fit_head
from pipeline.stage2.heads import HEADS, HeadData
from pipeline.stage2.heads.bf16 import aug_sq_dists, augment_centroids, augment_rows, ncm_loss_bf16
from pipeline.stage2.heads.kernels import (max_plus, multi_ncm_loss, multi_ncm_loss_fast, multi_ncm_predict, ncm_loss,
                                           ncm_predict)
from pipeline.stage2.heads.registry import generators
from pipeline.stage2.heads.sgd import train_sgd
from pipeline.synthetic import make_synthetic_cache
from pipeline.utils import UserError

U = 2.0 ** -9  # bf16 unit roundoff (8 significant bits)


def _offset_points(seed=0, N=600, C=40, d=64, offset=30.0, dtype=torch.float32):
    """Post-ReLU-like features: a large shared mean (offset) + class structure; a third of the points sit
    close to a centroid (d ~ 1 << ||x||), where any cancellation in ||x||^2 - 2 x.mu + ||mu||^2 shows."""
    g = torch.Generator().manual_seed(seed)
    mu = offset + torch.randn(C, d, generator=g, dtype=dtype) * 2
    y = torch.randint(C, (N,), generator=g)
    x = mu[y] + torch.randn(N, d, generator=g, dtype=dtype) * 2
    near = torch.arange(N) % 3 == 0
    x[near] = mu[y[near]] + torch.randn(int(near.sum()), d, generator=g, dtype=dtype) * 0.1
    return x, y, mu


# ----------------------------------------------------------------------------------------------------
# Distances, loss and gradient of one bf16 step against float64

def test_aug_bf16_distance_error_is_bounded_by_the_rounding_of_centred_points():
    x, y, mu = _offset_points()
    c = mu.mean(0)
    d_fast = aug_sq_dists(augment_rows(x, c), augment_centroids(mu - c)).double().clamp_min(0).sqrt()
    d_true = torch.cdist(x.double(), mu.double())
    # what bf16 can do: each centred point moves by <= 2^-9 of its norm, the one output rounding adds 2^-9 of
    # d^2 (2^-10 of d).  Uncentred operands, a bf16-rounded cross term or norms entering the GEMM in one bf16
    # piece all break this bound by orders of magnitude near the centroids.
    xn, mn = (x - c).double().norm(dim=1), (mu - c).double().norm(dim=1)
    bound = U * (xn[:, None] + mn[None, :]) + U * d_true + 1e-4
    excess = ((d_fast - d_true).abs() / bound).max()
    assert excess <= 1.0, f"bf16 distance error {excess:.2f}x its rounding bound"
    assert (d_true[torch.arange(len(y)), y] < 2).float().mean() > 0.3  # the near pairs are there


def test_bf16_loss_and_gradient_match_float64():
    x, y, mu0 = _offset_points(seed=1, offset=100.0)
    mu0 = mu0 + torch.randn(mu0.shape, generator=torch.Generator().manual_seed(2))  # not at the class means
    x[0] = mu0[y[0]]  # a sample exactly on its centroid (a one-sample class at the start): d = 0, G / d huge
    C = len(mu0)
    offsets = 0.125 * torch.log(torch.arange(C, 0, -1).float())
    ref = mu0.double().clone().requires_grad_(True)
    ref_loss = ncm_loss(x.double(), y, ref, offsets.double())
    ref_loss.backward()
    c = mu0.mean(0)
    m = (mu0 - c).requires_grad_(True)
    loss = ncm_loss_bf16(augment_rows(x, c), y, m, offsets)
    loss.backward()
    assert abs(float(loss.detach()) - float(ref_loss.detach())) <= 1e-3 * float(ref_loss.detach())
    rel = float((m.grad.double() - ref.grad).norm() / ref.grad.norm())
    # the bf16 output of H^T x~ cancels against mu~ sum H by ||x~|| / ||x~ - mu~||: small after centring,
    # ~40x without it at this offset (a 2-5% gradient error)
    assert rel < 5e-3, f"bf16 centroid gradient relative error {rel:.2e}"


# ----------------------------------------------------------------------------------------------------
# The displacement search and the multi-ncm step

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_max_plus_is_the_brute_force_max(dtype):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(70, 21, generator=g, dtype=dtype) * 50
    v = torch.randn(90, 21, generator=g, dtype=dtype) * 50 + 7
    u[:, 0] = v[:, 0] = 0                      # a null column, as in multi-ncm
    u[5, 3] = u[5, 4]; v[:, 4] = v[:, 3]       # exact ties
    val, arg = max_plus(u, v)
    full = u[:, None, :] - v[None, :, :]       # [B, C, K], the direct definition
    best = full.max(-1).values
    step = (float(u.max() - u.min()) + float(v.max() - v.min())) * 2.0 ** (-(18 if dtype == torch.float32 else 47))
    assert (val - best).abs().max() <= step
    # the argmax attains the max up to the same grid step
    assert (full.gather(-1, arg[..., None])[..., 0] - best).abs().max() <= step
    # all terms equal (zero displacements): the max is exactly 0
    z = torch.zeros(4, 21, dtype=dtype)
    assert torch.equal(max_plus(z, torch.zeros(6, 21, dtype=dtype))[0], torch.zeros(4, 6, dtype=dtype))


def test_fast_multi_ncm_loss_and_gradient_match_autograd():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 8, generator=g, dtype=torch.float64) * 2
    y = torch.randint(12, (300,), generator=g)
    mu = torch.randn(12, 8, generator=g, dtype=torch.float64)
    delta = torch.randn(6, 8, generator=g, dtype=torch.float64) * 0.8
    offsets = torch.rand(12, generator=g, dtype=torch.float64)
    a, b = delta.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    la, lb = multi_ncm_loss(x, y, mu, a, offsets), multi_ncm_loss_fast(x, y, mu, b, offsets)
    la.backward()
    lb.backward()
    torch.testing.assert_close(lb, la, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10)
    assert a.grad.norm() > 0


# ----------------------------------------------------------------------------------------------------
# Whole fits: the fast path against a straightforward fp32 fit

# 100 classes (CIFAR-100-LT counts), 64-d, classes close (separation 1) with tail spread x2: ~70% All, and
# 10,000 test points so that 0.1 point is 10 predictions.  Features get a shared offset of +30 per dimension
# (post-ReLU features are all positive): the regime where bf16 rounding of the distance expansion breaks.
FIT = dict(num_classes=100, dim=64, separation=1.0, tail_spread=2.0, n_test=100, bn_recal=False)
OFFSET = 30.0


@pytest.fixture(scope="module")
def offset_data(tmp_path_factory):
    c = read_cache(make_synthetic_cache(tmp_path_factory.mktemp("s") / "features.h5", **FIT))
    (tx, ty), (ex, ey) = c.split("train"), c.split("test")
    t = torch.as_tensor

    def make():
        return HeadData(t(tx) + OFFSET, t(ty), t(ex) + OFFSET, t(c.train_counts).float(),
                        t(c.classifier_weight), t(c.classifier_bias), seed=0)
    return make, ey


def _all(pred, ey):
    pred = np.asarray(pred)
    return 100 * np.mean([(pred[ey == k] == k).mean() for k in np.unique(ey)])


def _reference_learned_ncm(data, hp, tau):
    """The plain fit: uncentred fp32 centroids, autograd through ncm_loss, the same draws (same generator)."""
    _, gen = generators(data.seed, data.device)
    emp, _ = data.class_stats()
    mu = emp.clone().requires_grad_(True)
    offsets = None if tau == 0 else tau * torch.log(data.train_counts)
    train_sgd([mu], lambda x, y: ncm_loss(x, y, mu, offsets), data, hp, gen, clip=hp["clip"])
    return mu.detach()


@pytest.mark.parametrize("tau", [0.0, 0.125])
def test_bf16_learned_ncm_fit_is_within_0_1_point_of_fp32(offset_data, tau):
    make, ey = offset_data
    hp = dict(HEADS["learned-ncm"].defaults, matmul="bf16")
    ref = _all(ncm_predict(make().eval_x, _reference_learned_ncm(make(), hp, tau)), ey)
    out = HEADS["learned-ncm"].fn(make(), hp, tau)
    fast = _all(out.pred, ey)
    assert out.chosen == {"matmul": "bf16"}
    assert 55 < ref < 85, ref  # a task of realistic difficulty, not saturated
    assert abs(fast - ref) <= 0.1, (fast, ref)


def test_fast_multi_ncm_fit_is_within_0_1_point_of_fp32(offset_data):
    make, ey = offset_data
    hp = dict(HEADS["multi-ncm"].defaults, matmul="bf16", num_centroids=8)
    out = HEADS["multi-ncm"].fn(make(), hp, 0.0)
    # reference: the plain learned-ncm fit, then the displacements by autograd through multi_ncm_loss
    data = make()
    mu = _reference_learned_ncm(data, hp, 0.0)
    cpu_gen, gen = generators(data.seed, data.device, stream=2)
    torch.testing.assert_close(torch.as_tensor(out.params["centroids"]), mu, rtol=0, atol=0.05)
    delta = torch.randn(8, data.dim, generator=cpu_gen) * (
        ncm.MULTI_INIT_SCALE * float(np.sqrt(data.class_stats()[1].mean())) / np.sqrt(data.dim))
    delta.requires_grad_(True)
    train_sgd([delta], lambda x, y: multi_ncm_loss(x, y, mu, delta), data, hp, gen, clip=hp["clip"])
    ref = _all(multi_ncm_predict(data.eval_x, mu, delta.detach()), ey)
    fast = _all(out.pred, ey)
    assert np.abs(out.params["displacements"]).max() > 0.05  # the displacements were learned
    assert abs(fast - ref) <= 0.1, (fast, ref)


@pytest.mark.parametrize("matmul", ["bf16", "fp32"])
def test_one_sample_classes_keep_the_autograd_fit(tmp_path, matmul):
    """A one-sample class starts with its centroid on its sample (d = 0): the fused backward must not turn
    the cancellation H^T x - mu sum H (H = G / d huge) into a garbage step, as it did before the floor (those
    centroids moved by ~1 in 3 epochs).  Compared with autograd through ncm_loss, centroid by centroid."""
    c = read_cache(make_synthetic_cache(tmp_path / "one.h5", num_classes=25, dim=32, n_max=125, bn_recal=False))
    assert (c.train_counts == 1).sum() >= 3
    (tx, ty), (ex, _) = c.split("train"), c.split("test")
    t = torch.as_tensor

    def make():
        return HeadData(t(tx), t(ty), t(ex), t(c.train_counts).float(), t(c.classifier_weight),
                        t(c.classifier_bias), seed=0)
    hp = dict(HEADS["learned-ncm"].defaults, epochs=3, matmul=matmul)
    ref = _reference_learned_ncm(make(), hp, 0.0)
    fast = torch.as_tensor(HEADS["learned-ncm"].fn(make(), hp, 0.0).params["centroids"])
    err = (fast - ref).norm(dim=1)
    assert err.max() < 0.02, err


# ----------------------------------------------------------------------------------------------------
# The choice is recorded, and falls back to fp32 without native bf16

def test_matmul_choice_is_recorded_and_falls_back_without_bf16(monkeypatch, tmp_path):
    c = read_cache(make_synthetic_cache(tmp_path / "f.h5", num_classes=5, dim=8, bn_recal=False))
    monkeypatch.setattr(bf16, "cpu_has_bf16", lambda: False)
    assert fit_head(c, "learned-ncm", epochs=1, device="cpu").hparams["matmul"] == "fp32"
    assert fit_head(c, "multi-ncm", epochs=1, num_centroids=2, device="cpu").hparams["matmul"] == "fp32"
    monkeypatch.setattr(bf16, "cpu_has_bf16", lambda: True)
    assert fit_head(c, "learned-ncm", epochs=1, device="cpu").hparams["matmul"] == "bf16"
    r = fit_head(c, "learned-ncm", epochs=1, device="cpu", matmul="fp32")
    assert r.hparams["matmul"] == "fp32"
    with pytest.raises(UserError, match="matmul must be one of"):
        fit_head(c, "learned-ncm", matmul="fp16")
