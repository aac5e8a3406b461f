"""Planning a stage-1 run before any training: the resolved config (recipe + overrides + the data's identity),
the run folder, and whether an existing cache already is this run.  Also the run-wide switches
(torch.compile, determinism) that do not change what is trained."""
from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import CACHE_FILE, read_cache, run_name
from ..config import COMPILE_MODES, DEFAULT_RECIPE, EVAL_POINTS, RECIPES, RUN_IDENTITY, method_variant
from ..utils import UserError, check_writable_dir
from .checkpoint import BEST_TEST_FILE, CHECKPOINT_FILE, CURVE_FILE, identity_diff
from .data import LTDataset
from .distributed import Dist, bn_groups, resolve_sync_bn
from .evaluate import recal_method
from .models import MODELS
from .precision import resolve_precision


def data_hash(dataset: LTDataset) -> str:
    """Hash of the decoded pixels and labels of every split: the data's identity, wherever it was read from
    (a re-run on other pixels must not reuse a checkpoint or cache made from these)."""
    h = hashlib.blake2b(digest_size=16)
    for name, sp in sorted(dataset.splits().items()):
        h.update(name.encode())
        for arr in (sp.images, sp.labels):
            arr = np.ascontiguousarray(arr)
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def _recipe(dataset: LTDataset, recipe: str | None) -> tuple[str, dict]:
    """The named recipe (default: the dataset family's), checked against the dataset's family."""
    name = recipe or DEFAULT_RECIPE[dataset.family]
    if name not in RECIPES:
        raise UserError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    base = dict(RECIPES[name])
    if base.pop("family") != dataset.family:
        fits = [r for r, v in RECIPES.items() if v["family"] == dataset.family]
        raise UserError(f"recipe {name!r} is for {RECIPES[name]['family']} data, but {dataset.name} is "
                        f"{dataset.family} data; pass recipe=... with one of: {', '.join(fits)}")
    return name, base


def steps_trained(n: int, batch_size: int, drop_last=False) -> int:
    """Optimiser steps in an epoch of ``n`` images: the partial last batch counts unless ``drop_last`` (recipe
    `balms`: BALMS's loop stops after int(n / batch) steps)."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def resolve_config(dataset: LTDataset, recipe: str | None = None, **overrides) -> dict:
    """The named recipe (default: the dataset family's, config.DEFAULT_RECIPE) updated with the non-None
    overrides, plus the dataset's identity.  The budget is `iterations` or `epochs`: giving one drops the
    recipe's other; iterations become epochs = ceil(iterations / steps per epoch), as BALMS does."""
    name, base = _recipe(dataset, recipe)
    cfg = dict(dict.fromkeys(RUN_IDENTITY), **base)
    cfg.update(recipe=name, seed=0, compile="off", eval_every=None)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in given and "iterations" in given:
        raise UserError("give the budget as epochs=... or iterations=..., not both")
    if "epochs" in given:
        cfg["iterations"] = None
    if "iterations" in given:
        cfg["epochs"] = None
    cfg.update(given)
    if cfg["backbone"] not in MODELS:
        raise UserError(f"unknown backbone {cfg['backbone']!r}; choose one of {', '.join(MODELS)}")
    for k in ("epochs", "iterations", "batch_size"):
        if cfg.get(k) is not None and int(cfg[k]) < 1:
            raise UserError(f"{k} must be >= 1, got {cfg[k]}")
    n = int(len(dataset.train.labels))
    if cfg.get("drop_last") and n < int(cfg["batch_size"]):
        raise UserError(f"recipe {name!r} drops each epoch's partial batch, but the training set ({n} images) is "
                        f"smaller than one batch ({cfg['batch_size']}); pass a smaller batch_size")
    steps = math.ceil(n / int(cfg["batch_size"]))  # BALMS counts the partial batch here even where it skips it
    if cfg["epochs"] is None:
        cfg["epochs"] = math.ceil(int(cfg["iterations"]) / steps)
    if cfg["schedule"] == "balms" and "warmup_epochs" not in given:
        cfg["warmup_epochs"] = math.ceil(int(cfg["warmup_iterations"]) / steps)
    if cfg["eval_every"] is None:
        cfg["eval_every"] = max(1, math.ceil(cfg["epochs"] / EVAL_POINTS))
    cfg.update(dataset=dataset.name, imbalance=dataset.imbalance, subset_seed=dataset.subset_seed,
               num_classes=dataset.num_classes, train_size=n,
               steps_per_epoch=steps_trained(n, int(cfg["batch_size"]), cfg.get("drop_last")),
               image_size=int(dataset.train.images.shape[1]),
               train_limit=dataset.extra.get("train_limit"), test_limit=dataset.extra.get("test_limit"),
               mean=list(dataset.mean), std=list(dataset.std), source=dataset.source,
               data_hash=data_hash(dataset))
    return cfg


def budget_warning(cfg: dict) -> str | None:
    """A warning when the warm-up takes the whole budget: the run would never reach its peak learning rate
    (e.g. a 20-epoch CIFAR run on the paper recipe, whose warm-up is 800 iterations = 32 epochs)."""
    w, e = int(cfg.get("warmup_epochs") or 0), int(cfg["epochs"])
    if w >= e and w > 0:
        return (f"warning: the warm-up ({w} epochs) is at least the budget ({e} epochs): the learning rate never "
                f"reaches its peak {cfg['lr']:g}; lower --warmup-epochs or raise the budget")
    return None


def resolve_compile(compile_mode: str, device) -> bool:
    """--compile auto: torch.compile the train step on CUDA only.  On CPU the compiled ResNet-32 step showed
    no reliable gain over eager bf16 channels_last for a minute of compilation (docs/performance.md), so
    auto leaves it off there."""
    if compile_mode not in COMPILE_MODES:
        raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile_mode!r}")
    if compile_mode == "auto":
        return torch.device(device).type == "cuda"
    return compile_mode == "on"


def set_determinism(deterministic: bool, device):
    """--deterministic: deterministic algorithms (a CPU run repeats bit for bit); else cuDNN autotuning."""
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@dataclass
class Plan:
    """What rank 0 decided before training (broadcast to every rank)."""
    cfg: dict            # the resolved config (config.run_identity of it is the run's identity)
    sync_bn: bool        # SyncBatchNorm under torchrun
    run_dir: Path
    done: bool           # the run's cache exists (nothing to train)
    methods: list = field(default_factory=list)  # BN re-estimation methods asked (evaluate.recal_method dicts)
    recal: list = field(default_factory=list)    # the specs of those a finished cache lacks: added from its weights

    @property
    def cache_path(self) -> Path:
        return self.run_dir / CACHE_FILE


def _missing_variants(cache_path: Path, cfg: dict, specs: list, methods: list, allow_precision_change,
                      log) -> list:
    """The specs of the BN re-estimation methods (``methods[i]`` resolved from ``specs[i]``) whose variant the
    existing cache lacks (or holds made another way); an existing cache of another identity is refused."""
    have = read_cache(cache_path)
    diff = identity_diff(have.provenance.get("config", {}), cfg, allow_precision_change)
    if diff:
        raise UserError(f"{cache_path} exists with a different provenance or data (have, asked): {diff}; "
                        "use another run=... / cache_dir=..., or overwrite=True to replace it")
    missing = [spec for spec, m in zip(specs, methods) if have.recorded_method(method_variant(m)) != m]
    if not missing:
        log(f"cache {cache_path} is up to date (fingerprint {have.fingerprint}); nothing to do")
    for spec in missing:
        log(f"cache {cache_path}: adding its {method_variant(spec)} features from the weights it holds")
    return missing


def plan_run(dataset: LTDataset, cache_dir, run, device, precision: str, dist: Dist, sync_bn: str,
             overwrite: bool, bn_recal: list, allow_precision_change: bool, log, **overrides) -> Plan:
    """Rank 0 (it alone hashes the data and reads the run folder): the config, the run folder, and whether
    its cache already exists (and which of the BN re-estimation methods ``bn_recal`` -- dicts of data,
    sampler, passes -- it lacks).  ``overwrite`` discards the folder's checkpoint and learning curve."""
    cfg = resolve_config(dataset, precision=resolve_precision(precision, device), **overrides)
    sync = resolve_sync_bn(sync_bn, cfg["backbone"], cfg["batch_size"], dist.world)
    cfg["bn_groups"] = bn_groups(dist.world, sync)  # identity: None = BatchNorm over the global batch
    name = run or run_name(dataset.name, dataset.imbalance, cfg["backbone"], cfg["seed"], cfg["recipe"])
    run_dir = check_writable_dir(Path(cache_dir) / name)
    plan = Plan(cfg, sync, run_dir, False, [recal_method(cfg, **spec) for spec in bn_recal])
    if plan.cache_path.exists() and not overwrite:
        plan.recal = _missing_variants(plan.cache_path, cfg, bn_recal, plan.methods, allow_precision_change, log)
        plan.done = True
    if overwrite:
        for p in (run_dir / CHECKPOINT_FILE, run_dir / CURVE_FILE, run_dir / BEST_TEST_FILE):
            p.unlink(missing_ok=True)
    return plan
