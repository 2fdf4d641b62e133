"""The shrinkit command line. Thin: parse, call the Python API (shrinkit.api), print."""

from __future__ import annotations

import contextlib
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand

from .version import __version__  # importing any submodule runs the package first: it sets GOMP_SPINCOUNT before torch loads (shrinkit.malloc)
from .errors import ShrinkitError, Terminated
from .report import strict_json

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Cut a smaller, ready-to-train student out of a pretrained transformer checkpoint.")

DEBUG = {"on": False}


def _version(value: bool):
    if value:
        typer.echo(f"shrinkit {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")):
    from .malloc import bounded

    bounded()


def _one_line(x) -> str:
    """Errors are one line: a message that carries a newline (a YAML parser's) is joined."""
    return " ".join(ln.strip() for ln in str(x).splitlines() if ln.strip())


VERIFY_FAILED = 4  # the child was written and kept, but its verification failed or missed the recipe's gate


def _quiet(debug: bool) -> None:
    """transformers' load reports and warnings stay off the terminal unless --debug; what matters
    in them goes into the report (shrinkit_report.json: verify.child_keys)."""
    if debug:
        return
    import logging
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.set_verbosity_error()


def _classify(e: BaseException) -> tuple[str, int, str]:
    """(message, exit code, kind) of an error: what stderr's line and --json's object say."""
    from .errors import OutputError, ParentError, RecipeError, UsageError

    if isinstance(e, ShrinkitError):
        kind = next((k for t, k in ((RecipeError, "recipe"), (UsageError, "usage"), (ParentError, "parent"),
                                    (OutputError, "output")) if isinstance(e, t)), "error")
        return _one_line(e), e.exit_code, kind
    if isinstance(e, Terminated):
        return "terminated (SIGTERM); nothing was written", 143, "terminated"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted; nothing was written", 130, "interrupted"
    if isinstance(e, MemoryError):
        return "out of memory; free memory or use a machine with more", 1, "memory"
    if isinstance(e, OSError):
        return f"{_one_line(e.strerror or e)} ({e.filename or ''}); nothing was written", 1, "io"
    return (f"internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the traceback)", 1,
            "internal")


def _json_error(msg: str, code: int, kind: str) -> None:
    import json

    typer.echo(json.dumps({"error": msg, "exit": code, "kind": kind}))


def _fail(e: BaseException, debug: bool, json_out: bool = False) -> None:
    """One line on stderr (`error: ...`; the interrupted ones without the prefix) and the exit
    code; with --json also one object on stdout: {"error", "exit", "kind"}."""
    if debug:
        traceback.print_exc()
    msg, code, kind = _classify(e)
    typer.echo(msg if kind in ("terminated", "interrupted") else f"error: {msg}", err=True)
    if json_out:
        _json_error(msg, code, kind)
    raise typer.Exit(code)


class _Command(TyperCommand):
    """A command whose command-line errors (a missing argument, an unknown option, a value of the
    wrong type: exit 2) also print the --json error object when --json was given."""

    def make_context(self, info_name, args, parent=None, **extra):
        want = "--json" in args
        try:
            return super().make_context(info_name, list(args), parent=parent, **extra)
        except Exception as e:   # the parser's usage errors (click's, or the copy typer ships)
            if want and callable(getattr(e, "format_message", None)) and getattr(e, "exit_code", None) == 2:
                _json_error(_one_line(e.format_message()), 2, "usage")
            raise


def _on_term(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # one is enough: let the cleanup finish
    raise Terminated()


@contextlib.contextmanager
def _sigterm():
    """SIGTERM ends a command as SIGINT does: the exception unwinds, temp files are removed."""
    try:
        prev = signal.signal(signal.SIGTERM, _on_term)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


class _Plain:
    """Plain log lines: one per phase, with its time."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.t = None
        self.name = None

    def _end(self):
        if self.name and not self.quiet:
            typer.echo(f"shrinkit: {self.name} done in {time.perf_counter() - self.t:.2f} s", err=True)

    def phase(self, name, total):
        self._end()
        self.name, self.t = name, time.perf_counter()
        if not self.quiet:
            typer.echo(f"shrinkit: {name}" + (f" ({total / 1e6:.1f} MB)" if total else ""), err=True)

    def advance(self, n):
        pass

    def log(self, msg):
        if not self.quiet:
            typer.echo(f"shrinkit: {msg}", err=True)

    def close(self):
        """End of the run, failed or not: a phase is reported done only by finish()."""
        self._pending, self.name = self.name, None

    def finish(self):
        self.name = getattr(self, "_pending", None)
        self._end()
        self.name = self._pending = None


class _Bar(_Plain):
    def __init__(self):
        super().__init__(False)
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)
        from rich.console import Console
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), transient=False, console=Console(stderr=True))
        self.p.start()
        self.task = None

    def phase(self, name, total):
        if self.task is not None:
            self.p.update(self.task, completed=self.p.tasks[self.task].total)
        self.task = self.p.add_task(name, total=total)

    def advance(self, n):
        if self.task is not None:
            self.p.advance(self.task, n)

    def log(self, msg):
        self.p.console.print(msg)

    def close(self):
        self.p.stop()

    def finish(self):
        pass


def _progress(quiet: bool):
    if not quiet and sys.stderr.isatty():
        return _Bar()
    return _Plain(quiet)


RecipeOpt = typer.Option(..., "--recipe", "-r", help="The YAML recipe (see recipes/).")
ParentArg = typer.Argument(..., help="Hugging Face model folder, a .safetensors file, or a Hub id (org/name).")
RevisionOpt = typer.Option(None, "--revision", help="Hub parents: branch, tag or commit (default main).")
ConfigOpt = typer.Option(None, "--config", help="config.json of a single-file parent.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
DeviceOpt = typer.Option("cpu", "--device", help="Where calibration and verification run: cpu, cuda or auto.")
DeviceMemoryOpt = typer.Option(None, "--device-memory", help="Memory the block runtime may use on --device "
                               "(e.g. 40GB; default: 80% of a GPU's free memory, a flat 16 MB-block budget on the CPU).")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Tokenizer folder for calibration text (default: the parent's).")


@app.command(cls=_Command)
def subclone(
    parent: str = ParentArg,
    recipe: Path = RecipeOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Child folder (default ./<parent>-<recipe>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only the result."),
    config: Optional[Path] = ConfigOpt,
    device: str = DeviceOpt,
    device_memory: Optional[str] = DeviceMemoryOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verifying the child on held-out text."),
    revision: Optional[str] = RevisionOpt,
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object on stdout (child, params, bytes, "
                                  "hashes, verification, gate) and nothing else there; an error: {error, exit, kind})."),
    skip_if_current: bool = typer.Option(False, "--skip-if-current", help="Do nothing when --out already holds "
                                         "this child (same parent hash, recipe hash and shrinkit version) and its files are intact."),
    debug: bool = DebugOpt,
):
    """Write a child checkpoint cut out of PARENT by RECIPE.

    Exit codes: 0 done; 2 bad command line or recipe; 3 bad parent; 1 other; 4 the child was
    written, but its verification failed or missed the recipe's gate (the child is kept)."""
    _quiet(debug)
    try:
        with _sigterm():
            from . import api

            prog = _progress(quiet)
            res = api.subclone(parent, recipe, out, force=force, config=config, progress=prog, device=device,
                               tokenizer=tokenizer, verify=not no_verify, revision=revision,
                               skip_if_current=skip_if_current, quiet=quiet, device_memory=device_memory)
            prog.finish()
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, json_out)
    rep = res.report
    c = rep["child"]
    v = rep.get("verify")
    if json_out:
        import json
        typer.echo(json.dumps(strict_json(result_json(res)), allow_nan=False))
    elif res.skipped:
        typer.echo(f"skipped: {res.out} already holds this child (parent hash {rep['parent_hash'][:12]}, recipe hash "
                   f"{rep['recipe_hash'][:12]}, shrinkit {rep['shrinkit_version']}); "
                   f"{c['params'] / 1e6:.2f}M params, {c['bytes'] / 1e6:.1f} MB")
        return
    else:
        for note in rep.get("notes", []):
            typer.echo(f"note: {note}", err=True)
        if v is not None:
            typer.echo("\n".join(v["table"]))
        typer.echo(f"wrote {res.out} ({c['params'] / 1e6:.2f}M params, {c['bytes'] / 1e6:.1f} MB) "
                   f"in {rep['seconds']:.2f} s")
    from .verify import FAILED
    if isinstance(v, dict) and v.get("status") in FAILED:
        what = {"gate_missed": "missed the recipe's verify gate", "error": "could not be verified",
                "failed": "failed its check"}[v["status"]]
        typer.echo(f"error: the child {what}; it was kept at {res.out} (see shrinkit_report.md)", err=True)
        raise typer.Exit(VERIFY_FAILED)


def result_json(res) -> dict:
    """The one JSON object of `subclone --json`: what a CI job needs without reading the report."""
    rep = res.report
    v = rep.get("verify")
    gate = rep.get("gate", v.get("gate") if isinstance(v, dict) else None)
    p = rep["parent"]
    return {
        "out": str(res.out), "skipped": res.skipped,
        "params": rep["child"]["params"], "bytes": rep["child"]["bytes"],
        "dims": rep["child"]["dims"], "dtype": rep["child"]["dtype"],
        "parent": {"path": p["path"], "repo_id": p.get("repo_id"), "revision": p.get("revision"),
                   "params": p["params"], "bytes": p["bytes"]},
        "parent_hash": rep.get("parent_hash"), "recipe_hash": rep.get("recipe_hash"),
        "shrinkit_version": rep["shrinkit_version"],
        "budget": rep.get("budget"),
        "verify": {k: x for k, x in v.items() if k != "table"} if isinstance(v, dict) else None,
        "gate": gate,
        "notes": rep.get("notes", []),
        "seconds": rep.get("seconds"),
        "report": str(res.out / "shrinkit_report.json"),
    }


@app.command(cls=_Command)
def verify(
    parent: str = ParentArg,
    child: Path = typer.Argument(..., help="The child folder."),
    data: str = typer.Option("builtin", "--data", help="builtin | random_tokens | PATH (.txt or .jsonl); image parents: builtin | random_pixels | FOLDER."),
    samples: int = typer.Option(16, "--samples", min=2),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=2,
                                          help="Tokens per sample (default 256, or the parent's maximum positions if fewer)."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    max_kl: Optional[float] = typer.Option(None, "--max-kl", help="Gate: exit 4 when the child's KL is above this."),
    max_ppl_ratio: Optional[float] = typer.Option(None, "--max-perplexity-ratio",
                                                  help="Gate: exit 4 when child/parent perplexity is above this."),
    min_similarity: Optional[float] = typer.Option(None, "--min-similarity",
                                                   help="Gate (encoders): exit 4 when the similarity r is below this."),
    config: Optional[Path] = ConfigOpt,
    device: str = DeviceOpt,
    device_memory: Optional[str] = DeviceMemoryOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    revision: Optional[str] = RevisionOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON (an error: {error, exit, kind})."),
    debug: bool = DebugOpt,
):
    """Measure how much of PARENT survived in CHILD on held-out text (against a random-init child).
    Exit 4 when the child misses a gate given by --max-kl, --max-perplexity-ratio or --min-similarity,
    or when transformers cannot run it as loaded (a shape its default kernels refuse)."""
    _quiet(debug)
    try:
        from . import api

        gate = {k: x for k, x in (("max_kl", max_kl), ("max_perplexity_ratio", max_ppl_ratio),
                                  ("min_similarity", min_similarity)) if x is not None}
        v = api.verify(parent, child, data=data, samples=samples, seq_len=seq_len, batch_size=batch_size,
                       config=config, device=device, tokenizer=tokenizer, revision=revision, gate=gate,
                       device_memory=device_memory)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, json_out)
    if json_out:
        import json
        typer.echo(json.dumps(strict_json(v), indent=2, allow_nan=False))
    else:
        typer.echo("\n".join(v["table"]))
    if v.get("status") in ("gate_missed", "failed"):   # failed: the child does not run as loaded
        raise typer.Exit(VERIFY_FAILED)


@app.command(cls=_Command)
def plan(
    parent: str = ParentArg,
    recipe: Path = RecipeOpt,
    config: Optional[Path] = ConfigOpt,
    revision: Optional[str] = RevisionOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON (an error: {error, exit, kind})."),
    debug: bool = DebugOpt,
):
    """Dry run: validate the recipe against PARENT and its calibration data (the checks subclone
    makes before any work) and print the child's shape; writes nothing."""
    try:
        from . import api

        summary = api.plan(parent, recipe, config=config, revision=revision, tokenizer=tokenizer)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, json_out)
    _print_summary(summary, json_out)


@app.command(cls=_Command)
def inspect(
    parent: str = ParentArg,
    config: Optional[Path] = ConfigOpt,
    revision: Optional[str] = RevisionOpt,
    json_out: bool = typer.Option(False, "--json", help="Print as JSON (an error: {error, exit, kind})."),
    debug: bool = DebugOpt,
):
    """Describe a checkpoint: family, dims, params, dtypes, shards, tied embeddings."""
    try:
        from . import api

        summary = api.inspect(parent, config=config, revision=revision)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug, json_out)
    _print_summary(summary, json_out)


@app.command()
def schema():
    """Print the recipe's JSON Schema (recipes/shrinkit-recipe.schema.json is this)."""
    import json

    from . import api

    typer.echo(json.dumps(api.schema(), indent=2))


def _print_summary(summary: dict, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for title, rows in summary.items():
        if title == "towers" and isinstance(rows, dict):   # a dual encoder: each tower's sections
            for name, sections in rows.items():
                _print_summary({f"{name} tower: {k}" if isinstance(v, dict) else f"{name} tower {k}": v
                                for k, v in sections.items()}, False)
            continue
        if isinstance(rows, dict):
            t = Table(title=title, show_header=False)
            for k, v in rows.items():
                t.add_row(str(k), str(v))
            con.print(t)
        else:
            con.print(f"[bold]{title}[/bold]: {rows}")


if __name__ == "__main__":  # pragma: no cover
    app()
