"""One writer per run folder: an advisory lock held for the life of the process.

`lock_run(run_dir)` takes `run_dir/.lock` with flock (released by the kernel when the process
ends, however it ends: a kill -9 leaves no stale lock) and records the holder's pid and
command. A second process gets a clear error naming the holder. Re-entrant within a process
(`run` = train, eval, export in one process).

Under torchrun only the global rank 0 writes the run folder, so only it takes the lock: the
other ranks return at once (they never block on it, nor hold it). `rank()`, `world_size()` and
`is_main_process()` read torchrun's environment, so they answer before torch.distributed is up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune.errors import UserError

_held: dict[Path, object] = {}


class RunLocked(UserError, RuntimeError):
    """Another process is writing this run folder."""


def rank() -> int:
    """Global rank of this process under torchrun (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes of the job (1 when not launched distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on the one process that writes the run folder (global rank 0)."""
    return rank() == 0


def lock_run(run_dir: Path) -> None:
    import fcntl

    if not is_main_process():  # only rank 0 writes the run folder
        return

    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunLocked(f"{run_dir} is in use by {holder}; wait for it to finish, stop it, or set another "
                        "output.dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n")
    f.flush()
    _held[run_dir] = f  # kept open: the lock lives as long as the process


def unlock_run(run_dir: Path) -> None:
    f = _held.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()
