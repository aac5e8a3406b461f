"""tests/conftest.py's data markers: skipped on a developer machine without ../shared/data, failed in CI."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROBE_CONFTEST = "from tests.conftest import pytest_configure, pytest_runtest_setup  # noqa: F401\n"
PROBE = '''
from tests.conftest import needs_data

@needs_data("{missing}", "probe data")
def test_probe():
    pass
'''


@pytest.mark.parametrize("ci", [False, True])
def test_missing_shared_data_fails_in_ci_and_skips_elsewhere(tmp_path, ci):
    (tmp_path / "conftest.py").write_text(PROBE_CONFTEST)
    (tmp_path / "test_probe.py").write_text(PROBE.format(missing=tmp_path / "nope"))
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(PYTHONPATH=str(REPO), **({"CI": "1"} if ci else {}))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(tmp_path)],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    if ci:
        assert r.returncode == 1 and "1 error" in r.stdout and "CI must provide" in r.stdout, r.stdout
    else:
        assert r.returncode == 0 and "1 skipped" in r.stdout and "probe data not found" in r.stdout, r.stdout
