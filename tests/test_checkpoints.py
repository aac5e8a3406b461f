"""Stage-1 runs keep resuming across code changes.

* Every in-flight checkpoint under ``cache/*/checkpoint.pt`` of this checkout (made by earlier code; skipped
  when there is none) and one written here by the current code load as :func:`train` loads them: the
  identity recorded in the checkpoint is the identity of its config, the weights load strictly into the
  backbone, the optimizer and generator states load.
* The one-process training path (one ``Shard`` data path since the stage-1 move) gives, bit for bit, what the
  code before the move (e1834df, a uint8 tensor on the device) gave for a tiny deterministic run: weights,
  optimizer and generator state, learning curve and the cached features.  The digest was recorded with
  e1834df checked out in a temporary worktree (tools: this file's ``run_digest``), so it is compared only
  under the torch build and CPU kernels it was recorded with.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache import read_cache
from pipeline.config import run_identity
from pipeline.stage1.checkpoint import CHECKPOINT_FILE, CHECKPOINT_KEYS, CURVE_COLUMNS, identity_diff
from pipeline.stage1.extract import extract
from pipeline.stage1.models import create_model
from pipeline.stage1.plan import resolve_config
from pipeline.stage1.train import train

from .conftest import tiny_dataset

REPO = Path(__file__).resolve().parents[1]
IN_FLIGHT = sorted(REPO.glob(f"cache/*/{CHECKPOINT_FILE}"))
# keys every stage-1 checkpoint has had (precision_segments came with --allow-precision-change)
REQUIRED_KEYS = ("model", "optimizer", "generator", "epoch", "curve", "identity", "config", "torch")

# run_digest() of e1834df (before the stage-1 move), and the build it was recorded with
PRE_MOVE_DIGEST = "026325555ab14a4963fa2f9503bd35c3efe543fb5516e2c9c14857c9ab01abd4"
RECORDED_WITH = ("2.14.1+cu130", "AVX2")


def _json(x):
    return json.loads(json.dumps(x))


def pickled_globals(path: Path) -> set:
    """The (module, name) of every class or function the checkpoint's pickle refers to."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    torch.load(path, map_location="cpu", weights_only=False,
               pickle_module=types.SimpleNamespace(Unpickler=Recorder, load=pickle.load, __name__="recorder"))
    return seen


def check_resumable(path: Path):
    """What train() needs of a checkpoint to resume it (see pipeline/stage1/train.py: _resume), and that it
    refers to no class of this package (so moving a module cannot break unpickling it)."""
    refs = pickled_globals(path)
    assert not [m for m, _ in refs if m.split(".")[0] == "pipeline"], refs
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert set(REQUIRED_KEYS) <= set(ckpt) <= set(CHECKPOINT_KEYS), sorted(ckpt)
    cfg = ckpt["config"]
    assert _json(run_identity(cfg)) == _json(ckpt["identity"])
    assert identity_diff(ckpt["identity"], cfg) == {}  # the resume check train() makes
    model = create_model(cfg["backbone"], cfg["num_classes"])
    model.load_state_dict(ckpt["model"], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    opt.load_state_dict(ckpt["optimizer"])
    cpu_gen = torch.Generator()
    if ckpt["generator"].numel() == cpu_gen.get_state().numel():  # (a CUDA run's generator: another size)
        cpu_gen.set_state(ckpt["generator"].cpu())
    assert 0 < ckpt["epoch"] <= cfg["epochs"] and len(ckpt["curve"]) == ckpt["epoch"]
    assert all(tuple(row) == CURVE_COLUMNS for row in ckpt["curve"])


@pytest.mark.parametrize("path", IN_FLIGHT or [None], ids=lambda p: p.parent.name if p else "none")
def test_in_flight_checkpoints_still_load(path):
    if path is None:
        pytest.skip("no cache/*/checkpoint.pt in this checkout")
    check_resumable(path)


def test_checkpoint_of_the_current_code_loads(tmp_path):
    ds = tiny_dataset()
    cfg = resolve_config(ds, epochs=3, batch_size=8, warmup_epochs=1, precision="fp32", seed=3)
    train(ds, cfg, tmp_path, "cpu", stop_after=1, log=lambda *a: None)
    ckpt = torch.load(tmp_path / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    assert tuple(ckpt) == CHECKPOINT_KEYS  # the format does not change
    check_resumable(tmp_path / CHECKPOINT_FILE)


def run_digest(tmp: Path, data_on: str = "device") -> str:
    """sha256 of a tiny deterministic one-process run (3 epochs of the paper recipe, AutoAugment + Cutout,
    BN recalibration): checkpoint tensors, generator, learning curve (without timings), cached features.
    The BN re-estimation is the one method the pre-move code had (clean images, one permutation), hashed
    under the name it had then."""
    ds = tiny_dataset(size=16)
    path = extract(ds, tmp / data_on, run="r", epochs=3, batch_size=8, warmup_epochs=1, precision="fp32", seed=3,
                   deterministic=True, device="cpu", bn_recalibrate=True, data_on=data_on, log=lambda *a: None,
                   bn_recal=[dict(data="clean", sampler="instance", passes=1)])
    h = hashlib.sha256()
    ckpt = torch.load(path.parent / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    tensors = sorted(ckpt["model"].items())
    tensors += [(f"opt{k}", v["momentum_buffer"]) for k, v in sorted(ckpt["optimizer"]["state"].items())]
    tensors += [("generator", ckpt["generator"])]
    for k, v in tensors:
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for row in ckpt["curve"]:
        h.update(repr([(k, v) for k, v in sorted(row.items()) if k != "seconds"]).encode())
    c = read_cache(path)
    pre_move_name = {"plain": "plain", "bn_recal-clean-instance-x1": "bn_recal"}
    assert sorted(c.variants) == sorted(pre_move_name)
    for v in sorted(c.variants, key=pre_move_name.get):
        for s in c.splits(v):
            x, y = c.split(s, v)
            h.update(f"{pre_move_name[v]}/{s}".encode())
            h.update(np.ascontiguousarray(x).tobytes())
            h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


@pytest.mark.skipif((torch.__version__, torch.backends.cpu.get_cpu_capability()) != RECORDED_WITH,
                    reason=f"the pre-move digest was recorded with torch {RECORDED_WITH[0]} on {RECORDED_WITH[1]} "
                           "kernels; other builds round differently")
def test_one_process_path_matches_the_pre_move_code(tmp_path):
    assert run_digest(tmp_path) == PRE_MOVE_DIGEST
