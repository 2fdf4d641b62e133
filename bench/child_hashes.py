#!/usr/bin/env python3
"""Hashes of every child a set of recipes makes from tiny parents of every family: a refactor
that must not change any output compares the lists from before and after.

For each parent (the planted parents of tests/planted.py and the tiny real parent of every family
case registered there) and each recipe below, the child is cut through the Python API with its
default verification; the line records the sha256 of the child's files (weights, config, tokenizer
files) and, separately, of the report with timings and temporary paths taken out (so stage
records, kept indices and verification numbers count too). A run that fails records its error instead.

    python bench/child_hashes.py --out before.txt            # at the base commit
    python bench/child_hashes.py --out after.txt             # after the change
    diff before.txt after.txt                                # no output: every child identical

`--only NAME` limits the parents (substring match).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

TEXT = {"samples": 8, "seq_len": 32, "batch_size": 4}


def recipes(target: dict, drop: list, data: str, rms: bool) -> dict[str, dict]:
    """name -> recipe dict. `data` is the family's random data kind (random_tokens / random_pixels)."""
    cal = {"data": data, **TEXT}
    depth = {"drop": list(drop)} if drop else None
    ver = {"data": data, "samples": 4, "seq_len": 32}

    def st(rank: dict | None, drop_st: dict | None, *extra) -> list:
        out = [{"rank_neurons": rank}] if rank is not None else []
        out += [{"drop_layers": drop_st}] if drop_st is not None and target.get("num_hidden_layers") else []
        return out + list(extra) + [{"slice_embeddings": {}}, {"rescale_norms": {}}]

    r = {
        "magnitude": dict(target=target, stages=st({"method": "magnitude"}, depth)),
        "activation-importance": dict(target=target, calibration=cal,
                                      stages=st({"method": "activation"}, {"strategy": "importance"})),
        "first": dict(target=target, stages=st({"method": "first"}, {"strategy": "first"})),
        "uniform": dict(target=target, stages=st({"method": "uniform"}, {"strategy": "last"})),
        "random": dict(target=target, stages=st({"method": "random"}, {"strategy": "middle"}), seed=3),
        "heal-always": dict(target=target, calibration=cal,
                            stages=st({"method": "activation"}, depth, {"heal": {"when": "always"}})),
        "heal-auto-own-calibration": dict(target=target, stages=st(
            {"method": "magnitude"}, {"strategy": "middle"}, {"heal": {"when": "auto", "calibration": cal}})),
        "default-pipeline": dict(target=target, calibration=cal),
        "budget": dict(target={"params_ratio": 0.6, "multiple_of": 8}, calibration=cal),
        "verify-gate": dict(target=target, stages=st({"method": "magnitude"}, depth), verify=ver),
        "bf16-out": dict(target=target, stages=st({"method": "magnitude"}, depth), output={"dtype": "bfloat16"}),
    }
    r["builtin-text-default"] = dict(target=target)
    if rms:
        r["rotate"] = dict(target=target, calibration=cal,
                           stages=[{"rank_neurons": {"method": "activation"}}, {"drop_layers": {"strategy": "middle"}},
                                   {"rotate_hidden": {}}, {"slice_embeddings": {}}])
    return r


def _with_tokenizer(p: Path) -> Path:
    """A planted Llama with a word-level tokenizer in its folder: builtin text calibrates it."""
    import shutil

    import planted
    from test_default_run import planted_tokenizer

    path = planted.llama_like(p).path
    tok = planted_tokenizer(p.parent / f"{p.name}-tok")
    for f in tok.iterdir():
        shutil.copyfile(f, Path(path) / f.name)
    return path


def parents(tmp: Path) -> list[tuple[str, Path, dict, list, bool]]:
    """(name, path, target, drop, rms) for every parent."""
    import planted

    llama_t = dict(hidden_size=48, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                   num_hidden_layers=3)
    out = []
    for mt in ("llama", "qwen2", "mistral", "qwen3"):
        out.append((f"planted-{mt}", lambda p, mt=mt: planted.llama_like(p, mt).path, llama_t, [2], True))
    out.append(("planted-llama-tied", lambda p: planted.llama_like(p, tie=True).path, llama_t, [2], True))
    out.append(("planted-llama-tokenizer", _with_tokenizer, llama_t, [2], True))
    out.append(("planted-gpt2", lambda p: planted.gpt2(p).path, dict(intermediate_size=96, num_hidden_layers=3),
                [1], False))
    out.append(("planted-bert", lambda p: planted.bert(p).path, dict(intermediate_size=96, num_hidden_layers=3),
                [1], False))
    out.append(("planted-vit", lambda p: planted.vit(p, classifier=True).path,
                dict(intermediate_size=96, num_hidden_layers=3), [2], False))
    out.append(("planted-dinov2", lambda p: planted.dinov2(p).path,
                dict(intermediate_size=128, num_hidden_layers=3), [2], False))
    for name, case in planted.BENCH_CASES.items():
        rms = name in ("gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe", "qwen3_moe")
        out.append((f"planted-{name}", lambda p, c=case: Path(c.planted(p).path), case.target, list(case.drop), rms))
        out.append((f"real-{name}", lambda p, c=case: Path(c.real(p)), case.real_target,
                    [1] if case.real_target.get("num_hidden_layers") else [], rms))
    return out


def _strip(x, tmp: str):
    if isinstance(x, dict):
        return {k: _strip(v, tmp) for k, v in x.items() if k not in ("seconds",)}
    if isinstance(x, list):
        return [_strip(v, tmp) for v in x]
    if isinstance(x, str):
        return x.replace(tmp, "<TMP>")
    return x


def child_hash(out: Path, tmp: str) -> str:
    """"<files> <report>": the hash of the child's files (weights, config, tokenizer files) and
    of its report (timings and temporary paths taken out)."""
    h = hashlib.sha256()
    rep = "-"
    for f in sorted(out.iterdir()):
        if f.name in ("shrinkit_report.md", "README.md"):
            continue   # derived from the report
        if f.name == "shrinkit_report.json":
            data = json.dumps(_strip(json.loads(f.read_text()), tmp), sort_keys=True).encode()
            rep = hashlib.sha256(data).hexdigest()[:16]
            continue
        h.update(f"{f.name} {hashlib.sha256(f.read_bytes()).hexdigest()}\n".encode())
    return f"{h.hexdigest()[:32]} {rep}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default="")
    a = ap.parse_args()
    import torch

    from shrinkit.api import subclone
    from shrinkit.families import family_for
    from shrinkit.checkpoint.reader import open_checkpoint

    torch.set_num_threads(1)  # identical float results whatever the load
    lines = []
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="shrinkit-hashes-") as td:
        tmp = Path(td)
        for name, make, target, drop, rms in parents(tmp):
            if a.only not in name:
                continue
            p = tmp / name
            path = Path(make(p))
            ck = open_checkpoint(path)
            data = family_for(ck.config).random_data
            ck.close()
            for rname, rec in recipes(target, drop, data, rms).items():
                out = tmp / f"{name}-{rname}"
                try:
                    subclone(path, {"name": rname, **rec}, out, force=True)
                    line = f"{name} {rname} {child_hash(out, str(tmp))}"
                except Exception as e:  # noqa: BLE001 - recorded
                    line = f"{name} {rname} ERROR {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                lines.append(line)
                print(line, flush=True)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} children, {time.time() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
