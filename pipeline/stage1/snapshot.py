"""A cache of an earlier epoch of a finished run: ``pipeline snapshot CACHE CHECKPOINT``.

BALMS's code (the paper's CIFAR stage 1) hands its second stages the weights of the epoch with the best test
accuracy (its ``final_model_checkpoint.pth`` holds only ``state_dict_best``), not the last ones.  To measure what
that choice changes, a checkpoint the run wrote at epoch e (an in-flight ``checkpoint.pt``, e.g. one committed
between sessions) becomes a cache of its own: the same images, the checkpoint's weights and classifier, the
learning curve up to e, provenance ``snapshot`` = {epoch, epochs, source_fingerprint, precision_segments}.  It
is written inside the run's folder, ``<run>/snapshots/epoch-<e>/features.h5``, so the report (which reads
``<cache root>/*/features.h5``) never takes it for the run; every stage-2 command works on it
(``pipeline fit-head --cache <run>/snapshots/epoch-<e>``), and a report pointed at it flags it as not the
paper's recipe."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cache import CACHE_FILE, FeatureCache, fingerprint, provenance_config, read_cache, weights_sha256
from ..config import ACCURACY_KEYS
from ..utils import UserError, git_commit, now_iso, resolve_device, sha256_file
from .checkpoint import identity_diff
from .data import LTDataset
from .evaluate import extract_features
from .extract import describe_device, write_run_cache
from .models import create_model
from .recalibrate import check_run_images, hold_run_images

SNAPSHOT_DIR = "snapshots"  # <run>/snapshots/epoch-<e>/features.h5


def snapshot_path(cache: FeatureCache, epoch: int) -> Path:
    return Path(cache.path).parent / SNAPSHOT_DIR / f"epoch-{int(epoch):04d}" / CACHE_FILE


def snapshot_cache(cache, checkpoint, dataset: LTDataset, out=None, device="auto", data_on="auto",
                   log=print) -> Path:
    """Write the cache of ``checkpoint`` (a `pipeline extract` checkpoint.pt of ``cache``'s run, any epoch) on
    the images of ``dataset`` (the run's: same data_hash) to ``out`` (default :func:`snapshot_path`); plain
    features only (`pipeline recalibrate` adds BN re-estimated ones).  Returns its path."""
    c = cache if isinstance(cache, FeatureCache) else read_cache(cache)
    cfg = provenance_config(c.provenance)
    check_run_images(c, dataset)
    try:
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001  (any unreadable file: one line)
        raise UserError(f"{checkpoint} is not a readable checkpoint ({type(e).__name__}); pass a checkpoint.pt "
                        "written by `pipeline extract`") from None
    if not isinstance(ck, dict) or not {"model", "epoch", "identity", "curve"} <= set(ck):
        raise UserError(f"{checkpoint} is not a `pipeline extract` checkpoint (no model, epoch, identity, curve)")
    diff = identity_diff(ck["identity"] or {}, cfg, allow_precision_change=True)  # bf16 epochs: the same run
    if diff:
        raise UserError(f"{checkpoint} is not a checkpoint of the run of {c.path} (have, cache): {diff}")
    epoch = int(ck["epoch"])
    path = Path(out) if out is not None else snapshot_path(c, epoch)
    if path.is_dir():
        path = path / CACHE_FILE
    if path.resolve() == Path(c.path).resolve():
        raise UserError(f"out={path} is the run's own cache; write the snapshot elsewhere (default: "
                        f"{snapshot_path(c, epoch)})")
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    model = create_model(cfg["backbone"], c.num_classes)
    model.load_state_dict(ck["model"])
    model = model.to(dev).to(memory_format=torch.channels_last).eval()
    held, aug = hold_run_images(dataset, cfg, dev, data_on, log)
    features = extract_features(model, dataset, held, aug)
    rows = [r for r in ck["curve"] if int(r["epoch"]) <= epoch]
    at = rows[-1] if rows and int(rows[-1]["epoch"]) == epoch else None
    prov = {k: v for k, v in c.provenance.items()  # plain features only, whatever variants the cache has or had
            if k not in ("bn_recal_methods", "dropped_variants", "train_seconds", "feature_dtype")}
    prov.update(weights_sha256=weights_sha256(model), checkpoint_sha256=sha256_file(checkpoint),
                git_commit=git_commit(), torch_version=torch.__version__, created=now_iso(),
                device=describe_device(dev),
                final_test_accuracy={k: at[k] for k in ACCURACY_KEYS} if at else None,
                snapshot=dict(epoch=epoch, epochs=int(cfg["epochs"]), source_fingerprint=c.fingerprint,
                              precision_segments=ck.get("precision_segments")))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_run_cache(path, dataset, model, features, rows, prov)
    log(f"wrote {path}: the weights of epoch {epoch} of {cfg['epochs']} of {c.path.parent.name} "
        f"(fingerprint {fingerprint(prov)})")
    return path
