"""Every default of the toolkit in one place (nanoGPT style).

Stage-1 recipes (RECIPES; paper Sec. 5.2, A.1): ResNet-32 on CIFAR-LT, ResNet-10 on ImageNet-LT, softmax CE,
instance-balanced sampling, SGD + cosine schedule with linear warm-up.  Stage-2 heads (Sec. 4.2-4.4):
SGD lr 5, momentum 0.9, gradient-norm clipping 0.1.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------------------------------
# Cache contract
SCHEMA_VERSION = 2  # 2: fingerprint = run_identity + weights hash; optional model/ group; gzip datasets
# Feature variants: "plain" (straight from the final checkpoint) or "bn_recal*" (is_variant, below).
# Post-hoc BatchNorm re-estimation (paper A.4), as precise-BN does it: with every weight frozen, the running
# statistics are recomputed (cumulative average, swa_utils.update_bn) over `passes` passes of the training set.
#   data     train-aug = batches through the run's own training augmentation (fixed seed): the data the weights
#            learned on (fvcore's update_bn_stats / swa_utils.update_bn(train_loader, model) practice);
#            clean = un-augmented images: a labelled ablation (on the shipped AutoAugment cache it costs ~10 points)
#   sampler  instance = a random permutation per pass (the stage-1 loader); balanced = stage 2's class-balanced
#            draws (pipeline/sampling.py)
# The default's features are the variant "bn_recal" (Table 6's "(BN)" rows); any other method is the variant
# "bn_recal-<data>-<sampler>-x<passes>".  README "BatchNorm re-estimation" has the measurement behind it.
BN_RECAL_DATA = ("train-aug", "clean")
BN_RECAL_SAMPLERS = ("instance", "balanced")
BN_RECAL_DEFAULT = dict(data="train-aug", sampler="instance", passes=1)
BN_RECAL_SEED = 0  # the generator of the permutations / draws and of the augmentation
SPLITS = ("train", "val", "test")
FEATURE_DTYPES = ("float32", "float16")  # how features are stored (read back as float32); `pack-cache --feature-dtype`

# Many / Medium / Few thresholds of the paper (Sec. 5.1 and Table 4): Many >= 100 train images,
# Few < 20, Medium otherwise.  (Decoupling's code uses "> 100" for Many; the paper's table follows >= 100.)
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20
GROUP_NAMES = ("many", "medium", "few")
ACCURACY_KEYS = ("all",) + GROUP_NAMES  # every accuracy dict (metrics.shot_accuracy, curves, results rows)

# ----------------------------------------------------------------------------------------------------
# Stage 1: datasets and training
# CIFAR-LT: n_max per class and the number of classes (LDAM-DRW, imbalance_cifar.py)
CIFAR_NMAX = {"cifar10-lt": 5000, "cifar100-lt": 500, "cifar20-lt": 2500}
SUBSET_SEED = 0  # LDAM-DRW calls np.random.seed(0) once before subsampling

# Per-channel normalisation constants (CIFAR-10 train statistics, as in LDAM-DRW; ImageNet's for others)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Named stage-1 recipes (`pipeline extract --recipe NAME`; any flag still overrides a field).  The budget is
# either `iterations` (converted to epochs = ceil(iterations / steps per epoch), as Balanced Meta-Softmax does)
# or `epochs`.  Schedules:
#   "balms"  Balanced Meta-Softmax's CosineAnnealingLRWarmup, stepped once per epoch: W = ceil(warmup_iterations
#            / steps per epoch) warm-up epochs going linearly from `warmup_start_lr` to `lr`, then cosine from `lr` at
#            epoch W to 0 at the last epoch (whose lr is exactly 0, as in their code).
#   "cosine" per iteration: linear warm-up over `warmup_epochs` epochs, then cosine to 0 (this toolkit's first
#            recipe).
# The paper's Softmax baselines are exactly the numbers of the Balanced Meta-Softmax release
# (jiawei-ren/BalancedMetaSoftmax-Classification, config/CIFAR10_LT/softmax_imba200.yaml): ResNet-32,
# batch 512, 13,000 iterations, SGD 0.9, wd 5e-4, warm-up 0.05 -> 0.1 over 800 iterations, cosine to 0,
# pad-4 crop + flip + AutoAugment (CIFAR-10 policy) + Cutout (1 hole, 16 px).  Their code keeps the best
# epoch *on the test set*; we keep the final one.
_PAPER = dict(family="cifar", backbone="resnet32", iterations=13000, batch_size=512, lr=0.1, warmup_start_lr=0.05,
              warmup_iterations=800, schedule="balms", momentum=0.9, weight_decay=5e-4, augment="cifar-autoaug")
RECIPES = {
    "paper": _PAPER,
    # `paper` with BALMS's code where this toolkit deviates from it on purpose (README, *Known deviations*), to
    # measure those deviations at the full budget: their AutoAugment (DeepVoltaire's PIL copy: grey fill,
    # Rotate counter-clockwise only, Shear bicubic, Translate rounded), the partial last batch of every epoch
    # dropped (their loop stops after int(N / batch) steps) and PyTorch's default init of the final linear layer.
    "balms": dict(_PAPER, augment="cifar-autoaug-balms", drop_last=True, fc_init="default"),
    # LDAM-DRW's budget, batch, weight decay (2e-4, kaidic/LDAM-DRW cifar_train.py) and crop + flip, with
    # 5 warm-up epochs; cosine instead of LDAM-DRW's step decay at epochs 160/180 (this toolkit's first recipe).
    "ldam": dict(family="cifar", backbone="resnet32", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                 weight_decay=2e-4, warmup_epochs=5, schedule="cosine", augment="cifar"),
    # Weight Balancing (Alshammari et al. 2022) stage 1: batch 64, lr 0.01, cosine without warm-up, wd 5e-3,
    # 320 epochs, crop + flip.
    "wb": dict(family="cifar", backbone="resnet32", epochs=320, batch_size=64, lr=0.01, momentum=0.9,
               weight_decay=5e-3, warmup_epochs=0, schedule="cosine", augment="cifar"),
    # ImageNet-LT / Places-LT / ImageFolder (Decoupling, ResNet-10 config: 90 epochs, batch 512, lr 0.2,
    # wd 5e-4, cosine).  Decoupling uses no warm-up; we keep 5 epochs of linear warm-up because lr 0.2 at
    # batch 512 from scratch is otherwise unstable in bf16.
    "decoupling": dict(family="imagenet", backbone="resnet10", epochs=90, batch_size=512, lr=0.2, momentum=0.9,
                       weight_decay=5e-4, warmup_epochs=5, schedule="cosine", augment="imagenet"),
}
DEFAULT_RECIPE = {"cifar": "paper", "imagenet": "decoupling"}
IMAGE_SIZE = {"cifar": 32, "imagenet": 224}

# AutoAugment + Cutout ("cifar-autoaug"): torchvision's AutoAugmentPolicy.CIFAR10 sub-policies and magnitude
# bins; Cutout as DeVries & Taylor's code used by BALMS: one hole, side 16, centre uniform over the image, the
# box clipped at the border, filled with 0 (black) after AutoAugment and before normalisation.
CUTOUT_LENGTH = 16
# pipeline.stage1.augment.BatchAugment(kind=...)
AUGMENT_KINDS = ("cifar", "cifar-autoaug", "cifar-autoaug-balms", "imagenet")

# What a stage-1 run *is*: two configurations agreeing on these keys train the same model, so a checkpoint is
# resumed / a cache reused only when they match, and the cache fingerprint hashes them.  `data_hash` is the
# hash of the decoded pixels and labels.  Not identity: where the data lives, the device, eval cadence,
# torch.compile (same maths), the run folder, the number of data-parallel ranks and their backend.
# `bn_groups` is None when BatchNorm normalises over the whole global batch (one process, or N ranks with
# SyncBatchNorm: the same model) and N for N ranks without SyncBN (per-rank statistics: a different model).
RUN_IDENTITY = ("dataset", "imbalance", "subset_seed", "train_limit", "test_limit", "image_size", "backbone",
                "recipe", "epochs", "batch_size", "lr", "warmup_start_lr", "momentum", "weight_decay", "warmup_epochs",
                "warmup_iterations", "schedule", "augment", "seed", "precision", "num_classes", "train_size",
                "data_hash", "bn_groups", "drop_last", "fc_init")


# Identity keys added after caches of schema 2 were shipped: left out of the identity while None (their
# default), so that adding one did not change the fingerprint of any existing cache or checkpoint.  A new
# identity key goes here, with None meaning "as before".
RUN_IDENTITY_ADDED = ("bn_groups", "drop_last", "fc_init")


def run_identity(cfg: dict) -> dict:
    """The identifying part of a resolved stage-1 config (missing keys read as None)."""
    return {k: cfg.get(k) for k in RUN_IDENTITY if k not in RUN_IDENTITY_ADDED or cfg.get(k) is not None}


def recipe_identity(cfg: dict) -> dict:
    """run_identity without the seed and precision: runs that differ only there are repeats of one recipe
    (the report averages them)."""
    return {k: v for k, v in run_identity(cfg).items() if k not in ("seed", "precision")}


# Stage-1 switches that do not change the identity, or do only through a resolved value (the choices of
# `pipeline extract`): training precision (auto = bf16 where the device has native bf16), torch.compile of the
# train step, SyncBatchNorm under torchrun, where each rank keeps its images
PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("auto", "on", "off")
SYNC_BN_MODES = ("auto", "on", "off")
DATA_ON = ("auto", "device", "host")

EVAL_POINTS = 50  # default --eval-every: about this many test evaluations per run (always the last epoch)
CHECKPOINT_EVERY = 5  # epochs between atomic checkpoints (the final epoch is always saved)
EXTRACT_BATCH = 1024  # batch size for feature extraction / BN recalibration (no gradients)

# ----------------------------------------------------------------------------------------------------
# Stage 2: heads (Sec. 4.2, 4.4, 5.2)
HEAD_DEFAULTS = dict(
    lr=5.0,            # "learning rate of 5 with momentum 0.9"
    momentum=0.9,
    clip=0.1,          # "gradient clipping above 0.1" (total gradient norm)
    epochs=30,         # not given by the paper; see docs/stage2.md (Defaults) for the choice
    batch_size=512,    # not given by the paper
    num_centroids=20,  # Multi-NCM displacements, "fixed at 20 after cross-validation"
    tau=0.0,           # logit adjustment weight; the paper's choice is 1/8
)

# ----------------------------------------------------------------------------------------------------
# Stage 2: the results.csv contract and the options of `pipeline fit-head` (one definition each; stage2/fit.py
# writes these columns, the report reads them, the CLI takes its choices from here).  cache_fingerprint is that
# of the features the fit used: the cache's, or for a bn_recal* variant FeatureCache.variant_fingerprint.
RESULT_COLUMNS = ("fit_id", "timestamp", "head", "variant", "tau", "seed", "hparams", "cache_path",
                  "cache_fingerprint", "dataset", "imbalance", "backbone", "train_seed", "stage1_epochs",
                  "acc_all", "acc_many", "acc_medium", "acc_few", "fit_seconds", "device", "git_commit",
                  "artifact")
EVAL_SPLITS = ("test", "val")  # p auto (tau-norm) is picked on "val", so it cannot also be evaluated there
# the split a head learns from: "train", or "test" to measure what BALMS's CIFAR code does (its `train_plain`,
# the images a second stage takes class means from, loads the CIFAR test set): a leak, for diagnosis only
FIT_SPLITS = ("train", "test")
METRIC_KINDS = ("global", "local")            # metric-ncm: one W, or one W_y per class (A.3)
METRIC_DISTANCES = ("squared", "euclidean")   # metric-ncm: Eq. 3 as written, or the Learned-NCM form
# tau-norm's p grid for `--p auto`: Decoupling's sweep, 0 to 2 in steps of 0.1, picked on the val split
TAU_NORM_P_GRID = tuple(round(0.1 * i, 1) for i in range(21))


# ----------------------------------------------------------------------------------------------------
# Feature variants: "plain", or the features after one BatchNorm re-estimation method


def bn_recal_variant(data: str, sampler: str, passes: int) -> str:
    """The variant name of a BN re-estimation method: "bn_recal" for BN_RECAL_DEFAULT, else
    "bn_recal-<data>-<sampler>-x<passes>"."""
    if data not in BN_RECAL_DATA or sampler not in BN_RECAL_SAMPLERS or int(passes) < 1:
        raise ValueError(f"unknown BN re-estimation method data={data!r} sampler={sampler!r} passes={passes!r}")
    if dict(data=data, sampler=sampler, passes=int(passes)) == BN_RECAL_DEFAULT:
        return "bn_recal"
    return f"bn_recal-{data}-{sampler}-x{int(passes)}"


def method_variant(method: dict) -> str:
    """The variant name of a method dict (its data, sampler and passes; other keys are ignored)."""
    return bn_recal_variant(method["data"], method["sampler"], method["passes"])


def bn_recal_method(variant: str) -> dict | None:
    """The method a variant name stands for (None for "plain" or a name that is no variant)."""
    if variant == "bn_recal":
        return dict(BN_RECAL_DEFAULT)
    for data in BN_RECAL_DATA:
        for sampler in BN_RECAL_SAMPLERS:
            head = f"bn_recal-{data}-{sampler}-x"
            tail = variant[len(head):] if variant.startswith(head) else ""
            if tail.isdigit() and int(tail) >= 1 and str(int(tail)) == tail:
                method = dict(data=data, sampler=sampler, passes=int(tail))
                return None if method == BN_RECAL_DEFAULT else method  # the default is only "bn_recal"
    return None


def is_variant(name: str) -> bool:
    """Whether ``name`` is a feature variant: "plain", "bn_recal" or "bn_recal-<data>-<sampler>-x<passes>"."""
    return name == "plain" or bn_recal_method(name) is not None


VARIANT_FORMS = "plain, bn_recal or bn_recal-{train-aug|clean}-{instance|balanced}-x<passes>"
