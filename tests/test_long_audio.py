"""No silent audio cuts (issue 26, part 1).

A clip longer than what the family's released processor reads is named at its line
(`data.long_audio: error`, the default), split into consecutive clips or truncated when the recipe
asks; what training encodes at, just past and well past each family's limit is what transformers'
processor gives at inference (Qwen2.5-Omni: Whisper features cut at 300 s; Qwen3-Omni: no cut;
Gemma 3n: 30 s; Baichuan-Omni-1.5: its reference's consecutive 30 s segments, no limit). A video's
own sound is read with `use_audio_in_video` where the processor has it (the Qwen omni models), in the
layout and at the positions transformers' processor and get_rope_index give.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from media_samples import MIXES, sample, write_video

from finetune.models import load_spec
from finetune.data.schema import DataError, parse_sample
from finetune.families import get_family

SR = 16000
QWEN_LIMIT = 300 * SR  # WhisperFeatureExtractor's n_samples in the released Qwen omni preprocessor configs
GEMMA_LIMIT = 30 * SR  # Gemma3nAudioFeatureExtractor.__call__'s max_length (480000)


def write_clip(path, n: int, seed: int = 0):
    """A float WAV of n samples of noise at 16 kHz (float subtype: what is written is what is read)."""
    rng = np.random.default_rng(seed)
    sf.write(path, (rng.standard_normal(n) * 0.1).astype(np.float32), SR, subtype="FLOAT")
    return path


def audio_sample(folder, *names, text="Listen.", line=1):
    parts = [{"type": "audio", "path": n} for n in names] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": parts}, {"role": "assistant", "content": "Yes."}]
    return parse_sample({"messages": messages}, source=str(folder / "d.jsonl"), line=line, base_dir=folder), messages


def processor(name: str, **settings):
    fam = get_family(name)
    folder = fam.resolve_path(f"tiny:{name}")
    return fam, folder, fam.processor_class.from_folder(folder, **settings)


def qwen_reference(fam, ours, folder, video=None):
    """transformers' own Qwen2.5-Omni / Qwen3-Omni processor over its PIL image processor, the
    folder's Whisper feature extractor and the tiny tokenizer; its video processor needs torchvision,
    so `video` stands in for it (our frames and grid: the layout around them is transformers')."""
    import transformers
    from transformers import WhisperFeatureExtractor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(patch_size=ours.patch_size, merge_size=ours.merge_size,
                                      temporal_patch_size=ours.temporal_patch_size, min_pixels=ours.min_pixels,
                                      max_pixels=ours.max_pixels, image_mean=list(ours.image_mean),
                                      image_std=list(ours.image_std))

    class Reference(getattr(transformers, fam.hf_processor)):
        def check_argument_for_proper_class(self, name, argument):
            if name == "video_processor":
                return None
            return super().check_argument_for_proper_class(name, argument)

    return Reference(image_processor=images, video_processor=video,
                     feature_extractor=WhisperFeatureExtractor.from_pretrained(str(folder)),
                     tokenizer=ours.tokenizer, chat_template=ours.tokenizer.chat_template)


@functools.lru_cache(maxsize=None)
def plain_thinker(name: str):
    """transformers' own thinker of the tiny folder, as transformers loads it (none of our hooks)."""
    import transformers

    fam = get_family(name)
    return getattr(transformers, fam.hf_thinker).from_pretrained(str(fam.resolve_path(f"tiny:{name}")),
                                                                 dtype=torch.float32).eval()


def gemma_reference(ours):
    from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    h, w = ours.image_size
    return Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=SiglipImageProcessorPil(size={"height": h, "width": w}, resample=2, do_normalize=False),
        tokenizer=ours.tokenizer, image_seq_length=ours.image_seq_length, audio_seq_length=ours.audio_seq_length)


def released_gemma(**settings):
    """The tiny Gemma 3n processor with the released model's audio limit (30 s; the tiny folder's is 4 s)."""
    fam, folder, proc = processor("gemma3n", **settings)
    return fam, folder, dataclasses.replace(proc, max_audio_samples=GEMMA_LIMIT)


# ---- Gemma 3n -------------------------------------------------------------------------------------
def test_gemma3n_45s_clip_is_named_not_cut(tmp_path):
    """A 45 s clip for Gemma 3n (whose processor reads 30 s) is a located error in `data check`
    and before step 1, naming the clip's duration, the limit and the fix; a 29 s clip beside it
    is fine. Before: both came out at the same 188 tokens, and the check said ok."""
    from finetune.data.check import check_dataset
    from finetune.data.prepare import prepare

    fam, folder, proc = released_gemma()
    write_clip(tmp_path / "short.wav", 29 * SR)
    write_clip(tmp_path / "long.wav", 45 * SR, seed=1)
    lines = [audio_sample(tmp_path, n)[1] for n in ("short.wav", "long.wav")]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
    report = check_dataset([data], family=fam, processor=proc, config=fam.read_config(folder))
    assert [e.kind for e in report.errors] == ["long_audio"]
    err = report.errors[0]
    assert (err.file, err.line, err.field) == (str(data), 2, "messages[0].content[0].path")
    text = str(err)
    assert text.startswith(f"{data}:2: ")
    assert "45.0 s" in text and "30 s" in text and "Gemma 3n" in text
    assert "data.long_audio: split" in text and "truncate" in text  # the fix
    assert report.n_ok == 1

    samples = [audio_sample(tmp_path, n, line=i + 1)[0] for i, n in enumerate(("short.wav", "long.wav"))]
    good, _, errors = prepare(samples, fam, proc, fam.read_config(folder), None, max_tokens=None)
    assert [s.line for s in good] == [1] and [str(e) for e in errors] == [text]
    with pytest.raises(DataError, match="45.0 s"):  # nothing encodes it silently cut either
        fam.encode(samples[1], proc)


@pytest.mark.parametrize("n", [GEMMA_LIMIT, GEMMA_LIMIT + 1, 45 * SR])
def test_gemma3n_encodes_what_its_processor_gives_at_the_limit(tmp_path, n):
    """At the 30 s limit, one sample past it and well past it: truncate gives transformers'
    Gemma3nProcessor's own features (it cuts at 30 s); split gives its features for the
    consecutive clips given as separate audio items (each its own <start_of_audio> block)."""
    write_clip(tmp_path / "x.wav", n)
    wave = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    fam, folder, _ = released_gemma()
    for mode in ("truncate", "split"):
        _, _, proc = released_gemma(long_audio=mode)
        s, messages = audio_sample(tmp_path, "x.wav")
        enc = fam.encode(s, proc)
        assert fam.count_tokens(s, proc) == enc.num_tokens
        if mode == "truncate" or n <= GEMMA_LIMIT:
            pieces = [wave]
        else:
            k = -(-n // GEMMA_LIMIT)
            bounds = [n * i // k for i in range(k + 1)]
            pieces = [wave[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
            assert all(len(p) <= GEMMA_LIMIT for p in pieces) and sum(map(len, pieces)) == n
            messages[0]["content"] = [{"type": "audio", "path": "x.wav"}] * len(pieces) + messages[0]["content"][1:]
        ref_proc = gemma_reference(proc)
        text = proc.tokenizer.apply_chat_template(messages, tokenize=False)
        ref = ref_proc(text=text, audio=pieces, return_tensors="pt", add_special_tokens=False)
        assert enc.input_ids.tolist() == ref["input_ids"][0].tolist(), mode
        assert len(enc.media["input_features"]) == len(pieces)
        # each clip's features as the processor's feature extractor gives that clip alone (in one call
        # with others it pads a clip to the longest, and its mask then takes in a frame of padding)
        for piece, feats, mask in zip(pieces, enc.media["input_features"], enc.media["input_features_mask"]):
            alone = ref_proc.feature_extractor(piece, return_tensors="pt")
            valid = int(alone["input_features_mask"][0].sum())
            assert int(mask.sum()) == valid, mode
            np.testing.assert_allclose(feats[:valid].numpy(), alone["input_features"][0][:valid].numpy(), atol=1e-6)


# ---- Qwen2.5-Omni and Qwen3-Omni -----------------------------------------------------------------
def qwen_encode_and_reference(name, tmp_path, n, **settings):
    write_clip(tmp_path / "x.wav", n)
    wave = sf.read(tmp_path / "x.wav", dtype="float32")[0]
    fam, folder, proc = processor(name, **settings)
    s, messages = audio_sample(tmp_path, "x.wav")
    return fam, folder, proc, s, messages, wave


def assert_equal_to_reference(fam, folder, proc, enc, messages, pieces):
    ref_proc = qwen_reference(fam, proc, folder)
    text = proc.tokenizer.apply_chat_template(messages, tokenize=False)
    ref = ref_proc(text=[text], audio=pieces, return_tensors="pt")
    assert enc.input_ids.tolist() == ref["input_ids"][0].tolist()
    lengths = ref["feature_attention_mask"].sum(-1)
    assert enc.media["audio_feature_lengths"].tolist() == lengths.tolist()
    for i, f in enumerate(enc.media["input_features"]):
        np.testing.assert_allclose(f.numpy(), ref["input_features"][i][:, : int(lengths[i])].numpy(), atol=1e-5)
    return ref


@pytest.mark.parametrize("n", [QWEN_LIMIT, QWEN_LIMIT + 1, 310 * SR])
def test_qwen25_omni_encodes_what_its_processor_gives_at_300s(tmp_path, n):
    """Qwen2.5-Omni's processor pads every clip to 300 s and cuts what is longer. At 300 s the
    clip is read whole and encoded as the processor encodes it (its last frames see the clip's own
    end, not padding); one sample past it and at 310 s the default refuses the clip at its line,
    and `truncate` encodes exactly the processor's 300 s (7,500 audio tokens, not 7,750)."""
    fam, folder, proc, s, messages, wave = qwen_encode_and_reference("qwen2_5_omni", tmp_path, n)
    assert fam.max_audio_samples(proc) == QWEN_LIMIT
    if n <= QWEN_LIMIT:
        enc = fam.encode(s, proc)
        assert_equal_to_reference(fam, folder, proc, enc, messages, [wave])
        return
    with pytest.raises(DataError, match=r"longer than the 300 s"):
        fam.count_tokens(s, proc)
    with pytest.raises(DataError, match=r"longer than the 300 s"):
        fam.encode(s, proc)
    _, _, proc = processor("qwen2_5_omni", long_audio="truncate")
    enc = fam.encode(s, proc, rope=fam.rope_index(fam.thinker_config(folder)))
    assert fam.count_tokens(s, proc) == enc.num_tokens
    ref = assert_equal_to_reference(fam, folder, proc, enc, messages, [wave])
    assert int((enc.input_ids == proc.ids()["audio"]).sum()) == 7500
    assert fam.check_encoded(enc, fam.read_config(folder), planned=enc.num_tokens) == []
    # positions: transformers' get_rope_index on the processor's output
    pos, _ = plain_thinker("qwen2_5_omni").get_rope_index(ref["input_ids"], None, None, torch.ones_like(ref["input_ids"]),
                                                          False, ref["feature_attention_mask"].sum(-1), None)
    assert torch.equal(enc.position_ids, pos[:, 0])


def test_qwen25_omni_split_gives_consecutive_clips_as_the_processor_reads_them(tmp_path):
    """`split`: a 310 s clip becomes two consecutive clips of 155 s, each its own
    <|audio_bos|>...<|audio_eos|> item, as the processor encodes two clips given in turn."""
    fam, folder, proc, s, messages, wave = qwen_encode_and_reference("qwen2_5_omni", tmp_path, 310 * SR,
                                                                    long_audio="split")
    enc = fam.encode(s, proc, rope=fam.rope_index(fam.thinker_config(folder)))
    assert fam.count_tokens(s, proc) == enc.num_tokens
    messages[0]["content"] = [messages[0]["content"][0]] * 2 + messages[0]["content"][1:]
    half = 155 * SR
    assert_equal_to_reference(fam, folder, proc, enc, messages, [wave[:half], wave[half:]])
    assert fam.check_encoded(enc, fam.read_config(folder), planned=enc.num_tokens) == []


@pytest.mark.parametrize("n", [QWEN_LIMIT, QWEN_LIMIT + 1, 400 * SR])
def test_qwen3_omni_reads_long_clips_whole_as_its_processor_does(tmp_path, n):
    """Qwen3-Omni's processor pads to the longest clip and never truncates (`truncation: False`):
    there is no limit, and past 300 s the clip is encoded whole, as the processor does."""
    fam, folder, proc, s, messages, wave = qwen_encode_and_reference("qwen3_omni_moe", tmp_path, n)
    assert fam.max_audio_samples(proc) is None
    enc = fam.encode(s, proc)
    assert fam.count_tokens(s, proc) == enc.num_tokens
    assert_equal_to_reference(fam, folder, proc, enc, messages, [wave])


# ---- Baichuan-Omni-1.5 -------------------------------------------------------------------------------
def reference_segments(n: int, max_seconds: int = 30, n_fft: int = 400, hop: int = 160) -> list[tuple[int, int]]:
    """Baichuan-Omni-1.5's processor_omni.py, as its released config (max_audio_seconds 30,
    split_overlap 0) runs it: consecutive 30 s pieces, a piece shorter than one FFT window
    dropped, and a piece whose bridge length (encoder frames // 4) is 0 skipped; each kept piece
    gives (valid mel frames, bridge tokens)."""
    limit = max_seconds * SR
    pieces = [(s, min(s + limit, n)) for s in range(0, n, limit)] if n > limit else [(0, n)]
    out = []
    for a, b in pieces:
        if b - a < n_fft:
            continue
        frames = min(limit // hop, (b - a) // hop + 1)
        enc = (frames + 2 - 3) // 1 + 1
        enc = (enc + 2 - 3) // 2 + 1
        if enc // 4 > 0:
            out.append((frames, enc // 4))
    return out


@pytest.mark.parametrize("n", [30 * SR, 30 * SR + 1, 30 * SR + 2000, 75 * SR])
def test_baichuan_reads_long_clips_as_consecutive_30s_segments(tmp_path, n):
    """Baichuan-Omni-1.5's released processor has no limit: a clip past 30 s is read whole as
    consecutive 30 s segments under one audio start/end pair. The default (`error`) lets it through,
    and the segments' frames and tokens are the reference's."""
    fam, folder, proc = processor("baichuan_omni")
    assert fam.max_audio_samples(proc) is None
    write_clip(tmp_path / "x.wav", n)
    s, _ = audio_sample(tmp_path, "x.wav")
    enc = fam.encode(s, proc)
    ref = reference_segments(n)
    assert [f.shape[1] for f in enc.media["audio_features"]] == [frames for frames, _ in ref]
    ids = proc.token_ids
    from finetune.families.baichuan_omni import AUDIO_END, AUDIO_PAD, AUDIO_START

    assert int((enc.input_ids == ids[AUDIO_PAD]).sum()) == sum(t for _, t in ref)
    assert int((enc.input_ids == ids[AUDIO_START]).sum()) == int((enc.input_ids == ids[AUDIO_END]).sum()) == 1
    assert fam.count_tokens(s, proc) == enc.num_tokens


def test_baichuan_folder_that_truncates_has_the_limit(tmp_path):
    """A Baichuan folder whose audio_config says `split_overlap < 0` truncates at max_audio_seconds
    in the reference code: that is then its limit (named by default); an overlap > 0, which we do
    not implement, is refused when the processor is made."""
    import shutil

    from finetune.errors import ConfigError

    fam = get_family("baichuan_omni")
    folder = tmp_path / "bc"
    shutil.copytree(fam.resolve_path("tiny:baichuan_omni"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["audio_config"].update(max_audio_seconds=30, split_overlap=-1)
    (folder / "config.json").write_text(json.dumps(cfg))
    proc = fam.processor_class.from_folder(folder)
    assert fam.max_audio_samples(proc) == 30 * SR
    write_clip(tmp_path / "x.wav", 31 * SR)
    s, _ = audio_sample(tmp_path, "x.wav")
    with pytest.raises(DataError, match="31.0 s"):
        fam.count_tokens(s, proc)
    truncating = fam.processor_class.from_folder(folder, long_audio="truncate")
    enc = fam.encode(s, truncating)
    assert [f.shape[1] for f in enc.media["audio_features"]] == [frames for frames, _ in reference_segments(30 * SR)]
    cfg["audio_config"].update(split_overlap=1.0)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="split_overlap"):
        fam.processor_class.from_folder(folder)


# ---- the recipe ------------------------------------------------------------------------------------
def test_recipe_fields_reach_the_processor_and_bad_values_are_refused():
    from finetune.errors import ConfigError
    from finetune.models import processor_settings
    from finetune.recipe import RecipeError, load_recipe

    r = load_recipe("medical-tiny", ["data.long_audio=split", "model.use_audio_in_video=true"])
    fam = get_family("qwen2_5_omni")
    proc = fam.processor(fam.resolve_path(r.model.path), processor_settings(r))
    assert (proc.long_audio, proc.use_audio_in_video) == ("split", True)
    assert proc.settings()["long_audio"] == "split" and proc.settings()["use_audio_in_video"] is True
    assert load_recipe("medical-tiny").data.long_audio == "error"
    with pytest.raises(RecipeError, match="long_audio"):
        load_recipe("medical-tiny", ["data.long_audio=cut"])
    bc = get_family("baichuan_omni")  # its processor has no use_audio_in_video: asking for it is an error
    with pytest.raises(ConfigError, match="use_audio_in_video"):
        bc.processor(bc.resolve_path("tiny:baichuan_omni"), processor_settings(load_recipe(
            "medical-baichuan-tiny", ["model.use_audio_in_video=true"])))


# ---- a video's own sound ---------------------------------------------------------------------------
def test_a_video_files_sound_track_is_read(tmp_path):
    from finetune.data.media import load_video_audio, video_has_audio

    write_video(tmp_path / "v.mp4", seconds=3.0)
    write_video(tmp_path / "mute.mp4", seconds=1.0, sound=False)
    wave = load_video_audio(tmp_path / "v.mp4", SR)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 3 * SR) <= 2048  # AAC frames of 1024 samples
    peak = np.argmax(np.abs(np.fft.rfft(wave))) * SR / len(wave)
    assert abs(peak - 440) < 2
    assert np.abs(wave).max() == pytest.approx(0.5, abs=0.05)
    assert load_video_audio(tmp_path / "mute.mp4", SR) is None
    assert video_has_audio(tmp_path / "v.mp4") and not video_has_audio(tmp_path / "mute.mp4")
    half = load_video_audio(tmp_path / "v.mp4", 8000)  # resampled as audio files are
    assert abs(len(half) - len(wave) // 2) <= 1


def test_a_video_files_sound_is_bounded_like_an_audio_file(tmp_path):
    """data.max_audio_seconds bounds a video's sound track too: decoding stops at the cap with a
    located error naming it, instead of decoding all of it into memory."""
    from finetune.data.media import MediaError, load_video_audio
    from finetune.data.schema import Limits, current_limits, set_limits

    write_video(tmp_path / "v.mp4", seconds=3.0)
    before = current_limits()
    set_limits(Limits(max_audio_seconds=1.0))
    try:
        with pytest.raises(MediaError, match="data.max_audio_seconds=1") as e:
            load_video_audio(tmp_path / "v.mp4", SR)
        assert e.value.kind == "too_large"
    finally:
        set_limits(before)


class _VideoStandIn:
    """transformers' video processor needs torchvision: our frames and grid stand in for its output;
    everything around them (audio, interleaving, tokens) is transformers' processor's own."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, ours, frames):
        self.ours, self.frames = ours, frames
        self.temporal_patch_size, self.merge_size = ours.temporal_patch_size, ours.merge_size

    def __call__(self, videos, **kwargs):
        from transformers.feature_extraction_utils import BatchFeature

        pv, grid, _ = self.ours.process_video(self.frames)
        return BatchFeature({"pixel_values_videos": pv, "video_grid_thw": grid[None]})


@pytest.mark.parametrize("name", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_video_with_sound_is_read_with_use_audio_in_video(tmp_path, name):
    """A 3 s video with a tone, read with use_audio_in_video: our token layout is what the family's
    transformers processor gives with load_audio_from_video (the audio tokens interleaved with the
    video's by time: 2 s chunks for Qwen2.5-Omni, token by token for Qwen3-Omni, inside
    <vision_bos><audio_bos>...<audio_eos><vision_eos>), and our positions are the model's
    get_rope_index with use_audio_in_video=True on that output. The features are the sound's."""
    from finetune.data import media as M
    from finetune.data.schema import Part

    write_video(tmp_path / "v.mp4", seconds=3.0)
    fam, folder, proc = processor(name, use_audio_in_video=True)
    assert fam.audio_in_video
    messages = [{"role": "user", "content": [{"type": "video", "path": "v.mp4"},
                                             {"type": "text", "text": "What do you hear?"}]},
                {"role": "assistant", "content": "A tone."}]
    s = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)
    config = fam.thinker_config(folder)
    enc = fam.encode(s, proc, rope=fam.rope_index(config))
    assert fam.count_tokens(s, proc) == enc.num_tokens
    assert fam.check_encoded(enc, fam.read_config(folder), planned=enc.num_tokens) == []

    frames = M.load_video(Part(type="video", path=tmp_path / "v.mp4"), proc.video_max_frames, proc.video_fps)
    wave = M.load_video_audio(tmp_path / "v.mp4", proc.sampling_rate)
    ref_proc = qwen_reference(fam, proc, folder, video=_VideoStandIn(proc, frames))
    text = proc.tokenizer.apply_chat_template(messages, tokenize=False)
    ref = ref_proc(text=[text], videos=[np.stack([np.asarray(f) for f in frames])], audio=[wave],
                   audio_from_video_indices=[0], load_audio_from_video=True, videos_kwargs={"fps": proc.video_fps},
                   return_tensors="pt")
    assert enc.input_ids.tolist() == ref["input_ids"][0].tolist()
    ids = proc.ids()
    audio_at = (enc.input_ids == ids["audio"]).nonzero().flatten()
    video_at = (enc.input_ids == ids["video"]).nonzero().flatten()
    assert len(audio_at) and len(video_at) and audio_at.min() < video_at.max()  # interleaved, not appended
    n = int(ref["feature_attention_mask"].sum())
    assert enc.media["audio_feature_lengths"].tolist() == [n]
    np.testing.assert_allclose(enc.media["input_features"][0].numpy(), ref["input_features"][0][:, :n].numpy(),
                               atol=1e-5)
    pos, _ = plain_thinker(name).get_rope_index(ref["input_ids"], None, ref["video_grid_thw"],
                                                torch.ones_like(ref["input_ids"]), True,
                                                ref["feature_attention_mask"].sum(-1),
                                                torch.as_tensor(ref["video_second_per_grid"], dtype=torch.float32))
    assert torch.equal(enc.position_ids.to(pos.dtype), pos[:, 0])

    # without the setting (or with the part's own "use_audio_in_video": false) the sound is not read
    plain = fam.encode(s, processor(name)[2])
    assert "input_features" not in plain.media
    messages[0]["content"][0]["use_audio_in_video"] = False
    off = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)
    assert fam.encode(off, proc).input_ids.tolist() == plain.input_ids.tolist()
    messages[0]["content"][0]["use_audio_in_video"] = True
    on = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)
    assert fam.encode(on, processor(name)[2]).input_ids.tolist() == enc.input_ids.tolist()


def test_a_silent_video_is_read_as_a_plain_video(tmp_path):
    """use_audio_in_video on a video without a sound track: its frames only, as transformers' processor
    skips silent videos."""
    write_video(tmp_path / "mute.mp4", seconds=2.0, sound=False)
    fam, _, proc = processor("qwen2_5_omni", use_audio_in_video=True)
    messages = [{"role": "user", "content": [{"type": "video", "path": "mute.mp4"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "Nothing."}]
    s = parse_sample({"messages": messages}, source="t.jsonl", line=1, base_dir=tmp_path)
    enc = fam.encode(s, proc)
    assert "input_features" not in enc.media
    assert enc.input_ids.tolist() == fam.encode(s, processor("qwen2_5_omni")[2]).input_ids.tolist()


def test_data_check_says_once_that_a_familys_processor_ignores_video_sound(tmp_path):
    """Baichuan-Omni-1.5 reads no sound from a video: its videos are trained on their frames (as
    before), and `data check` says so once for the dataset, not per sample. A Qwen omni recipe without
    use_audio_in_video is told the sound is not read and how to read it."""
    from finetune.data.check import check_dataset

    write_video(tmp_path / "v.mp4", seconds=1.0)
    messages = [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}, {"type": "text", "text": "?"}]},
                {"role": "assistant", "content": "A tone."}]
    data = tmp_path / "d.jsonl"
    data.write_text((json.dumps({"messages": messages}) + "\n") * 3)
    for name, says in (("baichuan_omni", "reads no sound"), ("qwen2_5_omni", "model.use_audio_in_video: true")):
        fam, folder, proc = processor(name)
        report = check_dataset([data], family=fam, processor=proc, config=fam.read_config(folder))
        assert report.errors == [] and report.n_ok == 3
        notes = [line for line in report.format().splitlines() if "sound" in line]
        assert len(notes) == 1 and says in notes[0] and "3 video" in notes[0], notes
    fam, folder, proc = processor("qwen2_5_omni", use_audio_in_video=True)
    report = check_dataset([data], family=fam, processor=proc, config=fam.read_config(folder))
    assert report.errors == [] and not [line for line in report.format().splitlines() if "sound" in line]


def test_truncations_are_counted_in_data_check_and_before_step_1(tmp_path, capsys):
    from finetune.data.check import check_dataset
    from finetune.data.prepare import prepare

    fam, folder, proc = processor("gemma3n", long_audio="truncate")  # the tiny folder's 4 s limit
    limit = fam.max_audio_samples(proc)
    assert limit == 4 * SR
    write_clip(tmp_path / "long.wav", limit + SR)
    write_clip(tmp_path / "short.wav", limit // 2)
    lines = [audio_sample(tmp_path, *names)[1] for names in (("long.wav", "long.wav"), ("short.wav",))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in lines))
    report = check_dataset([data], family=fam, processor=proc, config=fam.read_config(folder))
    assert report.errors == []
    notes = [line for line in report.format().splitlines() if "truncated" in line]
    assert len(notes) == 1 and "2 audio clip" in notes[0] and "4 s" in notes[0], notes

    samples = [audio_sample(tmp_path, *names, line=i + 1)[0] for i, names in
               enumerate((("long.wav", "long.wav"), ("short.wav",)))]
    stats: dict = {}
    record = tmp_path / "prepared" / "r.json"
    good, _, errors = prepare(samples, fam, proc, fam.read_config(folder), None, max_tokens=None, record=record,
                              stats=stats)
    assert len(good) == 2 and errors == [] and stats["truncated_audio"] == 2
    assert "2 audio clip(s)" in capsys.readouterr().out
    stats = {}
    prepare(samples, fam, proc, fam.read_config(folder), None, max_tokens=None, record=record, stats=stats)
    assert stats["remembered"] == 2 and stats["truncated_audio"] == 2  # remembered samples still count


@pytest.mark.parametrize("name", ["qwen2_5_omni", "qwen3_omni_moe"])
def test_the_models_own_positions_are_per_sample_in_a_batch_mixing_video_sound(media_dir, name):
    """transformers' get_rope_index takes use_audio_in_video for a whole batch, so a left-padded
    generation batch holding a video read with its sound and a video read without gives one of them
    wrong positions either way. The model as the family loads it decides per sample: every row's
    positions are the sample's own (those training packs), whatever it is batched with."""
    from finetune.recipe import load_recipe

    fam = get_family(name)
    loaded = fam.load(load_spec(load_recipe("medical-tiny", [f"model.path=tiny:{name}", "model.max_pixels=12544"]),
                      dtype=torch.float32, attn="sdpa"))
    rope = fam.rope_index(loaded.model)
    encs = [fam.encode(sample(media_dir, MIXES[m]), loaded.processor, for_generation=True, rope=rope)
            for m in ("audio", "video_sound", "video", "text", "all")]
    batch = fam.collate_padded(encs, loaded.processor.pad_id, side="left")
    args = (batch["input_ids"], batch.get("image_grid_thw"), batch["video_grid_thw"], batch["attention_mask"])
    rest = (batch["feature_attention_mask"].sum(-1), batch["video_second_per_grid"])

    def rows(pos):
        return [pos[:, i, batch["attention_mask"][i] == 1] for i in range(len(encs))]

    inner = loaded.model.model
    for flag in (False, True):  # the flag a caller passes no longer matters
        got = rows(inner.get_rope_index(*args, flag, *rest)[0])
        assert all(torch.equal(g.to(e.position_ids.dtype), e.position_ids) for g, e in zip(got, encs)), flag
        assert torch.equal(loaded.model.get_rope_index(*args, flag, *rest)[0], inner.get_rope_index(*args, flag, *rest)[0])
    for flag in (False, True):  # transformers' own: one kind of video gets wrong positions
        own = rows(type(inner).get_rope_index(inner, *args, flag, *rest)[0])
        assert not all(torch.equal(g.to(e.position_ids.dtype), e.position_ids) for g, e in zip(own, encs)), flag


def test_a_sample_mixing_videos_with_and_without_their_sound_is_named(tmp_path):
    """transformers' positions take use_audio_in_video for a whole sample: a sample with one video read
    with its sound and one without (silent, or its part says false) is an error at its line, from the
    metadata count and the encoding alike, not positions wrong for one of them."""
    write_video(tmp_path / "v.mp4", seconds=1.0)
    write_video(tmp_path / "mute.mp4", seconds=1.0, sound=False)
    fam, _, proc = processor("qwen2_5_omni", use_audio_in_video=True)
    for second in ({"type": "video", "path": "mute.mp4"}, {"type": "video", "path": "v.mp4", "use_audio_in_video": False}):
        messages = [{"role": "user", "content": [{"type": "video", "path": "v.mp4"}, second]},
                    {"role": "assistant", "content": "Two."}]
        s = parse_sample({"messages": messages}, source="d.jsonl", line=7, base_dir=tmp_path)
        for fn in (fam.count_tokens, fam.encode):
            with pytest.raises(DataError, match="1 of its 2 videos are read with their sound") as err:
                fn(s, proc)
            assert (err.value.kind, err.value.line) == ("audio_in_video", 7)
    messages[0]["content"][1]["use_audio_in_video"] = "yes"
    s = parse_sample({"messages": messages}, source="d.jsonl", line=8, base_dir=tmp_path)
    with pytest.raises(DataError, match="not true or false"):
        fam.count_tokens(s, proc)
