"""The Baichuan-Omni-1.5 family on tiny:baichuan_omni: checkpoint layout, prompt format, roles,
QLoRA targeting, packing exactness and the export round trip (speech-output parts unchanged)."""

from __future__ import annotations

import json

import pytest
import torch

from media_samples import MIXES, sample

from conftest import tiny_recipe
from finetune.models import load_spec
from finetune.families.base import IGNORE_INDEX, strip_peft_prefix

SPEECH = ("audio_head.", "audio_tokenizer.audio_decoder.", "audio_tokenizer.audio_flow_matching_decoder.")


def recipe_for(*overrides):
    from finetune.recipe import load_recipe

    return load_recipe("medical-baichuan-tiny", ["model.max_pixels=12544", *overrides])


@pytest.fixture(scope="module")
def tiny_bc():
    from finetune.families import family_for

    recipe = recipe_for()
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    loaded.model.eval()
    return fam, loaded


def test_checkpoint_loads_with_no_missing_or_unexpected_trained_keys(tiny_bc):
    from finetune.checkpoint import tensors_of
    from finetune.families.baichuan_model import BaichuanOmniForCausalLM

    fam, loaded = tiny_bc
    assert fam.name == "baichuan_omni" and json.loads((loaded.base_path / "config.json").read_text())["model_type"] == "omni"
    on_disk = set(tensors_of(loaded.base_path))
    speech = {k for k in on_disk if k.startswith(SPEECH)}
    assert speech  # the tiny checkpoint has the released layout, speech-output parts included
    model_keys = set(loaded.model.state_dict())
    assert model_keys == on_disk - speech  # every trained tensor read, every speech tensor left out
    _, info = BaichuanOmniForCausalLM.from_pretrained(str(loaded.base_path), output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert {k.split(".")[0] for k in model_keys} == {"model", "lm_head", "audio_tokenizer"}
    for name in ("model.layers.0.self_attn.W_pack.weight", "model.layers.0.self_attn.W_pack.bias",
                 "model.visual_model.blocks.0.attn.qkv.weight", "model.visual_bridge_model.mlp.2.weight",
                 "model.audio_embed_layers.7.weight", "audio_tokenizer.audio_model.layers.0.self_attn.k_proj.weight",
                 "audio_tokenizer.audio_bridge_model.vq_list.0.codebook.embed"):
        assert name in model_keys, name
    assert "model.layers.0.self_attn.o_proj.bias" not in model_keys


def test_prompt_format_labels_and_metadata_counts(tiny_bc, media_dir):
    fam, loaded = tiny_bc
    proc = loaded.processor
    for mix, parts in MIXES.items():
        s = sample(media_dir, parts, answer="Yes. A lesion.")
        e = fam.encode(s, proc)
        assert fam.count_tokens(s, proc) == e.num_tokens, mix
        text = proc.tokenizer.decode(e.input_ids)
        assert text.startswith("<B_SYS>You are a radiology assistant.<C_Q>"), text[:80]
        assert text.endswith("<C_A>Yes. A lesion.<|endoftext|>"), text[-60:]
        learned = proc.tokenizer.decode(e.labels[e.labels != IGNORE_INDEX])
        assert learned == "Yes. A lesion.<|endoftext|>"
        assert torch.equal(e.position_ids, torch.arange(e.num_tokens))
    e = fam.encode(sample(media_dir, MIXES["all"]), proc)
    text = proc.tokenizer.decode(e.input_ids)
    assert text.count("<img_start_baichuan>") == 1 + len(e.media["video_grid_thw"])  # one per video frame
    assert "<video_start_baichuan>" not in text  # frames only, as the released processor writes them
    # 1.5 s = 24000 samples: 151 mel frames -> 76 encoder frames -> 19 tokens (4x pooler, floored)
    assert text.count("<audio_pad_baichuan>") == 19
    gen = fam.encode(sample(media_dir, MIXES["image"]), proc, for_generation=True)
    assert proc.tokenizer.decode(gen.input_ids).endswith("Is there a lesion?<C_A>")


def test_roles_and_lora_qlora_targets():
    from finetune import adapters
    from finetune.families import family_for

    recipe = recipe_for("roles.audio_projector.mode=full")
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    assert all(fam.role_of(n) is not None for n, _ in loaded.model.named_parameters())
    assert fam.role_of("audio_tokenizer.audio_model.conv1.weight") == "audio_encoder"
    assert fam.role_of("model.audio_embed_layers.3.weight") == "audio_projector"
    assert fam.role_of("model.visual_bridge_model.ln_q.weight") == "vision_projector"
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    lora = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    assert lora and all(".model.layers." in n for n in lora)
    assert any("W_pack" in n for n in lora) and any("down_proj" in n for n in lora)
    trained = {fam.role_of(strip_peft_prefix(n)) for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"llm", "lm_head", "vision_encoder", "vision_projector", "audio_projector"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if "audio_tokenizer" in n)

    q = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa", quantize="4bit")).model
    kinds = {n: type(m).__name__ for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kinds["model.layers.0.self_attn.W_pack"] == "Linear4bit"
    assert kinds["lm_head"] == "Linear"
    assert all(v == "Linear" for k, v in kinds.items() if not k.startswith("model.layers."))


@pytest.mark.parametrize("backend", ["sdpa", "eager", "varlen", "training"])
def test_packed_equals_one_by_one(media_dir, backend):
    """`training`: varlen LLM with the collator's boundaries, the vision tower's positions and
    boundaries from the collator and its attention one varlen call per layer."""
    from finetune import adapters
    from finetune.families import family_for
    from finetune.verify import compare_packed, perturb_lora_b

    recipe = recipe_for("roles.audio_projector.mode=full", "roles.vision_encoder.mode=lora")
    fam = family_for(recipe.model.path)
    loaded = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(loaded.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    samples = [sample(media_dir, MIXES[m], answer=f"Yes. Case {i} {m}.")
               for i, m in enumerate(["text", "image", "audio", "video", "two_images", "all"])]
    res = compare_packed(model, fam, loaded.processor, samples, None, max_tokens=4096,
                         packed_attn="varlen" if backend == "training" else backend,
                         varlen_args=backend in ("varlen", "training"), towers=backend == "training")
    assert res.n_rows == 1
    assert res.passed, res.format()

    def no_isolation(batch):
        batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        return batch

    broken = compare_packed(model, fam, loaded.processor, samples[:3], None, max_tokens=4096, mutate=no_isolation)
    assert not broken.passed


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["none", "4bit"])
def test_export_round_trip_keeps_the_speech_parts(tmp_path, small_demo, quantize):
    from finetune.checkpoint import raw_equal, tensors_of
    from finetune.export import export_run
    from finetune.families import family_for
    from finetune.families.baichuan_model import BaichuanOmniForCausalLM
    from finetune.train import train

    recipe = tiny_recipe(tmp_path, small_demo, "model.path=tiny:baichuan_omni", "train.max_steps=3", "train.lr=5e-3",
                         "train.gradient_checkpointing=true",  # checkpointing through LLM and vision blocks
                         f"model.quantize={quantize}",  # QLoRA: the export reloads the base unquantised
                         f"export.quantize={quantize}")  # and merged-4bit/ is written beside merged/
    run = train(recipe)
    written = export_run(run)
    out = written["merged"]
    if quantize == "4bit":
        q = written["merged-4bit"]
        qm = json.loads((q / "export_manifest.json").read_text())
        assert qm["loads"] and "NF4" in qm["format"] and 0 < qm["max_abs_logit_diff_vs_merged"] < qm["logit_scale"]
        qmodel = BaichuanOmniForCausalLM.from_pretrained(str(q))
        assert type(qmodel.model.layers[0].self_attn.W_pack).__name__ == "Linear4bit"
        assert type(qmodel.model.visual_bridge_model.mlp[0]).__name__ == "Linear"  # only the LLM is quantised
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["verify"]["max_abs_diff"] <= 1e-4
    kept = manifest["unchanged_from_base"]
    assert kept["bit_identical"] and kept["tensors"] == 4
    assert kept["parts"] == ["audio_head", "audio_tokenizer.audio_decoder", "audio_tokenizer.audio_flow_matching_decoder"]
    base_dir = family_for("tiny:baichuan_omni").resolve_path("tiny:baichuan_omni")
    base_t, out_t = tensors_of(base_dir), tensors_of(out)
    assert base_t.keys() == out_t.keys()
    assert all(raw_equal(base_t[k], out_t[k]) for k in base_t if k.startswith(SPEECH))
    assert any(not raw_equal(base_t[k], out_t[k]) for k in base_t if k.startswith("model.layers."))
    assert json.loads((out / "config.json").read_text()) == json.loads((base_dir / "config.json").read_text())
    BaichuanOmniForCausalLM.from_pretrained(str(out))  # loads as the family's model


def test_the_backbone_alone_sees_the_media(tiny_bc, media_dir):
    """TRL's fused LM head calls `model.base_model(**batch)` and projects the hidden states
    itself: the backbone must embed images, video and audio, not only the text."""
    fam, loaded = tiny_bc
    model = loaded.model
    e = fam.encode(sample(media_dir, MIXES["all"]), loaded.processor)
    batch = fam.collate_padded([e], loaded.processor.pad_id)
    batch.pop("labels")
    with torch.no_grad():
        full = model(**batch).logits
        via_backbone = model.get_output_embeddings()(model.base_model(**batch).last_hidden_state)
        text_only = model.base_model(input_ids=batch["input_ids"]).last_hidden_state
    assert torch.allclose(full, via_backbone, atol=1e-6)
    assert not torch.allclose(model.get_output_embeddings()(text_only), full, atol=1e-3)


@pytest.mark.slow
@pytest.mark.quality
def test_medical_baichuan_tiny_reaches_the_accuracy_bar(tmp_path):
    """`make finetune RECIPE=medical-baichuan-tiny`: the held-out lesion question is learned."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "finetune", "run", "medical-baichuan-tiny",
                          f"output.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["tuned"]["lesion_accuracy"] >= 0.90, ev["tuned"]
    assert ev["tuned"]["lesion_accuracy"] >= ev["base"]["lesion_accuracy"] + 0.30
