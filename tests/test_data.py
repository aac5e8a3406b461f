import numpy as np
import pytest

from pipeline.stage1.data import ldam_subset, load_cifar, load_dataset, lt_counts, read_split_file, split_class_names
from pipeline.metrics import class_groups
from pipeline.utils import UserError

from .conftest import CIFAR10_JPEG, SPLITS, needs_cifar_jpeg, needs_splits, write_cifar_python

# Paper Table 4 (A.1): per (dataset, beta): classes Many/Medium/Few, samples Many/Medium/Few, total.
# C10 beta=200 samples are garbled in the paper text ("3 151" for Medium); its Medium total is 151.
# C100 beta=10 Many samples are printed as 17743, a typo for 17443 (17443 + 2130 = 19573).
TABLE4 = {
    ("cifar10-lt", 200): ((7, 3, 0), (11052, 151, 0), 11203),
    ("cifar10-lt", 100): ((8, 2, 0), (12273, 133, 0), 12406),
    ("cifar10-lt", 10): ((10, 0, 0), (20431, 0, 0), 20431),
    ("cifar100-lt", 200): ((31, 30, 39), (7753, 1445, 304), 9502),
    ("cifar100-lt", 100): ((35, 35, 30), (8824, 1718, 305), 10847),
    ("cifar100-lt", 10): ((70, 30, 0), (17443, 2130, 0), 19573),
}


@pytest.mark.parametrize("key", sorted(TABLE4))
def test_table4_counts(key):
    dataset, beta = key
    n_max, C = (5000, 10) if dataset == "cifar10-lt" else (500, 100)
    counts = np.array(lt_counts(n_max, C, beta))
    groups = class_groups(counts)
    (classes, samples, total) = TABLE4[key]
    assert counts.sum() == total
    assert tuple(int((groups == g).sum()) for g in range(3)) == classes
    assert tuple(int(counts[groups == g].sum()) for g in range(3)) == samples


def test_lt_counts_profile():
    c = lt_counts(5000, 10, 100)
    assert c[0] == 5000 and c[-1] == 50 and all(a >= b for a, b in zip(c, c[1:]))
    assert lt_counts(500, 100, 1) == [500] * 100
    with pytest.raises(UserError):
        lt_counts(500, 100, 0.5)


def _ldam_reference(targets, img_num_per_cls, seed=0):
    """kaidic/LDAM-DRW imbalance_cifar.py gen_imbalanced_data, transcribed on a label array."""
    np.random.seed(seed)
    targets_np = np.array(targets, dtype=np.int64)
    classes = np.unique(targets_np)
    selected = []
    for the_class, the_img_num in zip(classes, img_num_per_cls):
        idx = np.where(targets_np == the_class)[0]
        np.random.shuffle(idx)
        selected.append(idx[:the_img_num])
    return np.concatenate(selected)


@pytest.mark.parametrize("beta,C,n", [(100, 10, 5000), (200, 100, 500), (10, 100, 500)])
def test_ldam_subset_matches_reference(beta, C, n):
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(C), n))  # CIFAR-like shuffled order
    counts = lt_counts(n, C, beta)
    ours = ldam_subset(labels, counts, seed=0)
    ref = _ldam_reference(labels, counts, seed=0)
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(np.bincount(labels[ours], minlength=C), counts)
    # a different subset seed gives a different subset of the same size
    other = ldam_subset(labels, counts, seed=1)
    assert len(other) == len(ours) and set(other) != set(ours)


def test_cifar_python_format_100_and_20(tmp_path):
    fine = write_cifar_python(tmp_path, "cifar100", per_class_train=10, per_class_test=3)
    ds = load_cifar("cifar100-lt", tmp_path, imbalance=5, train_limit=10)
    counts = lt_counts(10, 100, 5)
    np.testing.assert_array_equal(ds.train_counts, counts)
    assert ds.train.images.shape == (sum(counts), 32, 32, 3) and ds.train.images.dtype == np.uint8
    assert len(ds.test.labels) == 300 and ds.class_names[0] == "fine0"
    # the subset is LDAM's on the original label order
    np.testing.assert_array_equal(np.sort(ldam_subset(fine, counts)), np.sort(_ldam_reference(fine, counts)))
    ds20 = load_cifar("cifar20-lt", tmp_path, imbalance=2, train_limit=50)
    assert ds20.num_classes == 20 and ds20.class_names[3] == "coarse3"
    np.testing.assert_array_equal(ds20.train_counts, lt_counts(50, 20, 2))
    assert len(ds20.test.labels) == 300 and set(ds20.test.labels) == set(range(20))


def test_cifar10_python_format(tmp_path):
    write_cifar_python(tmp_path, "cifar10", per_class_train=20, per_class_test=2)
    ds = load_dataset("cifar10-lt", tmp_path, imbalance=4, train_limit=20)
    np.testing.assert_array_equal(ds.train_counts, lt_counts(20, 10, 4))
    assert ds.test.images.shape == (20, 32, 32, 3)


def test_missing_and_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_dataset("cifar10-lt", tmp_path / "nope")
    with pytest.raises(UserError, match="download=True"):
        load_dataset("cifar100-lt", tmp_path)
    with pytest.raises(UserError, match="download=True"):
        load_dataset("cifar10-lt", tmp_path / "new")


def test_download_into_a_folder_that_does_not_exist_yet(tmp_path, monkeypatch):
    """`--data-root data/cifar10 --download` on a fresh clone: the folder is made by the download, not refused."""
    from pipeline.stage1 import data
    monkeypatch.setattr(data, "_cifar_download", lambda root, which: write_cifar_python(root, which, 20, 2))
    ds = load_dataset("cifar10-lt", tmp_path / "new" / "cifar10", imbalance=4, download=True)
    assert (tmp_path / "new" / "cifar10" / "cifar-10-batches-py").is_dir() and len(ds.test.labels) == 20
    with pytest.raises(UserError, match="unknown dataset"):
        load_dataset("mnist-lt", tmp_path)
    with pytest.raises(UserError, match=">= 1"):
        load_dataset("cifar10-lt", tmp_path, imbalance=0.5)


@needs_cifar_jpeg
def test_cifar10_jpeg_subset_is_ldam():
    ds = load_cifar("cifar10-lt", CIFAR10_JPEG, imbalance=100, train_limit=100, test_limit=5)
    counts = lt_counts(100, 10, 100)
    np.testing.assert_array_equal(ds.train_counts, counts)
    assert ds.class_names[0] == "airplane" and ds.class_names[-1] == "truck"
    assert ds.train.images.shape[1:] == (32, 32, 3) and len(ds.test.labels) == 50


@needs_splits
def test_real_split_files():
    paths, labels = read_split_file(SPLITS / "ImageNet_LT" / "ImageNet_LT_test.txt")
    assert len(paths) == 50000 and labels.max() == 999
    assert np.all(np.bincount(labels) == 50)
    _, vlab = read_split_file(SPLITS / "ImageNet_LT" / "ImageNet_LT_val.txt")
    assert np.all(np.bincount(vlab) == 20)
    names = split_class_names(paths, labels)
    assert names[0] == "n01440764" and len(set(names)) == 1000
    tr_paths, tr = read_split_file(SPLITS / "Places_LT" / "Places_LT_train.txt")
    counts = np.bincount(tr)
    assert len(tr) == 62500 and len(counts) == 365 and counts.max() == 4980 and counts.min() == 5
    assert split_class_names(tr_paths, tr)[0] == "airfield"


def test_split_file_dataset_and_imagefolder(tmp_path):
    """Split-file reader and ImageFolder path end to end on tiny generated PNGs."""
    from PIL import Image
    rng = np.random.default_rng(0)
    lines = {"train": [], "test": []}
    for split, per in (("train", (6, 3, 2)), ("test", (2, 2, 2))):
        for c, n in enumerate(per):
            d = tmp_path / "img" / split / f"cls{c}"
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(d / f"{i}.png")
                lines[split].append(f"{split}/cls{c}/{i}.png {c}")
    for split in lines:
        (tmp_path / f"{split}.txt").write_text("\n".join(lines[split]) + "\n")
    ds = load_dataset("places-lt", tmp_path, image_root=tmp_path / "img",
                      split_files=(tmp_path / "train.txt", None, tmp_path / "test.txt"), image_size=16)
    assert ds.train.images.shape == (11, 16, 16, 3) and ds.class_names == ["cls0", "cls1", "cls2"]
    assert ds.imbalance == 3.0 and ds.family == "imagenet"
    (tmp_path / "bad.txt").write_text("only-a-path\n")
    with pytest.raises(UserError, match="expected 'relative/path label'"):
        read_split_file(tmp_path / "bad.txt")
    folder = load_dataset("imagefolder", tmp_path / "img", imbalance=3, image_size=16)
    np.testing.assert_array_equal(folder.train_counts, [6, 3, 2])  # capped by what exists
    assert folder.test.images.shape == (6, 16, 16, 3)
