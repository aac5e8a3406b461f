"""Stage 1 under torchrun (CPU, gloo, 2 processes), the decode-once image store, and --data-on host.

The torchrun tests start real jobs with ``python -m torch.distributed.run --standalone`` on 32x32
synthetic PNGs (48 train / 16 test images).  Comparing weights: the unit is the size of the update,
||w_2proc - w_1proc|| / ||w_1proc - w_init||.  A data-parallel rank sums its gradients in another order
than one process, and the first step's fp32 gradient of this small random-init net on 48 images is already
~3e-3 off its fp64 value, so bit equality is not expected; the reference one-process run normalises with
the same BatchNorm arithmetic as the gloo SyncBatchNorm (GlooSyncBatchNorm), since torch's native CPU
channels_last BatchNorm was measured ~1e-2 off fp64 here.  Without SyncBN the difference is ~0.35.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import read_cache
from pipeline.utils import UserError

REPO = Path(__file__).resolve().parents[1]
RUN = "tiny"


def make_image_folder(root: Path, per_class=(12, 4), classes=4, size=32, seed=0) -> Path:
    """Smooth class-tinted PNGs (bicubic-upsampled 4x4 noise): train/<c>/<i>.png, test/<c>/<i>.png."""
    import torch.nn.functional as F
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "test"), per_class):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                low = torch.from_numpy(rng.normal(0, 1, (1, 3, 4, 4))).float()
                img = F.interpolate(low, size=size, mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
                a = 128 + 40 * img + 25 * (c - 1.5) + rng.normal(0, 4, (size, size, 3))
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


HELPERS = Path(__file__).resolve().parent / "dist_helpers"


def torchrun(args, nproc=2, timeout=600, popen=False, write_log=None, script=None):
    """`torchrun --standalone --nproc-per-node N -m pipeline.cli extract ARGS` (or `torchrun ... script`);
    ``write_log``: file where every rank logs the files it moves into place (dist_helpers/sitecustomize).
    The timeouts only catch a hung job: on 2 idle cores a job takes ~10 s, but gloo ranks that must be
    scheduled together for every collective slow down many times on a machine busy with other work."""
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{HELPERS}", OMP_NUM_THREADS="1")
    if write_log:
        env["PIPELINE_TEST_WRITE_LOG"] = str(write_log)
    target = [str(script)] if script else ["-m", "pipeline.cli", "extract"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           *target] + [str(a) for a in args]
    # a session of its own: on a timeout the launcher and every rank are killed together
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    if popen:
        return job
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        out, err = job.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s (a hung rank?):\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, job.returncode, out, err)


# the recipe of the equivalence run: 2 SGD steps (batch = the 48 train images; the 3rd epoch has lr 0)
EQUIV = dict(epochs=3, batch_size=48, lr=0.01, warmup_epochs=0, precision="fp32", augment="cifar-autoaug")


def _flags(d: dict):
    return [x for k, v in d.items() for x in (f"--{k.replace('_', '-')}", v)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="module")
def two_rank_run(folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache2")
    writes = cache.parent / "writes.log"
    r = torchrun(["--dataset", "imagefolder", "--data-root", folder, "--imbalance", "1", *_flags(EQUIV),
                  "--deterministic", "--device", "cpu", "--sync-bn", "on", "--bn-recalibrate",
                  "--cache-dir", cache, "--run-name", RUN], write_log=writes)
    assert r.returncode == 0, r.stdout + r.stderr
    r.writes = [line.split(" ", 1) for line in writes.read_text().splitlines()]
    return cache, r


def _update_rel_diff(a: dict, b: dict, init: dict) -> float:
    keys = [k for k in init if not any(s in k for s in ("running", "num_batches"))]
    flat = lambda d: np.concatenate([np.asarray(d[k], np.float64).ravel() for k in keys])
    return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(a) - flat(init)))


def _one_process(folder, tmp_path, exact_bn: bool, monkeypatch):
    """The one-process run of EQUIV in this process (train() itself), optionally with GlooSyncBatchNorm's
    arithmetic for BatchNorm; returns (state dict as numpy, initial state dict)."""
    import pipeline.stage1.train as T
    from pipeline.stage1.plan import resolve_config
    from pipeline.stage1.data import load_dataset
    from pipeline.stage1.distributed import convert_sync_bn
    from pipeline.stage1.models import create_model
    ds = load_dataset("imagefolder", folder, 1.0)
    if exact_bn:
        monkeypatch.setattr(T, "create_model", lambda *a: convert_sync_bn(create_model(*a), "cpu"))
    cfg = resolve_config(ds, **EQUIV)
    model, _ = T.train(ds, cfg, tmp_path / ("exact" if exact_bn else "native"), "cpu", deterministic=True,
                       log=lambda *a: None)
    monkeypatch.undo()
    torch.manual_seed(cfg["seed"])
    init = {k: v.numpy() for k, v in create_model(cfg["backbone"], ds.num_classes).state_dict().items()}
    return {k: v.numpy() for k, v in model.state_dict().items()}, init, ds


def test_torchrun_two_ranks_equal_one_process(two_rank_run, folder, tmp_path, monkeypatch):
    cache, r = two_rank_run
    out = r.stdout + r.stderr
    assert out.count("cache: ") == 1 and out.count("wrote ") == 1  # rank 0 alone reports and writes
    assert "2 ranks (gloo), SyncBatchNorm on" in out
    c = read_cache(cache / RUN)
    p = c.provenance
    assert p["distributed"] == dict(world_size=2, backend="gloo", nnodes=1, sync_bn=True, data_on="device")
    assert p["config"]["bn_groups"] is None  # SyncBN: the same model as one process
    assert sorted(x.name for x in (cache / RUN).iterdir()) == ["checkpoint.pt", "features.h5",
                                                               "learning_curve.csv"]
    # rank 0 alone moved files into place: the image store, the curve each epoch, checkpoint, cache
    assert {rank for rank, _ in r.writes} == {"0"}, r.writes
    assert {Path(dst).name for _, dst in r.writes} >= {"images.npy", "meta.json", "learning_curve.csv",
                                                        "checkpoint.pt", "features.h5"}
    two = c.model_state()

    exact, init, ds = _one_process(folder, tmp_path, True, monkeypatch)
    native, _, _ = _one_process(folder, tmp_path, False, monkeypatch)
    d_exact, d_native = _update_rel_diff(exact, two, init), _update_rel_diff(native, two, init)
    assert d_exact < 2e-2, d_exact    # measured 6e-3 (without SyncBN: 0.36; same slice on both ranks: ~1)
    assert d_native < 0.1, d_native   # the shipped one-process path (native channels_last BN): 2.8e-2
    for k in exact:
        if "running" in k:
            np.testing.assert_allclose(two[k], exact[k], rtol=2e-2, atol=2e-3, err_msg=k)

    # the cache holds what one process computes from the same weights
    from pipeline.stage1.augment import BatchAugment
    from pipeline.stage1.models import create_model
    from pipeline.stage1.evaluate import predict_features, recalibrate_bn
    from pipeline.stage1.shards import Shard
    model = create_model("resnet32", ds.num_classes)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in two.items()})
    model = model.to(memory_format=torch.channels_last).eval()
    aug = BatchAugment(ds.mean, ds.std, torch.device("cpu"))
    for split, sp in ds.splits().items():
        x = Shard(sp.images, "cpu").local
        f, y = c.split(split, "plain")
        np.testing.assert_array_equal(y, sp.labels)
        np.testing.assert_allclose(f, predict_features(model, x, aug)[0], rtol=1e-4, atol=1e-5)
    # BN re-estimation through the run's augmentation, each global batch augmented over two ranks' slices
    recal = recalibrate_bn(model, Shard(ds.train.images, "cpu"), aug, c.recorded_method("bn_recal"),
                           ds.train.labels, ds.num_classes)
    f, _ = c.split("test", "bn_recal")
    ref = predict_features(recal, Shard(ds.test.images, "cpu").local, aug)[0]
    np.testing.assert_allclose(f, ref, rtol=1e-3, atol=1e-3)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


def _rank_pid(agent: int, rank: int) -> int | None:
    for child in _children(agent):
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return child
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the rank's pid in /proc")
def test_torchrun_kill_one_rank_then_resume_on_both(folder, tmp_path):
    args = ["--dataset", "imagefolder", "--data-root", folder, "--imbalance", "1", "--epochs", "9",
            "--batch-size", "48", "--lr", "0.01", "--warmup-epochs", "0", "--precision", "fp32",
            "--augment", "cifar", "--deterministic", "--device", "cpu", "--sync-bn", "off", "--eval-every", "9"]
    ckpt = tmp_path / "k" / RUN / "checkpoint.pt"
    job = torchrun(args + ["--cache-dir", tmp_path / "k", "--run-name", RUN], popen=True)
    t0 = time.time()
    while not ckpt.exists():  # the first checkpoint (epoch 5; config.CHECKPOINT_EVERY)
        assert job.poll() is None, job.communicate()
        assert time.time() - t0 < 600, "no checkpoint"
        time.sleep(0.02)
    victim = _rank_pid(job.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    try:
        out, err = job.communicate(timeout=300)  # the job stops (torchrun stops rank 0): no hung rank
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0, out + err
    assert not (tmp_path / "k" / RUN / "features.h5").exists()
    done = torch.load(ckpt, weights_only=False)["epoch"]
    assert done == 5, done

    # rerun: both ranks resume from the checkpoint rank 0 read (here streaming from host memory: where the
    # data lives is not identity) and finish with the weights of a run never interrupted
    r = torchrun(args + ["--cache-dir", tmp_path / "k", "--run-name", RUN, "--data-on", "host"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming {RUN} from epoch {done}/9" in r.stdout
    ref = torchrun(args + ["--cache-dir", tmp_path / "u", "--run-name", RUN])
    assert ref.returncode == 0, ref.stdout + ref.stderr
    a, b = read_cache(tmp_path / "k" / RUN), read_cache(tmp_path / "u" / RUN)
    sa, sb = a.model_state(), b.model_state()
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert a.provenance["distributed"]["data_on"] == "host"
    assert a.provenance["config"]["bn_groups"] == 2  # per-rank BatchNorm: identity says so
    assert [int(e) for e in a.learning_curve()["epoch"]] == list(range(1, 10))


def test_torchrun_bad_input_refused_once_on_every_rank(two_rank_run, folder, tmp_path):
    cache, _ = two_rank_run
    before = {p.name: p.stat().st_mtime_ns for p in (cache / RUN).iterdir()}
    # known to rank 0 only (it alone reads the run folder): an existing cache of another configuration
    r = torchrun(["--dataset", "imagefolder", "--data-root", folder, "--imbalance", "1", *_flags(EQUIV),
                  "--epochs", "4", "--device", "cpu", "--sync-bn", "on", "--cache-dir", cache, "--run-name", RUN],
                 timeout=300)
    # known to rank 1 only, inside Dist.agreed() (as a node without the data would be)
    r2 = torchrun([], script=HELPERS / "agree_job.py", timeout=300)
    ranks = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)", r2.stdout + r2.stderr)
    # both ranks refuse with status 2; whichever exits second may instead be SIGTERMed (-15) by torchrun's agent,
    # which saw the first one fail, while it closes (a race on a loaded machine, not a hang).  That rank 0
    # learned rank 1's error is shown by the error line below: rank 0 alone prints it (agree_job.py); without
    # the agreement it would have gone on to the barrier and printed nothing.
    got = dict(ranks)
    assert sorted(got) == ["0", "1"] and "2" in got.values() and set(got.values()) <= {"2", "-15"}, r2.stderr
    for res, needle in ((r, "exists with a different provenance"), (r2, "only rank 1 sees this (on rank 1)")):
        out = res.stdout + res.stderr
        assert res.returncode != 0
        errors = [line for line in out.splitlines() if re.match(r"^(\[rank\d\]:)?\s*Error:", line)]
        assert len(errors) == 1 and needle in errors[0], out
        assert not re.search(r"\[rank\d\]:.*Traceback", out), out  # no rank died with a traceback
    assert {p.name: p.stat().st_mtime_ns for p in (cache / RUN).iterdir()} == before


# ----------------------------------------------------------------------------------------------------
# in one process: the image store, --data-on host, augmentation slices, identity

def test_image_store_reused_rebuilt_refused(tmp_path, monkeypatch):
    from pipeline.stage1 import data
    from pipeline.stage1.data import load_dataset
    from pipeline.stage1.store import ImageStore
    root = make_image_folder(tmp_path / "img", per_class=(3, 2), classes=2, size=16)
    logs = []
    store = ImageStore(tmp_path / "cache" / "images", log=logs.append)

    def load():
        with store.active():
            return load_dataset("imagefolder", root, 1.0)

    plain = load_dataset("imagefolder", root, 1.0)  # no store: decoded as always
    first = load()
    assert [s for _, s, _ in store.events] == ["built", "built"]
    np.testing.assert_array_equal(first.train.images, plain.train.images)

    decoded = []
    real = data._decode
    monkeypatch.setattr(data, "_decode", lambda *a: decoded.append(a[0]) or real(*a))
    second = load()  # reused: memory-mapped, nothing decoded
    assert decoded == [] and [s for _, s, _ in store.events[2:]] == ["reused", "reused"]
    assert isinstance(second.train.images, np.memmap)
    np.testing.assert_array_equal(second.train.images, plain.train.images)
    from pipeline.stage1.plan import data_hash
    assert data_hash(second) == data_hash(plain)

    # truncated -> rebuilt, with a line saying why
    entry = store.root / store.events[2][0]
    npy = entry / "images.npy"
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size - 7)
    third = load()
    assert any("truncated" in line for line in logs) and store.events[4][1] == "built"
    assert len(decoded) == len(plain.train.labels)
    np.testing.assert_array_equal(third.train.images, plain.train.images)

    # meta.json that disagrees with the data -> rebuilt, never trusted
    meta = json.loads((entry / "meta.json").read_text())
    (entry / "meta.json").write_text(json.dumps(dict(meta, shape=[meta["n"], 8, 8, 3])))
    load()
    assert store.events[6][1] == "built" and any("images.npy holds" in line for line in logs)

    # a source image changed (new bytes, new mtime) -> another key: the old entry is not used for it
    from PIL import Image
    src = sorted((root / "train" / "c0").iterdir())[0]
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(src)
    os.utime(src, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    fourth = load()
    assert store.events[8][1] == "built" and store.events[8][0] != store.events[6][0]
    assert (fourth.train.images == 7).all(axis=(1, 2, 3)).sum() == 1


def test_extract_cli_uses_image_store(tmp_path):
    """Second `pipeline extract` run: the images come from the store (no decode) and the cache says so."""
    from click.testing import CliRunner
    from pipeline.cli import cli
    root = make_image_folder(tmp_path / "img", per_class=(3, 2), classes=2, size=16)
    args = ["extract", "--dataset", "imagefolder", "--data-root", str(root), "--imbalance", "1", "--epochs", "1",
            "--batch-size", "4", "--precision", "fp32", "--device", "cpu", "--cache-dir", str(tmp_path / "c")]
    r1 = CliRunner().invoke(cli, args + ["--run-name", "a"])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(cli, args + ["--run-name", "b"])
    assert r2.exit_code == 0, r2.output
    assert r1.output.count("decoded") == 2 and r2.output.count("memory-mapped") == 2 and "decoded" not in r2.output
    pa = read_cache(tmp_path / "c" / "a").provenance
    pb = read_cache(tmp_path / "c" / "b").provenance
    assert [e["status"] for e in pb["image_store"]["entries"]] == ["reused", "reused"]
    assert pa["config"]["data_hash"] == pb["config"]["data_hash"]


def test_data_on_host_equals_device(tmp_path):
    from pipeline.stage1.extract import extract
    from .conftest import tiny_dataset
    ds = tiny_dataset(size=16)
    kw = dict(epochs=2, batch_size=8, warmup_epochs=0, precision="fp32", deterministic=True, device="cpu",
              bn_recalibrate=True, log=lambda *a: None)
    a = read_cache(extract(ds, tmp_path / "d", data_on="device", **kw))
    b = read_cache(extract(ds, tmp_path / "h", data_on="host", **kw))
    assert a.provenance["distributed"]["data_on"] == "device" and b.provenance["distributed"]["data_on"] == "host"
    sa, sb = a.model_state(), b.model_state()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    for v in ("plain", "bn_recal"):
        np.testing.assert_array_equal(a.split("test", v)[0], b.split("test", v)[0])
    assert a.fingerprint == b.fingerprint  # where the data lived is not identity


@pytest.mark.parametrize("kind", ["cifar", "cifar-autoaug", "imagenet"])
def test_augment_slice_of_global_batch(kind):
    """A rank augmenting rows lo:hi of a global batch gets exactly rows lo:hi of the one-process result."""
    from pipeline.stage1.augment import BatchAugment
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(4)
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), kind, 24 if kind == "imagenet" else None, g)
    full = aug(x)
    for lo, hi in ((0, 5), (5, 10), (3, 4)):
        g.manual_seed(4)
        torch.testing.assert_close(aug(x[lo:hi], rows=(lo, hi, 10)), full[lo:hi], rtol=0, atol=0)


def test_sync_bn_default_and_identity():
    from pipeline.stage1.distributed import bn_groups, resolve_sync_bn
    from pipeline.stage1.checkpoint import identity_diff
    from pipeline.stage1.plan import resolve_config
    from .conftest import tiny_dataset
    assert resolve_sync_bn("auto", "resnet32", 512, 8) is True          # ResNet-32: always, when N > 1
    assert resolve_sync_bn("auto", "resnet10", 512, 8) is False         # 64 per GPU: per-GPU BN
    assert resolve_sync_bn("auto", "resnet10", 128, 8) is True          # 16 per GPU: too few
    assert resolve_sync_bn("on", "resnet32", 512, 1) is False           # one process: nothing to sync
    with pytest.raises(UserError, match="sync_bn must be one of"):
        resolve_sync_bn("maybe", "resnet32", 512, 2)
    ds = tiny_dataset()
    cfg = resolve_config(ds, epochs=1)
    assert cfg["bn_groups"] is None and bn_groups(4, True) is None and bn_groups(4, False) == 4
    # per-rank BatchNorm is another model: its checkpoint/cache is not reused by a SyncBN (or 1-process) run
    assert "bn_groups" in identity_diff(dict(cfg, bn_groups=4), cfg)
    assert not identity_diff({k: v for k, v in cfg.items() if k != "bn_groups"}, cfg)  # old caches still match


def test_resnet50_backbone():
    """--backbone resnet50 (the usual iNaturalist 2018 backbone): torchvision's ResNet-50, 2048-d features."""
    from pipeline.stage1.models import create_model
    m = create_model("resnet50", 7).eval()
    assert sum(p.numel() for p in m.parameters()) == 23_522_375  # torchvision resnet50 with a 7-way fc
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = m.forward_features(x)
        assert f.shape == (2, 2048)
        torch.testing.assert_close(m(x), m.fc(f))
