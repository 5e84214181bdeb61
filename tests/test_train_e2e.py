"""End-to-end on the tiny model: train, resume after an interruption, evaluate, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, tiny_recipe
from run_files import losses
from finetune.models import load_spec

pytestmark = pytest.mark.slow



def test_resume_after_interruption_gives_the_same_losses(tmp_path, small_demo, monkeypatch):
    from finetune.train import train

    ref = train(tiny_recipe(tmp_path / "a", small_demo))
    ref_losses = losses(ref)
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6]

    recipe = tiny_recipe(tmp_path / "b", small_demo)
    monkeypatch.setenv("FINETUNE_CRASH_AFTER_STEP", "5")
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    assert (recipe.run_dir / "checkpoints" / "checkpoint-3").is_dir()
    assert not (recipe.run_dir / "adapter").exists()
    monkeypatch.delenv("FINETUNE_CRASH_AFTER_STEP")
    resumed = train(recipe)  # train.resume: auto -> continues from checkpoint-3
    got = losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in ref_losses:
        assert got[step] == pytest.approx(ref_losses[step], abs=1e-6), step
    from safetensors.torch import load_file

    wa = load_file(ref / "adapter" / "adapter_model.safetensors")
    wb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


@pytest.mark.parametrize("packing", ["true", "false"])
def test_loss_is_the_mean_over_all_label_tokens_of_the_step(tmp_path, small_demo, packing):
    """With accumulation, the step loss equals sum(token losses) / label tokens of the whole step."""
    from finetune.train import train

    r1 = train(tiny_recipe(tmp_path / "x", small_demo, "train.batch_size=4", "train.grad_accum=1",
                           "train.max_steps=1", "train.lr=1e-9", f"data.packing={packing}"))
    r2 = train(tiny_recipe(tmp_path / "y", small_demo, "train.batch_size=2", "train.grad_accum=2",
                           "train.max_steps=1", "train.lr=1e-9", f"data.packing={packing}"))
    assert losses(r1)[1] == pytest.approx(losses(r2)[1], rel=1e-5)


def test_logged_token_count_is_the_packed_samples_tokens(tmp_path, small_demo, monkeypatch):
    """num_tokens in the log counts the samples' tokens (TRL alone counts 1 per [4, 1, L] row)."""
    from finetune.data.schema import load_samples
    from finetune.families import family_for
    from finetune.train import train

    monkeypatch.setenv("FINETUNE_RECORD_BATCHES", str(tmp_path / "rec"))
    recipe = tiny_recipe(tmp_path, small_demo, "train.batch_size=2", "train.max_steps=3")
    run = train(recipe)
    logged = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    counts = {r["step"]: r["num_tokens"] for r in logged if "num_tokens" in r}
    fam = family_for(recipe.model.path, recipe.model.family)
    processor = fam.load(load_spec(recipe)).processor
    samples, _ = load_samples(recipe.data.train)
    batches = [json.loads(ln) for ln in (tmp_path / "rec" / "batches-rank0.jsonl").read_text().splitlines()]
    expected, total = {}, 0
    for step, rows in enumerate(batches[:3], start=1):
        assert len(rows) == 2
        total += sum(fam.count_tokens(samples[i], processor) for b in rows for i in b)
        expected[step] = total
    assert counts == expected


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32-qlora"])
def test_16bit_training_keeps_fp32_master_weights(tmp_path, small_demo, precision):
    """fp16 (the fallback for GPUs without bf16) and bf16: a 16-bit base, fp32 trained weights, finite
    falling losses (with fp16 weights AdamW turned the tiny model's loss NaN at step 2). QLoRA too:
    TRL casts a quantised model's trainable weights to bf16; they stay fp32 here."""
    import math

    from safetensors.torch import load_file

    from finetune.train import train

    extra = ["train.precision=fp32", "model.quantize=4bit"] if precision == "fp32-qlora" else \
        [f"train.precision={precision}"]
    run = train(tiny_recipe(tmp_path, small_demo, *extra, "train.max_steps=6", "train.save_steps=100"))
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for v in got.values()), got
    assert got[6] < got[1] - 0.2, got
    saved = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {str(t.dtype) for t in saved.values()} == {"torch.float32"}  # LoRA and the full roles' copies


def test_skip_bad_samples_and_report_them(tmp_path, small_demo):
    from finetune.train import train

    bad = tmp_path / "train.jsonl"
    lines = small_demo["train"].read_text().splitlines()
    lines.insert(2, '{"messages": [{"role": "user", "content": "no answer"}]}')
    lines.insert(5, "{not json")
    # keep media paths valid: the copy lives in another folder, so make paths absolute
    fixed = []
    for ln in lines:
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError:
            fixed.append(ln)
            continue
        for m in obj["messages"]:
            if isinstance(m["content"], list):
                for p in m["content"]:
                    if "path" in p:
                        p["path"] = str(small_demo["train"].parent / p["path"])
        fixed.append(json.dumps(obj))
    bad.write_text("\n".join(fixed) + "\n")
    recipe = tiny_recipe(tmp_path, small_demo, f"data.train={bad}", "data.on_error=skip", "train.max_steps=1",
                         "data.allow_outside_paths=true")
    run = train(recipe)
    rec = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert sorted((r["line"], r["kind"]) for r in rec) == [(3, "no_assistant"), (6, "json")]

    from finetune.data.schema import DataError
    from finetune.train import train as train2

    with pytest.raises(DataError, match=r"train.jsonl:3"):
        train2(tiny_recipe(tmp_path / "raise", small_demo, f"data.train={bad}", "data.on_error=raise",
                           "data.allow_outside_paths=true"))


def test_cli_run_writes_the_whole_run_folder(tmp_path, small_demo):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "finetune", "run", "medical-tiny",
            f"data.train={small_demo['train']}", f"data.eval={small_demo['eval']}", "data.demo=",
            f"output.dir={tmp_path / 'run'}", "model.max_pixels=12544", "train.max_steps=2",
            "train.batch_size=4", "eval.max_samples=4", "eval.max_new_tokens=4"]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("recipe.yaml", "metrics.jsonl", "loss_curve.svg", "eval.json", "eval.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "merged/export_manifest.json"):
        assert (run / name).exists(), name
    assert any((run / "tensorboard").rglob("events.out.tfevents*"))
    resolved = (run / "recipe.yaml").read_text()
    assert "train.max_steps: override" in resolved and "recipe:medical-tiny.yaml" in resolved
    ev = json.loads((run / "eval.json").read_text())
    assert {"base", "tuned"} <= set(ev) and ev["n_samples"] == 4
    assert "trainable" in res.stdout and "merged" in res.stdout


def test_cli_reports_recipe_errors_without_traceback():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", "train", "medical-tiny", "train.lr=-1",
                          "roles.vision_projecter.mode=full"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert "train.lr" in res.stderr and "did you mean 'vision_projector'" in res.stderr


def test_a_run_folder_has_one_writer_at_a_time(tmp_path):
    """A second process is refused with the holder named; the lock dies with its process."""
    from finetune.runfolder import RunLocked, lock_run, unlock_run

    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from finetune.runfolder import lock_run; lock_run(sys.argv[2]); print('locked', flush=True);"
                               "time.sleep(60)", str(ROOT), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            lock_run(run)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        res = subprocess.run([sys.executable, "-m", "finetune", "train", "medical-tiny", f"output.dir={run}"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and "is in use by pid" in res.stderr and "Traceback" not in res.stderr
    finally:
        holder.kill()  # like kill -9: no cleanup runs, yet the kernel drops the lock
        holder.wait()
    lock_run(run)
    unlock_run(run)


def test_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path, small_demo):
    """SIGKILL after step 5 (checkpoint at 3), a half-written checkpoint beside it, resume: same
    per-step losses and adapter weights as a run never interrupted."""
    import signal

    from safetensors.torch import load_file

    from conftest import tiny_overrides
    from finetune.train import train

    ref = train(tiny_recipe(tmp_path / "a", small_demo))
    env = dict(os.environ, PYTHONPATH=str(ROOT), FINETUNE_KILL_AFTER_STEP="5")
    args = [sys.executable, "-m", "finetune", "train", "medical-tiny", *tiny_overrides(tmp_path / "b", small_demo)]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    run = tmp_path / "b" / "run"
    assert (run / "checkpoints" / "checkpoint-3" / "trainer_state.json").exists()
    assert not (run / "adapter").exists()
    # a save cut short by a crash or a full disk: files there, trainer_state.json truncated
    partial = run / "checkpoints" / "checkpoint-5"
    import shutil

    shutil.copytree(run / "checkpoints" / "checkpoint-3", partial)
    state = (partial / "trainer_state.json").read_text()
    (partial / "trainer_state.json").write_text(state[: len(state) // 2])

    env.pop("FINETUNE_KILL_AFTER_STEP")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout and "checkpoint-3" in res.stdout  # the last complete one
    assert "removing incomplete checkpoint" in res.stdout and not partial.exists()
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    wa = load_file(ref / "adapter" / "adapter_model.safetensors")
    wb = load_file(run / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-6


def test_auto_attention_gets_the_collators_boundaries_and_a_full_warmup_ratio(tmp_path, small_demo):
    """Under the default model.attn=auto the varlen backend takes the packed rows' boundaries from
    the collator (no layer rebuilds them: a device sync per layer on CUDA); train.warmup_ratio=1
    warms up over every step (transformers alone would read 1 as one step)."""
    from finetune import attention
    from finetune.train import train

    before_seg, before_rebuilt = attention.segment_calls, attention.boundary_recomputes
    run = train(tiny_recipe(tmp_path, small_demo, "model.attn=auto", "train.max_steps=4", "train.warmup_ratio=1",
                            "train.scheduler=linear"))
    assert attention.segment_calls > before_seg  # the varlen path ran ...
    assert attention.boundary_recomputes == before_rebuilt  # ... on the collator's cu_seq_lens
    lrs = [json.loads(x)["learning_rate"] for x in (run / "metrics.jsonl").read_text().splitlines()
           if "learning_rate" in json.loads(x)]
    assert len(lrs) == 4 and lrs == sorted(lrs) and lrs[0] < lrs[-1] < 2e-3, lrs  # rising over all 4 steps


@pytest.mark.parametrize("packing", ["true", "false"])
def test_kept_encodings_train_exactly_as_encoding_every_step(tmp_path, small_demo, packing):
    """data.cache_gb: the encodings made before step 1 and kept between epochs (and packed rows
    collated once) give the same losses as encoding every sample at every use."""
    from finetune.train import train

    got = {}
    for cache in ("0", "2"):
        run = train(tiny_recipe(tmp_path / cache, small_demo, f"data.cache_gb={cache}", f"data.packing={packing}",
                                "train.max_steps=8", "train.epochs=3", "data.max_tokens=256", "train.batch_size=1"))
        got[cache] = losses(run)
    assert got["0"] == got["2"] and len(got["0"]) == 8
