"""The run folder (layer 5): ours, one writer at a time, and what training leaves in it.

`lock_run(run_dir)` first checks that the folder is a run folder of ours: missing or empty (it
is then created and marked), or marked by us (`fsutil.MARKER`, what made it). A folder made
before the marker existed is recognised by our layout (our `.lock` beside a resolved
`recipe.yaml` or `stages.yaml`) and gets the marker. Anything else is refused, naming the folder,
before anything is written. It then takes `run_dir/.lock` (fsutil.lock: flock, released by the
kernel when the process ends, however it ends: a kill -9 leaves no stale lock) and records the
holder's pid and command. A second process gets a clear error naming the holder. Re-entrant
within a process (`run` = train, eval, export in one process). Every command that writes a run
folder (train, eval, export, a staged run) takes it first; holding it, an adapter swap cut by a
kill is put right (fsutil.recover_dir) before anything reads the adapter. Under torchrun only
the global rank 0 writes the run folder, so only it takes the lock.

What training writes there: checkpoints (`checkpoints/checkpoint-<step>`, complete once their
trainer_state.json parses), metrics.jsonl (one record per logged step; `read_metrics` is its one
reader), the loss curve, the adapter (swapped in whole), skipped.jsonl.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import yaml

from finetune import __version__, fsutil
from finetune.data.schema import DataError
from finetune.families.base import Family, LoadedModel
from finetune.report import loss_svg
from finetune.runtime import is_main_process

_held: dict[Path, object] = {}
RUN_FOLDER = "run folder"  # the marker's `what` of a run folder


class RunLocked(fsutil.LockHeld):
    """Another process is writing this run folder."""


class NotARunFolder(fsutil.NotOursError):
    """output.dir holds something the toolkit did not make."""


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
def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl (one per logged step; [] when there is none); a line cut
    short by a kill is left out."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def read_loss_history(run_dir: Path) -> list[dict]:
    """The training loss records of a run ({step, loss, ...}), for its curves. A staged run's
    earlier stages (stages/NN-name/) come first, each record marked with its stage and its steps
    counted on from the stage before."""
    run_dir = Path(run_dir)
    parts = [(p.name.split("-", 1)[-1], p / "metrics.jsonl") for p in sorted((run_dir / "stages").glob("[0-9]*-*"))]
    last_name = None
    if parts:
        try:
            last_name = yaml.safe_load((run_dir / "stages.yaml").read_text())["recipe"]["stages"][-1]["name"]
        except (OSError, ValueError, KeyError, IndexError, TypeError, yaml.YAMLError):
            last_name = "last"
    parts.append((last_name, run_dir / "metrics.jsonl"))
    out, offset = [], 0
    for stage, path in parts:
        last = 0
        for rec in read_metrics(path):
            if isinstance(rec.get("loss"), (int, float)) and "step" in rec:
                last = max(last, rec["step"])
                if len(parts) > 1:
                    rec = {**rec, "step": rec["step"] + offset, "stage": stage}
                out.append(rec)
        offset += last
    return out


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, forget records logged after the checkpoint so the curve has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        fsutil.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_metrics(path)
                                               if r.get("step", 0) <= step))


def complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it parses.

    A run killed (or out of disk) while saving leaves a folder without it, or with it cut
    short; that folder is skipped and the previous checkpoint is used.
    """
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The Trainer's checkpoint-<step> folders of the run (no other name is one of ours)."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return [p for p in ck.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() and not p.is_symlink()]


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint-N folder, or None."""
    done = [p for p in step_checkpoints(run_dir) if complete(p)]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))


def write_loss_curve(run_dir: Path) -> Path | None:
    """loss_curve.svg: the training loss per step (every stage of a staged run), the curve eval.html
    shows too (report.loss_svg); None when nothing was logged."""
    svg = loss_svg(read_loss_history(run_dir), standalone=True)
    if not svg:
        return None
    return fsutil.atomic_write_text(Path(run_dir) / "loss_curve.svg", svg)


#: test hook: FINETUNE_ADAPTER_KILL=adapter_written | swapping kills the process (SIGKILL) with the new
#: adapter written beside the old one, or between moving the old one aside and the new one in
ADAPTER_KILL = "FINETUNE_ADAPTER_KILL"


def save_adapter(model, family: Family, loaded: LoadedModel, out: Path) -> None:
    """PEFT adapter folder plus the processor files, swapped in whole (fsutil.staged_dir): the
    old adapter stays until the new one is complete, and a kill at any point leaves one of them
    (lock_run recovers a cut swap)."""
    with fsutil.staged_dir(out, legacy=legacy_adapter, kill_env=ADAPTER_KILL) as tmp:
        model.save_pretrained(str(tmp))
        family.copy_processor_files(loaded.base_path, tmp)
        fsutil.atomic_write_text(tmp / "base_model.json", json.dumps({"base_path": str(loaded.base_path)}, indent=2))
        fsutil.kill_point(ADAPTER_KILL, "adapter_written")


def save_sharded_adapter(trainer, family: Family, loaded: LoadedModel, out: Path) -> None:
    """FSDP / DeepSpeed: every rank takes part in gathering the weights (Trainer.save_model) into
    a folder of a name they all know, then rank 0 adds the processor files and swaps it in as
    save_adapter does."""
    tmp = out.parent / (out.name + ".tmp-gather")
    if is_main_process():
        fsutil.recover_dir(out, legacy_adapter)  # a gather folder of ours left by a killed run goes
        fsutil.check_replaceable(out, legacy_adapter)
        fsutil.new_staging_dir(out, name=tmp.name)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    for extra in ("training_args.bin",):
        (tmp / extra).unlink(missing_ok=True)
    family.copy_processor_files(loaded.base_path, tmp)
    fsutil.atomic_write_text(tmp / "base_model.json", json.dumps({"base_path": str(loaded.base_path)}, indent=2))
    fsutil.kill_point(ADAPTER_KILL, "adapter_written")
    fsutil.commit_dir(tmp, out, legacy=legacy_adapter, kill_env=ADAPTER_KILL)


def write_skipped(run_dir: Path, skipped: list[DataError]) -> None:
    """skipped.jsonl: one record per skipped sample, and a console summary."""
    path = run_dir / "skipped.jsonl"
    if not skipped:
        if path.exists():
            path.unlink()
        return
    fsutil.atomic_write_text(path, "".join(
        json.dumps({"file": e.file, "line": e.line, "kind": e.kind, "error": str(e)}) + "\n" for e in skipped))
    print(f"skipped {len(skipped)} bad sample(s) (data.on_error: skip); list in {path}")


