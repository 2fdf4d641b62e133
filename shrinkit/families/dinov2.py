"""DINOv2 (Dinov2Model; with registers: Dinov2WithRegistersModel): pre-LayerNorm ViT with layer
scale, CLS / mask / register tokens, position embeddings interpolated to the image size, and
an MLP or a SwiGLU FFN (`use_swiglu_ffn`: gate and up projections fused in `mlp.weights_in`).

The FFN width is not a config key: transformers computes it from an integer `mlp_ratio`
(hidden * mlp_ratio; for SwiGLU then 2/3 of that rounded up to a multiple of 8), so the child's
`mlp_ratio` is the one that gives exactly the target width, and a width no ratio gives is refused."""

from __future__ import annotations

from ..errors import ParentError, RecipeError
from .base import Block, Dims
from .spaces import Fused, Space as S, layer_rule, rule
from .vision import Vision


def _ffn(hidden: int, ratio: float, swiglu: bool) -> int:
    f = int(hidden * ratio)
    return (int(f * 2 / 3) + 7) // 8 * 8 if swiglu else f


class Dinov2(Vision):
    renames = (
        (r"\.attention\.q_proj\.", ".attention.attention.query.", None),
        (r"\.attention\.k_proj\.", ".attention.attention.key.", None),
        (r"\.attention\.v_proj\.", ".attention.attention.value.", None),
        (r"\.attention\.o_proj\.", ".attention.output.dense.", None),
        (r"\.mlp\.gate_proj\.", ".mlp.weights_in.", (0, 2)),
        (r"\.mlp\.up_proj\.", ".mlp.weights_in.", (1, 2)),
        (r"\.mlp\.down_proj\.", ".mlp.weights_out.", None),
    )

    def _with_ffn(self, cfg: dict, where: str = "config.json") -> dict:
        ratio, hidden = cfg.get("mlp_ratio", 4), cfg.get("hidden_size")
        if type(ratio) is not int or not 0 < ratio <= 1024:
            raise ParentError(f"{where}: field mlp_ratio must be a positive integer, not {ratio!r}")
        if type(hidden) is not int or hidden <= 0:
            return cfg  # the base check names the field
        return {**cfg, "intermediate_size": _ffn(hidden, ratio, bool(cfg.get("use_swiglu_ffn")))}

    def check_config(self, cfg: dict, where: str = "config.json") -> None:
        super().check_config(self._with_ffn(cfg, where), where)

    def dims(self, cfg: dict) -> Dims:
        return super().dims(self._with_ffn(cfg))

    def child_config(self, cfg: dict, child: Dims, kept_layers: list[int], dtype_name: str) -> dict:
        out = super().child_config(cfg, child, kept_layers, dtype_name)
        out.pop("intermediate_size", None)
        swiglu = bool(cfg.get("use_swiglu_ffn"))
        reach = {_ffn(child.hidden_size, r, swiglu): r for r in range(1, 65)}
        if child.intermediate_size not in reach:  # transformers takes an integer mlp_ratio only
            near = sorted(reach, key=lambda f: abs(f - child.intermediate_size))[:2]
            raise RecipeError(f"intermediate_size {child.intermediate_size} is not reachable through DINOv2's integer "
                              f"mlp_ratio at hidden_size {child.hidden_size}; the nearest widths are "
                              f"{' and '.join(map(str, sorted(near)))}")
        out["mlp_ratio"] = reach[child.intermediate_size]
        # backbone outputs (Dinov2Backbone): stage k is layer k-1's output; follow the kept layers
        for k in ("stage_names", "out_features", "_out_features"):
            out.pop(k, None)
        idx = out.pop("out_indices", None) or out.pop("_out_indices", None)
        out.pop("_out_indices", None)
        n_parent = self.dims(cfg).num_hidden_layers
        if idx and list(idx) != [n_parent]:
            kept = [0 if i == 0 else kept_layers.index(i - 1) + 1 for i in idx if i == 0 or (i - 1) in kept_layers]
            if kept:
                out["out_indices"] = kept
        return out

    def extra_tokens(self, cfg: dict) -> int:
        return 1 + int(cfg.get("num_register_tokens") or 0)

    def block_for(self, cfg: dict):
        return SWIGLU if cfg.get("use_swiglu_ffn") else self.block

    def embed(self, bm, pixels):
        return bm.base.embeddings(pixels)


E = "encoder.layer"
SWI = Fused((S.FFN, S.FFN))                 # weights_in: gate rows, then up rows
BACKBONE = Block("AutoModel", "", "encoder.layer", observe={S.Q_HEADS: "attention.o_proj", S.FFN: "mlp.fc2"},
                 final_norm="layernorm", causal=False, pool="first", input_name="pixel_values",
                 out_proj="attention.o_proj", down_proj="mlp.fc2", down_scale="layer_scale2.lambda1")
SWIGLU = Block("AutoModel", "", "encoder.layer", observe={S.Q_HEADS: "attention.o_proj", S.FFN: "mlp.down_proj"},
               final_norm="layernorm", causal=False, pool="first", input_name="pixel_values",
               out_proj="attention.o_proj", down_proj="mlp.down_proj", down_scale="layer_scale2.lambda1")

dinov2 = Dinov2(
    name="dinov2",
    model_types=("dinov2", "dinov2_with_registers"),
    rules=(
        rule("embeddings.cls_token", (None, None, S.HIDDEN)),
        rule("embeddings.mask_token", (None, S.HIDDEN)),
        rule("embeddings.register_tokens", (None, None, S.HIDDEN)),
        rule("embeddings.position_embeddings", (None, None, S.HIDDEN)),
        rule("embeddings.patch_embeddings.projection.weight", (S.HIDDEN, None, None, None)),
        rule("embeddings.patch_embeddings.projection.bias", (S.HIDDEN,)),
        layer_rule(E, "norm1.weight", (S.HIDDEN,), norm=True),
        layer_rule(E, "norm1.bias", (S.HIDDEN,)),
        layer_rule(E, "attention.attention.query.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.query.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.attention.key.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.key.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.attention.value.weight", (S.Q_HEADS, S.HIDDEN)),
        layer_rule(E, "attention.attention.value.bias", (S.Q_HEADS,)),
        layer_rule(E, "attention.output.dense.weight", (S.HIDDEN, S.Q_HEADS)),
        layer_rule(E, "attention.output.dense.bias", (S.HIDDEN,)),
        layer_rule(E, "layer_scale1.lambda1", (S.HIDDEN,)),
        layer_rule(E, "norm2.weight", (S.HIDDEN,), norm=True),
        layer_rule(E, "norm2.bias", (S.HIDDEN,)),
        layer_rule(E, "mlp.fc1.weight", (S.FFN, S.HIDDEN)),
        layer_rule(E, "mlp.fc1.bias", (S.FFN,)),
        layer_rule(E, "mlp.fc2.weight", (S.HIDDEN, S.FFN)),
        layer_rule(E, "mlp.fc2.bias", (S.HIDDEN,)),
        layer_rule(E, "mlp.weights_in.weight", (SWI, S.HIDDEN)),
        layer_rule(E, "mlp.weights_in.bias", (SWI,)),
        layer_rule(E, "mlp.weights_out.weight", (S.HIDDEN, S.FFN)),
        layer_rule(E, "mlp.weights_out.bias", (S.HIDDEN,)),
        layer_rule(E, "layer_scale2.lambda1", (S.HIDDEN,)),
        rule("layernorm.weight", (S.HIDDEN,), norm=True),
        rule("layernorm.bias", (S.HIDDEN,)),
    ),
    keys={
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",   # computed from mlp_ratio (see Dinov2.dims)
        "num_attention_heads": "num_attention_heads",
        "num_key_value_heads": None,
        "num_hidden_layers": "num_hidden_layers",
        "vocab_size": "vocab_size",
    },
    norm="layer",
    tie_default=False,
    head_dim_from_hidden=True,
    block=BACKBONE,
    notes="Dinov2Model, Dinov2WithRegistersModel: layer scale, CLS/mask/register tokens, interpolated "
          "position embeddings, MLP or fused SwiGLU FFN (width through `mlp_ratio`)",
)
