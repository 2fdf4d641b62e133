"""sha256 of the parent's shards (two at a time, hashed from read-only mappings, remembered across
runs by file identity), the parent's and the recipe's hashes that a report records."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from .checkpoint.reader import Checkpoint
from .validate import MAX_CACHE, HashCache, loads, read_capped


def sha256_file(p: Path) -> str:
    """sha256 of a file, hashed straight from a read-only mapping (no copy into Python buffers;
    hashlib releases the GIL, so this overlaps the main thread's work)."""
    h = hashlib.sha256()
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m, memoryview(m) as mv:
                for i in range(0, size, 1 << 24):
                    h.update(mv[i:i + (1 << 24)])
    return h.hexdigest()


def _hash_cache_path() -> Path | None:
    if os.environ.get("SHRINKIT_NO_HASH_CACHE"):
        return None
    base = os.environ.get("SHRINKIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "shrinkit")
    return Path(base) / "sha256-cache.json"


def _file_key(p: Path) -> str:
    st = os.stat(p)
    return f"{os.path.realpath(p)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def sha256_all(paths: list[Path], out: dict) -> None:
    """sha256 of every shard, two at a time. A shard whose identity (path, inode, size, mtime,
    ctime) matches an earlier run takes the hash recorded then ($SHRINKIT_CACHE/sha256-cache.json;
    SHRINKIT_NO_HASH_CACHE=1 turns this off): a parent is often cut many times."""
    cache_file = _hash_cache_path()
    cache: dict = {}
    if cache_file is not None:
        try:  # a cache that is unreadable, too large or malformed is ignored (and rewritten)
            cache = TypeAdapter(HashCache).validate_python(loads(read_capped(cache_file, MAX_CACHE)))
        except (OSError, ValueError, ValidationError):
            cache = {}
    keys = {p: _file_key(p) for p in paths}
    todo = [p for p in paths if not isinstance(cache.get(keys[p]), str)]
    for p in paths:
        if p not in todo:
            out[p.name] = cache[keys[p]]
    if todo:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=min(2, len(todo))) as ex:
            for p, h in zip(todo, ex.map(sha256_file, todo)):
                out[p.name] = h
                cache[keys[p]] = h
        if cache_file is not None:
            try:
                cache_file.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
                tmp.write_text(json.dumps(cache))
                os.replace(tmp, cache_file)
            except OSError:
                pass  # the cache is an optimization only


def recipe_hash(recipe) -> str:
    """sha256 of the recipe's canonical JSON (every field, defaults filled in; the name left out)."""
    d = recipe.as_dict()
    d.pop("name", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def parent_hash(ckpt: Checkpoint, hashes: dict | None = None) -> str:
    """sha256 over the parent's shard sha256s (in shard order) and its config.json's bytes."""
    if hashes is None:
        hashes = {}
        sha256_all(ckpt.shard_paths, hashes)
    h = hashlib.sha256()
    for s in ckpt.shards:
        h.update(f"{s} {hashes.get(Path(s).name) or sha256_file(ckpt.root / s)}\n".encode())
    h.update(b"config.json " + hashlib.sha256(ckpt.config_path.read_bytes()).hexdigest().encode())
    return h.hexdigest()
