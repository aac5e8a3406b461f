"""What a stage-1 run folder holds: a finished cache (its summary, `pipeline info`) or a run in flight (a
checkpoint.pt and no cache yet: epoch e/N and the time left at the recent epochs' pace, `pipeline runs`)."""
from __future__ import annotations

import math
from pathlib import Path

from .pause import fmt_duration

PACE_EPOCHS = 10  # the time left is estimated from the mean duration of the last 10 epochs


def precision_history(segments, epochs) -> str:
    """'bf16 for epochs 1-380, fp32 for 381-591' from a run's precision_segments ([[epochs done before the
    segment, precision], ...]), in the 1-based epoch numbers of the logs and learning curves."""
    parts = []
    for i, (start, prec) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else epochs
        span = f"{int(start) + 1}–{int(end)}" if end else f"{int(start) + 1} on"
        parts.append(f"{prec} for {'epochs ' if i == 0 else ''}{span}")
    return ", ".join(parts)


def run_progress(run_dir) -> dict | None:
    """Progress of the stage-1 run in ``run_dir`` from its checkpoint (None when it has none)."""
    import torch
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.exists():
        return None
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    cfg, curve = ck.get("config") or {}, ck.get("curve") or []
    epoch, epochs = int(ck["epoch"]), int(cfg.get("epochs") or ck["epoch"])
    recent = [float(r["seconds"]) for r in curve[-PACE_EPOCHS:] if r.get("seconds") is not None]
    pace = sum(recent) / len(recent) if recent else None
    tested = [r for r in curve if r.get("all") is not None and not math.isnan(float(r["all"]))]
    return dict(run=run_dir.name, epoch=epoch, epochs=epochs, finished_training=epoch >= epochs,
                has_cache=(run_dir / "features.h5").exists(), seconds_per_epoch=pace,
                eta_seconds=pace * (epochs - epoch) if pace is not None else None,
                precision=cfg.get("precision"), precision_segments=ck.get("precision_segments"),
                last_test=dict(epoch=tested[-1]["epoch"], all=tested[-1]["all"]) if tested else None,
                iterations=cfg.get("iterations"), steps_per_epoch=cfg.get("steps_per_epoch"))


def list_runs(cache_root) -> list[tuple[str, dict | None]]:
    """(run name, progress) of every stage-1 run folder under ``cache_root``, sorted by name: progress None
    for a finished run (its features.h5 exists; its checkpoint, if kept, is not read), run_progress for one
    in flight (a checkpoint.pt and no cache yet).  Folders with neither are not runs."""
    root = Path(cache_root)
    runs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if (d / "features.h5").exists():
            runs.append((d.name, None))
        elif (d / "checkpoint.pt").exists():
            runs.append((d.name, run_progress(d)))
    return runs


def in_flight(cache_root) -> list[dict]:
    """Progress of every run under ``cache_root`` that has a checkpoint but no features.h5 yet."""
    return [p for _, p in list_runs(cache_root) if p is not None]


def describe(p: dict) -> str:
    """One line: 'RUN: in flight, epoch e/N (x%), ~T left at S s/epoch (the last 10 epochs' pace) ...'."""
    pct = 100.0 * p["epoch"] / max(1, p["epochs"])
    if p["finished_training"]:
        line = f"{p['run']}: training finished ({p['epoch']}/{p['epochs']} epochs), features not extracted yet"
    else:
        line = f"{p['run']}: in flight, epoch {p['epoch']}/{p['epochs']} ({pct:.0f}%)"
        if p["eta_seconds"] is not None:
            line += (f", ~{fmt_duration(p['eta_seconds'])} left at {p['seconds_per_epoch']:.0f} s/epoch "
                     f"(the last epochs' pace on the machine that ran them)")
    if p["last_test"]:
        line += f"; test All {p['last_test']['all']:.1f} at epoch {p['last_test']['epoch']}"
    if p["precision_segments"]:
        line += "; precision " + precision_history(p["precision_segments"], p["epochs"])
    return line


def cache_summary(cache) -> dict:
    """The facts `pipeline info` prints about a finished cache (a FeatureCache), as plain JSON types."""
    p, cfg = cache.provenance, cache.provenance.get("config") or {}
    n = [int((cache.groups == g).sum()) for g in range(3)]
    shapes = {f"{v}/{s}": list(cache.split(s, v)[0].shape) for v in cache.variants for s in cache.splits(v)}
    return dict(
        path=str(cache.path), fingerprint=cache.fingerprint, dataset=p.get("dataset"),
        imbalance=p.get("imbalance"), backbone=p.get("backbone"), seed=p.get("seed"), recipe=cfg.get("recipe"),
        epochs=p.get("epochs"), iterations=cfg.get("iterations"), steps_per_epoch=cfg.get("steps_per_epoch"),
        batch_size=cfg.get("batch_size"), augment=cfg.get("augment"), precision=cfg.get("precision"),
        precision_segments=cfg.get("precision_segments"), train_limit=cfg.get("train_limit"),
        test_limit=cfg.get("test_limit"), data_source=p.get("data_source"), git_commit=p.get("git_commit"),
        torch_version=p.get("torch_version"), created=p.get("created"), device=p.get("device"),
        variants=list(cache.variants), shapes=shapes, num_classes=int(cache.num_classes),
        groups=dict(many=n[0], medium=n[1], few=n[2]), train_images=int(cache.train_counts.sum()),
        bn_recal_methods={v: cache.variant_method(v) for v in cache.variants if v != "plain"},
        final_test_accuracy=p.get("final_test_accuracy"), snapshot=p.get("snapshot"),
        dropped_variants=sorted(p.get("dropped_variants") or {}))
