"""The prompt at training is the prompt at inference: for the same messages, each family's encoder
gives the token ids that the model's own chat template gives (`apply_chat_template`), media
placeholders expanded; with no system turn, the template's default system prompt is used."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.data.schema import parse_sample
from finetune.models import processor_of


CONFIGS = Path(__file__).resolve().parent.parent / "finetune" / "configs"
TEMPLATES = {"qwen2_5_omni": CONFIGS / "qwen2_5_omni.chat_template.jinja",
             "baichuan_omni": CONFIGS / "baichuan_omni.chat_template.jinja",
             "gemma3n": CONFIGS / "gemma3n.chat_template.jinja"}

IMG = {"type": "image", "path": "a.png"}
AUD = {"type": "audio", "path": "a.wav"}
VID = {"type": "video", "path": "vid"}
CONVERSATIONS = {
    "text, no system": [{"role": "user", "content": "What does MRI stand for?"},
                        {"role": "assistant", "content": "Magnetic resonance imaging."}],
    "image, system": [{"role": "system", "content": "You are a radiology assistant."},
                      {"role": "user", "content": [IMG, {"type": "text", "text": "Is there a lesion?"}]},
                      {"role": "assistant", "content": "Yes."}],
    "audio then text, no system": [{"role": "user", "content": [AUD, {"type": "text", "text": "Listen."}]},
                                   {"role": "assistant", "content": "A cough."}],
    "video and two images, multi-turn": [
        {"role": "user", "content": [VID, {"type": "text", "text": "Describe."}]},
        {"role": "assistant", "content": "A beating heart."},
        {"role": "user", "content": [IMG, IMG, {"type": "text", "text": "And these, compared?"}]},
        {"role": "assistant", "content": "Unchanged."}],
    "audio, image and text, system, multi-turn": [
        {"role": "system", "content": "You are a radiology assistant."},
        {"role": "user", "content": [{"type": "text", "text": "Listen."}, AUD, IMG]},
        {"role": "assistant", "content": "A cough. No lesion."},
        {"role": "user", "content": [IMG, {"type": "text", "text": "And this one?"}]},
        {"role": "assistant", "content": "Yes."}],
}


@pytest.fixture(scope="module", params=["medical-tiny", "medical-baichuan-tiny", "medical-gemma3n-tiny"])
def tiny(request):
    from finetune.families import family_for
    from finetune.recipe import load_recipe

    # data.system_prompt unset (null): the model's own default, as at inference
    recipe = load_recipe(request.param, ["model.max_pixels=12544", "data.system_prompt=null"])
    fam = family_for(recipe.model.path)
    folder = fam.resolve_path(recipe.model.path)
    return fam, processor_of(recipe, fam, folder), recipe


def collapse(ids: list[int], fam, proc) -> list[int]:
    """Each media part back to the one placeholder the chat template writes."""
    t = proc.token_ids
    if fam.name == "qwen2_5_omni":
        pads = {t["<|IMAGE|>"], t["<|AUDIO|>"], t["<|VIDEO|>"]}
    else:
        pads = {t["<img_pad_baichuan>"], t["<audio_pad_baichuan>"], t["<video_palce_baichuan>"]}
    out: list[int] = []
    for i in ids:
        if i in pads and out and out[-1] == i:
            continue
        out.append(i)
    if fam.name == "baichuan_omni":  # a video: one <img_start><video pad><img_end> group per frame
        group = [t["<img_start_baichuan>"], t["<video_palce_baichuan>"], t["<img_end_baichuan>"]]
        k = 0
        while k < len(out):
            if out[k:k + 3] == group and out[k + 3:k + 6] == group:
                del out[k + 3:k + 6]
                continue
            k += 1
    return out


def expanded(tok, messages, proc, **kw) -> list[int]:
    """Gemma 3n: the template's text with each media placeholder expanded as Gemma3nProcessor does,
    tokenised as a whole (the expansion's newlines join the text around them into one run)."""
    text = tok.apply_chat_template(messages, tokenize=False, **kw)
    image = f"\n\n<start_of_image>{'<image_soft_token>' * proc.image_seq_length}<end_of_image>\n\n"
    audio = f"\n\n<start_of_audio>{'<audio_soft_token>' * proc.audio_seq_length}<end_of_audio>\n\n"
    text = text.replace("<image_soft_token>", "\0").replace("<audio_soft_token>", "\1")
    text = text.replace("\0", image).replace("\1", audio)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_training_prompt_equals_the_chat_template(tiny, media_dir, name):
    fam, proc, _ = tiny
    messages = CONVERSATIONS[name]
    if fam.name == "gemma3n" and any(p["type"] == "video" for m in messages if not isinstance(m["content"], str)
                                     for p in m["content"]):
        pytest.skip("Gemma 3n takes no video")
    s = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=media_dir)
    tok = proc.tokenizer
    for template in (None, TEMPLATES[fam.name].read_text()):  # the tiny folder's, and the shipped file
        kw = {} if template is None else {"chat_template": template}
        enc = fam.encode(s, proc)
        gen = fam.encode(s, proc, for_generation=True)
        if fam.name == "gemma3n":
            assert enc.input_ids.tolist() == expanded(tok, messages, proc, **kw), name
            assert gen.input_ids.tolist() == expanded(tok, messages[:-1], proc, add_generation_prompt=True, **kw), name
            continue
        full = tok.apply_chat_template(messages, tokenize=True, **kw)
        full = full["input_ids"] if isinstance(full, dict) or hasattr(full, "keys") else full
        assert collapse(enc.input_ids.tolist(), fam, proc) == list(full), (fam.name, name)
        prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, **kw)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
        assert collapse(gen.input_ids.tolist(), fam, proc) == list(prompt), (fam.name, name)


def test_default_system_prompt_is_the_templates_and_can_be_turned_off(tiny):
    fam, proc, recipe = tiny
    want = "You are a helpful assistant." if fam.name == "qwen2_5_omni" else None  # Baichuan's, Gemma's: none
    assert proc.system_prompt == want
    folder = fam.resolve_path(recipe.model.path)
    recipe.data.system_prompt = ""
    assert processor_of(recipe, fam, folder).system_prompt is None
    recipe.data.system_prompt = "You are a radiology assistant."
    assert processor_of(recipe, fam, folder).system_prompt == "You are a radiology assistant."


def test_baichuan_exports_carry_the_template_over_the_released_chatml_one(tmp_path):
    """The released tokenizer_config.json has a ChatML template the model does not use; an
    export's chat_template.jinja (read first by transformers) is Baichuan's own format."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from finetune.families import get_family

    fam = get_family("baichuan_omni")
    base = fam.resolve_path("tiny:baichuan_omni")
    released = tmp_path / "released"
    shutil.copytree(base, released)
    (released / "chat_template.jinja").unlink()
    cfg = json.loads((released / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    (released / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "export"
    out.mkdir()
    fam.copy_processor_files(released, out)
    fam.write_processor_settings(out, None)
    tok = AutoTokenizer.from_pretrained(str(out))
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<C_Q>hi<C_A>"
