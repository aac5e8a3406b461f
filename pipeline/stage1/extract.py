"""Stage 1 end to end, ``pipeline extract``: plan -> train (or resume, or reuse) -> evaluate the features ->
write the HDF5 cache (pipeline/cache.py, the contract with stage 2)."""
from __future__ import annotations

import platform
import time
from pathlib import Path

import numpy as np
import torch

from ..cache import fingerprint, weights_sha256, write_cache
from ..config import ACCURACY_KEYS, BN_RECAL_DEFAULT, method_variant
from ..utils import git_commit, now_iso, resolve_device, sha256_file
from .augment import BatchAugment
from .checkpoint import CHECKPOINT_FILE, CURVE_COLUMNS
from .data import LTDataset
from .distributed import SINGLE, Dist
from .evaluate import extract_features
from .pause import PauseControl, RunPaused
from .plan import Plan, budget_warning, plan_run
from .shards import Shard, resolve_data_on
from .train import train


def extract(dataset: LTDataset, cache_dir="cache", run=None, device="auto", precision="auto",
            deterministic=False, bn_recalibrate=False, overwrite=False, stop_after=None, log=print,
            dist: Dist = SINGLE, data_on="auto", sync_bn="auto", time_limit: float | None = None,
            started: float | None = None, allow_precision_change=False, bn_recal=None,
            **overrides) -> Path | None:
    """Stage 1 end to end.  Returns the path of the cache (None when stopped early by ``stop_after``).

    ``bn_recalibrate``: also store the features after post-hoc BatchNorm re-estimation by each method of
    ``bn_recal`` (dicts of data, sampler, passes; default [config.BN_RECAL_DEFAULT]).  A finished run's cache
    that lacks one gets it from the weights it holds (pipeline/stage1/recalibrate.py), without training.

    ``time_limit`` (seconds from ``started``, a time.monotonic() value, default the call) and the pause
    signals (pipeline/stage1/pause.py) end it early with the checkpoint written, by raising RunPaused.

    Under torchrun (``dist``) every rank calls this with the same arguments: rank 0 plans the run (hashing
    the data once) and checks the existing cache, and alone writes; features are computed per rank block
    and gathered; the other ranks return once the cache is in place."""
    commit = git_commit()  # the code that trains, taken before the long run (the tree may change meanwhile)
    dev = dist.device if dist.active else resolve_device(device)
    specs = (list(bn_recal or [BN_RECAL_DEFAULT])) if bn_recalibrate else []
    plan = dist.on_main(plan_run, dataset, cache_dir, run, dev, precision, dist, sync_bn, overwrite,
                        specs, allow_precision_change, log, **overrides)
    if plan.done:
        if plan.recal and dist.is_main:  # one process re-estimates; the other ranks wait for the cache
            from .recalibrate import recalibrate_cache
            recalibrate_cache(plan.cache_path, dataset, plan.recal, device=dev, data_on=data_on, log=log)
        dist.barrier()
        return plan.cache_path
    on = _placement(dataset, dev, data_on, dist, log)
    log(_describe(dataset, plan, dev, on, dist))
    if budget_warning(plan.cfg):
        log(budget_warning(plan.cfg))
    t0 = time.time()
    pause = PauseControl(time_limit, started, log)
    with pause:
        model, rows = train(dataset, plan.cfg, plan.run_dir, dev, deterministic, stop_after, log, dist=dist,
                            data_on=on, sync_bn=plan.sync_bn, pause=pause,
                            allow_precision_change=allow_precision_change)
        if model is None:
            return None
        _pause_before_features(dataset, plan.cfg, pause, plan.methods, dist, dev)
    train_seconds = time.time() - t0
    aug = BatchAugment(dataset.mean, dataset.std, dev, plan.cfg["augment"], plan.cfg["image_size"])
    held = {s: Shard(sp.images, dev, on, dist) for s, sp in dataset.splits().items()}
    features = extract_features(model, dataset, held, aug, plan.methods)
    if dist.is_main:  # rank 0 alone writes the cache; the others wait until it is in place
        provenance = run_provenance(dataset, plan, model, rows, commit, dev, deterministic, train_seconds,
                                    dist, on)
        methods = {method_variant(m): m for m in plan.methods}
        write_run_cache(plan.cache_path, dataset, model, features, rows, provenance, methods)
        log(f"wrote {plan.cache_path} (fingerprint {fingerprint(provenance)}; variants {sorted(features)})")
    dist.barrier()
    return plan.cache_path


def _placement(dataset: LTDataset, dev, data_on: str, dist: Dist, log) -> str:
    """Where this job keeps the train and test images, the same on every rank: device or host."""
    with dist.agreed():  # where this rank's blocks of the train and test images live
        on = resolve_data_on(data_on, dev, sum(Shard.block_bytes(sp.images, dist) for sp in
                                               (dataset.train, dataset.test)), log)
    return "host" if "host" in dist.all_gather_object(on) else on  # one placement for the job


def _describe(dataset: LTDataset, plan: Plan, dev, on: str, dist: Dist) -> str:
    cfg = plan.cfg
    par = (f", {dist.world} ranks ({dist.backend}), SyncBatchNorm {'on' if plan.sync_bn else 'off'}"
           if dist.active else "")
    return (f"stage 1: {dataset.name} beta={dataset.imbalance:g} ({len(dataset.train.labels)} train / "
            f"{len(dataset.test.labels)} test images, {dataset.num_classes} classes) {cfg['backbone']} "
            f"recipe {cfg['recipe']}: {cfg['epochs']} epochs x {cfg['steps_per_epoch']} iterations of batch "
            f"{cfg['batch_size']}, augment {cfg['augment']}, on {dev} ({cfg['precision']}){par}, data on {on} "
            f"-> {plan.run_dir}")


def _pause_before_features(dataset: LTDataset, cfg: dict, pause: PauseControl, methods: list,
                           dist: Dist, dev):
    """RunPaused when a pause signal came, or when extracting the features (every split once per variant,
    plus each BN re-estimation method's passes over the training set) would not fit in the time limit."""
    per_image = pause.eval_seconds_per_image
    n_images = sum(len(sp.labels) for sp in dataset.splits().values()) * (1 + len(methods))
    n_images += len(dataset.train.labels) * sum(int(m["passes"]) for m in methods)
    why = dist.any_rank(pause.reason(per_image * n_images if per_image else None), dev)
    if why is not None:
        raise RunPaused(cfg["epochs"], cfg["epochs"], pause.elapsed(), why,
                        ", before extracting the features of the finished run")


def describe_device(dev) -> str:
    """The device as provenance records it: 'cuda:0 (NVIDIA H200)', 'cpu (x86_64, 2 threads)'."""
    return str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                       f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")


def run_provenance(dataset: LTDataset, plan: Plan, model, rows: list, commit: str, dev, deterministic: bool,
                   train_seconds: float, dist: Dist, on: str) -> dict:
    """The cache's provenance: what the run is (config, data, weights) and how it was made."""
    cfg = plan.cfg
    return dict(
        dataset=dataset.name, imbalance=dataset.imbalance, subset_seed=dataset.subset_seed,
        backbone=cfg["backbone"], epochs=cfg["epochs"], seed=cfg["seed"], config=cfg,
        checkpoint_sha256=sha256_file(plan.run_dir / CHECKPOINT_FILE), weights_sha256=weights_sha256(model),
        git_commit=commit, torch_version=torch.__version__, created=now_iso(), data_source=dataset.source,
        device=describe_device(dev), deterministic=deterministic, train_seconds=round(train_seconds, 1),
        distributed=dict(dist.describe(), sync_bn=plan.sync_bn, data_on=on),
        image_store=dataset.extra.get("image_store"),
        final_test_accuracy={k: rows[-1][k] for k in ACCURACY_KEYS} if rows else None)


def write_run_cache(path: Path, dataset: LTDataset, model, features: dict, rows: list, provenance: dict,
                    methods: dict | None = None):
    """Write the run's features (``methods``: the BN re-estimation method of each bn_recal* variant), stage-1
    classifier, learning curve and weights to the cache (atomically)."""
    curve = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in CURVE_COLUMNS}
    write_cache(path, provenance=provenance, class_names=dataset.class_names,
                train_counts=dataset.train_counts, classifier_weight=model.fc.weight.detach().float().cpu(),
                classifier_bias=model.fc.bias.detach().float().cpu(), features=features, learning_curve=curve,
                model_state=model.state_dict(), variant_methods=methods)
