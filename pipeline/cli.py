"""`pipeline` command line: a thin layer over the library functions (which the tests call directly).

Bad input raises pipeline.utils.UserError anywhere below; it is printed here as one line
("Error: ...") with exit status 2 and no traceback, in the command's words (:func:`in_cli_words`).

Only light modules are imported here (no torch, h5py, pandas or matplotlib), so that `pipeline --help` and
option errors answer at once; each command imports the heavy module that does its work when it runs.
Option choices come from the registries and constants themselves (heads, models, datasets, recipes,
augmentations, precisions, compile / SyncBN / data placement modes, feature dtypes, variants, eval splits,
the device pattern), the torch-backed registries through :class:`LazyChoice`.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click

from .config import (ACCURACY_KEYS, AUGMENT_KINDS, BN_RECAL_DATA, BN_RECAL_DEFAULT, BN_RECAL_SAMPLERS,
                     COMPILE_MODES, DATA_ON, EVAL_SPLITS, FEATURE_DTYPES, FIT_SPLITS, METRIC_DISTANCES, METRIC_KINDS,
                     PRECISIONS, RECIPES, SUBSET_SEED, SYNC_BN_MODES, VARIANT_FORMS, is_variant)
from .stage1.data import DATASETS
from .utils import DEVICE_HELP, DEVICE_PATTERN, UserError, check_writable_dir


class LazyChoice(click.Choice):
    """A click.Choice whose choices are read from a registry on first use (heads and models need torch)."""

    def __init__(self, load):
        self._load, self._choices = load, None
        super().__init__(())

    @property
    def choices(self):
        if self._choices is None:
            self._choices = tuple(self._load())
        return self._choices

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it; the registry is the source
        pass


def _models():
    from .stage1.models import MODELS
    return sorted(MODELS)


def _heads():
    from .stage2.heads import HEADS
    return sorted(HEADS)


class Device(click.ParamType):
    """auto | cpu | cuda | cuda:N, the same for every command (availability is checked when it is used)."""
    name = "device"

    def convert(self, value, param, ctx):
        if re.fullmatch(DEVICE_PATTERN, str(value)):
            return str(value)
        self.fail(f"must be {DEVICE_HELP}, got {value!r}", param, ctx)


class TauNormP(click.ParamType):
    """A number >= 0, or "auto" (chosen on the val split)."""
    name = "p"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, float):
            return value
        try:
            v = float(value)
        except ValueError:
            self.fail(f"must be a number >= 0 or 'auto', got {value!r}", param, ctx)
        if not (math.isfinite(v) and v >= 0):
            self.fail(f"must be a finite number >= 0 or 'auto', got {value!r}", param, ctx)
        return v


DEVICE = Device()


class RunName(click.ParamType):
    """A run folder name: one plain path component (no '/', not '.' or '..'), so it stays under --cache-dir
    where run_all.sh and `pipeline report` look for it."""
    name = "name"

    def convert(self, value, param, ctx):
        v = str(value)
        if not v or v in (".", "..") or "/" in v or "\\" in v or v.startswith("-") or v != v.strip():
            self.fail(f"must be one plain folder name (no '/', not '.' or '..'), got {value!r}", param, ctx)
        return v


class Variant(click.ParamType):
    """A feature variant: plain, bn_recal, or bn_recal-<data>-<sampler>-x<passes> (config.is_variant)."""
    name = "variant"

    def convert(self, value, param, ctx):
        if is_variant(str(value)):
            return str(value)
        self.fail(f"must be {VARIANT_FORMS}, got {value!r}", param, ctx)


class FiniteRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf (which compare false against any bound)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return v


POSITIVE_INT = click.IntRange(min=1)
NONNEG_INT = click.IntRange(min=0)
POSITIVE = FiniteRange(min=0, min_open=True)
NONNEG = FiniteRange(min=0)

# Library arguments whose option is spelled otherwise (extract's run= is --run-name, build_report's out_dir= --out)
LIBRARY_ARGS = {"run": "run_name", "out_dir": "out", "workers": "fit_workers"}
_ARG = re.compile(r"(?<![\w/.=$-])([a-z][a-z0-9_]*)=('[^']*'|[^\s,;()']*)")


def in_cli_words(message: str, command: click.Command) -> str:
    """A library error in ``command``'s words.  Library messages name an argument ``name=value``
    (pipeline.utils.UserError); each whose name is one of the command's options becomes its flag:
    ``overwrite=True`` -> ``--overwrite``, ``precision='bf16'`` -> ``--precision bf16``,
    ``results_path=...`` -> ``--results``, ``figures=False`` -> ``--no-figures``."""
    flags = {}
    for p in command.params:
        if isinstance(p, click.Option):
            flags[p.name] = p.opts[0]
            flags.update({o.lstrip("-").replace("-", "_"): o for o in p.opts + p.secondary_opts})

    def flag(m):
        name, value = LIBRARY_ARGS.get(m[1], m[1]), m[2].strip("'")
        if value == "False" and f"no_{name}" in flags:
            return flags[f"no_{name}"]
        if name not in flags:
            return m[0]
        return flags[name] if value in ("", "...", "True") else f"{flags[name]} {value}"

    return _ARG.sub(flag, message)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            click.echo(f"Error: {in_cli_words(str(e), command) if command else e}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings=dict(help_option_names=["-h", "--help"], show_default=True))
@click.version_option(package_name="learned-ncm-pipeline")
def cli():
    """Learned-NCM long-tailed recognition: extract features (stage 1), fit heads (stage 2), report."""


# ---- stage 1 ----------------------------------------------------------------------------------------

def bn_recal_options(f):
    """--bn-recal-data/--bn-recal-sampler (each repeatable: every combination is one method) and
    --bn-recal-passes: the BatchNorm re-estimation methods (config.BN_RECAL_*)."""
    f = click.option("--bn-recal-passes", type=POSITIVE_INT, default=BN_RECAL_DEFAULT["passes"],
                     help="BN re-estimation: passes over the training set.")(f)
    f = click.option("--bn-recal-sampler", type=click.Choice(BN_RECAL_SAMPLERS), multiple=True,
                     help="BN re-estimation: a random permutation (instance, as stage 1 samples) or stage 2's "
                          "class-balanced draws (repeatable).  [default: instance]")(f)
    f = click.option("--bn-recal-data", type=click.Choice(BN_RECAL_DATA), multiple=True,
                     help="BN re-estimation: batches through the run's training augmentation (train-aug) or "
                          "clean images (an ablation; repeatable).  [default: train-aug]")(f)
    return f


def run_images_options(f):
    """--image-root, --train-split/--val-split/--test-split (the images of a finished run, beside --data-root)
    and --device: what `recalibrate` and `snapshot` need to run a run's weights over its images again."""
    for option in reversed([
            click.option("--image-root", type=click.Path(path_type=Path), default=None,
                         help="Split-file datasets: folder the listed paths are relative to (default --data-root)."),
            click.option("--train-split", type=click.Path(path_type=Path), default=None),
            click.option("--val-split", type=click.Path(path_type=Path), default=None),
            click.option("--test-split", type=click.Path(path_type=Path), default=None),
            click.option("--device", type=DEVICE, default="auto", help="auto, cpu, cuda, cuda:N.")]):
        f = option(f)
    return f


def _bn_recal_specs(data, sampler, passes) -> list:
    """Every combination of the --bn-recal-* values: one re-estimation method each (dicts of the keys of
    config.BN_RECAL_DEFAULT)."""
    return [dict(data=d, sampler=s, passes=passes) for d in (data or (BN_RECAL_DEFAULT["data"],))
            for s in (sampler or (BN_RECAL_DEFAULT["sampler"],))]


@cli.command()
@click.option("--dataset", required=True, type=click.Choice(DATASETS), help="Long-tailed dataset to build.")
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="CIFAR python folder or ImageFolder root (train/, test/); split files for *-lt lists.")
@click.option("--imbalance", type=FiniteRange(min=1), default=100.0,
              help="beta = N_max/N_min (CIFAR, ImageFolder; >= 1).")
@click.option("--subset-seed", type=click.IntRange(0, 2**32 - 1), default=SUBSET_SEED, help="numpy seed of the LDAM-DRW subset.")
@click.option("--backbone", type=LazyChoice(_models), default=None,
              help="Default: resnet32 for CIFAR, resnet10 otherwise.")
@click.option("--recipe", type=click.Choice(sorted(RECIPES)), default=None,
              help="Named stage-1 recipe (config.RECIPES); flags below override its fields.  "
                   "[default: paper (CIFAR) / decoupling (others)]")
@click.option("--iterations", type=POSITIVE_INT, default=None,
              help="Budget in iterations (epochs = ceil(iterations / steps per epoch)).  [default: recipe's]")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="Budget in epochs (instead of --iterations).")
@click.option("--batch-size", type=click.IntRange(min=2), default=None, help="Global batch (BatchNorm needs >= 2).")
@click.option("--lr", type=POSITIVE, default=None, help="Peak learning rate.")
@click.option("--weight-decay", type=NONNEG, default=None)
@click.option("--warmup-epochs", type=NONNEG_INT, default=None)
@click.option("--augment", type=click.Choice(AUGMENT_KINDS), default=None,
              help="cifar = crop+flip; cifar-autoaug = + AutoAugment + Cutout; cifar-autoaug-balms = the same with "
                   "BALMS's own AutoAugment ops; imagenet = random-resized-crop+flip.")
@click.option("--eval-every", type=POSITIVE_INT, default=None,
              help="Test-set learning-curve point every N epochs (always the last).  [default: ~50 points]")
@click.option("--compile", "compile_mode", type=click.Choice(COMPILE_MODES), default="auto",
              help="torch.compile the train step (auto = on CUDA only).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="Training seed (init, shuffling, augmentation).")
@click.option("--deterministic", is_flag=True, help="Deterministic algorithms: a CPU run repeats bit for bit.")
@click.option("--bn-recalibrate", is_flag=True,
              help="Also store features after post-hoc BatchNorm re-estimation (paper A.4), variant bn_recal.")
@bn_recal_options
@click.option("--device", type=DEVICE, default="auto", help="auto, cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
              help="auto = bf16 autocast where the device has native bf16.")
@click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), help="Root of the caches.")
@click.option("--run-name", type=RunName(), default=None,
              help="Folder under --cache-dir (default <dataset>-b<beta>-<backbone>-<recipe>-s<seed>).")
@click.option("--download", is_flag=True, help="Download CIFAR with torchvision into --data-root if absent.")
@click.option("--image-root", type=click.Path(path_type=Path), default=None,
              help="Split-file datasets: folder the listed paths are relative to (default --data-root).")
@click.option("--train-split", type=click.Path(path_type=Path), default=None)
@click.option("--val-split", type=click.Path(path_type=Path), default=None)
@click.option("--test-split", type=click.Path(path_type=Path), default=None)
@click.option("--image-size", type=click.IntRange(min=8), default=None, help="Resize/crop side for non-CIFAR data (default 224).")
@click.option("--train-limit", type=POSITIVE_INT, default=None, help="Tiny runs: first k source images per class.")
@click.option("--test-limit", type=POSITIVE_INT, default=None, help="Tiny runs: first k test images per class.")
@click.option("--overwrite", is_flag=True, help="Discard an existing checkpoint/cache of this run and retrain.")
@click.option("--sync-bn", type=click.Choice(SYNC_BN_MODES), default="auto",
              help="Under torchrun: SyncBatchNorm (BN statistics over the global batch).  auto = on for "
                   "ResNet-32 or a per-rank batch < 32.")
@click.option("--data-on", type=click.Choice(DATA_ON), default="auto",
              help="Where each rank keeps its block of the uint8 images: the training device, or pinned host "
                   "memory streamed per batch.  auto = device when it fits.")
@click.option("--time-limit", default=None, metavar="DURATION",
              help="Pause (checkpoint written, exit status 3) when the next epoch would not end within this "
                   "wall-clock time from the start, e.g. 2h30m, 90m, 45s.  SIGTERM, SIGINT and SIGUSR1 pause "
                   "at the end of the current epoch.  Re-run the same command to continue.")
@click.option("--allow-precision-change", is_flag=True,
              help="Resume a checkpoint trained in another precision (e.g. a bf16 run on a CPU without "
                   "native bf16); each epoch range's precision is recorded in the provenance.")
@click.option("--image-store/--no-image-store", default=True,
              help="Keep decoded JPEGs under <cache-dir>/images and memory-map them on later runs.")
@click.option("--keep-best-test", is_flag=True,
              help="Also keep <run>/best_test_checkpoint.pt, the evaluated epoch of best test accuracy (BALMS's "
                   "state_dict_best; optimistic: for `pipeline snapshot`, never the run's model).  Not identity.")
def extract(dataset, data_root, imbalance, subset_seed, device, precision, cache_dir, run_name, download,
            image_root, train_split, val_split, test_split, image_size, train_limit, test_limit, overwrite,
            deterministic, bn_recalibrate, bn_recal_data, bn_recal_sampler, bn_recal_passes, compile_mode,
            sync_bn, data_on, image_store, time_limit, allow_precision_change, **train_overrides):
    """Stage 1: build the long-tailed dataset, train the backbone, write cache/<run>/features.h5.

    Exit status: 0 finished, 2 error, 3 paused (--time-limit or a signal; re-run to continue), 130 aborted.
    Data-parallel: `torchrun --nproc-per-node N -m pipeline.cli extract ...` with the same flags."""
    import contextlib
    import os
    import time
    from .stage1.pause import EXIT_PAUSED, RunPaused, parse_duration
    started = time.monotonic()
    if not train_overrides.get("keep_best_test"):
        train_overrides.pop("keep_best_test", None)  # absent, not False: the config of runs without it unchanged
    try:
        limit = parse_duration(time_limit) if time_limit is not None else None
    except UserError as e:
        raise UserError(f"--time-limit: {e}") from None
    from .stage1.data import load_dataset
    from .stage1.distributed import init_distributed, load_on_ranks
    from .stage1.store import ImageStore
    from .stage1.extract import extract as run_extract
    try:
        dist = init_distributed(device)
    except UserError:
        if int(os.environ.get("RANK", "0") or 0) != 0:
            sys.exit(2)  # every rank finds the same error; rank 0 prints it
        raise
    echo = click.echo if dist.is_main else (lambda *a, **k: None)
    try:
        with dist.agreed():
            check_writable_dir(cache_dir)  # fail before minutes of decoding, not after
        store = ImageStore(Path(cache_dir) / "images", log=echo) if image_store else None

        def load():
            with store.active() if store else contextlib.nullcontext():
                return load_dataset(dataset, data_root, imbalance, subset_seed, download=download,
                                    image_root=image_root, split_files=(train_split, val_split, test_split),
                                    image_size=image_size, train_limit=train_limit, test_limit=test_limit)

        ds = load_on_ranks(dist, load)  # one decode per node; the other ranks memory-map the store
        if store is not None and store.events:
            ds.extra["image_store"] = store.summary()
        custom = bn_recal_data or bn_recal_sampler or bn_recal_passes != BN_RECAL_DEFAULT["passes"]
        path = run_extract(ds, cache_dir=cache_dir, run=run_name, device=device, precision=precision,
                           deterministic=deterministic, bn_recalibrate=bn_recalibrate or bool(custom),
                           bn_recal=_bn_recal_specs(bn_recal_data, bn_recal_sampler, bn_recal_passes),
                           overwrite=overwrite,
                           compile=compile_mode, log=echo, dist=dist, data_on=data_on, sync_bn=sync_bn,
                           time_limit=limit, started=started, allow_precision_change=allow_precision_change,
                           **train_overrides)
        echo(f"cache: {path}")
    except RunPaused as p:
        echo(str(p))
        sys.exit(EXIT_PAUSED)
    except UserError:
        if not dist.is_main:
            sys.exit(2)  # the same error was raised on every rank (Dist.agreed / on_main); rank 0 prints it
        raise
    finally:
        dist.close()


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="The images the run was trained on (as given to `pipeline extract`); checked by data hash.")
@bn_recal_options
@run_images_options
def recalibrate(cache, data_root, bn_recal_data, bn_recal_sampler, bn_recal_passes, image_root,
                train_split, val_split, test_split, device):
    """Add post-hoc BatchNorm re-estimation features to a finished cache, from the weights it holds.

    Each method (every combination of --bn-recal-data and --bn-recal-sampler) becomes its own variant:
    bn_recal for the default (train-aug, instance, 1 pass), else bn_recal-<data>-<sampler>-x<passes>; fit
    heads on it with `pipeline fit-head --variant NAME`.  The cache is rewritten atomically; its fingerprint
    and other variants are unchanged."""
    from .cache import read_cache
    from .stage1.recalibrate import dataset_for_cache, recalibrate_cache
    c = read_cache(cache)
    check_writable_dir(Path(c.path).parent)
    ds = dataset_for_cache(c, data_root, image_root, (train_split, val_split, test_split))
    specs = _bn_recal_specs(bn_recal_data, bn_recal_sampler, bn_recal_passes)
    recalibrate_cache(c, ds, specs, device=device, log=click.echo)


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--data-root", required=True, type=click.Path(path_type=Path),
              help="The images the run was trained on (as given to `pipeline extract`); checked by data hash.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write the cache.  [default: <run>/snapshots/epoch-<e>/features.h5]")
@run_images_options
def snapshot(cache, checkpoint, data_root, out, image_root, train_split, val_split, test_split, device):
    """A cache of an earlier epoch of CACHE's run, from a CHECKPOINT it wrote (e.g. a committed in-flight one).

    BALMS's code hands its second stages the best-test-epoch weights, not the last ones: fit heads on the
    snapshot (`pipeline fit-head --cache <run>/snapshots/epoch-<e>`) to measure what that choice changes.  The
    report never reads a snapshot as the run."""
    from .cache import read_cache
    from .stage1.recalibrate import dataset_for_cache
    from .stage1.snapshot import snapshot_cache
    c = read_cache(cache)
    if not Path(checkpoint).is_file():
        raise UserError(f"no checkpoint at {checkpoint}")
    check_writable_dir(Path(out).parent if out else Path(c.path).parent, "out")
    ds = dataset_for_cache(c, data_root, image_root, (train_split, val_split, test_split))
    snapshot_cache(c, checkpoint, ds, out, device=device, log=click.echo)


@cli.command("pack-cache")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Where to write the packed features.h5.")
@click.option("--feature-dtype", type=click.Choice(FEATURE_DTYPES), default=FEATURE_DTYPES[0],
              help="float16 halves the size but moves some heads by > 0.1 point (see tests/test_cache.py).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="Add the model weights from this checkpoint.pt (must match the cache's weights hash).")
@click.option("--variant", "variants", multiple=True, metavar="NAME",
              help="Keep only this feature variant (repeatable; default: all).  A dropped one is recorded in the "
                   "provenance; `pipeline recalibrate` re-adds it from the weights.")
def pack_cache(cache, out, feature_dtype, checkpoint, variants):
    """Rewrite a cache gzip-compressed with its model weights (for shipping in git); same fingerprint."""
    from .cache import cache_file, read_cache, repack_cache
    src = cache_file(cache)
    if Path(out).resolve() == src.resolve():
        raise UserError("--out must differ from the source cache")
    check_writable_dir(Path(out).parent, "out")
    path = repack_cache(cache, out, feature_dtype, checkpoint, variants)
    c = read_cache(path)
    dropped = c.provenance.get("dropped_variants") or {}
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {feature_dtype} features, fingerprint "
               f"{c.fingerprint}, model weights {'yes' if c.model_state() else 'no'}, variants "
               f"{', '.join(c.variants)}{'; dropped ' + ', '.join(dropped) if dropped else ''})")


@cli.command()
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(cache, as_json):
    """Print a feature cache's provenance, splits and class groups (or an in-flight run's progress)."""
    import json
    from .cache import read_cache
    from .metrics import fmt_acc
    from .stage1.runinfo import cache_summary, describe, precision_history, run_progress
    run_dir = Path(cache)
    if run_dir.is_dir() and not (run_dir / "features.h5").exists() and (run_dir / "checkpoint.pt").exists():
        prog = run_progress(run_dir)
        click.echo(json.dumps(prog, default=str) if as_json else describe(prog))
        return
    s = cache_summary(read_cache(cache))
    if as_json:
        click.echo(json.dumps(s, default=str))
        return
    click.echo(f"{s['path']}  fingerprint {s['fingerprint']}")
    budget = f"{s['epochs']} epochs" + (f" x {s['steps_per_epoch']} iterations" if s["steps_per_epoch"] else "")
    limits = "".join(f", {k.replace('_', '-')} {s[k]}" for k in ("train_limit", "test_limit") if s[k])
    click.echo(f"  {s['dataset']} beta={s['imbalance']} {s['backbone']} recipe {s['recipe']}: {budget} of batch "
               f"{s['batch_size']}, augment {s['augment']}, {s['precision']}, seed {s['seed']}{limits}  "
               f"({s['data_source']})")
    if s["precision_segments"]:
        click.echo("  precision " + precision_history(s["precision_segments"], s["epochs"]))
    if s["snapshot"]:
        snap = s["snapshot"]
        click.echo(f"  SNAPSHOT: the weights of epoch {snap['epoch']} of {snap['epochs']} (`pipeline snapshot`; the "
                   f"run's cache: fingerprint {snap['source_fingerprint']})")
    click.echo(f"  commit {s['git_commit']}  torch {s['torch_version']}  created {s['created']}")
    for key, shape in s["shapes"].items():
        click.echo(f"  {key}: {shape[0]} x {shape[1]}")
    for v in s["dropped_variants"]:
        click.echo(f"  {v}: dropped when the cache was packed (`pipeline recalibrate` re-adds it)")
    for v, m in s["bn_recal_methods"].items():
        how = ("method not recorded" if not m else
               f"{m['data']}, {m['sampler']}, {m['passes']} pass(es), seed {m['seed']}"
               + (" (inferred: made before methods were recorded)" if m.get("legacy") else ""))
        click.echo(f"  {v}: BatchNorm re-estimated ({how})")
    g = s["groups"]
    click.echo(f"  classes {s['num_classes']}: Many {g['many']} / Medium {g['medium']} / Few {g['few']}; "
               f"train images {s['train_images']}")
    acc = s["final_test_accuracy"] or {}
    if acc:
        click.echo(f"  last learning-curve point (test, {s['precision']} as trained; the softmax head re-evaluates "
                   "in fp32): " + "  ".join(f"{k} {fmt_acc(acc.get(k))}" for k in ACCURACY_KEYS))


@cli.command()
@click.option("--cache-root", type=click.Path(path_type=Path), default=Path("cache"), help="Root of the caches.")
def runs(cache_root):
    """List the stage-1 runs under --cache-root: finished caches and in-flight checkpoints with progress."""
    from .stage1.runinfo import describe, list_runs
    if not Path(cache_root).is_dir():
        raise UserError(f"--cache-root {cache_root} is not a folder")
    runs = list_runs(cache_root)
    for name, progress in runs:
        click.echo(f"{name}: finished (features.h5)" if progress is None else describe(progress))
    if not runs:
        click.echo(f"no stage-1 runs under {cache_root}")

# ---- stage 2: fit-head ------------------------------------------------------------------------------


@cli.command("fit-head")
@click.option("--cache", "cache_path", required=True, type=click.Path(path_type=Path),
              help="Run folder or its features.h5 (from `pipeline extract`).")
@click.option("--head", required=True, type=LazyChoice(_heads), help="Classifier head to fit.")
@click.option("--tau", type=NONNEG, default=None,
              help="Logit-adjustment weight (>= 0). Default 0; 1 for posthoc-la.  [default: head's]")
@click.option("--variant", type=Variant(), default="plain",
              help="Feature variant: plain (as extracted), bn_recal (after BatchNorm re-estimation), or "
                   "bn_recal-<data>-<sampler>-x<passes> (another re-estimation method, `pipeline recalibrate`).")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), default=0, help="Seed of sampling and initialisation.")
@click.option("--epochs", type=POSITIVE_INT, default=None, help="Default 30 (NCM heads) / 10 (crt) / 5 (lws).")
@click.option("--batch-size", type=POSITIVE_INT, default=None, help="Default 512.")
@click.option("--lr", type=POSITIVE, default=None, help="Default 5 (NCM heads) / 0.2 (crt, lws).")
@click.option("--num-centroids", type=POSITIVE_INT, default=None, help="multi-ncm displacements K (default 20).")
@click.option("--metric", type=click.Choice(METRIC_KINDS), default=None,
              help="metric-ncm: one W or one W_y per class (default global).")
@click.option("--distance", type=click.Choice(METRIC_DISTANCES), default=None,
              help="metric-ncm: Eq. 3's squared Mahalanobis distance or its square root (default squared).")
@click.option("--p", type=TauNormP(), default=None,
              help="tau-norm exponent >= 0 (default 1), or 'auto': best of 0..2 step 0.1 on the val split.")
@click.option("--cl2n/--no-cl2n", default=None, help="ncm: centre on the train mean + L2-normalise.  [default: no]")
@click.option("--device", type=DEVICE, default="auto",
              help="auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
@click.option("--threads", type=POSITIVE_INT, default=1, show_default=True,
              help="CPU threads of a CPU fit.  1 gives the same fit on every machine (the thread count changes a "
                   "GEMM's rounding, which SGD amplifies); more is faster only at ImageNet-LT size.")
@click.option("--results", "results_path", type=click.Path(path_type=Path), default=None,
              help="results.csv to append to.  [default: <cache dir>/results.csv]")
@click.option("--eval-split", type=click.Choice(EVAL_SPLITS), default="test", help="Split to evaluate on.")
@click.option("--fit-split", type=click.Choice(FIT_SPLITS), default="train",
              help="Split the head learns from.  test = BALMS's CIFAR `train_plain` (the test images): a leak, "
                   "only to measure how published numbers were made; recorded in the row's hparams.")
def fit_head_cmd(cache_path, head, tau, variant, seed, epochs, batch_size, lr, num_centroids, metric, distance, p,
                 cl2n, device, threads, results_path, eval_split, fit_split):
    """Fit a stage-2 head on cached features, print Many/Medium/Few/All and append a results.csv row."""
    from .cache import read_cache
    from .stage2.fit import fit_head, record_fit
    from .metrics import fmt_acc
    cache = read_cache(cache_path)
    res = fit_head(cache, head, variant=variant, tau=tau, seed=seed, device=device, eval_split=eval_split,
                   threads=threads, fit_split=fit_split, epochs=epochs, batch_size=batch_size, lr=lr,
                   num_centroids=num_centroids, metric=metric, distance=distance, p=p, cl2n=cl2n)
    row = record_fit(cache, res, results_path)
    tau_s = f"  tau {res.tau:g}" if res.tau else ""
    tau_s += f"  p {res.hparams['p']:g} (chosen on val)" if res.hparams.get("p_select") == "val" else ""
    fitted = "" if fit_split == "train" else f", fitted on the {fit_split} split"
    click.echo(f"head {head}{tau_s}  cache {cache.path}  variant {variant}  ({eval_split} split{fitted})")
    click.echo(" / ".join(f"{k.capitalize()} {fmt_acc(res.acc[k])}" for k in ("many", "medium", "few", "all")))
    click.echo(f"fit {res.fit_seconds:.2f} s on {res.device}; row {row['fit_id']} -> "
               f"{results_path or cache.path.parent / 'results.csv'}")
    if fit_split != "train":
        click.echo(f"note: fitted on the {fit_split} images and evaluated on the {eval_split} images: a leak, not a "
                   "result (a diagnostic of BALMS's CIFAR `train_plain`)", err=True)
    if res.ignored:  # e.g. --epochs for ncm: harmless, but say so (and it is not recorded in hparams)
        click.echo(f"note: head {head} does not use --{', --'.join(k.replace('_', '-') for k in res.ignored)}",
                   err=True)


# ---- reports ----------------------------------------------------------------------------------------

@cli.command()
@click.option("--cache-root", default="cache", help="Folder holding <run>/features.h5 and <run>/results.csv.")
@click.option("--out", default="reports", help="Where the tables, figures and README.md are written.")
@click.option("--no-figures", is_flag=True, help="Tables and README only (no t-SNE / variance analysis).")
@click.option("--tolerance", type=NONNEG, default=1.0, help="Points within which a paper cell counts as reproduced.")
@click.option("--data-root", "data_roots", multiple=True, metavar="DATASET=DIR",
              help="Data root written into the `pipeline extract` commands of cells not run (repeatable).")
@click.option("--list-missing", is_flag=True,
              help="Only print the `pipeline extract` commands for configurations without a cache; write nothing.")
@click.option("--list-fits", is_flag=True,
              help="Only print the fits the tables and figures need, one per line: <cache dir><TAB><fit-head "
                   "options> (run_all.sh runs them); write nothing.")
@click.option("--quick", is_flag=True,
              help="With --list-fits or --fit: only the smoke-test subset (ncm, learned-ncm).")
@click.option("--force", is_flag=True,
              help="Replace a report in --out that fills more table cells or has more figures than this one.")
@click.option("--fit", "fit_first", is_flag=True,
              help="First run every fit of --list-fits in this process (one Python start; rows appended to "
                   "each cache's results.csv, as `pipeline fit-head` does), then write the report.")
@click.option("--fit-workers", type=POSITIVE_INT, default=None,
              help="With --fit: processes that fit side by side (each fit in one thread, so the rows do not "
                   "depend on it).  [default: one per CPU core; 1 when a GPU is available]")
def report(cache_root, out, no_figures, tolerance, data_roots, list_missing, list_fits, quick, force, fit_first,
           fit_workers):
    """Paper tables (ours vs published), figures and reports/README.md from the caches and fit results.

    Never loses output: refuses when --cache-root holds no cache, writes a complete new --out folder
    before swapping it in, and needs --force to replace a report with more filled cells or figures."""
    from . import report as rp  # pandas, matplotlib: only when a report is made
    roots = rp.parse_data_roots(data_roots)
    if list_missing:
        for cmd in rp.missing_extract_commands(cache_root, roots):
            click.echo(cmd)
        return
    if list_fits:
        for cache_dir, args in rp.needed_fits(cache_root, quick=quick):
            click.echo(f"{cache_dir}\t{' '.join(args)}")
        return
    if fit_first:
        rp.run_plan(rp.fit_plan(cache_root, quick=quick), echo=click.echo, workers=fit_workers)
    res = rp.build_report(cache_root, out, figures=not no_figures, tolerance=tolerance, data_roots=roots,
                          force=force)
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(res.summary())


def main(argv=None):
    cli.main(args=argv, prog_name="pipeline")


if __name__ == "__main__":
    sys.exit(main())
