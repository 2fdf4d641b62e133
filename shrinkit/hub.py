"""Parents named by Hugging Face Hub id (``org/name``), resolved through huggingface_hub.

Order: a local path that exists always wins (even one that looks like ``org/name``); then the
Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``);
then, unless ``HF_HUB_OFFLINE`` is set, the Hub. Only what shrinkit reads is fetched: config.json,
the safetensors index and the shards it names (or model.safetensors), and the tokenizer files,
never ``.bin`` / ``.pt`` weights and never remote code. Both fetches are pinned to one commit.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import ParentError, UsageError

COMMIT = re.compile(r"^[0-9a-f]{40}$")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Source:
    """Where a parent came from: a local path, or a Hub repository at a commit."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None     # the commit hash the files came from

    def as_dict(self) -> dict:
        return {"repo_id": self.repo_id, "revision": self.revision}


def looks_like_repo_id(s: str) -> bool:
    return bool(REPO_ID.match(s)) and ".." not in s and not s.endswith((".safetensors", ".json"))


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    return _truthy(os.environ.get("HF_HUB_OFFLINE"))


def cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(parent: str | os.PathLike, revision: str | None = None, quiet: bool = False, log=None) -> Source:
    """The local folder (or file) of PARENT: itself when it exists, else a Hub snapshot."""
    p = Path(parent)
    if p.exists() or not looks_like_repo_id(str(parent)):
        if revision:
            raise UsageError(f"--revision applies to Hub ids (org/name), but {parent} is a local path; drop --revision")
        return Source(p)
    check_revision(revision)
    return _from_hub(str(parent), revision, quiet, log)


def check_revision(revision: str | None) -> None:
    """A revision names a branch, tag or commit, never a path: no separators, no '..'."""
    if revision is None:
        return
    if not revision or "/" in revision or "\\" in revision or ".." in revision or "\0" in revision \
            or len(revision) > 256 or revision.strip() != revision:
        raise UsageError(f"--revision {revision[:80]!r} is not a branch, tag or commit name (no '/', '\\' or '..'); "
                         "pass one such as main, v1.0 or a 40-character commit hash")


def _closed(cache: Path, repo: str, folder: Path) -> Path:
    """The snapshot folder, checked to lie inside the cache: the ref it came from must be a
    commit hash and the folder must be the repository's own snapshots/<commit> (no link or '..'
    leading elsewhere). ParentError (exit 3) otherwise."""
    storage = Path(os.path.realpath(cache / ("models--" + repo.replace("/", "--"))))
    name = folder.name
    if not COMMIT.match(name) or folder.parent.name != "snapshots":
        raise ParentError(f"the Hugging Face cache entry of {repo} names {str(folder)[-80:]!r} as its snapshot, which "
                          f"is not snapshots/<40-character commit hash>; a ref under {storage}/refs must hold a "
                          "commit hash: remove that cache entry and fetch it again")
    if os.path.realpath(folder) != str(storage / "snapshots" / name):
        raise ParentError(f"the Hugging Face cache snapshot {folder} of {repo} leads outside {storage}; remove that "
                          "cache entry and fetch it again")
    return folder


def _check_links(cache: Path, repo: str, folder: Path) -> None:
    """Every file shrinkit reads from a snapshot is a plain file of the snapshot or a link that
    resolves into the repository's own blobs/ (huggingface_hub's layout): ParentError otherwise."""
    from .pipeline import TOKENIZER_FILES

    blobs = os.path.join(os.path.realpath(cache / ("models--" + repo.replace("/", "--"))), "blobs")
    for name in dict.fromkeys(["config.json", INDEX, *_shards(folder), *TOKENIZER_FILES]):
        p = folder / name
        if not os.path.islink(p):
            continue
        real = os.path.realpath(p)
        if os.path.commonpath([blobs, real]) != blobs:
            raise ParentError(f"{name} in the Hugging Face cache snapshot of {repo} links to {real}, outside the "
                              f"repository's blobs folder {blobs}; remove that cache entry and fetch it again")


def _complete(folder: Path) -> bool:
    """Whether a snapshot folder holds the config and every weight file shrinkit would read."""
    if not (folder / "config.json").is_file():
        return False
    idx = folder / INDEX
    if idx.is_file():
        try:
            shards = set(json.loads(idx.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return True  # the reader reports a bad index with its own message
        return all((folder / s).is_file() for s in shards)
    return (folder / "model.safetensors").is_file()


def _shards(folder: Path) -> list[str]:
    idx = folder / INDEX
    if idx.is_file():
        try:
            wm = json.loads(idx.read_text())["weight_map"]
            return sorted({s for s in wm.values() if isinstance(s, str) and s.endswith(".safetensors")
                           and "/" not in s and "\\" not in s})
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []
    return ["model.safetensors"]


def _fetch_error(repo: str, rev: str | None, e: Exception) -> ParentError:
    from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    at = f"{repo}@{rev}" if rev else repo
    if isinstance(e, GatedRepoError):
        return ParentError(f"{repo} is gated on the Hub; accept its terms on the model page and log in (hf auth login)")
    if isinstance(e, RepositoryNotFoundError):
        return ParentError(f"{repo} is neither a local path nor a Hub repository you can access; check the name "
                           "(or log in with hf auth login for a private one)")
    if isinstance(e, RevisionNotFoundError):
        return ParentError(f"{repo} has no revision {rev!r}; pass an existing branch, tag or commit with --revision")
    if isinstance(e, LocalEntryNotFoundError):
        return ParentError(f"{at} is not in the Hugging Face cache ({cache_dir()}) and the Hub cannot be reached; "
                           "connect (and unset HF_HUB_OFFLINE) or pass a local folder")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ParentError(f"cannot fetch {at} from the Hub ({type(e).__name__}: {first}); check the network, or pass a local folder")


def _from_hub(repo: str, revision: str | None, quiet: bool, log) -> Source:
    try:
        import huggingface_hub
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a dependency
        raise UsageError(f"{repo} looks like a Hub id, but huggingface_hub is not installed; pip install huggingface_hub "
                         "or pass a local folder") from None
    from .hf import TOKENIZER_FILES

    meta = ["config.json", INDEX, *TOKENIZER_FILES]
    cache = cache_dir()
    at = f"{repo}@{revision}" if revision else repo
    kw = dict(cache_dir=str(cache), library_name="shrinkit")
    try:  # the cache first: no network when the snapshot is already complete
        folder = _closed(cache, repo, Path(snapshot_download(repo, revision=revision, local_files_only=True,
                                                             allow_patterns=meta, **kw)))
        _check_links(cache, repo, folder)
        if _complete(folder):
            return Source(folder, repo, folder.name)
    except huggingface_hub.errors.LocalEntryNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise _fetch_error(repo, revision, e) from None
    if offline():
        raise ParentError(f"{at} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; fetch it "
                          "while online (unset HF_HUB_OFFLINE) or pass a local folder")
    was_disabled = are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        if log:
            log(f"fetching {at} from the Hub (config, index, tokenizer) into {cache}")
        folder = _closed(cache, repo, Path(snapshot_download(repo, revision=revision, allow_patterns=meta, **kw)))
        _check_links(cache, repo, folder)
        commit = folder.name  # pin the weights to the commit the config came from
        shards = _shards(folder)
        if not shards:
            raise ParentError(f"{repo}'s {INDEX} names no .safetensors shards; shrinkit reads safetensors only")
        if log:
            log(f"fetching {at} weights: {', '.join(shards)}")
        folder = _closed(cache, repo, Path(snapshot_download(repo, revision=commit, allow_patterns=shards, **kw)))
        _check_links(cache, repo, folder)
    except ParentError:
        raise
    except Exception as e:  # huggingface_hub and httpx raise many types; one line for each
        raise _fetch_error(repo, revision, e) from None
    finally:
        if quiet and not was_disabled:
            enable_progress_bars()
    if not (folder / "config.json").is_file():
        raise ParentError(f"{repo} has no config.json at {commit[:12]}; shrinkit needs a transformers model repository")
    if not _complete(folder):
        raise ParentError(f"{repo} has no model.safetensors or {INDEX} at {commit[:12]}; shrinkit reads safetensors "
                          "only (never .bin); convert the weights or pick a repository that has them")
    return Source(folder, repo, commit)
