"""The HDF5 feature cache: the one self-describing file through which stage 1, stage 2 and reports meet.

This module is the contract between the stages: the file name (:data:`CACHE_FILE`), the layout written by
:func:`write_cache` and validated by :func:`read_cache`, the provenance keys, the weights hash and the
fingerprint.  Both stages import it; it imports neither.

Layout of ``<run>/features.h5`` (schema version config.SCHEMA_VERSION)::

    attrs:  schema_version, fingerprint, provenance (JSON), and for convenience dataset, imbalance,
            subset_seed, backbone, epochs, seed, variants
    classes/names          str   [C]   class names in label order
    classes/train_counts   int64 [C]   training images per class (after the long-tailed subset)
    classes/groups         int8  [C]   0 = Many (>=100), 1 = Medium, 2 = Few (<20)
    classifier/weight      f32   [C,d] stage-1 linear classifier (the Softmax baseline)
    classifier/bias        f32   [C]
    <variant>/<split>/features  f32   [N,d]  variant: plain, bn_recal, bn_recal-<data>-<sampler>-x<passes>
                                             (config.is_variant); split in {train, val, test}
                                             (f16 where attrs feature_dtype = float16; read back as f32)
    <variant>/<split>/labels    int64 [N]
    learning_curve/<column>     per-epoch stage-1 test accuracy (epoch, lr, train_loss, all, many, ...)
    model/<state-dict key>      optional: the backbone's weights and buffers (final checkpoint, float32)

Datasets are gzip-compressed (with the byte-shuffle filter), so a shipped CIFAR cache stays a few MB.

``plain`` features come straight from the final checkpoint in eval mode; the ``bn_recal*`` variants come from
the same weights after every BatchNorm's running statistics were re-estimated on the training set (paper A.4),
each by its own method (config.BN_RECAL_*), recorded as the group's ``method`` attribute (JSON) and under
provenance ``bn_recal_methods``.  :func:`add_variants` adds or replaces variants of a finished cache.
The fingerprint is a hash of the run identity (config.run_identity: data, subset, backbone, recipe, seed)
and of the weights so that results rows can say exactly which features they were computed on; a
re-estimated variant's fingerprint (:meth:`FeatureCache.variant_fingerprint`) adds its method.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from .config import BN_RECAL_SEED, FEATURE_DTYPES, SCHEMA_VERSION, SPLITS, VARIANT_FORMS, is_variant, run_identity
from .metrics import class_groups
from .utils import UserError, atomic_path

CACHE_FILE = "features.h5"  # the cache of a stage-1 run: <cache dir>/<run>/features.h5
# provenance fields that also sit at the top level of a cache's provenance and as file attributes (older
# caches and synthetic ones carry them only there); the resolved config wins where it has them
PROVENANCE_TOP_LEVEL = ("dataset", "imbalance", "subset_seed", "backbone", "epochs", "seed")


def provenance_config(provenance: dict) -> dict:
    """The stage-1 config a provenance describes: its top-level fields overlaid with its resolved config."""
    cfg = provenance.get("config") if isinstance(provenance.get("config"), dict) else {}
    return {**{k: provenance.get(k) for k in PROVENANCE_TOP_LEVEL}, **cfg}


def fingerprint(provenance: dict) -> str:
    """Hash of what the features are: the stage-1 run identity (config.run_identity, the same contract that
    decides checkpoint resume and cache reuse) plus the hash of the trained weights.  Not where or when the
    cache was written."""
    ident = run_identity(provenance_config(provenance))
    ident["weights_sha256"] = provenance.get("weights_sha256")
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weights_sha256(weights) -> str:
    """Hash of a model's tensors (parameters and buffers; a module or its state dict): identifies the weights
    themselves, unlike the checkpoint file's hash, which also covers optimizer state and wall-clock timings."""
    state = weights.state_dict() if hasattr(weights, "state_dict") else weights
    h = hashlib.sha256()
    for k, v in sorted(state.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cache_file(path) -> Path:
    """The cache file of ``path``: a run folder (its CACHE_FILE) or the file itself."""
    path = Path(path)
    return path / CACHE_FILE if path.is_dir() else path


def run_name(dataset: str, imbalance, backbone: str, seed: int, recipe: str | None = None) -> str:
    """Folder name of a stage-1 run under cache/, e.g. cifar10-lt-b100-resnet32-paper-s0."""
    b = int(imbalance) if float(imbalance).is_integer() else imbalance
    return f"{dataset}-b{b}-{backbone}{'-' + recipe if recipe else ''}-s{seed}"


_COMPRESS = dict(compression="gzip", compression_opts=4, shuffle=True)


def describe_variant(variant: str, method: dict | None) -> str:
    """One line on how a variant's features were made (the group's ``description`` attribute)."""
    if variant == "plain":
        return "features of the final checkpoint, eval mode, no augmentation"
    if not method:
        return "same weights, BatchNorm running statistics re-estimated on the training set (method not recorded)"
    data = ("the run's training augmentation" if method["data"] == "train-aug" else "no augmentation")
    order = ("a random permutation" if method["sampler"] == "instance" else "class-balanced draws")
    return (f"same weights, BatchNorm running statistics re-estimated (cumulative average) over "
            f"{method['passes']} pass(es) of the training set in {order}, with {data} (seed {method.get('seed')})")


def write_cache(path, *, provenance: dict, class_names, train_counts, classifier_weight, classifier_bias,
                features: dict, learning_curve: dict | None = None, model_state: dict | None = None,
                feature_dtype: str = "float32", variant_methods: dict | None = None) -> Path:
    """Write a complete cache atomically.  ``features[variant][split] = (X [N,d], y [N])``; ``model_state``
    is an optional state dict (name -> array) of the backbone; ``feature_dtype`` float16 halves the size
    but is not harmless for every head (tests/test_cache.py), so shipped caches use float32.
    ``variant_methods[variant]`` is the BN re-estimation method (a JSON-able dict) of a bn_recal* variant:
    the group's ``method`` attribute and provenance ``bn_recal_methods``."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}")
    path = Path(path)
    methods = {v: m for v, m in (variant_methods or {}).items() if v in features and m}
    for variant, splits in features.items():
        if not is_variant(variant):
            raise ValueError(f"unknown feature variant {variant!r}; a variant is {VARIANT_FORMS}")
        for split in splits:
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    counts = np.asarray(train_counts, dtype=np.int64)
    prov = dict(provenance)
    if methods:  # not identity: the fingerprint is unchanged (variant_fingerprint adds the method)
        prov["bn_recal_methods"] = {v: methods[v] for v in sorted(methods)}
    else:
        prov.pop("bn_recal_methods", None)
    fp = fingerprint(prov)
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["fingerprint"] = fp
            f.attrs["provenance"] = json.dumps(prov, sort_keys=True, default=str)
            for k in PROVENANCE_TOP_LEVEL:
                if prov.get(k) is not None:
                    f.attrs[k] = prov[k]
            f.attrs["variants"] = json.dumps(_ordered(features))
            f.attrs["feature_dtype"] = feature_dtype
            g = f.create_group("classes")
            g.create_dataset("names", data=np.array([str(c) for c in class_names], dtype=h5py.string_dtype()))
            g.create_dataset("train_counts", data=counts)
            g.create_dataset("groups", data=class_groups(counts))
            g = f.create_group("classifier")
            g.create_dataset("weight", data=np.asarray(classifier_weight, dtype=np.float32))
            g.create_dataset("bias", data=np.asarray(classifier_bias, dtype=np.float32))
            for variant in _ordered(features):
                splits = features[variant]
                vg = f.create_group(variant)
                vg.attrs["description"] = describe_variant(variant, methods.get(variant))
                if variant in methods:
                    vg.attrs["method"] = json.dumps(methods[variant], sort_keys=True)
                for split, (x, y) in splits.items():
                    sg = vg.create_group(split)
                    sg.create_dataset("features", data=np.asarray(x, dtype=feature_dtype), **_COMPRESS)
                    sg.create_dataset("labels", data=np.asarray(y, dtype=np.int64), **_COMPRESS)
            if learning_curve:
                g = f.create_group("learning_curve")
                for col, values in learning_curve.items():
                    g.create_dataset(col, data=np.asarray(values, dtype=np.float64))
            if model_state:
                g = f.create_group("model")
                for k, v in model_state.items():
                    v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
                    g.create_dataset(k, data=v, **(_COMPRESS if v.ndim else {}))
    return path


def repack_cache(src, dst, feature_dtype: str = "float32", checkpoint=None, variants=None) -> Path:
    """Rewrite a cache compressed, with features stored as ``feature_dtype``, adding the model's weights from
    ``checkpoint`` (a `pipeline extract` checkpoint.pt whose weights must hash to the cache's weights_sha256).
    For shipping caches in git.  The fingerprint is unchanged: storage is not identity.  ``variants`` (names)
    keeps only those feature variants; the others go to provenance ``dropped_variants`` {name: method}
    (`pipeline recalibrate` re-adds them from the weights)."""
    c = read_cache(src, upgrade=True)
    prov = dict(c.provenance, feature_dtype=feature_dtype)
    keep = list(dict.fromkeys(variants)) if variants else list(c.variants)
    unknown = [v for v in keep if v not in c.variants]
    if unknown:
        raise UserError(f"{c.path} has no feature variant {', '.join(unknown)}; it has {', '.join(c.variants)}")
    if c.schema_version != SCHEMA_VERSION:  # upgraded: say so, keep the old fingerprint for the record
        prov.update(upgraded_from_schema=c.schema_version, upgraded_from_fingerprint=c.fingerprint)
    state = c.model_state()
    if checkpoint is not None:
        import torch
        ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if weights_sha256(ck["model"]) != prov.get("weights_sha256"):
            raise UserError(f"{checkpoint} does not hold the weights of {c.path} (weights_sha256 differs)")
        state = {k: v.contiguous() for k, v in ck["model"].items()}
    return _rewrite(c, dst, prov, feature_dtype=feature_dtype, model_state=state, keep=keep)


def _ordered(variants) -> list:
    """Variant names in display order: plain, bn_recal, then the other methods by name."""
    return sorted(variants, key=lambda v: (v != "plain", v != "bn_recal", v))


def _rewrite(c: "FeatureCache", dst, prov: dict, features: dict | None = None, methods: dict | None = None,
             feature_dtype: str | None = None, model_state=None, keep=None) -> Path:
    """Write cache ``c`` to ``dst`` (atomically) with ``prov``, its variants (those in ``keep``, default all)
    updated by ``features``; provenance ``dropped_variants`` {name: method} lists the variants it has had and lacks."""
    kept = [v for v in c.variants if keep is None or v in keep]
    all_features = {v: {s: c.split(s, v) for s in c.splits(v)} for v in kept}
    all_methods = {v: c.recorded_method(v) for v in kept}
    all_features.update(features or {})
    all_methods.update(methods or {})
    dropped = {**(prov.get("dropped_variants") or {}), **{v: c.recorded_method(v) for v in c.variants if v not in kept}}
    dropped = {v: m for v, m in dropped.items() if v not in all_features}  # a re-added variant is no longer dropped
    prov = {k: v for k, v in prov.items() if k != "dropped_variants"}
    if dropped:
        prov["dropped_variants"] = dropped
    return write_cache(dst, provenance=prov, class_names=c.class_names, train_counts=c.train_counts,
                       classifier_weight=c.classifier_weight, classifier_bias=c.classifier_bias,
                       features=all_features, learning_curve=c.learning_curve() or None,
                       model_state=model_state if model_state is not None else c.model_state(),
                       feature_dtype=feature_dtype or c.provenance.get("feature_dtype") or FEATURE_DTYPES[0],
                       variant_methods=all_methods)


def add_variants(path, features: dict, methods: dict) -> Path:
    """Add (or replace) feature variants of an existing cache, rewriting it atomically: the fingerprint, the
    weights and every other variant stay as they were.  ``features[variant][split] = (X, y)``,
    ``methods[variant]`` = the BN re-estimation method of each."""
    c = read_cache(path)
    return _rewrite(c, c.path, dict(c.provenance), features, methods)


@dataclass
class FeatureCache:
    """A validated cache; metadata is read at open, feature arrays on demand with :meth:`split`."""
    path: Path
    provenance: dict
    fingerprint: str
    class_names: list
    train_counts: np.ndarray
    groups: np.ndarray
    classifier_weight: np.ndarray
    classifier_bias: np.ndarray
    variants: list = field(default_factory=list)
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def recorded_method(self, variant: str) -> dict | None:
        """The BN re-estimation method recorded for ``variant`` (None for plain, or a cache made before
        methods were recorded)."""
        with h5py.File(self.path, "r") as f:
            m = f[variant].attrs.get("method") if variant in f else None
        return json.loads(m) if m is not None else None

    def variant_method(self, variant: str) -> dict | None:
        """How ``variant``'s features were made: the recorded method; for the "bn_recal" of a cache written
        before methods were recorded, the one method that code had (clean images, one permutation)."""
        m = self.recorded_method(variant)
        if m is None and variant == "bn_recal" and str(self.provenance.get("bn_recal_method", "")).startswith(
                "swa_utils.update_bn over a fixed permutation"):
            m = dict(data="clean", sampler="instance", passes=1, seed=BN_RECAL_SEED, legacy=True)
        return m

    def variant_fingerprint(self, variant: str) -> str:
        """What a fit on ``variant`` was computed on: the cache's fingerprint, plus the recorded method of a
        re-estimated variant (re-estimating with another method makes the earlier fits of it stale)."""
        m = self.recorded_method(variant) if variant != "plain" else None
        if not m:
            return self.fingerprint
        what = json.dumps(dict(fingerprint=self.fingerprint, variant=variant, method=m), sort_keys=True)
        return hashlib.sha256(what.encode()).hexdigest()[:16]

    def splits(self, variant: str = "plain") -> list:
        with h5py.File(self.path, "r") as f:
            return [s for s in SPLITS if f"{variant}/{s}/features" in f]

    def split(self, split: str, variant: str = "plain"):
        """(features float32 [N,d], labels int64 [N]) of one split; a UserError when absent."""
        if variant not in self.variants:
            hint = (" (add it with `pipeline recalibrate`, or `pipeline extract --bn-recalibrate`)"
                    if variant.startswith("bn_recal") else "")
            raise UserError(f"cache {self.path} has no {variant!r} features (has {self.variants}){hint}")
        with h5py.File(self.path, "r") as f:
            key = f"{variant}/{split}"
            if key not in f:
                have = [s for s in SPLITS if f"{variant}/{s}" in f]
                raise UserError(f"cache {self.path} has no {split!r} split for {variant!r} features "
                                f"(has {have})")
            return f[key]["features"][()].astype(np.float32, copy=False), f[key]["labels"][()]

    def model_state(self) -> dict | None:
        """The backbone's state dict as numpy arrays, or None when the cache does not hold it."""
        with h5py.File(self.path, "r") as f:
            if "model" not in f:
                return None
            out = {}
            f["model"].visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
            return out

    def learning_curve(self) -> dict:
        with h5py.File(self.path, "r") as f:
            if "learning_curve" not in f:
                return {}
            return {k: v[()] for k, v in f["learning_curve"].items()}


def read_cache(path, expect: dict | None = None, upgrade: bool = False) -> FeatureCache:
    """Open and validate a cache.  ``expect`` maps provenance keys to required values (None = any)."""
    path = cache_file(path)
    if not path.exists():
        raise UserError(f"no feature cache at {path}; create it with `pipeline extract` first")
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise UserError(f"{path} is not an HDF5 feature cache (unreadable); re-create it with "
                        "`pipeline extract`") from None
    with f:
        version = f.attrs.get("schema_version")
        if version is None or "provenance" not in f.attrs:
            raise UserError(f"{path} is not a feature cache written by `pipeline extract` "
                            "(no schema_version/provenance)")
        legacy = upgrade and int(version) == 1  # schema 1 = the same layout, an older fingerprint definition
        if int(version) != SCHEMA_VERSION and not legacy:
            hint = (f"; upgrade it with `pipeline pack-cache {path} --out NEW.h5`" if int(version) == 1 else "")
            raise UserError(f"{path} has cache schema version {int(version)}, this toolkit reads "
                            f"version {SCHEMA_VERSION}; re-extract it with this version{hint}")
        prov = json.loads(f.attrs["provenance"])
        stored = str(f.attrs.get("fingerprint"))
        if not legacy and fingerprint(prov) != stored:  # provenance edited, or not written by write_cache
            raise UserError(f"{path}: its fingerprint {stored} does not match its provenance "
                            f"({fingerprint(prov)}); the cache was altered -- re-create it with `pipeline extract`")
        for k, want in (expect or {}).items():
            if want is None:
                continue
            have = prov.get(k)
            same = (float(have) == float(want)) if isinstance(want, (int, float)) and have is not None \
                else have == want
            if not same:
                raise UserError(f"cache {path} was made with {k}={have!r}, but {k}={want!r} was asked for; "
                                "point to the right cache or re-extract")
        return FeatureCache(
            path=path, provenance=prov, fingerprint=str(f.attrs["fingerprint"]), schema_version=int(version),
            class_names=[s.decode() if isinstance(s, bytes) else str(s) for s in f["classes/names"][()]],
            train_counts=f["classes/train_counts"][()], groups=f["classes/groups"][()],
            classifier_weight=f["classifier/weight"][()], classifier_bias=f["classifier/bias"][()],
            variants=_ordered(k for k in f if is_variant(k) and isinstance(f[k], h5py.Group)))
