import sys, json, os, subprocess
sys.path.insert(0, "/work/wt-verify/bench")
import speed
from pathlib import Path
env = {**os.environ, "PYTHONPATH": "/work/wt-verify"}
P = os.path.expanduser("~/.cache/shrinkit/smollm2-135m")
R = "/work/wt-verify/recipes/smollm2-40m.yaml"
PY = "/work/main/.venv/bin/python"
out = {}
for name, extra in (("no-verify", ["--no-verify"]), ("default", [])):
    cmd = [PY, "-m", "shrinkit.cli", "subclone", P, "-r", R, "--out", f"/tmp/vsm/{name}", "--force", "--quiet"] + extra
    r = speed.run_measured(cmd, Path(f"/tmp/vsm/{name}.log"), 0.02, env)
    out[name] = {k: r[k] for k in ("wall_s", "rc", "peak_anon_mb", "others_cpu_during")}
    print(name, out[name], flush=True)
json.dump(out, open("/tmp/vsm/result.json", "w"), indent=1)
