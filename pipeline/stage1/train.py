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
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .augment import BatchAugment
from ..cache import CACHE_FILE, fingerprint, read_cache, run_name, weights_sha256, write_cache
from ..config import (CHECKPOINT_EVERY, COMPILE_MODES, DEFAULT_RECIPE, EVAL_POINTS, EXTRACT_BATCH, PRECISIONS, RECIPES,
                      RUN_IDENTITY, run_identity)
from .data import LTDataset
from .distributed import SINGLE, Dist, bn_groups, convert_sync_bn, resolve_sync_bn, revert_sync_bn, wrap_ddp
from ..metrics import class_groups, evaluate, fmt_acc
from .models import MODELS, create_model
from .pause import PauseControl, RunPaused
from .shards import Shard, resolve_data_on
from ..utils import (UserError, atomic_path, check_writable_dir, cpu_has_bf16, git_commit, now_iso, resolve_device,
                     sha256_file)

CURVE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "all", "many", "medium", "few", "seconds")
BN_RECAL_SEED = 0  # the fixed permutation of the training set that BN re-estimation walks through
BN_RECAL_METHOD = f"swa_utils.update_bn over a fixed permutation of the training set (seed {BN_RECAL_SEED})"


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 autocast on GPUs that support it and on CPUs with native bf16 (AMX/AVX512-BF16), else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def data_hash(dataset: LTDataset) -> str:
    """Hash of the decoded pixels and labels of every split: the data's identity, wherever it was read from
    (a re-run on other pixels must not reuse a checkpoint or cache made from these)."""
    import hashlib
    h = hashlib.blake2b(digest_size=16)
    for name, sp in sorted(dataset.splits().items()):
        h.update(name.encode())
        for arr in (sp.images, sp.labels):
            arr = np.ascontiguousarray(arr)
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def resolve_config(dataset: LTDataset, recipe: str | None = None, **overrides) -> dict:
    """The named recipe (default: the dataset family's, config.DEFAULT_RECIPE) updated with the non-None
    overrides, plus the dataset's identity.  The budget is `iterations` or `epochs`: giving one drops the
    recipe's other; iterations become epochs = ceil(iterations / steps per epoch), as BALMS does."""
    name = recipe or DEFAULT_RECIPE[dataset.family]
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    base = dict(RECIPES[name])
    if base.pop("family") != dataset.family:
        fits = [r for r, v in RECIPES.items() if v["family"] == dataset.family]
        raise UserError(f"recipe {name!r} is for {RECIPES[name]['family']} data, but {dataset.name} is "
                        f"{dataset.family} data; use --recipe {' or '.join(fits)}")
    cfg = dict(dict.fromkeys(RUN_IDENTITY), **base)
    cfg.update(recipe=name, seed=0, compile="off", eval_every=None)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "iterations" in given:
        raise UserError("give the budget as --epochs or --iterations, not both")
    if "epochs" in given:
        cfg["iterations"] = None
    if "iterations" in given:
        cfg["epochs"] = None
    cfg.update(given)
    if cfg["backbone"] not in MODELS:
        raise UserError(f"unknown backbone {cfg['backbone']!r}; choose one of {', '.join(MODELS)}")
    for k in ("epochs", "iterations", "batch_size"):
        if cfg.get(k) is not None and int(cfg[k]) < 1:
            raise UserError(f"--{k.replace('_', '-')} must be >= 1, got {cfg[k]}")
    n = int(len(dataset.train.labels))
    steps = math.ceil(n / int(cfg["batch_size"]))
    if cfg["epochs"] is None:
        cfg["epochs"] = math.ceil(int(cfg["iterations"]) / steps)
    if cfg["schedule"] == "balms" and "warmup_epochs" not in given:
        cfg["warmup_epochs"] = math.ceil(int(cfg["warmup_iterations"]) / steps)
    if cfg["eval_every"] is None:
        cfg["eval_every"] = max(1, math.ceil(cfg["epochs"] / EVAL_POINTS))
    cfg.update(dataset=dataset.name, imbalance=dataset.imbalance, subset_seed=dataset.subset_seed,
               num_classes=dataset.num_classes, train_size=n, steps_per_epoch=steps,
               image_size=int(dataset.train.images.shape[1]),
               train_limit=dataset.extra.get("train_limit"), test_limit=dataset.extra.get("test_limit"),
               mean=list(dataset.mean), std=list(dataset.std), source=dataset.source,
               data_hash=data_hash(dataset))
    return cfg


def lr_at(it: int, total_iters: int, warmup_iters: int, base_lr: float) -> float:
    """Schedule "cosine": linear warm-up for `warmup_iters` iterations, then cosine decay to 0 at `total_iters`."""
    if it < warmup_iters:
        return base_lr * (it + 1) / warmup_iters
    t = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return base_lr * 0.5 * (1 + math.cos(math.pi * t))


def balms_lr(epoch: int, epochs: int, warmup_epochs: int, start_lr: float, peak_lr: float) -> float:
    """Schedule "balms": BALMS's CosineAnnealingLRWarmup (utils.py) for 1-based `epoch` (their scheduler is
    stepped at the start of each epoch, so training epoch e runs at last_epoch = e).  Warm-up epochs
    1..W-1 go linearly from start_lr to peak_lr; from epoch W, cosine from peak_lr to 0 at the last epoch."""
    if epoch < warmup_epochs:  # (BALMS asserts W >= 2; W <= 1 means no warm-up here)
        return start_lr + (peak_lr - start_lr) * (epoch - 1) / (warmup_epochs - 1)
    t = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
    return peak_lr * 0.5 * (1 + math.cos(math.pi * t))


def lr_for(cfg: dict, epoch: int, batch: int, iters_per_epoch: int) -> float:
    """Learning rate of 0-based `batch` of 0-based `epoch` under the config's schedule."""
    if cfg["schedule"] == "balms":
        return balms_lr(epoch + 1, cfg["epochs"], cfg["warmup_epochs"], cfg["warmup_start_lr"], cfg["lr"])
    if cfg["schedule"] == "cosine":
        return lr_at(epoch * iters_per_epoch + batch, cfg["epochs"] * iters_per_epoch,
                     cfg["warmup_epochs"] * iters_per_epoch, cfg["lr"])
    raise UserError(f"unknown schedule {cfg['schedule']!r}; expected balms or cosine")


def to_device_uint8(images: np.ndarray, device, channels_last=False) -> torch.Tensor:
    """uint8 NHWC numpy -> uint8 NCHW tensor on the device (decoded once, kept there)."""
    t = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2)
    return t.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _autocast(device, precision):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def train_step(model, opt, x, y, precision, denom=None):
    """One SGD step of softmax cross-entropy (bf16 autocast when asked); returns (loss, logits).

    ``denom`` (data-parallel ranks): the loss is the sum over this rank's slice divided by global batch /
    world size, so DistributedDataParallel's average of the ranks' gradients is the gradient of the mean
    over the global batch even when the slices differ in size."""
    with _autocast(x.device, precision):
        logits = model(x)
        if denom is None:
            loss = F.cross_entropy(logits.float(), y)
        else:
            loss = F.cross_entropy(logits.float(), y, reduction="sum") / denom
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
    if not len(starts):  # an empty shard of a data-parallel rank
        d = model.fc.in_features
        return np.zeros((0, d), np.float32), np.zeros((0, model.fc.out_features), np.float32)
    for s in tqdm(starts, desc="features", leave=False, disable=True if len(starts) < 20 else None):
        x = aug.normalize(images_u8[s:s + batch].to(aug.device, non_blocking=True))  # a no-op when on device
        with _autocast(x.device, precision):
            f = model.forward_features(x)
            logit = model.fc(f)
        feats.append(f.float().cpu())
        logits.append(logit.float().cpu())
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def recalibrate_bn(model, images_u8: torch.Tensor, aug: BatchAugment, batch=EXTRACT_BATCH, seed=BN_RECAL_SEED):
    """Paper A.4: with every weight frozen, re-estimate BatchNorm running mean/var over the training set.

    torch.optim.swa_utils.update_bn resets the running statistics and accumulates a cumulative average
    (momentum=None) over the batches, in train mode and without gradients; no weight changes.  The batches
    walk a fixed-seed permutation of the training set: our arrays are sorted by class, and class-pure batches
    would average within-class variances only, missing the between-class spread (running_var ~0.7x the
    population variance in the first BN layer of a CIFAR-10 ResNet-32).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(images_u8, Shard):  # host memory, or this rank's block: each batch is sliced over the ranks
        perm = torch.randperm(images_u8.n, generator=g).numpy()
        batches = (aug.normalize(images_u8.take(perm[s:s + batch])) for s in range(0, images_u8.n, batch))
        sync = images_u8.dist.active  # statistics of the whole (global) batch, as one process computes them
        if sync:
            convert_sync_bn(model, aug.device)
        torch.optim.swa_utils.update_bn(batches, model)
        if sync:
            revert_sync_bn(model)
        model.eval()
        return model
    perm = torch.randperm(images_u8.shape[0], generator=g).to(images_u8.device)
    batches = (aug.normalize(images_u8[perm[s:s + batch]]) for s in range(0, images_u8.shape[0], batch))
    torch.optim.swa_utils.update_bn(batches, model)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------
# Training with automatic resume

def identity_diff(have: dict, want: dict, allow_precision_change=False) -> dict:
    """{key: (have, want)} for the config.RUN_IDENTITY keys that differ (compared as JSON stores them);
    with ``allow_precision_change`` a different training precision alone is no difference."""
    want = json.loads(json.dumps(run_identity(want)))
    diff = {k: (have.get(k), want.get(k)) for k in RUN_IDENTITY if have.get(k) != want.get(k)}
    if allow_precision_change:
        diff.pop("precision", None)
    return diff


def _refusal(what, diff) -> str:
    msg = f"{what} was trained with a different configuration or data (have, asked): {diff}; "
    if set(diff) == {"precision"}:  # e.g. a bf16 run resumed on a CPU without native bf16
        have, want = diff["precision"]
        return msg + (f"pass --precision {have}, or --allow-precision-change to continue it in {want} "
                      "(recorded in its provenance as precision_segments)")
    return msg + "use another --run-name or --overwrite"


def continue_precision(ckpt_identity: dict, ckpt_segments, cfg: dict, start_epoch: int):
    """A resumed run keeps the precision it started with in its identity (cfg['precision']); the precision
    each epoch range actually trained in goes to cfg['precision_segments'] = [[first epoch, precision], ...]
    once it changes.  Returns the precision to train the remaining epochs in."""
    train_precision = cfg["precision"]
    first = ckpt_identity.get("precision", train_precision)
    segments = [list(s) for s in (ckpt_segments or [[0, first]])]
    if segments[-1][1] != train_precision and start_epoch < cfg["epochs"]:  # (a finished run trains no more)
        segments.append([start_epoch, train_precision])
    cfg["precision"] = first
    if len(segments) > 1:
        cfg["precision_segments"] = segments
    return train_precision


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


def resolve_compile(compile_mode: str, device) -> bool:
    """--compile auto: torch.compile the train step on CUDA only.  On these 2-core CPUs the compiled ResNet-32
    step measured no reliable gain over eager bf16 channels_last (benchmarks/stage1_throughput.py --compile)
    while costing a minute of compilation, so auto leaves it off there."""
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_mode == "auto":
        return torch.device(device).type == "cuda"
    return compile_mode == "on"


def _any_rank(dist: Dist, why: str | None, device) -> str | None:
    """A pause reason agreed by all ranks: every rank pauses when any rank has one (a signal, its clock)."""
    if not dist.active:
        return why
    votes = dist.all_reduce_sum(torch.tensor([float(why is not None)], device=device))
    return why or ("another rank" if float(votes[0]) > 0 else None)


def train(dataset: LTDataset, cfg: dict, run_dir, device="auto", deterministic=False, stop_after=None,
          log=print, dist: Dist = SINGLE, data_on="device", sync_bn=False, pause: PauseControl | None = None,
          allow_precision_change=False):
    """Train (or resume, or reuse a finished) backbone under ``run_dir``.

    Returns (model in eval mode, learning-curve rows).  ``stop_after=k`` ends the call after epoch k (with a
    checkpoint), as a kill would -- used to test resume.  ``pause`` (a PauseControl): at each epoch end, a
    pause signal or a next epoch that would not fit in its time limit writes the checkpoint and raises
    RunPaused.  ``allow_precision_change``: resume a checkpoint trained in another precision (see
    continue_precision).  Data-parallel (``dist`` of a torchrun job): every
    rank holds its block of the images (``data_on`` device or host, pipeline/stage1/shards.py), trains its slice of
    each global batch under DistributedDataParallel (+ SyncBatchNorm with ``sync_bn``); rank 0 reads the
    checkpoint and sends it to all, and alone writes checkpoints and the learning curve.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device) if isinstance(device, str) else device
    _set_determinism(deterministic, device)
    ckpt_path = run_dir / "checkpoint.pt"
    pause = pause or PauseControl()

    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["backbone"], dataset.num_classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    gen = torch.Generator(device=device)
    gen.manual_seed(cfg["seed"])
    start_epoch, rows = 0, []

    def load_checkpoint():
        if not ckpt_path.exists():
            return None
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise UserError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__}); delete it or use "
                            "--overwrite to retrain") from None
        diff = identity_diff(ckpt.get("identity") or {}, cfg, allow_precision_change)
        if diff:
            raise UserError(_refusal(f"checkpoint {ckpt_path}", diff))
        return ckpt

    ckpt = dist.on_main(load_checkpoint)  # every rank resumes from rank 0's checkpoint
    precision = cfg["precision"]
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["generator"].cpu())  # generator states are CPU byte tensors
        start_epoch, rows = ckpt["epoch"], ckpt["curve"]
        precision = continue_precision(ckpt.get("identity") or {}, ckpt.get("precision_segments"), cfg,
                                       start_epoch)
        log(f"resuming {run_dir.name} from epoch {start_epoch}/{cfg['epochs']} ({precision})"
            if start_epoch < cfg["epochs"] else f"reusing finished checkpoint {ckpt_path} ({start_epoch} epochs)")
    ident = run_identity(cfg)

    epochs = cfg["epochs"]
    if start_epoch >= epochs:
        model.eval()
        return model, rows

    aug = BatchAugment(dataset.mean, dataset.std, device, cfg["augment"], cfg["image_size"], gen)
    if dist.active or data_on != "device":
        x_train = Shard(dataset.train.images, device, data_on, dist)
        x_test = Shard(dataset.test.images, device, data_on, dist)
    else:  # one process, data on the device (the original path)
        x_train = to_device_uint8(dataset.train.images, device, channels_last=True)
        x_test = to_device_uint8(dataset.test.images, device, channels_last=True)
    y_train = torch.from_numpy(dataset.train.labels).to(device)
    groups = class_groups(dataset.train_counts)
    n, bs = len(dataset.train.labels), cfg["batch_size"]
    iters_per_epoch = math.ceil(n / bs)
    ddp_model = wrap_ddp(model, dist, sync_bn)  # the model itself for one process
    step_model = torch.compile(ddp_model) if resolve_compile(cfg.get("compile", "off"), device) else ddp_model
    eval_every = int(cfg.get("eval_every") or 1)
    bn_split = dist.active and not sync_bn  # BatchNorm statistics per rank slice

    def save(epoch):
        if not dist.is_main:  # rank 0 alone writes
            return
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), generator=gen.get_state(),
                     epoch=epoch, curve=rows, identity=ident, config=cfg, torch=torch.__version__,
                     precision_segments=cfg.get("precision_segments"))
        with atomic_path(ckpt_path, suffix=".pt") as tmp:
            torch.save(state, tmp)

    t_run = time.time()
    train_secs, eval_secs = [], []  # this process's measured epoch parts: the estimate of the next epoch

    def next_epoch_seconds(epoch):  # None before the first measured epoch: it always runs
        if not train_secs:
            return None
        evals = epoch + 1 == epochs or (epoch + 1) % eval_every == 0
        return max(train_secs[-5:]) + (max(eval_secs[-5:]) if evals and eval_secs else 0.0)

    for epoch in range(start_epoch, epochs):
        why = _any_rank(dist, pause.reason(next_epoch_seconds(epoch)), device)
        if why is not None:
            if epoch > start_epoch:
                save(epoch)
            raise RunPaused(epoch, epochs, pause.elapsed(), why)
        t0 = time.time()
        model.train()
        perm = torch.randperm(n, device=device, generator=gen)
        perm_host = perm.cpu().numpy() if isinstance(x_train, Shard) else None  # one copy per epoch
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        bar = tqdm(range(iters_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", leave=False,
                   disable=None if dist.is_main else True, mininterval=1)
        for b in bar:
            idx = perm[b * bs:(b + 1) * bs]
            if idx.numel() < 2 or (bn_split and idx.numel() // dist.world < 2):
                continue  # BatchNorm needs two samples (per rank without SyncBN); the epoch's last few images
            lr = lr_for(cfg, epoch, b, iters_per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            if dist.active:  # this rank's slice of the global batch, augmented as in one process
                lo, hi = dist.block(idx.numel())
                y = y_train[idx[lo:hi]]
                x = aug(x_train.take(perm_host[b * bs:(b + 1) * bs]), rows=(lo, hi, idx.numel()))
                denom = idx.numel() / dist.world
            else:
                y = y_train[idx]
                x = aug(x_train.take(perm_host[b * bs:(b + 1) * bs]) if perm_host is not None else x_train[idx])
                denom = None
            x = x.contiguous(memory_format=torch.channels_last)
            loss, logits = train_step(step_model, opt, x, y, precision, denom)
            loss_sum += loss.detach() * (y.numel() if denom is None else denom)
            correct += (logits.argmax(1) == y).sum()
            seen += y.numel()
        if dist.active:  # the epoch's training loss and accuracy over every rank's slices
            tot = dist.all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)]))
            loss_sum, correct, seen = tot[0], tot[1], int(tot[2])
        last = epoch + 1 == epochs
        train_secs.append(time.time() - t0)
        t_eval = time.time()
        # test accuracy is a learning curve only: every eval_every epochs and at the last (the model), never
        # used to pick an epoch
        if last or (epoch + 1) % eval_every == 0:
            if isinstance(x_test, Shard):  # each rank its block, gathered to all
                logits = dist.gather_rows(predict_features(model, x_test.local, aug, precision=precision)[1],
                                          x_test.n, to_all=True)
            else:
                _, logits = predict_features(model, x_test, aug, precision=precision)
            acc = evaluate(logits.argmax(1), dataset.test.labels, groups)
            eval_secs.append(time.time() - t_eval)
            pause.eval_seconds_per_image = max(eval_secs[-5:]) / max(1, len(dataset.test.labels))
        else:
            acc = dict.fromkeys(("all", "many", "medium", "few"), float("nan"))
        row = dict(epoch=epoch + 1, lr=lr, train_loss=float(loss_sum) / max(seen, 1),
                   train_acc=100 * float(correct) / max(seen, 1), all=acc["all"], many=acc["many"],
                   medium=acc["medium"], few=acc["few"], seconds=time.time() - t0)
        rows.append(row)
        done = epoch + 1 - start_epoch
        eta = (time.time() - t_run) / done * (epochs - epoch - 1)
        log(f"epoch {epoch + 1:>3}/{epochs}  loss {row['train_loss']:.3f}  train {row['train_acc']:.1f}  "
            f"test All {fmt_acc(acc['all'])} Many {fmt_acc(acc['many'])} Med {fmt_acc(acc['medium'])} "
            f"Few {fmt_acc(acc['few'])}  lr {lr:.4f}  {row['seconds']:.1f}s  ETA {eta / 60:.1f} min")
        if dist.is_main:
            _write_curve(run_dir / "learning_curve.csv", rows)
        if last or (epoch + 1) % CHECKPOINT_EVERY == 0 or (stop_after is not None and epoch + 1 >= stop_after):
            save(epoch + 1)
        if stop_after is not None and epoch + 1 >= stop_after and not last:
            log(f"stopping after epoch {epoch + 1} as asked (resume by running the same command)")
            return None, rows
    if dist.active and sync_bn:
        revert_sync_bn(model)  # plain BatchNorm again (same tensors): eval and extraction are per sample
    model.eval()
    return model, rows


# ----------------------------------------------------------------------------------------------------
# extract = train (or resume/reuse) + dump features to the HDF5 cache

def extract(dataset: LTDataset, cache_dir="cache", run=None, device="auto", precision="auto",
            deterministic=False, bn_recalibrate=False, overwrite=False, stop_after=None, log=print,
            dist: Dist = SINGLE, data_on="auto", sync_bn="auto", time_limit: float | None = None,
            started: float | None = None, allow_precision_change=False, **overrides) -> Path | None:
    """Stage 1 end to end.  Returns the path of the cache (None when stopped early by ``stop_after``).

    ``time_limit`` (seconds from ``started``, a time.monotonic() value, default the call) and the pause
    signals (pipeline/stage1/pause.py) end it early with the checkpoint written, by raising RunPaused.

    Under torchrun (``dist``) every rank calls this with the same arguments: rank 0 resolves the config
    (hashing the data once), checks the existing cache and alone writes; features are computed per rank
    block and gathered; the other ranks return once the cache is in place."""
    commit = git_commit()  # the code that trains, taken before the long run (the tree may change meanwhile)
    dev = dist.device if dist.active else resolve_device(device)

    def prepare():  # rank 0: it alone reads the run folder
        cfg = resolve_config(dataset, precision=resolve_precision(precision, dev), **overrides)
        sync = resolve_sync_bn(sync_bn, cfg["backbone"], cfg["batch_size"], dist.world)
        cfg["bn_groups"] = bn_groups(dist.world, sync)  # identity: None = BatchNorm over the global batch
        run_dir = check_writable_dir(Path(cache_dir) / (run or run_name(dataset.name, dataset.imbalance,
                                                                          cfg["backbone"], cfg["seed"],
                                                                          cfg["recipe"])))
        cache_path = run_dir / CACHE_FILE
        if cache_path.exists() and not overwrite:
            have = read_cache(cache_path)
            diff = identity_diff(have.provenance.get("config", {}), cfg, allow_precision_change)
            if diff:
                raise UserError(f"{cache_path} exists with a different provenance or data (have, asked): {diff}; "
                                "use another --run-name / --cache-dir, or --overwrite to replace it")
            recal_ok = "bn_recal" in have.variants and have.provenance.get("bn_recal_method") == BN_RECAL_METHOD
            if not bn_recalibrate or recal_ok:
                log(f"cache {cache_path} is up to date (fingerprint {have.fingerprint}); nothing to do")
                return cfg, sync, run_dir, True
            log(f"cache {cache_path}: (re)building its bn_recal features with {BN_RECAL_METHOD}")
        if overwrite:
            for p in (run_dir / "checkpoint.pt", run_dir / "learning_curve.csv"):
                p.unlink(missing_ok=True)
        return cfg, sync, run_dir, False

    cfg, sync, run_dir, done = dist.on_main(prepare)
    cache_path = run_dir / CACHE_FILE
    if done:
        return cache_path
    with dist.agreed():  # where this rank's blocks of the train and test images live
        on = resolve_data_on(data_on, dev, sum(Shard.block_bytes(sp.images, dist) for sp in
                                               (dataset.train, dataset.test)), log)
    on = "host" if "host" in dist.all_gather_object(on) else on  # one placement for the job

    par = (f", {dist.world} ranks ({dist.backend}), SyncBatchNorm {'on' if sync else 'off'}"
           if dist.active else "")
    log(f"stage 1: {dataset.name} beta={dataset.imbalance:g} ({len(dataset.train.labels)} train / "
        f"{len(dataset.test.labels)} test images, {dataset.num_classes} classes) {cfg['backbone']} "
        f"recipe {cfg['recipe']}: {cfg['epochs']} epochs x {cfg['steps_per_epoch']} iterations of batch "
        f"{cfg['batch_size']}, augment {cfg['augment']}, on {dev} ({cfg['precision']}){par}, data on {on} "
        f"-> {run_dir}")
    t0 = time.time()
    pause = PauseControl(time_limit, started, log)
    with pause:
        model, rows = train(dataset, cfg, run_dir, dev, deterministic, stop_after, log, dist=dist, data_on=on,
                            sync_bn=sync, pause=pause, allow_precision_change=allow_precision_change)
        if model is None:
            return None
        # the features: every split once per variant, plus one recalibration pass over the training set
        per_image = getattr(pause, "eval_seconds_per_image", None)
        n_images = sum(len(sp.labels) for sp in dataset.splits().values()) * (1 + bn_recalibrate)
        n_images += len(dataset.train.labels) * bn_recalibrate
        why = _any_rank(dist, pause.reason(per_image * n_images if per_image else None), dev)
        if why is not None:
            raise RunPaused(cfg["epochs"], cfg["epochs"], pause.elapsed(), why,
                            ", before extracting the features of the finished run")
    train_seconds = time.time() - t0

    aug = BatchAugment(dataset.mean, dataset.std, dev, cfg["augment"], cfg["image_size"])
    sharded = dist.active or on != "device"
    held = {s: Shard(sp.images, dev, on, dist) if sharded else to_device_uint8(sp.images, dev, channels_last=True)
            for s, sp in dataset.splits().items()}

    def features_of(m):  # features are extracted in fp32 whatever the training precision
        out = {}
        for s, x in held.items():
            f = predict_features(m, x.local if sharded else x, aug)[0]
            out[s] = (dist.gather_rows(f, x.n) if sharded else f, dataset.splits()[s].labels)
        return out

    features = {"plain": features_of(model)}
    if bn_recalibrate:
        features["bn_recal"] = features_of(recalibrate_bn(copy.deepcopy(model), held["train"], aug))
    if not dist.is_main:  # rank 0 alone writes the cache; the others wait until it is in place
        dist.barrier()
        return cache_path
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
        distributed=dict(dist.describe(), sync_bn=sync, data_on=on), image_store=dataset.extra.get("image_store"),
        bn_recal_method=BN_RECAL_METHOD if bn_recalibrate else None,
        final_test_accuracy={k: rows[-1][k] for k in ("all", "many", "medium", "few")} if rows else None)
    write_cache(cache_path, provenance=provenance, class_names=dataset.class_names,
                train_counts=dataset.train_counts, classifier_weight=model.fc.weight.detach().float().cpu(),
                classifier_bias=model.fc.bias.detach().float().cpu(), features=features, learning_curve=curve,
                model_state=model.state_dict())
    log(f"wrote {cache_path} (fingerprint {fingerprint(provenance)}; variants {sorted(features)})")
    dist.barrier()
    return cache_path
