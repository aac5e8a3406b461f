"""run_all.sh --time-limit: only with --extract-missing, and a duration it can read (checked before any work)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("args,needle", [(["--time-limit", "5m"], "add --extract-missing"),
                                         (["--extract-missing", "--time-limit", "soon"], "must look like")])
def test_run_all_time_limit_is_checked_first(tmp_path, args, needle):
    r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--python", sys.executable, "--cache-root",
                        str(tmp_path / "c"), "--out", str(tmp_path / "out"), *args],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and needle in r.stderr, r.stdout + r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "c").exists()
