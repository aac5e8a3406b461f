"""run_all.sh speed: the fits of each cache from one Python start (`pipeline report --fit`, the default) against one
`pipeline fit-head` process per fit (`--per-fit-processes`, how run_all.sh worked before), in one run; or,
with --baseline REV, this checkout's run_all.sh against REV's (a commit, checked out into a temporary
`git worktree`, or the path of a checkout), both in their default mode.

Each mode starts from a fresh copy of the caches' features.h5 (no results.csv: every fit runs, as on a fresh
clone), into its own temporary cache root and report folder; the modes alternate over --repeat rounds.
Prints the wall time of each run, the ratio old / new, and whether both modes gave the same results rows
(fit ids and accuracies) and tables.  A benchmark, not a test: numbers depend on the machine and its load
(the load average is printed before and after).

    python benchmarks/run_all_speed.py                      # the shipped cache(s) under cache/
    python benchmarks/run_all_speed.py --quick --no-figures # smoke run (3 fits per cache, tables only)
    python benchmarks/run_all_speed.py --baseline 268a4ac --repeat 3   # this checkout against a commit
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import pandas as pd
from baseline import baseline_checkout  # benchmarks/baseline.py

REPO = Path(__file__).resolve().parent.parent
KEY = ["fit_id", "head", "variant", "tau", "hparams", "acc_all", "acc_many", "acc_medium", "acc_few"]


def fresh_root(src: Path, dst: Path) -> Path:
    for h5 in sorted(src.glob("*/features.h5")):
        (dst / h5.parent.name).mkdir(parents=True)
        shutil.copy2(h5, dst / h5.parent.name / "features.h5")
    return dst


def run(mode: str, root: Path, out: Path, args, checkout: Path = REPO) -> float:
    cmd = ["bash", str(checkout / "run_all.sh"), "--python", args.python, "--cache-root", str(root),
           "--out", str(out)]
    cmd += (["--quick"] if args.quick else []) + (["--no-figures"] if args.no_figures else [])
    if mode == "old" and checkout == REPO:
        cmd.append("--per-fit-processes")
    env = dict(os.environ, PYTHONPATH=str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{mode}: run_all.sh failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    starts = r.stdout.count("==> [")
    what = ("one start: report --fit" if mode == "new" else "one fit-head process per fit" if checkout == REPO
            else f"baseline {args.baseline}")
    print(f"  {mode:>3} ({what}): {dt:7.1f} s, {starts} step(s)", flush=True)
    return dt


def rows(root: Path) -> pd.DataFrame:
    frames = [pd.read_csv(p, dtype=str, keep_default_na=False)[KEY].assign(run=p.parent.name)
              for p in sorted(root.glob("*/results.csv"))]
    return pd.concat(frames, ignore_index=True).sort_values(["run", "fit_id"]).reset_index(drop=True)


def tables(out: Path, root: Path) -> dict:
    return {p.name: p.read_text().replace(str(root), "<root>") for p in sorted(out.glob("table*.csv"))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-root", type=Path, default=REPO / "cache")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--quick", action="store_true", help="run_all.sh --quick (3 fits per cache)")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--repeat", type=int, default=1, help="rounds (old then new, alternating which goes first)")
    ap.add_argument("--baseline", default=None, metavar="REV",
                    help="old = run_all.sh of this commit (or checkout path), instead of --per-fit-processes")
    args = ap.parse_args(argv)
    if os.sep in args.python:  # the runs' working directory is the checkout they time
        args.python = os.path.abspath(args.python)
    if not list(args.cache_root.glob("*/features.h5")):
        sys.exit(f"no caches under {args.cache_root}/*/features.h5")
    print(f"caches: {', '.join(p.parent.name for p in sorted(args.cache_root.glob('*/features.h5')))}; "
          f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
    times = {"old": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="run_all_speed-") as tmp, \
            (baseline_checkout(args.baseline) if args.baseline else nullcontext(REPO)) as old_checkout:
        same = rounds(args, Path(tmp), old_checkout, times)
    print(f"medians: old {statistics.median(times['old']):.1f} s, new {statistics.median(times['new']):.1f} s")
    old, new = min(times["old"]), min(times["new"])
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"run_all.sh wall time (best of {args.repeat}): old {old:.1f} s, new {new:.1f} s; "
          f"ratio old / new = {old / new:.2f}x")
    return 0 if same else 1


def rounds(args, tmp: Path, old_checkout: Path, times: dict) -> bool:
    """Old and new alternately (which goes first alternates), each on a fresh copy of the caches; appends
    the wall times to ``times``; whether every round gave the same results rows and tables."""
    same = True
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}:")
        got = {}
        for mode in (("old", "new") if i % 2 == 0 else ("new", "old")):
            base = Path(tmp) / f"{mode}{i}"
            root = fresh_root(args.cache_root, base / "cache")
            times[mode].append(run(mode, root, base / "reports", args, old_checkout if mode == "old" else REPO))
            got[mode] = (rows(root), tables(base / "reports", root))
        ok_rows = got["old"][0].equals(got["new"][0])
        ok_tables = got["old"][1] == got["new"][1]
        same &= ok_rows and ok_tables
        print(f"  same results rows: {'yes' if ok_rows else 'NO'}; same tables: {'yes' if ok_tables else 'NO'}")
    return same


if __name__ == "__main__":
    sys.exit(main())
