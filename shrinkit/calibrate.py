"""Calibration: run the parent one block at a time over calibration tokens and record
activation statistics, in memory bounded by one block plus the activations plus the embedding.

The block math is transformers' own modules: the model skeleton is built with its parameters
on the meta device (accelerate's init_empty_weights), and each block's parameters are loaded
from the shards just before all calibration activations pass through it, then dropped again.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from pydantic import ValidationError

from .checkpoint.reader import Checkpoint
from .errors import ParentError, RecipeError, UsageError
from .validate import Row, field_error, loads
from .families import FAMILIES, Family
from .families.spaces import HEAD, Space
from .plan import Plan
from .recipe import Calibration
from .stages.rank import Scores, add_score

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
MAX_TEXT_CHARS = 16_000_000


def has_tokenizer(folder: Path) -> bool:
    return any((folder / m).is_file() for m in TOKENIZER_MARKERS)


# ------------------------------------------------------------------ calibration data
def _text(data: str) -> str:
    if data == "builtin":
        return resources.files("shrinkit").joinpath("data/english.txt").read_text(encoding="utf-8")
    p = Path(data)
    if not p.is_file():
        raise RecipeError(f"calibration data {data!r} is neither builtin, random_tokens nor an existing .txt/.jsonl file")
    if p.suffix == ".jsonl":
        # at most MAX_TEXT_CHARS characters of text, read in bounded binary chunks (one huge line
        # never lands in memory whole); every row checked by schema (validate.Row)
        parts, n = [], 0
        with open(p, "rb") as f:
            for i, line in enumerate(iter(lambda: f.readline(4 * MAX_TEXT_CHARS + 1), b"")):
                if len(line) > 4 * MAX_TEXT_CHARS:
                    raise RecipeError(f"{p}:{i + 1}: the line is longer than {4 * MAX_TEXT_CHARS} bytes; "
                                      "split the text into rows")
                if not line.strip():
                    continue
                try:
                    t = Row.model_validate(loads(line.decode("utf-8"))).text
                except (ValueError, UnicodeDecodeError, ValidationError) as e:
                    why = field_error(e) if isinstance(e, ValidationError) else "not a JSON object"
                    raise RecipeError(f"{p}:{i + 1}: {why}; each .jsonl line must be an object with a "
                                      "\"text\" string") from None
                parts.append(t)
                n += len(t)
                if n > MAX_TEXT_CHARS:
                    break
        return "\n\n".join(parts)
    with open(p, encoding="utf-8", errors="replace") as f:
        return f.read(MAX_TEXT_CHARS)


def check_data(data: str) -> None:
    """A calibration file exists, is readable, is not empty and decodes (UTF-8 text, or .jsonl
    lines with a "text" field): a cheap look at its start, before any work."""
    if data in ("builtin", "random_tokens"):
        return
    p = Path(data)
    if not p.exists():
        raise RecipeError(f"calibration data {data!r} is neither builtin, random_tokens nor an existing .txt/.jsonl file")
    if not p.is_file():
        raise RecipeError(f"calibration data {data} is not a file; give a .txt or .jsonl file")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        raise RecipeError(f"calibration data {data} cannot be read ({e.strerror or e}); check its permissions") from None
    if not head.strip():
        raise RecipeError(f"calibration data {data} is empty; give a file with text in it")
    import codecs
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < (1 << 20))
    except UnicodeDecodeError as e:
        raise RecipeError(f"calibration data {data} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    if p.suffix == ".jsonl":  # the first row, checked as _text() checks every row
        lines = text.splitlines()
        complete = lines if len(head) < (1 << 20) else lines[:-1]
        for i, ln in enumerate(complete):
            if not ln.strip():
                continue
            try:
                Row.model_validate(loads(ln))
            except (ValueError, ValidationError) as e:
                why = field_error(e) if isinstance(e, ValidationError) else "not a JSON object"
                raise RecipeError(f"{p}:{i + 1}: {why}; each .jsonl line must be an object with a "
                                  "\"text\" string") from None
            break


_TOKENIZERS: dict = {}


def load_tokenizer(ckpt: Checkpoint, tokenizer: str | Path | None):
    folder = Path(tokenizer) if tokenizer else ckpt.root
    if not has_tokenizer(folder):
        if tokenizer:
            raise UsageError(f"--tokenizer {tokenizer} holds no tokenizer files")
        raise UsageError(f"the parent {ckpt.root} has no tokenizer for calibration text; pass --tokenizer PATH, "
                         "use `calibration: {data: random_tokens}`, or rank with `method: magnitude`")
    key = str(folder.resolve())
    if key not in _TOKENIZERS:
        from transformers import AutoTokenizer
        try:
            _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(folder))
        except Exception as e:  # transformers raises several types for a broken tokenizer
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UsageError(f"the tokenizer in {folder} cannot be loaded ({msg}); pass --tokenizer PATH "
                             "or use `calibration: {data: random_tokens}`") from None
    return _TOKENIZERS[key]


def calibration_tokens(ckpt: Checkpoint, spec: Calibration, vocab: int, *, seed: int, split: str = "calib",
                       tokenizer: str | Path | None = None) -> torch.Tensor:
    """[samples, seq_len] token ids. Text is split 90/10: calibration windows come from the first
    90%, held-out windows (split="heldout") from the last 10%."""
    if spec.data == "random_tokens":
        g = torch.Generator().manual_seed(seed + (1 if split == "heldout" else 0))
        return torch.randint(0, vocab, (spec.samples, spec.seq_len), generator=g)
    text = _text(spec.data)
    cut = int(len(text) * 0.9)
    text = text[:cut] if split == "calib" else text[cut:]
    tok = load_tokenizer(ckpt, tokenizer)
    tok.model_max_length = 1 << 60  # one long text, cut into windows below; silences the length warning
    ids = tok(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < spec.seq_len:
        raise RecipeError(f"calibration data gives only {len(ids)} tokens for the {split} split, fewer than seq_len "
                          f"{spec.seq_len}; use more text or a shorter seq_len")
    ids = torch.tensor(ids, dtype=torch.long)
    starts = torch.linspace(0, len(ids) - spec.seq_len, spec.samples).long()
    return torch.stack([ids[s:s + spec.seq_len] for s in starts.tolist()])


# ------------------------------------------------------------------ block-at-a-time model
CAST_BYTES = 16 << 20   # float32 bytes of a linear weight cast from its stored dtype at a time
ACT_BYTES = 16 << 20    # float32 bytes of one activation tensor of a micro-batch (sizes the micro-batches)


def _streamed(mod: torch.nn.Module) -> bool:
    """Linear layers whose weights stay as stored (a view of the mapped shard) and are cast to
    float32 a block of rows at a time inside the forward pass."""
    return isinstance(mod, torch.nn.Linear) or type(mod).__name__ == "Conv1D"


def _linear_forward(mod: torch.nn.Module, bufs: dict):
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
        rows = max(1, min(n_out, CAST_BYTES // (n_in * x.element_size())))
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


def micro_batch(batch: int, seq_len: int, width: int) -> int:
    """Sequences per forward call: at most `batch`, fewer when one activation tensor of `width`
    floats per token would exceed ACT_BYTES. Statistics are sums, so this changes no result."""
    return max(1, min(batch, ACT_BYTES // max(1, seq_len * width * 4)))


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

    def __init__(self, ckpt: Checkpoint, family: Family | str, device: str = "cpu", scratch: str | Path | None = None):
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
        self._bufs: dict = {}  # reused float32 cast buffers of the streamed linear layers
        cfg_dict = dict(ckpt.config)
        cfg = transformers.AutoConfig.for_model(cfg_dict.pop("model_type"), **{
            k: v for k, v in cfg_dict.items() if k not in ("torch_dtype", "dtype", "quantization_config")})
        with init_empty_weights(include_buffers=False):
            self.model = getattr(transformers, self.ad.auto).from_config(cfg, attn_implementation=self.ad.attn,
                                                                        dtype=torch.float32)
        self.model.eval()
        self.config = cfg
        self.base = self.model.get_submodule(self.ad.base) if self.ad.base else self.model
        self.layers = self.base.get_submodule(self.ad.layers)
        for b in self.model.buffers():  # rotary inv_freq, position ids: real, small
            b.data = b.data.to(self.device)
        self._index = self._key_index()
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.width = self._widest()

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
        prefix = self._full(self.layers[0]) + "."
        dims = [max(self.ckpt.tensors[k].shape, default=1) for k in self._keys_of(prefix)]
        return max(dims, default=1)

    def micro(self, batch: int, seq_len: int, width: int = 0) -> int:
        """Sequences per forward call (micro_batch) for activations as wide as the block's widest
        weight, one query's attention scores over the sequence per head, or `width` (logits)."""
        heads = int(getattr(self.config, "num_attention_heads", 1) or 1)
        return micro_batch(batch, seq_len, max(self.width, heads * seq_len, width))

    def _full(self, module: torch.nn.Module) -> str:
        for n, m in self.model.named_modules():
            if m is module:
                return n
        raise KeyError(module)

    def load(self, module: torch.nn.Module, keep_dtype: bool = False) -> None:
        """Load a module's parameters from the shards: linear weights as stored (streamed, see
        _linear_forward), everything else as float32 (with keep_dtype: everything as stored).
        On the CPU a tensor kept as stored is a zero-copy view of the mapped shard."""
        prefix = self._full(module)
        for mname, sub in module.named_modules():
            stream = _streamed(sub)
            for pname, p in list(sub.named_parameters(recurse=False)):
                full = ".".join(x for x in (prefix, mname, pname) if x)
                key = self._index.get(full)
                if key is None and self.tied and self.ad.head and full == f"{self.ad.head}.weight":
                    key = self._index.get(self._embedding_param())
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
                as_stored = keep_dtype or (stream and pname == "weight") or not value.is_floating_point()
                value = value.to(device=self.device, dtype=value.dtype if as_stored else torch.float32)
                sub._parameters[pname] = torch.nn.Parameter(value, requires_grad=False)
            if stream:
                sub.forward = _linear_forward(sub, self._bufs)

    def free(self, module: torch.nn.Module) -> None:
        for sub in module.modules():
            for pname, p in list(sub.named_parameters(recurse=False)):
                sub._parameters[pname] = torch.nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"),
                                                            requires_grad=False)
            sub.__dict__.pop("forward", None)

    def _embedding_param(self) -> str:
        emb = self.model.get_input_embeddings()
        return f"{self._full(emb)}.weight"

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
                    h = activation_buffer((len(ids), *y.shape[1:]), self.scratch)
                h[s:s + step] = y.cpu()
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
                        h[s:e] = y.float().cpu()
                finally:
                    for hk in hooks:
                        hk.remove()
                    self.free(layer)
                if progress is not None:
                    progress.advance(self._layer_bytes(i))
        return h

    def _layer_bytes(self, i: int) -> int:
        prefix = self._full(self.layers[i]) + "."
        return sum(self.ckpt.tensors[k].nbytes for k in self._keys_of(prefix))

    def final_norm(self):
        return self.base.get_submodule(self.ad.final_norm) if self.ad.final_norm else None

    def head(self):
        return self.model.get_submodule(self.ad.head) if self.ad.head else None


# ------------------------------------------------------------------ statistics
@dataclass
class CalibStats:
    # (space, key) -> mean statistic per unit: the residual stream's mean |x| (hidden), each
    # observed module's mean |input| per index (ffn, ...) or each head's mean contribution
    # |O_h z_h| to the residual stream (head spaces); keys as in Plan.kept
    scores: dict = field(default_factory=dict)
    influence: list[float] = field(default_factory=list)    # Block Influence per layer
    tokens: int = 0
    extra_final: torch.Tensor | None = None                 # final hidden states of extra_ids (unobserved)

    def by_space(self, space: Space) -> dict:
        """key -> statistic for one space (a global space's only key is None)."""
        return {k: v for (sp, k), v in self.scores.items() if sp is space}


class Observer:
    def __init__(self, bm: BlockModel, dims, n_layers: int):
        self.bm = bm
        self.dims = dims
        self.hd = dims.head_dim
        self.st = CalibStats()
        self._bi = [0.0] * n_layers
        self._n = [0] * n_layers
        self.n_layers = n_layers
        self.active = True   # False while samples that are not calibration data pass

    def record(self, space: Space, key, v: torch.Tensor) -> None:
        if not self.active:  # samples riding along unobserved (held-out windows)
            return
        add_score(self.st.scores, space, key, v)

    def _modules(self, layer, path: str):
        """(expert or None, module) for an observe path ("{expert}": every expert present). A
        path this block lacks gives nothing (blocks may differ: dense and MoE layers)."""
        if "{expert}" not in path:
            try:
                return [(None, layer.get_submodule(path))]
            except AttributeError:
                return []
        out = []
        for e in range(self.dims.num_experts or 0):
            try:
                out.append((e, layer.get_submodule(path.format(expert=e))))
            except AttributeError:
                pass
        return out

    def attach(self, i: int, layer) -> list:
        hooks = []
        for space, path in self.bm.ad.observe.items():
            for e, mod in self._modules(layer, path):
                key = space.key(i, e)
                fn = self._on_heads(space, key) if space.unit == HEAD else self._on_index(space, key)
                hooks.append(mod.register_forward_pre_hook(fn))
        return hooks + self.bm.family.observers(self.bm, i, layer, self.record)

    def _on_index(self, space: Space, key):
        def hook(mod, args):
            if not self.active:
                return
            a = args[0].detach()
            self.record(space, key, a.abs().reshape(-1, a.shape[-1]).sum(0).double().cpu())
        return hook

    def _on_heads(self, space: Space, key):
        nh, in_first = space.units(self.dims), self.bm.ad.in_first

        def hook(mod, args):
            # each head's contribution to the residual stream: |O_h z_h| per token
            if not self.active:
                return
            z = args[0].detach()
            z = z.reshape(-1, nh, self.hd).transpose(0, 1)                 # [heads, T, hd]
            w = mod.weight                                                  # as stored
            H = w.shape[1] if in_first else w.shape[0]
            contrib = torch.zeros(nh, dtype=torch.float64, device=z.device)
            group = max(1, min(nh, CAST_BYTES // (4 * self.hd * H)))       # heads cast to float32 at once
            for h0 in range(0, nh, group):
                h1 = min(nh, h0 + group)
                rows = w[h0 * self.hd:h1 * self.hd] if in_first else w[:, h0 * self.hd:h1 * self.hd].T
                wh = rows.to(z.dtype).reshape(h1 - h0, self.hd, H)          # [g, hd, H]
                step = max(1, ACT_BYTES // (4 * (h1 - h0) * H))
                for t0 in range(0, z.shape[1], step):
                    contrib[h0:h1] += torch.bmm(z[h0:h1, t0:t0 + step], wh).norm(dim=-1).sum(1).double()
            self.record(space, key, contrib.cpu())
        return hook

    def residual(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.record(Space.HIDDEN, None, x.abs().reshape(-1, x.shape[-1]).sum(0).double().cpu())
        if i == self.n_layers - 1:
            self.st.scores[(Space.HIDDEN, None)] += y.abs().reshape(-1, y.shape[-1]).sum(0).double().cpu()
        cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
        self._bi[i] += float((1 - cos.double()).sum())
        self._n[i] += cos.numel()

    def finish(self) -> CalibStats:
        n = max(self._n[0], 1)
        self.st.tokens = n
        self.st.scores = {k: v / n for k, v in self.st.scores.items()}
        self.st.influence = [b / max(c, 1) for b, c in zip(self._bi, self._n)]
        return self.st


def calibrate(ckpt: Checkpoint, plan: Plan, spec: Calibration, *, seed: int = 0, progress=None,
              device: str = "cpu", tokenizer=None, scratch: str | Path | None = None,
              ids: torch.Tensor | None = None, extra_ids: torch.Tensor | None = None) -> CalibStats:
    """Activation statistics of the parent over the calibration tokens, one block at a time.
    scratch: folder for the activations' backing file (default: the system's temporary folder).
    ids: the calibration inputs when already made (else from spec). extra_ids: more samples of
    the same length that ride along unobserved (verification's held-out windows: one parent pass
    for both); their final hidden states come back as stats.extra_final."""
    if ids is None:
        ids = plan.family.calibration_inputs(ckpt, spec, plan.parent, seed=seed, tokenizer=tokenizer)
    n = len(ids)
    if extra_ids is not None:
        ids = torch.cat([ids, extra_ids])
    bm = BlockModel(ckpt, plan.family, device, scratch)
    if progress is not None:
        more = f" + {len(extra_ids)} held-out" if extra_ids is not None else ""
        progress.phase(f"calibrate ({plan.family.describe_inputs(ids[:n])}{more})",
                       sum(bm._layer_bytes(i) for i in range(len(bm.layers))))
    h = bm.embed(ids, spec.batch_size)
    obs = Observer(bm, plan.parent, len(bm.layers))
    h = bm.run_layers(h, spec.batch_size, obs, progress, observe_n=n)
    st = obs.finish()
    if extra_ids is not None:
        st.extra_final = activation_buffer(tuple(h[n:].shape), scratch)
        st.extra_final.copy_(h[n:])
    return st


def activation_scores(stats: CalibStats, plan: Plan, need: set[Space]) -> Scores:
    return {k: v for k, v in stats.scores.items() if k[0] in need}


def layer_influence(stats: CalibStats) -> list[float]:
    return list(stats.influence)
