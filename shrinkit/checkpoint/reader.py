"""Lazy, validated access to a parent checkpoint: config.json plus safetensors shard(s).

Every shard is memory-mapped and its header validated up front (so a truncated or corrupt
shard fails before any work starts); tensors are then handed out as zero-copy views of the
mapping, so reading a tensor costs page-cache traffic, not anonymous memory. Nothing is ever
unpickled: .bin / .pt checkpoints are refused.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pydantic import ValidationError

from ..errors import ParentError, UsageError
from ..validate import MAX_CONFIG, MAX_INDEX, HeaderEntry, Index, TooLarge, field_error, loads, read_capped

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shard: str            # file name relative to the parent folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int            # absolute byte offset of the data in the shard file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, display: str) -> tuple[dict[str, dict], dict, int]:
    """Parse and validate a safetensors header. Returns (entries, metadata, data_start)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ParentError(f"{display}: not a safetensors file (only {size} bytes); re-download or re-save the parent")
            (n,) = struct.unpack("<Q", head)
            if n <= 1 or n > MAX_HEADER or 8 + n > size:
                raise ParentError(f"{display}: corrupt or truncated safetensors header (header length {n}, file {size} bytes); re-download the shard")
            raw = f.read(n)
    except OSError as e:
        raise ParentError(f"{display}: cannot read ({e.strerror}); check the path and permissions") from e
    try:
        header = loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ParentError(f"{display}: corrupt safetensors header (invalid JSON: {e}); re-download the shard") from e
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ParentError(f"{display}: corrupt safetensors header: field __metadata__ must map names to strings; "
                          "re-download the shard")
    data_start = 8 + n
    data_len = size - data_start
    spans = []
    entries: dict[str, dict] = {}
    for name, ent in header.items():
        try:
            ent = HeaderEntry.model_validate(ent)
        except ValidationError as exc:
            raise ParentError(f"{display}: corrupt header entry for tensor {name!r}: {field_error(exc)}; "
                              "re-download the shard") from None
        if ent.dtype not in DTYPES:
            raise ParentError(f"{display}: tensor {name!r} has unknown dtype {ent.dtype!r}; shrinkit reads "
                              f"{', '.join(DTYPES)}")
        dtype = DTYPES[ent.dtype]
        shape = tuple(ent.shape)
        b, e = ent.data_offsets
        itemsize = torch.empty((), dtype=dtype).element_size()
        if e - b != math.prod(shape) * itemsize:
            raise ParentError(f"{display}: tensor {name!r} has inconsistent shape {list(shape)} and byte range [{b}, {e}); the shard is corrupt")
        if e > data_len:
            raise ParentError(
                f"{display}: truncated: tensor {name!r} needs bytes up to {data_start + e} but the file has {size}; re-download the shard")
        spans.append((b, e))
        entries[name] = {"dtype": ent.dtype, "shape": list(shape), "data_offsets": [b, e]}
    spans.sort()
    pos = 0
    for b, e in spans:
        if b != pos:
            raise ParentError(f"{display}: corrupt safetensors data layout (gap or overlap at byte {data_start + b}); re-download the shard")
        pos = e
    return entries, meta, data_start


_POPULATE = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else 0)


class Checkpoint:
    """A parent checkpoint opened for lazy reading."""

    def __init__(self, root: Path, config: dict, shards: list[str], tensors: dict[str, TensorInfo],
                 config_path: Path, weights_path: Path):
        self.root = root
        self.config = config
        self.shards = shards
        self.tensors = tensors
        self.config_path = config_path
        self.weights_path = weights_path  # the folder, or the single .safetensors file
        self._maps: dict[str, mmap.mmap] = {}
        self._files = {}

    # -- tensor access -------------------------------------------------------------------
    def _map(self, shard: str) -> mmap.mmap:
        m = self._maps.get(shard)
        if m is None:
            f = open(self.root / shard, "rb")
            self._files[shard] = f
            # ACCESS_COPY (a private mapping) makes the buffer writable for torch.frombuffer
            # without ever writing the file; untouched pages stay page cache, not anonymous memory.
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[shard] = m
        return m

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of the tensor's bytes in the mapped shard. Do not modify it."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        m = self._map(info.shard)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.frombuffer(m, dtype=info.dtype, count=info.numel, offset=info.begin)
        return t.view(info.shape)

    def prefetch(self, name: str) -> None:
        """Map the tensor's pages into this process in one system call (MADV_POPULATE_READ,
        Linux 5.14+) rather than one page fault per page as it is read; read-only, so the private
        mapping copies nothing. A no-op where the kernel lacks it."""
        info = self.tensors[name]
        if info.numel == 0 or not _POPULATE:
            return
        m = self._map(info.shard)
        lo = info.begin & ~(mmap.PAGESIZE - 1)
        try:
            m.madvise(_POPULATE, lo, info.begin + info.nbytes - lo)
        except (OSError, ValueError):
            pass

    def readahead(self, names) -> None:
        """Ask the kernel to start reading these tensors' bytes into the page cache and return at
        once (posix_fadvise WILLNEED): the next block's weights arrive while this one computes.
        A no-op where the call is missing or refused."""
        if not hasattr(os, "posix_fadvise"):  # pragma: no cover - not Linux
            return
        for name in names:
            info = self.tensors.get(name)
            if info is None or info.numel == 0:
                continue
            self._map(info.shard)   # opens the shard's file
            f = self._files.get(info.shard)
            try:
                os.posix_fadvise(f.fileno(), info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError, ValueError):
                pass

    def close(self) -> None:
        self._maps.clear()  # views may still reference the maps; let GC unmap them
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- summaries -----------------------------------------------------------------------
    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s for s in self.shards]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def dtype_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors.values():
            k = DTYPE_NAMES[t.dtype]
            out[k] = out.get(k, 0) + t.numel
        return out


def _allowed_roots(root: Path) -> list[str]:
    """Where a shard may really live: the parent folder, and for a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/``, whose files are links to ``../../blobs/``) the
    blobs folder of that same repository."""
    real_root = os.path.realpath(root)
    roots = [real_root]
    rp = Path(real_root)
    if rp.parent.name == "snapshots" and rp.parent.parent.name.startswith("models--"):
        roots.append(str(rp.parent.parent / "blobs"))
    return roots


def _inside(root: Path, rel: str, what: str | None) -> Path:
    if (not isinstance(rel, str) or not rel or os.path.isabs(rel) or "\\" in rel
            or ".." in Path(rel).parts):
        raise ParentError(f"{what} names shard {rel!r}, which is not a plain relative file name inside the parent "
                          "folder; refusing to follow it")
    p = (root / rel)
    real = os.path.realpath(p)
    if not any(os.path.commonpath([r, real]) == r for r in _allowed_roots(root)):
        if what is None:
            raise ParentError(f"{rel} in {root} links to {real}, outside the parent folder; refusing to follow it "
                              "(copy the file into the folder)")
        raise ParentError(f"{what} names shard {rel!r}, which lies outside the parent folder; refusing to follow it")
    return p


def _load_json(path: Path, what: str, cap: int = MAX_CONFIG) -> dict:
    try:
        data = loads(read_capped(path, cap))
    except FileNotFoundError as e:
        raise ParentError(f"{what} not found: {path}") from e
    except OSError as e:
        raise ParentError(f"{what} {path} cannot be read ({e.strerror}); check the path and permissions") from e
    except TooLarge as e:
        raise ParentError(f"{what} {path} is {e}; is it the right file?") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ParentError(f"{what} {path} is not valid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ParentError(f"{what} {path} is not a JSON object")
    return data


def open_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None) -> Checkpoint:
    """Open a parent: a Hugging Face folder, or a single .safetensors file with a config."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"parent {p} does not exist; pass a Hugging Face model folder or a .safetensors file")
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise ParentError(f"{p} is a pickle checkpoint; shrinkit never unpickles. Convert it to safetensors first "
                              "(e.g. transformers save_pretrained(..., safe_serialization=True))")
        if p.suffix != ".safetensors":
            raise ParentError(f"{p} is not a .safetensors file or a model folder")
        root = p.parent
        cfg_path = Path(config) if config else root / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"no config.json beside {p.name}; pass --config PATH to the parent's config.json")
        shards = [p.name]
        weight_map = None
        weights_path = p
    else:
        root = p
        cfg_path = Path(config) if config else root / "config.json"
        if not cfg_path.is_file():
            raise ParentError(f"{root} has no config.json; a Hugging Face model folder needs one (or pass --config)")
        index = root / "model.safetensors.index.json"
        single = root / "model.safetensors"
        weights_path = root
        if index.is_file():
            idx = _load_json(index, "shard index", MAX_INDEX)
            if not isinstance(idx.get("weight_map"), dict) or not idx["weight_map"]:
                raise ParentError(f"{index} has no weight_map; fix or re-download the index")
            try:
                weight_map = Index.model_validate(idx).weight_map
            except ValidationError as e:
                raise ParentError(f"{index}: {field_error(e)}; fix or re-download the index") from None
            shards = sorted(set(weight_map.values()))
            for s in shards:
                _inside(root, s, "model.safetensors.index.json")
        elif single.is_file():
            shards = ["model.safetensors"]
            weight_map = None
        else:
            st = sorted(x.name for x in root.glob("*.safetensors"))
            if len(st) == 1:
                shards, weight_map = st, None
            else:
                pick = [x.name for x in root.iterdir() if x.suffix in PICKLE_SUFFIXES]
                if pick:
                    raise ParentError(f"{root} holds only pickle weights ({', '.join(sorted(pick))}); shrinkit never unpickles. "
                                      "Convert the parent to safetensors first (save_pretrained(..., safe_serialization=True))")
                if st:
                    raise ParentError(f"{root} holds several .safetensors files but no model.safetensors.index.json; add the index")
                raise ParentError(f"{root} holds no model.safetensors or model.safetensors.index.json")
    cfg = _load_json(cfg_path, "config")
    tensors: dict[str, TensorInfo] = {}
    for s in shards:
        # every weight file of a folder parent, indexed or alone, must really live in the folder
        # (or its Hugging Face cache repository's blobs/); a file named directly is the user's choice
        fp = _inside(root, s, "model.safetensors.index.json" if weight_map else None) \
            if weights_path.is_dir() else root / s
        if not fp.is_file():
            raise ParentError(f"shard {s} named by the index is missing from {root}; re-download it")
        header, _meta, start = read_header(fp, s)
        for name, ent in header.items():
            if weight_map is not None and weight_map.get(name) != s:
                if name not in weight_map:
                    raise ParentError(f"{s} holds tensor {name!r} that the index does not list; the index is stale")
                continue
            if name in tensors:
                raise ParentError(f"tensor {name!r} appears in two shards ({tensors[name].shard}, {s})")
            b, e = ent["data_offsets"]
            tensors[name] = TensorInfo(name, s, DTYPES[ent["dtype"]], tuple(ent["shape"]), start + b, start + e)
    if weight_map is not None:
        missing = [n for n in weight_map if n not in tensors]
        if missing:
            raise ParentError(f"the index lists {len(missing)} tensor(s) missing from their shards (first: {missing[0]!r}); "
                              "a shard is incomplete or the index is stale")
    if not tensors:
        raise ParentError(f"{p} holds no tensors")
    return Checkpoint(root, cfg, shards, tensors, cfg_path, weights_path)
