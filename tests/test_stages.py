"""Staged recipes: stages in order, each from the weights the one before produced; resume inside
a stage; a finished stage is not run again; a projector-only (full, no LoRA) stage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from run_files import losses

pytestmark = pytest.mark.slow

STAGED = """extends: medical-tiny
stages:
  - name: align
    roles:
      vision_projector: {mode: full, lr: 5.0e-3}
    train: {max_steps: 4}
  - name: sft
"""


def staged_file(tmp_path: Path) -> Path:
    p = tmp_path / "staged.yaml"
    p.write_text(STAGED)
    return p


def test_stage_settings_and_their_errors(tmp_path):
    from finetune.recipe import RecipeError, load_recipe, load_resolved, save_resolved

    r = load_recipe(staged_file(tmp_path))
    (n1, _, align), (n2, _, sft) = r.stages
    assert (n1, n2) == ("align", "sft")
    # a stage's roles are the ones it names (the others frozen); data and train merge over the recipe's
    assert [k for k, c in align.roles.items() if c.mode != "frozen"] == ["vision_projector"]
    assert align.roles.vision_projector.lr == 5e-3 and align.train.max_steps == 4
    assert align.train.lr == r.train.lr and align.data == r.data
    assert sft.roles == r.roles and sft.train == r.train  # no roles / train given: the recipe's
    save_resolved(r, tmp_path / "resolved.yaml")  # the resolved recipe records every stage
    assert [s[:2] for s in load_resolved(tmp_path / "resolved.yaml").stages] == [s[:2] for s in r.stages]

    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: medical-tiny\nstages:\n  - {name: a, model: {path: x}, roles: {llm: {mode: bogus}}}\n"
                   "  - {name: a}\n  - {roles: {}}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    text = str(e.value)
    assert "stages[0].model: a stage sets only name, roles, data, train" in text
    assert "stages[0].roles.llm.mode: invalid value 'bogus'" in text
    assert "stages[1].name: two stages are named 'a'" in text
    assert "stages[2].name: needs a name" in text
    (tmp_path / "frozen.yaml").write_text("extends: medical-tiny\nstages:\n  - {name: a, roles: {}}\n")
    with pytest.raises(RecipeError, match=r"stages\[0\]\.roles: every role is frozen"):
        load_recipe(tmp_path / "frozen.yaml")


def test_two_stages_kill_9_in_stage_2_resumes_it_and_stage_2_starts_from_stage_1(tmp_path, small_demo):
    """Projector-only alignment (full, no LoRA), then LoRA. Killed (SIGKILL) at step 5 of stage 2
    and run again: stage 1 is not run again, stage 2 resumes from its checkpoint with the losses
    of a run never interrupted; stage 2's model is stage 1's merged export, whose projector is
    the one stage 1 trained; once a stage's settings change it is not reused; the run exports."""
    import torch
    from safetensors.torch import load_file

    from finetune.cli import run_stages  # the CLI runs a staged recipe's stages
    from finetune.export import export_run
    from finetune.recipe import load_recipe

    recipe = staged_file(tmp_path)
    ref = run_stages(load_recipe(recipe, tiny_overrides(tmp_path / "a", small_demo)))
    align_dir = ref / "stages" / "01-align"
    assert sorted(losses(align_dir)) == [1, 2, 3, 4] and sorted(losses(ref)) == [1, 2, 3, 4, 5, 6]

    # stage 1 trained the projector only: its merged export differs from the base there and only there
    base, merged = {}, {}
    for f in _tiny_weights():
        base.update(load_file(f))
    for f in sorted((align_dir / "merged").glob("*.safetensors")):
        merged.update(load_file(f))
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed and all(".merger." in k for k in changed), changed[:5]
    # stage 2 loaded that folder as its model
    stage2 = json.loads((ref / "adapter" / "base_model.json").read_text())["base_path"]
    assert Path(stage2).resolve() == (align_dir / "merged").resolve()

    env = dict(os.environ, PYTHONPATH=str(ROOT), FINETUNE_KILL_AFTER_STEP="5")
    args = [sys.executable, "-m", "finetune", "train", str(recipe), *tiny_overrides(tmp_path / "b", small_demo)]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    run = tmp_path / "b" / "run"
    assert (run / "stages" / "01-align" / "merged" / "export_manifest.json").exists()
    assert (run / "checkpoints" / "checkpoint-3").is_dir() and not (run / "adapter").exists()
    env.pop("FINETUNE_KILL_AFTER_STEP")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 1/2 'align': done before" in res.stdout
    assert "resuming from" in res.stdout and "checkpoint-3" in res.stdout
    got, want = losses(run), losses(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5, 6]
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step
    assert losses(run / "stages" / "01-align") == pytest.approx(losses(align_dir), abs=1e-6)

    # a finished stage whose settings changed since is not reused for the next stage
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match="was trained with other settings"):
        run_stages(load_recipe(recipe, tiny_overrides(tmp_path / "b", small_demo, "train.lr=1e-3")))

    out = export_run(run, force=True)
    manifest = json.loads((out["merged"] / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"]
    assert manifest["stages"] == {"original_base": "tiny:qwen2_5_omni", "stages": ["align", "sft"]}


def _tiny_weights() -> list[Path]:
    from finetune.families import get_family

    return sorted(get_family("qwen2_5_omni").materialize_tiny(0).glob("*.safetensors"))


METHOD_STAGE = """extends: medical-tiny
stages:
  - name: sft
    roles: {{llm: {{mode: lora, r: 8, alpha: 16, dropout: 0.0}}}}
    train: {{max_steps: 2}}
  - name: {method}
    roles: {{llm: {{mode: lora, r: 8, alpha: 16, dropout: 0.0}}}}
    data: {{{data}allow_outside_paths: true, max_tokens: 512}}
    train: {{method: {method}, max_steps: 5, save_steps: 2, warmup_ratio: 0, {train}}}
"""


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_a_dpo_or_grpo_stage_killed_resumes_with_the_same_losses(tmp_path, small_demo, method):
    """SFT, then DPO (or GRPO), killed with SIGKILL after step 3 of the second stage and run
    again: the SFT stage is not run again, the DPO (GRPO) stage resumes from its step-2 checkpoint
    and logs the losses and figures (DPO's rewards; GRPO's rewards, KL and answer lengths, its
    rollouts drawn from per-sample seeds) of a run never interrupted."""
    from conftest import demo_pairs

    from finetune.cli import run_stages
    from finetune.recipe import load_recipe

    if method == "dpo":
        data = f"train: {demo_pairs(small_demo, tmp_path)}, eval: {demo_pairs(small_demo, tmp_path, 'eval')}, "
        train, keys = "dpo_beta: 0.5", ["rewards/chosen", "rewards/margins", "rewards/accuracies"]
    else:
        data = ""
        train = "grpo_group: 8, grpo_max_new_tokens: 4, grpo_temperature: 1.5, grpo_format_reward: 0.5, seed: 1"
        keys = ["reward", "reward_group_std", "kl", "completion_length", "advantage_abs"]
    recipe = tmp_path / "staged.yaml"
    recipe.write_text(METHOD_STAGE.format(method=method, data=data, train=train))
    ref = run_stages(load_recipe(recipe, tiny_overrides(tmp_path / "a", small_demo)))

    env = dict(os.environ, PYTHONPATH=str(ROOT), FINETUNE_KILL_AFTER_STEP="3")
    args = [sys.executable, "-m", "finetune", "train", str(recipe), *tiny_overrides(tmp_path / "b", small_demo)]
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    run = tmp_path / "b" / "run"
    assert (run / "stages" / "01-sft" / "merged" / "export_manifest.json").exists()
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (run / "adapter").exists()
    env.pop("FINETUNE_KILL_AFTER_STEP")
    res = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 1/2 'sft': done before" in res.stdout
    assert "resuming from" in res.stdout and "checkpoint-2" in res.stdout

    def steps(folder):
        return {r["step"]: r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
                if "loss" in r}

    got, want = steps(run), steps(ref)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    for step in want:
        for k in ["loss", *keys]:
            assert got[step][k] == pytest.approx(want[step][k], abs=1e-6), (step, k)
    assert any(want[s][keys[1]] != 0 for s in want)  # it trained on something: margins, or a reward spread
