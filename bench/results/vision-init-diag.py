"""At-init diagnostics of vision children (BENCHMARKS.md 10): for each NAME=SPEC (bench/vision_train.py's
arm specs; `parent` and `random` are the parent and a random init of the first child's config) the
verification Spearman and linear probes (CLS and mean patch token) on 2000 / 1000 Fashion-MNIST images.
Usage: python bench/results/vision-init-diag.py parent ws=rank:uniform,drop:first,rescale:0 random ...
(env SIZE: image side, default 56; TARGET: child dims as JSON)."""
import sys, json, time, os
from pathlib import Path as _P
sys.path.insert(0, str(_P(__file__).resolve().parents[1]))
import vision_train as vt, torch, transformers
transformers.utils.logging.set_verbosity_error()
from pathlib import Path
parent = vt.assets.dinov2()
size = int(os.environ.get("SIZE", 56))
out = vt.assets.cache_dir() / "bench" / "vision_init_diag"; out.mkdir(parents=True, exist_ok=True)
trimgs, ytr, teimgs, yte, classes = vt.load_task(None, 2000, 1000)
calib_task = out / "calib-task"
if not calib_task.exists():
    calib_task.mkdir(); [im.save(calib_task / f"{i:05d}.png") for i, im in enumerate(trimgs[:256])]
xtr, xte = vt.preprocess(parent, trimgs, size), vt.preprocess(parent, teimgs, size)
ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
target = json.loads(os.environ.get("TARGET", json.dumps(vt.DEFAULT_TARGET)))
for arg in sys.argv[1:]:
    name, _, spec = arg.partition("=")
    t = time.time()
    if name == "parent":
        import transformers as T; model = T.AutoModel.from_pretrained(parent); v = None
    elif name == "random":
        model = vt.load_model(None, out / "children" / os.environ.get("RANDOM_FROM", "ws")); v = None  # a random init of that child's config
    else:
        child, secs, rep = vt.subclone(parent, vt.recipe(vt.parse_spec(spec), target, calib_task), name, out)
        if child is None: print(name, rep); continue
        model = vt.load_model(child, None); v = rep.get("verify", {}).get("child", {}).get("similarity_spearman")
    r = {p: round(vt.probe(model, xtr, ytr, xte, yte, p, 10), 3) for p in ("cls", "mean")}
    print(f"{name:28s} {spec:70s} verify {v} probe {r} ({time.time()-t:.0f}s, load {vt.load1()})", flush=True)
