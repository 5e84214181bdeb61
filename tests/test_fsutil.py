"""finetune.fsutil: the one atomic writer, folder swap, ownership record and lock."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT


def tree(folder: Path) -> dict[str, bytes | None]:
    return {p.relative_to(folder).as_posix(): None if p.is_dir() else p.read_bytes()
            for p in sorted(Path(folder).rglob("*"))}


def py(code: str, *args, env=None, umask=None) -> subprocess.CompletedProcess:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})), capture_output=True, text=True,
                          timeout=120, preexec_fn=pre)


def test_an_atomic_write_is_whole_or_not_there(tmp_path):
    from finetune import fsutil

    path = tmp_path / "eval.json"
    fsutil.atomic_write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with fsutil.atomic_open(path) as f:
            f.write('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    fsutil.atomic_write_text(path, "two\r\n")
    assert path.read_bytes() == b"two\r\n"


def test_a_temporary_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    res = py("""
        import sys
        from finetune import fsutil
        with fsutil.atomic_open(sys.argv[1]) as f:
            f.write("half")
            f.flush()
            fsutil.kill_point("KILL", "now")
        """, tmp_path / "metrics.jsonl", env={"KILL": "now"})
    assert res.returncode == -signal.SIGKILL, res.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".metrics.jsonl.tmp-")
    from finetune import fsutil

    fsutil.atomic_write_text(tmp_path / "metrics.jsonl", "whole\n")
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                         (0o002, 0o664, 0o775)])
def test_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    res = py("""
        import sys
        from pathlib import Path
        from finetune import fsutil
        root = Path(sys.argv[1])
        root.mkdir()
        fsutil.mark(root, "run folder")
        fsutil.atomic_write_text(root / "eval.json", "{}")
        with fsutil.atomic_path(root / "clip.wav") as tmp:
            tmp.write_bytes(b"RIFF")
        with fsutil.staged_dir(root / "adapter") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "w.bin").write_bytes(b"x")
        fsutil.lock(root / ".lock").close()
        """, tmp_path / "run", umask=umask)
    assert res.returncode == 0, res.stderr
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    want = {p: dir_mode if (tmp_path / p).is_dir() else file_mode for p in modes}
    assert modes == want and "run/adapter/sub/w.bin" in modes


def _filled(folder: Path, tag: str) -> None:
    (folder / "weights.bin").write_bytes(tag.encode() * 10)
    (folder / "sub").mkdir()
    (folder / "sub" / "config.json").write_text(tag)


SWAP = """
    import sys
    from pathlib import Path
    from finetune import fsutil
    root = Path(sys.argv[1])
    with fsutil.staged_dir(root / "merged", kill_env="KILL") as tmp:
        (tmp / "weights.bin").write_bytes(b"new" * 10)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "config.json").write_text("new")
        fsutil.kill_point("KILL", "written")
    """


@pytest.mark.slow
@pytest.mark.parametrize("point, after", [("written", "old"), ("swapping", "old"), (None, "new")])
def test_kill_9_at_each_point_of_a_swap_leaves_a_recoverable_folder(tmp_path, point, after):
    from finetune import fsutil

    root = tmp_path / "run"
    root.mkdir()
    fsutil.mark(root, "run folder")
    with fsutil.staged_dir(root / "merged") as tmp:
        _filled(tmp, "old")
    old = tree(root / "merged")
    res = py(SWAP, root, env={"KILL": point} if point else None)
    assert res.returncode == (-signal.SIGKILL if point else 0), res.stderr
    if point == "swapping":
        assert not (root / "merged").exists() and (root / "merged.old").is_dir()
    fsutil.recover_dir(root / "merged")
    expect = old if after == "old" else {k: (v.replace(b"old", b"new") if v else v) for k, v in old.items()}
    assert tree(root / "merged") == expect
    assert sorted(p.name for p in root.iterdir()) == [fsutil.MARKER, "merged"]
    # the record names what is there now, and nothing else
    assert fsutil.owned_paths(root) == {"merged/weights.bin", "merged/sub/config.json"}


def test_what_the_toolkit_did_not_make_is_never_replaced_or_removed(tmp_path):
    from finetune import fsutil

    # a folder without our record: its merged/ is not ours, nor are names that look like our temporaries
    user = tmp_path / "user"
    for name in ("merged/precious.txt", "merged.tmp-notes/keep.txt", "merged.old/keep.txt"):
        (user / name).parent.mkdir(parents=True)
        (user / name).write_text("mine")
    before = tree(user)
    with pytest.raises(fsutil.NotOursError, match=rf"{user / 'merged'} was not made by omni-finetune"):
        with fsutil.staged_dir(user / "merged") as tmp:
            _filled(tmp, "new")
    fsutil.recover_dir(user / "merged")
    assert tree(user) == before

    # our folder, with a file the user put into our export afterwards
    root = tmp_path / "run"
    root.mkdir()
    fsutil.mark(root, "run folder")
    with fsutil.staged_dir(root / "merged") as tmp:
        _filled(tmp, "old")
    (root / "merged" / "sub" / "notes.txt").write_text("mine")
    (root / "merged.tmp-mine").mkdir()  # a name like ours that we did not record
    before = tree(root)
    with pytest.raises(fsutil.NotOursError, match=r"holds files omni-finetune did not write \(sub/notes.txt\)"):
        with fsutil.staged_dir(root / "merged") as tmp:
            _filled(tmp, "new")
    assert tree(root) == before
    # a staging name of ours taken by a folder we did not make: refused, and never recorded as ours
    (root / "adapter.tmp-gather").mkdir()
    (root / "adapter.tmp-gather" / "keep.txt").write_text("mine")
    with pytest.raises(fsutil.NotOursError, match="adapter.tmp-gather is in the way"):
        fsutil.new_staging_dir(root / "adapter", name="adapter.tmp-gather")
    fsutil.recover_dir(root / "adapter")
    assert (root / "adapter.tmp-gather" / "keep.txt").read_text() == "mine"
    # a legacy test recognises a folder made before the record existed, but never one we recorded
    assert fsutil.check_replaceable(user / "merged", legacy=lambda p: True) is None
    with pytest.raises(fsutil.NotOursError):
        fsutil.check_replaceable(root / "merged", legacy=lambda p: True)


def test_the_lock_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    from finetune import fsutil

    path = tmp_path / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from finetune import fsutil; f = fsutil.lock(sys.argv[2], note='pid 1 (job)');"
                               "print('locked', flush=True); time.sleep(60)", str(ROOT), str(path)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(fsutil.LockHeld, match=r"held by pid 1 \(job\)") as e:
            fsutil.lock(path, wait=False)
        assert e.value.holder == "pid 1 (job)"
    finally:
        holder.kill()
        holder.wait()
    f = fsutil.lock(path, wait=False, note="me")
    assert path.read_text() == "me\n"
    f.close()
