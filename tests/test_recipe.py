"""Tests for finetune.recipe: loading, extends, overrides, strict checking, provenance, round trip."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from finetune.families.base import ROLE_NAMES
from finetune.recipe import (
    CHOICES,
    Recipe,
    RecipeError,
    field_help,
    list_recipes,
    load_recipe,
    load_resolved,
    recipe_provenance,
    recipe_to_dict,
    role_names,
    save_resolved,
)

REPO_RECIPES = Path(__file__).parent.parent / "recipes"


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[RecipeError]) -> list[str]:
    return str(excinfo.value).splitlines()[1:]


# ---------------------------------------------------------------------------------------------
# defaults and names
# ---------------------------------------------------------------------------------------------


def test_defaults():
    r = Recipe()
    assert r.model.path == "tiny:qwen2_5_omni"
    assert r.model.max_pixels == 512 * 28 * 28 and r.model.min_pixels == 56 * 56
    assert r.roles.llm.mode == "lora"
    assert all(getattr(r.roles, n).mode == "frozen" for n in ROLE_NAMES if n != "llm")
    assert r.roles.llm.targets == "all-linear" and r.roles.llm.lr is None
    assert r.train.lr == 2e-4 and r.train.grad_accum == 8 and r.train.resume == "auto"
    assert r.data.system_prompt is None and r.data.max_tokens == 4096
    assert r.export.verify_atol == 1e-4 and r.export.format == "merged"
    assert role_names() == ROLE_NAMES == (
        "llm", "embeddings", "lm_head", "vision_encoder",
        "vision_projector", "audio_encoder", "audio_projector", "audio_head",
    )
    assert [name for name, _ in r.roles.items()] == list(ROLE_NAMES)
    assert CHOICES["model.quantize"] == ("none", "4bit", "8bit")
    assert all(field_help().values()), "every leaf needs a help string"


def test_empty_file_gives_defaults_and_name_from_stem(tmp_path):
    path = write(tmp_path, "my-run.yaml", "")
    r = load_recipe(path)
    assert r.name == "my-run"
    assert recipe_to_dict(r) == {**recipe_to_dict(Recipe()), "name": "my-run"}
    assert r.run_dir == Path("runs") / "my-run"
    r2 = load_recipe(path, ["output.dir=/tmp/elsewhere"])
    assert r2.run_dir == Path("/tmp/elsewhere")


def test_explicit_name_wins(tmp_path):
    path = write(tmp_path, "file-stem.yaml", "name: custom\n")
    assert load_recipe(path).name == "custom"


def test_bare_name_and_list(tmp_path):
    write(tmp_path, "alpha.yaml", "train: {lr: 1.0e-3}\n")
    write(tmp_path, "beta.yml", "")
    (tmp_path / "notes.txt").write_text("x")
    assert list_recipes(tmp_path) == ["alpha", "beta"]
    assert load_recipe("alpha", recipes_dir=tmp_path).train.lr == 1e-3
    assert load_recipe("beta", recipes_dir=tmp_path).name == "beta"
    with pytest.raises(RecipeError, match="did you mean 'alpha'"):
        load_recipe("alpah", recipes_dir=tmp_path)


def test_recipes_dir_defaults_to_cwd(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    write(tmp_path / "recipes", "here.yaml", "")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("here").name == "here"
    assert "here" in list_recipes()


# ---------------------------------------------------------------------------------------------
# extends
# ---------------------------------------------------------------------------------------------


def test_extends_chain_deep_merge(tmp_path):
    write(tmp_path, "base.yaml", """
        description: base recipe
        model: {dtype: bfloat16, quantize: 4bit}
        roles:
          llm: {r: 8, alpha: 16}
          vision_projector: {mode: lora}
        train: {lr: 1.0e-4, epochs: 2}
    """)
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "middle.yaml", """
        extends: ../base
        roles:
          llm: {r: 4}
    """)
    child = write(tmp_path, "child.yaml", """
        extends: sub/middle.yaml
        train: {epochs: 3}
        roles:
          vision_projector: {r: 32}
    """)
    r = load_recipe(child)
    assert r.name == "child"
    assert r.description == "base recipe"
    assert r.model.dtype == "bfloat16" and r.model.quantize == "4bit"
    assert r.roles.llm.r == 4 and r.roles.llm.alpha == 16 and r.roles.llm.mode == "lora"
    assert r.roles.vision_projector.mode == "lora" and r.roles.vision_projector.r == 32
    assert r.train.epochs == 3.0 and r.train.lr == 1e-4

    src = recipe_provenance(r)
    assert src["roles.llm.r"] == "recipe:middle.yaml"
    assert src["roles.llm.alpha"] == "recipe:base.yaml"
    assert src["train.epochs"] == "recipe:child.yaml"
    assert src["name"] == "recipe:child.yaml"


def test_parent_name_is_not_inherited(tmp_path):
    write(tmp_path, "parent.yaml", "name: parent-name\n")
    child = write(tmp_path, "kid.yaml", "extends: parent\n")
    assert load_recipe(child).name == "kid"


def test_empty_section_in_child_keeps_parent(tmp_path):
    write(tmp_path, "p.yaml", "data: {max_tokens: 512}\n")
    child = write(tmp_path, "c.yaml", "extends: p\ndata:\n")
    assert load_recipe(child).data.max_tokens == 512


def test_extends_cycle(tmp_path):
    write(tmp_path, "a.yaml", "extends: b\n")
    write(tmp_path, "b.yaml", "extends: c.yaml\n")
    write(tmp_path, "c.yaml", "extends: a\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> b.yaml -> c.yaml -> a.yaml" in str(exc.value)
    assert "cycle" in str(exc.value)


def test_extends_missing_parent(tmp_path):
    path = write(tmp_path, "orphan.yaml", "extends: nowhere\n")
    with pytest.raises(RecipeError, match="orphan.yaml: extends: parent recipe 'nowhere' not found"):
        load_recipe(path)


def test_invalid_yaml_and_duplicate_keys(tmp_path):
    bad = write(tmp_path, "bad.yaml", "train: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml: .*invalid YAML"):
        load_recipe(bad)
    dup = write(tmp_path, "dup.yaml", "train:\n  lr: 1.0\n  lr: 2.0\n")
    with pytest.raises(RecipeError, match="duplicate key 'lr'"):
        load_recipe(dup)


# ---------------------------------------------------------------------------------------------
# overrides and coercion
# ---------------------------------------------------------------------------------------------


def test_overrides_types(tmp_path):
    path = write(tmp_path, "o.yaml", "data: {system_prompt: be nice}\n")
    r = load_recipe(path, [
        "train.lr=1e-4",                 # YAML 1.1 reads this as a string
        "train.epochs=2",                # int into a float field
        "roles.llm.r=8",
        "data.packing=true",
        "roles.llm.targets=[q_proj, v_proj]",
        "data.system_prompt=null",
        "roles.vision_projector.mode=full",
        "roles.vision_projector.lr=5e-5",
        "model.path=/models/omni 7b",
        "description=Answer: briefly",   # YAML would see a mapping; a string field takes the text
    ])
    assert r.train.lr == pytest.approx(1e-4) and isinstance(r.train.lr, float)
    assert r.train.epochs == 2.0 and isinstance(r.train.epochs, float)
    assert r.roles.llm.r == 8
    assert r.data.packing is True
    assert r.roles.llm.targets == ["q_proj", "v_proj"]
    assert r.data.system_prompt is None
    assert r.roles.vision_projector.mode == "full"
    assert r.roles.vision_projector.lr == pytest.approx(5e-5)
    assert r.model.path == "/models/omni 7b"
    assert r.description == "Answer: briefly"


def test_scientific_notation_string_in_yaml(tmp_path):
    path = write(tmp_path, "sci.yaml", "train: {lr: 2e-4}\nexport: {verify_atol: 1e-3}\n")
    assert yaml.safe_load("x: 2e-4")["x"] == "2e-4"  # the reason for the coercion
    r = load_recipe(path)
    assert r.train.lr == pytest.approx(2e-4) and r.export.verify_atol == pytest.approx(1e-3)


def test_override_without_equals_is_error(tmp_path):
    path = write(tmp_path, "x.yaml", "")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["train.lr"])
    assert "override: train.lr: override must look like key.path=value" in str(exc.value)


def test_strict_types(tmp_path):
    path = write(tmp_path, "types.yaml", """
        roles:
          llm: {r: true, dropout: "abc"}
        train: {batch_size: 2.0, gradient_checkpointing: 1}
        data: {system_prompt: 3}
        model: [not, a, mapping]
    """)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    lines = problems_of(exc)
    assert "types.yaml: roles.llm.r: must be an integer, got bool True" in lines
    assert any(line.startswith("types.yaml: roles.llm.dropout: must be a number") for line in lines)
    assert any(line.startswith("types.yaml: train.batch_size: must be an integer") for line in lines)
    assert any(line.startswith("types.yaml: train.gradient_checkpointing: must be true or false") for line in lines)
    assert any(line.startswith("types.yaml: data.system_prompt: must be a string or null") for line in lines)
    assert any(line.startswith("types.yaml: model: must be a mapping") for line in lines)
    assert len(lines) == 6


# ---------------------------------------------------------------------------------------------
# unknown keys, enums, semantic checks, aggregation
# ---------------------------------------------------------------------------------------------


def test_unknown_keys_did_you_mean(tmp_path):
    path = write(tmp_path, "typo.yaml", """
        roles:
          vision_projecter: {mode: lora}
          llm: {dropuot: 0.1}
        trian: {lr: 1.0}
        data: {zzz: 1}
    """)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    lines = problems_of(exc)
    assert "typo.yaml: roles.vision_projecter: unknown key; did you mean 'vision_projector'?" in lines
    assert "typo.yaml: roles.llm.dropuot: unknown key; did you mean 'dropout'?" in lines
    assert "typo.yaml: trian: unknown key; did you mean 'train'?" in lines
    assert any(line.startswith("typo.yaml: data.zzz: unknown key; valid keys: train, eval") for line in lines)


def test_unknown_key_from_override(tmp_path):
    path = write(tmp_path, "u.yaml", "")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["train.lrr=1"])
    assert "override: train.lrr: unknown key; did you mean 'lr'?" in problems_of(exc)


def test_enum_errors(tmp_path):
    path = write(tmp_path, "enum.yaml", """
        model: {quantize: 3bit, attn: fast}
        roles: {llm: {mode: partial}}
        export: {format: gguf}
    """)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    text = str(exc.value)
    assert "enum.yaml: model.quantize: invalid value '3bit'; allowed: none, 4bit, 8bit" in text
    assert "model.attn: invalid value 'fast'; allowed: auto, sdpa, eager, flash_attention_2" in text
    assert "roles.llm.mode: invalid value 'partial'; allowed: frozen, lora, full" in text
    assert "export.format: invalid value 'gguf'; allowed: merged, adapter, both" in text


def test_quantized_full_llm_is_rejected(tmp_path):
    path = write(tmp_path, "q.yaml", "model: {quantize: 4bit}\nroles: {llm: {mode: full}}\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    (line,) = problems_of(exc)
    assert "cannot fully train a quantized LLM" in line
    assert "roles.llm.mode: lora" in line and "model.quantize: none" in line
    # The clash is attributed to whatever set it last.
    base = write(tmp_path, "full.yaml", "roles: {llm: {mode: full}}\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(base, ["model.quantize=8bit"])
    assert problems_of(exc)[0].startswith("override: model.quantize: cannot fully train a quantized LLM")
    # Full training of a non-quantized LLM and QLoRA are both fine.
    assert load_recipe(base).roles.llm.mode == "full"
    assert load_recipe(path, ["roles.llm.mode=lora"]).model.quantize == "4bit"


def test_semantic_checks(tmp_path):
    path = write(tmp_path, "sem.yaml", "")
    overrides = [
        "train.lr=0",
        "data.max_tokens=32",
        "train.grad_accum=0",
        "train.batch_size=0",
        "roles.llm.r=0",
        "roles.llm.dropout=1.0",
        "train.warmup_ratio=1.5",
        "train.epochs=0",
        "roles.audio_head.mode=lora",
    ]
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    text = str(exc.value)
    lines = problems_of(exc)
    assert text.splitlines()[0] == f"recipe sem has {len(lines)} problem(s):"
    for fragment in [
        "override: train.lr: must be > 0",
        "override: data.max_tokens: must be >= 64",
        "override: train.grad_accum: must be >= 1",
        "override: train.batch_size: must be >= 1",
        "override: roles.llm.r: must be >= 1",
        "override: roles.llm.dropout: must be in [0, 1)",
        "override: train.warmup_ratio: must be in [0, 1]",
        "override: train.epochs: must be > 0 unless train.max_steps > 0",
        "override: roles.audio_head.mode: must be frozen",
    ]:
        assert fragment in text
    assert len(lines) == 9
    # epochs=0 is fine when max_steps drives the run
    assert load_recipe(path, ["train.epochs=0", "train.max_steps=10"]).train.max_steps == 10


def test_all_frozen_is_rejected(tmp_path):
    path = write(tmp_path, "frozen.yaml", "roles: {llm: {mode: frozen}}\n")
    with pytest.raises(RecipeError, match="frozen.yaml: roles: every role is frozen"):
        load_recipe(path)
    assert load_recipe(path, ["roles.audio_projector.mode=full"]).roles.audio_projector.mode == "full"


def test_many_problems_reported_at_once(tmp_path):
    write(tmp_path, "parent.yaml", "train: {lr: -1.0}\n")
    path = write(tmp_path, "many.yaml", """
        extends: parent
        model: {dtype: float8}
        roles:
          vision_projecter: {mode: full}
        data: {max_tokens: 10}
    """)
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, ["train.grad_accum=0", "oops"])
    err = exc.value
    lines = problems_of(exc)
    assert str(err).splitlines()[0] == "recipe many has 6 problem(s):"
    assert err.problems == lines and isinstance(err, ValueError)
    expected = [
        "many.yaml: model.dtype: invalid value 'float8'",
        "many.yaml: roles.vision_projecter: unknown key; did you mean 'vision_projector'?",
        "many.yaml: data.max_tokens: must be >= 64",
        "parent.yaml: train.lr: must be > 0",
        "override: train.grad_accum: must be >= 1",
        "override: oops: override must look like key.path=value",
    ]
    for fragment in expected:
        assert sum(fragment in line for line in lines) == 1, fragment


# ---------------------------------------------------------------------------------------------
# provenance and resolved files
# ---------------------------------------------------------------------------------------------


def test_provenance(tmp_path):
    write(tmp_path, "base.yaml", "train: {lr: 1.0e-3, seed: 7}\n")
    path = write(tmp_path, "prov.yaml", "extends: base\ntrain: {seed: 9}\n")
    r = load_recipe(path, ["roles.llm.r=4"])
    src = recipe_provenance(r)
    assert src["train.lr"] == "recipe:base.yaml"
    assert src["train.seed"] == "recipe:prov.yaml"
    assert src["roles.llm.r"] == "override"
    assert src["roles.llm.alpha"] == "default"
    assert src["model.path"] == "default"
    assert set(src) == set(field_help())
    assert set(src.values()) <= {"default", "override", "recipe:base.yaml", "recipe:prov.yaml"}
    # A recipe built in code has no history.
    assert set(recipe_provenance(Recipe()).values()) == {"default"}


def test_save_and_load_resolved_round_trip(tmp_path):
    write(tmp_path, "base.yaml", """
        model: {quantize: 4bit, video_fps: 1.5}
        roles:
          llm: {targets: [q_proj, v_proj], lr: 3e-4}
          audio_projector: {mode: full}
    """)
    path = write(tmp_path, "trip.yaml", "extends: base\ndata: {system_prompt: 'Answer: briefly.', packing: true}\n")
    r = load_recipe(path, ["train.max_steps=5", "export.verify_atol=1e-3"])
    out = tmp_path / "run" / "recipe.resolved.yaml"
    save_resolved(r, out)

    raw = yaml.safe_load(out.read_text())
    assert set(raw) == {"recipe", "sources"}
    assert raw["recipe"] == recipe_to_dict(r)
    assert raw["sources"]["train.max_steps"] == "override"
    assert raw["sources"]["model.quantize"] == "recipe:base.yaml"
    assert raw["sources"]["data.packing"] == "recipe:trip.yaml"
    assert raw["sources"]["train.seed"] == "default"
    assert "_sources" not in raw["recipe"]

    back = load_resolved(out)
    assert back == r
    assert back.name == "trip"
    assert recipe_provenance(back) == recipe_provenance(r)


def test_a_runs_recipe_yaml_is_a_recipe(tmp_path):
    """What save_resolved writes (a run's recipe.yaml) loads as a recipe, with its provenance,
    takes overrides, and can be extended."""
    write(tmp_path, "base.yaml", "model: {quantize: 4bit}\ntrain: {lr: 1.0e-3}\n")
    path = write(tmp_path, "trip.yaml", "extends: base\ndata: {system_prompt: 'Answer: briefly.'}\n")
    r = load_recipe(path, ["train.max_steps=5"])
    saved = tmp_path / "run" / "recipe.yaml"
    save_resolved(r, saved)

    back = load_recipe(saved)
    assert back == r and back.name == "trip"
    assert recipe_provenance(back) == recipe_provenance(r)
    again = load_recipe(saved, ["train.lr=1e-4"])
    assert again.train.lr == 1e-4 and again.train.max_steps == 5 and again.model.quantize == "4bit"
    assert recipe_provenance(again)["train.lr"] == "override"
    assert recipe_provenance(again)["data.system_prompt"] == "recipe:trip.yaml"
    child = write(tmp_path, "child.yaml", "extends: run/recipe.yaml\ntrain: {seed: 3}\n")
    c = load_recipe(child)
    assert c.name == "child" and c.train.seed == 3 and c.train.max_steps == 5 and c.model.quantize == "4bit"
    with pytest.raises(RecipeError, match="train.lrr"):  # still strict
        load_recipe(saved, ["train.lrr=1"])


def test_an_existing_run_takes_evaluation_and_export_overrides_only(tmp_path):
    from finetune.recipe.run import RUN_SETTINGS, load_run

    assert "export.*" in RUN_SETTINGS and "eval.*" in RUN_SETTINGS and "data.eval" in RUN_SETTINGS
    rec = write(tmp_path, "exp.yaml", "train: {lr: 1.0e-3}\neval: {max_samples: 4}\n")
    run = tmp_path / "runs" / "exp"
    save_resolved(load_recipe(rec, [f"output.dir={run}", "train.max_steps=5"]), run / "recipe.yaml")

    # a run folder, with overrides of evaluation and export
    got = load_run(run, ["export.dtype=bfloat16", "eval.max_samples=2", "data.eval=other.jsonl", "data.on_error=skip"])
    assert got.run_dir == run and got.notes == []
    r = got.recipe
    assert (r.export.dtype, r.eval.max_samples, r.data.eval, r.data.on_error) == ("bfloat16", 2, "other.jsonl", "skip")
    assert r.train.max_steps == 5 and r.train.lr == 1e-3  # what was trained
    assert recipe_provenance(r)["export.dtype"] == "override" and recipe_provenance(r)["train.lr"] == "recipe:exp.yaml"
    # the run's recipe.yaml names the same run; a run folder moved elsewhere is that folder
    assert load_run(run / "recipe.yaml", ["eval.max_samples=2"]).run_dir == run
    moved = tmp_path / "moved"
    run.rename(moved)
    got = load_run(moved)
    assert got.run_dir == moved and got.recipe.output.dir == str(run)  # the recipe stays what trained it
    moved.rename(run)
    # a change to what was trained is refused, every one named with the run's value
    with pytest.raises(RecipeError) as e:
        load_run(run, ["train.lr=0.1", "roles.llm.r=4", "export.dtype=float16"])
    msg = str(e.value)
    assert "train.lr" in msg and "roles.llm.r" in msg and "0.001" in msg and "export.dtype" not in msg
    with pytest.raises(RecipeError, match="output.dir"):
        load_run(run, [f"output.dir={tmp_path / 'elsewhere'}"])
    # a recipe: overrides equal to the run's are fine, its evaluation settings apply
    got = load_run(rec, [f"output.dir={run}", "train.max_steps=5", "eval.max_samples=1"])
    assert got.run_dir == run and got.recipe.eval.max_samples == 1 and got.notes == []
    # the recipe file changed since training: the run keeps what it was trained with, and says so
    rec.write_text("train: {lr: 2.0e-3}\neval: {max_samples: 3}\n")
    got = load_run(rec, [f"output.dir={run}"])
    assert got.recipe.train.lr == 1e-3 and got.recipe.train.max_steps == 5 and got.recipe.eval.max_samples == 3
    assert len(got.notes) == 2 and any("train.lr" in n and "0.001" in n for n in got.notes)
    with pytest.raises(RecipeError, match="train.max_steps"):
        load_run(rec, [f"output.dir={run}", "train.max_steps=7"])
    # no run yet: the recipe as it is (evaluation and export then say to train first)
    got = load_run(rec, [f"output.dir={tmp_path / 'none'}"])
    assert got.run_dir == tmp_path / "none" and got.recipe.train.lr == 2e-3
    # a staged run finds its stages from output.dir: moved, it is given the folder it is in
    staged = write(tmp_path, "staged.yaml", """
        stages:
          - {name: align, roles: {vision_projector: {mode: full}, llm: {mode: frozen}}}
          - {name: sft}
    """)
    save_resolved(load_recipe(staged, [f"output.dir={tmp_path / 'runs' / 'staged'}"]),
                  tmp_path / "moved-staged" / "stages.yaml")
    save_resolved(load_recipe(staged), tmp_path / "moved-staged" / "recipe.yaml")
    got = load_run(tmp_path / "moved-staged", ["eval.max_samples=2"])
    assert [n for n, _, _ in got.recipe.stages] == ["align", "sft"] and got.recipe.eval.max_samples == 2
    assert got.recipe.run_dir == tmp_path / "moved-staged"


def test_load_resolved_rejects_plain_recipe(tmp_path):
    path = write(tmp_path, "plain.yaml", "train: {lr: 1.0}\n")
    with pytest.raises(RecipeError, match="not a resolved recipe file"):
        load_resolved(path)


# ---------------------------------------------------------------------------------------------
# the repository's own recipes
# ---------------------------------------------------------------------------------------------


def test_repository_recipes_load():
    names = list_recipes(REPO_RECIPES)
    # the shipped recipes, by name: a moved or emptied recipes/ folder fails here instead of skipping
    assert {"medical", "medical-qlora", "medical-tiny", "medical-baichuan", "medical-baichuan-qlora",
            "medical-baichuan-tiny"} <= set(names), names
    for name in names:
        recipe = load_recipe(name, recipes_dir=REPO_RECIPES)
        assert recipe.name


def test_quantized_bases_and_sharded_weights(tmp_path):
    from finetune.recipe import shards_weights

    r = load_recipe("medical-tiny", ["train.distributed=deepspeed", "train.deepspeed=zero3", "model.quantize=4bit"])
    assert shards_weights(r)  # QLoRA under ZeRO-3: allowed, the 4-bit weights are sharded too
    assert not shards_weights(load_recipe("medical-tiny", ["train.distributed=deepspeed", "train.deepspeed=zero2"]))
    custom = tmp_path / "ds.json"
    custom.write_text('{"zero_optimization": {"stage": 3}}')
    assert shards_weights(load_recipe("medical-tiny", ["train.distributed=deepspeed", f"train.deepspeed={custom}"]))
    with pytest.raises(RecipeError, match="model.quantize=8bit cannot be combined with sharded weights"):
        load_recipe("medical-tiny", ["train.distributed=fsdp", "model.quantize=8bit"])
    load_recipe("medical-tiny", ["train.distributed=ddp", "model.quantize=8bit"])


def test_model_family_is_checked_against_the_registry():
    with pytest.raises(RecipeError, match="unknown family 'qwen25_omni'; did you mean 'qwen2_5_omni'"):
        load_recipe("medical-tiny", ["model.family=qwen25_omni"])
    assert load_recipe("medical-tiny", ["model.family=baichuan_omni"]).model.family == "baichuan_omni"


def test_one_size_parser_for_the_recipe_and_the_export():
    """export.max_shard_size: what the recipe accepts is exactly what the export's parser reads, to
    the same bytes, and what one refuses the other refuses with a located, user-facing error."""
    from finetune.checkpoint import parse_size
    from finetune.errors import ConfigError

    expected = {"5G": 5 * 10**9, "5g": 5 * 10**9, "2GB": 2 * 10**9, "500MB": 500 * 10**6, "200KB": 200_000,
                "1.5GiB": int(1.5 * 2**30), "2 gb": 2 * 10**9, "3TB": 3 * 10**12, "500B": 500, "500": 500}
    refused = ["", "abc", "GB", "5 GBB", "1.2.3GB", "5iB", "5i", "-1GB", "5XB", ".5GB", "1e9"]
    for size in [*expected, *refused]:
        try:
            parsed = parse_size(size)
        except ConfigError:
            parsed = None
        try:
            load_recipe("medical-tiny", [f"export.max_shard_size={size}"])
            accepted = True
        except RecipeError as e:
            assert f"export.max_shard_size: must be a size such as '2GB' or '500MB', got {size!r}" in str(e)
            accepted = False
        assert parsed == expected.get(size), (size, parsed)
        assert accepted == (size in expected), (size, accepted, parsed)


def _bounded_fields():
    """(dotted path, field) of every setting that declares a bound, data sources included."""
    from dataclasses import fields as dc_fields

    from finetune.recipe.fields import BOUNDS, DataSource, walk_schema

    out = [(path, f) for path, f, _ in walk_schema(Recipe) if any(k in f.metadata for k in BOUNDS)]
    out += [(f"data.train[0].{f.name}", f) for f in dc_fields(DataSource) if any(k in f.metadata for k in BOUNDS)]
    return out


def test_every_declared_bound_is_enforced_with_its_path(tmp_path):
    """The bounds live on the fields and one checker applies them all: for every bounded setting, a
    value just outside is refused under its dotted path (and only it), a value on an inclusive
    bound is accepted, one on an exclusive bound refused."""
    bounded = _bounded_fields()
    paths = {p for p, _ in bounded}
    assert {"model.min_pixels", "roles.audio_head.r", "data.max_tokens", "train.warmup_ratio", "eval.bootstrap",
            "export.verify_atol", "data.train[0].weight", "data.train[0].epochs"} <= paths, paths
    path = write(tmp_path, "b.yaml", "")
    for dotted, f in bounded:
        step = 1 if f.type == "int" else 0.5
        # (offset from the bound, accepted?): just outside is refused; on the bound only when inclusive
        cases = {"ge": [(-step, False), (0, True)], "gt": [(0, False)], "le": [(step, False), (0, True)],
                 "lt": [(0, False)]}
        for key in (k for k in cases if k in f.metadata):
            for offset, ok in cases[key]:
                value = f.metadata[key] + offset
                if dotted.startswith("data.train[0]."):  # a source's setting goes in with its list
                    override = f"data.train=[{{path: a.jsonl, {dotted.rsplit('.', 1)[1]}: {value}}}]"
                else:
                    override = f"{dotted}={value}"
                if ok:
                    load_recipe(path, [override])
                    continue
                with pytest.raises(RecipeError) as exc:
                    load_recipe(path, [override])
                lines = problems_of(exc)
                shown = float(value) if "float" in f.type else value
                assert lines == [lines[0]] and lines[0].startswith(f"override: {dotted}: must be "), (override, lines)
                assert lines[0].endswith(f", got {shown}"), (override, lines)
