"""Post-hoc BatchNorm re-estimation of a finished run, from the weights its cache holds (no training):
``pipeline recalibrate CACHE`` and ``pipeline extract --bn-recalibrate`` on a run whose cache exists.

The images are rebuilt from the cache's own provenance (dataset, imbalance, subset seed, limits) and must
hash to its ``data_hash``; the weights must hash to its ``weights_sha256``.  Each method's features are added
to the cache as their own variant (cache.add_variants: an atomic rewrite; fingerprint, weights and the other
variants unchanged)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..cache import FeatureCache, add_variants, provenance_config, read_cache, weights_sha256
from ..config import BN_RECAL_DEFAULT, method_variant
from ..utils import UserError, resolve_device
from .augment import BatchAugment
from .checkpoint import CHECKPOINT_FILE
from .data import LTDataset, load_dataset
from .evaluate import extract_features, recal_method
from .models import create_model
from .plan import data_hash
from .shards import Shard, resolve_data_on


def model_from_cache(c: FeatureCache, device) -> torch.nn.Module:
    """The run's backbone with the weights the cache holds (or, for a cache packed without them, the run
    folder's checkpoint), checked against the cache's weights hash; eval mode, channels_last."""
    cfg = provenance_config(c.provenance)
    state = c.model_state()
    if state is None:
        ckpt = Path(c.path).parent / CHECKPOINT_FILE
        if not ckpt.exists():
            raise UserError(f"{c.path} holds no model weights and there is no {CHECKPOINT_FILE} beside it; "
                            "re-extract the run, or add the weights with `pipeline pack-cache --checkpoint`")
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["model"]
    model = create_model(cfg["backbone"], c.num_classes)
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in state.items()})
    if weights_sha256(model) != c.provenance.get("weights_sha256"):
        raise UserError(f"the weights found for {c.path} do not hash to its weights_sha256; re-extract the run")
    return model.to(device).to(memory_format=torch.channels_last).eval()


def dataset_for_cache(c: FeatureCache, data_root, image_root=None, split_files=(None, None, None),
                      download=False) -> LTDataset:
    """The long-tailed dataset a cache was made from, rebuilt from its provenance and the images under
    ``data_root``, with the decoded-image store beside the cache's run folder when there is one."""
    import contextlib
    from .store import ImageStore
    cfg = provenance_config(c.provenance)
    store_dir = Path(c.path).resolve().parent.parent / "images"
    store = ImageStore(store_dir, log=lambda *a: None) if store_dir.is_dir() else None
    with store.active() if store else contextlib.nullcontext():
        return load_dataset(cfg["dataset"], data_root, cfg["imbalance"], cfg["subset_seed"], download=download,
                            image_root=image_root, split_files=split_files,
                            image_size=None if cfg["dataset"].startswith("cifar") else cfg.get("image_size"),
                            train_limit=cfg.get("train_limit"), test_limit=cfg.get("test_limit"))


def check_run_images(c: FeatureCache, dataset: LTDataset) -> None:
    """UserError unless ``dataset`` holds the images ``c`` was made from (same data_hash)."""
    if data_hash(dataset) != provenance_config(c.provenance).get("data_hash"):
        raise UserError(f"the images given are not those {c.path} was made from (data_hash differs); point the "
                        "data root at the run's data")


def hold_run_images(dataset: LTDataset, cfg: dict, dev, data_on="auto", log=print):
    """(Shard per split, the run's BatchAugment): a finished run's images placed to run weights over them again."""
    on = resolve_data_on(data_on, dev, sum(sp.images.nbytes for sp in dataset.splits().values()), log)
    held = {s: Shard(sp.images, dev, on) for s, sp in dataset.splits().items()}
    return held, BatchAugment(dataset.mean, dataset.std, dev, cfg["augment"], cfg.get("image_size"))


def recalibrate_cache(cache, dataset: LTDataset, specs=None, device="auto", data_on="auto", log=print) -> Path:
    """Add the features of each BN re-estimation method in ``specs`` (dicts of data, sampler, passes; default
    [config.BN_RECAL_DEFAULT]) to the cache at ``cache``, computed from the weights it holds on the images
    of ``dataset`` (which must be the run's: same data_hash).  Returns the cache's path."""
    c = cache if isinstance(cache, FeatureCache) else read_cache(cache)
    cfg = provenance_config(c.provenance)
    check_run_images(c, dataset)
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    methods = [recal_method(cfg, **spec) for spec in (specs or [BN_RECAL_DEFAULT])]
    model = model_from_cache(c, dev)
    held, aug = hold_run_images(dataset, cfg, dev, data_on, log)
    features, named = {}, {}
    for m in methods:  # one at a time: a line each (minutes per method for CIFAR on a CPU)
        t, v = time.time(), method_variant(m)
        features.update(extract_features(model, dataset, held, aug, [m], plain=False))
        named[v] = m
        log(f"{v}: BatchNorm re-estimated ({m['data']}, {m['sampler']}, {m['passes']} pass(es)) and "
            f"{len(held)} splits' features computed in {time.time() - t:.0f} s")
    path = add_variants(c.path, features, named)
    log(f"added {', '.join(named)} to {path} (fingerprint {c.fingerprint} unchanged)")
    return path

