"""Small shared helpers: user errors, provenance, atomic writes."""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits non-zero, no traceback."""


_REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Commit of the toolkit's checkout (with '-dirty' when its code has uncommitted changes), or 'unknown'."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return "unknown"
        # dirty = uncommitted changes to the code that computes (not to its outputs: reports/ and cache/
        # are rewritten by the very runs that record this commit)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "pipeline",
                                "setup.cfg", "pyproject.toml", "run_all.sh", "benchmarks"], cwd=_REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_writable_dir(path, option: str = "--cache-dir") -> Path:
    """Create `path` (a directory) if needed; a clear UserError naming `option` when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {path}: {e.strerror}; choose a writable {option}") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"directory {path} is not writable; choose a writable {option}")
    return path


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"  # what --device accepts, in every command
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str = "auto"):
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' -> torch.device."""
    import torch
    if not re.fullmatch(DEVICE_PATTERN, str(device)):
        raise UserError(f"--device must be {DEVICE_HELP}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device auto or cpu")
    return torch.device(device)


@functools.lru_cache(maxsize=None)
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (AVX512-BF16 or AMX-BF16; elsewhere torch emulates
    them, slower than fp32): the one check behind stage 1's ``--precision auto`` and the stage-2 heads'
    ``matmul`` auto."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux
        flags = set()
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@contextlib.contextmanager
def atomic_path(final, suffix=""):
    """Yield a temporary path next to `final`; on success move it into place with os.replace.

    On any error the temporary file is removed and whatever was at `final` is left untouched.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
