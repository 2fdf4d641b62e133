"""A family: the architecture map of one model family, as data, plus the few methods whose
behaviour data cannot express (a subclass of Family overrides them)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields

from pydantic import ValidationError

from ..errors import ParentError
from ..validate import ConfigCommon, field_error
from .spaces import SPACES, At, Fused, Rule, Space

MAX_SIZE = 1 << 40   # no config size is larger (the tensors' shapes must agree anyway)


@dataclass(frozen=True)
class Dims:
    """The canonical shape of a model, whatever its family calls the config keys."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    # mixture-of-experts families only (None elsewhere)
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    expert_intermediate_size: int | None = None
    shared_expert_intermediate_size: int | None = None
    # hierarchical (staged) families only: one width, FFN width and depth per stage; then
    # hidden_size is the last stage's width and num_hidden_layers the sum of the depths, and
    # layers are numbered across stages (stage 0's first, then stage 1's, ...)
    hidden_sizes: tuple[int, ...] | None = None
    intermediate_sizes: tuple[int, ...] | None = None
    depths: tuple[int, ...] | None = None

    def as_dict(self) -> dict:
        # a staged family without attention or vocabulary: its zero heads, head_dim and vocab left out
        none = ("num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size") if self.depths else ()
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if v is not None and not (k in none and v == 0)}

    def layer_offset(self, stage: int) -> int:
        """The first layer of `stage` in the numbering across stages."""
        return sum(self.depths[:stage])

    def stage_of(self, layer: int) -> int:
        """The stage that holds `layer` (numbered across stages)."""
        for s, n in enumerate(self.depths):
            if layer < n:
                return s
            layer -= n
        raise IndexError("layer beyond the last stage")


# canonical names a recipe's target may set, mapped to each family's config keys by Family.keys
CANONICAL = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
             "num_experts", "num_experts_per_tok", "expert_intermediate_size", "shared_expert_intermediate_size")
STAGED = ("hidden_sizes", "intermediate_sizes", "depths")   # per-stage sizes (staged families)
OPTIONAL = tuple(f.name for f in fields(Dims) if f.default is None and f.name not in STAGED)


@dataclass(frozen=True)
class Multiple:
    """A shape constraint of the runtime a family's children are loaded into: the child's `dim`
    (a Dims field) must be a multiple of `of`, or transformers' default kernels refuse to run
    the child as loaded. `why` names the kernel and its rule (the plan's refusal quotes it)."""

    dim: str
    of: int
    why: str

    def nearest(self, value: int, parent: int) -> list[int]:
        """The valid sizes nearest to `value` (below it, and above it up to the parent's)."""
        lo, hi = value // self.of * self.of, -(-value // self.of) * self.of
        return [v for v in (lo, hi) if 0 < v <= parent and v != value] or [parent]


@dataclass(frozen=True)
class Block:
    """How calibration and verification find and run this family's blocks in transformers'
    own modules (all paths are module names)."""

    auto: str                 # transformers Auto class that builds the model from its config
    base: str                 # the base model inside it ("" for the model itself)
    layers: str               # the ModuleList of blocks, relative to base
    # space -> module (relative to a block) whose *input* runs along that space: its activations
    # score the space. A head space scores each head's contribution |O_h z_h| through the module's
    # weight; an index space scores mean |input| per index. "{expert}" in a path: one per expert.
    observe: dict = field(default_factory=dict)
    in_first: bool = False    # linear weights stored [in, out] (GPT-2's Conv1D) rather than [out, in]
    final_norm: str | None = None   # relative to base
    head: str | None = None         # output head, relative to the model
    causal: bool = True
    attn: str = "sdpa"        # transformers attention implementation the blocks run with
    # the heal stage refits these (relative to a block; None: the family cannot be healed):
    out_proj: str | None = None     # the attention output projection (writes into the residual stream)
    down_proj: str | None = None    # the MLP output projection (writes into the residual stream)
    # post-norm blocks: the norm whose input is the residual stream (its output is the block's)
    residual_norm: str | None = None
    # sandwich-norm blocks (Gemma 2/3): the norm applied to down_proj's output before it is added
    # to the residual stream (heal fits the projection's output that this norm maps onto the target)
    down_norm: str | None = None
    # a per-channel scale (a parameter, relative to a block) applied to the MLP output projection's
    # output before the residual add (DINOv2's layer scale): heal fits that output in its own units
    down_scale: str | None = None
    # non-causal models: how verification pools a sequence into one embedding ("mean" over the
    # positions, "first": the CLS position after final_norm, or "last": the last position, where
    # CLIP's and SigLIP's text towers read their embedding), the keyword that feeds a model
    # its inputs, and extra keywords for every child forward call
    pool: str = "mean"
    input_name: str = "input_ids"
    call_kwargs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    rules: tuple[Rule, ...]
    # canonical name -> the family's config key (None: the family has no such key; a tuple: the
    # first of these keys that the config has, else the first: transformers renamed some keys)
    keys: dict[str, str | tuple[str, ...] | None]
    norm: str                        # "rms" or "layer"
    tie_default: bool                # transformers' default for tie_word_embeddings
    head_dim_from_hidden: bool = False   # head_dim = hidden / heads (GPT-2, BERT); else explicit
    write_head_dim: bool = False         # write head_dim into the child's config
    ffn_default_factor: int | None = None  # GPT-2: n_inner null means 4 * n_embd
    layer_lists: tuple[str, ...] = ("layer_types", "mlp_layer_types")  # per-layer config lists, cut with the layers
    # model types whose transformers config requires hidden_size % num_attention_heads == 0
    heads_divide_hidden: tuple[str, ...] = ()
    block: Block | None = None           # None: no calibration or verification for this family
    # rotate_hidden: norm scale tensor -> the tensors that read that norm's output (name suffixes,
    # within one layer, or global); empty: the family cannot be rotated
    norm_readers: dict = field(default_factory=dict)
    # README "Supported families" row: what is special about this family (tests check the table)
    notes: str = ""
    extra: dict = field(default_factory=dict)
    # shape constraints of the runtime the children load into (transformers' default kernels):
    # plan refuses a target that breaks one and the budget solver never proposes one; a size the
    # parent itself has is accepted (the parent's own runtime limits are the parent's)
    runtime: tuple[Multiple, ...] = ()

    # ---------------------------------------------------------------- config <-> dims
    def config_key(self, cfg: dict, canon: str) -> str | None:
        """The config key holding canonical `canon` in this config (None: the family has none)."""
        key = self.keys.get(canon)
        if isinstance(key, tuple):
            return next((k for k in key if k in cfg), key[0])
        return key

    def _get(self, cfg: dict, canon: str):
        key = self.config_key(cfg, canon)
        return cfg.get(key) if key else None

    def check_config(self, cfg: dict, where: str = "config.json") -> None:
        """The config keys this family reads, by schema: the common keys typed (validate.ConfigCommon),
        every shape key a positive integer, the head counts consistent. One line naming the file and
        the field (ParentError, exit 3)."""
        try:
            ConfigCommon.model_validate(cfg)
        except ValidationError as e:
            raise ParentError(f"{where}: {field_error(e)}; fix the parent's config") from None
        need = ", ".join(self.config_key(cfg, c) for c in self.keys if self.keys[c])

        def num(key: str | None, required: bool):
            if not key:
                return None
            v = cfg.get(key)
            if v is None:
                if required:
                    raise ParentError(f"{where}: field {key} is missing; a {self.name} config needs {need}")
                return None
            if type(v) is not int or not 0 < v <= MAX_SIZE:
                raise ParentError(f"{where}: field {key} must be a positive integer, not {v!r}")
            return v

        key = lambda canon: self.config_key(cfg, canon)  # noqa: E731
        hidden, heads = num(key("hidden_size"), True), num(key("num_attention_heads"), True)
        num(key("num_hidden_layers"), True)
        num(key("vocab_size"), True)
        num(key("intermediate_size"), not self.ffn_default_factor)
        kv = num(key("num_key_value_heads"), False)
        for canon in OPTIONAL:
            num(key(canon), False)
        hd = None if self.head_dim_from_hidden else num("head_dim", False)
        if kv is not None and (kv > heads or heads % kv):
            raise ParentError(f"{where}: field {self.keys['num_key_value_heads']} is {kv}, which does not divide "
                              f"{self.keys['num_attention_heads']} {heads}; fix the parent's config")
        if hd is None and hidden % heads:
            raise ParentError(f"{where}: field {self.keys['hidden_size']} {hidden} is not divisible by "
                              f"{self.keys['num_attention_heads']} {heads}; fix the parent's config")

    def expected_shape(self, rule: Rule, dims: Dims, stage: int | None = None) -> tuple[int | None, ...]:
        """The length of each axis of a tensor under `rule`, as the config's dims say it must be
        (None: the rule does not tie the axis to a space). A fused axis is the sum of its parts;
        a staged space's length is its stage's (`stage`: the tensor's own)."""
        out = []
        n_stages = len(dims.depths) if dims.depths else None
        for a in rule.axes:
            if a is None:
                out.append(None)
            elif isinstance(a, Fused):
                sizes = a.part_sizes(dims)
                out.append(None if None in sizes else sum(sizes))
            elif isinstance(a, At):
                out.append(a.space.elems(dims, a.resolve(stage, n_stages or 0)))
            else:
                out.append(a.elems(dims, stage))
        return tuple(out)

    def dims(self, cfg: dict) -> Dims:
        self.check_config(cfg)
        try:
            hidden = int(self._get(cfg, "hidden_size"))
            heads = int(self._get(cfg, "num_attention_heads"))
            layers = int(self._get(cfg, "num_hidden_layers"))
            vocab = int(self._get(cfg, "vocab_size"))
        except (TypeError, ValueError) as e:
            raise ParentError(f"config.json of this {self.name} parent lacks a shape key ({e}); "
                              f"expected {', '.join(str(k) for k in self.keys.values() if k)}") from e
        ffn = self._get(cfg, "intermediate_size")
        if ffn is None and self.ffn_default_factor:
            ffn = self.ffn_default_factor * hidden
        if ffn is None and self.keys.get("intermediate_size") is None:
            ffn = 0   # no dense FFN at all (every layer's FFN is experts)
        kv = self._get(cfg, "num_key_value_heads") or heads
        hd = None if self.head_dim_from_hidden else cfg.get("head_dim")
        if hd is None:
            if hidden % heads:
                raise ParentError(f"parent hidden size {hidden} is not divisible by its {heads} heads")
            hd = hidden // heads
        opt = {}
        for canon in OPTIONAL:
            v = self._get(cfg, canon)
            if v is not None:
                opt[canon] = int(v)
        return Dims(hidden, int(ffn), heads, int(kv), int(hd), layers, vocab, **opt)

    def child_config(self, cfg: dict, child: Dims, kept_layers: list[int], dtype_name: str) -> dict:
        out = dict(cfg)
        for canon in CANONICAL:
            key = self.config_key(cfg, canon)
            if key and getattr(child, canon) is not None:
                out[key] = getattr(child, canon)
        if self.write_head_dim:
            out["head_dim"] = child.head_dim
        n_parent = self.dims(cfg).num_hidden_layers
        for k in self.layer_lists:
            v = cfg.get(k)
            if isinstance(v, list) and len(v) == n_parent:
                out[k] = [v[i] for i in kept_layers]
        for k in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            out[k] = dtype_name
        return out

    def runtime_problems(self, child: Dims, parent: Dims) -> list[tuple[Multiple, int]]:
        """(constraint, child size) for every runtime constraint the child's dims break."""
        out = []
        for c in self.runtime:
            v, p = getattr(child, c.dim), getattr(parent, c.dim)
            if v is not None and v != p and v % c.of:
                out.append((c, v))
        return out

    def check_runtime(self, child: Dims, parent: Dims) -> None:
        """RecipeError (exit 2) naming the nearest valid sizes when the child's dims break a
        runtime constraint (its children would be written but not run as loaded)."""
        from ..errors import RecipeError

        for c, v in self.runtime_problems(child, parent):
            near = " or ".join(str(x) for x in c.nearest(v, getattr(parent, c.dim)))
            raise RecipeError(f"target {c.dim} {v} would give a {self.name} child that transformers cannot run as "
                              f"loaded: {c.why}; use {near}")

    def check_layers(self, kept_layers: list[int]) -> None:
        """RecipeError (exit 2) when the child cannot keep these parent layers (a family whose
        first layer differs from the others keeps it first)."""

    def pin_influence(self, influence: list[float]) -> list[float]:
        """Layer influence as importance dropping ranks it: layers the family must keep get inf."""
        return influence

    def max_positions(self, cfg: dict) -> int | None:
        """The longest sequence the model takes (its position table), or None where it has no limit."""
        v = self._get(cfg, "max_position_embeddings")
        return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None

    def tied(self, cfg: dict) -> bool:
        v = cfg.get("tie_word_embeddings")
        return self.tie_default if v is None else bool(v)

    # ---------------------------------------------------------------- tensor rules
    def match(self, name: str) -> tuple[Rule, re.Match] | None:
        for r in self.rules:
            m = r.regex.search(name)
            if m:
                return r, m
        return None

    def spaces(self) -> tuple[Space, ...]:
        """The spaces this family's tensors live in (and the spaces they are chosen within),
        in declaration order."""
        used = {sp for r in self.rules for _, sp in r.spaces()}
        used |= {sp.within for sp in used if sp.within is not None}
        return tuple(s for s in SPACES if s in used)

    # ---------------------------------------------------------------- stages (hierarchical families)
    def stage_ffn(self, hidden: int, parent_hidden: int, parent_ffn: int) -> int:
        """A staged family's FFN width for a stage of width `hidden` (the parent's stage has
        `parent_hidden` and `parent_ffn`): by default the parent's ratio, which must be whole."""
        return parent_ffn * hidden // parent_hidden

    def run_stages(self, bm, h, batch: int, observe=None, progress=None, observe_n: int | None = None):
        """A staged family's forward through every stage (BlockModel.run_layers delegates here
        when `staged` is set): returns the final states [N, T, H] of the last stage."""
        raise NotImplementedError

    staged = False   # a hierarchical family: widths and depths per stage (Dims.hidden_sizes, depths)

    # ---------------------------------------------------------------- behaviour (override per family)
    def rescale(self, rule: Rule, t, factor: float):
        """The child tensor after rescale_norms by `factor` (sqrt(parent hidden / child hidden)
        by default), or t unchanged. Default: a norm weight w becomes w * factor, computed in
        float32 (the caller casts to the child's dtype)."""
        if not rule.norm:
            return t
        return t.float() * factor

    def magnitude(self, rule: Rule, t):
        """The weights whose |w| magnitude ranking scores, for a parent tensor as stored.
        Default: the tensor itself; a norm whose scale is 1 + w returns 1 + w."""
        return t

    def adjust(self, plan, rule: Rule, t):
        """A cut tensor's child values (t: a block of rows, as cut). Default: rescale_norms'
        rule with plan.norm_factor (None: no rescale_norms stage, or a factor of 1). A family
        whose forward depends on the dims themselves (an embedding multiplied by sqrt(hidden))
        compensates here, from plan.parent and plan.child."""
        if plan.norm_factor is None:
            return t
        return self.rescale(rule, t, plan.norm_factor)
    def adjust_tensor(self, plan, ct, t):
        """adjust() for one child tensor (a ChildTensor: its rule, layer, expert and stage);
        a family whose adjustment depends on where the tensor is overrides this."""
        return self.adjust(plan, ct.rule, t)

    # ---------------------------------------------------------------- data (text tokens by default)
    random_data = "random_tokens"   # the data kind verification falls back to without a data source
    data_kinds = "builtin, random_tokens or a .txt/.jsonl file"

    def has_data_source(self, root, tokenizer=None) -> bool:
        """Whether built-in calibration data can be read for this parent (a tokenizer for text)."""
        from ..text import has_tokenizer
        return bool(tokenizer) or has_tokenizer(root)

    def check_layout(self, cfg: dict, names, where: str = "config.json") -> None:
        """Before any work, after the shapes: what the config says each layer holds against the
        tensor names (ParentError, exit 3). Most families have nothing to add."""

    def check_data(self, data: str) -> None:
        """Before any work: the calibration data names something this family can read
        (RecipeError, exit 2)."""
        import os

        from ..errors import RecipeError
        if data not in ("builtin", self.random_data) and not os.path.isfile(data):
            raise RecipeError(f"calibration data {data!r} is neither builtin, random_tokens nor an existing "
                              ".txt/.jsonl file")

    def calibration_inputs(self, ckpt, spec, dims: Dims, *, seed: int, split: str = "calib", tokenizer=None):
        """The model inputs for calibration (split "calib") or verification ("heldout")."""
        from ..text import calibration_tokens
        return calibration_tokens(ckpt, spec, dims.vocab_size, seed=seed, split=split, tokenizer=tokenizer)

    def input_len(self, cfg: dict, inputs) -> int:
        """Positions per sample that the blocks see (sizes the micro-batches)."""
        return int(inputs.shape[1])

    def describe_inputs(self, inputs) -> str:
        return f"{inputs.shape[0]} x {inputs.shape[1]} tokens"

    def block_for(self, cfg: dict) -> Block | None:
        """The block description for this parent's config (a family whose architectures differ
        in their heads or modules overrides this)."""
        return self.block

    def checkpoint_name(self, param: str) -> tuple[str, tuple[int, int] | None] | None:
        """Where a transformers module parameter lives on disk when the names differ: (stored
        name, or a suffix of it; (part, parts): the parameter is that chunk along axis 0 of a
        fused stored tensor, or None). None: the names agree."""
        return None

    # Calibration and verification run the parent's blocks in transformers' modules (see
    # shrinkit.runtime.BlockModel, passed as bm: bm.model, bm.base, bm.device). These three
    # methods are what differs between families in that forward pass.
    embed_as_stored = True   # the embedding modules are plain lookups (no float32 copy needed)

    def embedding_modules(self, bm) -> list:
        """The modules that form a block-0 input from token ids (loaded for embed())."""
        return [bm.model.get_input_embeddings()]

    def embed(self, bm, ids):
        """Token ids [B, T] -> the first block's input [B, T, H]."""
        return bm.model.get_input_embeddings()(ids)

    def layer_call(self, bm, layer, x):
        """One block's output for input x [B, T, H] (full attention, no padding)."""
        y = layer(x, attention_mask=None)
        return y[0] if isinstance(y, tuple) else y

    def logits(self, bm, h):
        """Output logits from the last block's output h (verification); the final norm and
        head are loaded by the caller."""
        norm = bm.final_norm()
        return bm.head()(norm(h) if norm is not None else h)

    def stored_as(self, bm, name: str):
        """For a model parameter (transformers' in-memory name) that the checkpoint stores in
        pieces, neither under its own name nor under checkpoint_name(): a list of lists of
        checkpoint names, each inner list concatenated along axis 0 and the results stacked along
        a new first axis (transformers holds MoE experts stacked, [experts, ...]; checkpoints
        store one tensor per expert). None: not in pieces. Names may carry `name`'s prefix.
        (A plain string is looked up as one checkpoint name.)"""
        return None

    def observers(self, bm, i: int, layer, record) -> list:
        """Extra forward hooks on block i for statistics the observe map cannot express (router
        load, ...); record(space, key, vector) adds a score vector. Returns the hook handles."""
        return []
