"""Baichuan-Omni-1.5's prompt format and processor: its special tokens, our chat template of the
format, and `BaichuanProcessor` (Qwen2-VL image patching as the released processor does it, each
video frame an image of its own, the audio tokenizer's log-mel features per 30 s segment). The
family and its tiny builder both read the tokens from here.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from finetune.errors import ConfigError
from finetune.families.baichuan_audio import SAMPLE_RATE, SEGMENT_SAMPLES, audio_features
from finetune.families.shared import OmniProcessor

EOT = "<|endoftext|>"
B_SYS, C_Q, C_A = "<B_SYS>", "<C_Q>", "<C_A>"
IMG_START, IMG_END, IMG_PAD = "<img_start_baichuan>", "<img_end_baichuan>", "<img_pad_baichuan>"
VIDEO_PAD, VIDEO_START, VIDEO_END = "<video_palce_baichuan>", "<video_start_baichuan>", "<video_end_baichuan>"
AUDIO_START, AUDIO_END, AUDIO_PAD = "<audio_start_baichuan>", "<audio_end_baichuan>", "<audio_pad_baichuan>"
SPECIAL_TOKENS = [EOT, B_SYS, C_Q, C_A, AUDIO_START, AUDIO_END, AUDIO_PAD, IMG_START, IMG_END, IMG_PAD,
                  VIDEO_PAD, VIDEO_START, VIDEO_END]
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

    # the released processor resizes images with Qwen2-VL's earlier rule (a side never rounded below
    # one patch) and patchifies them itself, as our video frames are: not transformers' image processor
    def image_grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of this size, without decoding it."""
        return self.frame_grid(width, height)

    def process_image(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """An image -> (pixel_values [n_patches, dim], grid_thw [3]), as the released processor gives them."""
        return self.process_frame(img)
