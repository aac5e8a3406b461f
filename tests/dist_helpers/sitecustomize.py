"""Imported at start-up by the torchrun ranks of tests/test_distributed.py (this folder is put on their
PYTHONPATH): every os.replace -- how pipeline moves a finished file into place (utils.atomic_path) -- is
logged as "<RANK> <destination>" to $PIPELINE_TEST_WRITE_LOG, so the test can check that rank 0 alone writes."""
import os

_log = os.environ.get("PIPELINE_TEST_WRITE_LOG")
if _log:
    _replace = os.replace

    def _logged_replace(src, dst, *a, **k):
        out = _replace(src, dst, *a, **k)
        with open(_log, "a") as f:
            f.write(f"{os.environ.get('RANK', '-')} {os.fspath(dst)}\n")
        return out

    os.replace = _logged_replace
