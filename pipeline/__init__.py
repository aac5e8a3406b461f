"""Learned Nearest-Class-Mean long-tailed recognition: stage 1 (extract), stage 2 (fit-head), reports.

The Python API (pipeline/api.py): ``from pipeline import read_cache, fit_head, load_results, extract,
load_dataset``; imported on first use, so ``import pipeline`` stays light (no torch).
"""
__version__ = "0.1.0"

_API = {"read_cache": "pipeline.cache", "fit_head": "pipeline.stage2.fit", "load_results": "pipeline.api",
        "extract": "pipeline.stage1.extract", "load_dataset": "pipeline.stage1.data", "HEADS": "pipeline.stage2.heads"}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
