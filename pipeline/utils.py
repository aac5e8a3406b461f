"""Small shared helpers: user errors, provenance, atomic writes (files and folders), a lock without a lock file."""
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
    """Bad input from the user: the CLI prints the message on one line and exits non-zero, no traceback.

    Messages are in the library's words: an argument is named as the Python caller writes it, the subject
    alone (``tau must be >= 0``) or ``name=value`` in what to do (``overwrite=True``, ``precision='bf16'``,
    ``results_path=...``).  The CLI shows each ``name=value`` whose name is one of its command's options as
    that flag (``--overwrite``, ``--precision bf16``, ``--results``); see ``pipeline.cli.in_cli_words``."""


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


def check_writable_dir(path, arg: str = "cache_dir") -> Path:
    """Create `path` (a directory) if needed; a clear UserError naming the argument `arg` when that is
    impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create directory {path}: {e.strerror}; choose a writable {arg}=...") from None
    if not os.access(path, os.W_OK):
        raise UserError(f"directory {path} is not writable; choose a writable {arg}=...")
    return path


DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"  # what --device accepts, in every command
DEVICE_HELP = "auto, cpu, cuda or cuda:N"


def resolve_device(device: str = "auto"):
    """'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N' -> torch.device."""
    import torch
    if not re.fullmatch(DEVICE_PATTERN, str(device)):
        raise UserError(f"device must be {DEVICE_HELP}, got {device!r}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={device!r} asks for CUDA, but no CUDA device is available; use device='auto' or "
                        "device='cpu'")
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


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status), else by the
    set-and-restore idiom."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final, suffix=""):
    """Yield a temporary path next to `final`; on success move it into place with os.replace.

    On any error the temporary file is removed and whatever was at `final` is left untouched.  The file
    gets the mode a plain ``open(final, "w")`` would give a new file (0666 less the umask), not mkstemp's
    private 0600, so that lab-mates on a shared server can read results, reports and caches.
    """
    final = Path(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=suffix + ".tmp", dir=final.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where that is not available."""
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return rc == 0


@contextlib.contextmanager
def atomic_dir(final):
    """Yield an empty temporary folder next to `final`; on success swap it in for `final` in one step.

    Where the kernel can exchange two paths atomically (Linux renameat2) there is no moment without a
    complete `final`; elsewhere the old folder is renamed aside first and restored if the second rename
    fails.  On any error while the folder is being filled, the temporary folder is removed and `final` is
    untouched.  The new folder gets the mode of a plain ``mkdir`` (0777 less the umask).
    """
    import shutil
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.new-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        yield tmp
        if not final.exists():
            os.rename(tmp, final)
            return
        if _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
            return
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rmdir(old)
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def dir_lock(directory):
    """Exclusive advisory lock on a folder itself (flock on its descriptor; POSIX), so no lock file is
    left behind; a no-op where fcntl is unavailable.  For writers that replace a file in that folder with
    os.replace (the file's own inode changes, so it cannot carry the lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the block with ``torch.set_num_threads(n)``, then restore the previous count.  Stage-2 CPU fits run
    in a fixed number of threads (default 1) because the count changes how GEMMs split their sums, and SGD
    carries a last-bit difference into a different fit (multi-ncm's Medium moved by 1.0 point between 1 and
    2 threads on the 2,000-iteration cache)."""
    import torch
    prev = torch.get_num_threads()
    if n != prev:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != prev:
            torch.set_num_threads(prev)


def _fp32_precision_settings():
    """The objects of torch's per-backend ``fp32_precision`` API (torch >= 2.9) that exist in this build."""
    import torch
    b = torch.backends
    objs = [b, getattr(b.cuda, "matmul", None), b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None),
            b.mkldnn, getattr(b.mkldnn, "matmul", None), getattr(b.mkldnn, "conv", None), getattr(b.mkldnn, "rnn", None)]
    return [o for o in objs if o is not None and hasattr(o, "fp32_precision")]


@contextlib.contextmanager
def fp32_matmul():
    """Pin true fp32 matmuls and convolutions inside the block, then restore the previous settings.

    ``torch.set_float32_matmul_precision("high")`` (or NGC containers' TORCH_ALLOW_TF32_CUBLAS_OVERRIDE) makes
    CUDA fp32 GEMMs TF32 (10-bit mantissa), and cuDNN's TF32 flag (on by default) makes fp32 convolutions
    TF32: the ||x||^2 - 2 x.mu + ||mu||^2 distances then carry ~2^-11 ||x|| ||mu|| of error and "fp32"
    feature extraction is not fp32 (on torch >= 2.9, "medium" also makes oneDNN's CPU fp32 matmuls bf16).
    Stage-2 fits and feature extraction run inside this block.

    torch >= 2.9: every backend's ``fp32_precision`` is set to "ieee" and restored (only the new API is
    touched: reading the legacy flags after mixing the two APIs raises); older torch:
    ``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32`` and
    ``set_float32_matmul_precision("highest")``.  Also keeps cuBLAS from reducing bf16 GEMMs' partial sums
    in bf16 (``allow_bf16_reduced_precision_reduction``; the explicit bf16 GEMMs of ``matmul bf16``)."""
    import torch
    with _no_reduced_bf16_reduction():
        with _fp32_settings():
            yield


@contextlib.contextmanager
def _no_reduced_bf16_reduction():
    """cuBLAS may reduce bf16 GEMMs' partial sums in bf16 unless this flag is off (torch's default is on)."""
    import torch
    m = torch.backends.cuda.matmul
    saved = getattr(m, "allow_bf16_reduced_precision_reduction", None)
    if saved is None:
        yield
        return
    try:
        m.allow_bf16_reduced_precision_reduction = False
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction = saved


@contextlib.contextmanager
def _fp32_settings():
    import torch
    objs = _fp32_precision_settings()
    if objs:
        saved = [o.fp32_precision for o in objs]
        try:
            for o in objs:
                o.fp32_precision = "ieee"
            yield
        finally:
            for o, v in zip(objs, saved):
                o.fp32_precision = v
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        yield
    finally:
        # the precision string first: setting it also sets matmul.allow_tf32, which is then restored exactly
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cuda.matmul.allow_tf32 = saved[0]
        torch.backends.cudnn.allow_tf32 = saved[1]
