"""The command line does what users type: options and overrides in any order, `eval` and `export`
on a run folder or a recipe with every override applied (and a change to what was trained
refused), `data.on_error: skip` wherever the data is read again, the modalities a family cannot
take named at their line, the system prompt in use and the LLM's learning rate on the console."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, tiny_overrides

pytestmark = pytest.mark.slow


def cli(*args, timeout=900):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=timeout)
    return res


# ---- parsing: options and overrides in any order ---------------------------------------------
COMMANDS = {  # command line -> (the function that runs it, what it must have received)
    ("train", "R", "train.lr=1e-4", "data.max_tokens=64"): ("cmd_train", {"recipe": "R", "overrides": ["train.lr=1e-4", "data.max_tokens=64"]}),
    ("eval", "RUN", "eval.max_samples=3", "data.eval=x.jsonl"): ("cmd_eval", {"recipe": "RUN", "overrides": ["eval.max_samples=3", "data.eval=x.jsonl"]}),
    ("export", "RUN", "export.quantize=8bit", "--force", "export.dtype=bfloat16", "--format", "both",
     "export.format=both"): ("cmd_export", {"target": "RUN", "force": True, "format": "both",
                                            "overrides": ["export.quantize=8bit", "export.dtype=bfloat16", "export.format=both"]}),
    ("export", "--force", "RUN", "export.dtype=bfloat16"): ("cmd_export", {"target": "RUN", "force": True,
                                                                         "overrides": ["export.dtype=bfloat16"]}),
    ("plan", "R", "--gpu", "80GB", "model.path=config:x", "--gpus", "2", "train.lr=1"): (
        "cmd_plan", {"recipe": "R", "gpu": "80GB", "gpus": 2, "overrides": ["model.path=config:x", "train.lr=1"]}),
    ("verify", "packing", "R", "--samples", "4", "data.max_tokens=64", "--device", "cpu"): (
        "cmd_verify", {"recipe": "R", "samples": 4, "device": "cpu", "overrides": ["data.max_tokens=64"]}),
    ("data", "check", "a.jsonl", "--no-media", "b.jsonl", "--recipe", "R", "data.max_tokens=64"): (
        "cmd_data_check", {"recipe": "R", "no_media": True, "files": ["a.jsonl", "b.jsonl", "data.max_tokens=64"]}),
    ("demo", "medical", "--force", "out", "--n-train", "3"): ("cmd_demo", {"out": "out", "force": True, "n_train": 3}),
    ("run", "R", "train.max_steps=2"): ("cmd_run", {"recipe": "R", "overrides": ["train.max_steps=2"]}),
}


@pytest.mark.parametrize("argv", list(COMMANDS), ids=[" ".join(a) for a in COMMANDS])
def test_options_and_overrides_go_in_any_order(argv, monkeypatch):
    from finetune import cli

    name, want = COMMANDS[argv]
    got = {}
    monkeypatch.setattr(cli, name, lambda args: got.update(vars(args)) or 0)
    assert cli.main(list(argv)) == 0
    assert {k: got.get(k) for k in want} == want


def test_an_unknown_option_is_still_refused(monkeypatch, capsys):
    from finetune import cli

    monkeypatch.setattr(cli, "cmd_plan", lambda args: 0)
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "R", "model.path=x", "--gpuz", "24GB"])
    assert e.value.code == 2 and "--gpuz" in capsys.readouterr().err


def test_plan_takes_the_model_path_its_own_error_asks_for_after_its_options(capsys):
    from finetune import cli

    assert cli.main(["plan", "medical", "--gpu", "24GB", "model.path=config:qwen2_5_omni_7b", "--gpus", "1"]) == 0
    assert "24" in capsys.readouterr().out


# ---- a trained tiny run: console, system prompt, eval and export on it ------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_demo):
    """`train medical-tiny` on the user's own data (the small demo without its system turns): 4 steps,
    warmup over the first 2, a constant rate after."""
    tmp = tmp_path_factory.mktemp("overrides")
    own = Path(small_demo["train"]).with_name("train_without_system.jsonl")
    rows = [json.loads(ln) for ln in Path(small_demo["train"]).read_text().splitlines()]
    own.write_text("".join(json.dumps({**r, "messages": [m for m in r["messages"] if m["role"] != "system"]}) + "\n"
                           for r in rows))
    overrides = tiny_overrides(tmp, small_demo, f"data.train={own}", "train.max_steps=4",
                               "train.scheduler=constant_with_warmup", "train.warmup_ratio=0.5", "train.print_every=1")
    res = cli("train", "medical-tiny", *overrides)
    assert res.returncode == 0, res.stderr[-3000:]
    return {"run": tmp / "run", "overrides": overrides, "out": res.stdout, "tmp": tmp}


def test_the_console_shows_the_llms_learning_rate(trained):
    # medical-tiny: the LLM's LoRA at train.lr 2e-3, the vision encoder (the first optimizer group,
    # whose rate transformers logs) at 1e-3; warmup over 2 steps from 0, then constant
    steps = {int(ln.split()[1].split("/")[0]): ln for ln in trained["out"].splitlines() if ln.startswith("step ")}
    assert sorted(steps) == [1, 2, 3, 4]
    assert "lr 2.00e-03" in steps[3] and "lr 2.00e-03" in steps[4], steps
    assert "lr 1.00e-03" in steps[2] and "warmup 2/2" in steps[2], steps[2]
    # step 1 of transformers' warmup really runs at 0: said so, not shown as a bare 0
    assert "lr 0 (warmup 1/2" in steps[1], steps[1]


def test_the_start_of_a_run_prints_the_system_prompt_and_where_it_came_from(trained):
    out = trained["out"]
    line = next((ln for ln in out.splitlines() if ln.startswith("system prompt:")), None)
    assert line is not None, out[-3000:]
    assert '"You are a radiology assistant."' in line and "medical.yaml" in line, line
    # the user's samples have no system turn of their own: the recipe's prompt is rendered on each
    assert "0 of 24 training samples have their own" in line, line
    # the prompt was written for the recipe's own data, data.train is the user's: said, with the fix
    assert "data.train is an override" in out and "data.system_prompt=" in out


def eval_file(small_demo, n: int) -> Path:
    lines = Path(small_demo["eval"]).read_text().splitlines()[:n]
    out = Path(small_demo["eval"]).with_name(f"eval_first_{n}.jsonl")
    out.write_text("\n".join(lines) + "\n")
    return out


def test_eval_takes_a_run_folder_with_every_override(trained, small_demo):
    run = trained["run"]
    five = eval_file(small_demo, 5)
    res = cli("eval", run, f"data.eval={five}", "eval.max_samples=3", "eval.compare_base=false", "eval.report=false")
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((run / "eval.json").read_text())
    assert ev["eval_file"] == str(five) and ev["n_samples"] == 3 and "base" not in ev
    # the run's own recipe.yaml names the same run
    res = cli("eval", run / "recipe.yaml", "eval.max_samples=2", "eval.compare_base=false", "eval.report=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["n_samples"] == 2
    # the recipe with the training command's overrides finds the run and takes the new ones too
    res = cli("eval", "medical-tiny", *trained["overrides"], "eval.max_samples=1", "eval.compare_base=false",
              "eval.report=false")
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "eval.json").read_text())["n_samples"] == 1
    assert "was trained with" not in res.stdout  # nothing the run was trained with differed: no note


def test_eval_and_export_refuse_a_change_to_what_was_trained(trained):
    for cmd in (("eval", trained["run"], "train.lr=0.5", "roles.llm.r=4"),
                ("export", trained["run"], "roles.llm.r=4", "--force", "train.lr=0.5")):
        res = cli(*cmd)
        assert res.returncode == 2, res.stderr[-3000:]
        err = res.stderr.strip().splitlines()
        assert err[0].startswith("error: ") and "Traceback" not in res.stderr
        assert "train.lr" in res.stderr and "roles.llm.r" in res.stderr and "0.002" in res.stderr, res.stderr


def test_export_applies_overrides_given_with_options_after_them(trained):
    run = trained["run"]
    res = cli("export", run, "--force", "export.dtype=bfloat16", "export.format=both")
    assert res.returncode == 0, res.stderr[-3000:]
    manifest = json.loads((run / "merged" / "export_manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and manifest["verify"]["passed"]
    assert (run / "adapter_export" / "adapter_config.json").exists()
    # the export records the settings it was made with
    assert "dtype: bfloat16" in (run / "merged" / "recipe.yaml").read_text()
    # a recipe target, the option between the overrides: the quantised export is written too
    res = cli("export", "medical-tiny", *trained["overrides"], "--force", "export.quantize=4bit")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "merged-4bit" / "export_manifest.json").exists()
    assert json.loads((run / "merged" / "export_manifest.json").read_text())["dtype"] == "float32"


# ---- Gemma 3n takes no video: named at its line, left out under data.on_error: skip --------------
def with_video(small_demo) -> Path:
    """The small demo's eval split with a video sample added (a folder of frames beside it)."""
    folder = Path(small_demo["eval"]).parent
    frames = folder / "clip"
    frames.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(frames / f"{i:03d}.png")
    video = {"id": "video-0", "messages": [
        {"role": "user", "content": [{"type": "video", "path": "clip"}, {"type": "text", "text": "Is there a lesion?"}]},
        {"role": "assistant", "content": "No."}], "answer": "no", "task": "lesion"}
    lines = Path(small_demo["eval"]).read_text().splitlines()[:5]
    out = folder / "eval_with_video.jsonl"
    out.write_text("\n".join([lines[0], json.dumps(video), *lines[1:]]) + "\n")
    return out


def test_data_check_names_a_modality_the_family_cannot_take_at_its_line(small_demo):
    data = with_video(small_demo)
    args = ["data", "check", "--recipe", "medical-gemma3n-tiny", f"data.train={small_demo['train']}",
            f"data.eval={data}", "data.demo="]
    res = cli(*args)
    assert res.returncode == 1, res.stdout[-3000:] + res.stderr[-3000:]
    line = next((ln for ln in res.stdout.splitlines() if f"{data}:2" in ln), "")
    assert "messages[0].content[0]" in line and "takes image and audio, not video" in line, res.stdout[-3000:]
    assert "Fix: remove the video part" in line and "data.on_error: skip" in line, line
    # under data.on_error: skip the run leaves it out: the check says so and passes
    res = cli(*args, "data.on_error=skip")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "data.on_error: skip: the run leaves out the 1 sample(s) above" in res.stdout


def test_verify_packing_leaves_out_what_the_family_cannot_take_under_skip(small_demo):
    data = with_video(small_demo)
    res = cli("verify", "packing", "medical-gemma3n-tiny", f"data.train={data}", "data.demo=", "--samples", "4",
              "data.on_error=skip", "--device", "cpu")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "PASS" in res.stdout


def test_a_gemma3n_run_with_a_video_sample_under_skip_trains_evaluates_and_exports(tmp_path, small_demo):
    data = with_video(small_demo)
    res = cli("run", "medical-gemma3n-tiny", *tiny_overrides(tmp_path, small_demo, f"data.eval={data}",
                                                              "data.on_error=skip", "train.max_steps=2"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = tmp_path / "run"
    assert json.loads((run / "eval.json").read_text())["skipped"] == 1
    manifest = json.loads((run / "merged" / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"]
    assert all("video" not in p["modalities"] for p in manifest["verify"]["probes"])
    # export alone, on the run folder, as a user would run it again
    res = cli("export", run, "--force")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
