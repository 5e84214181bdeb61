"""Nemotron-3-Nano-Omni's prompt format and processor: its special tokens, the released image
processor's patch-grid arithmetic and `NemotronOmniProcessor` (the tokenizer, our image
preprocessing from transformers' arithmetic, the Parakeet feature extractor). The family and its
tiny builder both read the tokens from here.

Preprocessing is our own, from transformers' arithmetic (its image processor needs torchvision):
images get the released processor's patch grid (near the image's own grid, within the patch
budget, sides even), are resized by bicubic interpolation with antialiasing in float32 (what
torchvision's tensor resize runs), normalised with CLIP's mean and std and cut into channel-major
16x16 patches; audio is the Parakeet feature extractor's per-clip normalised log-mel features, any
length (the released processor pads to the longest clip and never truncates).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune.errors import ConfigError
from finetune.families.base import processor_settings
from finetune.families.shared import CachedTextRuns, special_token_ids

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<pad>"
IMAGE, IMG_START, IMG_END, VIDEO = "<image>", "<img>", "</img>", "<video>"
AUDIO, AUDIO_START, AUDIO_END = "<so_embedding>", "<so_start>", "<so_end>"
THINK, THINK_END = "<think>", "</think>"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def patch_grid(height: int, width: int, patch: int, merge: int, min_patches: int, max_patches: int) -> tuple[int, int]:
    """The (rows, columns) patch grid the released image processor resizes an image to: near the
    image's own grid, scaled into [min_patches, max_patches], both sides multiples of `merge`
    (transformers' get_patch_grid_size arithmetic)."""
    gh = round(height / patch + 0.5)  # Python's round, as transformers writes it
    gw = round(width / patch + 0.5)
    factor = min(math.sqrt(max_patches / (gh * gw)), 1.0)
    gh, gw = math.floor(factor * gh), math.floor(factor * gw)
    if max_patches > min_patches and gh * gw < min_patches:
        factor = math.sqrt(min_patches / (gh * gw))
        gh, gw = math.ceil(factor * gh), math.ceil(factor * gw)
    if gh % merge:
        if (gh + merge - gh % merge) * gw <= max_patches:
            gh += merge - gh % merge
        else:
            gh = max(merge, gh - gh % merge)
    if gw % merge:
        if gh * (gw + merge - gw % merge) <= max_patches:
            gw += merge - gw % merge
        else:
            gw = max(merge, gw - gw % merge)
    return gh, gw


def _has_audio(folder: Path) -> bool:
    """Whether a folder's config.json has the audio branch (`audio_config`, released: `sound_config`)."""
    cfg = json.loads((Path(folder) / "config.json").read_text())
    return (cfg.get("audio_config") or cfg.get("sound_config")) is not None


def audio_tokens(n_samples: int, hop: int, factor: int) -> int:
    """`<so_embedding>` tokens of a clip of `n_samples`: 1 + n // hop mel frames, then log2(factor)
    stride-2 convolutions (kernel 3, padding 1), at least 1 (the processor's estimate, which the
    model's `_get_subsampling_output_length(mask.sum() + 1)` equals)."""
    n = 1 + n_samples // hop
    for _ in range(int(math.log2(factor))):
        n = (n - 1) // 2 + 1
    return max(1, n)


@dataclass
class NemotronOmniProcessor(CachedTextRuns):
    """Tokenizer + image/audio preprocessing of a Nemotron-3-Nano-Omni folder (module docstring)."""

    TOKENS = (IM_START, IM_END, IMAGE, IMG_START, IMG_END, AUDIO, AUDIO_START, AUDIO_END)

    tokenizer: Any
    patch_size: int = 16
    merge: int = 2  # 1 / downsample_ratio
    min_patches: int = 1024
    max_patches: int = 13312
    max_model_len: int = 16384
    image_mean: tuple = OPENAI_CLIP_MEAN
    image_std: tuple = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    sampling_rate: int = 16000
    hop_length: int = 160
    subsampling: int = 8
    has_audio: bool = True  # the checkpoint has the (optional) audio branch
    feature_settings: dict = field(default_factory=dict)
    system_prompt: str | None = None
    long_audio: str = "error"  # data.long_audio (Family.clip_spans; the released processor reads any length)
    token_ids: dict = field(default_factory=dict)
    _fe: Any = None
    _runs: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    video_fps: float = 2.0, video_max_frames: int = 16, system_prompt: str | None = None,
                    long_audio: str = "error"):
        """The folder's tokenizer and preprocessing settings; the recipe's pixels (model.min_pixels,
        max_pixels) become the patch budget (pixels / 16^2). No video: this family reads images and audio."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        cfg = processor_settings(folder)
        patch = int(cfg.get("patch_size", cls.patch_size))
        fe_keys = ("feature_size", "sampling_rate", "hop_length", "n_fft", "win_length", "preemphasis", "padding_value")
        proc = cls(
            tokenizer=tok, patch_size=patch, merge=round(1 / float(cfg.get("downsample_ratio", 0.5))),
            min_patches=int(min_pixels // patch ** 2 if min_pixels else cfg.get("min_num_patches", cls.min_patches)),
            max_patches=int(max_pixels // patch ** 2 if max_pixels else cfg.get("max_num_patches", cls.max_patches)),
            max_model_len=int(cfg.get("max_model_len", cls.max_model_len)),
            image_mean=tuple(cfg.get("image_mean") or cfg.get("norm_mean") or OPENAI_CLIP_MEAN),
            image_std=tuple(cfg.get("image_std") or cfg.get("norm_std") or OPENAI_CLIP_STD),
            rescale_factor=float(cfg.get("rescale_factor", 1 / 255)),
            sampling_rate=int(cfg.get("audio_sampling_rate", cfg.get("sampling_rate", 16000))),
            hop_length=int(cfg.get("audio_hop_length", cfg.get("hop_length", 160))),
            subsampling=int(cfg.get("audio_subsampling_factor", 8)),
            has_audio=_has_audio(folder),
            feature_settings={k: cfg[k] for k in fe_keys if k in cfg},
            system_prompt=system_prompt or None,  # the template's system turn is empty without one
            long_audio=long_audio,
        )
        if proc.max_patches < proc.min_patches:
            raise ConfigError(f"model.max_pixels {max_pixels} gives fewer patches ({proc.max_patches}) than "
                              f"model.min_pixels ({proc.min_patches}); raise model.max_pixels")
        proc.token_ids.update(special_token_ids(tok, cls.TOKENS, folder, "Nemotron-3-Nano-Omni"))
        return proc

    # ---- the Processor protocol ----------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.token_ids[IM_END])

    @property
    def eos_id(self) -> int:
        return self.token_ids[IM_END]

    def settings(self) -> dict:
        return {"patch_size": self.patch_size, "merge": self.merge, "min_patches": self.min_patches,
                "max_patches": self.max_patches, "max_model_len": self.max_model_len,
                "system_prompt": self.system_prompt,
                "vocab": len(self.tokenizer), "long_audio": self.long_audio, "hop_length": self.hop_length,
                "subsampling": self.subsampling, "has_audio": self.has_audio}

    # ---- images ----------------------------------------------------------------------------
    def image_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, columns) of 16-pixel patches of an image of this size (one image per call: the
        released processor's budget for a call of n images is max((max_model_len - 4) x merge^2,
        min_patches x n) within [min_patches, max_patches])."""
        budget = max((self.max_model_len - 4) * self.merge ** 2, self.min_patches)
        budget = max(min(budget, self.max_patches) if self.max_patches else budget, self.min_patches)
        return patch_grid(height, width, self.patch_size, self.merge, self.min_patches, budget)

    def image_tokens(self, width: int, height: int) -> int:
        gh, gw = self.image_grid(width, height)
        return gh * gw // self.merge ** 2

    def process_image(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """An image -> (pixel_values [patches, 3 x 16 x 16], grid [2]) as the released processor
        gives it: float32 bicubic resize with antialiasing, CLIP normalisation (rescale folded
        into mean and std, as transformers does), channel-major patches in row-major order."""
        img = img.convert("RGB")
        gh, gw = self.image_grid(img.width, img.height)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32)
        p = self.patch_size
        if (x.shape[1], x.shape[2]) != (gh * p, gw * p):
            x = F.interpolate(x[None], size=(gh * p, gw * p), mode="bicubic", align_corners=False, antialias=True)[0]
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        x = (x - mean[:, None, None]) / std[:, None, None]
        patches = x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p)
        return patches.contiguous(), torch.tensor([gh, gw], dtype=torch.long)

    # ---- audio -----------------------------------------------------------------------------
    @property
    def feature_extractor(self):
        if self._fe is None:
            from transformers import ParakeetFeatureExtractor

            self._fe = ParakeetFeatureExtractor(**{"feature_size": 128, **self.feature_settings})
        return self._fe

    def process_audio(self, wave: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A mono clip -> (log-mel features [1 + n // hop, mels], valid-frame mask) as the released
        processor gives a clip alone (per-clip normalisation; the last frame is outside the mask)."""
        out = self.feature_extractor([wave.astype(np.float32)], sampling_rate=self.sampling_rate, return_tensors="pt")
        return out["input_features"][0].to(torch.float32), out["attention_mask"][0].to(torch.bool)

    def audio_tokens(self, n_samples: int) -> int:
        return audio_tokens(n_samples, self.hop_length, self.subsampling)
