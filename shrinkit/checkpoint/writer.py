"""Streamed, size-capped safetensors writer with Hugging Face shard names.

Every child tensor's name, dtype and shape are known before any data is written, so the
shard layout and each shard's header are computed up front; tensors are then streamed into
their shard one at a time, so memory holds one tensor, never a shard. Files are fsynced.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .reader import DTYPE_NAMES

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


@dataclass
class Entry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def layout(entries: list[Entry], max_shard_size: int) -> list[list[Entry]]:
    """Greedy, order-preserving split into shards of at most max_shard_size bytes (a tensor
    larger than the cap gets a shard of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return [SINGLE]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def header_bytes(entries: list[Entry], metadata: dict[str, str]) -> bytes:
    h: dict = {"__metadata__": metadata}
    off = 0
    for e in entries:
        h[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [off, off + e.nbytes]}
        off += e.nbytes
    raw = json.dumps(h, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write tensors, in the planned order, into HF-named shards under `folder`: begin(name),
    write_chunk(block)..., end() for each."""

    def __init__(self, folder: Path, entries: list[Entry], max_shard_size: int, metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.shards = layout(entries, max_shard_size)
        self.names = shard_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(si, e) for si, sh in enumerate(self.shards) for e in sh]
        self._pos = 0
        self._file = None
        self._shard = -1
        self.total_size = sum(e.nbytes for e in entries)
        self.files: dict[str, dict] = {}   # file name -> {"size", "sha256"}, hashed as it is written
        self._hash = None

    def _put(self, b) -> None:
        self._file.write(b)
        self._hash.update(b)

    def _open(self, si: int) -> None:
        self._close()
        self._shard = si
        self._file = open(self.folder / self.names[si], "wb")
        self._hash = hashlib.sha256()
        self._put(header_bytes(self.shards[si], self.metadata))

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self.files[self.names[self._shard]] = {"size": self._file.tell(), "sha256": self._hash.hexdigest()}
            self._file.close()
            self._file = None

    def begin(self, name: str, dtype: torch.dtype) -> Entry:
        """Start the next tensor, which must be `name`; its bytes follow in write_chunk calls."""
        si, e = self._order[self._pos]
        if name != e.name or dtype != e.dtype:
            raise RuntimeError(f"writer expected {e.name} {e.dtype}, got {name} {dtype}")
        if si != self._shard:
            self._open(si)
        self._left = e.nbytes
        return e

    def write_chunk(self, t: torch.Tensor) -> None:
        """Append a row-major block of the current tensor's data."""
        n = t.numel() * t.element_size()
        if n > self._left:
            raise RuntimeError(f"writer got {n - self._left} bytes too many for {self._order[self._pos][1].name}")
        if n:
            self._put(memoryview(t.contiguous().view(-1).view(torch.uint8).numpy()))
        self._left -= n

    def end(self) -> None:
        if self._left:
            raise RuntimeError(f"writer got {self._left} bytes too few for {self._order[self._pos][1].name}")
        self._pos += 1

    def close(self) -> list[str]:
        if self._pos != len(self._order):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if self._shard == -1 and self._order:
            self._open(0)
        self._close()
        for si in range(self._shard + 1, len(self.shards)):  # shards with only empty tensors
            self._open(si)
            self._close()
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e.name: self.names[si] for si, sh in enumerate(self.shards) for e in sh}}
            index["weight_map"] = dict(sorted(index["weight_map"].items()))
            from ..childfiles import write_bytes
            write_bytes(self.folder / INDEX, (json.dumps(index, indent=2) + "\n").encode(), self.files)
        return list(self.names)

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
