"""Issue 16 (GPU readiness), the parts a CPU can check: fp32 matmul pinning and centred predictions (item 3),
stage-2 batch draws independent of the device (item 2), NCCL timeout, pinned staging buffers and the staging
event's stream (item 6)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from pipeline.stage2.heads.kernels import multi_ncm_predict, ncm_predict, prediction_centre, sq_dists
from pipeline.utils import fp32_matmul


# ---- item 3: TF32 and cancellation ---------------------------------------------------------------------

def _state():
    from pipeline.utils import _fp32_precision_settings
    objs = _fp32_precision_settings()
    if objs:
        return tuple(o.fp32_precision for o in objs)
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.get_float32_matmul_precision())


@pytest.mark.parametrize("outer", ["high", "medium", "highest"])
def test_fp32_matmul_pins_and_restores(outer):
    """Inside: everything fp32 ("ieee" / TF32 off); after (also after an exception): the outer settings, and
    the legacy getter still answers (no mixed-API error)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = torch.get_float32_matmul_precision()
        try:
            torch.set_float32_matmul_precision(outer)
            saved = _state()
            bf16 = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
            with fp32_matmul():
                inside = _state()
                assert set(inside) == {"ieee"} or inside == (False, False, "highest")
                assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction is False
            assert _state() == saved
            assert torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction == bf16
            with pytest.raises(KeyError):
                with fp32_matmul():
                    raise KeyError
            assert _state() == saved
            assert torch.get_float32_matmul_precision() == outer
        finally:
            torch.set_float32_matmul_precision(before)


def test_fp32_matmul_is_fp32_on_cpu_under_medium():
    """On torch >= 2.9 "medium" lets oneDNN run CPU fp32 matmuls in bf16; inside the block they are fp32."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 512, generator=g), torch.randn(512, 256, generator=g)
    ref = a.double() @ b.double()
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with fp32_matmul():
            err = ((a @ b).double() - ref).abs().max().item()
        outside = ((a @ b).double() - ref).abs().max().item()
    finally:
        torch.set_float32_matmul_precision(before)
    assert err < 1e-3
    if outside < 1e-3:
        pytest.skip("this CPU build has no reduced-precision fp32 matmul to guard against")


def _large_norm(seed=0, n=4000, C=20, d=64, offset=1000.0, spread=0.05):
    """Post-ReLU-like features: a large shared mean, classes close around it (spread << offset)."""
    g = torch.Generator().manual_seed(seed)
    mu = offset + spread * torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(C, (n,), generator=g)
    x = mu[y] + 0.6 * spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, mu


def _reference(x, mu):
    """fp64 argmin and the gap to the second-nearest class (rows with a tiny gap are true ties)."""
    d2 = torch.cdist(x, mu).square()
    top2 = d2.topk(2, largest=False).values
    return d2.argmin(1), top2[:, 1] - top2[:, 0]


def test_centred_predictions_equal_uncentred_in_fp64():
    x, mu = _large_norm(offset=3.0, spread=1.0)
    ref = torch.cat([sq_dists(c, mu).argmin(1) for c in x.split(8192)])  # the uncentred expansion
    assert torch.equal(ncm_predict(x, mu), ref)
    delta = 0.3 * torch.randn(3, x.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    D = torch.cat([torch.zeros_like(delta[:1]), delta])
    brute = ((x[:, None, None, :] - mu[None, :, None, :] - D[None, None]) ** 2).sum(-1).amin(-1).argmin(1)
    assert torch.equal(multi_ncm_predict(x, mu, delta), brute)
    assert torch.allclose(prediction_centre(mu), mu.mean(0))


def test_centring_fixes_large_norm_fp32_argmins():
    """||x|| ~ 8000: the uncentred fp32 expansion has ~eps ||x||^2 ~ 4 of error on squared distances whose
    gaps are ~0.01-0.1, and flips argmins; centred, the fp32 predictions equal the fp64 reference (on the
    same fp32 inputs) wherever its gap exceeds 1e-4.  TF32 multiplies eps by 2^13: the same failure at
    90x smaller norms, which post-ReLU features have."""
    x32, mu32 = _large_norm()
    x32, mu32 = x32.float(), mu32.float()
    ref, gap = _reference(x32.double(), mu32.double())
    clear = gap > 1e-4
    assert clear.float().mean() > 0.9
    uncentred = sq_dists(x32, mu32).argmin(1)
    assert (uncentred != ref)[clear].float().mean() > 0.05  # the failure this guards against
    assert torch.equal(ncm_predict(x32, mu32)[clear], ref[clear])
    no_delta = torch.zeros(2, x32.shape[1])  # zero displacements: Multi-NCM = NCM
    assert torch.equal(multi_ncm_predict(x32, mu32, no_delta)[clear], ref[clear])


def test_metric_heads_predict_centred(monkeypatch):
    """metric-ncm and local-projection predict on centred means (spies on the distance functions: the last
    call is the prediction's)."""
    from pipeline.stage2.heads import HEADS, metric
    from tests.test_heads import _tiny_anisotropic
    seen = {}
    for name in ("metric_sq", "local_projection_dist"):
        real = getattr(metric, name)
        monkeypatch.setattr(metric, name, lambda x, mu, *a, _r=real, _n=name: seen.__setitem__(_n, mu.detach())
                            or _r(x, mu, *a))
    data = _tiny_anisotropic()
    assert data.train_x.mean(0).abs().max() > 1  # the raw means are far from 0
    for head in ("metric-ncm", "local-projection"):
        HEADS[head].fn(data, dict(HEADS[head].defaults, epochs=1), 0.0)
    for name, mu in seen.items():
        assert mu.mean(0).abs().max() < 1e-5, name
    assert len(seen) == 2


# ---- item 2: stage-2 batch draws independent of the device -----------------------------------------------

# sha256[:16] of every parameter array (sorted by name) of a 2-epoch CPU fit, seed 7, on test_heads' HARD
# synthetic cache, one intra-op thread (reductions split over threads round differently), computed at 87e718d
# (device-side sampler): host-side draws and centred predictions leave CPU fits as they were.  Per CPU kernel
# set (torch.backends.cpu.get_cpu_capability()): AVX512 GEMMs round differently from AVX2 ones; the AVX512 row
# was computed at 8e6c8c3, where no fit code had changed since the AVX2 row last passed (1afded3).
FIT_DIGESTS_BY_CAPABILITY = {
    "AVX2": {"crt": "b97b314ca97a6ba9", "learned-ncm": "0de476d9145bafdf", "local-projection": "f498f528b1dafd2b",
             "lws": "c34bcc27dbb03cfe", "metric-ncm": "876821a2aea3ed6b", "multi-ncm": "74c53c05374f7e93",
             "tau-norm": "cbfa4b37a030611f"},
    "AVX512": {"crt": "1f00c6d014ceaedc", "learned-ncm": "8ba91959bf400c7f", "local-projection": "25aa23d99b94c366",
               "lws": "77c89b23a6a9cb54", "metric-ncm": "ff7a6d571a0aa18b", "multi-ncm": "4a01a6dfa0d22e6c",
               "tau-norm": "cbfa4b37a030611f"},
}
CAPABILITY = torch.backends.cpu.get_cpu_capability()
FIT_DIGESTS = FIT_DIGESTS_BY_CAPABILITY.get(CAPABILITY)


@pytest.fixture(scope="module")
def hard_cache(tmp_path_factory):
    from pipeline.cache import read_cache
    from pipeline.synthetic import make_synthetic_cache
    from tests.test_heads import HARD
    return read_cache(make_synthetic_cache(tmp_path_factory.mktemp("c") / "features.h5", **HARD))


@pytest.mark.skipif(FIT_DIGESTS is None, reason=f"no CPU fit digests recorded for {CAPABILITY} kernels (only "
                    f"{', '.join(FIT_DIGESTS_BY_CAPABILITY)}); they round differently")
@pytest.mark.parametrize("head", sorted(FIT_DIGESTS_BY_CAPABILITY["AVX2"]))
def test_cpu_fit_numbers_unchanged(hard_cache, head):
    import hashlib
    from pipeline.stage2.fit import fit_head
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = fit_head(hard_cache, head, seed=7, device="cpu", epochs=2)
    finally:
        torch.set_num_threads(threads)
    h = hashlib.sha256()
    for k in sorted(r.params):
        h.update(np.ascontiguousarray(np.asarray(r.params[k])).tobytes())
    assert h.hexdigest()[:16] == FIT_DIGESTS[head]


def test_sampling_generator_is_cpu_on_every_device():
    from pipeline.stage2.heads.registry import generators
    for device in ("cpu", "cuda", "cuda:1"):  # no CUDA needed: nothing is created on the device
        init, sample = generators(3, device, stream=2)
        assert init is sample and sample.device.type == "cpu"


def test_balanced_sampler_draws_on_the_host(monkeypatch):
    """The sampler's tables live on the host and the epoch's indices are made there and moved to the fit's
    device in one copy (here a meta "device" stands in for CUDA: the draws are the same ones)."""
    from pipeline.sampling import BalancedSampler
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    a = BalancedSampler(y, 3, torch.Generator().manual_seed(0))
    ref = a.draw(50)
    b = BalancedSampler(y, 3, torch.Generator().manual_seed(0))
    b.device = torch.device("meta")
    moved = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *x, **k: moved.append(t.clone()) or real_to(t, *x, **k))
    out = b.draw(50)
    assert out.device.type == "meta" and out.shape == (50,)
    assert len(moved) == 1 and torch.equal(moved[0], ref)
    assert a.order.device.type == a.counts.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_trains_on_the_cpu_batches():
    from pipeline.sampling import BalancedSampler
    y = torch.randint(5, (200,), generator=torch.Generator().manual_seed(1))
    a = BalancedSampler(y, 5, torch.Generator().manual_seed(4)).draw(300)
    b = BalancedSampler(y.cuda(), 5, torch.Generator().manual_seed(4)).draw(300)
    assert torch.equal(a, b.cpu())


# ---- item 6: NCCL timeout, pinned staging buffers only, the staging event's stream ------------------------

def test_process_group_gets_the_timeout(monkeypatch):
    import datetime
    from pipeline.stage1 import distributed
    seen = []
    monkeypatch.setattr(distributed.tdist, "init_process_group", lambda *a, **k: seen.append((a, k)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LNCM_DIST_TIMEOUT", raising=False)
    d = distributed.init_distributed("cpu")
    assert d.backend == "gloo" and seen[-1][1]["timeout"] == datetime.timedelta(hours=2)
    monkeypatch.setenv("LNCM_DIST_TIMEOUT", "3h30m")
    distributed.init_distributed("cpu")
    assert seen[-1][1]["timeout"] == datetime.timedelta(hours=3, minutes=30)
    monkeypatch.setenv("LNCM_DIST_TIMEOUT", "soon")
    with pytest.raises(distributed.UserError, match="LNCM_DIST_TIMEOUT"):
        distributed.init_distributed("cpu")


def test_gloo_accepts_the_timeout():
    import torch.distributed as tdist
    from pipeline.stage1.distributed import dist_timeout
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1, timeout=dist_timeout())
    try:
        t = torch.ones(3)
        tdist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        tdist.destroy_process_group()


def _images(n=10):
    return np.arange(n * 4 * 4 * 3, dtype=np.uint8).reshape(n, 4, 4, 3)


def test_host_shard_pins_only_its_staging_buffers(monkeypatch):
    """--data-on host for a CUDA device: the block stays pageable (pin_memory would need CUDA here and is
    never called); the staging buffers are the pinned allocations (counted through the pinned_empty seam)."""
    from pipeline.stage1 import shards
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda *a, **k: pytest.fail("pinned a data block"))
    s = shards.Shard(_images(), "cuda:1", on="host")
    assert not s.nhwc.is_pinned() if torch.cuda.is_available() else s.nhwc.device.type == "cpu"
    allocated, events = [], []
    monkeypatch.setattr(shards, "pinned_empty", lambda shape: allocated.append(shape) or torch.empty(shape, dtype=torch.uint8))
    monkeypatch.setattr(shards, "copy_done_event", lambda device: events.append(device) or None)
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *a, **k: t)  # stands in for the host-to-device copy
    out = s._gather_rows(np.array([3, 1, 4]))
    assert np.array_equal(out.numpy(), _images()[[3, 1, 4]])
    s._gather_rows(np.array([0, 9]))
    assert allocated == [(3, 4, 4, 3), (2, 4, 4, 3)]           # the two staging buffers, nothing else
    assert events == [torch.device("cuda:1")] * 2               # each copy's event on the Shard's device


def test_copy_event_is_recorded_on_the_shards_device_stream(monkeypatch):
    from pipeline.stage1 import shards
    recorded = []

    class FakeEvent:
        def record(self, stream=None):
            recorded.append(stream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("stream of", device))
    shards.copy_done_event(torch.device("cuda:3"))
    assert recorded == [("stream of", torch.device("cuda:3"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_shard_on_cuda_pins_staging_not_block():
    from pipeline.stage1.shards import Shard
    s = Shard(_images(), "cuda", on="host")
    out = s.take(np.array([2, 5]))
    torch.cuda.synchronize()
    assert not s.nhwc.is_pinned() and s._staging[s._turn].is_pinned()
    assert np.array_equal(out.permute(0, 2, 3, 1).cpu().numpy(), _images()[[2, 5]])


def test_feature_extraction_runs_in_fp32_matmul(monkeypatch):
    """extract_features (plain and BN-recalibrated) runs inside fp32_matmul: a spy on the precision state."""
    from pipeline.stage1 import evaluate
    from pipeline.utils import _fp32_precision_settings
    states = []

    def spy(m, images, aug, *a, **k):
        objs = _fp32_precision_settings()
        states.append(tuple(o.fp32_precision for o in objs) if objs else torch.get_float32_matmul_precision())
        return np.zeros((images.shape[0], 2), np.float32), None
    monkeypatch.setattr(evaluate, "predict_features", spy)
    monkeypatch.setattr(evaluate, "recalibrate_bn", lambda m, *a, **k: m)

    class Held:
        local = torch.zeros(3, 1)

        def gather(self, rows):
            return rows

    class DS:
        num_classes = 1

        def splits(self):
            return {"train": type("S", (), {"labels": np.zeros(3)})()}
    evaluate.extract_features(object(), DS(), {"train": Held()}, None,
                              [evaluate.recal_method(dict(augment="cifar"))])
    assert len(states) == 2 and all(s == "highest" or set(s) == {"ieee"} for s in states)


def test_fit_id_tells_gpu_fits_apart_and_keeps_cpu_ids():
    from pipeline.stage2.fit import FitResult, fit_id
    base = dict(head="ncm", variant="plain", tau=0.0, seed=0, eval_split="test", acc={}, per_class=None,
                params={}, fit_seconds=0.0, hparams={"cl2n": False})
    cpu = fit_id("abc", FitResult(device="cpu", **base))
    assert cpu == fit_id("abc", FitResult(device="cpu", **base))
    assert fit_id("abc", FitResult(device="cuda:0", **base)) != cpu
    # the CPU id is the hash of exactly what it was before devices entered it (shipped results cite it)
    import hashlib, json
    what = dict(cache="abc", head="ncm", variant="plain", tau=0.0, seed=0, hparams={"cl2n": False})
    assert cpu == "ncm-" + hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def test_run_generator_is_cpu_and_a_foreign_state_reseeds(tmp_path):
    """The run's generator is a CPU one on every device (the same draws anywhere); a checkpoint whose state is
    not a CPU generator's (older device generators) reseeds instead of crashing."""
    import torch
    from pipeline.stage1.plan import resolve_config
    from pipeline.stage1.train import _build, train
    from .conftest import tiny_dataset
    ds = tiny_dataset()
    cfg = resolve_config(ds, epochs=2, batch_size=8, warmup_epochs=1, precision="fp32", seed=0)
    assert _build(cfg, ds.num_classes, torch.device("cpu"))[2].device.type == "cpu"
    train(ds, cfg, tmp_path, "cpu", stop_after=1, log=lambda *a: None)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    ck["generator"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA Philox state's size
    torch.save(ck, tmp_path / "checkpoint.pt")
    lines = []
    model, rows = train(ds, cfg, tmp_path, "cpu", log=lines.append)
    assert model is not None and len(rows) == 2 and any("reseeded" in s for s in lines)


def test_compiled_step_sees_only_full_batches(tmp_path, monkeypatch):
    """--compile: static shapes (dynamic=False) and the epoch's partial last batch through the eager model,
    so torch.compile never compiles a second graph for it."""
    import torch
    import pipeline.stage1.train as tr
    from pipeline.stage1.plan import resolve_config
    from .conftest import tiny_dataset

    seen, kwargs = [], []

    class Spy(torch.nn.Module):  # stands in for the compiled module: records the batch sizes it is given
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            seen.append(x.shape[0])
            return self.m(x)

    monkeypatch.setattr(tr, "resolve_compile", lambda mode, device: True)
    monkeypatch.setattr(torch, "compile", lambda m, **kw: (kwargs.append(kw), Spy(m))[1])
    ds = tiny_dataset()  # 26 training images: batches of 8, 8, 8 and a partial one of 2
    cfg = resolve_config(ds, epochs=1, batch_size=8, warmup_epochs=0, precision="fp32", seed=0)
    model, rows = tr.train(ds, cfg, tmp_path, "cpu", log=lambda *a: None)
    assert kwargs == [{"dynamic": False}]
    assert seen == [8, 8, 8]  # the partial batch of 2 went through the eager model
    assert rows[0]["train_acc"] >= 0 and model is not None
