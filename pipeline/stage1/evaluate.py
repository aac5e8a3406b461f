"""Evaluation of a stage-1 model on the images of a :class:`~pipeline.stage1.shards.Shard`: frozen features and
logits, test accuracy for the learning curve, post-hoc BatchNorm re-estimation (paper A.4), and the features
of every split that the cache stores.  One process is a job of one rank: the same code, gathers of one block.
"""
from __future__ import annotations

import copy

import numpy as np
import torch

from ..config import EXTRACT_BATCH
from ..metrics import evaluate
from ..utils import fp32_matmul
from .augment import BatchAugment
from .distributed import convert_sync_bn, revert_sync_bn
from .precision import autocast
from .shards import Shard

BN_RECAL_SEED = 0  # the fixed permutation of the training set that BN re-estimation walks through
BN_RECAL_METHOD = f"swa_utils.update_bn over a fixed permutation of the training set (seed {BN_RECAL_SEED})"


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


def recalibrate_bn(model, images: Shard, aug: BatchAugment, batch=EXTRACT_BATCH, seed=BN_RECAL_SEED):
    """Paper A.4: with every weight frozen, re-estimate BatchNorm running mean/var over the training set.

    torch.optim.swa_utils.update_bn resets the running statistics and accumulates a cumulative average
    (momentum=None) over the batches, in train mode and without gradients; no weight changes.  The batches
    walk a fixed-seed permutation of the training set: our arrays are sorted by class, and class-pure batches
    would average within-class variances only, missing the between-class spread (running_var ~0.7x the
    population variance in the first BN layer of a CIFAR-10 ResNet-32).  Data-parallel: each batch is sliced
    over the ranks and the statistics are SyncBatchNorm's, those of the whole batch, as one process computes.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    perm = torch.randperm(images.n, generator=g).numpy()
    batches = (aug.normalize(images.take(perm[s:s + batch])) for s in range(0, images.n, batch))
    sync = images.dist.active
    if sync:
        convert_sync_bn(model, aug.device)
    torch.optim.swa_utils.update_bn(batches, model)
    if sync:
        revert_sync_bn(model)
    model.eval()
    return model


def extract_features(model, dataset, held: dict, aug: BatchAugment, bn_recalibrate: bool) -> dict:
    """features[variant][split] = (features, labels) of every split held (``held[split]``: a Shard), in fp32
    whatever the training precision; variant ``bn_recal`` from a copy of the model after
    :func:`recalibrate_bn`.  Gathered to rank 0 (None on the other ranks).  Inside :func:`fp32_matmul`: fp32
    means fp32 (no TF32 convolutions or GEMMs on CUDA, whatever the process-wide settings); no change on CPU."""
    def features_of(m):
        return {s: (x.gather(predict_features(m, x.local, aug)[0]), dataset.splits()[s].labels)
                for s, x in held.items()}

    with fp32_matmul():
        features = {"plain": features_of(model)}
        if bn_recalibrate:
            features["bn_recal"] = features_of(recalibrate_bn(copy.deepcopy(model), held["train"], aug))
    return features
