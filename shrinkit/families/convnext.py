"""ConvNeXt and ConvNeXt V2 (ConvNextModel, ConvNextForImageClassification; ConvNextV2Model,
ConvNextV2ForImageClassification): a hierarchical convolutional network of stages.

The space model's staged spaces describe it without special cases: each stage has its own
width (`stage_hidden`, keyed by the stage) and each layer its own FFN neurons (`stage_ffn`,
keyed by the layer, numbered across stages). The stem's patch convolution writes stage 0's
width; each later stage opens with a downsampling layer (a channels-first LayerNorm over the
previous stage's width, then a 2x2 stride-2 convolution from that width to its own: `At(...,
"prev")` axes); the final LayerNorm and the classifier read the last stage's width. A layer is
a 7x7 depthwise convolution (one filter per channel: its channel axis is the stage's width),
a LayerNorm, pwconv1 (width -> 4 x width), GELU, V2's GRN over the FFN neurons, pwconv2 and
a per-channel layer scale (V1). transformers fixes the FFN width at 4 x the stage's width, so
a child's FFN widths follow its `hidden_sizes`.

What is exact: FFN neurons and whole layers (a dead layer is the identity). LayerNorm's mean
and variance are over a stage's channels, so cutting channels is never exact. GRN divides
each neuron's global response by the mean response over the layer's neurons: a cut changes
that mean, so the child's GRN scale is multiplied by (parent FFN width / child FFN width),
which makes cutting dead neurons exact up to GRN's 1e-6 epsilon (tests/test_convnext.py).

rescale_norms does nothing here (one factor cannot fit stages cut by different ratios; the
report gives factor 1).

Calibration and verification run transformers' own stage modules one stage at a time
(`run_stages`): the activations change shape from stage to stage, so they are not a residual
stream of one width; the final states are the last stage's spatial mean, which the final
LayerNorm and classifier read as ConvNextModel's pooler does.
"""

from __future__ import annotations

import math

import torch

from ..errors import ParentError
from ..validate import ConfigCommon, field_error
from .base import Block, Dims
from .spaces import At, Space as S, rule, stage_rule
from .vision import Vision

MAX_STAGES = 64
FFN_RATIO = 4   # transformers' ConvNextLayer: pwconv1 is Linear(dim, 4 * dim)


class ConvNext(Vision):
    staged = True

    # ------------------------------------------------------------------ config <-> dims
    def check_config(self, cfg: dict, where: str = "config.json") -> None:
        from pydantic import ValidationError
        try:
            ConfigCommon.model_validate(cfg)
        except ValidationError as e:
            raise ParentError(f"{where}: {field_error(e)}; fix the parent's config") from None
        lists = {}
        for key in ("hidden_sizes", "depths"):
            v = cfg.get(key)
            if v is None:
                raise ParentError(f"{where}: field {key} is missing; a {self.name} config needs hidden_sizes and depths")
            if not isinstance(v, list) or not 0 < len(v) <= MAX_STAGES or \
                    any(type(x) is not int or not 0 < x <= 1 << 24 for x in v):
                raise ParentError(f"{where}: field {key} must be a list of 1 to {MAX_STAGES} positive integers, "
                                  f"not {str(v)[:80]}")
            lists[key] = v
        if len(lists["hidden_sizes"]) != len(lists["depths"]):
            raise ParentError(f"{where}: fields hidden_sizes ({len(lists['hidden_sizes'])} entries) and depths "
                              f"({len(lists['depths'])}) must give one entry per stage; fix the parent's config")
        n = cfg.get("num_stages")
        if n is not None and n != len(lists["depths"]):
            raise ParentError(f"{where}: field num_stages is {n!r}, but depths has {len(lists['depths'])} entries; "
                              "fix the parent's config")

    def dims(self, cfg: dict) -> Dims:
        self.check_config(cfg)
        hidden = tuple(cfg["hidden_sizes"])
        depths = tuple(cfg["depths"])
        ffn = tuple(FFN_RATIO * h for h in hidden)
        # no attention: heads and head_dim are 0; no vocabulary
        return Dims(hidden[-1], ffn[-1], 0, 0, 0, sum(depths), 0, hidden_sizes=hidden, intermediate_sizes=ffn,
                    depths=depths)

    def stage_ffn(self, hidden: int, parent_hidden: int, parent_ffn: int) -> int:
        return FFN_RATIO * hidden

    def child_config(self, cfg: dict, child: Dims, kept_layers: list[int], dtype_name: str) -> dict:
        out = dict(cfg)
        out["hidden_sizes"] = list(child.hidden_sizes)
        out["depths"] = list(child.depths)
        out["num_stages"] = len(child.depths)
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            out[k] = dtype_name
        return out

    # ------------------------------------------------------------------ behaviour
    def adjust_tensor(self, plan, ct, t):
        """GRN's scale: x (parent FFN width / child FFN width) for the layer's stage (see the
        module docstring); everything else as the base family (no rescale: no rule is a norm)."""
        if ct.rule.tag == "grn_weight":
            st = plan.parent.stage_of(ct.layer)
            t = t.float() * (plan.parent.intermediate_sizes[st] / plan.child.intermediate_sizes[st])
        return t

    def input_len(self, cfg: dict, inputs) -> int:
        p = int(cfg.get("patch_size") or 4)
        return (inputs.shape[-2] // p) * (inputs.shape[-1] // p)

    def embed(self, bm, pixels):
        return bm.base.embeddings(pixels)

    def block_for(self, cfg: dict):
        if any(a.endswith("ForImageClassification") for a in cfg.get("architectures") or ()):
            return self.extra["classifier"]
        return self.block

    def run_stages(self, bm, h, batch: int, observe=None, progress=None, observe_n: int | None = None):
        """Every stage, one resident at a time: downsampling, then each layer. Observed: each
        stage's channels (mean |x| of the stage's input after downsampling and of every layer's
        output), each layer's FFN neurons (the observe map's pwconv2 input) and each layer's
        Block Influence. Returns the last stage's spatial mean, [N, 1, C]."""
        from .spaces import Space

        dims = self.dims(bm.ckpt.config)
        n_obs = len(h) if observe_n is None else observe_n
        if observe is not None:   # layers numbered across stages
            observe._bi = [0.0] * dims.num_hidden_layers
            observe._n = [0] * dims.num_hidden_layers
            observe.n_layers = dims.num_hidden_layers
        dev = bm.device
        with torch.no_grad():
            for s, stage in enumerate(bm.layers):
                bm.readahead(s + 1)
                bm.load(stage)
                hooks = []
                if observe is not None:
                    for j, layer in enumerate(stage.layers):
                        hooks += observe.attach(dims.layer_offset(s) + j, layer)
                per = max(1, math.prod(h.shape[1:]))
                step = max(1, min(batch, bm.budget.act_bytes // (4 * FFN_RATIO * 2 * per)))
                ranges = [(a, min(a + step, n_obs)) for a in range(0, n_obs, step)]
                ranges += [(a, min(a + step, len(h))) for a in range(n_obs, len(h), step)]
                out = None
                try:
                    for a, e in ranges:
                        watch = observe is not None and a < n_obs
                        if observe is not None:
                            observe.active = watch
                        x = h[a:e].to(dev)
                        for m in stage.downsampling_layer:
                            x = m(x)
                        if watch:
                            observe.record(Space.STAGE_HIDDEN, s, x.abs().sum((0, 2, 3)).double().cpu())
                        for j, layer in enumerate(stage.layers):
                            y = layer(x)
                            if watch:
                                i = dims.layer_offset(s) + j
                                observe.record(Space.STAGE_HIDDEN, s, y.abs().sum((0, 2, 3)).double().cpu())
                                xf = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
                                yf = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])
                                cos = torch.nn.functional.cosine_similarity(xf, yf, dim=-1)
                                observe._bi[i] += float((1 - cos.double()).sum())
                                observe._n[i] += cos.numel()
                            x = y
                        if out is None:
                            out = bm.stream((len(h), *x.shape[1:]))
                        out[a:e] = x
                finally:
                    for hk in hooks:
                        hk.remove()
                    bm.free(stage)
                if progress is not None:
                    progress.advance(bm.layer_bytes(s))
                h = out
        if observe is not None:
            observe.active = True
        return h.mean(dim=(2, 3))[:, None, :]


E = "encoder.stages"
H, F = S.STAGE_HIDDEN, S.STAGE_FFN
STEM, PREV, LAST = At(H, 0), At(H, "prev"), At(H, -1)
OBSERVE = {F: "pwconv2"}


def _blocks(prefix: str) -> tuple[Block, Block]:
    kw = dict(observe=OBSERVE, final_norm="layernorm", causal=False, pool="mean", input_name="pixel_values",
              attn="eager")   # no attention: transformers refuses "sdpa" for it
    return (Block("AutoModel", "", "encoder.stages", **kw),
            Block("AutoModelForImageClassification", prefix, "encoder.stages", head="classifier", **kw))


def _rules(v2: bool) -> tuple:
    layer = [
        stage_rule(E, "dwconv.weight", (H, None, None, None), layers="layers"),
        stage_rule(E, "dwconv.bias", (H,), layers="layers"),
        stage_rule(E, "layernorm.weight", (H,), layers="layers"),
        stage_rule(E, "layernorm.bias", (H,), layers="layers"),
        stage_rule(E, "pwconv1.weight", (F, H), layers="layers"),
        stage_rule(E, "pwconv1.bias", (F,), layers="layers"),
        stage_rule(E, "pwconv2.weight", (H, F), layers="layers"),
        stage_rule(E, "pwconv2.bias", (H,), layers="layers"),
    ]
    if v2:
        layer += [stage_rule(E, "grn.weight", (None, None, None, F), layers="layers", tag="grn_weight"),
                  stage_rule(E, "grn.bias", (None, None, None, F), layers="layers")]
    else:
        layer += [stage_rule(E, "layer_scale_parameter", (H,), layers="layers")]
    return (
        rule("embeddings.patch_embeddings.weight", (STEM, None, None, None)),
        rule("embeddings.patch_embeddings.bias", (STEM,)),
        rule("embeddings.layernorm.weight", (STEM,)),
        rule("embeddings.layernorm.bias", (STEM,)),
        stage_rule(E, "downsampling_layer.0.weight", (PREV,)),
        stage_rule(E, "downsampling_layer.0.bias", (PREV,)),
        stage_rule(E, "downsampling_layer.1.weight", (H, PREV, None, None)),
        stage_rule(E, "downsampling_layer.1.bias", (H,)),
        *layer,
        rule("layernorm.weight", (LAST,)),           # the pooler's LayerNorm over the last stage
        rule("layernorm.bias", (LAST,)),
        rule("classifier.weight", (None, LAST)),     # class axis kept, width cut
        rule("classifier.bias", (None,)),
    )


KEYS = {"hidden_size": "hidden_sizes", "intermediate_size": None, "num_attention_heads": None,
        "num_key_value_heads": None, "num_hidden_layers": "depths", "vocab_size": None}
_v1 = _blocks("convnext")
_v2 = _blocks("convnextv2")

convnext = ConvNext(
    name="convnext",
    model_types=("convnext",),
    rules=_rules(v2=False),
    keys=KEYS,
    norm="layer",
    tie_default=False,
    block=_v1[0],
    extra={"classifier": _v1[1]},
    notes="ConvNextModel, ConvNextForImageClassification: staged widths (`hidden_sizes`) and depths "
          "(`depths`) per stage, downsampling between stages, depthwise conv, layer scale; FFN 4 x width",
)

convnextv2 = ConvNext(
    name="convnextv2",
    model_types=("convnextv2",),
    rules=_rules(v2=True),
    keys=KEYS,
    norm="layer",
    tie_default=False,
    block=_v2[0],
    extra={"classifier": _v2[1]},
    notes="ConvNextV2Model, ConvNextV2ForImageClassification: as convnext, with GRN (its scale compensated "
          "for the FFN cut) instead of layer scale",
)
