"""One writer per run folder, and only in a run folder: its marker and an advisory lock held for
the life of the process.

`lock_run(run_dir)` first checks that the folder is a run folder of ours: missing or empty (it
is then created and marked), or marked by us (`fsutil.MARKER`, what made it). A folder made
before the marker existed is recognised by our layout (our `.lock` beside a resolved
`recipe.yaml` or `stages.yaml`) and gets the marker. Anything else is refused, naming the folder,
before anything is written. It then takes `run_dir/.lock` (fsutil.lock: flock, released by the
kernel when the process ends, however it ends: a kill -9 leaves no stale lock) and records the
holder's pid and command. A second process gets a clear error naming the holder. Re-entrant
within a process (`run` = train, eval, export in one process). Every command that writes a run
folder (train, eval, export, a staged run) takes it first; holding it, an adapter swap cut by a
kill is put right (fsutil.recover_dir) before anything reads the adapter.

Under torchrun only the global rank 0 writes the run folder, so only it takes the lock: the
other ranks return at once (they never block on it, nor hold it). `rank()`, `world_size()` and
`is_main_process()` read torchrun's environment, so they answer before torch.distributed is up.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from finetune import __version__, fsutil

_held: dict[Path, object] = {}
RUN_FOLDER = "run folder"  # the marker's `what` of a run folder


class RunLocked(fsutil.LockHeld):
    """Another process is writing this run folder."""


class NotARunFolder(fsutil.NotOursError):
    """output.dir holds something the toolkit did not make."""


def rank() -> int:
    """Global rank of this process under torchrun (0 when not launched distributed)."""
    return int(os.environ.get("RANK", "0") or 0)


def world_size() -> int:
    """Number of processes of the job (1 when not launched distributed)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main_process() -> bool:
    """True on the one process that writes the run folder (global rank 0)."""
    return rank() == 0


def _legacy_run(folder: Path) -> bool:
    """A run folder made before the marker existed: our lock file beside our resolved recipe."""
    if not (folder / ".lock").is_file():
        return False
    for name in ("recipe.yaml", "stages.yaml"):
        try:
            with open(folder / name, encoding="utf-8") as f:
                if f.read(64).startswith("# Resolved recipe"):
                    return True
        except (OSError, UnicodeDecodeError):
            continue
    return False


def legacy_adapter(folder: Path) -> bool:
    """An adapter folder saved before the ownership record existed (ours: it has base_model.json)."""
    return (folder / "adapter_config.json").is_file() and (folder / "base_model.json").is_file()


def check_run_dir(run_dir: Path) -> None:
    """Refuse (NotARunFolder, naming it) an output folder that is not missing, empty, or a run
    folder of ours. Writes nothing."""
    run_dir = Path(run_dir)
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.is_dir():
        raise NotARunFolder(f"{run_dir} is not a run folder: it is a file; set output.dir to a new or empty folder")
    rec = fsutil.read_marker(run_dir)
    if rec is not None:
        if rec.get("what") == RUN_FOLDER:
            return
        raise NotARunFolder(f"{run_dir} is not a run folder (omni-finetune made it as a {rec.get('what')}); set "
                            "output.dir to a new or empty folder")
    if _legacy_run(run_dir):
        return
    names = sorted(p.name for p in run_dir.iterdir() if p.name != ".lock")
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise NotARunFolder(f"{run_dir} is not a run folder of omni-finetune and is not empty ({shown}); output.dir "
                            "must be a new or empty folder, or a run folder omni-finetune made: set another "
                            "output.dir (nothing was changed)")


def lock_run(run_dir: Path) -> None:
    """Check that `run_dir` is ours (check_run_dir), create and mark it if new, take its lock
    (RunLocked when another process holds it), and put right an adapter swap cut by a kill."""
    if not is_main_process():  # only rank 0 writes the run folder
        return

    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    check_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        f = fsutil.lock(run_dir / ".lock", wait=False, note=f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})")
    except fsutil.LockHeld as e:
        raise RunLocked(f"{run_dir} is in use by {e.holder}; wait for it to finish, stop it, or set another "
                        "output.dir", e.holder) from None
    _held[run_dir] = f  # kept open: the lock lives as long as the process
    # what made the folder (an existing record is kept)
    fsutil.mark(run_dir, RUN_FOLDER, command=" ".join(sys.argv)[:300], version=__version__)
    fsutil.recover_dir(run_dir / "adapter", legacy_adapter)


def unlock_run(run_dir: Path) -> None:
    """Release this process's lock of `run_dir` (it also ends with the process)."""
    f = _held.pop(Path(run_dir).resolve(), None)
    if f is not None:
        f.close()
