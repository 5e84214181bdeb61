"""The Qwen2.5-Omni family: processor, chat format, label masking, token counts, positions."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from finetune.data.schema import parse_sample
from finetune.families.base import IGNORE_INDEX


@pytest.fixture()
def media_dir(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((150, 220)) * 255).astype("uint8")).save(tmp_path / "a.png")
    Image.fromarray((rng.random((90, 60, 3)) * 255).astype("uint8")).save(tmp_path / "b.png")
    sf.write(tmp_path / "a.wav", (rng.standard_normal(24000) * 0.1).astype(np.float32), 16000)
    (tmp_path / "vid").mkdir()
    for i in range(5):
        Image.fromarray((rng.random((100, 120, 3)) * 255).astype("uint8")).save(tmp_path / "vid" / f"{i:03d}.png")
    return tmp_path


def sample(media_dir, user_parts, answer="Yes. A lesion.", extra_turns=()):
    msgs = [{"role": "system", "content": "You are a radiology assistant."},
            {"role": "user", "content": user_parts},
            {"role": "assistant", "content": answer}, *extra_turns]
    return parse_sample({"messages": msgs, "answer": "yes"}, source="t.jsonl", line=1, base_dir=media_dir)


MIXES = {
    "text": [{"type": "text", "text": "What does MRI stand for?"}],
    "image": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Is there a lesion?"}],
    "audio": [{"type": "audio", "path": "a.wav"}, {"type": "text", "text": "Listen."}],
    "video": [{"type": "video", "path": "vid"}, {"type": "text", "text": "Describe."}],
    "two_images": [{"type": "image", "path": "a.png"}, {"type": "image", "path": "b.png"},
                   {"type": "text", "text": "Compare prior and current."}],
    "all": [{"type": "image", "path": "b.png"}, {"type": "audio", "path": "a.wav"},
            {"type": "video", "path": "vid"}, {"type": "text", "text": "All of it."}],
}


def test_image_and_audio_preprocessing_match_transformers(tiny_qwen, media_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    _, loaded = tiny_qwen
    proc = loaded.processor
    img = Image.open(media_dir / "a.png")
    pv, grid = proc.process_image(img)
    ref = Qwen2VLImageProcessorPil(min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)(
        images=[img.convert("RGB")], return_tensors="pt")
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    assert torch.equal(pv, ref["pixel_values"])

    wave = sf.read(media_dir / "a.wav", dtype="float32")[0]
    feats = proc.process_audio(wave)
    full = proc.feature_extractor(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True,
                                  return_tensors="np")
    n = int(full["attention_mask"].sum())
    assert feats.shape[1] == n
    np.testing.assert_allclose(feats.numpy(), full["input_features"][0][:, :n], atol=1e-6)


@pytest.mark.parametrize("mix", sorted(MIXES))
def test_count_tokens_matches_encode_and_positions_match_model(tiny_qwen, media_dir, mix):
    fam, loaded = tiny_qwen
    s = sample(media_dir, MIXES[mix])
    rope = fam.rope_index(loaded.model)
    enc = fam.encode(s, loaded.processor, rope=rope)
    assert fam.count_tokens(s, loaded.processor) == enc.num_tokens
    batch = fam.collate_padded([enc], loaded.processor.pad_id)
    batch.pop("labels")
    with torch.no_grad():
        own = loaded.model(**batch).logits  # the model computes its positions from the mask
        b2 = dict(batch)
        b2.pop("attention_mask")
        b2["position_ids"] = torch.cat([torch.arange(enc.num_tokens)[None], enc.position_ids])[:, None]
        ours = loaded.model(**b2).logits
    assert torch.allclose(own, ours, atol=1e-6)


def test_labels_only_on_assistant_turns_multi_turn(tiny_qwen, media_dir):
    fam, loaded = tiny_qwen
    tok = loaded.processor.tokenizer
    s = sample(media_dir, MIXES["image"], answer="Yes. A lesion.",
               extra_turns=[{"role": "user", "content": "What kind of scan is this?"},
                            {"role": "assistant", "content": "Chest X-ray."}])
    enc = fam.encode(s, loaded.processor)
    learned = enc.input_ids[enc.labels != IGNORE_INDEX]
    assert tok.decode(learned) == "Yes. A lesion.<|im_end|>Chest X-ray.<|im_end|>"
    assert enc.labels[0] == IGNORE_INDEX
    # labels equal the inputs wherever they are set
    m = enc.labels != IGNORE_INDEX
    assert torch.equal(enc.labels[m], enc.input_ids[m])


def test_generation_prompt_drops_last_answer(tiny_qwen, media_dir):
    fam, loaded = tiny_qwen
    s = sample(media_dir, MIXES["text"])
    enc = fam.encode(s, loaded.processor, for_generation=True)
    text = loaded.processor.tokenizer.decode(enc.input_ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "Yes. A lesion." not in text
    assert (enc.labels == IGNORE_INDEX).all()


def test_encoding_matches_the_checkpoint_chat_template(tiny_qwen, media_dir):
    """Our segment-wise tokenisation equals the saved chat template tokenised in one go."""
    fam, loaded = tiny_qwen
    tok = loaded.processor.tokenizer
    s = sample(media_dir, MIXES["all"])
    ids = fam.encode(s, loaded.processor).input_ids.tolist()
    msgs = [{"role": "system", "content": "You are a radiology assistant."},
            {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "video"},
                                         {"type": "text", "text": "All of it."}]},
            {"role": "assistant", "content": "Yes. A lesion."}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    ref = tok(text, add_special_tokens=False)["input_ids"]
    collapse = {loaded.processor.token_ids[t] for t in ("<|IMAGE|>", "<|AUDIO|>", "<|VIDEO|>")}
    squeezed = [t for i, t in enumerate(ids) if not (t in collapse and i and ids[i - 1] == t)]
    assert squeezed == ref


def test_system_prompt_from_recipe_used_when_sample_has_none(tiny_qwen, media_dir):
    fam, loaded = tiny_qwen
    s = parse_sample({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
                     source="t.jsonl", line=1, base_dir=media_dir)
    proc = loaded.processor
    old = proc.system_prompt
    try:
        proc.system_prompt = "Be brief."
        text = proc.tokenizer.decode(fam.encode(s, proc).input_ids)
        assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
        assert fam.count_tokens(s, proc) == fam.encode(s, proc).num_tokens
    finally:
        proc.system_prompt = old


def test_unknown_folder_errors_clearly(tmp_path):
    from finetune.families import family_for

    with pytest.raises(FileNotFoundError, match="config.json"):
        family_for(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ValueError, match="llama"):
        family_for(str(tmp_path))
