"""The Gemma 4 family beyond the contract suite: our processor against transformers' own (tiny and
released settings), the chat template, roles of the per-layer embeddings and the KV-shared layers,
packing on every LLM backend, generation on the training backend, video files within the media
limits, long audio and the export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from media_samples import write_video

from finetune.data.schema import parse_sample
from finetune.models import load_spec

FAMILY = "gemma4"


@pytest.fixture(scope="module")
def gemma():
    from finetune.families import get_family
    from finetune.recipe import load_recipe
    from finetune.runtime import quiet_libraries

    quiet_libraries()
    fam = get_family(FAMILY)
    loaded = fam.load(load_spec(load_recipe("medical-gemma4-tiny", ["data.system_prompt=null"]), dtype=torch.float32,
                                attn="sdpa"))
    loaded.model.eval()
    return fam, loaded


def chat(media_dir, messages):
    return parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=media_dir)


def test_generation_on_the_training_backend(gemma, media_dir):
    """Before step 1 training generates and probes with the model as it trains: its LLM on the varlen
    backend, the batch left-padded (a 2-D mask). The answers are the SDPA model's; Gemma 4's cut of the
    KV-shared layers to the last positions must not meet a mask it cannot slice."""
    from finetune import attention
    from finetune.probes import generate

    fam, loaded = gemma
    samples = [chat(media_dir, [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                             {"type": "text", "text": "Is there a lesion?"}]},
                                {"role": "assistant", "content": "Yes."}]),
               chat(media_dir, [{"role": "user", "content": "What does MRI stand for?"},
                                {"role": "assistant", "content": "Magnetic resonance imaging."}])]
    ref = generate(loaded.model, fam, loaded.processor, samples, None, max_new_tokens=3, batch_size=2)
    text_cfg = loaded.model.config.get_text_config()
    before = text_cfg._attn_implementation
    attention.apply_to_llm(loaded.model, attention.VARLEN)
    try:
        got = generate(loaded.model, fam, loaded.processor, samples, None, max_new_tokens=3, batch_size=2)
    finally:
        text_cfg._attn_implementation = before
    assert got == ref


# ---- processor parity ----------------------------------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "You are a radiology assistant."},
    {"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "audio", "path": "x.wav"},
                                 {"type": "text", "text": "Is there a lesion?"}]},
    {"role": "assistant", "content": "Yes. A lesion in the upper left."},
    {"role": "user", "content": [{"type": "text", "text": "And in this clip?"}, {"type": "video", "path": "clip"},
                                 {"type": "image", "path": "y.png"}]},
    {"role": "assistant", "content": "No."},
]

#: the released processor's settings (transformers' defaults for Gemma4Processor and its parts, which
#: the E2B/E4B processor_config.json holds): (patch, soft-token budget, pooling) of images and frames
RELEASED = {"image": (16, 280, 3), "video": (16, 70, 3), "mel_bins": 128}


def torchvision_cpu(monkeypatch):
    """transformers' Gemma 4 video processor is written on torchvision, which is not installed here:
    the four functions it calls on the CPU, as torchvision computes them there (a uint8 frame batch
    resized by torch's own antialiased kernel, normalisation as subtract-then-divide, grayscale
    expanded), stand in for it; everything else (frame stacking, patch order, positions, padding,
    timestamps, the prompt) is transformers' own. A real torchvision is used where installed."""
    import importlib
    import types

    from finetune.families import gemma3n_timm

    gemma3n_timm.ensure_timm()  # an import-only torchvision, so transformers builds the real class
    vp = importlib.import_module("transformers.models.gemma4.video_processing_gemma4")
    if not gemma3n_timm.stand_in_installed():
        return vp.Gemma4VideoProcessor
    import transformers.image_processing_backends as backends
    import transformers.video_processing_utils as video_utils

    def resize(x, size, interpolation=None, antialias=True):
        mode = getattr(interpolation, "name", None) or interpolation.__name__
        return torch.nn.functional.interpolate(x, size=list(size), mode=mode.lower(), align_corners=False,
                                               antialias=antialias)

    def normalize(x, mean, std, inplace=False):
        mean = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
        std = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
        return (x.sub_(mean) if inplace else x.sub(mean)).div_(std)

    def grayscale_to_rgb(x):
        return x if x.shape[-3] != 1 else x.expand(*x.shape[:-3], 3, *x.shape[-2:])

    tv = types.SimpleNamespace(resize=resize, normalize=normalize, grayscale_to_rgb=grayscale_to_rgb,
                               InterpolationMode=vp.tvF.InterpolationMode)
    for mod in (vp, video_utils, backends):
        monkeypatch.setattr(mod, "tvF", tv, raising=False)
    return vp.Gemma4VideoProcessor


def transformers_processor(monkeypatch, ours):
    """transformers' Gemma4Processor over its PIL image processor, its video processor, its audio
    feature extractor and the folder's tokenizer, with our processor's settings."""
    from transformers import Gemma4AudioFeatureExtractor, Gemma4Processor
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    video_cls = torchvision_cpu(monkeypatch)

    class Processor(Gemma4Processor):
        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor":  # its class mapping is built without torchvision
                return None
            return super().check_argument_for_proper_class(name, argument)

    return Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(**ours.feature_settings),
        image_processor=Gemma4ImageProcessorPil(patch_size=ours.patch_size, max_soft_tokens=ours.max_soft_tokens,
                                                pooling_kernel_size=ours.pooling_kernel_size),
        video_processor=video_cls(patch_size=ours.video_patch_size, max_soft_tokens=ours.video_max_soft_tokens,
                                  pooling_kernel_size=ours.video_pooling_kernel_size),
        tokenizer=ours.tokenizer, image_seq_length=ours.max_soft_tokens, audio_seq_length=ours.audio_seq_length)


def released_folder(tmp_path, tiny):
    """The tiny folder's tokenizer with the released processor's settings (processor_config.json)."""
    import shutil

    from finetune.families.gemma4_processor import write_processor_config

    folder = tmp_path / "released"
    shutil.copytree(tiny, folder)
    write_processor_config(folder, **RELEASED)
    return folder


@pytest.mark.parametrize("settings", ["tiny", "released"])
def test_encoding_equals_transformers_gemma4_processor(gemma, tmp_path, monkeypatch, settings):
    """A multi-turn chat with a system turn, two images, an audio clip and a video: our token ids,
    pixel values, patch positions, video frames and audio features are what transformers'
    Gemma4Processor gives for the chat template's text, with the tiny folder's settings and with the
    released processor's (larger images, resized to 280 soft tokens; frames to 70)."""
    from transformers.video_utils import VideoMetadata

    from finetune.families.gemma4_processor import read_video

    fam, loaded = gemma
    rng = np.random.default_rng(3)
    big = settings == "released"
    Image.fromarray((rng.random((1100, 1500, 3) if big else (150, 220)) * 255).astype("uint8")).save(tmp_path / "x.png")
    Image.fromarray((rng.random((90, 60, 3)) * 255).astype("uint8")).save(tmp_path / "y.png")
    sf.write(tmp_path / "x.wav", (rng.standard_normal(40_050) * 0.1).astype(np.float32), 16000)  # 2.5 s, odd length
    (tmp_path / "clip").mkdir()
    for i in range(7):
        Image.fromarray((rng.random((240, 320, 3) if big else (100, 120, 3)) * 255).astype("uint8")).save(
            tmp_path / "clip" / f"{i:02d}.png")
    folder = released_folder(tmp_path, loaded.base_path) if big else loaded.base_path
    ours = fam.processor_class.from_folder(folder, video_max_frames=4)
    assert (ours.patch_size, ours.max_soft_tokens, ours.video_max_soft_tokens) == ((16, 280, 70) if big else (8, 70, 70))
    assert ours.feature_extractor.feature_size == (128 if big else 32)
    s = chat(tmp_path, MESSAGES)
    enc = fam.encode(s, ours)
    assert fam.count_tokens(s, ours) == enc.num_tokens

    ref = transformers_processor(monkeypatch, ours)
    frames, times = read_video(s.messages[3].parts[1], ours.video_max_frames, ours.video_fps)
    assert len(frames) == 4 and times == [i / 24 for i in (0, 2, 4, 6)]  # no rate given: the processor's 24 fps
    meta = VideoMetadata(total_num_frames=7, fps=24, frames_indices=[0, 2, 4, 6])
    text = ours.tokenizer.apply_chat_template(MESSAGES, tokenize=False)
    images = [Image.open(tmp_path / n).convert("RGB") for n in ("x.png", "y.png")]
    wave = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    got = ref(text=text, images=images, audio=[wave], videos=[frames], video_metadata=[meta], do_sample_frames=False,
              return_tensors="pt", add_special_tokens=False)

    assert enc.input_ids.tolist() == got["input_ids"][0].tolist()
    for key in ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                "num_frames_per_video"):
        assert torch.equal(enc.media[key], got[key].to(enc.media[key].dtype)), key
    feats, mask = enc.media["input_features"][0], enc.media["input_features_mask"][0]
    n = feats.shape[0]
    assert torch.equal(mask, got["input_features_mask"][0][:n]) and not got["input_features_mask"][0][n:].any()
    assert torch.equal(feats, got["input_features"][0][:n].float())
    # labels: the answers and their <turn|>, nothing of the prompt
    tok = ours.tokenizer
    assert tok.decode([t for t in enc.labels.tolist() if t != -100]) == "Yes. A lesion in the upper left.<turn|>No.<turn|>"
    if not big:  # the model's placeholders are the tiny model's settings
        assert fam.check_encoded(enc, fam.read_config(loaded.base_path), planned=enc.num_tokens) == []


def test_a_video_files_frames_and_times(gemma, tmp_path, monkeypatch):
    """A video file (4 fps, 2.5 s) read at the recipe's 2 fps: the frames media.load_video picks, each
    at its time in the file (index / 4), written mm:ss before its frame, as Gemma4Processor writes them
    for the same frames and metadata."""
    from transformers.video_utils import VideoMetadata

    from finetune.data import media as M
    from finetune.families.gemma4_processor import read_video

    fam, loaded = gemma
    write_video(tmp_path / "v.mp4", seconds=2.5, fps=4, sound=False)
    part = chat(tmp_path, [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}]},
                           {"role": "assistant", "content": "Ok."}]).messages[0].parts[0]
    proc = loaded.processor
    frames, times = read_video(part, proc.video_max_frames, proc.video_fps)
    want = M.load_video(part, proc.video_max_frames, proc.video_fps)
    assert [np.asarray(f).tolist() for f in frames] == [np.asarray(f).tolist() for f in want]
    assert times == [0.0, 0.5, 1.0, 1.5, 2.0]
    s = chat(tmp_path, [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}, {"type": "text", "text": "?"}]},
                        {"role": "assistant", "content": "Ok."}])
    enc = fam.encode(s, proc)
    assert fam.count_tokens(s, proc) == enc.num_tokens
    ref = transformers_processor(monkeypatch, proc)
    meta = VideoMetadata(total_num_frames=10, fps=4, frames_indices=[0, 2, 4, 6, 8])
    text = proc.tokenizer.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]},
                                               {"role": "assistant", "content": "Ok."}], tokenize=False)
    got = ref(text=text, videos=[frames], video_metadata=[meta], do_sample_frames=False, return_tensors="pt",
              add_special_tokens=False)
    assert enc.input_ids.tolist() == got["input_ids"][0].tolist()
    assert "00:01 <|image>" in proc.tokenizer.decode(enc.input_ids)



def test_a_video_file_is_read_within_the_media_limits(tmp_path):
    """A video file's frames and times come from media's bounded reader: a frame larger than
    data.max_image_pixels, or more frames than data.max_video_frames, is refused (MediaError
    too_large) before the file is decoded; within the limits the frames are load_video's."""
    import bombs

    from finetune.data.media import MediaError, load_video
    from finetune.data.schema import Limits, Part, current_limits, set_limits
    from finetune.families.gemma4_processor import read_video

    part = Part(type="video", path=bombs.mp4(tmp_path / "clip.mp4", 5, size=16, fps=10))
    before = current_limits()
    try:
        for limits in (Limits(max_image_pixels=16 * 16 - 1), Limits(max_video_frames=4)):
            set_limits(limits)
            with pytest.raises(MediaError) as info:
                read_video(part, 3, None)
            assert info.value.kind == "too_large", info.value
    finally:
        set_limits(before)
    frames, times = read_video(part, 3, None)
    assert times == [0.0, 0.2, 0.4]
    assert [np.asarray(f).tolist() for f in frames] == [np.asarray(f).tolist() for f in load_video(part, 3, None)]

# ---- the chat template ---------------------------------------------------------------------------
def test_chat_template_renders_the_released_format(gemma):
    """The tiny folder's template writes Gemma 4's documented format: a system turn of its own,
    `<|turn>role\\n ... <turn|>\\n` turns with the assistant as "model", trimmed text, one placeholder
    per media item, a model turn's thinking dropped, and the bare `<|turn>model\\n` generation prompt
    of E2B/E4B; our encoding is that text tokenised (its media expanded: see the parity test)."""
    fam, loaded = gemma
    tok = loaded.processor.tokenizer
    msgs = [{"role": "system", "content": " You are a radiology assistant. "},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Is there a lesion? "}]},
            {"role": "assistant", "content": "<|channel>thought\nlook left<channel|>Yes."},
            {"role": "user", "content": [{"type": "audio"}, {"type": "video"}, {"type": "text", "text": "And now?"}]}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
        "<bos><|turn>system\nYou are a radiology assistant.<turn|>\n"
        "<|turn>user\n<|image|>Is there a lesion?<turn|>\n"
        "<|turn>model\nYes.<turn|>\n"
        "<|turn>user\n<|audio|><|video|>And now?<turn|>\n"
        "<|turn>model\n")
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == "<bos><|turn>user\n<|image|>Is there a lesion?<turn|>\n"

    text_only = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does CT stand for?"},
                 {"role": "assistant", "content": "Computed tomography."}]
    s = parse_sample({"messages": text_only}, source="t.jsonl", line=1, base_dir=loaded.base_path)
    proc = loaded.processor
    for gen in (False, True):
        want = tok(tok.apply_chat_template(text_only[:2] if gen else text_only, tokenize=False,
                                           add_generation_prompt=gen), add_special_tokens=False)["input_ids"]
        assert fam.encode(s, proc, for_generation=gen).input_ids.tolist() == want


# ---- roles -----------------------------------------------------------------------------------------
def test_roles_of_the_per_layer_embeddings_and_the_kv_shared_layers(gemma):
    """The per-layer token table is `embeddings` (a lookup table: frozen or full), the per-layer input
    path beside the decoder is `llm`; the KV-shared layers (no k/v projections: they read the keys of
    the last unshared layer of their kind) are `llm`, and all-linear LoRA on the llm reaches their
    q/o projections and MLPs, the per-layer projections, and nothing of the towers."""
    from finetune import adapters
    from finetune.recipe import load_recipe

    fam, loaded = gemma
    text = loaded.model.model.language_model
    cfg = text.config
    shared = [i for i, layer in enumerate(text.layers) if layer.self_attn.is_kv_shared_layer]
    assert shared == list(range(cfg.num_hidden_layers - cfg.num_kv_shared_layers, cfg.num_hidden_layers)) != []
    assert {cfg.layer_types[i] for i in shared} == {"sliding_attention", "full_attention"}
    for i in shared:
        assert not hasattr(text.layers[i].self_attn, "k_proj")
        assert fam.role_of(f"model.language_model.layers.{i}.self_attn.q_proj.weight") == "llm"
    assert fam.role_of("model.language_model.embed_tokens_per_layer.weight") == "embeddings"
    for name in ("per_layer_model_projection.weight", "per_layer_projection_norm.weight",
                 "layers.0.per_layer_input_gate.weight", "layers.0.per_layer_projection.weight"):
        assert fam.role_of("model.language_model." + name) == "llm", name
    assert fam.role_of("model.language_model.embed_tokens.weight") == "lm_head" == fam.role_of("lm_head.weight")
    assert fam.role_of("model.audio_tower.layers.0.self_attn.q_proj.linear.weight") == "audio_encoder"
    assert fam.role_of("model.vision_tower.encoder.layers.0.self_attn.q_proj.linear.weight") == "vision_encoder"

    plan = adapters.plan_roles(loaded.model, fam, load_recipe("medical-gemma4-tiny"))
    targets = plan.lora_targets["llm"]
    assert targets and all(t.startswith("model.language_model.") for t in targets)
    assert "model.language_model.per_layer_model_projection" in targets
    for i in shared:
        assert {f"model.language_model.layers.{i}.self_attn.{p}" for p in ("q_proj", "o_proj")} <= set(targets)
        assert f"model.language_model.layers.{i}.mlp.down_proj" in targets


def test_lm_head_trains_the_tied_matrix_and_lora_on_it_is_refused(gemma):
    """roles.lm_head: full trains one matrix that the output layer and the input embedding share;
    LoRA on it would change the logits' matrix but not the embedding, and the merge both: refused."""
    from finetune import adapters
    from finetune.errors import ConfigError
    from finetune.recipe import load_recipe

    fam, _ = gemma
    recipe = load_recipe("medical-gemma4-tiny")
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(ld.model, fam, recipe)
    base = model.base_model.model
    out_w = base.lm_head.modules_to_save["default"].weight
    assert out_w is base.model.language_model.embed_tokens.modules_to_save["default"].weight and out_w.requires_grad
    recipe = load_recipe("medical-gemma4-tiny", ["roles.lm_head.mode=lora"])
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    with pytest.raises(ConfigError, match="roles.lm_head.mode: full"):
        adapters.apply_roles(ld.model, fam, recipe)


# ---- packing ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_roles(gemma):
    """The tiny model with every role trained (LoRA on the LLM and both towers, the projectors, the
    per-layer table and lm_head in full), LoRA B perturbed."""
    from finetune import adapters
    from finetune.recipe import load_recipe
    from finetune.verify import perturb_lora_b

    fam, _ = gemma
    recipe = load_recipe("medical-gemma4-tiny", ["roles.vision_encoder.mode=lora", "roles.audio_encoder.mode=lora",
                                                 "roles.audio_projector.mode=full", "roles.embeddings.mode=full"])
    ld = fam.load(load_spec(recipe, dtype=torch.float32, attn="sdpa"))
    model, _ = adapters.apply_roles(ld.model, fam, recipe)
    perturb_lora_b(model, 0.05)
    return ld, model


@pytest.mark.parametrize("backend", ["eager", "sdpa", "varlen"])
def test_packed_equals_one_by_one_with_clips_and_images_of_different_sizes(gemma, trained_roles, tmp_path, backend):
    """One packed row of samples whose media differ in size, on each LLM backend: audio clips of
    1.0, 2.3 and 3.7 s (chunk boundaries at different offsets, padded to the longest in the audio
    tower's batch), images of three aspect ratios (different patch counts and 2-D grids, padded to the
    budget), a video of three frames and text: logits, loss and gradients as each sample alone."""
    from finetune.verify import compare_packed

    fam, _ = gemma
    ld, model = trained_roles
    rng = np.random.default_rng(7)
    for i, (h, w) in enumerate([(150, 220), (90, 60), (200, 200)]):
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(tmp_path / f"i{i}.png")
    for i, sec in enumerate([1.0, 2.3, 3.7]):
        sf.write(tmp_path / f"c{i}.wav", (rng.standard_normal(int(sec * 16000)) * 0.1).astype(np.float32), 16000)
    (tmp_path / "v").mkdir()
    for i in range(3):
        Image.fromarray((rng.random((80, 100, 3)) * 255).astype("uint8")).save(tmp_path / "v" / f"{i}.png")
    parts = [[{"type": "image", "path": "i0.png"}, {"type": "audio", "path": "c1.wav"}],
             [{"type": "audio", "path": "c0.wav"}, {"type": "image", "path": "i1.png"}],
             [{"type": "audio", "path": "c2.wav"}], [{"type": "image", "path": "i2.png"}, {"type": "video", "path": "v"}],
             []]
    samples = [chat(tmp_path, [{"role": "user", "content": p + [{"type": "text", "text": f"Case {i}?"}]},
                               {"role": "assistant", "content": f"Yes, case {i}."}]) for i, p in enumerate(parts)]
    ld.model.config.get_text_config()._attn_implementation = "sdpa"
    res = compare_packed(model, fam, ld.processor, samples, None, max_tokens=8192, packed_attn=backend,
                         varlen_args=backend == "varlen", towers=True)
    assert res.n_rows == 1, res.format()
    assert res.passed and res.grad_scale > 0, res.format()


def test_tiny_model_exercises_the_windows_and_chunks(gemma, media_dir):
    """The tiny model's sliding window is shorter than one image turn (the packing checks meet both
    layer kinds), an audio clip of the test data spans several conformer chunks, and an image several
    pooling windows of the 2-D grid."""
    fam, loaded = gemma
    cfg = loaded.model.config
    enc = fam.encode(chat(media_dir, [{"role": "user", "content": [{"type": "image", "path": "a.png"},
                                                                   {"type": "audio", "path": "a.wav"},
                                                                   {"type": "text", "text": "Lesion?"}]},
                                      {"role": "assistant", "content": "No."}]), loaded.processor)
    assert enc.num_tokens > cfg.text_config.sliding_window * 3
    audio_tokens = int((enc.input_ids == cfg.audio_token_id).sum())
    assert audio_tokens > 3 * cfg.audio_config.attention_chunk_size
    grid = enc.media["image_position_ids"][0]
    assert int(grid[:, 0].max()) + 1 > 4 * cfg.vision_config.pooling_kernel_size
    assert (grid == -1).all(-1).any()  # padded to the budget: the tower masks it


# ---- long audio ------------------------------------------------------------------------------------
def test_long_audio_follows_the_released_30_s_limit(gemma, tmp_path):
    """The processor reads 30 s (its feature extractor's max_length, 750 soft tokens): a clip of 70 s is
    refused by default, truncated to exactly the 750 tokens the processor gives it, or split into three
    clips of at most 30 s, each its own `<|audio>` block; the counts from the header agree."""
    import dataclasses

    from finetune.data.schema import DataError
    from finetune.families.gemma4_processor import AUDIO_TOKEN, BOA

    fam, loaded = gemma
    proc = loaded.processor
    assert fam.max_audio_samples(proc) == 480_000
    sf.write(tmp_path / "long.wav", (np.random.default_rng(0).standard_normal(70 * 16000) * 0.1).astype(np.float32),
             16000)
    s = chat(tmp_path, [{"role": "user", "content": [{"type": "audio", "path": "long.wav"}]},
                        {"role": "assistant", "content": "Ok."}])
    with pytest.raises(DataError, match="30 s"):
        fam.count_tokens(s, proc)
    import types

    from transformers import Gemma4Processor

    def processor_tokens(n):  # what Gemma4Processor inserts for a clip of n samples
        fe = types.SimpleNamespace(feature_extractor=proc.feature_extractor, audio_seq_length=750)
        return Gemma4Processor._compute_audio_num_tokens(fe, np.zeros(n), 16000)

    assert processor_tokens(480_000) == 750
    third = [70 * 16000 * i // 3 for i in range(4)]
    for mode, clips, tokens in (("truncate", 1, 750),
                                ("split", 3, sum(processor_tokens(b - a) for a, b in zip(third, third[1:])))):
        p = dataclasses.replace(proc, long_audio=mode)
        enc = fam.encode(s, p)
        assert fam.count_tokens(s, p) == enc.num_tokens
        assert int((enc.input_ids == proc.token_ids[BOA]).sum()) == clips
        assert int((enc.input_ids == proc.token_ids[AUDIO_TOKEN]).sum()) == tokens


# ---- export ----------------------------------------------------------------------------------------
FRESH = """
import sys, torch
from transformers import Gemma4ForConditionalGeneration
batch = torch.load(sys.argv[2])
model = Gemma4ForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(**batch).logits
assert not any(m == "finetune" or m.startswith("finetune.") for m in sys.modules), "the toolkit was imported"
torch.save(logits, sys.argv[3])
"""


@pytest.mark.slow
def test_export_loads_in_a_fresh_process_without_the_toolkit(gemma, trained_roles, media_dir, tmp_path):
    """The merged export of a model with every role trained (LoRA merged, full roles written back,
    the tied matrix once) loads with Gemma4ForConditionalGeneration in a new Python process that
    never imports the toolkit, and gives the adapter model's logits on an image + audio + video sample."""
    import subprocess
    import sys

    fam, _ = gemma
    ld, model = trained_roles
    s = chat(media_dir, [{"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "audio", "path": "a.wav"},
                                                      {"type": "video", "path": "vid"}, {"type": "text", "text": "?"}]},
                         {"role": "assistant", "content": "No."}])
    batch = fam.collate_padded([fam.encode(s, ld.processor)], ld.processor.pad_id)
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    import copy

    out = tmp_path / "merged"
    out.mkdir()
    fam.save_merged(copy.deepcopy(model).merge_and_unload(), ld, out, dtype=torch.float32, max_shard_size="5GB")
    torch.save(batch, tmp_path / "batch.pt")
    run = subprocess.run([sys.executable, "-c", FRESH, str(out), str(tmp_path / "batch.pt"), str(tmp_path / "logits.pt")],
                         cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "logits.pt")
    assert (got - ref).abs().max() <= 1e-4
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma4" and cfg["text_config"]["use_cache"] is True

