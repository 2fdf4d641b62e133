"""Output ownership: where the child goes, and what a run may create, replace or delete there.

- The output path is resolved to the real absolute path it will become before anything is
  created (symbolic links followed, ``missing/../x`` judged as ``x``), and refused when it is,
  contains or lies inside an input of the run.
- Without ``--force`` only a missing or empty folder is used; with ``--force`` a folder is
  replaced only when it holds nothing but the files of an earlier shrinkit child (its
  ``shrinkit_report.json`` says so) or nothing at all.
- A run holds an exclusive lock (``.NAME.shrinkit-lock`` beside the output) until it ends, so
  two runs never write the same output.
- The child is written into ``.NAME.shrinkit-tmp-PID`` beside the output and renamed into place
  at the end with ``renameat2(RENAME_NOREPLACE)`` (a plain rename, which never replaces a
  non-empty folder, where the kernel lacks it): whatever appeared at the output during the run
  is left alone and the run fails. Temp folders left by runs that were killed (their process is
  gone) are removed by the next run to the same output.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
from pathlib import Path

from .errors import OutputError, UsageError

TMP_TAG = ".shrinkit-tmp-"
OLD_TAG = ".shrinkit-old-"
LOCK_TAG = ".shrinkit-lock"
OWNER = ".shrinkit-owner"          # written first into every temp folder: "pid"
REPORT = "shrinkit_report.json"
MAX_REPORT = 64 << 20

# every file name a shrinkit child folder holds
CHILD_FILES = re.compile(
    r"(config\.json|model\.safetensors|model-\d{5}-of-\d{5}\.safetensors|model\.safetensors\.index\.json|"
    r"shrinkit_report\.json|shrinkit_report\.md|README\.md|tokenizer\.json|tokenizer_config\.json|"
    r"special_tokens_map\.json|added_tokens\.json|vocab\.txt|vocab\.json|merges\.txt|tokenizer\.model|"
    r"spiece\.model|generation_config\.json|chat_template\.jinja|chat_template\.json|preprocessor_config\.json)")


# ------------------------------------------------------------------ paths

def resolve_out(out: str | os.PathLike, what: str = "--out") -> Path:
    """The real absolute path `out` will be once its missing folders are created: existing
    components have their symbolic links resolved; ``..`` after a component that does not exist
    yet goes back to its parent (the folder this run would create there). A component that
    exists and is not a folder, followed by more components, is refused (the system would fail
    there)."""
    s = os.fspath(out)
    if not s or "\0" in s:
        raise UsageError(f"{what} {s!r} is not a usable path")
    if not os.path.isabs(s):
        s = os.path.join(os.getcwd(), s)
    parts = [p for p in s.split(os.sep) if p not in ("", ".")]
    cur = os.sep
    missing = False
    for i, comp in enumerate(parts):
        if comp == "..":
            cur = os.path.dirname(cur)
            continue
        nxt = os.path.join(cur, comp)
        if not missing:
            if os.path.islink(nxt):
                nxt = os.path.realpath(nxt)
            if not os.path.lexists(nxt):
                missing = True
            elif i < len(parts) - 1 and not os.path.isdir(nxt):
                raise UsageError(f"{what} {out}: {nxt} is a file, not a folder; choose another {what}")
        cur = nxt
    if cur == os.sep:
        raise UsageError(f"{what} {out} is the root folder; choose another {what}")
    return Path(cur)


def _real(p: str | os.PathLike) -> str:
    return os.path.realpath(p)


def _within(a: str, b: str) -> bool:
    """a is b or lies inside b (both real absolute paths)."""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_inputs(out: Path, folders: list, files: list, what: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside an input folder, or that is or contains
    an input file. `out` is already resolved; inputs are resolved here."""
    o = str(out)
    for kind, paths in (("folder", folders), ("file", files)):
        for label, p in paths:
            if p is None:
                continue
            r = _real(p)
            inside = kind == "folder" and _within(o, r)
            if inside or _within(r, o):
                rel = "is" if o == r else ("lies inside" if inside else "contains")
                raise UsageError(f"{what} {out} {rel} the {label} {p}; the output must be a separate folder, "
                                 f"choose another {what}")


# ------------------------------------------------------------------ what may be replaced

def shrinkit_child(folder: Path) -> str | None:
    """None if `folder` holds only a shrinkit child's files (its report says it is one) or
    nothing; otherwise why it is not one."""
    try:
        entries = list(os.scandir(folder))
    except OSError as e:
        return f"it cannot be read ({e.strerror})"
    if not entries:
        return None
    for e in entries:
        if not CHILD_FILES.fullmatch(e.name) or e.is_symlink() or not e.is_file(follow_symlinks=False):
            return f"it holds {e.name!r}, which shrinkit does not write"
    rp = folder / REPORT
    if not any(e.name == REPORT for e in entries):
        return f"it has no {REPORT}"
    try:
        with open(rp, "rb") as f:
            raw = f.read(MAX_REPORT + 1)
        rep = json.loads(raw) if len(raw) <= MAX_REPORT else None
    except (OSError, ValueError, RecursionError):
        rep = None
    if not (isinstance(rep, dict) and isinstance(rep.get("shrinkit_version"), str) and isinstance(rep.get("child"), dict)):
        return f"its {REPORT} is not a shrinkit report"
    return None


def check_out(out: Path, force: bool, what: str = "--out") -> None:
    """Before any work: what is at `out` now may be used (missing, or an empty folder) or
    replaced (--force, an earlier shrinkit child)."""
    if not os.path.lexists(out):
        return
    if os.path.islink(out) or not out.is_dir():
        kind = "a file" if out.is_file() else "something else"
        raise UsageError(f"{what} {out} exists and is {kind}, not a folder; choose another {what}")
    try:
        empty = not any(out.iterdir())
    except OSError as e:
        raise UsageError(f"{what} {out} cannot be read ({e.strerror}); choose another {what}") from None
    if empty:
        return
    if not force:
        raise UsageError(f"{what} {out} exists and is not empty; pass --force to replace an earlier shrinkit child, "
                         f"or choose another {what}")
    why = shrinkit_child(out)
    if why is not None:
        raise UsageError(f"{what} {out} is not an earlier shrinkit child ({why}); --force replaces only those, "
                         f"choose another {what}")


# ------------------------------------------------------------------ atomic rename

AT_FDCWD = -100
RENAME_NOREPLACE = 1
_renameat2 = None


def _libc_renameat2():
    global _renameat2
    if _renameat2 is None:
        try:
            f = ctypes.CDLL(None, use_errno=True).renameat2
            f.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            f.restype = ctypes.c_int
            _renameat2 = f
        except (OSError, AttributeError):
            _renameat2 = False
    return _renameat2


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename src to dst; fail with FileExistsError if anything exists at dst. renameat2 with
    RENAME_NOREPLACE where the kernel and file system have it; elsewhere a plain rename of a
    folder, which fails over a file or a non-empty folder (it replaces only an empty one)."""
    f = _libc_renameat2()
    if f:
        if f(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst) and not os.path.isdir(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        raise


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ one run's claim on an output

class Claim:
    """This run's hold on `out`: the created parent folders, the lock, the temp folder.

    Use as a context manager; on an exception everything this run created is removed (and
    nothing else); publish() renames the finished temp folder into place."""

    def __init__(self, out: Path, force: bool, log=None):
        self.out = out
        self.force = force
        self.log = log or (lambda msg: None)
        self.parent = out.parent
        self.tmp = self.parent / f".{out.name}{TMP_TAG}{os.getpid()}"
        self.lock_path = self.parent / f".{out.name}{LOCK_TAG}"
        self.made: list[Path] = []
        self.lock_fd: int | None = None
        self.tmp_made = False

    # -- setup
    def __enter__(self) -> "Claim":
        try:
            self._make_parents()
            self._lock()
            self._sweep()
            check_out(self.out, self.force)   # again, now that the lock is held
            os.mkdir(self.tmp, 0o755)
            self.tmp_made = True
            with open(self.tmp / OWNER, "w") as f:
                f.write(f"{os.getpid()}\n")
        except BaseException:
            self._cleanup()
            raise
        return self

    def __exit__(self, et, ev, tb):
        self._cleanup()
        return False

    def _make_parents(self) -> None:
        missing = []
        d = self.parent
        while not os.path.lexists(d):
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            os.mkdir(d)
            self.made.insert(0, d)   # innermost first

    def _lock(self) -> None:
        import fcntl

        for _ in range(10):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UsageError(f"another shrinkit run is writing {self.out} (lock {self.lock_path}); wait for it "
                                 "or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.lock_path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                self.lock_fd = fd
                return
            os.close(fd)   # the holder removed it between our open and flock: take the new one
        raise OutputError(f"cannot lock {self.lock_path}; another run keeps replacing it")

    def _sweep(self) -> None:
        """Temp folders of earlier runs to this output whose process is gone: removed. A set-aside
        earlier child (a --force run killed mid-publish): put back if nothing took its place,
        else removed."""
        pat = re.compile(re.escape(f".{self.out.name}") + r"(" + re.escape(TMP_TAG) + "|" + re.escape(OLD_TAG) + r")(\d+)")
        try:
            entries = list(os.scandir(self.parent))
        except OSError:
            return
        for e in entries:
            m = pat.fullmatch(e.name)
            if not m or int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
                continue
            p = Path(e.path)
            if e.is_symlink() or not e.is_dir(follow_symlinks=False):
                continue
            if m.group(1) == TMP_TAG:
                names = {x.name for x in os.scandir(p)}
                if names and OWNER not in names:
                    self.log(f"left {p} alone: it looks like a shrinkit temp folder but has no {OWNER}")
                    continue
                shutil.rmtree(p, ignore_errors=True)
                self.log(f"removed {p}, left by an earlier run that did not finish")
            else:
                if shrinkit_child(p) is not None:
                    continue
                if not os.path.lexists(self.out):
                    try:
                        rename_noreplace(p, self.out)
                        self.log(f"restored {self.out} from {p}, set aside by an earlier run that did not finish")
                        continue
                    except OSError:
                        pass
                shutil.rmtree(p, ignore_errors=True)
                self.log(f"removed {p}, an earlier child replaced by a run that did not finish")

    # -- the end
    def publish(self) -> None:
        """Rename the finished temp folder into place. Only an empty folder (always) or an earlier
        shrinkit child (with --force) is replaced; anything else found at the output now is
        left alone and the run fails."""
        os.unlink(self.tmp / OWNER)
        out = self.out
        aside = None
        if os.path.lexists(out) and not os.path.islink(out) and os.path.isdir(out):
            try:
                os.rmdir(out)            # only if empty: atomic
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not self.force:
                    raise self._appeared() from None
                aside = self.parent / f".{out.name}{OLD_TAG}{os.getpid()}"
                rename_noreplace(out, aside)
                why = shrinkit_child(aside)
                if why is not None:        # replaced under us: put it back untouched
                    try:
                        rename_noreplace(aside, out)
                    except OSError:
                        raise OutputError(f"--out {out} changed during the run; it was moved to {aside} and left "
                                          "there untouched") from None
                    raise self._appeared() from None
        try:
            rename_noreplace(self.tmp, out)
        except FileExistsError:
            if aside is not None:
                raise OutputError(f"--out {out} appeared during the run; the earlier child is at {aside}, "
                                  "nothing was written") from None
            raise self._appeared() from None
        self.tmp_made = False
        self.made = []
        _fsync_dir(self.parent)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _appeared(self) -> UsageError:
        return UsageError(f"--out {self.out} was created or changed by something else during the run; it was left "
                          "untouched and nothing was written; choose another --out")

    def _cleanup(self) -> None:
        if self.tmp_made:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp_made = False
        if self.lock_fd is not None:
            try:
                os.unlink(self.lock_path)
            except OSError:
                pass
            os.close(self.lock_fd)
            self.lock_fd = None
        for d in self.made:       # folders this run created for the output, innermost first
            try:
                d.rmdir()
            except OSError:
                break
        self.made = []
