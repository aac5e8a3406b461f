"""Stage 1: train the backbone (softmax CE, instance-balanced sampling) and dump frozen features.

Speed by design: the (long-tailed) training set is decoded once into a uint8 tensor that lives on the
training device; every epoch shuffles it with randperm and augments whole batches there (pad-and-crop and
flips by indexing for CIFAR, random-resized-crop through affine grids for ImageNet-style data), so the
loop never touches PIL or a DataLoader.  bf16 autocast where the device supports it; channels_last memory
format on GPU and CPU (oneDNN's bf16 convolutions on CPU run ~30% faster in it, measured on ResNet-32).
A run checkpoints atomically every few epochs and resumes on its own; the final epoch is the model.
"""
from __future__ import annotations

import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .cache import fingerprint, read_cache, run_name, write_cache
from .config import CHECKPOINT_EVERY, EXTRACT_BATCH, TRAIN_DEFAULTS
from .data import LTDataset
from .metrics import class_groups, evaluate, fmt_acc
from .models import MODELS, create_model
from .utils import (UserError, atomic_path, check_writable_dir, git_commit, now_iso, resolve_device,
                    sha256_file)

CURVE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "all", "many", "medium", "few", "seconds")
# keys of the resolved config that must agree for a checkpoint to be resumed or reused
TRAIN_IDENTITY = ("dataset", "imbalance", "subset_seed", "train_limit", "test_limit", "image_size", "backbone",
                  "epochs", "batch_size", "lr", "momentum", "weight_decay", "warmup_epochs", "augment", "seed",
                  "precision", "num_classes", "train_size")


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast on GPUs that support it and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read() if sys.platform.startswith("linux") else ""
    except OSError:
        flags = ""
    return "bf16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "fp32"


def resolve_config(dataset: LTDataset, **overrides) -> dict:
    """Defaults of the dataset's family (config.TRAIN_DEFAULTS) updated with the non-None overrides."""
    cfg = dict(TRAIN_DEFAULTS[dataset.family], seed=0)
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["backbone"] not in MODELS:
        raise UserError(f"unknown backbone {cfg['backbone']!r}; choose one of {', '.join(MODELS)}")
    for k in ("epochs", "batch_size"):
        if int(cfg[k]) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    cfg.update(dataset=dataset.name, imbalance=dataset.imbalance, subset_seed=dataset.subset_seed,
               num_classes=dataset.num_classes, train_size=int(len(dataset.train.labels)),
               image_size=int(dataset.train.images.shape[1]),
               train_limit=dataset.extra.get("train_limit"), test_limit=dataset.extra.get("test_limit"),
               mean=list(dataset.mean), std=list(dataset.std), source=dataset.source)
    return cfg


# ----------------------------------------------------------------------------------------------------
# On-device batch augmentation

class BatchAugment:
    """uint8 NCHW batches -> normalised float batches, augmented on the device with a seeded generator."""

    def __init__(self, mean, std, device, kind="cifar", out_size=None, generator=None):
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.kind, self.out_size, self.g, self.device = kind, out_size, generator, device

    def normalize(self, x_uint8):
        return (x_uint8.float() - self.mean) / self.std

    def __call__(self, x):
        b = x.shape[0]
        flip = torch.rand(b, device=self.device, generator=self.g) < 0.5
        if self.kind == "cifar":
            # RandomCrop(32, padding=4) on zero-padded pixels, then RandomHorizontalFlip (LDAM-DRW)
            h, w = x.shape[-2:]
            xp = F.pad(x, (4, 4, 4, 4))
            i = torch.randint(0, 9, (b,), device=self.device, generator=self.g)
            j = torch.randint(0, 9, (b,), device=self.device, generator=self.g)
            ar_h = torch.arange(h, device=self.device)
            ar_w = torch.arange(w, device=self.device)
            rows = (i[:, None] + ar_h)[:, None, :, None]
            cols = (j[:, None] + ar_w)[:, None, None, :]
            x = xp[torch.arange(b, device=self.device)[:, None, None, None],
                   torch.arange(3, device=self.device)[None, :, None, None], rows, cols]
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            return self.normalize(x)
        # ImageNet-style RandomResizedCrop(scale 0.08-1, ratio 3/4-4/3) + flip as one affine resampling
        scale = torch.empty(b, device=self.device).uniform_(0.08, 1.0, generator=self.g)
        logr = torch.empty(b, device=self.device).uniform_(math.log(3 / 4), math.log(4 / 3), generator=self.g)
        r = torch.exp(logr)
        cw = torch.sqrt(scale * r).clamp(max=1.0)  # crop width / height as fractions of the image side
        ch = torch.sqrt(scale / r).clamp(max=1.0)
        cx = (torch.rand(b, device=self.device, generator=self.g) * 2 - 1) * (1 - cw)
        cy = (torch.rand(b, device=self.device, generator=self.g) * 2 - 1) * (1 - ch)
        theta = torch.zeros(b, 2, 3, device=self.device)
        theta[:, 0, 0] = torch.where(flip, -cw, cw)
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = ch
        theta[:, 1, 2] = cy
        s = self.out_size or x.shape[-1]
        grid = F.affine_grid(theta, (b, 3, s, s), align_corners=False)
        return F.grid_sample(self.normalize(x), grid, mode="bilinear", padding_mode="reflection",
                             align_corners=False)


def to_device_uint8(images: np.ndarray, device, channels_last=False) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor on the device (decoded once, kept there)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def lr_at(it: int, total_iters: int, warmup_iters: int, base_lr: float) -> float:
    """Linear warm-up for `warmup_iters` iterations, then cosine decay to 0 at `total_iters`."""
    if it < warmup_iters:
        return base_lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def _autocast(device, precision):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, opt, x, y, precision):
    """One SGD step of softmax cross-entropy (bf16 autocast when asked); returns (loss, logits)."""
    with _autocast(x.device, precision):
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


@torch.no_grad()
def predict_features(model, images_u8: torch.Tensor, aug: BatchAugment, batch=EXTRACT_BATCH, precision="fp32"):
    """Frozen penultimate features and logits (eval mode, no augmentation), float32 on the CPU."""
    from tqdm import tqdm
    model.eval()
    feats, logits = [], []
    starts = range(0, images_u8.shape[0], batch)
    for s in tqdm(starts, desc="features", leave=False, disable=True if len(starts) < 20 else None):
        x = aug.normalize(images_u8[s:s + batch])
        with _autocast(x.device, precision):
            f = model.forward_features(x)
            logit = model.fc(f)
        feats.append(f.float().cpu())
        logits.append(logit.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def recalibrate_bn(model, images_u8: torch.Tensor, aug: BatchAugment, batch=EXTRACT_BATCH):
    """Paper A.4: with every weight frozen, re-estimate BatchNorm running mean/var over the training set.

    torch.optim.swa_utils.update_bn resets the running statistics and accumulates a cumulative average
    (momentum=None) over the batches, in train mode and without gradients; no weight changes.
    """
    batches = (aug.normalize(images_u8[s:s + batch]) for s in range(0, images_u8.shape[0], batch))
    torch.optim.swa_utils.update_bn(batches, model)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# Training with automatic resume

def identity_diff(have: dict, want: dict) -> dict:
    """{key: (have, want)} for the TRAIN_IDENTITY keys that differ (want compared as JSON would store it)."""
    want = json.loads(json.dumps(want))
    return {k: (have.get(k), want.get(k)) for k in TRAIN_IDENTITY if have.get(k) != want.get(k)}


def weights_sha256(model) -> str:
    """Hash of the model's tensors (parameters and buffers): identifies the weights themselves, unlike the
    checkpoint file's hash, which also covers optimizer state and wall-clock timings."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _set_determinism(deterministic: bool, device):
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def _write_curve(path: Path, rows: list):
    import pandas as pd
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(rows, columns=list(CURVE_COLUMNS)).to_csv(tmp, index=False)


def train(dataset: LTDataset, cfg: dict, run_dir, device="auto", deterministic=False, stop_after=None,
          log=print):
    """Train (or resume, or reuse a finished) backbone under ``run_dir``.

    Returns (model in eval mode, learning-curve rows).  ``stop_after=k`` ends the call after epoch k (with a
    checkpoint), as a kill would -- used to test resume.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device) if isinstance(device, str) else device
    _set_determinism(deterministic, device)
    ckpt_path = run_dir / "checkpoint.pt"
    ident = {k: cfg.get(k) for k in TRAIN_IDENTITY}

    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["backbone"], dataset.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"])
    start_epoch, rows = 0, []
    if ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        except Exception as e:
            raise UserError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__}); delete it or use "
                            "--overwrite to retrain") from None
        diff = identity_diff(ckpt.get("identity") or {}, ident)
        if diff:
            raise UserError(f"checkpoint {ckpt_path} was trained with a different configuration "
                            f"(have, asked): {diff}; use another --run-name or --overwrite")
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"].cpu())  # generator states are CPU byte tensors
        start_epoch, rows = ckpt["epoch"], ckpt["curve"]
        log(f"resuming {run_dir.name} from epoch {start_epoch}/{cfg['epochs']}" if start_epoch < cfg["epochs"]
            else f"reusing finished checkpoint {ckpt_path} ({start_epoch} epochs)")

    epochs = cfg["epochs"]
    if start_epoch >= epochs:
        model.eval()
        return model, rows

    aug = BatchAugment(dataset.mean, dataset.std, device, cfg["augment"], cfg["image_size"], gen)
    x_train = to_device_uint8(dataset.train.images, device, channels_last=True)
    y_train = torch.from_numpy(dataset.train.labels).to(device)
    x_test = to_device_uint8(dataset.test.images, device, channels_last=True)
    groups = class_groups(dataset.train_counts)
    n, bs = x_train.shape[0], cfg["batch_size"]
    iters_per_epoch = math.ceil(n / bs)
    total_iters, warm = epochs * iters_per_epoch, cfg["warmup_epochs"] * iters_per_epoch
    precision = cfg["precision"]

    def save(epoch):
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), generator=gen.get_state(),
                     epoch=epoch, curve=rows, identity=ident, config=cfg, torch=torch.__version__)
        with atomic_path(ckpt_path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    t_run = time.time()
    for epoch in range(start_epoch, epochs):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(range(iters_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=None,
                   mininterval=1)
        for b in bar:
            idx = perm[b * bs:(b + 1) * bs]
            if idx.numel() < 2:  # BatchNorm needs two samples; at most one image of the epoch is skipped
                continue
            it = epoch * iters_per_epoch + b
            lr = lr_at(it, total_iters, warm, cfg["lr"])
            for group in opt.param_groups:
                group["lr"] = lr
            y = y_train[idx]
            x = aug(x_train[idx]).contiguous(memory_format=torch.channels_last)
            loss, logits = train_step(model, opt, x, y, precision)
            loss_sum += loss.detach() * idx.numel()
            correct += (logits.argmax(1) == y).sum()
            seen += idx.numel()
        _, logits = predict_features(model, x_test, aug, precision=precision)
        acc = evaluate(logits.argmax(1), dataset.test.labels, groups)
        row = dict(epoch=epoch + 1, lr=lr, train_loss=float(loss_sum) / max(seen, 1),
                   train_acc=100 * float(correct) / max(seen, 1), all=acc["all"], many=acc["many"],
                   medium=acc["medium"], few=acc["few"], seconds=time.time() - t0)
        rows.append(row)
        done = epoch + 1 - start_epoch
        eta = (time.time() - t_run) / done * (epochs - epoch - 1)
        log(f"epoch {epoch + 1:>3}/{epochs}  loss {row['train_loss']:.3f}  train {row['train_acc']:.1f}  "
            f"test All {fmt_acc(acc['all'])} Many {fmt_acc(acc['many'])} Med {fmt_acc(acc['medium'])} "
            f"Few {fmt_acc(acc['few'])}  lr {lr:.4f}  {row['seconds']:.1f}s  ETA {eta / 60:.1f} min")
        _write_curve(run_dir / "learning_curve.csv", rows)
        last = epoch + 1 == epochs
        if last or (epoch + 1) % CHECKPOINT_EVERY == 0 or (stop_after is not None and epoch + 1 >= stop_after):
            save(epoch + 1)
        if stop_after is not None and epoch + 1 >= stop_after and not last:
            log(f"stopping after epoch {epoch + 1} as asked (resume by running the same command)")
            return None, rows
    model.eval()
    return model, rows


# ----------------------------------------------------------------------------------------------------
# extract = train (or resume/reuse) + dump features to the HDF5 cache

def extract(dataset: LTDataset, cache_dir="cache", run=None, device="auto", precision="auto",
            deterministic=False, bn_recalibrate=False, overwrite=False, stop_after=None, log=print,
            **overrides) -> Path | None:
    """Stage 1 end to end.  Returns the path of features.h5 (None when stopped early by ``stop_after``)."""
    commit = git_commit()  # the code that trains, taken before the long run (the tree may change meanwhile)
    dev = resolve_device(device)
    cfg = resolve_config(dataset, precision=resolve_precision(precision, dev), **overrides)
    run_dir = check_writable_dir(Path(cache_dir) / (run or run_name(dataset.name, dataset.imbalance,
                                                                      cfg["backbone"], cfg["seed"])))
    cache_path = run_dir / "features.h5"
    ident = {k: cfg.get(k) for k in TRAIN_IDENTITY}
    if cache_path.exists() and not overwrite:
        have = read_cache(cache_path)
        diff = identity_diff(have.provenance.get("config", {}), ident)
        if diff:
            raise UserError(f"{cache_path} exists with a different provenance (have, asked): {diff}; "
                            "use another --run-name / --cache-dir, or --overwrite to replace it")
        if not bn_recalibrate or "bn_recal" in have.variants:
            log(f"cache {cache_path} is up to date (fingerprint {have.fingerprint}); nothing to do")
            return cache_path
    if overwrite:
        for p in (run_dir / "checkpoint.pt", run_dir / "learning_curve.csv"):
            p.unlink(missing_ok=True)

    log(f"stage 1: {dataset.name} beta={dataset.imbalance:g} ({len(dataset.train.labels)} train / "
        f"{len(dataset.test.labels)} test images, {dataset.num_classes} classes) {cfg['backbone']} "
        f"{cfg['epochs']} epochs on {dev} ({cfg['precision']}) -> {run_dir}")
    t0 = time.time()
    model, rows = train(dataset, cfg, run_dir, dev, deterministic, stop_after, log)
    if model is None:
        return None
    train_seconds = time.time() - t0

    aug = BatchAugment(dataset.mean, dataset.std, dev, cfg["augment"], cfg["image_size"])
    on_dev = {s: to_device_uint8(sp.images, dev, channels_last=True) for s, sp in dataset.splits().items()}
    # features are extracted in fp32 whatever the training precision: they are the product of stage 1
    features = {"plain": {s: (predict_features(model, x, aug)[0], dataset.splits()[s].labels)
                          for s, x in on_dev.items()}}
    if bn_recalibrate:
        recal = recalibrate_bn(copy.deepcopy(model), on_dev["train"], aug)
        features["bn_recal"] = {s: (predict_features(recal, x, aug)[0], dataset.splits()[s].labels)
                                for s, x in on_dev.items()}
    curve = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in CURVE_COLUMNS}
    provenance = dict(
        dataset=dataset.name, imbalance=dataset.imbalance, subset_seed=dataset.subset_seed,
        backbone=cfg["backbone"], epochs=cfg["epochs"], seed=cfg["seed"], config=cfg,
        checkpoint_sha256=sha256_file(run_dir / "checkpoint.pt"), weights_sha256=weights_sha256(model),
        git_commit=commit,
        torch_version=torch.__version__, created=now_iso(), data_source=dataset.source,
        device=str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else
                           f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        deterministic=deterministic, train_seconds=round(train_seconds, 1),
        final_test_accuracy={k: rows[-1][k] for k in ("all", "many", "medium", "few")} if rows else None)
    write_cache(cache_path, provenance=provenance, class_names=dataset.class_names,
                train_counts=dataset.train_counts, classifier_weight=model.fc.weight.detach().float().cpu(),
                classifier_bias=model.fc.bias.detach().float().cpu(), features=features, learning_curve=curve)
    log(f"wrote {cache_path} (fingerprint {fingerprint(provenance)}; variants {sorted(features)})")
    return cache_path
