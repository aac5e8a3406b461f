"""Stage-2 classifier heads on frozen, cached features (paper Sec. 3.1, 4.2-4.4, 5.2, A.3; Decoupling).

Every head is one function registered by name in :data:`HEADS` (``registry.py``): it receives a
:class:`HeadData` (train/eval features already on the device) and returns a :class:`HeadOutput` (eval
predictions and the fitted parameters as numpy arrays).  ``pipeline.stage2.fit`` validates, times,
evaluates and records; nothing in this package reads or writes files.

  registry.py  Head, HEADS, register_head, the hyperparameters and their checks, HeadData, HeadOutput
  kernels.py   fp32 distances, the fused Learned-NCM / Multi-NCM losses, max_plus, the predictors
  bf16.py      the bf16-GEMM variant of the Learned-NCM loss (augmented rows) and resolve_matmul
  sgd.py       class-balanced sampling and the SGD loop every trained head shares
  linear.py    softmax, tau-norm, posthoc-la, crt, lws (heads on a linear classifier)
  ncm.py       ncm, learned-ncm, multi-ncm
  metric.py    local-projection, metric-ncm (heads that learn the distance)

Add a head: decorate ``fn(data, hp, tau) -> HeadOutput`` with ``@register_head("name", defaults=...,
uses_tau=...)`` in the family's file.  Each family file's docstring says what its heads compute.
"""
from . import linear, ncm, metric  # noqa: F401,I001  (importing a family registers its heads, in this order)
from .registry import HEADS, Head, HeadData, HeadOutput, check_hparams, register_head

__all__ = ["HEADS", "Head", "HeadData", "HeadOutput", "check_hparams", "register_head"]
