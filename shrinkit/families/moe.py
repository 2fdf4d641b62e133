"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (shared expert with a sigmoid gate, dense
`mlp_only_layers`), Qwen3-MoE (q/k norms). Llama attention; each MoE layer has a router (`gate`,
one row per expert) and experts with their own FFN.

Checkpoints store one tensor per expert (Mixtral: `block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen:
`mlp.experts.{e}.gate_proj/up_proj/down_proj`); transformers (5.x) holds the experts stacked
(`mlp.experts.gate_up_proj` [experts, 2 * ffn, hidden], `mlp.experts.down_proj` [experts,
hidden, ffn]) and converts when loading and saving. Slicing works on the per-expert tensors;
calibration assembles the stacked parameters from them (`stored_as`).

Router load (the experts space, activation ranking): per expert and layer, the number of
top-k routing assignments over the calibration tokens plus the routing probability mass the
router gives it (softmax over all experts). The count decides; the probability mass orders
experts that the calibration data routes to equally often (or never). `magnitude`: an expert
scores the mean |w| of its own tensors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Block, Multiple
from .llama import DENSE_MLP, SELF_ATTN, Llama
from .spaces import Space as S, expert_rule, layer_rule, rule


@dataclass(frozen=True)
class MoE(Llama):
    moe: str = "mlp"                                      # the MoE block's name in the checkpoint
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")   # per-expert tensors stacked as gate_up_proj
    down: str = "down_proj"                               # per-expert tensor stacked as down_proj

    # ---- routing fields, checked with the shapes (inspect, plan and subclone refuse them alike)
    def check_config(self, cfg: dict, where: str = "config.json") -> None:
        """Besides the shape keys: the router picks `num_experts_per_tok` of the experts, so it
        may not exceed them; `decoder_sparse_step` is a positive integer and `mlp_only_layers`
        lists layer indices; `norm_topk_prob` is a bool. ParentError (exit 3) naming the field."""
        super().check_config(cfg, where)
        from ..errors import ParentError

        for canon in ("num_experts", "num_experts_per_tok", "expert_intermediate_size",
                      "shared_expert_intermediate_size"):   # transformers takes no default for a null
            key = self.config_key(cfg, canon) if self.keys.get(canon) else None
            if key and cfg.get(key) is None:
                raise ParentError(f"{where}: field {key} is missing or null; a {self.name} config needs it "
                                  "(the router and the experts are sized by it); fix the parent's config")
        k_key, e_key = self.config_key(cfg, "num_experts_per_tok"), self.config_key(cfg, "num_experts")
        k, e = cfg.get(k_key), cfg.get(e_key)
        if k is not None and e is not None and k > e:
            raise ParentError(f"{where}: field {k_key} is {k}, more than the {e} experts ({e_key}) the router picks "
                              "from; fix the parent's config")
        layers = cfg.get(self.config_key(cfg, "num_hidden_layers"))
        step = cfg.get("decoder_sparse_step")
        if "decoder_sparse_step" in cfg and (type(step) is not int or not 0 < step <= max(1, layers)):
            raise ParentError(f"{where}: field decoder_sparse_step must be a positive integer of at most the "
                              f"{layers} layers, not {step!r}; fix the parent's config")
        only = cfg.get("mlp_only_layers")
        if only is not None and (not isinstance(only, list) or len(only) > layers
                                 or any(type(i) is not int or not 0 <= i < layers for i in only)):
            raise ParentError(f"{where}: field mlp_only_layers must list layer indices in [0, {layers}), not "
                              f"{str(only)[:60]}; fix the parent's config")
        ntp = cfg.get("norm_topk_prob")
        if "norm_topk_prob" in cfg and not isinstance(ntp, bool):
            raise ParentError(f"{where}: field norm_topk_prob must be true or false, not {ntp!r}; fix the parent's config")

    def check_layout(self, cfg: dict, names, where: str = "config.json") -> None:
        """Each layer's FFN is experts where the config makes it sparse (transformers' rule: not
        in `mlp_only_layers` and (i + 1) a multiple of `decoder_sparse_step`) and a dense MLP
        elsewhere; a checkpoint whose tensors say otherwise would load with missing weights."""
        from ..errors import ParentError

        n = cfg.get(self.config_key(cfg, "num_hidden_layers"))
        only = set(cfg.get("mlp_only_layers") or [])
        step = cfg.get("decoder_sparse_step") or 1
        experts, dense = set(), set()
        pe = re.compile(rf"(?:^|\.)layers\.(\d+)\.{re.escape(self.moe)}\.experts\.")
        pd = re.compile(r"(?:^|\.)layers\.(\d+)\.mlp\.(?:gate_proj|up_proj|down_proj)\.weight$")
        for name in names:
            if m := pe.search(name):
                experts.add(int(m.group(1)))
            elif m := pd.search(name):
                dense.add(int(m.group(1)))
        for i in range(n):
            sparse = i not in only and (i + 1) % step == 0
            if sparse and i not in experts:
                raise ParentError(f"layer {i} holds no expert tensors, but {where} (mlp_only_layers "
                                  f"{sorted(only)}, decoder_sparse_step {step}) makes it a sparse MoE layer; the "
                                  "checkpoint does not match its config")
            if not sparse and (i in experts or i not in dense):
                what = "expert tensors" if i in experts else "no dense MLP tensors"
                raise ParentError(f"layer {i} holds {what}, but {where} (mlp_only_layers {sorted(only)}, "
                                  f"decoder_sparse_step {step}) makes it a dense layer; the checkpoint does not "
                                  "match its config")

    # ---- calibration: the router's name on disk, and transformers' stacked expert parameters
    # assembled from the per-expert tensors
    def checkpoint_name(self, param: str):
        m = re.search(r"\.mlp\.gate\.weight$", param)
        return (f"{param[:m.start()]}.{self.moe}.gate.weight", None) if m and self.moe != "mlp" else None

    def stored_as(self, bm, name: str):
        m = re.search(r"\.mlp\.(experts\.gate_up_proj|experts\.down_proj)$", name)
        if m is None:
            return None
        base = f"{name[:m.start()]}.{self.moe}"
        n = self.dims(bm.ckpt.config).num_experts
        if m.group(1) == "experts.gate_up_proj":
            return [[f"{base}.experts.{e}.{p}.weight" for p in self.gate_up] for e in range(n)]
        return [[f"{base}.experts.{e}.{self.down}.weight"] for e in range(n)]

    def observers(self, bm, i: int, layer, record) -> list:
        """Router load per expert (experts space) and each expert's mean |down_proj input| per
        neuron over the tokens routed to it (expert_ffn space)."""
        try:
            router, experts = layer.get_submodule("mlp.gate"), layer.get_submodule("mlp.experts")
        except AttributeError:
            return []  # a dense layer
        n = self.dims(bm.ckpt.config).num_experts
        k = int(bm.config.num_experts_per_tok)

        def on_router(mod, args, out):
            logits = (out[0] if isinstance(out, tuple) else out).detach().float().reshape(-1, n)
            p = torch.softmax(logits, dim=-1)
            top = p.topk(min(k, n), dim=-1).indices
            load = torch.bincount(top.flatten(), minlength=n).double() + p.sum(0).double()
            record(S.EXPERTS, i, load.cpu())

        def on_experts(mod, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).detach()
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x = x.reshape(-1, x.shape[-1])
            for e in idx.unique().tolist():
                if not 0 <= e < n:
                    continue
                tok = (idx == e).any(dim=-1).nonzero().squeeze(1)
                g, u = F.linear(x[tok], mod.gate_up_proj[e]).chunk(2, dim=-1)
                a = mod.act_fn(g) * u
                record(S.EXPERT_FFN, (i, e), a.abs().sum(0).double().cpu())

        return [router.register_forward_hook(on_router),
                experts.register_forward_pre_hook(on_experts, with_kwargs=True)]

    # ---- dense/sparse layer pattern follows the kept layers
    def child_config(self, cfg: dict, child, kept_layers: list[int], dtype_name: str) -> dict:
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        if "decoder_sparse_step" not in cfg and "mlp_only_layers" not in cfg:
            return out
        step = int(cfg.get("decoder_sparse_step") or 1)
        only = set(cfg.get("mlp_only_layers") or [])
        if kept_layers == list(range(self.dims(cfg).num_hidden_layers)):
            return out
        # the child's dense layers are the kept parent layers that were dense, by index
        out["mlp_only_layers"] = [ci for ci, p in enumerate(kept_layers) if p in only or (p + 1) % step]
        if "decoder_sparse_step" in cfg:
            out["decoder_sparse_step"] = 1
        return out


L = "layers"


def attention_rules() -> tuple:
    return (
        rule("embed_tokens.weight", (S.VOCAB, S.HIDDEN)),
        *SELF_ATTN,
        layer_rule(L, "self_attn.q_norm.weight", (None,)),   # over head_dim, shared by heads
        layer_rule(L, "self_attn.k_norm.weight", (None,)),
        layer_rule(L, "self_attn.rotary_emb.inv_freq", (None,), drop=True),
        layer_rule(L, "input_layernorm.weight", (S.HIDDEN,), norm=True),
        layer_rule(L, "post_attention_layernorm.weight", (S.HIDDEN,), norm=True),
        rule("norm.weight", (S.HIDDEN,), norm=True),
        rule("lm_head.weight", (S.VOCAB, S.HIDDEN), tied=True),
    )


def expert_rules(moe: str, gate_up: tuple[str, str], down: str) -> tuple:
    return (
        layer_rule(L, f"{moe}.gate.weight", (S.EXPERTS, S.HIDDEN)),       # the router: one row per expert
        *(expert_rule(L, f"{moe}.experts", f"{p}.weight", (S.EXPERT_FFN, S.HIDDEN)) for p in gate_up),
        expert_rule(L, f"{moe}.experts", f"{down}.weight", (S.HIDDEN, S.EXPERT_FFN)),
    )



ATTN_KEYS = {
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "num_hidden_layers": "num_hidden_layers",
    "vocab_size": "vocab_size",
    "num_experts_per_tok": "num_experts_per_tok",
}


# transformers' default experts implementation (grouped_mm: torch.nn.functional.grouped_mm on
# CPU and CUDA) refuses operands whose row strides are not multiples of 16 bytes ("strides should
# be multiple of 16 bytes"): the tokens' hidden vectors and the stacked gate_up_proj read along
# hidden_size, the down projection's input and weight along the experts' FFN width. A multiple of
# 8 elements is 16 bytes in bfloat16/float16 and 32 in float32, so the child runs in every dtype
# shrinkit writes (and in the one a user may load it in).
def _grouped_mm(dim: str) -> Multiple:
    return Multiple(dim, 8, f"transformers' default experts kernel (grouped_mm) needs row strides of a multiple "
                            f"of 16 bytes, so {dim} must be a multiple of 8 (16 bytes in bfloat16/float16)")


GROUPED_MM = (_grouped_mm("hidden_size"), _grouped_mm("expert_intermediate_size"))


def block(observe: dict) -> Block:
    return Block("AutoModelForCausalLM", "model", "layers", observe={S.Q_HEADS: "self_attn.o_proj", **observe},
                 final_norm="norm", head="lm_head", causal=True)


mixtral = MoE(
    name="mixtral",
    model_types=("mixtral",),
    rules=attention_rules() + expert_rules("block_sparse_moe", ("w1", "w3"), "w2"),
    keys={**ATTN_KEYS, "intermediate_size": None, "expert_intermediate_size": "intermediate_size",
          "num_experts": ("num_local_experts", "num_experts")},
    norm="rms",
    tie_default=False,
    write_head_dim=True,
    runtime=GROUPED_MM,
    block=block({}),
    notes="experts (`block_sparse_moe.experts.{e}.w1/w2/w3`) cut per expert and dropped by router load; "
          "router rows follow the kept experts",
    moe="block_sparse_moe",
    gate_up=("w1", "w3"),
    down="w2",
)

qwen2_moe = MoE(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    rules=attention_rules() + expert_rules("mlp", ("gate_proj", "up_proj"), "down_proj") + DENSE_MLP + (
        layer_rule(L, "mlp.shared_expert.gate_proj.weight", (S.SHARED_FFN, S.HIDDEN)),
        layer_rule(L, "mlp.shared_expert.up_proj.weight", (S.SHARED_FFN, S.HIDDEN)),
        layer_rule(L, "mlp.shared_expert.down_proj.weight", (S.HIDDEN, S.SHARED_FFN)),
        layer_rule(L, "mlp.shared_expert_gate.weight", (None, S.HIDDEN)),
    ),
    keys={**ATTN_KEYS, "intermediate_size": "intermediate_size", "expert_intermediate_size": "moe_intermediate_size",
          "shared_expert_intermediate_size": "shared_expert_intermediate_size",
          "num_experts": ("num_experts", "num_local_experts")},
    norm="rms",
    tie_default=False,
    write_head_dim=True,
    runtime=GROUPED_MM,
    block=block({S.FFN: "mlp.down_proj", S.SHARED_FFN: "mlp.shared_expert.down_proj"}),
    notes="experts cut and dropped by router load, shared expert and its gate, qkv biases, "
          "dense `mlp_only_layers` / `decoder_sparse_step` follow the kept layers",
)

qwen3_moe = MoE(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    rules=attention_rules() + expert_rules("mlp", ("gate_proj", "up_proj"), "down_proj") + DENSE_MLP,
    keys={**ATTN_KEYS, "intermediate_size": "intermediate_size", "expert_intermediate_size": "moe_intermediate_size",
          "num_experts": ("num_experts", "num_local_experts")},
    norm="rms",
    tie_default=False,
    write_head_dim=True,
    runtime=GROUPED_MM,
    block=block({S.FFN: "mlp.down_proj"}),
    notes="experts cut and dropped by router load, q/k norms, "
          "dense `mlp_only_layers` / `decoder_sparse_step` follow the kept layers",
)
