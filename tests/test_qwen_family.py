"""The Qwen2.5-Omni family: processor, chat format, label masking, token counts, positions."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from finetune.data.schema import parse_sample
from finetune.families.base import IGNORE_INDEX
from media_samples import MIXES, sample


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


#: the pixel settings images are read with: the tiny Qwen2.5-Omni folder's, the released Qwen2.5-Omni's,
#: the released Qwen3-Omni's (16-px patches, mean = std = 0.5) and a small max_pixels (every image shrunk)
PIXEL_SETTINGS = {
    "qwen2_5_tiny": ("qwen2_5", dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)),
    "qwen2_5_released": ("qwen2_5", dict(min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28)),
    "qwen3_released": ("qwen3", dict(min_pixels=128 * 32 * 32, max_pixels=16384 * 32 * 32)),
    "small_max": ("qwen2_5", dict(min_pixels=3136, max_pixels=12544)),
}


def omni_processor(kind: str, settings: dict):
    from finetune.families.shared import OmniProcessor, Qwen3OmniProcessor

    return (OmniProcessor if kind == "qwen2_5" else Qwen3OmniProcessor)(tokenizer=None, **settings)


@pytest.mark.parametrize("settings", sorted(PIXEL_SETTINGS))
def test_images_through_transformers_equal_our_own_patchifier(settings):
    """Images go through transformers' Qwen2VLImageProcessorPil: its pixel values and grids are bit for
    bit what our own resize + normalise + patchify (the path video frames keep) gives, over sizes
    that are up- and downscaled, kept, odd, and far from square, in RGB, grey and palette images;
    `image_grid` (token counts from the header) gives the same grid without decoding."""
    proc_kind, kw = PIXEL_SETTINGS[settings]
    proc = omni_processor(proc_kind, kw)
    rng = np.random.default_rng(0)
    sizes = [(28, 28), (56, 56), (57, 91), (100, 300), (300, 100), (220, 150), (448, 448), (640, 480),
             (1000, 15), (15, 1000), (2000, 1500), (4000, 60)]
    for w, h in sizes:
        for mode in ("RGB", "L", "P"):
            img = Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).convert(mode)
            pv, grid = proc.process_image(img)
            own_pv, own_grid = proc.process_frame(img)
            assert grid.tolist() == own_grid.tolist() == list(proc.image_grid(w, h)), (w, h, mode)
            assert pv.dtype == own_pv.dtype == torch.float32 and torch.equal(pv, own_pv), (w, h, mode)


@pytest.mark.parametrize("size", [(10, 1000), (1000, 10), (14, 700), (3, 500)])
def test_an_image_with_a_side_under_half_a_patch_pair_is_resized_as_transformers_does(size):
    """A side that rounds to no 28-px unit at all: transformers' resize rule scales the image up to
    min_pixels (where Qwen2-VL's earlier rule, kept for video frames, rounded the side up to 28 px
    and the other side as it was); the grid counted from the header is the one the pixels get."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    proc = omni_processor("qwen2_5", dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1280))
    w, h = size
    img = Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype("uint8"))
    ref = Qwen2VLImageProcessorPil(min_pixels=proc.min_pixels, max_pixels=proc.max_pixels)(images=[img],
                                                                                           return_tensors="pt")
    pv, grid = proc.process_image(img)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist() == list(proc.image_grid(w, h))
    assert torch.equal(pv, ref["pixel_values"])


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
