"""The `--baseline REV` checkout the benchmarks time this checkout against."""
from __future__ import annotations

import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def baseline_checkout(rev: str):
    """A directory holding ``rev``: the path itself when it is a checkout, else a detached `git worktree` of
    that commit in a temporary folder, removed on exit."""
    if Path(rev).is_dir():
        yield Path(rev).resolve()
        return
    with tempfile.TemporaryDirectory(prefix="baseline-") as tmp:
        path = Path(tmp) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(path), rev], cwd=REPO, check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
