"""A stage-1 run folder's checkpoint and learning curve, and the identity check that decides whether a
checkpoint (or cache) may be resumed (or reused) by a configuration.

The checkpoint is one ``torch.save`` dict with the keys of :data:`CHECKPOINT_KEYS`; a resumed run must
load every checkpoint written since schema 2 (tests/test_checkpoints.py), so these keys do not change.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ACCURACY_KEYS, RUN_IDENTITY, run_identity
from ..utils import UserError, atomic_path

CHECKPOINT_FILE = "checkpoint.pt"
CURVE_FILE = "learning_curve.csv"
# `extract --keep-best-test`: the checkpoint of the evaluated epoch with the best test accuracy so far, what
# BALMS's code hands its second stages (state_dict_best); optimistic, for `pipeline snapshot` only, so it is
# written without the optimizer's momentum (half the size of a checkpoint.pt)
BEST_TEST_FILE = "best_test_checkpoint.pt"
CHECKPOINT_KEYS = ("model", "optimizer", "generator", "epoch", "curve", "identity", "config", "torch",
                   "precision_segments")
CURVE_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", *ACCURACY_KEYS, "seconds")


def identity_diff(have: dict, want: dict, allow_precision_change=False) -> dict:
    """{key: (have, want)} for the config.RUN_IDENTITY keys that differ (compared as JSON stores them);
    with ``allow_precision_change`` a different training precision alone is no difference."""
    want = json.loads(json.dumps(run_identity(want)))
    diff = {k: (have.get(k), want.get(k)) for k in RUN_IDENTITY if have.get(k) != want.get(k)}
    if allow_precision_change:
        diff.pop("precision", None)
    return diff


def refusal(what, diff) -> str:
    """The error message refusing ``what`` (a checkpoint) trained with another identity (``diff``)."""
    msg = f"{what} was trained with a different configuration or data (have, asked): {diff}; "
    if set(diff) == {"precision"}:  # e.g. a bf16 run resumed on a CPU without native bf16
        have, want = diff["precision"]
        return msg + (f"pass precision={have!r}, or allow_precision_change=True to continue it in {want} "
                      "(recorded in its provenance as precision_segments)")
    return msg + "use another run=... or overwrite=True"


def load_checkpoint(path: Path, cfg: dict, allow_precision_change=False) -> dict | None:
    """The checkpoint at ``path`` (None when there is none), refused unless it has ``cfg``'s run identity."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it or pass "
                        "overwrite=True to retrain") from None
    diff = identity_diff(ckpt.get("identity") or {}, cfg, allow_precision_change)
    if diff:
        raise UserError(refusal(f"checkpoint {path}", diff))
    return ckpt


def save_checkpoint(path: Path, model, opt, gen, epoch: int, rows: list, ident: dict, cfg: dict):
    """Write the checkpoint atomically (the keys of CHECKPOINT_KEYS, in that order).  ``opt`` None writes
    ``optimizer`` None: a weights-only file (BEST_TEST_FILE, which is snapshotted, never resumed), half the size."""
    state = dict(model=model.state_dict(), optimizer=opt.state_dict() if opt is not None else None,
                 generator=gen.get_state(),
                 epoch=epoch, curve=rows, identity=ident, config=cfg, torch=torch.__version__,
                 precision_segments=cfg.get("precision_segments"))
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def write_curve(path: Path, rows: list):
    """learning_curve.csv: one row per epoch, columns CURVE_COLUMNS."""
    import pandas as pd
    with atomic_path(path, suffix=".csv") as tmp:
        pd.DataFrame(rows, columns=list(CURVE_COLUMNS)).to_csv(tmp, index=False)
