"""Decode-once image store: every list of image files decoded by pipeline.data is kept as a uint8 .npy array
under ``<cache-dir>/images/<key>/`` and memory-mapped on the next run (no JPEG is decoded again).

Key: what was decoded -- each file's absolute path, byte size and modification time (ns), the decode
parameters (side, shorter-side resize), the store format and the Pillow version that decoded it.  A
re-encoded or touched file, another subset, another --image-size gives another key (the old entry is never
used for it).  The run identity is still ``data_hash``, the hash of the decoded pixels, computed from the
arrays at every run, so a store can never make a checkpoint or cache pass for other pixels.

An entry is ``images.npy`` (numpy format) plus ``meta.json``, each written to a temporary name and moved
into place with os.replace, meta last: an entry without meta was interrupted.  Reuse requires meta's key,
count, shape and decode parameters to match, the .npy header to declare that shape and dtype, and the file
to hold exactly header + data bytes; otherwise the entry is rebuilt (one log line says why), never trusted.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..utils import atomic_path, now_iso

STORE_FORMAT = 1


def _pillow_version() -> str:
    import PIL
    return PIL.__version__


class ImageStore:
    def __init__(self, root, log=print):
        self.root = Path(root)
        self.log = log
        self.events = []  # (key, "reused" | "built", n) per decode call, for provenance and tests

    def key(self, paths, size, resize) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(json.dumps(dict(format=STORE_FORMAT, size=size, resize=resize, pillow=_pillow_version()),
                            sort_keys=True).encode())
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    @contextlib.contextmanager
    def active(self):
        """Route pipeline.stage1.data.decode_images through this store inside the block."""
        from . import data
        before, data.IMAGE_STORE = data.IMAGE_STORE, self
        try:
            yield self
        finally:
            data.IMAGE_STORE = before

    def summary(self) -> dict:
        return dict(root=str(self.root), entries=[dict(key=k, status=s, images=n) for k, s, n in self.events])

    # ------------------------------------------------------------------------------------------------
    def decode(self, paths, size, resize, desc, decode_fn) -> np.ndarray:
        """The decoded uint8 array of ``paths``: memory-mapped from a valid entry, else decoded with
        decode_fn(paths, size, resize, desc) and stored."""
        paths = list(paths)
        if not paths:
            return decode_fn(paths, size, resize, desc)
        key = self.key(paths, size, resize)
        entry = self.root / key
        arr, why = self.open(entry, key, len(paths), size, resize)
        if arr is not None:
            self.log(f"image store: {desc}: {len(paths)} images memory-mapped from {entry} (no decode)")
            self.events.append((key, "reused", len(paths)))
            return arr
        if why:
            self.log(f"image store: {entry} is not usable ({why}); decoding again and rebuilding it")
        arr = decode_fn(paths, size, resize, desc)
        self.write(entry, key, arr, size, resize)
        self.log(f"image store: {desc}: decoded {len(paths)} images into {entry} "
                 f"({arr.nbytes / 2 ** 20:.1f} MiB)")
        self.events.append((key, "built", len(paths)))
        return arr

    def open(self, entry: Path, key: str, n: int, size, resize):
        """(memory-mapped array, None) for a valid entry, else (None, reason); reason '' when absent."""
        meta_path, npy = entry / "meta.json", entry / "images.npy"
        if not meta_path.exists() and not npy.exists():
            return None, ""
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None, "meta.json missing or unreadable"
        want = dict(format=STORE_FORMAT, key=key, n=n, size=size, resize=resize)
        bad = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
        if bad:
            return None, f"meta.json does not match (have, want): {bad}"
        try:
            with open(npy, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0,
                        (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read is None:
                    raise ValueError(f"npy format {version}")
                shape, fortran, dtype = read(f)
                offset = f.tell()
        except (OSError, ValueError) as e:
            return None, f"images.npy header unreadable ({type(e).__name__})"
        if fortran or dtype != np.uint8 or list(shape) != list(meta.get("shape", [])) or shape[0] != n:
            return None, f"images.npy holds {dtype} {shape}, meta.json says uint8 {meta.get('shape')}"
        expect = offset + int(np.prod(shape))
        have = npy.stat().st_size
        if have != expect:
            return None, f"images.npy has {have} bytes, expected {expect} (truncated or overwritten)"
        # copy-on-write: writable for torch.from_numpy, pages read lazily, the file is never modified
        return np.load(npy, mmap_mode="c"), None

    def write(self, entry: Path, key: str, arr: np.ndarray, size, resize):
        entry.mkdir(parents=True, exist_ok=True)
        (entry / "meta.json").unlink(missing_ok=True)  # an entry without meta is never read
        with atomic_path(entry / "images.npy", suffix=".npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=arr.shape)
            out[:] = arr
            out.flush()
            del out
        meta = dict(format=STORE_FORMAT, key=key, n=int(arr.shape[0]), shape=list(arr.shape), size=size,
                    resize=resize, pillow=_pillow_version(), created=now_iso())
        with atomic_path(entry / "meta.json", suffix=".json") as tmp:
            tmp.write_text(json.dumps(meta, indent=1))
