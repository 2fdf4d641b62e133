"""Dual encoders: a model of two towers (a text tower and an image tower) whose embeddings are
compared with each other: CLIP (`clip`: CLIPModel) and SigLIP (`siglip`: SiglipModel).

A dual encoder is not one family but two, side by side in one checkpoint: every tensor under
`text_model.` belongs to the text tower, every tensor under `vision_model.` to the image tower,
the projections that map each tower into the shared embedding space go with their tower, and a
few scalars (`logit_scale`, SigLIP's `logit_bias`) are kept whole. Each tower is cut by its own
family (clip_text_model, clip_vision_model, siglip_text_model, siglip_vision_model) as if it were
a model of its own (`view`: the tower's tensors without the prefix, and its nested config with the
keys it needs from the top level); shrinkit.towers runs them and joins the two children.
Tensor names stay as the parent stores them, so each tower's child is a model of its own
(CLIPTextModelWithProjection, CLIPVisionModelWithProjection, SiglipTextModel, SiglipVisionModel)
and the joined child's names are the parent's.

The projections keep their output dimension (CLIP's `projection_dim`, SigLIP's text head's
`projection_size`), so the child's image and text embeddings stay comparable with each other and
with the parent's. SigLIP has no image projection: its image embedding is the image tower's
pooled output, as wide as that tower's hidden size, so the image tower's hidden size is fixed at
the embedding width (`fixed_hidden`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint.reader import Checkpoint
from ..errors import ParentError, RecipeError


@dataclass(frozen=True)
class Tower:
    name: str                 # the recipe's key under `towers:` ("text", "vision")
    prefix: str               # the tower's tensors: "<prefix>.<name>"
    config_key: str           # its nested config ("text_config")
    model_type: str           # the family that cuts it ("clip_text_model")
    own: tuple[str, ...] = ()          # top-level tensors that belong to it (its projection)
    config_keys: tuple[str, ...] = ()  # top-level config keys its own config needs (projection_dim)
    fixed_hidden: bool = False         # its hidden size is the embedding width (SigLIP's image tower)


@dataclass(frozen=True)
class DualEncoder:
    name: str
    model_types: tuple[str, ...]
    towers: tuple[Tower, ...]
    shared: tuple[str, ...]   # top-level tensors kept whole
    notes: str = ""

    def tower(self, name: str) -> Tower:
        for t in self.towers:
            if t.name == name:
                return t
        raise RecipeError(f"a {self.name} parent has no tower {name!r}; its towers: "
                          + ", ".join(t.name for t in self.towers))

    def tower_config(self, cfg: dict, t: Tower, where: str = "config.json") -> dict:
        sub = cfg.get(t.config_key)
        if not isinstance(sub, dict):
            raise ParentError(f"{where}: field {t.config_key} is missing or not a mapping; a {self.name} config "
                              f"holds {', '.join(x.config_key for x in self.towers)}")
        out = {k: v for k, v in sub.items() if k not in ("architectures",)}
        out["model_type"] = t.model_type
        for k in t.config_keys:
            if k in cfg:
                out[k] = cfg[k]
        for k in ("dtype", "torch_dtype"):
            if k in cfg and k not in out:
                out[k] = cfg[k]
        return out

    def owner(self, name: str) -> Tower | None:
        """The tower a parent tensor belongs to (None: a shared tensor); ParentError for a tensor
        no tower and no shared name accounts for."""
        for t in self.towers:
            if name.startswith(t.prefix + ".") or name in t.own:
                return t
        if name in self.shared:
            return None
        raise ParentError(f"tensor {name!r} belongs to no tower of this {self.name} parent (expected "
                          + ", ".join(f"{t.prefix}.*" for t in self.towers) + " or " + ", ".join(self.shared)
                          + "); shrinkit does not know this layout")

    def views(self, ckpt: Checkpoint) -> dict[str, Checkpoint]:
        """Each tower as a checkpoint of its own, by tower name: its tensors (same names and bytes:
        the tower families' rules match names by their ends, and `text_model.*` plus
        `text_projection` is exactly what CLIPTextModelWithProjection stores) and its config. Reads
        go to the parent's mapped shards. ParentError for a tensor no tower accounts for (owner)."""
        parts: dict[str, dict] = {t.name: {} for t in self.towers}
        for name, info in ckpt.tensors.items():
            t = self.owner(name)
            if t is not None:
                parts[t.name][name] = info
        out = {}
        for t in self.towers:
            if not parts[t.name]:
                raise ParentError(f"the {self.name} parent holds no {t.prefix}.* tensors; it is not a {self.name} "
                                  "dual encoder")
            v = Checkpoint(ckpt.root, self.tower_config(ckpt.config, t, ckpt.config_path.name), ckpt.shards,
                           parts[t.name], ckpt.config_path, ckpt.weights_path)
            v._maps, v._files = ckpt._maps, ckpt._files   # one set of mapped shards
            out[t.name] = v
        return out

    def child_config(self, cfg: dict, towers: dict[str, dict], dtype_name: str) -> dict:
        """The joined child's config: the parent's, with each tower's child config nested back."""
        out = dict(cfg)
        for t in self.towers:
            was = cfg.get(t.config_key) or {}
            sub = {k: v for k, v in towers[t.name].items() if k not in t.config_keys and k not in ("dtype", "torch_dtype")}
            sub.update({k: was[k] for k in t.config_keys if k in was})   # the nested copy, as the parent had it
            sub["model_type"] = was.get("model_type", t.model_type)
            out[t.config_key] = sub
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            out[k] = dtype_name
        return out

    def check_child(self, parent_dims: dict, child_dims: dict) -> None:
        """A tower whose hidden size is the embedding width keeps it."""
        for t in self.towers:
            if t.fixed_hidden and child_dims[t.name].hidden_size != parent_dims[t.name].hidden_size:
                raise RecipeError(
                    f"towers.{t.name}: a {self.name} image embedding is the image tower's pooled output, as wide as "
                    f"its hidden_size ({parent_dims[t.name].hidden_size}), which the text tower's embeddings must match; "
                    f"keep hidden_size {parent_dims[t.name].hidden_size} (cut intermediate_size, heads or layers)")


clip = DualEncoder(
    name="clip",
    model_types=("clip",),
    towers=(Tower("text", "text_model", "text_config", "clip_text_model", own=("text_projection.weight",),
                  config_keys=("projection_dim",)),
            Tower("vision", "vision_model", "vision_config", "clip_vision_model", own=("visual_projection.weight",),
                  config_keys=("projection_dim",))),
    shared=("logit_scale",),
    notes="CLIPModel: each tower cut by its own family (clip_text_model, clip_vision_model); both projections keep "
          "projection_dim",
)

siglip = DualEncoder(
    name="siglip",
    model_types=("siglip",),
    towers=(Tower("text", "text_model", "text_config", "siglip_text_model"),
            Tower("vision", "vision_model", "vision_config", "siglip_vision_model", fixed_hidden=True)),
    shared=("logit_scale", "logit_bias"),
    notes="SiglipModel: each tower cut by its own family (siglip_text_model, siglip_vision_model); the text head "
          "keeps projection_size, the image tower keeps its hidden size (the image embedding's width)",
)

DUALS: tuple[DualEncoder, ...] = (clip, siglip)


def dual_for(config: dict) -> DualEncoder | None:
    """The dual encoder a config describes, or None for a one-tower model."""
    mt = config.get("model_type") if isinstance(config, dict) else None
    for d in DUALS:
        if mt in d.model_types:
            return d
    return None
