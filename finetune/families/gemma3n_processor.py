"""Gemma 3n's prompt format and processor: its special tokens, the released preprocessing sizes,
and `Gemma3nOmniProcessor` (the tokenizer, transformers' PIL SigLIP image processor and the Gemma 3n
audio feature extractor). The family and its tiny builder both read the tokens from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.families.base import processor_settings
from finetune.families.shared import CachedTextRuns, special_token_ids

BOS, START_TURN, END_TURN = "<bos>", "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
BOA, EOA, AUDIO_TOKEN = "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>"

#: the released model's preprocessing (its preprocessor_config.json / processor_config.json)
IMAGE_SIZE, IMAGE_SEQ, AUDIO_SEQ, MAX_AUDIO_SAMPLES = 768, 256, 188, 480_000


@dataclass
class Gemma3nOmniProcessor(CachedTextRuns):
    """Tokenizer + image/audio preprocessing of a Gemma 3n checkpoint (our own, from transformers'
    parts: the PIL SigLIP image processor and the Gemma 3n audio feature extractor)."""

    TOKENS = (BOS, START_TURN, END_TURN, BOI, EOI, IMAGE_TOKEN, BOA, EOA, AUDIO_TOKEN)

    tokenizer: Any
    image_size: tuple = (IMAGE_SIZE, IMAGE_SIZE)  # (height, width)
    image_seq_length: int = IMAGE_SEQ
    audio_seq_length: int = AUDIO_SEQ
    max_audio_samples: int = MAX_AUDIO_SAMPLES
    sampling_rate: int = 16000
    feature_settings: dict = field(default_factory=dict)
    system_prompt: str | None = None
    long_audio: str = "error"  # data.long_audio (Family.clip_spans)
    token_ids: dict = field(default_factory=dict)
    _image_proc: Any = None
    _fe: Any = None
    _runs: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    video_fps: float = 2.0, video_max_frames: int = 16, system_prompt: str | None = None,
                    long_audio: str = "error"):
        """The folder's tokenizer and preprocessing settings. Gemma 3n resizes every image to one
        fixed size, so the recipe's min/max pixels and video settings do not apply."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        cfg = processor_settings(folder, keep=("size",))
        size = cfg.get("size") or {}
        fe_keys = ("feature_size", "sampling_rate", "padding_value", "frame_length", "hop_length", "fft_length",
                   "min_frequency", "max_frequency", "preemphasis", "preemphasis_htk_flavor", "fft_overdrive",
                   "dither", "input_scale_factor", "mel_floor", "per_bin_mean", "per_bin_stddev")
        proc = cls(
            tokenizer=tok,
            image_size=(int(size.get("height", IMAGE_SIZE)), int(size.get("width", IMAGE_SIZE))),
            image_seq_length=int(cfg.get("image_seq_length", IMAGE_SEQ)),
            audio_seq_length=int(cfg.get("audio_seq_length", AUDIO_SEQ)),
            max_audio_samples=int(cfg.get("max_length", MAX_AUDIO_SAMPLES)),
            sampling_rate=int(cfg.get("sampling_rate", 16000)),
            feature_settings={k: cfg[k] for k in fe_keys if k in cfg},
            system_prompt=system_prompt or None,  # the released template adds no default system turn
            long_audio=long_audio,
        )
        proc.token_ids.update(special_token_ids(tok, cls.TOKENS, folder, "Gemma 3n"))
        return proc

    # ---- the Processor protocol ----------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.token_ids[END_TURN])

    @property
    def eos_id(self) -> int:
        return self.token_ids[END_TURN]  # an answer ends with <end_of_turn> (generation_config: [<eos>, it])

    def settings(self) -> dict:
        return {"image_size": list(self.image_size), "image_seq_length": self.image_seq_length,
                "audio_seq_length": self.audio_seq_length, "max_audio_samples": self.max_audio_samples,
                "system_prompt": self.system_prompt, "vocab": len(self.tokenizer), "long_audio": self.long_audio}

    # ---- media -------------------------------------------------------------------------------
    @property
    def image_processor(self):
        if self._image_proc is None:
            from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

            h, w = self.image_size
            self._image_proc = SiglipImageProcessorPil(size={"height": h, "width": w}, resample=2, do_resize=True,
                                                       do_rescale=True, rescale_factor=1 / 255, do_normalize=False,
                                                       do_convert_rgb=True)
        return self._image_proc

    def process_image(self, img) -> torch.Tensor:
        """An image -> pixel_values [3, H, W] in [0, 1]."""
        return self.image_processor(images=[img.convert("RGB")], return_tensors="pt")["pixel_values"][0]

    @property
    def feature_extractor(self):
        if self._fe is None:
            from transformers import Gemma3nAudioFeatureExtractor

            self._fe = Gemma3nAudioFeatureExtractor(**self.feature_settings)
        return self._fe

    def process_audio(self, wave: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A mono waveform -> (log-mel features [frames, mels], valid-frame mask [frames]), as the
        released processor gives them. A clip longer than `max_audio_samples` (which that processor
        cuts there) never gets here: the family refuses, splits or truncates it first (clip_spans)."""
        out = self.feature_extractor(wave.astype(np.float32), sampling_rate=self.sampling_rate,
                                     max_length=self.max_audio_samples, truncation=True, return_tensors="np")
        feats = torch.from_numpy(out["input_features"][0].astype(np.float32))
        return feats, torch.from_numpy(np.asarray(out["input_features_mask"][0], dtype=bool))
