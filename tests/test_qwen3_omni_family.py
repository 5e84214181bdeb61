"""The Qwen3-Omni family beyond the contract suite: the prompt transformers' own processor builds,
the audio tower's chunk padding (packing stays exact for clips shorter than a chunk), and the
mixture of experts (LoRA on the fused experts, a trained router, the load-balancing loss)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from media_samples import sample

from finetune.models import load_spec
from finetune.data.schema import parse_sample
from finetune.families import get_family

FAMILY = "qwen3_omni_moe"
REAL_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}  # the released preprocessor_config.json's


def recipe(*overrides):
    from finetune.recipe import load_recipe

    return load_recipe("medical-qwen3-omni-tiny", list(overrides))


@pytest.fixture(scope="module")
def loaded():
    return get_family(FAMILY).load(load_spec(recipe(), dtype=torch.float32, attn="sdpa"))


def transformers_processor(tokenizer, min_pixels: int, max_pixels: int):
    """transformers' Qwen3OmniMoeProcessor over its PIL image processor and Whisper features (its
    video processor needs torchvision: not built, no video in these chats)."""
    from transformers import Qwen3OmniMoeProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels,
                                      max_pixels=max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    class WithoutVideo(Qwen3OmniMoeProcessor):
        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor" and argument is None:  # its class mapping needs torchvision
                return None
            return super().check_argument_for_proper_class(name, argument)

    return WithoutVideo(image_processor=images, video_processor=None,
                        feature_extractor=WhisperFeatureExtractor(feature_size=128), tokenizer=tokenizer,
                        chat_template=tokenizer.chat_template)


@pytest.mark.parametrize("settings", ["tiny", "released"])
def test_prompt_ids_equal_transformers_processor(loaded, tmp_path, settings):
    """A chat with an image, an audio clip and text: our encoder's token ids, pixel values and
    audio features are what Qwen3OmniMoeProcessor gives for the same chat, with the tiny folder's
    pixel settings and with the released checkpoint's (a large image, resized)."""
    fam = get_family(FAMILY)
    rng = np.random.default_rng(1)
    size = (150, 220) if settings == "tiny" else (1100, 1500)
    Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8")).save(tmp_path / "x.png")
    sf.write(tmp_path / "x.wav", (rng.standard_normal(40_050) * 0.1).astype(np.float32), 16000)  # 2.5 s, odd length
    messages = [{"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "audio", "path": "x.wav"},
                                             {"type": "text", "text": "Is there a lesion?"}]},
                {"role": "assistant", "content": "Yes."}]
    s = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)
    pixels = REAL_PIXELS if settings == "released" else {"min_pixels": 3136, "max_pixels": 16384}
    ours = fam.processor_class.from_folder(loaded.base_path, system_prompt="", **pixels)
    assert ours.n_window == 50
    enc = fam.encode(s, ours, rope=fam.rope_index(loaded.model))

    ref_proc = transformers_processor(ours.tokenizer, **pixels)
    text = ours.tokenizer.apply_chat_template(messages, tokenize=False)
    wave = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    ref = ref_proc(text=[text], images=[Image.open(tmp_path / "x.png").convert("RGB")], audio=[wave],
                   return_tensors="pt")
    assert enc.input_ids.tolist() == ref["input_ids"][0].tolist()
    assert torch.equal(enc.media["image_grid_thw"], ref["image_grid_thw"])
    assert torch.equal(enc.media["pixel_values"], ref["pixel_values"])
    n = int(ref["feature_attention_mask"].sum())
    assert enc.media["audio_feature_lengths"].tolist() == [n]
    np.testing.assert_allclose(enc.media["input_features"][0].numpy(), ref["input_features"][0][:, :n].numpy(),
                               atol=1e-5)
    assert fam.count_tokens(s, ours) == enc.num_tokens
    if settings == "released":
        assert int(enc.media["image_grid_thw"].prod()) // 4 > 1000  # the large image really kept its detail
    # the positions are the model's own for this prompt (transformers' get_rope_index on the batch)
    model = loaded.model
    pos, _ = model.get_rope_index(ref["input_ids"], ref["image_grid_thw"], None, torch.ones_like(ref["input_ids"]),
                                  False, ref["feature_attention_mask"].sum(-1), None)
    assert torch.equal(enc.position_ids, pos[:, 0].long())


def test_short_audio_packs_exactly_beside_a_long_clip(loaded, media_dir):
    """A clip under one chunk (100 mel frames) in a row with a longer one: packed (the training
    pipeline, tower inputs from the collator) equals each alone within 1e-5. transformers' own
    audio path pads the short clip's chunk to the batch's longest and does not mask the padding
    between its convolutions, which moves the short clip's last rows (checked here too, so the
    padding in the collator is not a no-op)."""
    from finetune import adapters
    from finetune.verify import compare_packed, perturb_lora_b

    fam = get_family(FAMILY)
    rng = np.random.default_rng(2)
    sf.write(media_dir / "short.wav", (rng.standard_normal(7_000) * 0.1).astype(np.float32), 16000)  # 44 frames
    sf.write(media_dir / "long.wav", (rng.standard_normal(41_000) * 0.1).astype(np.float32), 16000)  # 257 frames
    samples = [sample(media_dir, [{"type": "audio", "path": p}, {"type": "text", "text": "Listen."}],
                      answer=f"Yes. Clip {i}.") for i, p in enumerate(("short.wav", "long.wav"))]
    ld = fam.load(load_spec(recipe(), dtype=torch.float32, attn="sdpa"))
    r = recipe("roles.audio_encoder.mode=lora", "roles.audio_projector.mode=full")
    model, _ = adapters.apply_roles(ld.model, fam, r)
    perturb_lora_b(model, 0.05)
    rope = fam.rope_index(ld.model)
    res = compare_packed(model, fam, ld.processor, samples, rope, max_tokens=4096, packed_attn="varlen",
                         varlen_args=True, towers=True)
    assert res.n_rows == 1 and res.passed, res.format()
    assert res.max_logit_diff <= 1e-5 and res.max_grad_diff <= 1e-5

    # the tower on its own: the short clip's rows beside the long clip equal its rows alone, with the
    # collator's inputs or the tower's own; without the masks (transformers' model as loaded) they move
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    plain = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(ld.base_path), dtype=torch.float32)
    ours = fam.load(load_spec(recipe(), dtype=torch.float32, attn="sdpa")).model  # the same weights, no LoRA
    enc = [fam.encode(s, ld.processor) for s in samples]
    alone, both = fam.collate_media(enc[:1]), fam.collate_media(enc)
    inputs = fam.tower_inputs(ld.model)
    rows = fam.audio_rows(enc[0].media["audio_feature_lengths"], {})

    def run(model, batch, ours):
        kw = {k.removeprefix("audio_"): v for k, v in inputs(batch).items() if k.startswith("audio_")} if ours else {}
        feats = batch["input_features"].permute(0, 2, 1)[batch["feature_attention_mask"].bool()].permute(1, 0)
        with torch.no_grad():
            return model.model.audio_tower(feats, feature_lens=batch["feature_attention_mask"].sum(-1),
                                           **kw).last_hidden_state

    ref = run(plain, alone, ours=False)  # transformers' own, the clip alone: no padding at all
    for batch, ours_inputs in ((both, True), (both, False), (alone, True)):
        assert float((run(ours, batch, ours_inputs)[:rows] - ref).abs().max()) <= 1e-5, (len(batch), ours_inputs)
    assert float((run(plain, both, ours=False)[:rows] - ref).abs().max()) > 1e-3


@pytest.mark.slow
def test_expert_lora_and_router_train_and_export(tmp_path):
    """roles.llm.experts: lora puts LoRA of rank r on every expert of the fused weights and
    roles.llm.router: full trains the routers; the load-balancing loss is logged every step and
    joins the loss with train.router_aux_loss_coef; the export merges the expert LoRA."""
    from safetensors.torch import load_file

    from finetune.export import export_run
    from finetune.train import train

    def run(name, coef):
        r = recipe(f"output.dir={tmp_path / name}", "roles.llm.experts=lora", "roles.llm.router=full",
                   "roles.llm.r=4", "train.max_steps=2", "train.save_steps=2", "data.max_tokens=256",
                   f"train.router_aux_loss_coef={coef}", "train.seed=3")
        train(r)
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [x for x in rows if "loss" in x and "aux_loss" in x]

    without, with_aux = run("coef0", 0.0), run("coef1", 1.0)
    assert len(without) == 2 and len(with_aux) == 2
    first0, first1 = without[0], with_aux[0]
    assert first0["aux_loss"] > 0
    assert first1["aux_loss"] == pytest.approx(first0["aux_loss"], rel=1e-5)  # the same weights at step 1
    assert first1["loss"] - first0["loss"] == pytest.approx(first0["aux_loss"], rel=1e-3)

    adapter = load_file(str(tmp_path / "coef1" / "adapter" / "adapter_model.safetensors"))
    experts = [k for k in adapter if "mlp.experts" in k and "lora_" in k]
    routers = [k for k in adapter if k.endswith("mlp.gate.weight")]
    assert len(experts) == 2 * 2 * 2  # 2 layers x (gate_up, down) x (A, B)
    assert len(routers) == 2

    out = export_run(tmp_path / "coef1", fmt="merged")["merged"]
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"]


def test_plan_counts_expert_lora_and_routers_as_training_does():
    """The planner's trainable parameters for LoRA on the fused experts and trained routers are the
    ones training creates (tiny model); under 4-bit it says the fused experts stay 16-bit."""
    from finetune import adapters
    from finetune.plan import format_plan, plan

    fam = get_family(FAMILY)
    r = recipe("roles.llm.experts=lora", "roles.llm.router=full", "roles.llm.r=4")
    ld = fam.load(load_spec(r, dtype=torch.float32, attn="sdpa"))
    model, rp = adapters.apply_roles(ld.model, fam, r)
    real = {row["role"]: row["trainable"] for row in adapters.role_table(model, fam, rp)}
    p = plan(r)
    assert {line.role: line.trainable for line in p.roles} == real
    frozen = plan(recipe("roles.llm.r=4"))
    assert {line.role: line.trainable for line in frozen.roles}["llm"] < real["llm"]
    q = plan(recipe("model.quantize=4bit"))
    loaded_4bit = fam.load(load_spec(recipe(), dtype=torch.float32, attn="sdpa", quantize="4bit")).model
    experts = {n: p for n, p in loaded_4bit.named_parameters() if n.endswith(("experts.gate_up_proj",
                                                                               "experts.down_proj"))}
    assert experts and all(p.dtype == torch.float32 for p in experts.values())  # really left unquantised
    assert q.experts_16bit == sum(p.numel() for p in experts.values())
    assert "fused expert weights stay" in format_plan(q)


FRESH = r'''
import sys, torch
from transformers import Qwen3OmniMoeForConditionalGeneration
assert not any(m == "finetune" or m.startswith("finetune.") for m in sys.modules)
model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
assert model.has_talker
batch = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model.thinker(**batch).logits, sys.argv[3])
print(sorted(n for n, _ in model.named_children()))
'''


@pytest.mark.slow
def test_full_export_loads_in_a_fresh_process_with_transformers_alone(tmp_path, small_demo):
    """A merged export of the tiny full Qwen3-Omni (thinker trained, talker and code2wav copied)
    loads with Qwen3OmniMoeForConditionalGeneration in a process that never imports the toolkit,
    and its thinker answers an image+audio prompt as the adapter model does."""
    import os
    import subprocess
    import sys

    from peft import PeftModel

    from conftest import tiny_recipe
    from finetune.checkpoint import raw_equal, tensors_of
    from finetune.export import export_run
    from finetune.data.reading import read_split
    from finetune.train import train

    fam = get_family(FAMILY)
    r = tiny_recipe(tmp_path, small_demo, "model.path=tiny:qwen3_omni_moe-full", "model.max_pixels=16384",
                    "train.max_steps=3", "train.lr=5e-3", "roles.llm.experts=lora")
    run = train(r)
    out = export_run(run)["merged"]
    manifest = json.loads((out / "export_manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["unchanged_from_base"]["parts"] == ["code2wav", "talker"]
    base_t, out_t = tensors_of(fam.resolve_path("tiny:qwen3_omni_moe-full")), tensors_of(out)
    assert base_t.keys() == out_t.keys()
    speech = [k for k in base_t if k.startswith(("talker.", "code2wav."))]
    assert speech and all(raw_equal(base_t[k], out_t[k]) for k in speech)

    loaded = fam.load(load_spec(r, quantize="none", dtype=torch.float32, attn="sdpa"))
    ref_model = PeftModel.from_pretrained(loaded.model, str(run / "adapter")).eval()
    samples, _ = read_split(r.data.eval, r)
    s = next(x for x in samples if {"image", "audio"} <= x.modalities())
    enc = fam.encode(s, loaded.processor, rope=fam.rope_index(loaded.model))
    assert int(enc.media["audio_feature_lengths"].min()) >= 100  # a clip of 1 s or more: no short-clip mask
    batch = fam.collate_padded([enc], loaded.processor.pad_id)
    batch.pop("labels")
    torch.save(batch, tmp_path / "batch.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "l.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    with torch.no_grad():
        want = ref_model(**batch).logits
    assert float((torch.load(tmp_path / "l.pt") - want).abs().max()) <= 1e-4
