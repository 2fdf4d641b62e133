"""SmolLM2-135M with recipes/smollm2-40m.yaml, --no-verify then the default run, one each, timed
and sampled by bench/speed.py's run_measured (run it under `flock /work/bench.lock`)."""
import json, os, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import speed

env = {**os.environ, "PYTHONPATH": str(ROOT)}
P = os.path.expanduser("~/.cache/shrinkit/smollm2-135m")
R = str(ROOT / "recipes/smollm2-40m.yaml")
OUT = Path(os.environ.get("OUT_DIR", "/tmp/vsm"))
OUT.mkdir(parents=True, exist_ok=True)
out = {}
for name, extra in (("no-verify", ["--no-verify"]), ("default", [])):
    cmd = [sys.executable, "-m", "shrinkit.cli", "subclone", P, "-r", R, "--out", str(OUT / name), "--force", "--quiet"] + extra
    r = speed.run_measured(cmd, OUT / f"{name}.log", 0.02, env)
    out[name] = {k: r[k] for k in ("wall_s", "rc", "peak_anon_mb", "others_cpu_during")}
    print(name, out[name], flush=True)
json.dump(out, open(OUT / "result.json", "w"), indent=1)
