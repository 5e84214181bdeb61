"""Gemma 4's prompt format and processor: its special tokens, the released preprocessing settings,
and `Gemma4OmniProcessor` (the tokenizer, transformers' PIL image processor and Gemma 4 audio feature
extractor, video frames resized as its video processor does on the CPU). The family and its tiny
builder both read the tokens and settings from here.

Prompt format (the released chat template; `configs/gemma4.chat_template.jinja` renders its behaviour
for the tiny tokenizer): `<bos>[<|turn>system\\n{system}<turn|>\\n]<|turn>user\\n{content}<turn|>\\n
<|turn>model\\n{answer}<turn|>\\n`; text items are trimmed (a model turn's `<|channel>...<channel|>`
thinking is dropped), media items are one placeholder each, which `Gemma4Processor` expands: an
image to `<|image>` + n x `<|image|>` + `<image|>` (n = its soft tokens, after an aspect-preserving
resize to the budget: 280 for the released processor), an audio clip to `<|audio>` + n x
`<|audio|>` + `<audio|>` (n = its 40 ms frames), a video to `mm:ss <|image>` + n x `<|video|>` +
`<image|>` per frame, joined by spaces (70 tokens a frame at most). The text between them is
tokenised as runs, as the processor's tokenizer does. Generation starts with `<|turn>model\\n`
(E2B and E4B: no thinking channel).

Preprocessing is the released processor's: images through `Gemma4ImageProcessorPil` (PIL,
bicubic, [0, 1], patches padded to the budget with positions -1), video frames resized as its
video processor does on the CPU (a bicubic antialiased resize of the uint8 frames, torchvision's
kernel there, which is `torch.nn.functional.interpolate`; no torchvision needed), audio through
`Gemma4AudioFeatureExtractor` (log-mel, 30 s at most: a longer clip is named, or with
`data.long_audio` split into consecutive clips or truncated to its first 30 s).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.data import media as M
from finetune.families.base import processor_settings
from finetune.families.shared import CachedTextRuns, special_token_ids

BOS, START_TURN, END_TURN = "<bos>", "<|turn>", "<turn|>"
BOI, EOI, IMAGE_TOKEN = "<|image>", "<image|>", "<|image|>"
BOA, EOA, AUDIO_TOKEN = "<|audio>", "<audio|>", "<|audio|>"
VIDEO_TOKEN = "<|video|>"
CHANNEL_OPEN, CHANNEL_CLOSE = "<|channel>", "<channel|>"

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json", "generation_config.json",
)

#: the released processor's settings (transformers' Gemma4Processor and its parts, as the E2B/E4B
#: processor_config.json holds them): what a folder without a processor config gets
RELEASED = {"patch_size": 16, "max_soft_tokens": 280, "pooling_kernel_size": 3, "video_patch_size": 16,
            "video_max_soft_tokens": 70, "video_pooling_kernel_size": 3, "max_length": 480_000,
            "audio_seq_length": 750, "sampling_rate": 16_000}
#: the video processor's frame rate for frames that come without one (its `replace_video_token`)
DEFAULT_VIDEO_FPS = 24
FE_KEYS = ("feature_size", "sampling_rate", "padding_value", "frame_length_ms", "hop_length_ms", "min_frequency",
           "max_frequency", "preemphasis", "preemphasis_htk_flavor", "fft_overdrive", "dither", "input_scale_factor",
           "mel_floor", "per_bin_mean", "per_bin_stddev")


def hf(name: str):
    """A transformers class by name (imported on use: transformers is heavy)."""
    import transformers

    return getattr(transformers, name)


def target_size(height: int, width: int, patch: int, budget: int, k: int) -> tuple[int, int]:
    """The size the released processor resizes an image (or a video's frames) to: the largest
    aspect-preserving size of at most `budget` soft tokens, sides multiples of k x patch."""
    from transformers.models.gemma4.image_processing_pil_gemma4 import get_aspect_ratio_preserving_size

    return get_aspect_ratio_preserving_size(height=height, width=width, patch_size=patch,
                                            max_patches=budget * k * k, pooling_kernel_size=k)


def timestamp(seconds: float) -> str:
    """A video frame's time as the processor writes it before the frame (mm:ss)."""
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def strip_thinking(text: str) -> str:
    """A model turn's text without its `<|channel>...<channel|>` thinking, trimmed (the released
    chat template's `strip_thinking`)."""
    out = ""
    for piece in text.split(CHANNEL_CLOSE):
        out += piece.split(CHANNEL_OPEN)[0] if CHANNEL_OPEN in piece else piece
    return out.strip()


def audio_soft_tokens(n_samples: int, frame_length: int, hop_length: int, cap: int) -> int:
    """Soft tokens of a clip of `n_samples`: its complete mel frames (semicausal padding of half a
    frame), halved twice by the subsampling convolutions (kernel 3, stride 2, padding 1), at most
    `cap` (the processor's `_compute_audio_num_tokens`)."""
    frames = (n_samples + frame_length // 2 - (frame_length + 1)) // hop_length + 1
    if frames <= 0:
        return 0
    for _ in range(2):
        frames = (frames - 1) // 2 + 1
    return min(frames, cap)


def audio_rows(mask: torch.Tensor) -> int:
    """Rows the audio tower gives for one clip: the valid frames its two stride-2 convolutions keep."""
    return int(mask[::2][::2].sum())


def read_video(part, max_frames: int, fps: float | None):
    """(frames, seconds of each frame) of a video part, the frames `media.load_video` reads (within the
    media limits); a frame's time is its index in the source over the source's rate (the part's "fps"
    for frame lists and folders; 24 where none is known, as the released processor assumes)."""
    frames, indices, src = M.load_video_indexed(part, max_frames, fps)
    return frames, [i / (src or DEFAULT_VIDEO_FPS) for i in indices]


def patchify(pixels: torch.Tensor, patch: int, max_patches: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, C, H, W] in [0, 1] -> (patches [T, max_patches, p*p*C], (x, y) positions [T, max_patches, 2]),
    in the processor's order (row-major patches, each p x p x C), padded with zero patches at -1."""
    T, C, H, W = pixels.shape
    gh, gw = H // patch, W // patch
    x = pixels.reshape(T, C, gh, patch, gw, patch).permute(0, 2, 4, 3, 5, 1).reshape(T, gh * gw, -1)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([xs, ys], -1).reshape(1, gh * gw, 2).repeat(T, 1, 1)
    pad = max_patches - gh * gw
    if pad > 0:
        x = torch.nn.functional.pad(x, (0, 0, 0, pad))
        pos = torch.nn.functional.pad(pos, (0, 0, 0, pad), value=-1)
    return x, pos


@dataclass
class Gemma4OmniProcessor(CachedTextRuns):
    """Tokenizer + image/video/audio preprocessing of a Gemma 4 checkpoint (our own, from transformers'
    parts: its PIL image processor, its audio feature extractor; video frames as its video processor
    resizes them on the CPU)."""

    TOKENS = (BOS, START_TURN, END_TURN, BOI, EOI, IMAGE_TOKEN, BOA, EOA, AUDIO_TOKEN, VIDEO_TOKEN)

    tokenizer: Any
    patch_size: int = RELEASED["patch_size"]
    max_soft_tokens: int = RELEASED["max_soft_tokens"]
    pooling_kernel_size: int = RELEASED["pooling_kernel_size"]
    video_patch_size: int = RELEASED["video_patch_size"]
    video_max_soft_tokens: int = RELEASED["video_max_soft_tokens"]
    video_pooling_kernel_size: int = RELEASED["video_pooling_kernel_size"]
    video_fps: float = 2.0
    video_max_frames: int = 16
    max_audio_samples: int = RELEASED["max_length"]
    audio_seq_length: int = RELEASED["audio_seq_length"]
    sampling_rate: int = RELEASED["sampling_rate"]
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
        """The folder's tokenizer and preprocessing settings. Gemma 4 sizes images by a soft-token
        budget (the folder's image_processor.max_soft_tokens), so the recipe's min/max pixels do not
        apply; the video frame rate and count are the recipe's, as for the other families."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        cfg = processor_settings(folder, keep=("video_processor",))
        video = dict(cfg.get("video_processor") or {})
        vfile = Path(folder) / "video_preprocessor_config.json"
        if not video and vfile.exists():
            video = json.loads(vfile.read_text())
        proc = cls(
            tokenizer=tok,
            patch_size=int(cfg.get("patch_size", RELEASED["patch_size"])),
            max_soft_tokens=int(cfg.get("max_soft_tokens", RELEASED["max_soft_tokens"])),
            pooling_kernel_size=int(cfg.get("pooling_kernel_size", RELEASED["pooling_kernel_size"])),
            video_patch_size=int(video.get("patch_size", RELEASED["video_patch_size"])),
            video_max_soft_tokens=int(video.get("max_soft_tokens", RELEASED["video_max_soft_tokens"])),
            video_pooling_kernel_size=int(video.get("pooling_kernel_size", RELEASED["video_pooling_kernel_size"])),
            video_fps=video_fps, video_max_frames=video_max_frames,
            max_audio_samples=int(cfg.get("max_length", RELEASED["max_length"])),
            audio_seq_length=int(cfg.get("audio_seq_length", RELEASED["audio_seq_length"])),
            sampling_rate=int(cfg.get("sampling_rate", RELEASED["sampling_rate"])),
            feature_settings={k: cfg[k] for k in FE_KEYS if k in cfg},
            system_prompt=system_prompt or None,  # the released template adds no default system turn
            long_audio=long_audio,
        )
        proc.token_ids.update(special_token_ids(tok, cls.TOKENS, folder, "Gemma 4"))
        return proc

    # ---- the Processor protocol ----------------------------------------------------------
    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.token_ids[END_TURN])

    @property
    def eos_id(self) -> int:
        return self.token_ids[END_TURN]  # an answer ends with <turn|> (generation_config: [<eos>, it])

    def settings(self) -> dict:
        return {"image": [self.patch_size, self.max_soft_tokens, self.pooling_kernel_size],
                "video": [self.video_patch_size, self.video_max_soft_tokens, self.video_pooling_kernel_size,
                          self.video_fps, self.video_max_frames],
                "max_audio_samples": self.max_audio_samples, "audio_seq_length": self.audio_seq_length,
                "features": json.dumps(self.feature_settings, sort_keys=True, default=str),
                "system_prompt": self.system_prompt, "vocab": len(self.tokenizer), "long_audio": self.long_audio}

    # ---- images ------------------------------------------------------------------------------
    @property
    def image_processor(self):
        if self._image_proc is None:
            from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

            self._image_proc = Gemma4ImageProcessorPil(patch_size=self.patch_size, max_soft_tokens=self.max_soft_tokens,
                                                       pooling_kernel_size=self.pooling_kernel_size)
        return self._image_proc

    def image_tokens(self, width: int, height: int) -> int:
        """Soft tokens of an image of this size, without decoding it."""
        h, w = target_size(height, width, self.patch_size, self.max_soft_tokens, self.pooling_kernel_size)
        return (h // self.patch_size) * (w // self.patch_size) // self.pooling_kernel_size ** 2

    def process_image(self, img) -> tuple[torch.Tensor, torch.Tensor, int]:
        """An image -> (patches [max_patches, p*p*3], positions [max_patches, 2], soft tokens)."""
        out = self.image_processor(images=[img.convert("RGB")], return_tensors="pt")
        return (out["pixel_values"][0].float(), out["image_position_ids"][0].long(),
                int(out["num_soft_tokens_per_image"][0]))

    # ---- video -------------------------------------------------------------------------------
    def frame_tokens(self, width: int, height: int) -> int:
        """Soft tokens of each frame of a video of this size."""
        p, k = self.video_patch_size, self.video_pooling_kernel_size
        h, w = target_size(height, width, p, self.video_max_soft_tokens, k)
        return (h // p) * (w // p) // k ** 2

    def process_video(self, frames: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Frames (the first one's size for all) -> (patches [T, max_patches, p*p*3], positions
        [T, max_patches, 2], soft tokens per frame), as the released video processor gives them: the
        uint8 frames resized bicubic with antialiasing (torchvision's CPU kernel for uint8 frames),
        then divided by 255 in float32 (its fused rescale and identity normalisation)."""
        from PIL import Image

        first = frames[0].convert("RGB")
        arrs = [np.asarray(first)]
        for f in frames[1:]:
            f = f.convert("RGB")
            if f.size != first.size:
                f = f.resize(first.size, Image.Resampling.BICUBIC)
            arrs.append(np.asarray(f))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W] uint8
        p, k = self.video_patch_size, self.video_pooling_kernel_size
        h, w = target_size(x.shape[2], x.shape[3], p, self.video_max_soft_tokens, k)
        if (h, w) != tuple(x.shape[2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.to(torch.float32) / 255.0
        patches, pos = patchify(x, p, self.video_max_soft_tokens * k * k)
        return patches, pos, (h // p) * (w // p) // k ** 2

    # ---- audio -------------------------------------------------------------------------------
    @property
    def feature_extractor(self):
        if self._fe is None:
            from transformers import Gemma4AudioFeatureExtractor

            self._fe = Gemma4AudioFeatureExtractor(**self.feature_settings)
        return self._fe

    def audio_tokens(self, n_samples: int) -> int:
        """Soft tokens of a clip of `n_samples` (at most the processor's limit: clip_spans cut it)."""
        fe = self.feature_extractor
        return audio_soft_tokens(n_samples, fe.frame_length, fe.hop_length, self.audio_seq_length)

    def process_audio(self, wave: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """A mono waveform -> (log-mel features [frames, mels], valid-frame mask [frames]), as the
        released processor gives one clip (padded to a multiple of 128 samples, the frames that reach
        into the padding masked and zeroed). A clip longer than `max_audio_samples` never gets here:
        the family refuses, splits or truncates it first (clip_spans)."""
        out = self.feature_extractor([wave.astype(np.float32)], sampling_rate=self.sampling_rate,
                                     max_length=self.max_audio_samples, truncation=True, return_tensors="np")
        feats = torch.from_numpy(np.asarray(out["input_features"][0], dtype=np.float32))
        return feats, torch.from_numpy(np.asarray(out["input_features_mask"][0], dtype=bool))


def write_processor_config(folder: Path, *, image: tuple[int, int, int], video: tuple[int, int, int],
                           mel_bins: int = 128) -> None:
    """processor_config.json in the layout transformers 5 saves a Gemma4Processor in (its image and
    video processors and its feature extractor nested): (patch size, soft-token budget, pooling kernel)
    of images and of video frames, and the mel bins; every other setting the released processor's."""
    fe = hf("Gemma4AudioFeatureExtractor")(feature_size=mel_bins).to_dict()
    for key in ("mel_filters", "window"):
        fe.pop(key, None)
    common = {"do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
              "image_mean": [0.0] * 3, "image_std": [1.0] * 3, "do_convert_rgb": True}
    proc = {"processor_class": "Gemma4Processor", "image_seq_length": image[1],
            "audio_seq_length": RELEASED["audio_seq_length"], "audio_ms_per_token": 40,
            "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "patch_size": image[0],
                                "max_soft_tokens": image[1], "pooling_kernel_size": image[2], "do_normalize": False,
                                **common},
            "video_processor": {"video_processor_type": "Gemma4VideoProcessor", "patch_size": video[0],
                                "max_soft_tokens": video[1], "pooling_kernel_size": video[2], "num_frames": 32,
                                "do_sample_frames": True, "do_normalize": True, **common},
            "feature_extractor": fe}
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        proc, indent=2, sort_keys=True, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


