"""The shrinkit command line. Thin: parse, call the pipeline, print."""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

# Before torch loads libgomp: idle OpenMP workers spin for 300,000 iterations by default, taking
# the two cores of a small machine from shrinkit's own writer and sha256 threads (measured on a
# 4 GB parent with hashing: 6.2-7.5 s by default, 5.1-5.9 s with 10,000). Users may override it.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import typer

from . import __version__
from .errors import ShrinkitError

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


def _fail(e: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    if isinstance(e, ShrinkitError):
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(e.exit_code)
    if isinstance(e, KeyboardInterrupt):
        typer.echo("interrupted; nothing was written", err=True)
        raise typer.Exit(130)
    if isinstance(e, MemoryError):
        typer.echo("error: out of memory; free memory or use a machine with more", err=True)
        raise typer.Exit(1)
    if isinstance(e, OSError):
        typer.echo(f"error: {e.strerror or e} ({e.filename or ''}); nothing was written", err=True)
        raise typer.Exit(1)
    typer.echo(f"error: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
    raise typer.Exit(1)


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
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                          TimeRemainingColumn(), transient=False)
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
ConfigOpt = typer.Option(None, "--config", help="config.json of a single-file parent.")
DebugOpt = typer.Option(False, "--debug", help="Show tracebacks.")
DeviceOpt = typer.Option("cpu", "--device", help="Where calibration and verification run: cpu, cuda or auto.")
TokenizerOpt = typer.Option(None, "--tokenizer", help="Tokenizer folder for calibration text (default: the parent's).")


@app.command()
def subclone(
    parent: Path = typer.Argument(..., help="Hugging Face model folder, or a .safetensors file."),
    recipe: Path = RecipeOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Child folder (default ./<parent>-<recipe>)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing, non-empty --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar; only the result."),
    config: Optional[Path] = ConfigOpt,
    device: str = DeviceOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    no_verify: bool = typer.Option(False, "--no-verify", help="Skip verifying the child on held-out text."),
    debug: bool = DebugOpt,
):
    """Write a child checkpoint cut out of PARENT by RECIPE."""
    try:
        from .pipeline import subclone as run
        from .recipe import load_recipe

        r = load_recipe(recipe)
        prog = _progress(quiet)
        res = run(parent, r, out, force=force, config=config, progress=prog, device=device,
                  tokenizer=tokenizer, verify=not no_verify)
        prog.finish()
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    c = res.report["child"]
    if "verify" in res.report:
        typer.echo("\n".join(res.report["verify"]["table"]))
    typer.echo(f"wrote {res.out} ({c['params'] / 1e6:.2f}M params, {c['bytes'] / 1e6:.1f} MB) "
               f"in {res.report['seconds']:.2f} s")


@app.command()
def verify(
    parent: Path = typer.Argument(..., help="The parent: Hugging Face model folder, or a .safetensors file."),
    child: Path = typer.Argument(..., help="The child folder."),
    data: str = typer.Option("builtin", "--data", help="builtin | random_tokens | PATH (.txt or .jsonl)."),
    samples: int = typer.Option(16, "--samples", min=2),
    seq_len: int = typer.Option(256, "--seq-len", min=2),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    config: Optional[Path] = ConfigOpt,
    device: str = DeviceOpt,
    tokenizer: Optional[Path] = TokenizerOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    debug: bool = DebugOpt,
):
    """Measure how much of PARENT survived in CHILD on held-out text (against a random-init child)."""
    try:
        from .checkpoint.reader import open_checkpoint
        from .pipeline import resolve_device
        from .recipe import Verify
        from .verify import check_child, verify_child

        check_child(child)
        spec = Verify(data=data, samples=samples, seq_len=seq_len, batch_size=batch_size)
        with open_checkpoint(parent, config) as ck:
            v = verify_child(ck, child, spec, device=resolve_device(device), tokenizer=tokenizer)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    if json_out:
        import json
        typer.echo(json.dumps(v, indent=2))
    else:
        typer.echo("\n".join(v["table"]))


@app.command()
def plan(
    parent: Path = typer.Argument(..., help="Hugging Face model folder, or a .safetensors file."),
    recipe: Path = RecipeOpt,
    config: Optional[Path] = ConfigOpt,
    json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    debug: bool = DebugOpt,
):
    """Dry run: validate the recipe against PARENT and print the child's shape; writes nothing."""
    try:
        from .inspect import plan_summary
        from .recipe import load_recipe

        summary = plan_summary(parent, load_recipe(recipe), config)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    _print_summary(summary, json_out)


@app.command()
def inspect(
    parent: Path = typer.Argument(..., help="Hugging Face model folder, or a .safetensors file."),
    config: Optional[Path] = ConfigOpt,
    json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
    debug: bool = DebugOpt,
):
    """Describe a checkpoint: family, dims, params, dtypes, shards, tied embeddings."""
    try:
        from .inspect import inspect_summary

        summary = inspect_summary(parent, config)
    except (Exception, KeyboardInterrupt) as e:
        _fail(e, debug)
    _print_summary(summary, json_out)


def _print_summary(summary: dict, as_json: bool) -> None:
    import json

    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    con = Console()
    for title, rows in summary.items():
        if isinstance(rows, dict):
            t = Table(title=title, show_header=False)
            for k, v in rows.items():
                t.add_row(str(k), str(v))
            con.print(t)
        else:
            con.print(f"[bold]{title}[/bold]: {rows}")


if __name__ == "__main__":  # pragma: no cover
    app()
