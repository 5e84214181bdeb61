"""The Gemma 3n family beyond the contract suite: our processor against transformers' own, the
torchvision stand-in, the tied output matrix under training, AltUp's clip and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image


from finetune.models import load_spec
from finetune.data.schema import parse_sample


@pytest.fixture(scope="module")
def gemma():
    from finetune.families import get_family
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    fam = get_family("gemma3n")
    loaded = fam.load(load_spec(load_recipe("medical-gemma3n-tiny", ["data.system_prompt=null"]), dtype=torch.float32,
                      attn="sdpa"))
    loaded.model.eval()
    return fam, loaded


MESSAGES = [
    {"role": "system", "content": "You are a radiology assistant."},
    {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "audio", "path": "a.wav"},
                                 {"type": "text", "text": "Is there a lesion?"}]},
    {"role": "assistant", "content": "Yes. A lesion in the upper left."},
    {"role": "user", "content": [{"type": "text", "text": "And here?"}, {"type": "image", "path": "b.png"}]},
    {"role": "assistant", "content": "No."},
]


def test_encoding_equals_transformers_gemma3n_processor(gemma, media_dir):
    """Token ids, pixels and audio features of a chat with images, audio and text: ours are what
    transformers' Gemma3nProcessor (PIL SigLIP images, the Gemma 3n feature extractor, the tiny
    tokenizer) gives for the chat template's text."""
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    fam, loaded = gemma
    proc = loaded.processor
    tok = proc.tokenizer
    h, w = proc.image_size
    ref = Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessorPil(size={"height": h, "width": w}, resample=2, do_normalize=False),
        tokenizer=tok, image_seq_length=proc.image_seq_length, audio_seq_length=proc.audio_seq_length)
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    images = [Image.open(media_dir / "a.png").convert("RGB"), Image.open(media_dir / "b.png").convert("RGB")]
    wave = sf.read(media_dir / "a.wav", dtype="float32")[0]
    got = ref(text=text, images=images, audio=[wave], return_tensors="pt", add_special_tokens=False)

    enc = fam.encode(parse_sample({"messages": MESSAGES}, source="t.jsonl", line=1, base_dir=media_dir), proc)
    assert enc.input_ids.tolist() == got["input_ids"][0].tolist()
    assert torch.equal(enc.media["pixel_values"], got["pixel_values"])
    feats, mask = enc.media["input_features"][0], enc.media["input_features_mask"][0]
    n = int(got["input_features_mask"][0].sum())
    assert int(mask.sum()) == n
    np.testing.assert_allclose(feats[:n].numpy(), got["input_features"][0][:n].numpy(), atol=1e-6)
    # labels: the answers and their <end_of_turn>, nothing of the prompt
    learned = tok.decode([t for t in enc.labels.tolist() if t != -100])
    assert learned == "Yes. A lesion in the upper left.<end_of_turn>No.<end_of_turn>"


def test_model_takes_the_encoding(gemma, media_dir):
    fam, loaded = gemma
    s = parse_sample({"messages": MESSAGES}, source="t.jsonl", line=1, base_dir=media_dir)
    enc = fam.encode(s, loaded.processor)
    assert fam.check_encoded(enc, fam.read_config(loaded.base_path), planned=fam.count_tokens(s, loaded.processor)) == []
    with torch.no_grad():
        out = loaded.model(**fam.collate_padded([enc], loaded.processor.pad_id))
    assert torch.isfinite(out.loss)


def test_turns_must_alternate(gemma, media_dir):
    from finetune.errors import ConfigError

    fam, loaded = gemma
    # the schema refuses two user turns in a row; an answer before any question is Gemma's own limit
    msgs = [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    with pytest.raises(ConfigError, match="alternate"):
        fam.encode(parse_sample({"messages": msgs}, source="t.jsonl", line=1, base_dir=media_dir), loaded.processor)


def test_torchvision_stand_in_serves_imports_and_refuses_use(gemma):
    import importlib.util

    from finetune.families import gemma3n_timm

    if not gemma3n_timm.stand_in_installed():
        pytest.skip("a real torchvision is installed: the stand-in is not used")
    import torchvision.transforms as T
    from torchvision.ops.misc import FrozenBatchNorm2d

    assert importlib.util.find_spec("torchvision") is not None  # what transformers checks
    with pytest.raises(RuntimeError, match="needs torchvision"):
        T.Resize(8)
    bn = FrozenBatchNorm2d(3)
    x = torch.randn(1, 3, 2, 2)
    torch.testing.assert_close(bn(x), x / (1 + 1e-5) ** 0.5)


def test_lm_head_trains_the_tied_matrix_for_both_uses(gemma):
    """roles.lm_head: full trains one matrix that the output layer and the input embedding share."""
    from finetune import adapters
    from finetune.recipe import load_recipe

    fam, _ = gemma
    recipe = load_recipe("medical-gemma3n-tiny")
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(ld.model, fam, recipe)
    base = model.base_model.model
    out_w = base.lm_head.modules_to_save["default"].weight
    in_w = base.model.language_model.embed_tokens.modules_to_save["default"].weight
    assert out_w is in_w and out_w.requires_grad


def test_export_keeps_the_base_config_and_tensors(gemma, tmp_path):
    """save_merged of the untouched model: every tensor bit-identical to the base, the tied matrix
    once, AltUp's clip (switched off for training) back to the base's value."""
    from finetune.checkpoint import raw_equal, tensors_of

    fam, loaded = gemma
    assert loaded.model.config.get_text_config().altup_coef_clip is None
    out = tmp_path / "merged"
    out.mkdir()
    written = fam.save_merged(loaded.model, loaded, out, dtype=torch.float32, max_shard_size="5GB")
    assert written.files == ["model-00001-of-00001.safetensors", "model.safetensors.index.json"]
    assert written.layout == "gemma3n" and written.kept_tensors == []  # the model holds every base tensor
    base_cfg = json.loads((loaded.base_path / "config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["text_config"]["altup_coef_clip"] == base_cfg["text_config"]["altup_coef_clip"] is not None
    assert cfg["text_config"]["use_cache"] is True
    base_t, out_t = tensors_of(loaded.base_path), tensors_of(out)
    assert base_t.keys() == out_t.keys() and "lm_head.weight" not in out_t
    assert written.trained_tensors == len(base_t)
    assert all(raw_equal(base_t[k], out_t[k]) for k in base_t)
    text = loaded.model.config.get_text_config()  # the fixture's model as loaded again
    object.__setattr__(text, "altup_coef_clip", None)
    text.use_cache = False


def test_llm_lora_and_qlora_stay_in_the_decoder(gemma):
    """all-linear LoRA on the llm targets the decoder's linears only (the audio conformer has
    q/k/v_proj too); the tied matrix is lm_head's, the per-layer embeddings are embeddings'."""
    from finetune import adapters
    from finetune.recipe import load_recipe

    fam, loaded = gemma
    plan = adapters.plan_roles(loaded.model, fam, load_recipe("medical-gemma3n-tiny"))
    targets = plan.lora_targets["llm"]
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert any(".altup." in t for t in targets) and any(".laurel." in t for t in targets)
    assert fam.role_of("model.language_model.embed_tokens.weight") == "lm_head" == fam.role_of("lm_head.weight")
    assert fam.role_of("model.language_model.embed_tokens_per_layer.weight") == "embeddings"
    assert fam.role_of("model.audio_tower.conformer.0.attention.attn.q_proj.weight") == "audio_encoder"


def test_lora_on_the_tied_lm_head_is_refused(gemma):
    """LoRA on the tied output layer would change the logits' matrix but not the input embedding,
    and the merge both: refused with what to do instead."""
    from finetune import adapters
    from finetune.errors import ConfigError
    from finetune.recipe import load_recipe

    fam, _ = gemma
    recipe = load_recipe("medical-gemma3n-tiny", ["roles.lm_head.mode=lora"])
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    with pytest.raises(ConfigError, match="roles.lm_head.mode: full"):
        adapters.apply_roles(ld.model, fam, recipe)


def test_every_trained_parameter_gets_a_gradient(gemma, media_dir):
    """The towers' trained copies (PEFT modules_to_save) are the ones that run: with the vision
    encoder, projectors and lm_head in full and LoRA on the LLM, every trainable parameter gets a
    nonzero gradient from an image + audio + text sample."""
    from finetune import adapters
    from finetune.recipe import load_recipe
    from finetune.verify import perturb_lora_b

    fam, _ = gemma
    recipe = load_recipe("medical-gemma3n-tiny", ["roles.audio_projector.mode=full", "roles.vision_encoder.mode=full",
                                                  "roles.vision_projector.mode=full"])  # the demo freezes both
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(ld.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".vision_tower." in n for n in trained) and any(".embed_vision." in n for n in trained)
    msgs = MESSAGES[:3] + [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                         {"type": "text", "text": "Again?"}]},
                           {"role": "assistant", "content": "Yes."}]
    enc = fam.encode(parse_sample({"messages": msgs}, source="t.jsonl", line=1, base_dir=media_dir), ld.processor)
    assert enc.media["pixel_values"].shape[0] == 2  # the one-image-per-call path runs
    model.train()
    model(**fam.collate_padded([enc], ld.processor.pad_id)).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not any(".vision_tower." in n for n in dead), dead[:5]
    assert not any(".embed_vision." in n or ".embed_audio." in n for n in dead), dead[:5]
    assert not dead, [d.replace("base_model.model.model.language_model.", "") for d in dead]


def test_tiny_image_embeddings_differ_from_image_to_image(gemma, tmp_path):
    """The tiny model's embedder is centred (gemma3n_tiny.centre_image_embedder): images the builder
    never saw (other seeds of the demo's generator, through our processor) reach the LLM with
    embeddings that differ from image to image by over half their size. Uncentred, a random
    MobileNetV5 left them about 9% apart and the demo learned nothing from its images."""
    from finetune.demo_data import KINDS, make_image

    fam, loaded = gemma
    rng = np.random.default_rng(12345)
    pix = []
    for i, (kind, lesion) in enumerate([(k, les) for k in KINDS for les in (False, True)] * 3):
        path = tmp_path / f"{i}.png"
        Image.fromarray(make_image(kind, lesion, rng)[0]).save(path)
        pix.append(loaded.processor.process_image(Image.open(path)))
    inner = loaded.model.model
    with torch.no_grad():
        emb = torch.cat([inner.get_image_features(p[None], return_dict=True).pooler_output for p in pix])
    spread = (emb.std(0).mean() / emb.pow(2).mean().sqrt()).item()
    assert spread > 0.5, spread


def test_tiny_sliding_window_is_shorter_than_an_image_sample(gemma, media_dir):
    """The sliding layers really clip: one image turn is longer than the tiny model's window, so
    the packing checks exercise both layer kinds."""
    fam, loaded = gemma
    window = loaded.model.config.get_text_config().sliding_window
    msgs = [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Is there a lesion?"}]},
            {"role": "assistant", "content": "No."}]
    enc = fam.encode(parse_sample({"messages": msgs}, source="t.jsonl", line=1, base_dir=media_dir), loaded.processor)
    assert enc.num_tokens > window + 8, (enc.num_tokens, window)


def test_a_frozen_vision_path_encodes_an_image_once(gemma, media_dir):
    """With the tower and embedder frozen, an image seen before is served from the cache: the
    same features to the bit, no tower call. A weight changed in place is a miss (no stale
    features), and a trainable path is never cached."""
    fam, loaded = gemma
    inner = loaded.model.model
    cache = inner._frozen_image_cache
    pix = loaded.processor.process_image(Image.open(media_dir / "a.png"))[None]
    calls = []
    hook = inner.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    path = [p for m in (inner.vision_tower, inner.embed_vision) for p in m.parameters()]
    was = [p.requires_grad for p in path]
    for p in path:
        p.requires_grad_(False)  # as the recipe's frozen roles leave them
    try:
        first = inner.get_image_features(pix, return_dict=True).pooler_output
        n = len(calls)
        again = inner.get_image_features(torch.cat([pix, pix]), return_dict=True).pooler_output
        assert len(calls) == n and cache.hits >= 2  # both served from the cache
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[0])
        w = inner.embed_vision.embedding_projection.weight
        with torch.no_grad():
            w.mul_(2.0)
        try:
            changed = inner.get_image_features(pix, return_dict=True).pooler_output
        finally:
            with torch.no_grad():
                w.div_(2.0)
        assert not torch.equal(changed, first)
        w.requires_grad_(True)
        try:
            misses = cache.misses
            inner.get_image_features(pix, return_dict=True)
            assert cache.misses == misses and len(calls) > n + 1  # not looked up: the tower ran
        finally:
            w.requires_grad_(False)
    finally:
        hook.remove()
        for p, r in zip(path, was):
            p.requires_grad_(r)


def test_the_frozen_image_cache_hits_for_pixels_on_the_device(gemma, media_dir, monkeypatch):
    """On a GPU the loader has moved the pixels to the device before the model sees them, where
    hashing them would make the host wait: the collator's digests (tower_inputs) key the cache
    instead, so a second forward of the same images runs no tower call. Pixels "on the device" are
    emulated by a path_state that refuses to hash (as it does for non-CPU pixels)."""
    from finetune.families.gemma3n import FrozenImageCache
    from finetune.packing import pack_encoded

    fam, loaded = gemma
    inner = loaded.model.model
    cache = inner._frozen_image_cache
    hashed = []
    monkeypatch.setattr(FrozenImageCache, "key", staticmethod(
        lambda x, state, args, kwargs, digest=None, _key=FrozenImageCache.key: hashed.append(digest is None)
        or _key(x, state, args, kwargs, digest)))
    original = FrozenImageCache.path_state
    monkeypatch.setattr(FrozenImageCache, "path_state",
                        lambda self, pixels, keyed=False: original(self, pixels, keyed) if keyed else None)
    path = [p for m in (inner.vision_tower, inner.embed_vision) for p in m.parameters()]
    was = [p.requires_grad for p in path]
    for p in path:
        p.requires_grad_(False)
    calls = []
    hook = inner.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        sample = parse_sample({"messages": [
            {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "Lesion?"}]},
            {"role": "assistant", "content": "Yes."}]}, source="x.jsonl", line=1, base_dir=media_dir)
        enc = fam.encode(sample, loaded.processor)
        towers = fam.tower_inputs(loaded.model)
        assert towers is not None
        batch = pack_encoded(fam, [[enc, enc]], loaded.processor.pad_id, towers=towers)
        batch.pop("labels")
        with torch.no_grad():
            first = loaded.model(**batch).logits
            n = len(calls)
            again = loaded.model(**batch).logits
        assert len(calls) == n  # the second forward's images came from the cache
        assert torch.equal(first, again)
        assert hashed and not any(hashed)  # keyed by the collator's digests, never by hashing the pixels here
    finally:
        hook.remove()
        for p, r in zip(path, was):
            p.requires_grad_(r)
