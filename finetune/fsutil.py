"""What the toolkit writes on disk: one atomic writer, one folder swap, one ownership record, one lock.

Layer 1: nothing of the package is imported here but `finetune.errors`.

Files. `atomic_write_text/bytes/json` and `atomic_open` write a temporary file beside the target
(`.<name>.tmp-<pid>-<random><suffix>`), fsync it, rename it over the target and fsync the folder:
a reader sees the old file or the new one, never a part. A kill leaves the old file whole and at
most the hidden temporary file, which the next write of that name removes once its process is gone.

Folders. `staged_dir(target)` builds a folder under `<target>.tmp-<random>` and swaps it in: an
existing target is moved to `<target>.old`, the new one renamed into place, and only then is the
old copy removed. `recover_dir(target)` puts right what a kill left at any point of that: our
stale temporary folders are removed, a swap cut between its two renames gets the old copy back,
an old copy left after a completed swap is removed.

Ownership. The toolkit deletes or replaces only what it made. A folder it made (a run folder, a
demo dataset) carries `MARKER`, a JSON record of what made it and of every path it wrote there
(`owned`: relative paths, a path ending in `/` owning a whole folder: our temporary folders). A
swapped folder is replaced only when every file in it is owned (or, for folders made before this
record existed, when the caller's `legacy` test recognises it); anything else is refused with a
`NotOursError` that names it, and nothing is changed. The record sits in the parent, so the
exported and adapter folders users share carry no file of ours.

Lock. `lock(path)` is an exclusive flock on a file, dropped by the kernel when its process ends,
however it ends (a kill -9 leaves no stale lock). Callers that recover or swap folders hold it.

Modes. Files are created 0666 and folders 0777 less the user's umask, as by any program: the
0600/0700 of `tempfile.mkstemp`/`mkdtemp` are not used, and a swapped folder's files written 0600
by a library (safetensors does) are given the umask's mode before the swap (`follow_umask`).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from finetune.errors import UserError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no advisory locks
    fcntl = None

__all__ = ["MARKER", "NotOursError", "LockHeld", "atomic_open", "atomic_path", "atomic_write_text",
           "atomic_write_bytes", "atomic_write_json", "read_marker", "mark", "owned_paths", "update_owned",
           "foreign_files", "check_replaceable", "recover_dir", "new_staging_dir", "commit_dir", "staged_dir",
           "lock", "kill_point", "umask", "follow_umask", "remove_owned", "move_in"]

MARKER = ".omni-finetune"
MADE_BY = "omni-finetune"


class NotOursError(UserError, FileExistsError):
    """A file or folder the toolkit would have to replace or delete, and did not make."""


class LockHeld(UserError, RuntimeError):
    """Another process holds the lock; `holder` is what it wrote there (its pid and command)."""

    def __init__(self, message: str, holder: str = ""):
        super().__init__(message)
        self.holder = holder


# ---- files ------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process: alive
        return True
    return True


def _fsync(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync on folders
        pass
    finally:
        os.close(fd)


def _temp_name(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"


def _clear_stale_files(path: Path) -> None:
    """Temporary files of earlier writes of `path` whose process is gone (killed mid-write)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(\d+)-[0-9a-f]{{8}}{re.escape(path.suffix)}")
    for p in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        m = pattern.fullmatch(p.name)
        if m and not _alive(int(m[1])) and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` (created empty, mode per umask, same suffix) for the block to
    write by name; renamed over `path` when the block ends, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_files(path)
    while True:
        tmp = path.with_name(_temp_name(path))
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
                ) -> Iterator[IO]:
    """`open(path, mode)` for writing, made atomic: the file appears whole when the block ends."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically; returns the path."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (no newline translation); returns the path."""
    with atomic_open(path, "w", encoding=encoding, newline="") as f:
        f.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, **dumps) -> Path:
    """`json.dumps(obj, **dumps)` and a newline, written atomically; returns the path."""
    return atomic_write_text(path, json.dumps(obj, **dumps) + "\n")


# ---- ownership --------------------------------------------------------------------------------
def read_marker(folder: str | Path) -> dict | None:
    """The ownership record of a folder the toolkit made, or None (not ours, or unreadable)."""
    try:
        rec = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("made_by") != MADE_BY:
        return None
    if not isinstance(rec.get("owned"), list):
        rec["owned"] = []
    return rec


def mark(folder: str | Path, what: str, **info) -> dict:
    """Record that the toolkit made `folder` (as `what`, with `info`); an existing record is kept."""
    folder = Path(folder)
    rec = read_marker(folder)
    if rec is None:
        rec = {"made_by": MADE_BY, "what": what, **info, "owned": []}
        atomic_write_json(folder / MARKER, rec, indent=1)
    return rec


def owned_paths(folder: str | Path) -> set[str]:
    """The paths (relative to `folder`) its record says the toolkit wrote; empty when not ours."""
    rec = read_marker(folder)
    return set(rec["owned"]) if rec else set()


def _under(path: str, names: Iterable[str]) -> bool:
    return any(path == n or path.startswith(n.rstrip("/") + "/") for n in names)


def update_owned(folder: str | Path, add: Iterable[str] = (), drop: Iterable[str] = ()) -> None:
    """Change the record of `folder`: forget the paths equal to or under `drop`, then add `add`.
    Nothing is recorded in a folder without a record (not ours). The caller holds the folder's lock."""
    rec = read_marker(folder)
    if rec is None:
        return
    drop = list(drop)
    owned = {p for p in rec["owned"] if not _under(p, drop)} | set(add)
    if owned != set(rec["owned"]):
        rec["owned"] = sorted(owned)
        atomic_write_json(Path(folder) / MARKER, rec, indent=1)


def _listing(path: Path) -> list[str]:
    """Every file (and link) under `path`, relative to it, '/'-separated; [''] for a file itself."""
    if path.is_symlink() or not path.is_dir():
        return [""]
    out = []
    for root, dirs, files in os.walk(path):
        rel = Path(root).relative_to(path)
        for name in files + [d for d in dirs if (Path(root) / d).is_symlink()]:
            out.append((rel / name).as_posix())
    return sorted(out)


def _covered(path: str, owned: set[str]) -> bool:
    if path in owned:
        return True
    parts = path.split("/")
    return any("/".join(parts[:i]) + "/" in owned for i in range(1, len(parts)))


def foreign_files(folder: str | Path, name: str) -> list[str]:
    """The files under `folder/name` (relative to `folder`) that the toolkit did not write there."""
    folder = Path(folder)
    owned = owned_paths(folder)
    out = []
    for rel in _listing(folder / name):
        p = f"{name}/{rel}" if rel else name
        if not _covered(p, owned):
            out.append(p)
    return out


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _replaceable(target: Path, legacy: Callable[[Path], bool] | None) -> list[str]:
    """[] when the toolkit may replace `target`, else what in it is not ours."""
    if not _exists(target):
        return []
    foreign = foreign_files(target.parent, target.name)
    if not foreign:
        return []
    recorded = any(_under(p, [target.name]) for p in owned_paths(target.parent))
    if not recorded and legacy is not None and not target.is_symlink() and target.is_dir() and legacy(target):
        return []  # made before the ownership record existed: the caller recognises its layout
    return foreign


def check_replaceable(target: str | Path, legacy: Callable[[Path], bool] | None = None) -> None:
    """Raise NotOursError, naming them, when `target` holds files the toolkit did not write."""
    target = Path(target)
    foreign = _replaceable(target, legacy)
    if not foreign:
        return
    if target.is_symlink() or not target.is_dir():
        raise NotOursError(f"{target} is in the way and was not made by omni-finetune; move it elsewhere and run "
                           "again (nothing was changed)")
    if not any(_under(p, [target.name]) for p in owned_paths(target.parent)):
        raise NotOursError(f"{target} was not made by omni-finetune; move it elsewhere (or delete it) and run again "
                           "(nothing was changed)")
    names = ", ".join(p.split("/", 1)[-1] for p in foreign[:3]) + (f" and {len(foreign) - 3} more"
                                                                   if len(foreign) > 3 else "")
    raise NotOursError(f"{target} holds files omni-finetune did not write ({names}); move them out of "
                       f"{target.name}/ and run again (nothing was changed)")


# ---- folder swaps -----------------------------------------------------------------------------
def _old(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def recover_dir(target: str | Path, legacy: Callable[[Path], bool] | None = None) -> None:
    """Put right what a kill left around `target`: our temporary folders are removed; a swap cut
    between its renames gets the old copy back; an old copy left after a completed swap is
    removed. What the toolkit did not make is left alone. The caller holds the folder's lock."""
    target = Path(target)
    parent = target.parent
    owned = owned_paths(parent)
    gone = []
    for stale in parent.glob(glob.escape(target.name) + ".tmp-*"):
        if f"{stale.name}/" in owned and stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale)
            gone.append(stale.name)
    old = _old(target)
    if old.is_dir() and not old.is_symlink():
        foreign = foreign_files(parent, old.name)
        if not foreign or (legacy is not None and not any(_under(p, [old.name]) for p in owned) and legacy(old)):
            if _exists(target):
                shutil.rmtree(old)  # the swap completed; only the removal of the old copy was cut
            else:
                os.rename(old, target)  # cut between the two renames: the old copy comes back
                _fsync(parent, directory=True)
            gone.append(old.name)
    if gone:
        update_owned(parent, drop=gone)


def new_staging_dir(target: str | Path, name: str | None = None) -> Path:
    """An empty folder beside `target` (`<target>.tmp-<random>`, or `name`) recorded as ours in
    the parent's record, for `commit_dir` to move into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = target.with_name(name or f"{target.name}.tmp-{secrets.token_hex(4)}")
        if not _exists(tmp):
            update_owned(target.parent, add=[f"{tmp.name}/"])  # recorded first: a kill leaves nothing unknown
            try:
                os.mkdir(tmp, 0o777)
                return tmp
            except FileExistsError:  # made by someone else meanwhile: not ours
                update_owned(target.parent, drop=[tmp.name])
        if name:
            raise NotOursError(f"{tmp} is in the way and was not made by omni-finetune; move it elsewhere and run "
                               "again (nothing was changed)")


def private_temp_dir(prefix: str) -> Path:
    """A new folder in the system's temporary folder that only this user can read (mode 0700), for
    what must not land in a run folder (a web page's uploads); the caller removes it."""
    return Path(tempfile.mkdtemp(prefix=prefix)).resolve()


def kill_point(env: str | None, where: str) -> None:
    """Test hook: when the environment variable `env` is `where`, this process is killed here
    (SIGKILL: no handler, no cleanup runs)."""
    if env and os.environ.get(env) == where:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def umask() -> int:
    """This process's umask (read from /proc where it can be, without changing it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str | Path) -> None:
    """Give every file and folder under `folder` the mode a new one gets under the umask (0666 or,
    for executables and folders, 0777, less the umask): some writers create files 0600."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in [*files, *dirs]:
            p = Path(root) / name
            if p.is_symlink():
                continue
            mode = p.stat().st_mode
            full = 0o777 if (p.is_dir() or mode & 0o111) else 0o666
            if (mode & 0o777) != full & ~mask:
                os.chmod(p, full & ~mask)


def _fsync_tree(folder: Path) -> None:
    for root, dirs, files in os.walk(folder):
        for name in files:
            if not (Path(root) / name).is_symlink():
                _fsync(Path(root) / name)
        _fsync(Path(root), directory=True)


def commit_dir(tmp: str | Path, target: str | Path, *, legacy: Callable[[Path], bool] | None = None,
               kill_env: str | None = None, replace: bool = True) -> bool:
    """Move the complete folder `tmp` to `target`, made durable first. An existing target is
    replaced only when it is ours (else NotOursError, nothing changed), and kept as
    `<target>.old` until the new one is in place; with `replace=False` an existing target wins
    (another process made the same folder) and `tmp` is removed. Returns whether `tmp` went in."""
    tmp, target = Path(tmp), Path(target)
    parent = target.parent
    follow_umask(tmp)
    _fsync_tree(tmp)
    exists = _exists(target)
    if exists and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    new = [f"{target.name}/{p}" for p in _listing(tmp)]
    old = _old(target)
    if exists:
        check_replaceable(target, legacy)
        if _exists(old):
            recover_dir(target, legacy)  # an old copy left by an earlier swap
            if _exists(old):
                check_replaceable(old, legacy)
                shutil.rmtree(old)
        before = [f"{target.name}/{p}" for p in _listing(target)]
        # every name each folder may hold at any point of the swap is recorded before it starts
        update_owned(parent, add=new + before + [old.name + p[len(target.name):] for p in before])
        os.rename(target, old)
        kill_point(kill_env, "swapping")
    else:
        update_owned(parent, add=new)
    try:
        os.rename(tmp, target)
    except OSError:
        if not replace and _exists(target):  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    _fsync(parent, directory=True)
    if exists:
        shutil.rmtree(old)
    update_owned(parent, drop=[tmp.name, old.name, target.name], add=new)
    return True


@contextlib.contextmanager
def staged_dir(target: str | Path, *, legacy: Callable[[Path], bool] | None = None,
               kill_env: str | None = None) -> Iterator[Path]:
    """A temporary folder for the block to fill, swapped in for `target` when the block completes
    (`commit_dir`) and removed when it raises: `target` is the old one or the new one, whole.
    A target the toolkit did not make is refused before the block runs. The caller holds the
    lock of `target`'s parent folder."""
    target = Path(target)
    recover_dir(target, legacy)
    check_replaceable(target, legacy)
    tmp = new_staging_dir(target)
    try:
        yield tmp
        commit_dir(tmp, target, legacy=legacy, kill_env=kill_env)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        update_owned(target.parent, drop=[tmp.name])
        raise


def remove_owned(folder: str | Path, name: str) -> None:
    """Delete `folder/name` (a file or a folder) when everything in it is ours (else
    NotOursError), and forget it in the record."""
    folder = Path(folder)
    path = folder / name
    if not _exists(path):
        return
    check_replaceable(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    update_owned(folder, drop=[name])


def move_in(tmp: str | Path, folder: str | Path, names: Iterable[str]) -> None:
    """Move the entries `names` of the staging folder `tmp` into `folder` (which carries our
    record), in the order given, each replacing our entry of that name (check_replaceable); the
    record lists the old and the new files throughout, then the new ones only. A caller whose
    last names mark a complete set removes them first (remove_owned)."""
    tmp, folder = Path(tmp), Path(folder)
    names = list(names)
    for name in names:
        check_replaceable(folder / name)
    follow_umask(tmp)
    new = [f"{name}/{p}" if p else name for name in names for p in _listing(tmp / name)]
    update_owned(folder, add=new)
    for name in names:
        old = folder / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif _exists(old):
            old.unlink()
        os.replace(tmp / name, folder / name)
    _fsync(folder, directory=True)
    update_owned(folder, drop=names, add=new)


# ---- lock -------------------------------------------------------------------------------------
def lock(path: str | Path, *, wait: bool = True, note: str | None = None) -> IO:
    """Take an exclusive lock on the file `path` (created if missing); held while the returned
    file stays open. `wait=False`: LockHeld at once when another process holds it, with what
    that process wrote there. `note` (say, the pid and command) is written for the next one."""
    path = Path(path)
    f = open(path, "a+")
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise LockHeld(f"{path} is held by {holder}", holder) from None
    if note is not None:
        f.seek(0)
        f.truncate()
        f.write(note + "\n")
        f.flush()
    return f
