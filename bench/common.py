"""Shared bits of shrinkit's benchmarks: the cache folder and synthetic Llama-shaped parents.

A synthetic parent is a Hugging Face folder (config.json, model.safetensors.index.json and
N bf16 shards) with random-normal weights (std 0.02; RMSNorm weights are ones). It is written
shard by shard, each shard from a dict holding only that shard's tensors, so generation never
holds the whole model in memory. Folders land under <cache>/synthetic/<preset>/ and are built
in a temp folder and renamed into place; a folder whose `.complete` marker matches the spec is
reused as is.

Only the standard library is imported at module level (torch and safetensors are imported by
generate()), so the benchmark's own subprocess arms start as lean as possible.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

GEN_VERSION = 1  # bump to force regeneration when the layout or the weights' recipe changes


def cache_dir() -> Path:
    return Path(os.environ.get("SHRINKIT_CACHE") or Path.home() / ".cache" / "shrinkit")


@dataclass(frozen=True)
class Dims:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    num_hidden_layers: int
    head_dim: int = 128
    vocab_size: int = 32000

    def half(self) -> "Dims":
        """Half the width and depth: the child both the naive and the shrinkit arms cut."""
        return replace(self, hidden_size=self.hidden_size // 2, intermediate_size=self.intermediate_size // 2,
                       num_attention_heads=self.num_attention_heads // 2,
                       num_key_value_heads=self.num_key_value_heads // 2,
                       num_hidden_layers=self.num_hidden_layers // 2)

    def target(self) -> dict:
        """The recipe `target:` block for this shape."""
        return {k: getattr(self, k) for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                             "num_key_value_heads", "num_hidden_layers")}


@dataclass(frozen=True)
class Preset:
    name: str
    dims: Dims
    shards: int
    seed: int = 0


# Llama-2-like family (head_dim 128, GQA 4:1, vocab 32000, untied head); sizes in bf16:
#   0.5gb: 245.9M params = 0.49 GB    1.7gb: 852.6M params = 1.71 GB    4gb: 1.980B params = 3.96 GB
# Their half-width, half-depth children: 110.6 MB, 311.5 MB, 642.6 MB.
PRESETS: dict[str, Preset] = {
    "0.5gb": Preset("0.5gb", Dims(1024, 2816, 8, 2, 16), shards=2),
    "1.7gb": Preset("1.7gb", Dims(2048, 5632, 16, 4, 16), shards=4),
    "4gb": Preset("4gb", Dims(3072, 8192, 24, 6, 18), shards=8),
}


def tensor_shapes(d: Dims) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a LlamaForCausalLM of shape `d`, in Hugging Face's storage order."""
    q, kv = d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim
    h, f = d.hidden_size, d.intermediate_size
    out = [("model.embed_tokens.weight", (d.vocab_size, h))]
    for i in range(d.num_hidden_layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (d.vocab_size, h))]
    return out


def n_params(d: Dims) -> int:
    return sum(math.prod(s) for _, s in tensor_shapes(d))


def n_bytes(d: Dims, itemsize: int = 2) -> int:
    return n_params(d) * itemsize


def config_json(d: Dims) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_key_value_heads,
        "num_hidden_layers": d.num_hidden_layers,
        "head_dim": d.head_dim,
        "vocab_size": d.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
    }


def shard_plan(shapes: list[tuple[str, tuple[int, ...]]], n: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Split the ordered tensors into n contiguous groups of about equal bytes (by each tensor's midpoint)."""
    total = sum(math.prod(s) for _, s in shapes)
    groups: list[list] = [[] for _ in range(n)]
    off = 0
    for name, s in shapes:
        k = math.prod(s)
        groups[min(n - 1, int((off + k / 2) * n / total))].append((name, s))
        off += k
    if any(not g for g in groups):
        raise ValueError(f"cannot split into {n} non-empty shards")
    return groups


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def parent_dir(preset: Preset) -> Path:
    return cache_dir() / "synthetic" / preset.name


def _spec(preset: Preset) -> dict:
    return {"version": GEN_VERSION, "preset": preset.name, "dims": asdict(preset.dims),
            "shards": preset.shards, "seed": preset.seed, "bytes": n_bytes(preset.dims)}


def is_complete(preset: Preset) -> bool:
    d = parent_dir(preset)
    try:
        marker = json.loads((d / ".complete").read_text())
    except (OSError, ValueError):
        return False
    if marker.get("spec") != _spec(preset):
        return False
    for i in range(preset.shards):
        p = d / shard_name(i, preset.shards)
        if not p.is_file() or p.stat().st_size != marker.get("sizes", {}).get(p.name):
            return False
    return (d / "config.json").is_file() and (d / "model.safetensors.index.json").is_file()


def generation_info(preset: Preset) -> dict | None:
    """The cached parent's marker (spec, shard sizes, generation seconds), or None."""
    try:
        return json.loads((parent_dir(preset) / ".complete").read_text())
    except (OSError, ValueError):
        return None


def shard_paths(preset: Preset) -> list[Path]:
    d = parent_dir(preset)
    return [d / shard_name(i, preset.shards) for i in range(preset.shards)]


def generate(preset: Preset, force: bool = False, log=print) -> dict:
    """Make sure the synthetic parent exists; return its marker (with `seconds` of generation)."""
    if not force and is_complete(preset):
        return generation_info(preset)
    import torch
    from safetensors.torch import save_file

    dest = parent_dir(preset)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(preset.seed)
    groups = shard_plan(tensor_shapes(preset.dims), preset.shards)
    weight_map, sizes = {}, {}
    for i, group in enumerate(groups):
        fn = shard_name(i, preset.shards)
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.randn(shape, dtype=torch.bfloat16, generator=gen).mul_(0.02)
            weight_map[name] = fn
        save_file(tensors, str(tmp / fn), metadata={"format": "pt"})
        del tensors
        sizes[fn] = (tmp / fn).stat().st_size
        log(f"  wrote {fn} ({sizes[fn] / 1e6:.0f} MB) at {time.perf_counter() - t0:.1f} s")
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": n_bytes(preset.dims)}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config_json(preset.dims), indent=2) + "\n")
    os.sync()
    seconds = time.perf_counter() - t0
    marker = {"spec": _spec(preset), "sizes": sizes, "seconds": round(seconds, 3),
              "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    (tmp / ".complete").write_text(json.dumps(marker, indent=2) + "\n")
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return marker
