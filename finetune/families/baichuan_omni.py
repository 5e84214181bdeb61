"""The Baichuan-Omni-1.5 family: prompt format, processor, loading, tiny model, export.

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

import dataclasses
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.checkpoint import assemble, copy_extras
from finetune.data import media as M
from finetune.errors import ConfigError
from finetune.families.baichuan_audio import SAMPLE_RATE, SEGMENT_SAMPLES, audio_features, audio_token_count
from finetune.families.baichuan_model import BaichuanOmniConfig, BaichuanOmniForCausalLM
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family, LoadedModel, LoadSpec, quantization_config
from finetune.families.shared import OmniProcessor, atomic_build, chat_turns, smart_resize, text_and_media_chunks
from finetune.families.tiny import build_bpe_tokenizer
from finetune.paths import cache_root

EOT = "<|endoftext|>"
B_SYS, C_Q, C_A = "<B_SYS>", "<C_Q>", "<C_A>"
IMG_START, IMG_END, IMG_PAD = "<img_start_baichuan>", "<img_end_baichuan>", "<img_pad_baichuan>"
VIDEO_PAD, VIDEO_START, VIDEO_END = "<video_palce_baichuan>", "<video_start_baichuan>", "<video_end_baichuan>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<audio_start_baichuan>", "<audio_end_baichuan>", "<audio_pad_baichuan>"
ROLE_TOKENS = {"system": B_SYS, "user": C_Q, "assistant": C_A}
SPECIAL_TOKENS = [EOT, B_SYS, C_Q, C_A, AUDIO_START, AUDIO_END, AUDIO_PAD, IMG_START, IMG_END, IMG_PAD,
                  VIDEO_PAD, VIDEO_START, VIDEO_END]
TINY_VERSION = 4  # 2: torch_dtype float32 in config.json; 3: library init (vision rope buffers); 4: chat template,
# and the vision tower initialised with the model's std 0.1 (it had the library's 0.02: a faint image signal)
# Baichuan's prompt format as a chat template (ours): the tiny model carries it and exports add it, so
# `apply_chat_template` gives the prompt the model was trained on (tests/test_chat_format.py)
CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "baichuan_omni.chat_template.jinja").read_text()
CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class BaichuanProcessor(OmniProcessor):
    """Baichuan-Omni-1.5 inputs: the Qwen2-VL image patching (CLIP mean/std, 28-px factor,
    2x2 merge; each video frame as its own image with the video pixel limit) and the audio
    tokenizer's log-mel features per 30 s chunk."""

    video_max_pixels: int = 768 * 28 * 28
    #: the longest clip read whole, in samples (None: any length, as consecutive 30 s segments)
    audio_limit: int | None = None
    # a system turn in Baichuan's own format; the released tokenizer's ChatML template does not match
    # it, so it gives no default (the released inference code adds no system turn either)
    SYSTEM_TURN = (B_SYS, C_Q)

    @classmethod
    def from_folder(cls, folder: Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    video_fps: float = 1.0, video_max_frames: int = 32, system_prompt: str | None = None,
                    long_audio: str = "error"):
        from transformers import Qwen2Tokenizer

        cfg = json.loads((Path(folder) / "config.json").read_text())
        vis, vid = cfg.get("visual_config", {}), cfg.get("video_config", {})
        audio_limit = cls.read_audio_limit(folder, cfg.get("audio_config", {}))
        # the released tokenizer is Qwen2's byte-level BPE plus Baichuan's added tokens; loaded by
        # class, since AutoTokenizer would follow config.json's auto_map into remote code
        tok = Qwen2Tokenizer.from_pretrained(str(folder))
        proc = cls(
            tokenizer=tok, patch_size=int(vis.get("patch_size", 14)), merge_size=int(vis.get("merge_size", 2)),
            temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
            min_pixels=int(min_pixels or vis.get("min_pixels", 3136)),
            max_pixels=int(max_pixels or vis.get("max_pixels", 4096 * 28 * 28)),
            image_mean=tuple(vis.get("image_mean", cls.image_mean)), image_std=tuple(vis.get("image_std", cls.image_std)),
            video_fps=video_fps, video_max_frames=min(video_max_frames, int(vid.get("max_frame_num", 32))),
            system_prompt=cls.effective_system_prompt(tok, system_prompt),
            video_max_pixels=int(min(max_pixels or 10 ** 12, vid.get("max_pixels", 768 * 28 * 28))),
            long_audio=long_audio, audio_limit=audio_limit,
        )
        proc.register_special_tokens(SPECIAL_TOKENS, folder, "Baichuan-Omni-1.5")
        return proc

    @staticmethod
    def read_audio_limit(folder, audio: dict) -> int | None:
        """The longest clip the reference processor reads whole, from config.json's audio_config: it
        cuts a clip into consecutive `max_audio_seconds` segments (`split_overlap` 0, the released
        config: no limit), or truncates it there (`split_overlap` < 0). Overlapping segments (> 0) and
        another segment length are not what this toolkit's features implement: refused."""

        seconds, overlap = audio.get("max_audio_seconds", 30), float(audio.get("split_overlap", 0.0))
        if seconds * SAMPLE_RATE != SEGMENT_SAMPLES or overlap > 0:
            raise ConfigError(f"{folder}/config.json: audio_config max_audio_seconds={seconds}, split_overlap={overlap}: "
                              f"omni-finetune encodes audio as the released Baichuan-Omni-1.5 config does "
                              f"(max_audio_seconds {SEGMENT_SAMPLES // SAMPLE_RATE}, split_overlap 0 or negative)")
        return SEGMENT_SAMPLES if overlap < 0 else None

    def settings(self) -> dict:
        return {**super().settings(), "video_max_pixels": self.video_max_pixels, "format": "baichuan_omni",
                "audio_limit": self.audio_limit}

    @property
    def pad_id(self) -> int:
        return self.token_ids[EOT]

    @property
    def eos_id(self) -> int:
        return self.token_ids[EOT]

    def frame_view(self) -> "BaichuanProcessor":
        """The same processor with the video frame pixel limit (frames are separate images)."""
        return dataclasses.replace(self, max_pixels=min(self.max_pixels, self.video_max_pixels),
                                   min_pixels=self.min_pixels, token_ids=self.token_ids, _text_cache=self._text_cache)

    def process_audio_segments(self, wave: np.ndarray) -> list[torch.Tensor]:
        return audio_features(wave.astype(np.float32))


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

    def tower_shapes(self, config) -> dict:
        v, a = config.visual_config, config.audio_config
        vis = aud = None
        if v.get("enable", True):
            e = v.get("embed_dim", 1280)
            vis = (e, v.get("depth", 32), int(e * v.get("mlp_ratio", 4)), v.get("num_heads", 16), False)
        if a.get("enable", True):
            aud = (a.get("d_model", 1280), a.get("encoder_layers", 32), a.get("encoder_ffn_dim", 5120),
                   a.get("encoder_attention_heads", 20), False)
        llm = (config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.num_attention_heads, True)
        return {"llm": llm, "vision": vis, "audio": aud, "vocab": config.vocab_size,
                "patches_per_token": int(v.get("spatial_merge_size", 2)) ** 2,  # the bridge merges 2x2 patches
                "frames_per_audio_token": int(a.get("avg_pooler", 4))}  # 50 frames/s pooled to 12.5 tokens/s

    def usage(self, full_layout: bool) -> list[str]:
        return ["```python",
                "from finetune.families.baichuan_model import BaichuanOmniForCausalLM  # pip install omni-finetune",
                "model = BaichuanOmniForCausalLM.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                "```", "",
                "The folder keeps the released layout and config.json (speech-output parts included), so the "
                "reference code of Baichuan-Omni-1.5 loads it too. Prompts use the released format "
                "`<B_SYS>system<C_Q>user<C_A>`."]

    # ---- tiny --------------------------------------------------------------------------
    def materialize_tiny(self, seed: int = 0) -> Path:
        root = cache_root() / "tiny" / f"baichuan_omni-s{seed}-v{TINY_VERSION}"
        if (root / "config.json").exists():
            return root
        return atomic_build(root, lambda d: build_tiny(d, seed))

    # ---- export ------------------------------------------------------------------------
    def save_merged(self, model, loaded: LoadedModel, out_dir: Path, *, dtype: torch.dtype,
                    max_shard_size: str) -> dict:
        """The merged model in the released layout; the speech-output tensors copied unchanged."""

        out_dir = Path(out_dir)
        model = model.to(dtype)
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out_dir))
        try:
            model.save_pretrained(str(stage), safe_serialization=True, max_shard_size="1000GB")
            info = assemble(stage, loaded.base_path, out_dir, prefix="", max_shard_size=max_shard_size)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        info["copied"] = copy_extras(loaded.base_path, out_dir)  # config.json included, unchanged
        self.write_processor_settings(out_dir, loaded.processor)
        info["layout"] = "baichuan_omni (with its speech-output parts)" if info["kept_tensors"] else "baichuan_omni"
        return info

    def write_processor_settings(self, folder: Path, processor) -> None:
        """Exports carry Baichuan's prompt format as chat_template.jinja (read before the released
        tokenizer_config.json's ChatML template), unless the base folder already has one."""
        target = Path(folder) / CHAT_TEMPLATE_FILE
        if not target.exists():
            target.write_text(CHAT_TEMPLATE)

    def load_merged_for_check(self, folder: Path, dtype: torch.dtype):
        return BaichuanOmniForCausalLM.from_pretrained(str(folder), dtype=dtype)

    def save_quantized(self, merged_dir: Path, out_dir: Path, *, quantize: str, dtype: torch.dtype) -> str:
        """The merged text model quantised with bitsandbytes (the LLM's linear layers, as QLoRA
        does); the speech-output parts are not part of it (merged/ keeps them)."""

        cfg = quantization_config(quantize, dtype, self.quant_skip)
        model = BaichuanOmniForCausalLM.from_pretrained(str(merged_dir), dtype=dtype, quantization_config=cfg)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        self.copy_processor_files(merged_dir, out_dir)
        return ("bitsandbytes NF4 with double quantisation" if quantize == "4bit" else "bitsandbytes int8") + \
            f" on the LLM's linear layers, compute dtype {str(dtype).replace('torch.', '')}; text output only " \
            "(the speech-output parts stay in merged/)"

    def load_quantized_for_check(self, folder: Path):
        return BaichuanOmniForCausalLM.from_pretrained(str(folder))


def _segment_tokens(valid_frames: int) -> int:
    return ((valid_frames - 1) // 2 + 1) // 4


# ---- the tiny model ---------------------------------------------------------------------------
def tiny_config(tok) -> dict:
    """config.json of a tiny Baichuan-Omni-1.5: the released structure with small widths."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = int(math.ceil(len(tok) / 64) * 64)
    return {
        "architectures": ["OmniForCausalLM"], "model_type": "omni", "vocab_size": vocab, "hidden_size": 64,
        "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "attention_qkv_bias": True, "tie_word_embeddings": False, "initializer_range": 0.1,
        "bos_token_id": ids[EOT], "eos_token_id": ids[EOT], "pad_token_id": ids[EOT], "use_cache": True,
        "torch_dtype": "float32",
        "visual_config": {"enable": True, "depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2,
                          "hidden_act": "quick_gelu", "patch_size": 14, "merge_size": 2, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "min_pixels": 3136, "max_pixels": 12544,
                          "image_start_token_id": ids[IMG_START], "image_end_token_id": ids[IMG_END],
                          "image_pad_token_id": ids[IMG_PAD],
                          "image_mean": [0.48145466, 0.4578275, 0.40821073],
                          "image_std": [0.26862954, 0.26130258, 0.27577711]},
        "video_config": {"max_frame_num": 8, "max_pixels": 12544, "video_place_token_id": ids[VIDEO_PAD],
                         "video_start_token_id": ids[VIDEO_START], "video_end_token_id": ids[VIDEO_END]},
        "audio_config": {"enable": True, "num_mel_bins": 128, "d_model": 32, "encoder_layers": 2,
                         "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "avg_pooler": 4,
                         "max_source_positions": 1500, "audio_start_token_id": ids[AUDIO_START],
                         "audio_end_token_id": ids[AUDIO_END], "audio_pad_token_id": ids[AUDIO_PAD],
                         "vq_config": {"enable": True, "codebook_sizes": [64, 32, 32, 16, 16, 16, 16, 16]}},
    }


# tensors standing in for the speech-output parts of a released checkpoint (export copies them)
_TINY_SPEECH = {"audio_head.headnorm.weight": (64,), "audio_head.heads.0.weight": (65, 64),
                "audio_tokenizer.audio_decoder.dconv1.conv.weight": (32, 32, 3),
                "audio_tokenizer.audio_flow_matching_decoder.prenet.out_proj.weight": (80, 32)}


def build_tiny(folder: Path, seed: int = 0) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig, Qwen2Tokenizer


    tok = Qwen2Tokenizer(tokenizer_object=build_bpe_tokenizer(SPECIAL_TOKENS), eos_token=EOT, pad_token=EOT,
                         unk_token=None, chat_template=CHAT_TEMPLATE)
    cfg_dict = tiny_config(tok)
    torch.manual_seed(seed)
    model = BaichuanOmniForCausalLM(BaichuanOmniConfig(**cfg_dict)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    # the released layout: config.json as shipped, speech-output tensors in the same file
    weights = Path(folder) / "model.safetensors"
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(seed + 1)
    for k, shape in _TINY_SPEECH.items():
        state[k] = torch.randn(shape, generator=g)
    save_file(state, str(weights), metadata={"format": "pt"})
    (Path(folder) / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(str(folder))
    GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(EOT), pad_token_id=tok.convert_tokens_to_ids(EOT),
                     do_sample=False).save_pretrained(str(folder))


__all__ = ["BaichuanOmniFamily", "BaichuanProcessor", "smart_resize"]
