"""Long-tailed datasets, decoded once into uint8 arrays [N, H, W, 3] (the training loop moves them to the
device and augments whole batches there).

Datasets (``DATASETS``):
  cifar10-lt, cifar100-lt, cifar20-lt   CIFAR python format (torchvision layout) or an ImageFolder root with
                                        train/<class>/NNNN.jpg and test/<class>/NNNN.jpg (NNNN = rank of the
                                        image within its class in the original order).  cifar20-lt uses
                                        CIFAR-100 images with the 20 coarse labels (paper A.2).
  imagenet-lt, places-lt, inat2018      split files (``relative/path label`` per line) + an image root
  imagefolder                           any root with train/<class>/ and test/<class>/ (val/ optional)

The long-tailed subset is exactly LDAM-DRW's (kaidic/LDAM-DRW, imbalance_cifar.py): per-class counts
n_i = int(n_max * (1/beta)^(i/(C-1))) for classes in label order; np.random.seed(subset_seed) once, then
for each class in label order np.random.shuffle its (ascending) indices and keep the first n_i.
"""
from __future__ import annotations

import functools
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import CIFAR_MEAN, CIFAR_NMAX, CIFAR_STD, IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, SUBSET_SEED
from ..utils import UserError

CIFAR_DATASETS = ("cifar10-lt", "cifar100-lt", "cifar20-lt")
SPLITFILE_DATASETS = {  # name -> default split-file names inside --data-root
    "imagenet-lt": ("ImageNet_LT_train.txt", "ImageNet_LT_val.txt", "ImageNet_LT_test.txt"),
    "places-lt": ("Places_LT_train.txt", "Places_LT_val.txt", "Places_LT_test.txt"),
    "inat2018": ("iNaturalist18_train.txt", "iNaturalist18_val.txt", None),
}
DATASETS = CIFAR_DATASETS + tuple(SPLITFILE_DATASETS) + ("imagefolder",)
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]


@dataclass
class LTDataset:
    name: str
    class_names: list
    train: Split
    test: Split
    val: Split | None = None
    imbalance: float = 1.0
    subset_seed: int = SUBSET_SEED
    source: str = ""
    mean: tuple = CIFAR_MEAN
    std: tuple = CIFAR_STD
    family: str = "cifar"  # selects training defaults and augmentation
    extra: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def train_counts(self) -> np.ndarray:
        return np.bincount(self.train.labels, minlength=self.num_classes)

    def splits(self) -> dict:
        out = {"train": self.train, "test": self.test}
        if self.val is not None:
            out["val"] = self.val
        return out


# ----------------------------------------------------------------------------------------------------
# The LDAM-DRW long-tailed profile and subset

def lt_counts(n_max: int, num_classes: int, imbalance: float) -> list:
    """Per-class image counts of the exponential profile, computed exactly as LDAM-DRW does."""
    if imbalance < 1:
        raise UserError(f"imbalance must be >= 1 (N_max/N_min; 1 = balanced), got {imbalance}")
    imb_factor = 1.0 / imbalance
    if num_classes == 1:
        return [int(n_max)]
    return [int(n_max * (imb_factor ** (i / (num_classes - 1.0)))) for i in range(num_classes)]


def ldam_subset(labels, counts, seed: int = SUBSET_SEED) -> np.ndarray:
    """Indices (into ``labels``) of the long-tailed subset; classes visited in label order."""
    labels = np.asarray(labels)
    rs = np.random.RandomState(seed)  # == np.random.seed(seed) followed by np.random.shuffle calls
    keep = []
    for c, n in enumerate(counts):
        idx = np.where(labels == c)[0]
        rs.shuffle(idx)
        keep.append(idx[:n])
    return np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# Image decoding

def _decode(path, size: int | None, resize: int | None):
    from PIL import Image
    with Image.open(path) as im:
        im = im.convert("RGB")
        if resize is not None:
            w, h = im.size
            s = resize / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
        if size is not None and im.size != (size, size):
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.uint8)


IMAGE_STORE = None  # a pipeline.stage1.store.ImageStore while one is active (`with store.active():`)


def decode_images(paths, size: int | None = None, resize: int | None = None, desc="decode") -> np.ndarray:
    """Decode image files once into a uint8 array [N, size, size, 3] (PIL releases the GIL: threads);
    through the active image store, if any (memory-mapped when these files were decoded before)."""
    if IMAGE_STORE is not None:
        return IMAGE_STORE.decode(paths, size, resize, desc, _decode_files)
    return _decode_files(paths, size, resize, desc)


def _decode_files(paths, size: int | None = None, resize: int | None = None, desc="decode") -> np.ndarray:
    from tqdm import tqdm
    paths = list(paths)
    if not paths:
        raise UserError("no images to decode")
    first = _decode(paths[0], size, resize)
    out = np.empty((len(paths),) + first.shape, dtype=np.uint8)
    out[0] = first

    def work(i):
        img = _decode(paths[i], size, resize)
        if img.shape != first.shape:
            raise UserError(f"image {paths[i]} has size {img.shape[:2]}, expected {first.shape[:2]}; "
                            "pass image_size=... to resize all images")
        out[i] = img

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
        list(tqdm(ex.map(work, range(1, len(paths))), total=len(paths) - 1, desc=desc, leave=False,
                  disable=True if len(paths) < 2000 else None, mininterval=2))
    return out


def _sort_key(p: Path):
    return (0, int(p.stem), p.name) if p.stem.isdigit() else (1, 0, p.name)


def scan_image_folder(root: Path):
    """(class_names, paths, labels) of an ImageFolder split: classes sorted, files by numeric rank."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image>")
    paths, labels = [], []
    for c, name in enumerate(classes):
        files = sorted((p for p in (root / name).iterdir() if p.suffix.lower() in IMG_EXT), key=_sort_key)
        paths += files
        labels += [c] * len(files)
    return classes, paths, np.array(labels, dtype=np.int64)


# ----------------------------------------------------------------------------------------------------
# CIFAR

def _unpickle(folder: Path, name: str):
    """One file of the CIFAR python archives (pickled with Python 2: latin1)."""
    with open(folder / name, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def _cifar_python(root: Path, which: str):
    """Read the CIFAR python pickles: (train_x, train_y, test_x, test_y, names) or None if absent."""
    if which == "cifar10":
        d = root / "cifar-10-batches-py"
        if not (d / "data_batch_1").exists():
            return None
        load = functools.partial(_unpickle, d)
        tr = [load(f"data_batch_{i}") for i in range(1, 6)]
        te = load("test_batch")
        names = load("batches.meta")["label_names"]
        tx = np.concatenate([b["data"] for b in tr])
        ty = np.concatenate([b["labels"] for b in tr])
        test_x, test_y = te["data"], np.array(te["labels"])
    else:
        d = root / "cifar-100-python"
        if not (d / "train").exists():
            return None
        load = functools.partial(_unpickle, d)
        tr, te, meta = load("train"), load("test"), load("meta")
        key = "coarse_labels" if which == "cifar20" else "fine_labels"
        names = meta["coarse_label_names" if which == "cifar20" else "fine_label_names"]
        tx, ty, test_x, test_y = tr["data"], np.array(tr[key]), te["data"], np.array(te[key])
    to_img = lambda a: np.ascontiguousarray(a.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return to_img(tx), ty.astype(np.int64), to_img(test_x), test_y.astype(np.int64), list(names)


def _cifar_download(root: Path, which: str):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if which == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
        cls(str(root), train=False, download=True)
    except Exception as e:  # network errors come in many types
        raise UserError(f"could not download {which} into {root} ({type(e).__name__}); place the CIFAR "
                        f"python archive there by hand (see README, Data)") from None


def load_cifar(name: str, root, imbalance: float, subset_seed: int = SUBSET_SEED, download=False,
               train_limit: int | None = None, test_limit: int | None = None) -> LTDataset:
    """CIFAR-10/100/20-LT from the python format or an ImageFolder of JPEGs.

    ``train_limit``/``test_limit`` keep only the first k images per class of the *source* (for tiny test
    runs); the long-tailed profile is then applied with n_max = min(n_max, k).
    """
    root = Path(root)
    which = {"cifar10-lt": "cifar10", "cifar100-lt": "cifar100", "cifar20-lt": "cifar20"}[name]
    if not root.exists() and not download:  # with download=True torchvision creates it
        raise UserError(f"data root {root} does not exist; pass the CIFAR python folder (or an ImageFolder with "
                        "train/ and test/) as data_root=..., or download=True")
    n_max = CIFAR_NMAX[name]
    if (root / "train").is_dir() and (root / "test").is_dir():
        if which == "cifar20":
            raise UserError("cifar20-lt needs the CIFAR-100 python format (coarse labels); "
                            "an ImageFolder root has fine labels only")
        names, tr_paths, tr_y = scan_image_folder(root / "train")
        te_names, te_paths, te_y = scan_image_folder(root / "test")
        if te_names != names:
            raise UserError(f"{root}/train and {root}/test have different class folders")
        n_max = min(n_max, int(np.bincount(tr_y).max()))
        tr_sel = _first_k_per_class(tr_y, train_limit)
        te_sel = _first_k_per_class(te_y, test_limit)
        counts = lt_counts(min(n_max, train_limit or n_max), len(names), imbalance)
        sub = tr_sel[ldam_subset(tr_y[tr_sel], counts, subset_seed)]
        tx = decode_images([tr_paths[i] for i in sub], desc="decode train")
        ty = tr_y[sub]
        test_x = decode_images([te_paths[i] for i in te_sel], desc="decode test")
        test_y = te_y[te_sel]
        source = f"ImageFolder {root} (JPEG)"
    else:
        got = _cifar_python(root, "cifar10" if which == "cifar10" else which)
        if got is None and download:
            _cifar_download(root, "cifar10" if which == "cifar10" else "cifar100")
            got = _cifar_python(root, which)
        if got is None:
            folder = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
            raise UserError(f"no CIFAR data in {root}: expected {root}/{folder}/ (torchvision python format) or "
                            f"{root}/train/<class>/ + {root}/test/<class>/; pass download=True to fetch it")
        tx_all, ty_all, test_x_all, test_y_all, names = got
        tr_sel = _first_k_per_class(ty_all, train_limit)
        te_sel = _first_k_per_class(test_y_all, test_limit)
        counts = lt_counts(min(n_max, train_limit or n_max), len(names), imbalance)
        sub = tr_sel[ldam_subset(ty_all[tr_sel], counts, subset_seed)]
        tx, ty, test_x, test_y = tx_all[sub], ty_all[sub], test_x_all[te_sel], test_y_all[te_sel]
        source = f"CIFAR python format {root}"
    return LTDataset(name=name, class_names=list(names), train=Split(tx, ty), test=Split(test_x, test_y),
                     imbalance=float(imbalance), subset_seed=subset_seed, source=source,
                     extra=dict(train_limit=train_limit, test_limit=test_limit))


def _first_k_per_class(labels, k):
    if k is None:
        return np.arange(len(labels))
    keep = np.concatenate([np.where(labels == c)[0][:k] for c in np.unique(labels)])
    return np.sort(keep)


# ----------------------------------------------------------------------------------------------------
# Split-file datasets (ImageNet-LT, Places-LT, iNaturalist 2018) and generic ImageFolder

def read_split_file(path):
    """(relative paths, labels int64) of a ``relative/path label`` split file."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"split file {path} does not exist; download the split lists (see README, Data)")
    paths, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise UserError(f"{path}:{n}: expected 'relative/path label', got {line.strip()!r}")
            paths.append(parts[0])
            labels.append(int(parts[1]))
    return paths, np.array(labels, dtype=np.int64)


def split_class_names(paths, labels) -> list:
    """Class names from the folder above each file (e.g. n01440764), when consistent per label."""
    num = int(labels.max()) + 1
    names = [None] * num
    for p, y in zip(paths, labels):
        parent = Path(p).parent.name
        if names[y] is None:
            names[y] = parent
        elif names[y] != parent:
            return [str(c) for c in range(num)]
    return [n if n is not None else str(c) for c, n in enumerate(names)]


def load_split_files(name: str, image_root, train_file, val_file, test_file, image_size=IMAGE_SIZE["imagenet"],
                     resize=None) -> LTDataset:
    image_root = Path(image_root)
    if not image_root.exists():
        raise UserError(f"image root {image_root} does not exist; pass image_root=... (the folder the split "
                        "files' relative paths start from)")
    splits = {}
    for split, f in (("train", train_file), ("val", val_file), ("test", test_file)):
        if f is None:
            continue
        rel, y = read_split_file(f)
        missing = [p for p in rel[:20] if not (image_root / p).exists()]
        if missing:
            raise UserError(f"{image_root / missing[0]} (from {f}) does not exist; check image_root=...")
        splits[split] = (rel, y)
    if "train" not in splits or ("test" not in splits and "val" not in splits):
        raise UserError(f"{name} needs a train split file and a test (or val) split file")
    tr_rel, tr_y = splits["train"]
    names = split_class_names(tr_rel, tr_y)
    resize = resize or int(round(image_size * 256 / 224))
    dec = {s: Split(decode_images([image_root / p for p in rel], image_size, resize, desc=f"decode {s}"), y)
           for s, (rel, y) in splits.items()}
    counts = np.bincount(tr_y, minlength=len(names))
    imb = float(counts.max() / max(counts[counts > 0].min(), 1))
    test = dec.get("test", dec.get("val"))
    return LTDataset(name=name, class_names=names, train=dec["train"], test=test,
                     val=dec.get("val") if "test" in dec else None, imbalance=imb,
                     source=f"split files under {image_root}", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     family="imagenet", extra=dict(split_files=[str(train_file), str(val_file), str(test_file)]))


def load_image_folder(root, imbalance: float, subset_seed: int = SUBSET_SEED, image_size: int | None = None,
                      family: str | None = None) -> LTDataset:
    """Any ImageFolder root (train/, test/, optional val/) made long-tailed with the LDAM profile."""
    root = Path(root)
    if not (root / "train").is_dir() or not ((root / "test").is_dir() or (root / "val").is_dir()):
        raise UserError(f"{root} is not an ImageFolder root: expected {root}/train/<class>/ and "
                        f"{root}/test/<class>/ (or val/)")
    names, tr_paths, tr_y = scan_image_folder(root / "train")
    n_max = int(np.bincount(tr_y).max())
    counts = np.minimum(lt_counts(n_max, len(names), imbalance), np.bincount(tr_y, minlength=len(names)))
    sub = ldam_subset(tr_y, counts, subset_seed)
    resize = None if image_size is None else int(round(image_size * 256 / 224))
    tx = decode_images([tr_paths[i] for i in sub], image_size, resize, desc="decode train")
    out = {}
    for split in ("val", "test"):
        if (root / split).is_dir():
            s_names, s_paths, s_y = scan_image_folder(root / split)
            if s_names != names:
                raise UserError(f"{root}/{split} and {root}/train have different class folders")
            out[split] = Split(decode_images(s_paths, image_size, resize, desc=f"decode {split}"), s_y)
    if family is None:
        family = "cifar" if tx.shape[1] <= 64 else "imagenet"
    mean, std = (CIFAR_MEAN, CIFAR_STD) if family == "cifar" else (IMAGENET_MEAN, IMAGENET_STD)
    test = out.get("test", out.get("val"))
    return LTDataset(name="imagefolder", class_names=names, train=Split(tx, tr_y[sub]), test=test,
                     val=out.get("val") if "test" in out else None, imbalance=float(imbalance),
                     subset_seed=subset_seed, source=f"ImageFolder {root}", mean=mean, std=std, family=family)


def load_dataset(name: str, data_root, imbalance: float = 100.0, subset_seed: int = SUBSET_SEED,
                 download=False, image_root=None, split_files=(None, None, None), image_size=None,
                 train_limit=None, test_limit=None) -> LTDataset:
    """Build any supported long-tailed dataset (see module docstring)."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if imbalance is not None and imbalance < 1:
        raise UserError(f"imbalance must be >= 1 (N_max/N_min; 1 = balanced), got {imbalance}")
    if data_root is None:
        raise UserError("data_root is required")
    if name in CIFAR_DATASETS:
        return load_cifar(name, data_root, imbalance, subset_seed, download, train_limit, test_limit)
    if name == "imagefolder":
        if not Path(data_root).exists():
            raise UserError(f"data root {data_root} does not exist; pass an ImageFolder root as data_root=...")
        return load_image_folder(data_root, imbalance, subset_seed, image_size)
    defaults = SPLITFILE_DATASETS[name]
    files = [Path(f) if f else (Path(data_root) / d if d else None) for f, d in zip(split_files, defaults)]
    for i in (1, 2):  # a default val/test list that is absent is optional (iNaturalist has no test list)
        if split_files[i] is None and files[i] is not None and not files[i].exists():
            files[i] = None
    return load_split_files(name, image_root or data_root, *files, image_size=image_size or IMAGE_SIZE["imagenet"])
