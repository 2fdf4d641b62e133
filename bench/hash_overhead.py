#!/usr/bin/env python3
"""What recording the child's file hashes costs: `subclone` wall time with the report's `files`
hashed as they are written (the default) against the same run with the hashing replaced by a
no-op for the weight shards, alternating, in one process (imports paid once, the parent in the page cache).

    .venv/bin/python bench/hash_overhead.py [--parent DIR] [--repeat N] [--dtype float32]

Default parent: SmolLM2-135M from bench/assets.py; the recipe keeps its shape (slice_embeddings
only, --no-verify, data-free), so the child is the whole model in --dtype and the write phase is
as large as this parent allows. Prints the median and min wall time of each arm and the child's
bytes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default=None)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    if a.parent is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import assets
        a.parent = str(assets.smollm2())
    import shrinkit
    from shrinkit.checkpoint import writer

    recipe = {"target": {}, "stages": [{"slice_embeddings": {}}], "output": {"dtype": a.dtype}}
    times: dict[str, list[float]] = {"hashed": [], "no hash": []}
    nbytes = 0
    with tempfile.TemporaryDirectory(prefix="shrinkit-hash-", dir=os.environ.get("TMPDIR")) as d:
        for i in range(a.repeat):
            for arm in ("hashed", "no hash"):
                out = Path(d) / "child"
                shutil.rmtree(out, ignore_errors=True)
                real = writer.ShardedWriter._put
                if arm == "no hash":   # the shards' bytes written, not hashed (config/tokenizer: small)
                    writer.ShardedWriter._put = lambda self, b: self._file.write(b)
                try:
                    t = time.perf_counter()
                    res = shrinkit.subclone(a.parent, recipe, out=out, verify=False)
                    times[arm].append(time.perf_counter() - t)
                finally:
                    writer.ShardedWriter._put = real
                nbytes = res.report["child"]["bytes"]
    print(f"parent {a.parent}, child {nbytes / 1e6:.0f} MB ({a.dtype}), {a.repeat} runs per arm, "
          f"load {os.getloadavg()[0]:.2f}")
    print("| arm | median s | min s |\n|---|---:|---:|")
    for arm, ts in times.items():
        print(f"| {arm} | {statistics.median(ts):.2f} | {min(ts):.2f} |")


if __name__ == "__main__":
    main()
