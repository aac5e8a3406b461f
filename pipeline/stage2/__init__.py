"""Stage 2, `pipeline fit-head`: fit a classifier head on the frozen features of a stage-1 cache, evaluate it,
and record the fit.

  heads   the head registry, the distance kernels, one module per head family
  fit     validation, the fit itself on the chosen device, results.csv rows and fit artifacts

It reads stage 1's output only through pipeline/cache.py.
"""
