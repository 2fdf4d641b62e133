"""The block runtime: a parent (or child) checkpoint as transformers modules whose weights stay
on disk until a block needs them, run one block at a time.

The model skeleton is built with its parameters on the meta device (accelerate's
init_empty_weights). Each block's parameters are loaded from the shards just before the
activations pass through it, then dropped again, so memory holds one block, the activations and
the embedding. Linear weights stay as stored (views of the mapped shards) and are cast to float32
a block of rows at a time inside each forward call (CAST_BYTES); activations run in micro-batches
sized by ACT_BYTES; the residual streams live in scratch-file mappings (activation_buffer).

Public interface (what the stages and verification use):

- ``BlockModel(ckpt, family, device, scratch)``: ``model``, ``base``, ``layers``, ``config``,
  ``ad`` (the family's block description), ``device``, ``tied``;
- ``load(module)`` / ``free(module)`` / ``load_lazily(modules)``: one block's weights in and out;
- ``embed(ids, batch)``, ``layer_call(layer, x)``, ``run_layers(h, batch, observe=...)``: the
  forward pass, with an observer's hooks attached per block (``observe.attach(i, layer)``,
  ``observe.residual(i, x, y)``, ``observe.active``);
- ``name_of(module)``, ``key_of(param)``, ``index``: module names and the parameter-to-checkpoint-key
  map; ``layer_bytes(i)``, ``total_bytes()``: the bytes a block (all blocks) reads;
- ``micro(batch, seq_len)``: sequences per forward call; ``share_buffers(other)`` /
  ``clear_buffers()``: the weight-cast buffers (one set for models that run one at a time);
- ``final_norm()``, ``head()``, ``embedding_param()``;
- ``stream(shape)``: a residual-stream buffer where the budget puts it (device or host memory
  when it fits, else a scratch-file mapping).

Budgets (``Budget``): how much memory the runtime may hold on its device decides the micro-batch
size, whether a block's linear weights are cast to float32 once per block or a block of rows at a
time inside each forward call, and where residual streams live. On the CPU the default is the
flat budget the runtime was sized for on a 2-core machine (16 MB casts and activations, streams in
scratch files); on CUDA it is a share of the device's free memory. ``--device-memory`` (API:
``device_memory``) sets it; results do not depend on it (tests/test_runtime.py).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint.reader import Checkpoint
from .errors import ParentError
from .families import FAMILIES, Family

CAST_BYTES = 16 << 20   # float32 bytes of a linear weight cast from its stored dtype at a time
ACT_BYTES = 16 << 20    # float32 bytes of one activation tensor of a micro-batch (sizes the micro-batches)


def streamed(mod: torch.nn.Module) -> bool:
    """Linear layers whose weights stay as stored (a view of the mapped shard) and are cast to
    float32 a block of rows at a time inside the forward pass."""
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def linear_forward(mod: torch.nn.Module, bufs: dict, cast_bytes: int | None = None):
    """forward() of a linear layer whose weight is kept as stored: float32 rows are cast into one
    reused buffer (no fresh allocation per chunk), multiplied, and copied into the output."""
    conv1d = not isinstance(mod, torch.nn.Linear)  # GPT-2's Conv1D: weight [in, out], y = x W + b

    def buffer(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
        b = bufs.get((name, like.device))
        if b is None or b.numel() < numel:
            b = bufs[(name, like.device)] = torch.empty(numel, dtype=like.dtype, device=like.device)
        return b[:numel]

    def forward(x: torch.Tensor) -> torch.Tensor:
        w, b = mod.weight, mod.bias
        if w.dtype == x.dtype:
            return torch.nn.functional.linear(x, w.T if conv1d else w, b)
        n_in = w.shape[0] if conv1d else w.shape[1]
        n_out = w.shape[1] if conv1d else w.shape[0]
        rows = max(1, min(n_out, (CAST_BYTES if cast_bytes is None else cast_bytes) // (n_in * x.element_size())))
        x2 = x.reshape(-1, n_in)
        out = x.new_empty(x2.shape[0], n_out)
        wbuf = buffer("w", rows * n_in, x)
        obuf = buffer("y", x2.shape[0] * rows, x) if rows < n_out else None
        for r0 in range(0, n_out, rows):
            r1 = min(n_out, r0 + rows)
            wc = wbuf[:(r1 - r0) * n_in].view(r1 - r0, n_in)
            wc.copy_(w[:, r0:r1].T if conv1d else w[r0:r1])
            y = out if obuf is None else obuf[:x2.shape[0] * (r1 - r0)].view(x2.shape[0], r1 - r0)
            torch.mm(x2, wc.T, out=y)
            if b is not None:
                y.add_(b[r0:r1])
            if obuf is not None:
                out[:, r0:r1].copy_(y)
        return out.view(*x.shape[:-1], n_out)

    return forward


CUDA_SHARE = 0.8   # the share of a CUDA device's free memory the default budget takes


@dataclass(frozen=True)
class Budget:
    """The memory the block runtime may hold on its device (None: the CPU's flat default, which
    keeps nothing resident) and what follows from it:

    - act_bytes: float32 bytes of one activation tensor of a micro-batch (sizes micro-batches);
    - cast_bytes: float32 bytes of a linear weight cast from its stored dtype at a time;
    - cast_block(n): whether a block whose linear weights take n float32 bytes is cast once, as
      it is loaded (a quarter of the budget), instead of a few rows per forward call;
    - resident(n): whether a residual stream of n bytes lives in device (or host) memory (a
      quarter of the budget each: heal holds two, verification three) instead of a scratch file.
    """

    memory: int | None = None

    @property
    def act_bytes(self) -> int:
        return ACT_BYTES if self.memory is None else max(ACT_BYTES, self.memory // 16)

    @property
    def cast_bytes(self) -> int:
        return CAST_BYTES if self.memory is None else max(CAST_BYTES, self.memory // 16)

    def cast_block(self, nbytes: int) -> bool:
        return self.memory is not None and nbytes <= self.memory // 4

    def resident(self, nbytes: int) -> bool:
        return self.memory is not None and nbytes <= self.memory // 4

    @classmethod
    def for_device(cls, device: str | torch.device = "cpu", memory: int | None = None) -> "Budget":
        """The budget of a device: `memory` bytes when given, else on CUDA CUDA_SHARE of its free
        memory (torch.cuda.mem_get_info), on the CPU the flat default."""
        dev = torch.device(device)
        if memory is None and dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
            memory = int(free * CUDA_SHARE)
        return cls(memory)

    def describe(self) -> str:
        return "flat (16 MB casts and activations, streams in scratch files)" if self.memory is None \
            else f"{self.memory / 1e9:.2f} GB"


_CURRENT: list[Budget | None] = [None]


@contextlib.contextmanager
def budget_scope(budget: Budget | None):
    """The budget every BlockModel made inside takes unless it is given one."""
    prev = _CURRENT[0]
    _CURRENT[0] = budget
    try:
        yield budget
    finally:
        _CURRENT[0] = prev


def micro_batch(batch: int, seq_len: int, width: int, act_bytes: int | None = None) -> int:
    """Sequences per forward call: at most `batch`, fewer when one activation tensor of `width`
    floats per token would exceed act_bytes (default ACT_BYTES). Statistics are sums, so this
    changes no result."""
    return max(1, min(batch, (ACT_BYTES if act_bytes is None else act_bytes) // max(1, seq_len * width * 4)))


def activation_buffer(shape: tuple[int, ...], scratch: str | Path | None = None) -> torch.Tensor:
    """A float32 tensor backed by a shared mapping of a scratch file (unlinked at once): the
    residual stream of every calibration sample lives in reclaimable page cache, not in the
    process's own memory. `scratch` is a folder (default: the system's temporary folder). The
    file's blocks are reserved up front (posix_fallocate), so a full disk is an error here rather
    than a SIGBUS later; where the file cannot be made or mapped, the tensor is plain memory."""
    import tempfile

    numel = math.prod(shape)
    size = max(numel, 1)
    try:
        fd, name = tempfile.mkstemp(prefix=".shrinkit-activations-", dir=scratch)
    except OSError:
        return torch.empty(shape, dtype=torch.float32)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size * 4)
        else:  # pragma: no cover - not Linux
            os.ftruncate(fd, size * 4)
        t = torch.from_file(name, shared=True, size=size, dtype=torch.float32)
    except (OSError, RuntimeError):
        t = torch.empty(size, dtype=torch.float32)
    finally:
        os.close(fd)
        try:
            os.unlink(name)
        except OSError:
            pass
    return t[:numel].view(shape)


class BlockModel:
    """The parent as transformers modules whose weights live on disk until a block needs them.

    A block's linear weights are views of the mapped shards in their stored dtype, cast to float32
    CAST_BYTES at a time inside each forward call; its other parameters (norms, biases) are loaded
    as float32. Activations run in float32 micro-batches sized by micro_batch().
    """

    def __init__(self, ckpt: Checkpoint, family: Family | str, device: str = "cpu", scratch: str | Path | None = None,
                 budget: Budget | None = None):
        import transformers
        from accelerate import init_empty_weights

        if isinstance(family, str):
            family = next(f for f in FAMILIES if f.name == family)
        block = family.block_for(ckpt.config)
        if block is None:
            raise ParentError(f"calibration does not support the {family.name} family yet; use method: magnitude")
        self.ckpt = ckpt
        self.family = family
        self.ad = block
        self.device = torch.device(device)
        self.scratch = scratch
        self.budget = budget or _CURRENT[0] or Budget.for_device(self.device)
        self._bufs: dict = {}  # reused float32 cast buffers of the streamed linear layers
        cfg_dict = dict(ckpt.config)
        cfg = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **{
            k: v for k, v in cfg_dict.items() if k not in ("torch_dtype", "dtype", "quantization_config")})
        with init_empty_weights(include_buffers=False):
            cls = getattr(transformers, self.ad.auto)   # an Auto class, or a model class (no from_config)
            make = getattr(cls, "from_config", None) or cls._from_config
            self.model = make(cfg, attn_implementation=self.ad.attn, dtype=torch.float32)
        self.model.eval()
        self.config = cfg
        self.base = self.model.get_submodule(self.ad.base) if self.ad.base else self.model
        self.layers = self.base.get_submodule(self.ad.layers)
        for b in self.model.buffers():  # rotary inv_freq, position ids: real, small
            b.data = b.data.to(self.device)
        self._index = self._key_index()
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.width = self._widest()
        # a block's linear weights cast once as it loads (else a few rows per forward call)
        self.cast_whole = self.budget.cast_block(self._block_float_bytes())

    def _key_index(self) -> dict[str, str]:
        """Map each model parameter name to its checkpoint key (prefixes may differ). A parameter
        the checkpoint holds elsewhere or in pieces (the family's stored_as) maps to its
        renamed key, or goes to self._pieces: its checkpoint keys, stacked and concatenated."""
        by_suffix: dict[str, str | None] = {}
        for k in self.ckpt.tensors:
            parts = k.split(".")
            for i in range(len(parts) - 1):
                s = ".".join(parts[i:])
                by_suffix[s] = None if s in by_suffix and by_suffix[s] != k else k

        def resolve(n: str) -> str | None:
            if n in self.ckpt.tensors:
                return n
            parts = n.split(".")
            for i in range(1, len(parts) - 1):
                k = by_suffix.get(".".join(parts[i:]))
                if k:
                    return k
            return by_suffix.get(n)

        out = {}
        self._chunks: dict[str, tuple[int, int]] = {}
        self._pieces: dict[str, list[list[str]]] = {}
        for n, _ in self.model.named_parameters():
            stored = self.family.checkpoint_name(n)
            if stored is not None:  # the family stores this parameter under another name
                name, chunk = stored
                if chunk is not None:
                    self._chunks[n] = chunk
            else:
                name = n
            k = resolve(name)
            if k is None and stored is None:
                src = self.family.stored_as(self, n)
                if isinstance(src, str):
                    k = resolve(src)
                elif src is not None:
                    keys = [[resolve(x) for x in row] for row in src]
                    if all(x is not None for row in keys for x in row):
                        self._pieces[n] = keys
            if k:
                out[n] = k
        return out

    def _keys_of(self, prefix: str) -> list[str]:
        """The checkpoint keys of the model parameters whose names start with `prefix`."""
        keys = [k for n, k in self._index.items() if n.startswith(prefix)]
        return keys + [k for n, rows in self._pieces.items() if n.startswith(prefix) for row in rows for k in row]

    def _widest(self) -> int:
        """The widest activation per token from a block's weights: their largest dimension."""
        prefix = self.name_of(self.layers[0]) + "."
        dims = [max(self.ckpt.tensors[k].shape, default=1) for k in self._keys_of(prefix)]
        return max(dims, default=1)

    def _block_float_bytes(self) -> int:
        """float32 bytes of the largest block's weights."""
        return max((sum(math.prod(self.ckpt.tensors[k].shape) for k in self._keys_of(self.name_of(layer) + "."))
                    for layer in self.layers), default=0) * 4

    def stream(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 residual-stream buffer: in device memory when the budget holds it (host memory
        on the CPU), else a scratch-file mapping (activation_buffer)."""
        if self.budget.resident(math.prod(shape) * 4):
            return torch.empty(shape, dtype=torch.float32, device=self.device)
        return activation_buffer(shape, self.scratch)

    def micro(self, batch: int, seq_len: int, width: int = 0) -> int:
        """Sequences per forward call (micro_batch) for activations as wide as the block's widest
        weight, one query's attention scores over the sequence per head, or `width` (logits)."""
        heads = int(getattr(self.config, "num_attention_heads", 1) or 1)
        return micro_batch(batch, seq_len, max(self.width, heads * seq_len, width), self.budget.act_bytes)

    @property
    def index(self) -> dict[str, str]:
        """Model parameter name -> checkpoint key (a copy; parameters stored in pieces are absent)."""
        return dict(self._index)

    def key_of(self, param: str) -> str | None:
        """The checkpoint key of a model parameter (None: not stored under one key)."""
        return self._index.get(param)

    def total_bytes(self) -> int:
        """Bytes every block reads from the checkpoint (a progress phase's total)."""
        return sum(self.layer_bytes(i) for i in range(len(self.layers)))

    def share_buffers(self, other: "BlockModel") -> None:
        """Use `other`'s weight-cast buffers: models that run one at a time need one set."""
        self._bufs = other._bufs

    def clear_buffers(self) -> None:
        """Drop the weight-cast buffers (they are made again by the next forward call)."""
        self._bufs.clear()

    def load_lazily(self, modules) -> dict:
        """Load each of these modules (see load) just before it first runs, so that what a stopped
        forward pass never reaches is not loaded; returns the pending hooks {module: handle}
        (remove them when done)."""
        pending: dict = {}

        def hook(m, args):
            for sub in m.modules():  # m and whatever it holds are loaded now
                h = pending.pop(sub, None)
                if h is not None:
                    h.remove()
            self.load(m)

        for sub in modules:
            if next(sub.parameters(recurse=False), None) is None:
                continue
            if streamed(sub):  # Module.__call__ looks up forward before its pre-hooks run
                sub.forward = linear_forward(sub, self._bufs, self.budget.cast_bytes)
            pending[sub] = sub.register_forward_pre_hook(hook)
        return pending

    def name_of(self, module: torch.nn.Module) -> str:
        for n, m in self.model.named_modules():
            if m is module:
                return n
        raise KeyError(module)

    def load(self, module: torch.nn.Module, keep_dtype: bool = False) -> None:
        """Load a module's parameters from the shards: linear weights as stored (streamed, see
        linear_forward), everything else as float32 (with keep_dtype: everything as stored).
        On the CPU a tensor kept as stored is a zero-copy view of the mapped shard."""
        prefix = self.name_of(module)
        for mname, sub in module.named_modules():
            stream = streamed(sub)
            for pname, p in list(sub.named_parameters(recurse=False)):
                full = ".".join(x for x in (prefix, mname, pname) if x)
                key = self._index.get(full)
                if key is None and self.tied and self.ad.head and full == f"{self.ad.head}.weight":
                    key = self._index.get(self.embedding_param())
                if key is None and full in self._pieces:  # stored in pieces: assembled in float32
                    key = self._pieces[full][0][0]
                    value = torch.stack([torch.cat([self.ckpt.get(k).float() for k in row])
                                         for row in self._pieces[full]])
                elif key is None:
                    raise ParentError(f"the parent checkpoint has no tensor for {full}; it does not match its config")
                else:
                    value = self.ckpt.get(key)
                    if full in self._chunks:  # one part of a fused stored tensor
                        part, parts = self._chunks[full]
                        if value.shape[0] % parts:
                            raise ParentError(f"{key} has {value.shape[0]} rows, not {parts} equal parts")
                        n = value.shape[0] // parts
                        value = value[part * n:(part + 1) * n]
                if tuple(value.shape) != tuple(p.shape):
                    raise ParentError(f"{key} has shape {list(value.shape)}, but the config makes {full} "
                                      f"{list(p.shape)}")
                as_stored = keep_dtype or (stream and pname == "weight" and not self.cast_whole) \
                    or not value.is_floating_point()
                value = value.to(device=self.device, dtype=value.dtype if as_stored else torch.float32)
                sub._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
            if stream:
                sub.forward = linear_forward(sub, self._bufs, self.budget.cast_bytes)

    def free(self, module: torch.nn.Module) -> None:
        for sub in module.modules():
            for pname, p in list(sub.named_parameters(recurse=False)):
                sub._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"),
                                                            requires_grad=False)
            sub.__dict__.pop("forward", None)

    def embedding_param(self) -> str:
        emb = self.model.get_input_embeddings()
        return f"{self.name_of(emb)}.weight"

    # -- the three pieces of a forward pass
    def embed(self, ids: torch.Tensor, batch: int) -> torch.Tensor:
        """Embeddings of every sample (token ids or whatever inputs the family takes), float32
        on the CPU in a scratch-file mapping: [N, T, H]."""
        mods = self.family.embedding_modules(self)
        for m in mods:  # a plain lookup needs no float32 copy of the whole table
            self.load(m, keep_dtype=self.family.embed_as_stored)
        h = None
        step = self.micro(batch, self.family.input_len(self.ckpt.config, ids))
        with torch.no_grad():
            for s in range(0, len(ids), step):
                y = self.family.embed(self, ids[s:s + step].to(self.device)).float()
                if h is None:
                    h = self.stream((len(ids), *y.shape[1:]))
                h[s:s + step] = y
        for m in mods:
            self.free(m)
        return h

    def layer_call(self, layer, x):
        return self.family.layer_call(self, layer, x)

    def run_layers(self, h: torch.Tensor, batch: int, observe=None, progress=None,
                   observe_n: int | None = None) -> torch.Tensor:
        """Push all activations through every block, one block resident at a time (in place).
        With `observe_n`, only the first observe_n samples are observed (the rest, e.g. held-out
        windows riding along with the calibration pass, only flow through)."""
        if self.family.staged:  # activations change shape from stage to stage: the family runs them
            return self.family.run_stages(self, h, batch, observe, progress, observe_n)
        step = self.micro(batch, h.shape[1])
        n_obs = len(h) if observe_n is None else observe_n
        ranges = [(a, min(a + step, n_obs)) for a in range(0, n_obs, step)]
        ranges += [(a, min(a + step, len(h))) for a in range(n_obs, len(h), step)]
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                self.readahead(i + 1)   # the next block's weights load from disk while this one runs
                self.load(layer)
                hooks = observe.attach(i, layer) if observe else []
                try:
                    for s, e in ranges:
                        x = h[s:e].to(self.device)
                        watch = observe is not None and s < n_obs
                        if observe is not None:
                            observe.active = watch
                        y = self.layer_call(layer, x)
                        if watch:
                            observe.residual(i, x, y)
                        h[s:e] = y
                finally:
                    for hk in hooks:
                        hk.remove()
                    self.free(layer)
                if progress is not None:
                    progress.advance(self.layer_bytes(i))
        return h

    def readahead(self, i: int) -> None:
        """Start reading block i's weights into the page cache (no-op past the last block)."""
        if 0 <= i < len(self.layers) and hasattr(self.ckpt, "readahead"):
            self.ckpt.readahead(self._keys_of(self.name_of(self.layers[i]) + "."))

    def layer_bytes(self, i: int) -> int:
        prefix = self.name_of(self.layers[i]) + "."
        return sum(self.ckpt.tensors[k].nbytes for k in self._keys_of(prefix))

    def final_norm(self):
        return self.base.get_submodule(self.ad.final_norm) if self.ad.final_norm else None

    def head(self):
        return self.model.get_submodule(self.ad.head) if self.ad.head else None
