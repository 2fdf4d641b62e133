"""slice_embeddings: cut every child tensor out of the parent (the one generic slicer,
shrinkit.stages.slice) or take the fitted value heal left, and stream them into size-capped
safetensors shards, with the child's config and the parent's tokenizer files beside them."""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

from ..checkpoint.reader import Checkpoint
from ..checkpoint.writer import Entry, ShardedWriter
from ..hf import TOKENIZER_FILES
from ..plan import Plan
from ..specs import Strict, parse_size
from .base import Context, Stage
from .slice import BLOCK_BYTES, slice_blocks


class SliceEmbeddings(Strict):
    pass


def child_blocks(plan: Plan, ct, ckpt: Checkpoint):
    """The child tensor's row blocks: sliced from the parent, or the fitted value heal left."""
    rep = plan.replaced.get(ct.name)
    if rep is None:
        yield from slice_blocks(plan, ct, ckpt.get(ct.parent.name))
        return
    from .heal import load_replacement
    t = load_replacement(rep, ct.name).to(ct.dtype)
    if tuple(t.shape) != tuple(ct.shape):  # pragma: no cover - heal writes child-shaped tensors
        raise RuntimeError(f"healed {ct.name} has shape {list(t.shape)}, expected {list(ct.shape)}")
    step = max(1, BLOCK_BYTES // max(1, t[0].numel() * t.element_size())) if t.dim() > 1 else len(t)
    for r0 in range(0, len(t), step):
        yield t[r0:r0 + step].contiguous()


def write_child(ckpt: Checkpoint, plan: Plan, max_shard_size, tmp: Path, progress, written: list,
                files: dict) -> dict:
    """Slice and write every child tensor into `tmp`, then its config and the tokenizer files; each
    file's size and sha256 go to `files` as it is written (shrinkit.childfiles)."""
    cts = plan.child_tensors(ckpt)
    writer = ShardedWriter(tmp, [Entry(c.name, c.dtype, c.shape) for c in cts], parse_size(max_shard_size))
    if progress is not None:
        progress.phase("slice + write", sum(c.parent.nbytes for c in cts))
    # slicing (main thread) overlaps writing (writer thread); both release the GIL in torch and
    # in write(), and the bounded queue keeps at most a few child tensors in memory
    q: queue.Queue = queue.Queue(maxsize=2)
    failed: list[BaseException] = []

    def consume():
        while (item := q.get()) is not None:
            if not failed:
                try:
                    kind, x = item
                    if kind == "begin":
                        writer.begin(*x)
                    elif kind == "data":
                        writer.write_chunk(x)
                    else:
                        writer.end()
                except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                    failed.append(e)

    th = threading.Thread(target=consume, name="shrinkit-writer", daemon=True)
    th.start()
    try:
        try:
            for ct in cts:
                if failed:
                    break
                q.put(("begin", (ct.name, ct.dtype)))
                for block in child_blocks(plan, ct, ckpt):
                    q.put(("data", block))
                q.put(("end", None))
                if progress is not None:
                    progress.advance(ct.parent.nbytes)
        finally:
            q.put(None)
            th.join()
        if failed:
            raise failed[0]
        shards = writer.close()
    except BaseException:
        writer.abort()
        raise
    for p in set(plan.replaced.values()):  # heal's scratch files: not part of the child
        Path(p).unlink(missing_ok=True)
    from ..childfiles import copy_file, write_bytes
    files.update(writer.files)
    cfg = plan.child_config(ckpt.config)
    write_bytes(tmp / "config.json", (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode(), files)
    src = ckpt.config_path.parent
    for fn in TOKENIZER_FILES:
        for d in dict.fromkeys((ckpt.root, src)):
            if (d / fn).is_file():
                copy_file(d / fn, tmp / fn, files)
                break
    written.extend(cts)
    return {"shards": shards, "bytes": writer.total_size}


class WriteStage(Stage):
    name = "slice_embeddings"
    config = SliceEmbeddings
    default = {}
    provides = ("writes",)
    required = "the pipeline has no {self} stage, so it would write nothing; add `- {self}: {{}}`"

    def run(self, cfg, ctx: Context) -> dict:
        ctx.selected()
        return write_child(ctx.ckpt, ctx.plan, ctx.recipe.output.max_shard_size, ctx.scratch, ctx.progress,
                           ctx.written, ctx.files)


STAGE = WriteStage()
