"""The Baichuan-Omni-1.5 family: prompt format, loading, export (the processor and the special
tokens are in `baichuan_processor`, the tiny model in `baichuan_omni_tiny`).

Prompt format of the released model (no chat template applies; roles are single tokens):

    <B_SYS>system text<C_Q>user content<C_A>answer<|endoftext|><C_Q>...<C_A>

Media inside a turn: an image is `<img_start_baichuan>` + `<img_pad_baichuan>` x (grid h*w/4) +
`<img_end_baichuan>`; a video is the same per sampled frame with `<video_palce_baichuan>` pads
(each frame is its own image, no video start/end tokens); audio is `<audio_start_baichuan>` +
`<audio_pad_baichuan>` x (12.5 per second, per 30 s chunk) + `<audio_end_baichuan>` (a clip of any
length: its consecutive 30 s segments inside one pair, as the released processor reads it). Every
assistant turn is learned together with the `<|endoftext|>` that ends it. Positions are 1-D.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from finetune.data import media as M
from finetune.errors import ConfigError
from finetune.families import baichuan_omni_tiny as tiny
from finetune.families.baichuan_audio import audio_token_count
from finetune.families.baichuan_model import BaichuanOmniConfig, BaichuanOmniForCausalLM
from finetune.families.baichuan_processor import (
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    B_SYS,
    C_A,
    C_Q,
    CHAT_TEMPLATE,
    CHAT_TEMPLATE_FILE,
    EOT,
    IMG_END,
    IMG_PAD,
    IMG_START,
    VIDEO_PAD,
    BaichuanProcessor,
)
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family, LoadedModel, LoadSpec, Stack, TowerShapes
from finetune.families.shared import chat_turns, text_and_media_chunks

ROLE_TOKENS = {"system": B_SYS, "user": C_Q, "assistant": C_A}


class BaichuanOmniFamily(Family):
    """Baichuan-Omni-1.5: LLM, vision, audio code embeddings trained; speech output kept for export."""

    name = "baichuan_omni"
    model_types = ("omni",)
    title = "Baichuan-Omni-1.5"
    mrope = False
    media_keys = {"image": "pixel_values", "video": "pixel_values_videos", "audio": "audio_features"}
    modalities = frozenset({"image", "audio", "video"})
    float_media = ("pixel_values", "pixel_values_videos")
    shipped_configs = ("baichuan_omni_1_5.json",)
    role_prefixes = {
        "llm": ("model.layers", "model.norm"),
        "embeddings": ("model.embed_tokens",),
        "lm_head": ("lm_head",),
        "vision_encoder": ("model.visual_model",),
        "vision_projector": ("model.visual_bridge_model",),
        "audio_encoder": ("audio_tokenizer",),
        "audio_projector": ("model.audio_embed_layers",),
        "audio_head": ("audio_head",),
    }
    processor_files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                       "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                       "preprocessor_config.json", CHAT_TEMPLATE_FILE)
    quant_skip = ["lm_head", "model.visual_model", "model.visual_bridge_model", "model.audio_embed_layers",
                  "audio_tokenizer"]
    processor_class = BaichuanProcessor
    folder_hint = "Point it at your local Baichuan-Omni-1.5 folder (config.json with model_type omni)."

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        kwargs["config"] = BaichuanOmniConfig.from_pretrained(str(folder))
        model, info = BaichuanOmniForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
        missing = [k for k in info.get("missing_keys", []) if not k.endswith("positional_embedding")]
        if missing:
            raise ConfigError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s) of the trained parts, e.g. "
                             f"{sorted(missing)[:3]}; is it a complete Baichuan-Omni-1.5 checkpoint?")
        return model

    def is_full(self, folder: Path) -> bool:
        return False  # the layout Baichuan's export writes back is its own (save_merged), not a thinker's

    def rope_index(self, model_or_config):
        return None  # 1-D positions: each sample counts from 0

    def max_audio_samples(self, processor: BaichuanProcessor) -> int | None:
        """None for the released config: the reference processor reads a clip of any length as
        consecutive 30 s segments under one audio start/end pair (`BaichuanProcessor.read_audio_limit`)."""
        return processor.audio_limit

    def tower_inputs(self, model_or_config):
        cfg = getattr(model_or_config, "config", model_or_config)
        try:
            from transformers.vision_utils import get_vision_cu_seqlens, get_vision_position_ids
        except ImportError:  # a release without the helpers: the tower computes them itself
            return None
        merge = int(cfg.visual_config.get("spatial_merge_size", cfg.visual_config.get("merge_size", 2)))

        def inputs(batch: dict) -> dict:
            grids = [batch[k] for k in ("image_grid_thw", "video_grid_thw") if batch.get(k) is not None]
            if not grids:
                return {}
            grid = torch.cat(grids)  # images first, then video frames: the order embed() uses
            cu = get_vision_cu_seqlens(grid)
            vi = {"position_ids": get_vision_position_ids(grid, merge), "cu_seqlens": cu,
                  "max_seqlen": int((cu[1:] - cu[:-1]).max())}
            if batch.get("image_grid_thw") is not None:
                vi["image_rows"] = int(batch["image_grid_thw"].prod(-1).sum()) // merge ** 2
            return {"vision_inputs": vi}

        return inputs

    def encoder_attention_configs(self, model) -> list:
        visual = self.submodule(model, "model.visual_model")
        return [visual.config] if visual is not None else []  # the audio tokenizer calls the kernel itself

    # ---- encoding ----------------------------------------------------------------------
    def _walk(self, sample, processor: BaichuanProcessor, *, for_generation: bool, media: dict | None):
        """Token ids and labels of a sample; with `media` None, counts from metadata only."""

        tid = processor.token_ids
        ids: list[int] = []
        labels: list[int] = []

        def emit(tokens: list[int], learn: bool):
            ids.extend(tokens)
            labels.extend(tokens if learn else [IGNORE_INDEX] * len(tokens))

        frames_proc = None  # the processor with the video pixel limit, made on the first video
        for msg in chat_turns(sample, processor.system_prompt, for_generation):
            learn = msg.role == "assistant" and msg.loss and not for_generation
            emit([tid[ROLE_TOKENS[msg.role]]], False)
            for chunk in text_and_media_chunks(msg):
                if isinstance(chunk, str):
                    emit(processor.text_ids(chunk), learn)
                elif chunk.type == "image":
                    # a NIfTI part may give several slices: each is its own image
                    grids = ([processor.image_grid(w, h) for w, h in M.image_sizes(chunk)] if media is None
                             else [processor.process_image(img) for img in M.load_images(chunk)])
                    for item in grids:
                        if media is None:
                            t, gh, gw = item
                        else:
                            pv, g = item
                            media.setdefault("pix", []).append(pv)
                            media.setdefault("grids", []).append(g)
                            t, gh, gw = (int(x) for x in g)
                        emit([tid[IMG_START]] + [tid[IMG_PAD]] * (t * gh * gw // processor.merge_size ** 2)
                             + [tid[IMG_END]], False)
                elif chunk.type == "audio":
                    # one start/end pair per clip, its 30 s segments inside; a clip past a truncating
                    # folder's limit is refused, truncated or split into clips of its own (clip_spans)
                    if media is None:
                        spans = self.clip_spans(sample, chunk, processor,
                                                M.audio_samples(chunk.path, processor.sampling_rate))
                        counts = [audio_token_count(b - a) for a, b in spans]
                    else:
                        wave = M.load_audio(chunk.path, processor.sampling_rate)
                        counts = []
                        for a, b in self.clip_spans(sample, chunk, processor, len(wave)):
                            segs = processor.process_audio_segments(wave[a:b])
                            media.setdefault("audio", []).extend(segs)
                            counts.append(sum(_segment_tokens(s.shape[1]) for s in segs))
                    for n in counts:
                        emit([tid[AUDIO_START]] + [tid[AUDIO_PAD]] * n + [tid[AUDIO_END]], False)
                elif chunk.type == "video":
                    frames = M.load_video(chunk, processor.video_max_frames, processor.video_fps)
                    frames_proc = frames_proc or processor.frame_view()
                    for f in frames:
                        if media is None:
                            t, gh, gw = frames_proc.image_grid(f.width, f.height)
                        else:
                            pv, g = frames_proc.process_image(f)
                            media.setdefault("vpix", []).append(pv)
                            media.setdefault("vgrids", []).append(g)
                            t, gh, gw = (int(x) for x in g)
                        emit([tid[IMG_START]] + [tid[VIDEO_PAD]] * (t * gh * gw // processor.merge_size ** 2)
                             + [tid[IMG_END]], False)
            if msg.role == "assistant":  # every answer ends with <|endoftext|>, in a prompt's history too
                emit([tid[EOT]], learn)
        if for_generation:
            emit([tid[C_A]], False)
        return ids, labels

    def encode(self, sample, processor: BaichuanProcessor, *, for_generation: bool = False,
               rope=None) -> EncodedSample:
        raw: dict = {}
        ids, labels = self._walk(sample, processor, for_generation=for_generation, media=raw)
        media: dict[str, Any] = {}
        if raw.get("pix"):
            media["pixel_values"] = torch.cat(raw["pix"])
            media["image_grid_thw"] = torch.stack(raw["grids"])
        if raw.get("vpix"):
            media["pixel_values_videos"] = torch.cat(raw["vpix"])
            media["video_grid_thw"] = torch.stack(raw["vgrids"])
        if raw.get("audio"):
            media["audio_features"] = raw["audio"]
        input_ids = torch.tensor(ids, dtype=torch.long)
        lab = torch.tensor(labels, dtype=torch.long)
        if lab.numel():
            lab[0] = IGNORE_INDEX
        return EncodedSample(input_ids=input_ids, labels=lab, position_ids=torch.arange(len(ids)), media=media,
                             sample_id=sample.id or "", where=getattr(sample, "where", ""))

    def count_tokens(self, sample, processor: BaichuanProcessor) -> int:
        ids, _ = self._walk(sample, processor, for_generation=False, media=None)
        return len(ids)

    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            parts = [e.media for e in batch if key in e.media]
            if parts:
                out[key] = torch.cat([m[key] for m in parts])
                out[grid] = torch.cat([m[grid] for m in parts])
        feats = [f for e in batch for f in e.media.get("audio_features", [])]
        if feats:
            out["audio_features"] = feats
        return out

    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        vis, vid, aud = (config.get(k, {}) for k in ("visual_config", "video_config", "audio_config"))
        merge = int(vis.get("spatial_merge_size", vis.get("merge_size", 2))) ** 2
        out = []
        if "image_grid_thw" in enc.media:
            out.append(("image", int(vis["image_pad_token_id"]), int(enc.media["image_grid_thw"].prod(-1).sum()) // merge))
        if "video_grid_thw" in enc.media:
            out.append(("video", int(vid["video_place_token_id"]),
                        int(enc.media["video_grid_thw"].prod(-1).sum()) // merge))
        if "audio_features" in enc.media:
            # the audio tokenizer's arithmetic: encoder frames (valid - 1)//2 + 1, pooled by avg_pooler
            pool = int(aud.get("avg_pooler", 4))
            rows = sum(((f.shape[1] - 1) // 2 + 1) // pool for f in enc.media["audio_features"])
            out.append(("audio", int(aud["audio_pad_token_id"]), rows))
        return out

    def collate_padded(self, batch: list[EncodedSample], pad_id: int, side: str = "right") -> dict[str, Any]:
        out = super().collate_padded(batch, pad_id, side)
        if side == "right":  # left padding (generation): transformers derives positions from the mask
            B, L = out["input_ids"].shape
            out["position_ids"] = torch.arange(L).expand(B, L).clone()
        return out

    def meta_model(self, config_path: Path):
        cfg = BaichuanOmniConfig.from_pretrained(str(config_path))
        with torch.device("meta"):
            return BaichuanOmniForCausalLM._from_config(cfg, dtype=torch.bfloat16), cfg

    def random_checkpoint(self, config_path: Path, folder: Path, dtype: torch.dtype,
                          llm_layers: int | None = None) -> None:
        super().random_checkpoint(config_path, folder, dtype, llm_layers)
        cfg = json.loads(Path(config_path).read_text())  # the released layout's config, as loaded
        if llm_layers:
            cfg["num_hidden_layers"] = llm_layers
        (Path(folder) / "config.json").write_text(json.dumps(cfg, indent=2))

    def tower_shapes(self, config) -> TowerShapes:
        v, a = config.visual_config, config.audio_config
        vis = aud = None
        if v.get("enable", True):
            e = v.get("embed_dim", 1280)
            vis = Stack(e, v.get("depth", 32), int(e * v.get("mlp_ratio", 4)), v.get("num_heads", 16), False)
        if a.get("enable", True):
            aud = Stack(a.get("d_model", 1280), a.get("encoder_layers", 32), a.get("encoder_ffn_dim", 5120),
                        a.get("encoder_attention_heads", 20), False)
        llm = Stack(config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
                    True)
        return TowerShapes(llm=llm, vision=vis, audio=aud, vocab=config.vocab_size,
                           patches_per_token=int(v.get("spatial_merge_size", 2)) ** 2,  # the bridge merges 2x2 patches
                           frames_per_audio_token=int(a.get("avg_pooler", 4)))  # 50 frames/s pooled to 12.5 tokens/s

    def usage(self, full_layout: bool) -> list[str]:
        return ["```python",
                "from finetune.families.baichuan_model import BaichuanOmniForCausalLM  # pip install omni-finetune",
                "model = BaichuanOmniForCausalLM.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                "```", "",
                "The folder keeps the released layout and config.json (speech-output parts included), so the "
                "reference code of Baichuan-Omni-1.5 loads it too. Prompts use the released format "
                "`<B_SYS>system<C_Q>user<C_A>`."]

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_tiny}

    # ---- export ------------------------------------------------------------------------
    # The export keeps the released layout: the base's config.json and files as they are, the
    # speech-output tensors copied unchanged, the merged model's tensors under their own names.
    generation_config_from_merged = False  # the released folder's files only
    quantized_note = "; text output only (the speech-output parts stay in merged/)"

    def merged_config_from_stage(self, loaded: LoadedModel) -> bool:
        return False

    def merged_layout(self, full: bool, kept: list[str]) -> str:
        return "baichuan_omni (with its speech-output parts)" if kept else "baichuan_omni"

    def write_processor_settings(self, folder: Path, processor) -> None:
        """Exports carry Baichuan's prompt format as chat_template.jinja (read before the released
        tokenizer_config.json's ChatML template), unless the base folder already has one."""
        target = Path(folder) / CHAT_TEMPLATE_FILE
        if not target.exists():
            target.write_text(CHAT_TEMPLATE)

    def export_class(self) -> type:
        return BaichuanOmniForCausalLM


def _segment_tokens(valid_frames: int) -> int:
    return ((valid_frames - 1) // 2 + 1) // 4


__all__ = ["BaichuanOmniFamily", "BaichuanProcessor", "AUDIO_START", "AUDIO_END", "AUDIO_PAD"]
