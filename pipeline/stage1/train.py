"""Stage-1 training: softmax cross-entropy, instance-balanced sampling, SGD; one epoch at a time, resumable.

Speed by design: the (long-tailed) training set is decoded once into uint8 and held where it trains (a
:class:`~pipeline.stage1.shards.Shard`: this rank's block, on the device or in pinned host memory); every
epoch shuffles it with randperm and augments whole batches on the device, so the loop never touches PIL or
a DataLoader.  bf16 autocast where the device supports it; channels_last memory format on GPU and CPU.  One
process is a data-parallel job of one rank: the same code path, with DistributedDataParallel around the
model only when there are several ranks.  A run checkpoints atomically every few epochs and resumes on its
own; the final epoch is the model.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ACCURACY_KEYS, CHECKPOINT_EVERY, run_identity
from ..metrics import class_groups, fmt_acc
from ..utils import resolve_device
from .augment import BatchAugment
from .checkpoint import BEST_TEST_FILE, CHECKPOINT_FILE, CURVE_FILE, load_checkpoint, save_checkpoint, write_curve
from .data import LTDataset
from .distributed import SINGLE, Dist, revert_sync_bn, wrap_ddp
from .evaluate import evaluate_test
from .models import create_model
from .pause import PauseControl, RunPaused
from .plan import resolve_compile, set_determinism, steps_trained
from .precision import autocast, continue_precision
from .schedule import lr_for
from .shards import Shard

def train_step(model, opt, x, y, precision, denom=None):
    """One SGD step of softmax cross-entropy (bf16 autocast when asked); returns (loss, logits).

    ``denom`` (data-parallel ranks): the loss is the sum over this rank's slice divided by global batch /
    world size, so DistributedDataParallel's average of the ranks' gradients is the gradient of the mean
    over the global batch even when the slices differ in size."""
    with autocast(x.device, precision):
        logits = model(x)
        if denom is None:
            loss = F.cross_entropy(logits.float(), y)
        else:
            loss = F.cross_entropy(logits.float(), y, reduction="sum") / denom
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


@dataclass
class Trainer:
    """What a training run holds from epoch to epoch (built by :func:`setup`)."""
    cfg: dict
    model: torch.nn.Module        # the model itself (checkpoints, evaluation)
    step_model: torch.nn.Module   # what the train step calls: DDP and/or torch.compile around the model
    opt: torch.optim.Optimizer
    gen: torch.Generator          # the run's seeded generator: epoch permutations and augmentation draws
    aug: BatchAugment
    x_train: Shard
    y_train: torch.Tensor
    x_test: Shard
    dataset: LTDataset
    precision: str
    dist: Dist
    bn_split: bool = False        # BatchNorm statistics per rank slice (data-parallel without SyncBN)
    log: object = None            # progress lines within an epoch when no terminal shows the tqdm bar
    eager_model: torch.nn.Module | None = None  # step_model without torch.compile: for the partial last batch
    train_secs: list = field(default_factory=list)  # this process's measured epoch parts: the estimate of
    eval_secs: list = field(default_factory=list)   # the next epoch, for the time limit

    @property
    def device(self) -> torch.device:
        return self.aug.device

    def evaluates(self, epoch: int) -> bool:
        """Whether 0-based ``epoch`` ends with a test evaluation: every eval_every epochs and the last one."""
        every = int(self.cfg.get("eval_every") or 1)
        return epoch + 1 == self.cfg["epochs"] or (epoch + 1) % every == 0

    def next_epoch_seconds(self, epoch: int) -> float | None:
        """Estimated seconds of 0-based ``epoch`` (None before the first measured epoch: it always runs)."""
        if not self.train_secs:
            return None
        ev = max(self.eval_secs[-5:]) if self.evaluates(epoch) and self.eval_secs else 0.0
        return max(self.train_secs[-5:]) + ev


def setup(dataset: LTDataset, cfg: dict, model, opt, gen, device, dist: Dist, data_on: str, sync_bn: bool,
          precision: str, log=None) -> Trainer:
    """Place the data (this rank's block of train and test, ``data_on``), the augmentation and the step model."""
    aug = BatchAugment(dataset.mean, dataset.std, device, cfg["augment"], cfg["image_size"], gen)
    x_train = Shard(dataset.train.images, device, data_on, dist)
    x_test = Shard(dataset.test.images, device, data_on, dist)
    y_train = torch.from_numpy(dataset.train.labels).to(device)
    ddp_model = wrap_ddp(model, dist, sync_bn)  # the model itself for one process
    compiled = resolve_compile(cfg.get("compile", "off"), device) and not (dist.active and sync_bn)  # SyncBN
    # graph-breaks at every layer under torch.compile; static shapes: the partial last batch runs eager
    step_model = torch.compile(ddp_model, dynamic=False) if compiled else ddp_model
    return Trainer(cfg, model, step_model, opt, gen, aug, x_train, y_train, x_test, dataset, precision, dist,
                   bn_split=dist.active and not sync_bn, log=log, eager_model=ddp_model)


PROGRESS_SECONDS = 30


def train_one_epoch(t: Trainer, epoch: int) -> dict:
    """Train 0-based ``epoch``: a seeded permutation of the training set, each global batch augmented as one
    process augments it and trained on its rank slices.  Returns lr (of the last step), train_loss,
    train_acc (over every rank's slices)."""
    from tqdm import tqdm
    cfg, dist, device = t.cfg, t.dist, t.device
    n, bs = len(t.y_train), cfg["batch_size"]
    iters = steps_trained(n, bs, cfg.get("drop_last"))
    t.model.train()
    perm = torch.randperm(n, generator=t.gen).to(device)
    order = t.x_train.order(perm)  # the permutation as the Shard reads it (on the device, or one host copy)
    loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0
    lr = float("nan")
    # no terminal (nohup, sbatch, | tee): tqdm is off, so a line every PROGRESS_SECONDS says the run is alive
    talk = t.log is not None and dist.is_main and not sys.stderr.isatty()
    t0 = last = time.time()
    for b in tqdm(range(iters), desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                  disable=None if dist.is_main else True, mininterval=1):
        if talk and b and time.time() - last >= PROGRESS_SECONDS:
            last, done = time.time(), time.time() - t0
            t.log(f"  epoch {epoch + 1}/{cfg['epochs']}: iteration {b}/{iters}, {done:.0f} s, "
                  f"~{done / b * (iters - b):.0f} s left in this epoch")
        idx = perm[b * bs:(b + 1) * bs]
        if idx.numel() < 2 or (t.bn_split and idx.numel() // dist.world < 2):
            continue  # BatchNorm needs two samples (per rank without SyncBN); the epoch's last few images
        lr = lr_for(cfg, epoch, b, iters)
        for group in t.opt.param_groups:
            group["lr"] = lr
        lo, hi = dist.block(idx.numel())  # this rank's slice of the global batch (one process: all of it)
        y = t.y_train[idx[lo:hi]]
        x = t.aug(t.x_train.take(order[b * bs:(b + 1) * bs]), rows=(lo, hi, idx.numel()))
        denom = idx.numel() / dist.world if dist.active else None
        step_model = t.step_model if idx.numel() == bs or t.eager_model is None else t.eager_model
        loss, logits = train_step(step_model, t.opt, x.contiguous(memory_format=torch.channels_last), y,
                                  t.precision, denom)
        loss_sum += loss.detach() * (y.numel() if denom is None else denom)
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
    if dist.active:  # the epoch's training loss and accuracy over every rank's slices
        tot = dist.all_reduce_sum(torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=device)]))
        loss_sum, correct, seen = tot[0], tot[1], int(tot[2])
    return dict(lr=lr, train_loss=float(loss_sum) / max(seen, 1), train_acc=100 * float(correct) / max(seen, 1))


def _evaluate_epoch(t: Trainer, epoch: int, pause: PauseControl) -> dict:
    """Test accuracy at the end of ``epoch`` (a learning-curve point only, never used to pick an epoch), or
    NaN between evaluations; records the evaluation time for the time-limit estimate."""
    if not t.evaluates(epoch):
        return dict.fromkeys(ACCURACY_KEYS, float("nan"))
    t0 = time.time()
    acc = evaluate_test(t.model, t.x_test, t.dataset.test.labels, class_groups(t.dataset.train_counts), t.aug,
                        t.precision)
    t.eval_secs.append(time.time() - t0)
    pause.eval_seconds_per_image = max(t.eval_secs[-5:]) / max(1, len(t.dataset.test.labels))
    return {k: acc[k] for k in ACCURACY_KEYS}


def _new_best_test(rows: list) -> bool:
    """Whether the last row is an evaluated epoch whose test accuracy (All) beats every earlier one (the first
    maximum counts, as the report's best test epoch)."""
    a = rows[-1]["all"]
    earlier = [r["all"] for r in rows[:-1] if not math.isnan(r["all"])]
    return not math.isnan(a) and a > max(earlier, default=-math.inf)


def _build(cfg: dict, num_classes: int, device):
    """(model, optimizer, generator) of a fresh run: the seeded init, in channels_last."""
    torch.manual_seed(cfg["seed"])
    model = create_model(cfg["backbone"], num_classes, cfg.get("fc_init")).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                          weight_decay=cfg["weight_decay"])
    # a CPU generator on every device: the same permutations and augmentation draws on CPU and CUDA (no host
    # sync to read them), and a checkpoint's generator state resumes on any device
    gen = torch.Generator()
    gen.manual_seed(cfg["seed"])
    return model, opt, gen


def _resume(ckpt, model, opt, gen, cfg: dict, run_dir: Path, log):
    """Load a checkpoint's state (when there is one): (start epoch, curve rows, precision to train in)."""
    if ckpt is None:
        return 0, [], cfg["precision"]
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    start_epoch, rows = ckpt["epoch"], ckpt["curve"]
    try:
        gen.set_state(ckpt["generator"].cpu())  # generator states are CPU byte tensors
    except RuntimeError:  # a state from another generator type (a device generator of older code)
        gen.manual_seed(int(cfg["seed"]) * 1_000_003 + int(start_epoch))
        log(f"checkpoint generator state is not a CPU generator's: reseeded from (seed, epoch {start_epoch}); "
            "the remaining draws differ from an uninterrupted run's")
    precision = continue_precision(ckpt.get("identity") or {}, ckpt.get("precision_segments"), cfg, start_epoch)
    log(f"resuming {run_dir.name} from epoch {start_epoch}/{cfg['epochs']} ({precision})"
        if start_epoch < cfg["epochs"] else
        f"reusing finished checkpoint {run_dir / CHECKPOINT_FILE} ({start_epoch} epochs)")
    return start_epoch, rows, precision


def train(dataset: LTDataset, cfg: dict, run_dir, device="auto", deterministic=False, stop_after=None,
          log=print, dist: Dist = SINGLE, data_on="device", sync_bn=False, pause: PauseControl | None = None,
          allow_precision_change=False):
    """Train (or resume, or reuse a finished) backbone under ``run_dir``.

    Returns (model in eval mode, learning-curve rows).  ``stop_after=k`` ends the call after epoch k (with a
    checkpoint), as a kill would -- used to test resume.  ``pause`` (a PauseControl): at each epoch end, a
    pause signal or a next epoch that would not fit in its time limit writes the checkpoint and raises
    RunPaused.  ``allow_precision_change``: resume a checkpoint trained in another precision (see
    continue_precision).  Data-parallel (``dist`` of a torchrun job): every rank holds its block of the
    images (``data_on`` device or host, pipeline/stage1/shards.py), trains its slice of each global batch
    under DistributedDataParallel (+ SyncBatchNorm with ``sync_bn``); rank 0 reads the checkpoint and sends
    it to all, and alone writes checkpoints and the learning curve.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device) if isinstance(device, str) else device
    set_determinism(deterministic, device)
    model, opt, gen = _build(cfg, dataset.num_classes, device)
    ckpt = dist.on_main(load_checkpoint, run_dir / CHECKPOINT_FILE, cfg, allow_precision_change)
    start_epoch, rows, precision = _resume(ckpt, model, opt, gen, cfg, run_dir, log)
    ident = run_identity(cfg)
    if start_epoch < cfg["epochs"]:
        t = setup(dataset, cfg, model, opt, gen, device, dist, data_on, sync_bn, precision, log)

        def save(epoch, name=CHECKPOINT_FILE):  # rank 0 alone writes
            if dist.is_main:  # the best-test file is only snapshotted: no optimizer state
                save_checkpoint(run_dir / name, model, opt if name != BEST_TEST_FILE else None, gen, epoch, rows,
                                ident, cfg)

        if not _run_epochs(t, start_epoch, rows, save, pause or PauseControl(), stop_after, run_dir, log):
            return None, rows
        if dist.active and sync_bn:
            revert_sync_bn(model)  # plain BatchNorm again (same tensors): eval and extraction are per sample
    model.eval()
    return model, rows


def _run_epochs(t: Trainer, start_epoch: int, rows: list, save, pause: PauseControl, stop_after, run_dir: Path,
                log) -> bool:
    """Epochs start_epoch.. of the run: train, evaluate, log, write the curve, checkpoint.  False when stopped
    by ``stop_after``; RunPaused (checkpoint written) when paused."""
    epochs, t_run = t.cfg["epochs"], time.time()
    for epoch in range(start_epoch, epochs):
        why = t.dist.any_rank(pause.reason(t.next_epoch_seconds(epoch)), t.device)
        if why is not None:
            if epoch > start_epoch:
                save(epoch)
            raise RunPaused(epoch, epochs, pause.elapsed(), why)
        t0 = time.time()
        row = dict(epoch=epoch + 1, **train_one_epoch(t, epoch))
        t.train_secs.append(time.time() - t0)
        row.update(_evaluate_epoch(t, epoch, pause), seconds=time.time() - t0)
        rows.append(row)
        eta = (time.time() - t_run) / (epoch + 1 - start_epoch) * (epochs - epoch - 1)
        log(f"epoch {epoch + 1:>3}/{epochs}  loss {row['train_loss']:.3f}  train {row['train_acc']:.1f}  "
            f"test All {fmt_acc(row['all'])} Many {fmt_acc(row['many'])} Med {fmt_acc(row['medium'])} "
            f"Few {fmt_acc(row['few'])}  lr {row['lr']:.4f}  {row['seconds']:.1f}s  ETA {eta / 60:.1f} min")
        if t.dist.is_main:
            write_curve(run_dir / CURVE_FILE, rows)
        if t.cfg.get("keep_best_test") and _new_best_test(rows):  # BALMS's state_dict_best: optimistic
            save(epoch + 1, BEST_TEST_FILE)
        last, stop = epoch + 1 == epochs, stop_after is not None and epoch + 1 >= stop_after
        if last or (epoch + 1) % CHECKPOINT_EVERY == 0 or stop:
            save(epoch + 1)
        if stop and not last:
            log(f"stopping after epoch {epoch + 1} as asked (resume by running the same command)")
            return False
    return True
