#!/usr/bin/env python3
"""Wall time and peak memory of `shrinkit subclone` against the naive transformers way and the disk.

Not a test: a benchmark that prints Markdown tables. For each preset it makes (once, cached under
$SHRINKIT_CACHE/synthetic/, default ~/.cache/shrinkit) a synthetic Llama-shaped bf16 parent with
random weights (see bench/common.py), then times these arms, each a separate subprocess
(wall clock from spawn to exit, so Python start-up and imports count):

  disk                 read every parent shard (8 MB chunks), write the child's byte count to a
                       new file and fsync it: what the disk alone costs for this job
  naive                bench/naive_slice.py: transformers from_pretrained, slice the leading
                       indices in memory, save_pretrained (then fsync)
  shrinkit-METHOD      .venv/bin/shrinkit subclone PARENT --recipe half-METHOD.yaml --out OUT --force --quiet
                       (METHOD: first, magnitude, activation, uniform, random); the recipe halves
                       hidden, ffn, heads, kv heads and layers (drop middle), rescales norms, bf16.
                       shrinkit caches shard sha256 hashes by file identity; an untimed shrinkit run per
                       preset fills that cache first, so these arms time a repeat cut of a known parent
  shrinkit-METHOD-nocache  the same with SHRINKIT_NO_HASH_CACHE=1: every shard is hashed (2 threads,
                       overlapping the cut), as on the first cut of a new parent
  shrinkit-drop        depth only: recipes/drop-middle.yaml (target num_hidden_layers = half;
                       drop_layers middle + slice_embeddings; no ranking, no rescale; bf16)
  mergekit             mergekit 0.1.5's passthrough merge of the same layer ranges (bench/mergekit_arm.py;
                       its own virtualenv <cache>/mergekit-venv, made once by ensure_mergekit()):
                       mergekit-yaml CONFIG OUT --no-cuda --lazy-unpickle --no-copy-tokenizer --quiet,
                       then `sync` of the files it wrote (mergekit does not fsync; the other arms do)
  naive-calibration    bench/naive_calibrate.py: from_pretrained(parent, dtype=float32), forward the
                       calibration tokens of shrinkit-activation's recipe through the whole model with
                       hooks collecting the same statistics (writes only the statistics)
  startup              (not in the default list) python -c "import shrinkit.cli, shrinkit.pipeline": the
                       interpreter plus shrinkit's imports (torch), the floor under every shrinkit arm

Every child is half width and half depth, so all arms write the same number of bytes. Arms run
round-robin, `--repeat` times; the table gives the median and min wall time, the ratio of the
medians to naive and to disk, and the peak memory: the arm's anonymous resident memory (RssAnon
from /proc/PID/status summed over the process and its descendants, sampled every --interval s
from this process; file-backed pages such as a memory-mapped parent do not count) and, for
reference, the peak total RSS (the sampled VmHWM, which also counts mapped file pages).

Page cache: by default "warm": the parent's shards are read once (and the libraries imported once)
before timing, so every arm starts with the parent in the page cache. --cold instead drops the
page cache (sync; echo 3 > /proc/sys/vm/drop_caches) before every arm; it needs root and a kernel
that allows it (it fails in some containers; the script says so and stops).

After the repeats of a preset it checks the shrinkit-first child cheaply against the naive child
(config dims, total bytes within 1 %, tensor names/shapes, bitwise equal embeddings and layer 0,
norms rescaled by sqrt(2), child layer 4 = parent layer 12 under middle-dropping); that every
-nocache child is byte-identical to its cached twin's; the mergekit child against the shrinkit-drop
child (config, tensor names, shapes, dtypes, bitwise equality) and the shrinkit-drop child against
the parent's kept layers; and, for the first preset, naive-calibration's statistics against shrinkit's
own block-by-block calibration (untimed).

The shrinkit arms pass --no-verify when the CLI has it (so they time the cut, not shrinkit's own
held-out forward passes); --shrinkit-verify keeps the verification inside the timed run. Arms named
shrinkit-METHOD-default never pass it: they time the command a user types, shrinkit's default
check included (a structural read-back for data-free methods, held-out verification sharing the
calibration pass for `activation`).
Shared machines: before each run the script waits (up to --wait-idle s) for other processes' CPU
use to drop, and records other processes' CPU share just before and during every run (a warning
follows the table when it was high). --snapshot times a private copy of shrinkit/ so that edits to
the tree during a long run do not mix code versions; the table names the code version it timed.

Usage (from the repository root):
  .venv/bin/python bench/speed.py                                 # 1.7gb preset, 3 repeats
  .venv/bin/python bench/speed.py --presets 0.5gb,1.7gb,4gb --json /tmp/speed.json
  .venv/bin/python bench/speed.py --arms disk,shrinkit-first --repeat 5 --cold
  .venv/bin/python bench/speed.py --profile --snapshot             # also cProfile first & magnitude
  .venv/bin/python bench/speed.py --presets 0.5gb,1.7gb,4gb --plot /tmp/speed.png  # needs matplotlib
  .venv/bin/python bench/speed.py --generate-only --presets 4gb
  .venv/bin/python bench/speed.py --arms shrinkit-drop,mergekit,shrinkit-first,shrinkit-first-nocache
  .venv/bin/python bench/speed.py --arms shrinkit-activation,naive-calibration --slow-repeat 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402  (stdlib only at import time)
import mergekit_arm  # noqa: E402  (stdlib + common at import time)

VENV_BIN = ROOT / ".venv" / "bin"
PY = str(VENV_BIN / "python") if (VENV_BIN / "python").exists() else sys.executable
SHRINKIT = str(VENV_BIN / "shrinkit") if (VENV_BIN / "shrinkit").exists() else (shutil.which("shrinkit") or "shrinkit")
DEFAULT_ARMS = ["disk", "naive", "shrinkit-first", "shrinkit-magnitude", "shrinkit-activation"]
SHRINKIT_METHODS = ("first", "magnitude", "activation", "uniform", "random", "drop", "heal", "rotate")
NOCACHE = "-nocache"  # arm suffix: run that shrinkit arm with SHRINKIT_NO_HASH_CACHE=1
DEFAULT = "-default"  # arm suffix: the command a user types (no --no-verify): shrinkit's default check included
SLOW_ARMS = ("shrinkit-activation", "shrinkit-activation-nocache", "shrinkit-activation-default",
             "naive-calibration", "shrinkit-heal", "shrinkit-rotate")  # --slow-repeat
DROP_ARMS = ("shrinkit-drop", "shrinkit-drop-nocache", "mergekit")  # depth-only children (full width)
CHUNK = 8 << 20
SHRINKIT_EXTRA: list[str] = []  # e.g. ["--no-verify"], decided in main()
RUN_CWD = [ROOT]  # where the arms run; a --snapshot run moves it off the repository so `-m shrinkit` finds the copy
DROP_CACHES = "/proc/sys/vm/drop_caches"


# ---------------------------------------------------------------------------------------------
# the disk arm (runs in its own interpreter: `speed.py --disk-arm OUT NBYTES SHARD...`)

def disk_arm(out: str, nbytes: int, shards: list[str]) -> None:
    buf = bytearray(CHUNK)
    mv = memoryview(buf)
    left = nbytes
    with open(out, "wb", buffering=0) as w:
        for s in shards:
            with open(s, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    if left > 0:
                        k = min(n, left)
                        w.write(mv[:k])
                        left -= k
        while left > 0:  # a child larger than its parent: never, but stay exact
            k = min(CHUNK, left)
            w.write(mv[:k])
            left -= k
        os.fsync(w.fileno())


# ---------------------------------------------------------------------------------------------
# measuring a subprocess

def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except (OSError, ValueError):
        pass
    return out


def _descendants(pid: int) -> set[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


class Sampler(threading.Thread):
    """Polls /proc for the peak RssAnon (summed over the process tree), VmRSS and VmHWM."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.stop = threading.Event()
        self.peak_anon_kb = self.peak_rss_kb = self.hwm_kb = 0
        self.samples = 0
        self.max_procs = 1

    def run(self) -> None:
        pids, scanned = {self.pid}, 0.0
        while True:
            now = time.monotonic()
            if now - scanned > 0.25:  # a full /proc scan is costlier than a status read
                pids, scanned = {self.pid} | _descendants(self.pid), now
                self.max_procs = max(self.max_procs, len(pids))
            anon = rss = 0
            for p in pids:
                st = _status_kb(p)
                anon += st.get("RssAnon", 0)
                rss += st.get("VmRSS", 0)
                if p == self.pid:
                    self.hwm_kb = max(self.hwm_kb, st.get("VmHWM", 0))
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self.peak_rss_kb = max(self.peak_rss_kb, rss)
            self.samples += 1
            if self.stop.wait(self.interval):
                return


def run_measured(cmd: list[str], log: Path, interval: float, env: dict) -> dict:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as lf:
        busy0, total0 = _cpu_times()
        self0 = time.process_time()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, cwd=RUN_CWD[0], env=env)
        s = Sampler(p.pid, interval)
        s.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    s.stop.set()
    s.join()
    busy1, total1 = _cpu_times()
    hz = os.sysconf("SC_CLK_TCK")
    ours = (ru.ru_utime + ru.ru_stime + time.process_time() - self0) * hz
    others = max(0.0, (busy1 - busy0 - ours) / max(1, total1 - total0))
    p.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace")[-3000:]
    return {
        "wall_s": round(wall, 4),
        "rc": p.returncode,
        "peak_anon_mb": round(s.peak_anon_kb / 1024, 1),
        # ru_maxrss is not used: it also counts the pre-exec fork of this (large) benchmark process
        "peak_rss_mb": round(max(s.hwm_kb, s.peak_rss_kb) / 1024, 1),
        "vmhwm_mb": round(s.hwm_kb / 1024, 1),
        "ru_maxrss_mb": round(ru.ru_maxrss / 1024, 1),
        "user_s": round(ru.ru_utime, 3),
        "sys_s": round(ru.ru_stime, 3),
        "others_cpu_during": round(others, 3),  # busy fraction of all CPUs not used by the arm or by us
        "samples": s.samples,
        "max_procs": s.max_procs,
        "log": str(log),
        "tail": tail,
    }


# ---------------------------------------------------------------------------------------------
# arms, recipes, cache

def bench_dir() -> Path:
    return common.cache_dir() / "bench"


def recipe_for(preset: common.Preset, method: str) -> Path:
    """bench/recipes/half-METHOD.yaml (or half-first.yaml with the method swapped) with the target
    rewritten for this preset, written under <cache>/bench/recipes/<preset>/."""
    import yaml

    if method == "drop":  # depth only: the twin of the mergekit arm
        tpl = HERE / "recipes" / "drop-middle.yaml"
        data = yaml.safe_load(tpl.read_text())
        data["target"] = {"num_hidden_layers": preset.dims.half().num_hidden_layers}
        out = bench_dir() / "recipes" / preset.name / "drop-middle.yaml"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# generated by bench/speed.py from {tpl.name} for preset {preset.name}\n"
                       + yaml.safe_dump(data, sort_keys=False))
        return out
    tpl = HERE / "recipes" / f"half-{method}.yaml"
    data = yaml.safe_load((tpl if tpl.is_file() else HERE / "recipes" / "half-first.yaml").read_text())
    data["target"] = preset.dims.half().target()
    for st in data["stages"]:
        if "rank_neurons" in st and method not in ("heal", "rotate"):  # those two rank by activation
            st["rank_neurons"] = {**(st["rank_neurons"] or {}), "method": method}
    data["name"] = f"half-{method}"
    out = bench_dir() / "recipes" / preset.name / f"half-{method}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# generated by bench/speed.py from {tpl.name if tpl.is_file() else 'half-first.yaml'} "
                   f"for preset {preset.name}\n" + yaml.safe_dump(data, sort_keys=False))
    return out


def out_dir(preset: common.Preset, arm: str) -> Path:
    return bench_dir() / "out" / preset.name / arm


def arm_command(arm: str, preset: common.Preset) -> list[str]:
    parent = str(common.parent_dir(preset))
    out = out_dir(preset, arm)
    if arm == "disk":
        return [PY, str(HERE / "speed.py"), "--disk-arm", str(out / "child.bin"),
                str(common.n_bytes(preset.dims.half()))] + [str(p) for p in common.shard_paths(preset)]
    if arm == "naive":
        return [PY, str(HERE / "naive_slice.py"), parent, str(out)]
    if arm == "startup":
        return [PY, "-c", "import shrinkit.cli, shrinkit.pipeline"]  # shrinkit's own start-up (torch, typer)
    if arm == "mergekit":
        cfg = mergekit_arm.write_config(preset, bench_dir() / "recipes" / preset.name / "mergekit-drop-middle.yml")
        mk = " ".join(_sh_quote(x) for x in mergekit_arm.mergekit_command(cfg, out))
        # mergekit does not fsync; the other arms do, so the arm syncs the files it wrote (timed)
        return ["/bin/sh", "-c", f"{mk} && sync {_sh_quote(str(out))}/* {_sh_quote(str(out))}"]
    if arm == "naive-calibration":
        return [PY, str(HERE / "naive_calibrate.py"), parent, str(out / "stats.pt"),
                "--recipe", str(recipe_for(preset, "activation"))]
    method = shrinkit_method(arm)
    if method:
        recipe = recipe_for(preset, method)
        extra = [x for x in SHRINKIT_EXTRA if x != "--no-verify"] if arm.endswith(DEFAULT) else SHRINKIT_EXTRA
        return [SHRINKIT, "subclone", parent, "--recipe", str(recipe), "--out", str(out), "--force", "--quiet"] \
            + extra
    raise SystemExit(f"unknown arm {arm!r}; known: disk, naive, startup, mergekit, naive-calibration, "
                     + ", ".join(f"shrinkit-{m}" for m in SHRINKIT_METHODS)
                     + f" (shrinkit arms also as shrinkit-METHOD{NOCACHE} and shrinkit-METHOD{DEFAULT})")


def _sh_quote(x: str) -> str:
    import shlex

    return shlex.quote(x)


def shrinkit_method(arm: str) -> str | None:
    """`first` for shrinkit-first and shrinkit-first-nocache; None for a non-shrinkit arm."""
    if not arm.startswith("shrinkit-"):
        return None
    m = arm[len("shrinkit-"):]
    for suffix in (NOCACHE, DEFAULT):
        if m.endswith(suffix):
            m = m[: -len(suffix)]
    return m if m in SHRINKIT_METHODS else None


def arm_env(arm: str, env: dict) -> dict:
    """The environment an arm runs in: -nocache arms turn shrinkit's shard-hash cache off; mergekit runs in
    its own virtualenv, without the snapshot's PYTHONPATH."""
    if arm.endswith(NOCACHE):
        return {**env, "SHRINKIT_NO_HASH_CACHE": "1"}
    if arm == "mergekit":
        e = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "SHRINKIT_NO_HASH_CACHE")}
        e["PATH"] = str(mergekit_arm.venv_dir() / "bin") + os.pathsep + e.get("PATH", "")
        return e
    return {k: v for k, v in env.items() if k != "SHRINKIT_NO_HASH_CACHE"}


def prepare_out(preset: common.Preset, arm: str) -> None:
    """Remove the previous run's output (untimed) and create the folder the arm writes into."""
    out = out_dir(preset, arm)
    shutil.rmtree(out, ignore_errors=True)
    if arm in ("disk", "naive-calibration"):
        out.mkdir(parents=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)


def shrinkit_supports(flag: str, env: dict) -> bool:
    r = subprocess.run([SHRINKIT, "subclone", "--help"], cwd=RUN_CWD[0], env={**env, "COLUMNS": "300"},
                       capture_output=True, text=True)
    return flag in r.stdout


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def background_cpu(seconds: float = 0.3) -> float:
    """Busy fraction of all CPUs over `seconds` (nothing of ours runs meanwhile): other people's load."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(1, t1 - t0)


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def can_drop_caches() -> str | None:
    try:
        drop_caches()
        return None
    except OSError as e:
        return f"{DROP_CACHES}: {e.strerror or e}"


def warm(preset: common.Preset, env: dict, arms: list[str] = ()) -> float:
    """Read the parent's shards once and import the libraries once (untimed); with a mergekit arm, import
    mergekit's libraries once too."""
    t0 = time.perf_counter()
    buf = bytearray(CHUNK)
    for p in common.shard_paths(preset):
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    subprocess.run([PY, "-c", "import torch, transformers, safetensors, shrinkit.pipeline, shrinkit.cli; "
                    "from transformers import AutoModelForCausalLM"], cwd=RUN_CWD[0], env=env, check=False)
    if "mergekit" in arms:
        subprocess.run([str(mergekit_arm.venv_dir() / "bin" / "python"), "-c",
                        "import torch, transformers, mergekit.merge, mergekit.scripts.run_yaml"],
                       cwd=RUN_CWD[0], env=arm_env("mergekit", env), check=False, capture_output=True)
    return time.perf_counter() - t0


def hash_cache_state(preset: common.Preset) -> tuple[int, int]:
    """(shards of this parent whose current identity has a hash in shrinkit's sha256 cache, shards)."""
    f = Path(os.environ.get("SHRINKIT_CACHE") or Path.home() / ".cache" / "shrinkit") / "sha256-cache.json"
    try:
        cache = json.loads(f.read_text())
    except (OSError, ValueError):
        cache = {}
    n = 0
    paths = common.shard_paths(preset)
    for p in paths:
        st = os.stat(p)
        key = f"{os.path.realpath(p)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
        n += isinstance(cache.get(key), str)
    return n, len(paths)


def warm_hash_cache(preset: common.Preset, env: dict) -> tuple[float, str]:
    """One untimed shrinkit run (the cheap depth-only recipe) with the hash cache on, so the default
    shrinkit arms find every shard's sha256 cached: what a second cut of the same parent sees."""
    before = hash_cache_state(preset)
    t0 = time.perf_counter()
    out = bench_dir() / "out" / preset.name / "hash-cache-warmup"
    r = subprocess.run([SHRINKIT, "subclone", str(common.parent_dir(preset)), "--recipe", str(recipe_for(preset, "drop")),
                        "--out", str(out), "--force", "--quiet"] + SHRINKIT_EXTRA,
                       cwd=RUN_CWD[0], env=arm_env("shrinkit-drop", env), capture_output=True, text=True)
    dt = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    after = hash_cache_state(preset)
    state = (f"sha256 cache held {before[0]}/{before[1]} shards before, {after[0]}/{after[1]} after"
             + ("" if r.returncode == 0 else f"; warm-up run FAILED rc {r.returncode}: {last_line(r.stderr + r.stdout)}"))
    return dt, state


def last_line(tail: str) -> str:
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


# ---------------------------------------------------------------------------------------------
# correctness check of the shrinkit-first child against the naive child

def _st_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def _open_all(folder: Path):
    from safetensors import safe_open

    handles = {}
    for p in _st_files(folder):
        f = safe_open(str(p), framework="pt")
        for k in f.keys():
            handles[k] = f
    return handles


def verify(preset: common.Preset) -> list[tuple[bool, str]]:
    import torch

    res: list[tuple[bool, str]] = []
    ok = lambda cond, msg: res.append((bool(cond), msg))  # noqa: E731
    sh, nv = out_dir(preset, "shrinkit-first"), out_dir(preset, "naive")
    if not (sh / "config.json").is_file() or not (nv / "config.json").is_file():
        return [(False, "skipped: needs both the shrinkit-first and the naive child (run both arms)")]
    half = preset.dims.half()
    want = {**half.target(), "head_dim": half.head_dim, "vocab_size": half.vocab_size}
    for who, d in (("shrinkit-first", sh), ("naive", nv)):
        cfg = json.loads((d / "config.json").read_text())
        bad = {k: (cfg.get(k), v) for k, v in want.items() if cfg.get(k) != v}
        ok(not bad, f"{who} config.json has the halved dims {want}" + (f"; MISMATCH (got, want): {bad}" if bad else ""))
        ok(cfg.get("model_type") == "llama" and cfg.get("tie_word_embeddings") in (False, None),
           f"{who} config: model_type={cfg.get('model_type')}, tie_word_embeddings={cfg.get('tie_word_embeddings')}")
    b_sh = sum(p.stat().st_size for p in _st_files(sh))
    b_nv = sum(p.stat().st_size for p in _st_files(nv))
    ok(b_nv and abs(b_sh - b_nv) / b_nv <= 0.01,
       f"safetensors bytes: shrinkit-first {b_sh:,} vs naive {b_nv:,} ({(b_sh - b_nv) / max(b_nv, 1) * 100:+.3f} %), "
       f"expected payload {common.n_bytes(half):,}")
    hs, hn = _open_all(sh), _open_all(nv)
    ok(set(hs) == set(hn), f"same tensor names ({len(hs)} vs {len(hn)})"
       + ("" if set(hs) == set(hn) else f"; only shrinkit: {sorted(set(hs) - set(hn))[:3]}, only naive: {sorted(set(hn) - set(hs))[:3]}"))
    shapes_bad = [k for k in set(hs) & set(hn) if hs[k].get_slice(k).get_shape() != hn[k].get_slice(k).get_shape()]
    ok(not shapes_bad, "same tensor shapes" + (f"; differ: {shapes_bad[:3]}" if shapes_bad else ""))
    # data-free `first` keeps the leading indices, like the naive cut: layer 0 and the
    # embeddings must match bitwise; norms are the parent's (ones) times sqrt(hidden_p / hidden_c)
    exact = ["model.embed_tokens.weight", "lm_head.weight"] + [
        f"model.layers.0.{t}.weight" for t in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                               "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    diff = [k for k in exact if k in hs and k in hn and not torch.equal(hs[k].get_tensor(k), hn[k].get_tensor(k))]
    ok(not diff and all(k in hs for k in exact), f"bitwise equal to naive: embeddings, lm_head, layer 0 linears"
       + (f"; differ: {diff}" if diff else ""))
    f = math.sqrt(preset.dims.hidden_size / half.hidden_size)
    k = "model.layers.0.input_layernorm.weight"
    if k in hs and k in hn:
        a, b = hs[k].get_tensor(k).float(), hn[k].get_tensor(k).float()
        ok(torch.allclose(a, b * f, rtol=1e-2), f"norms rescaled by {f:.4f} (mean shrinkit/naive = {(a / b).mean():.4f})")
    # middle-dropping keeps parent layers 0..3 and 12..15 (16 -> 8): child layer n/2 is parent layer n_p - n/2
    n_p, n_c = preset.dims.num_hidden_layers, half.num_hidden_layers
    n_drop = n_p - n_c
    start = (n_p - n_drop) // 2
    kept = [i for i in range(n_p) if not start <= i < start + n_drop]
    ci = n_c // 2
    k = f"model.layers.{ci}.mlp.down_proj.weight"
    from safetensors import safe_open

    idx = json.loads((common.parent_dir(preset) / "model.safetensors.index.json").read_text())["weight_map"]
    pk = f"model.layers.{kept[ci]}.mlp.down_proj.weight"
    with safe_open(str(common.parent_dir(preset) / idx[pk]), framework="pt") as pf:
        want_t = pf.get_slice(pk)[: half.hidden_size, : half.intermediate_size]
    ok(k in hs and torch.equal(hs[k].get_tensor(k), want_t),
       f"child layer {ci} down_proj = parent layer {kept[ci]} [:{half.hidden_size}, :{half.intermediate_size}] (kept {kept})")
    mg = out_dir(preset, "shrinkit-magnitude")
    if (mg / "config.json").is_file():
        hm = _open_all(mg)
        bad = [k for k in hn if k not in hm or hm[k].get_slice(k).get_shape() != hn[k].get_slice(k).get_shape()]
        ok(not bad, "shrinkit-magnitude child: same tensor names and shapes as naive" + (f"; differ: {bad[:3]}" if bad else ""))
    return res


def _calib_desc(preset: common.Preset) -> str:
    import yaml

    data = yaml.safe_load(recipe_for(preset, "activation").read_text())
    for st in data["stages"]:
        if "rank_neurons" in st:
            c = st["rank_neurons"].get("calibration") or {}
            return (f"{c.get('data')}, {c.get('samples', 64)} samples x {c.get('seq_len', 256)} tokens, "
                    f"batch {c.get('batch_size', 8)}, seed {data.get('seed', 0)}")
    return "?"


def _same_files(a: Path, b: Path) -> tuple[bool, str]:
    import filecmp

    fa = sorted(x.name for x in a.glob("*.safetensors"))
    fb = sorted(x.name for x in b.glob("*.safetensors"))
    if not fa or fa != fb:
        return False, f"safetensors files differ: {fa} vs {fb}"
    diff = [n for n in fa if not filecmp.cmp(a / n, b / n, shallow=False)]
    return not diff, f"{len(fa) - len(diff)}/{len(fa)} safetensors files byte-identical" + (f"; differ: {diff}" if diff else "")


def extra_checks(preset: common.Preset, arms: list[str], check_calibration: bool, env: dict) -> list[tuple[bool, str]]:
    res: list[tuple[bool, str]] = []
    # -nocache arms cut the same child as their cached twin
    for arm in arms:
        if arm.endswith(NOCACHE) and arm[: -len(NOCACHE)] in arms:
            a, b = out_dir(preset, arm), out_dir(preset, arm[: -len(NOCACHE)])
            if (a / "config.json").is_file() and (b / "config.json").is_file():
                c, m = _same_files(a, b)
                res.append((c, f"{arm} child = {arm[: -len(NOCACHE)]} child: {m}"))
    # mergekit passthrough vs shrinkit-drop
    if "mergekit" in arms and "shrinkit-drop" in arms:
        mk, sh = out_dir(preset, "mergekit"), out_dir(preset, "shrinkit-drop")
        res += [(c, f"mergekit vs shrinkit-drop: {m}") for c, m in mergekit_arm.compare(mk, sh)]
        if (sh / "config.json").is_file():
            res.append(mergekit_arm.compare_to_parent(sh, preset))
    # naive full-model statistics vs shrinkit's block-by-block ones (untimed; the smallest preset only)
    if check_calibration and "naive-calibration" in arms and (out_dir(preset, "naive-calibration") / "stats.pt").is_file():
        r = subprocess.run([PY, "-c", (
            "import sys, json, torch; sys.path.insert(0, sys.argv[1]); import naive_calibrate as n; "
            "a = torch.load(sys.argv[2]); b = n.shrinkit_stats(sys.argv[3], sys.argv[4]); print(json.dumps(n.compare(a, b)))"),
            str(HERE), str(out_dir(preset, "naive-calibration") / "stats.pt"), str(common.parent_dir(preset)),
            str(recipe_for(preset, "activation"))], cwd=RUN_CWD[0], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            res.append((False, f"naive-calibration vs shrinkit's calibration: check failed: {last_line(r.stderr)}"))
        else:
            d = json.loads(r.stdout.strip().splitlines()[-1])
            worst = max(d["hidden"], d["ffn"], d["heads"], d["influence"])
            res.append((worst < 1e-3 and d["ffn_top_half_overlap_min"] == 1.0,
                        f"naive-calibration statistics vs shrinkit's block-by-block calibration of preset {preset.name}: "
                        f"max relative difference hidden {d['hidden']:.1e}, ffn {d['ffn']:.1e}, heads {d['heads']:.1e}, "
                        f"influence {d['influence']:.1e}; tokens {d['tokens']}; same top-half ffn neurons in every layer: "
                        f"{d['ffn_top_half_overlap_min'] == 1.0} (min overlap {d['ffn_top_half_overlap_min']:.3f})"))
    return res


# ---------------------------------------------------------------------------------------------
# reporting

def fmt_ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def summarize(runs: list[dict]) -> dict:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return {"ok": False, "n": 0, "reason": last_line(runs[-1]["tail"]) if runs else "not run"}
    w = [r["wall_s"] for r in ok]
    return {"ok": True, "n": len(ok), "median_s": statistics.median(w), "min_s": min(w), "max_s": max(w),
            "peak_anon_mb": max(r["peak_anon_mb"] for r in ok), "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "user_s_median": statistics.median(r["user_s"] for r in ok),
            "sys_s_median": statistics.median(r["sys_s"] for r in ok)}


def table(arms: list[str], summ: dict[str, dict], parent_gb: float) -> str:
    nv = summ.get("naive", {}).get("median_s")
    dk = summ.get("disk", {}).get("median_s")
    lines = ["| arm | runs | wall s median (min) | × naive | × disk | parent GB/s | peak anon RSS MB | peak RSS MB | cpu user+sys s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        s = summ.get(a)
        if not s:
            continue
        if not s["ok"]:
            lines.append(f"| {a} | 0 | skipped: {s['reason']} | | | | | | |")
            continue
        m = s["median_s"]
        lines.append(f"| {a} | {s['n']} | {m:.2f} ({s['min_s']:.2f}) | {fmt_ratio(m, nv)} | {fmt_ratio(m, dk)} | "
                     f"{parent_gb / m:.2f} | {s['peak_anon_mb']:.0f} | {s['peak_rss_mb']:.0f} | "
                     f"{s['user_s_median'] + s['sys_s_median']:.2f} |")
    return "\n".join(lines)


def lstsq(xs: list[float], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


def scaling(arms: list[str], presets: list[common.Preset], results: dict) -> tuple[str, dict]:
    out: dict = {}
    for a in arms:
        pts = [(common.n_bytes(p.dims) / 1e9, results[p.name]["summary"][a]["median_s"],
                results[p.name]["summary"][a]["peak_anon_mb"])
               for p in presets if results[p.name]["summary"].get(a, {}).get("ok")]
        if len(pts) >= 2:
            s, i = lstsq([x for x, _, _ in pts], [y for _, y, _ in pts])
            ms, mi = lstsq([x for x, _, _ in pts], [m for _, _, m in pts])
            out[a] = {"slope_s_per_gb": s, "intercept_s": i, "mem_slope_mb_per_gb": ms, "mem_intercept_mb": mi,
                      "points": pts}
    dk = out.get("disk", {}).get("slope_s_per_gb")
    head = " | ".join(f"{p.name} ({common.n_bytes(p.dims) / 1e9:.2f} GB)" for p in presets)
    first, last = presets[0].name, presets[-1].name
    lines = [f"| arm | slope s/GB | intercept s | slope ÷ disk slope | anon MB per GB | anon {first}→{last} | {head} |",
             "|---|---|---|---|---|---|" + "---|" * len(presets)]
    for a, v in out.items():
        cells = []
        for p in presets:
            s = results[p.name]["summary"].get(a, {})
            cells.append(f"{s['median_s']:.2f} s, {s['peak_anon_mb']:.0f} MB" if s.get("ok") else "-")
        s0, s1 = results[first]["summary"].get(a, {}), results[last]["summary"].get(a, {})
        growth = None
        if s0.get("ok") and s1.get("ok") and s0["peak_anon_mb"] > 0:
            growth = (s1["peak_anon_mb"] / s0["peak_anon_mb"] - 1) * 100
        v["anon_growth_pct"] = growth
        lines.append(f"| {a} | {v['slope_s_per_gb']:.3f} | {v['intercept_s']:.2f} | {fmt_ratio(v['slope_s_per_gb'], dk)} | "
                     f"{v['mem_slope_mb_per_gb']:.0f} | " + (f"{growth:+.0f} %" if growth is not None else "-") + " | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines), out


def plot(path: str, arms: list[str], presets: list[common.Preset], results: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"\n(--plot {path}: matplotlib is not importable here; no plot written)")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 5.2))
    for a in arms:
        pts = [(common.n_bytes(p.dims) / 1e9, results[p.name]["summary"][a])
               for p in presets if results[p.name]["summary"].get(a, {}).get("ok")]
        if not pts:
            continue
        xs = [x for x, _ in pts]
        style = "o--" if a.endswith(NOCACHE) else "o-"
        ax1.plot(xs, [s["median_s"] for _, s in pts], style, label=a)
        ax2.plot(xs, [s["peak_anon_mb"] for _, s in pts], style, label=a)
    ax1.set(xlabel="parent size (GB, bf16)", ylabel="wall time, median (s, log scale)", title="time", yscale="log")
    ax2.set(xlabel="parent size (GB, bf16)", ylabel="peak anonymous RSS (MB, log scale)", title="memory", yscale="log")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, max(1, len(labels))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 5), 1, 1))
    fig.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


# ---------------------------------------------------------------------------------------------
# profiling

def code_state() -> str:
    """git HEAD plus a hash of the shrinkit sources the arms import (the tree, or the --snapshot copy)."""
    import hashlib

    src = bench_dir() / "snapshot" if RUN_CWD[0] != ROOT else ROOT
    if src != ROOT and _SNAPSHOT_STATE:
        return _SNAPSHOT_STATE[0]  # the copy does not change; HEAD may move on meanwhile
    h = hashlib.sha1()
    for f in sorted((src / "shrinkit").rglob("*.py")):
        h.update(str(f.relative_to(src)).encode())
        h.update(f.read_bytes())
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        head = "?"
    state = f"{head}+src:{h.hexdigest()[:10]}" + (" (snapshot)" if src != ROOT else "")
    if src != ROOT:
        _SNAPSHOT_STATE.append(state)
    return state


_SNAPSHOT_STATE: list[str] = []


def _stats_rows(text: str) -> str:
    lines = text.splitlines()
    i = next((k for k, ln in enumerate(lines) if ln.lstrip().startswith("ncalls")), 0)
    return "\n".join(ln for ln in lines[i:] if ln.strip())


def profile(preset: common.Preset, methods: list[str], env: dict, top: int) -> dict:
    import pstats

    out = {}
    for m in methods:
        prof = bench_dir() / "profiles" / f"{preset.name}-{m}.prof"
        prof.parent.mkdir(parents=True, exist_ok=True)
        arm = f"shrinkit-{m}"
        prepare_out(preset, arm)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ru_before = ru0.ru_utime + ru0.ru_stime
        cmd = [PY, "-m", "cProfile", "-o", str(prof), "-m", "shrinkit.cli"] + arm_command(arm, preset)[1:]
        busy0, total0 = _cpu_times()
        t0 = time.perf_counter()
        r = subprocess.run(cmd, cwd=RUN_CWD[0], env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        busy1, total1 = _cpu_times()
        # CPU of the profiled run itself = growth of our reaped children's rusage
        ours = (ru.ru_utime + ru.ru_stime - ru_before) * os.sysconf("SC_CLK_TCK")
        others = max(0.0, (busy1 - busy0 - ours) / max(1, total1 - total0))
        print(f"\n#### cProfile, {arm}, preset {preset.name} (wall {wall:.2f} s under the profiler, rc {r.returncode}, "
              f"other processes' CPU during it {others * 100:.0f}%)\n")
        print(f"    {' '.join(cmd)}\n")
        if r.returncode != 0 or not prof.is_file():
            print("    failed: " + last_line(r.stderr + r.stdout))
            continue
        import io

        buf = io.StringIO()
        st = pstats.Stats(str(prof), stream=buf)
        st.sort_stats("cumulative").print_stats(top)
        text = buf.getvalue().strip("\n")
        print("top by cumulative time:\n```\n" + text + "\n```")
        buf2 = io.StringIO()
        st.stream = buf2
        st.sort_stats("cumulative").print_stats(r"shrinkit/", top)
        print("shrinkit's own functions by cumulative time:\n```\n" + _stats_rows(buf2.getvalue()) + "\n```")
        buf3 = io.StringIO()
        st.stream = buf3
        st.sort_stats("tottime").print_stats(15)
        print("top 15 by internal time:\n```\n" + _stats_rows(buf3.getvalue()) + "\n```")
        text += "\n" + buf2.getvalue() + "\n" + buf3.getvalue()
        out[arm] = {"prof": str(prof), "wall_s": wall, "others_cpu_during": round(others, 3), "top": text}
    return out


# ---------------------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--disk-arm":
        disk_arm(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="1.7gb", help=f"comma-separated, of {', '.join(common.PRESETS)} (default 1.7gb)")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slow-repeat", type=int, default=None, metavar="N",
                    help=f"at most N repeats for the slow arms ({', '.join(SLOW_ARMS)}); default: --repeat")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every arm (needs root)")
    ap.add_argument("--interval", type=float, default=0.02, help="memory sampling interval, s (default 0.02)")
    ap.add_argument("--json", metavar="PATH", help="write every raw result here")
    ap.add_argument("--plot", metavar="PATH", help="PNG of time and memory vs parent size (needs matplotlib)")
    ap.add_argument("--profile", action="store_true", help="also cProfile shrinkit first and magnitude once per preset")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                    help="before each run, wait up to S seconds for other processes' CPU use to fall below "
                         "--idle-threshold (default 60; 0: never wait)")
    ap.add_argument("--idle-threshold", type=float, default=0.15, help="busy fraction of all CPUs (default 0.15)")
    ap.add_argument("--snapshot", action="store_true",
                    help="copy shrinkit/ into <cache>/bench/snapshot at start and time that copy (PYTHONPATH), so "
                         "edits made to the tree during a long run do not mix code versions")
    ap.add_argument("--replot", metavar="JSON", help="only redraw --plot from an earlier --json file (runs nothing)")
    ap.add_argument("--regenerate", action="store_true", help="rebuild the synthetic parents even if cached")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--no-verify", action="store_true", help="skip the benchmark's own correctness check")
    ap.add_argument("--shrinkit-verify", action="store_true",
                    help="let shrinkit verify its child (held-out forward passes) inside the timed run; by default "
                         "the shrinkit arms pass --no-verify when the CLI has it, so they time the cut alone")
    a = ap.parse_args()
    if a.replot:
        if not a.plot:
            raise SystemExit("--replot needs --plot PATH")
        data = json.loads(Path(a.replot).read_text())
        plot(a.plot, data["meta"]["arms"], [common.PRESETS[n] for n in data["meta"]["presets"]], data["presets"])
        return

    presets = []
    for name in filter(None, (s.strip() for s in a.presets.split(","))):
        if name not in common.PRESETS:
            raise SystemExit(f"unknown preset {name!r}; known: {', '.join(common.PRESETS)}")
        presets.append(common.PRESETS[name])
    arms = [s.strip() for s in a.arms.split(",") if s.strip()]
    for arm in arms:
        arm_command(arm, presets[0])  # validates the names early

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.snapshot:
        snap = bench_dir() / "snapshot"
        shutil.rmtree(snap, ignore_errors=True)
        shutil.copytree(ROOT / "shrinkit", snap / "shrinkit", ignore=shutil.ignore_patterns("__pycache__"))
        env["PYTHONPATH"] = str(snap) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        RUN_CWD[0] = bench_dir()
        where = subprocess.run([PY, "-c", "import shrinkit; print(shrinkit.__file__)"], cwd=RUN_CWD[0], env=env,
                               capture_output=True, text=True).stdout.strip()
        if not where.startswith(str(snap)):
            raise SystemExit(f"--snapshot: the arms would import shrinkit from {where}, not from {snap}")
    if (a.profile or any(x.startswith("shrinkit-") for x in arms)) and not a.shrinkit_verify \
            and shrinkit_supports("--no-verify", env):
        SHRINKIT_EXTRA.append("--no-verify")
    mk_note = ""
    if "mergekit" in arms:
        t0 = time.perf_counter()
        mergekit_arm.ensure_mergekit(log=lambda m: print(m, flush=True))
        vpy = str(mergekit_arm.venv_dir() / "bin" / "python")
        vers = subprocess.run([vpy, "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                               "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True).stdout.split()
        mk_note = (f"mergekit {vers[0] if vers else '?'} (torch {vers[1] if len(vers) > 1 else '?'}, transformers "
                   f"{vers[2] if len(vers) > 2 else '?'}) in {mergekit_arm.venv_dir()} (checked in {time.perf_counter() - t0:.1f} s); "
                   f"its arm runs: mergekit-yaml CONFIG OUT {' '.join(mergekit_arm.mergekit_command(Path('C'), Path('O'))[3:])}"
                   " && sync OUT/*")
    if a.cold:
        why = can_drop_caches()
        if why:
            raise SystemExit(f"--cold: cannot drop the page cache here ({why}); run without --cold (warm cache)")
    cache_state = "cold (page cache dropped before every arm)" if a.cold else "warm (parent read once before timing)"

    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
            "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": PY, "shrinkit": SHRINKIT, "cache": str(common.cache_dir()), "cache_state": cache_state,
            "repeat": a.repeat, "interval_s": a.interval, "shrinkit_extra_args": SHRINKIT_EXTRA, "arms": arms, "presets": [p.name for p in presets],
            "argv": sys.argv, "code_at_start": code_state(), "mergekit": mk_note, "slow_repeat": a.slow_repeat}
    print(f"# shrinkit speed benchmark\n\n{meta['date']}, {meta['cpus']} CPUs, {meta['mem_gb']} GiB RAM; "
          f"cache {meta['cache']}; page cache: {cache_state}; {a.repeat} repeat(s); arms: {', '.join(arms)}"
          + (f"; shrinkit arms add {' '.join(SHRINKIT_EXTRA)}" if SHRINKIT_EXTRA else "")
          + (f"; at most {a.slow_repeat} repeat(s) for {', '.join(x for x in SLOW_ARMS if x in arms)}"
             if a.slow_repeat is not None and any(x in arms for x in SLOW_ARMS) else "") + "\n")
    hashing = []
    if any(shrinkit_method(x) and not x.endswith(NOCACHE) for x in arms):
        hashing.append("arms named shrinkit-METHOD run with shrinkit's sha256 cache on (default); an untimed shrinkit "
                       "run per preset fills it first, so they find every shard's hash cached (a repeat cut of the "
                       "same parent)")
    if any(shrinkit_method(x) and x.endswith(NOCACHE) for x in arms):
        hashing.append(f"arms named shrinkit-METHOD{NOCACHE} set SHRINKIT_NO_HASH_CACHE=1 and hash every shard "
                       "(2 threads, overlapping the cut): a first cut of a new parent")
    if hashing:
        print("shrinkit shard hashing: " + "; ".join(hashing) + ".\n")
    if mk_note:
        print(mk_note + "\n")

    results: dict = {}
    codes: set[str] = set()
    for p in presets:
        cached = common.is_complete(p) and not a.regenerate
        print(f"parent {p.name}: {'cached' if cached else 'generating'} at {common.parent_dir(p)}", flush=True)
        marker = common.generate(p, force=a.regenerate, log=lambda s: print(s, flush=True))
        results[p.name] = {"generation": {**marker, "cached": cached}, "parent_bytes": common.n_bytes(p.dims),
                           "child_bytes": common.n_bytes(p.dims.half()), "runs": [], "summary": {}}
    if a.generate_only:
        for p in presets:
            g = results[p.name]["generation"]
            print(f"{p.name}: {common.n_bytes(p.dims) / 1e9:.2f} GB, generated in {g['seconds']:.1f} s ({g['created']})")
        return

    for p in presets:
        R = results[p.name]
        pgb = R["parent_bytes"] / 1e9
        g = R["generation"]
        print(f"\n## preset {p.name}: parent {pgb:.2f} GB ({common.n_params(p.dims) / 1e6:.1f}M params, bf16, "
              f"{p.shards} shards; {p.dims}), child {R['child_bytes'] / 1e6:.1f} MB (half width and depth)\n")
        print(f"parent generation: {g['seconds']:.1f} s ({'cached, made ' + g['created'] if g['cached'] else 'just now'})")
        if any(shrinkit_method(x) and not x.endswith(NOCACHE) for x in arms):
            dt, state = warm_hash_cache(p, env)
            R["hash_cache"] = state
            print(f"hash cache warm-up: one untimed shrinkit run in {dt:.1f} s; {state}")
        if not a.cold:
            print(f"warming: read the parent and imported the libraries in {warm(p, env, arms):.1f} s (untimed)")
        skip: dict[str, str] = {}
        busy: list[float] = []
        R["code_before"] = code_state()
        for rep in range(a.repeat):
            for arm in arms:
                if arm in skip:
                    continue
                if arm in SLOW_ARMS and a.slow_repeat is not None and rep >= a.slow_repeat:
                    continue
                cmd = arm_command(arm, p)
                prepare_out(p, arm)
                if a.cold:
                    drop_caches()
                bg = background_cpu()
                waited = 0.0
                while bg > a.idle_threshold and waited < a.wait_idle:
                    time.sleep(2.0)
                    waited += 2.3
                    bg = background_cpu()
                r = run_measured(cmd, bench_dir() / "logs" / f"{p.name}-{arm}-{rep}.log", a.interval, arm_env(arm, env))
                r.update(preset=p.name, arm=arm, repeat=rep, cmd=cmd, background_cpu=round(bg, 3), waited_idle_s=waited,
                         loadavg=os.getloadavg())
                if max(bg, r["others_cpu_during"]) > a.idle_threshold:
                    busy.append(max(bg, r["others_cpu_during"]))
                R["runs"].append(r)
                status = "ok" if r["rc"] == 0 else f"rc {r['rc']}: {last_line(r['tail'])}"
                print(f"  [{rep + 1}/{a.repeat}] {arm:20s} {r['wall_s']:7.2f} s  anon {r['peak_anon_mb']:7.0f} MB  "
                      f"rss {r['peak_rss_mb']:7.0f} MB  other cpu before {bg * 100:3.0f}% during {r['others_cpu_during'] * 100:3.0f}%  "
                      f"{status}", flush=True)
                if r["rc"] != 0:
                    skip[arm] = last_line(r["tail"])
                    print(f"    -> {arm} failed; skipping its remaining repeats (log: {r['log']})")
        R["code_after"] = code_state()
        codes.add(R["code_before"])
        codes.add(R["code_after"])
        for arm in arms:
            R["summary"][arm] = summarize([r for r in R["runs"] if r["arm"] == arm])
        print(f"\n### {p.name}: {pgb:.2f} GB parent -> {R['child_bytes'] / 1e6:.0f} MB child, page cache {'cold' if a.cold else 'warm'}, "
              f"{a.repeat} repeat(s); memory is the max over repeats\n")
        print(table(arms, R["summary"], pgb))
        if any(x in arms for x in DROP_ARMS):
            R["drop_child_bytes"] = common.n_bytes(replace(p.dims, num_hidden_layers=p.dims.half().num_hidden_layers))
            print(f"\n{', '.join(x for x in arms if x in DROP_ARMS)} cut depth only (full width): their child is "
                  f"{R['drop_child_bytes'] / 1e6:.0f} MB, not the {R['child_bytes'] / 1e6:.0f} MB the other arms (and disk) write")
        if "naive-calibration" in arms or any(shrinkit_method(x) == "activation" for x in arms):
            print("shrinkit-activation and naive-calibration forward the same calibration tokens "
                  f"({_calib_desc(p)}); naive-calibration writes only its statistics, not a child")
        print(f"\nshrinkit code: {R['code_before']}" + ("" if R["code_before"] == R["code_after"] else
              f" -> {R['code_after']}: WARNING, shrinkit/ changed on disk during this preset's runs"))
        if busy:
            print(f"\nWARNING: other processes used up to {max(busy) * 100:.0f}% of the CPUs just before or during "
                  f"{len(busy)} of {len(R['runs'])} runs (see `other cpu` above); those timings are inflated.")
        if not a.no_verify and "shrinkit-first" in arms and "naive" in arms:
            checks = verify(p)
            R["checks"] = [{"ok": c, "what": m} for c, m in checks]
            print(f"\ncorrectness ({sum(c for c, _ in checks)}/{len(checks)} passed):")
            for c, m in checks:
                print(f"  {'ok  ' if c else 'FAIL'} {m}")
        if not a.no_verify:
            extra = extra_checks(p, arms, check_calibration=(p is presets[0]), env=env)
            if extra:
                R["checks"] = R.get("checks", []) + [{"ok": c, "what": m} for c, m in extra]
                print(f"\nmore checks ({sum(c for c, _ in extra)}/{len(extra)} passed):")
                for c, m in extra:
                    print(f"  {'ok  ' if c else 'FAIL'} {m}")
        if a.profile:
            R["profile"] = profile(p, ["first", "magnitude"], env, a.profile_top)

    scale = None
    if len(codes) > 1:
        print(f"\nWARNING: shrinkit/ changed on disk during the benchmark ({', '.join(sorted(codes))}); "
              "presets timed different code, so compare them with care")
    if len(presets) >= 2:
        text, scale = scaling(arms, presets, results)
        print(f"\n## scaling over {', '.join(p.name for p in presets)} (least squares of median wall time on "
              f"parent size)\n\n{text}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({"meta": meta, "presets": results, "scaling": scale}, indent=2, default=str) + "\n")
        print(f"\nraw results written to {a.json}")
    if a.plot:
        plot(a.plot, arms, presets, results)


if __name__ == "__main__":
    main()
