import os
import pickle
from pathlib import Path

import numpy as np
import pytest

# Real CIFAR-10 JPEGs shipped beside the project (read-only).  Tests that need them skip when they are absent
# on a developer's machine, but FAIL when the CI environment variable is set: CI always has ../shared/data,
# so a missing folder there is a broken setup, not a reason to pass silently.
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_JPEG = SHARED / "cifar10-jpeg"
SPLITS = SHARED / "splits"


def needs_data(path, what: str):
    """Mark a test that reads ``path`` (a folder): skipped without it, failed without it when CI is set."""
    return pytest.mark.needs_data(path=str(path), what=what)


needs_cifar_jpeg = needs_data(CIFAR10_JPEG / "train", "real CIFAR-10 JPEG data")
needs_splits = needs_data(SPLITS, "split files")


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_data(path, what): the test reads data under ../shared/data")


def pytest_runtest_setup(item):
    for m in item.iter_markers("needs_data"):
        path, what = m.kwargs["path"], m.kwargs["what"]
        if Path(path).is_dir():
            continue
        if os.environ.get("CI"):
            pytest.fail(f"{what} not found at {path}, and CI is set: CI must provide ../shared/data", pytrace=False)
        pytest.skip(f"{what} not found at {path}")


def tiny_dataset(num_classes=4, per_class=(12, 8, 4, 2), n_test=4, size=8, seed=0):
    """An in-memory LTDataset of random uint8 images (for fast training tests)."""
    from pipeline.stage1.data import LTDataset, Split
    rng = np.random.default_rng(seed)
    ty = np.concatenate([np.full(n, c) for c, n in enumerate(per_class)]).astype(np.int64)
    test_y = np.repeat(np.arange(num_classes), n_test).astype(np.int64)
    # class-dependent brightness so the task is learnable
    tx = (rng.integers(0, 64, (len(ty), size, size, 3)) + 40 * ty[:, None, None, None]).astype(np.uint8)
    test_x = (rng.integers(0, 64, (len(test_y), size, size, 3)) + 40 * test_y[:, None, None, None]).astype(np.uint8)
    return LTDataset(name="cifar10-lt", class_names=[f"c{i}" for i in range(num_classes)],
                     train=Split(tx, ty), test=Split(test_x, test_y), imbalance=float(per_class[0] / per_class[-1]),
                     source="tiny random test data")


def write_cifar_python(root: Path, which: str, per_class_train=10, per_class_test=3, seed=0):
    """Small synthetic data in the real CIFAR python (pickle) format, as torchvision downloads it."""
    rng = np.random.default_rng(seed)
    if which == "cifar10":
        d = root / "cifar-10-batches-py"
        d.mkdir(parents=True)
        n_cls = 10
        labels = rng.permutation(np.repeat(np.arange(n_cls), per_class_train))
        chunks = np.array_split(np.arange(len(labels)), 5)
        for i, ch in enumerate(chunks, 1):
            with open(d / f"data_batch_{i}", "wb") as f:
                pickle.dump({"data": rng.integers(0, 255, (len(ch), 3072), dtype=np.uint8),
                             "labels": labels[ch].tolist()}, f)
        tl = np.repeat(np.arange(n_cls), per_class_test)
        with open(d / "test_batch", "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(tl), 3072), dtype=np.uint8), "labels": tl.tolist()}, f)
        with open(d / "batches.meta", "wb") as f:
            pickle.dump({"label_names": [f"class{i}" for i in range(n_cls)]}, f)
        return labels
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    fine = rng.permutation(np.repeat(np.arange(100), per_class_train))
    coarse_of = np.arange(100) % 20  # any fixed fine->coarse map; 5 fine classes per coarse class
    for name, lab in (("train", fine), ("test", np.repeat(np.arange(100), per_class_test))):
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(lab), 3072), dtype=np.uint8),
                         "fine_labels": lab.tolist(), "coarse_labels": coarse_of[lab].tolist()}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f)
    return fine
