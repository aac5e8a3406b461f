"""Every default of the toolkit in one place (nanoGPT style).

Stage-1 recipe (paper Sec. 5.2, A.1): ResNet-32 on CIFAR-LT, ResNet-10 on ImageNet-LT, softmax CE,
instance-balanced sampling, SGD + cosine schedule with linear warm-up.  Stage-2 heads (Sec. 4.2-4.4):
SGD lr 5, momentum 0.9, gradient-norm clipping 0.1.
"""
from __future__ import annotations

# ----------------------------------------------------------------------------------------------------
# Cache contract
SCHEMA_VERSION = 1
VARIANTS = ("plain", "bn_recal")  # features straight from the checkpoint / after post-hoc BN re-estimation
SPLITS = ("train", "val", "test")

# Many / Medium / Few thresholds of the paper (Sec. 5.1 and Table 4): Many >= 100 train images,
# Few < 20, Medium otherwise.  (Decoupling's code uses "> 100" for Many; the paper's table follows >= 100.)
MANY_THRESHOLD = 100
FEW_THRESHOLD = 20
GROUP_NAMES = ("many", "medium", "few")

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

TRAIN_DEFAULTS = {
    # CIFAR (paper Sec. 5.2 / LDAM-DRW): 200 epochs, batch 128, lr 0.1, wd 5e-4, 5 warm-up epochs.
    "cifar": dict(backbone="resnet32", epochs=200, batch_size=128, lr=0.1, momentum=0.9,
                  weight_decay=5e-4, warmup_epochs=5, image_size=32, augment="cifar"),
    # ImageNet-LT / Places-LT / ImageFolder (Decoupling, ResNet-10 config: 90 epochs, batch 512, lr 0.2,
    # wd 5e-4, cosine).  Decoupling uses no warm-up; we keep 5 epochs of linear warm-up as for CIFAR
    # because lr 0.2 at batch 512 from scratch is otherwise unstable in bf16.
    "imagenet": dict(backbone="resnet10", epochs=90, batch_size=512, lr=0.2, momentum=0.9,
                     weight_decay=5e-4, warmup_epochs=5, image_size=224, augment="imagenet"),
}
CHECKPOINT_EVERY = 5  # epochs between atomic checkpoints (the final epoch is always saved)
EXTRACT_BATCH = 1024  # batch size for feature extraction / BN recalibration (no gradients)

# ----------------------------------------------------------------------------------------------------
# Stage 2: heads (Sec. 4.2, 4.4, 5.2)
HEAD_DEFAULTS = dict(
    lr=5.0,            # "learning rate of 5 with momentum 0.9"
    momentum=0.9,
    clip=0.1,          # "gradient clipping above 0.1" (total gradient norm)
    epochs=30,         # not given by the paper; see README (Stage 2) for the choice
    batch_size=512,    # not given by the paper
    num_centroids=20,  # Multi-NCM displacements, "fixed at 20 after cross-validation"
    tau=0.0,           # logit adjustment weight; the paper's choice is 1/8
)
