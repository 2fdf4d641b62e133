"""The child's files as written: the size and sha256 of each, computed while the bytes are
written (never by reading the file back), recorded in the report (`files`), and the check that a
folder still holds exactly those bytes (`--skip-if-current` skips only an intact child).

The report records every file a loader reads: the weight shards, the shard index, config.json
and the tokenizer / image processor files. shrinkit_report.json itself, shrinkit_report.md and
README.md (renderings of the report) are not listed.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

CHUNK = 1 << 24


def write_bytes(path: Path, data: bytes, files: dict) -> None:
    """Write `data` to `path` and record its size and sha256 in `files` under its name."""
    with open(path, "wb") as f:
        f.write(data)
    files[Path(path).name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def copy_file(src: Path, dst: Path, files: dict) -> None:
    """Copy `src` to `dst` in chunks, hashing what is written; recorded in `files`."""
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while chunk := fi.read(CHUNK):
            fo.write(chunk)
            h.update(chunk)
            n += len(chunk)
    files[Path(dst).name] = {"size": n, "sha256": h.hexdigest()}


def _sha256(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size:
            import mmap
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as mv:
                for i in range(0, size, CHUNK):
                    h.update(mv[i:i + CHUNK])
    return h.hexdigest()


def not_intact(folder: Path, files: dict) -> str | None:
    """None when every recorded file is in `folder` as a plain file (not a link) with its recorded
    size and sha256; otherwise what is wrong with the first one that is not."""
    for name, rec in files.items():
        p = Path(folder) / name
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
        if not stat.S_ISREG(st.st_mode):
            return f"{name} is not a plain file"
        if st.st_size != rec["size"]:
            return f"{name} has {st.st_size} bytes, the report says {rec['size']}"
        try:
            if _sha256(p, st.st_size) != rec["sha256"]:
                return f"{name}'s sha256 differs from the report's"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    return None
