"""Evaluation of a stage-1 model on the images of a :class:`~pipeline.stage1.shards.Shard`: frozen features and
logits, test accuracy for the learning curve, post-hoc BatchNorm re-estimation (paper A.4), and the features
of every split that the cache stores.  One process is a job of one rank: the same code, gathers of one block.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..config import BN_RECAL_DEFAULT, BN_RECAL_SEED, EXTRACT_BATCH, bn_recal_variant, method_variant
from ..metrics import evaluate
from ..sampling import BalancedSampler
from ..utils import fp32_matmul
from .augment import BatchAugment
from .distributed import convert_sync_bn, revert_sync_bn
from .precision import autocast
from .shards import Shard


@torch.no_grad()
def predict_features(model, images_u8: torch.Tensor, aug: BatchAugment, batch=EXTRACT_BATCH, precision="fp32"):
    """Frozen penultimate features and logits (eval mode, no augmentation) of uint8 NCHW images, float32 numpy."""
    from tqdm import tqdm
    model.eval()
    feats, logits = [], []
    starts = range(0, images_u8.shape[0], batch)
    if not len(starts):  # an empty shard of a data-parallel rank
        d = model.fc.in_features
        return np.zeros((0, d), np.float32), np.zeros((0, model.fc.out_features), np.float32)
    for s in tqdm(starts, desc="features", leave=False, disable=True if len(starts) < 20 else None):
        x = aug.normalize(images_u8[s:s + batch].to(aug.device, non_blocking=True))  # a no-op when on device
        with autocast(x.device, precision):
            f = model.forward_features(x)
            logit = model.fc(f)
        feats.append(f.float().cpu())
        logits.append(logit.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def evaluate_test(model, x_test: Shard, labels, groups, aug: BatchAugment, precision: str) -> dict:
    """All / Many / Medium / Few test accuracy (the learning curve): each rank predicts its block, the logits
    are gathered to every rank."""
    logits = x_test.gather(predict_features(model, x_test.local, aug, precision=precision)[1], to_all=True)
    return evaluate(logits.argmax(1), labels, groups)


def recal_method(cfg: dict, data: str = BN_RECAL_DEFAULT["data"], sampler: str = BN_RECAL_DEFAULT["sampler"],
                 passes: int = BN_RECAL_DEFAULT["passes"], seed: int = BN_RECAL_SEED,
                 batch_size: int = EXTRACT_BATCH) -> dict:
    """The full record of a BN re-estimation method for a run of config ``cfg`` (its augmentation): what
    makes its features (the cache stores it with the variant; config.bn_recal_variant names it).  Batches of
    EXTRACT_BATCH: no gradients, and larger batches estimate the variance better."""
    bn_recal_variant(data, sampler, passes)  # a ValueError for an unknown method
    return dict(data=data, sampler=sampler, passes=int(passes), seed=int(seed), batch_size=int(batch_size),
                augment=cfg["augment"] if data == "train-aug" else None)


def recal_batches(labels: np.ndarray, num_classes: int, method: dict, generator: torch.Generator):
    """The global index batches BN re-estimation walks: ``passes`` passes over the training set, each a fixed-
    seed permutation (sampler instance: every image once, as the stage-1 loader) or N class-balanced draws
    (sampler balanced: stage 2's BalancedSampler).  Batches of < 2 images are skipped (BatchNorm, as in
    training).  The same on every rank."""
    n, bs = len(labels), int(method["batch_size"])
    sampler = (BalancedSampler(torch.as_tensor(np.asarray(labels)), num_classes, generator)
               if method["sampler"] == "balanced" else None)
    for _ in range(int(method["passes"])):
        idx = sampler.draw(n) if sampler is not None else torch.randperm(n, generator=generator)
        for s in range(0, n, bs):
            if idx[s:s + bs].numel() >= 2:
                yield idx[s:s + bs]


def recalibrate_bn(model, images: Shard, aug: BatchAugment, method: dict, labels: np.ndarray, num_classes: int):
    """Paper A.4, as precise-BN does it: with every weight frozen, re-estimate every BatchNorm's running
    mean/var over the training set by ``method`` (:func:`recal_method`).

    torch.optim.swa_utils.update_bn resets the running statistics and accumulates a cumulative average
    (momentum=None) over the batches, in train mode and without gradients; no weight changes.  data
    train-aug: each batch goes through the run's training augmentation (method["augment"]) drawn from a
    generator seeded with method["seed"], the data the weights learned on; clean: only normalised.  Our arrays
    are sorted by class, and class-pure batches would average within-class variances only, so the batches
    follow :func:`recal_batches`.  Data-parallel: each batch is sliced over the ranks (augmented as one
    process augments it) and the statistics are SyncBatchNorm's, those of the whole batch."""
    g = torch.Generator(device="cpu").manual_seed(int(method["seed"]))
    train_aug = method["data"] == "train-aug"
    if train_aug:
        aug = aug.reseeded(method["augment"], g)
    dist = images.dist

    def batches():
        for idx in recal_batches(labels, num_classes, method, g):
            lo, hi = dist.block(idx.numel())
            x = images.take(idx)
            yield aug(x, rows=(lo, hi, idx.numel())) if train_aug else aug.normalize(x)

    if dist.active:
        convert_sync_bn(model, aug.device)
    torch.optim.swa_utils.update_bn(batches(), model)
    if dist.active:
        revert_sync_bn(model)
    model.eval()
    return model


def extract_features(model, dataset, held: dict, aug: BatchAugment, methods=(), plain=True) -> dict:
    """features[variant][split] = (features, labels) of every split held (``held[split]``: a Shard), in fp32
    whatever the training precision: variant ``plain`` from ``model`` (unless not ``plain``), and for each
    BN re-estimation method in ``methods`` (:func:`recal_method` dicts) its variant (config.bn_recal_variant)
    from a copy of the model after :func:`recalibrate_bn`.  Gathered to rank 0 (None on the other ranks).  Inside
    :func:`fp32_matmul`: fp32 means fp32 (no TF32 convolutions or GEMMs on CUDA, whatever the process-wide
    settings); no change on CPU."""
    def features_of(m):
        return {s: (x.gather(predict_features(m, x.local, aug)[0]), dataset.splits()[s].labels)
                for s, x in held.items()}

    with fp32_matmul():
        features = {"plain": features_of(model)} if plain else {}
        for method in methods:
            recal = recalibrate_bn(copy.deepcopy(model), held["train"], aug, method,
                                   dataset.splits()["train"].labels, dataset.num_classes)
            features[method_variant(method)] = features_of(recal)
    return features
