"""Nothing the user made is deleted or overwritten: demo data, output folders, exports, adapters;
every writer of a run folder takes its lock; files follow the umask (issue 25, parts 1 and 3).

Each test runs the real CLI (`python -m finetune ...`) on the tiny model, as a user would, and
compares every byte of the user's folder before and after.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

SMALL = ["model.max_pixels=12544", "data.max_tokens=256", "train.max_steps=2", "train.save_steps=2",
         "train.logging_steps=1", "eval.max_samples=4", "eval.max_new_tokens=4"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file under `folder` with its bytes (folders as None): what must survive untouched."""
    out: dict[str, bytes | None] = {}
    for p in sorted(Path(folder).rglob("*")):
        out[p.relative_to(folder).as_posix()] = None if p.is_dir() else p.read_bytes()
    return out


def cli(*args, cwd=ROOT, env=None, timeout=900, umask=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=pre)


@pytest.fixture
def user_data(small_demo, tmp_path) -> Path:
    """A user's own dataset folder: their images and audio, a README, JSONL files named their way."""
    src = small_demo["train"].parent
    mine = tmp_path / "mydata"
    mine.mkdir()
    shutil.copytree(src / "images", mine / "images")
    shutil.copytree(src / "audio", mine / "audio")
    shutil.copyfile(small_demo["train"], mine / "mytrain.jsonl")
    shutil.copyfile(small_demo["eval"], mine / "myeval.jsonl")
    (mine / "README.md").write_text("# my scans\nnotes I keep\n")
    (mine / "manifest.json").write_text('{"mine": true}\n')
    return mine


# ---- data.demo never writes into the user's data ---------------------------------------------
def test_demo_generation_is_decided_by_the_demo_recipes_own_path_only(tmp_path, monkeypatch):
    """data.demo lives in the *-tiny demo recipes; it generates only for the demo's own path."""
    from finetune.recipe import load_recipe
    from finetune.data.reading import demo_folder

    assert load_recipe("medical").data.demo == ""  # the real-model recipes (and what extends them) ask for no demo
    assert load_recipe("medical-qlora").data.demo == ""
    tiny = load_recipe("medical-tiny")
    assert tiny.data.demo == "medical" and demo_folder(tiny) == Path("data/demo/medical")
    assert demo_folder(load_recipe("medical-tiny-staged")) == Path("data/demo/medical")
    mine = tmp_path / "mydata"
    for over in ([f"data.train={mine / 'train.jsonl'}"],  # a file named like the demo's, in another folder
                 [f"data.train={mine / 'mytrain.jsonl'}", f"data.eval={mine / 'myeval.jsonl'}"],
                 ["data.eval=/elsewhere/eval.jsonl"],
                 ["data.train=[{hub: acme/x}]"],
                 ["data.train=[{path: data/demo/medical/train.jsonl, weight: 1}, {path: other.jsonl, weight: 1}]"]):
        assert demo_folder(load_recipe("medical-tiny", over)) is None, over


@pytest.mark.parametrize("recipe", ["medical-tiny", "extends-medical"])
def test_data_check_with_a_demo_derived_recipe_leaves_the_users_folder_alone(recipe, user_data, tmp_path):
    if recipe == "extends-medical":  # a user's recipe built on the shipped one, as the README suggests
        recipe = tmp_path / "mine.yaml"
        recipe.write_text("extends: medical\nmodel: {path: 'tiny:qwen2_5_omni', min_pixels: 3136}\n")
    before = tree(user_data)
    res = cli("data", "check", "--recipe", recipe, f"data.train={user_data / 'mytrain.jsonl'}",
              f"data.eval={user_data / 'myeval.jsonl'}", "model.max_pixels=12544")
    assert tree(user_data) == before
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_run_with_a_recipe_extending_medical_tiny_leaves_the_users_folder_alone(user_data, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(textwrap.dedent(f"""\
        extends: medical-tiny
        data:
          train: {user_data / 'mytrain.jsonl'}
          eval: {user_data / 'myeval.jsonl'}
        output:
          dir: {tmp_path / 'run'}
        """))
    before = tree(user_data)
    res = cli("run", recipe, *SMALL)
    assert tree(user_data) == before
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_hub_source_run_from_a_project_folder_leaves_the_folder_alone(tmp_path):
    """A hub source has no path: the demo used to be written into '.', the user's project."""
    project = tmp_path / "project"
    (project / "images").mkdir(parents=True)
    (project / "images" / "scan.png").write_bytes(b"\x89PNG not really")
    (project / "README.md").write_text("# my project\n")
    (project / "manifest.json").write_text("{}\n")
    recipe = tmp_path / "hub.yaml"
    recipe.write_text("extends: medical-tiny\ndata:\n  train: [{hub: acme/nothing-here}]\n  eval: ''\n")
    before = tree(project)
    hf = tmp_path / "hf"
    (hf / "hub").mkdir(parents=True)
    res = cli("run", recipe, f"output.dir={tmp_path / 'run'}", *SMALL, cwd=project,
              env={"HF_HOME": str(hf), "HF_HUB_CACHE": str(hf / "hub"), "HF_HUB_OFFLINE": "1",
                   "OMNI_FINETUNE_CACHE": os.environ["OMNI_FINETUNE_CACHE"]})
    assert tree(project) == before
    assert res.returncode == 2 and "acme/nothing-here" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_demo_cli_refuses_a_folder_that_is_not_a_demo_folder(tmp_path):
    folder = tmp_path / "notes"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "mine.png").write_bytes(b"mine")
    (folder / "README.md").write_text("mine\n")
    before = tree(folder)
    for extra in ([], ["--force"]):
        res = cli("demo", "medical", folder, "--n-train", "4", "--n-eval", "2", *extra)
        assert res.returncode == 2 and str(folder) in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert tree(folder) == before
    # an empty folder, or one the generator made, is fine
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new"):
        res = cli("demo", "medical", target, "--n-train", "4", "--n-eval", "2")
        assert res.returncode == 0, res.stderr
    res = cli("demo", "medical", tmp_path / "new", "--n-train", "4", "--n-eval", "2", "--force")
    assert res.returncode == 0, res.stderr


# ---- output folders that are not run folders -------------------------------------------------
def test_an_output_folder_that_is_not_a_run_folder_is_refused(small_demo, tmp_path):
    out = tmp_path / "work"
    for name in ("merged/precious.txt", "adapter/precious.txt", "checkpoints/checkpoint-notes/notes.txt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("precious\n")
    (out / "metrics.jsonl").write_text('{"step": 1, "mine": true}\n')
    before = tree(out)
    data = [f"data.train={small_demo['train']}", f"data.eval={small_demo['eval']}", "data.demo=",
            f"output.dir={out}", *SMALL]
    for command in ("run", "train", "eval"):
        res = cli(command, "medical-tiny", *data)
        assert res.returncode == 2, (command, res.stderr[-3000:])
        assert f"{out} is not a run folder" in res.stderr and "Traceback" not in res.stderr, (command, res.stderr[-3000:])
        assert tree(out) == before, command


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, small_demo) -> Path:
    """A finished `run` (train, eval, export) made under umask 022."""
    out = tmp_path_factory.mktemp("safety") / "run"
    res = cli("run", "medical-tiny", f"data.train={small_demo['train']}", f"data.eval={small_demo['eval']}",
              "data.demo=", f"output.dir={out}", *SMALL, umask=0o022)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def copy_run(run_folder: Path, tmp_path: Path, demo: dict) -> tuple[Path, list[str]]:
    """A copy of the finished run, and the recipe arguments that write into it."""
    run = tmp_path / "run"
    shutil.copytree(run_folder, run, symlinks=True)
    return run, ["medical-tiny", f"data.train={demo['train']}", f"data.eval={demo['eval']}", "data.demo=",
                 f"output.dir={run}"]


def test_run_folder_files_and_folders_follow_the_umask(run_folder):
    wrong = []
    for p in [run_folder, *run_folder.rglob("*")]:
        if p.is_symlink():
            continue
        want = 0o755 if p.is_dir() else 0o644
        if stat.S_IMODE(p.stat().st_mode) != want:
            wrong.append(f"{p.relative_to(run_folder)} {oct(stat.S_IMODE(p.stat().st_mode))}")
    assert not wrong


def test_a_foreign_file_in_an_export_is_never_deleted(run_folder, tmp_path, small_demo):
    run, target = copy_run(run_folder, tmp_path, small_demo)
    (run / "merged" / "precious.txt").write_text("my notes on this model\n")
    before = tree(run / "merged")
    res = cli("export", run, "--force")
    assert res.returncode == 2 and "precious.txt" in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert tree(run / "merged") == before
    # `run` replaces exports it made: it stops before training when one holds a file it did not write
    res = cli("run", *target, *SMALL)
    assert res.returncode == 2 and "precious.txt" in res.stderr, res.stderr[-3000:]
    assert "resuming" not in res.stdout and tree(run / "merged") == before


def test_a_foreign_file_in_the_adapter_stops_training_before_step_one(run_folder, tmp_path, small_demo):
    run, target = copy_run(run_folder, tmp_path, small_demo)
    (run / "adapter" / "precious.txt").write_text("mine\n")
    before = tree(run / "adapter")
    res = cli("train", *target, *SMALL, "train.max_steps=3")
    assert res.returncode == 2 and "precious.txt" in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "resuming" not in res.stdout and tree(run / "adapter") == before


# ---- locks -------------------------------------------------------------------------------------
def hold_lock(run: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from finetune.runfolder import lock_run; lock_run(sys.argv[2]); print('locked', flush=True);"
                               "time.sleep(120)", str(ROOT), str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_eval_is_refused_while_another_process_writes_the_run_folder(run_folder, tmp_path, small_demo):
    run, target = copy_run(run_folder, tmp_path, small_demo)
    before = tree(run)
    holder = hold_lock(run)
    try:
        res = cli("eval", *target, *SMALL)
        assert res.returncode == 2 and f"pid {holder.pid}" in res.stderr and "Traceback" not in res.stderr, \
            res.stderr[-3000:]
    finally:
        holder.kill()
        holder.wait()
    after = tree(run)
    after.pop(".lock"), before.pop(".lock")  # the holder wrote its pid there
    assert after == before


def test_a_refused_staged_run_leaves_the_running_jobs_stages_yaml(small_demo, tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    try:
        (run / "stages.yaml").write_text("# the running job's stages\n")
        res = cli("train", "medical-tiny-staged", f"data.train={small_demo['train']}",
                  f"data.eval={small_demo['eval']}", "data.demo=", f"output.dir={run}", *SMALL, "train.max_steps=1")
        assert res.returncode == 2 and f"pid {holder.pid}" in res.stderr, res.stderr[-3000:]
        assert (run / "stages.yaml").read_text() == "# the running job's stages\n"
        assert not (run / "stages").exists()  # no stage trained either
    finally:
        holder.kill()
        holder.wait()


# ---- the adapter swap --------------------------------------------------------------------------
class _Interrupted(BaseException):
    pass


def test_an_adapter_save_interrupted_at_any_rename_leaves_an_adapter(tmp_path, monkeypatch):
    """save_adapter is cut at each rename in turn (a kill there): the run folder always keeps a
    whole adapter, the old or the new one, once recovered."""
    from types import SimpleNamespace

    from finetune import runfolder
    from finetune.export import recover

    class Model:  # writes what PEFT's save_pretrained writes
        def __init__(self, tag):
            self.tag = tag

        def save_pretrained(self, folder):
            Path(folder, "adapter_config.json").write_text(json.dumps({"tag": self.tag}))
            Path(folder, "adapter_model.safetensors").write_bytes(self.tag.encode() * 100)

    family = SimpleNamespace(copy_processor_files=lambda base, out: Path(out, "tokenizer.json").write_text("{}"))
    loaded = SimpleNamespace(base_path=tmp_path / "base")
    real = {"rename": os.rename, "replace": os.replace}
    for cut in range(1, 30):
        run = tmp_path / f"run{cut}"
        from finetune.runfolder import lock_run, unlock_run

        lock_run(run)
        runfolder.save_adapter(Model("old"), family, loaded, run / "adapter")
        calls = [0]

        def counting(kind):
            def f(*a, **k):
                calls[0] += 1
                if calls[0] == cut:
                    raise _Interrupted(f"cut at rename {cut}")
                return real[kind](*a, **k)
            return f

        monkeypatch.setattr(os, "rename", counting("rename"))
        monkeypatch.setattr(os, "replace", counting("replace"))
        try:
            runfolder.save_adapter(Model("new"), family, loaded, run / "adapter")
            finished = True
        except _Interrupted:
            finished = False
        finally:
            monkeypatch.setattr(os, "rename", real["rename"])
            monkeypatch.setattr(os, "replace", real["replace"])
        recover(run / "adapter")
        tag = json.loads((run / "adapter" / "adapter_config.json").read_text())["tag"]
        assert tag in ("old", "new"), cut
        assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == tag.encode() * 100, cut
        assert not [p.name for p in run.iterdir() if p.name.startswith("adapter") and p.name != "adapter"], cut
        unlock_run(run)
        if finished:  # every rename of a save was cut once
            assert tag == "new" and cut > 2
            break
    else:
        pytest.fail("save_adapter never finished")


def test_kill_9_in_the_adapter_swap_is_recovered_by_the_next_command(run_folder, tmp_path, small_demo):
    run, target = copy_run(run_folder, tmp_path, small_demo)
    adapter = tree(run / "adapter")
    # killed with the new adapter written, before the swap: the old one stays
    res = cli("train", *target, *SMALL, env={"FINETUNE_ADAPTER_KILL": "adapter_written"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert tree(run / "adapter") == adapter and list(run.glob("adapter.tmp-*"))
    # killed between moving the old one aside and moving the new one in
    res = cli("train", *target, *SMALL, env={"FINETUNE_ADAPTER_KILL": "swapping"})
    assert res.returncode == -signal.SIGKILL, res.stderr[-3000:]
    assert not (run / "adapter").exists() and (run / "adapter.old").is_dir()
    # the next command on the folder puts it right (eval reads the adapter)
    res = cli("eval", *target, *SMALL)
    assert res.returncode == 0, res.stderr[-3000:]
    assert tree(run / "adapter") == adapter
    assert not [p.name for p in run.iterdir() if p.name.startswith("adapter.")]


# ---- one writer, one lock ----------------------------------------------------------------------
def test_the_package_has_one_atomic_writer_and_one_lock():
    """Temporary names, renames and file locks live in finetune/fsutil.py only: a hand-rolled
    write elsewhere is how the half-written files of issue 25 came about."""
    import re

    pattern = re.compile(r"\bos\.(replace|rename)\(|\bshutil\.move\(|\bflock\(|\bmkstemp\(|\bNamedTemporaryFile\(|"
                         r"\bmkdtemp\(|\.tmp\b.*\.replace\(")
    # scratch folders inside a folder being staged by fsutil (removed when the family's save ends)
    scratch = re.compile(r'mkdtemp\(prefix="\.stage-", dir=out_dir\)')
    found = []
    for path in sorted((ROOT / "finetune").rglob("*.py")):
        if path.name == "fsutil.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not scratch.search(line):
                found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
