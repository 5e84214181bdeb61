"""What more than one family uses, below the family files (they import it; none imports
another): the processors of the Qwen-style omni models (Qwen2.5-Omni's and Qwen3-Omni's: the
tokenizer, transformers' PIL Qwen2-VL image processor, the Whisper feature extractor and our
video patchifier; Baichuan-Omni-1.5's extends them), the chat-turn helpers of the encoders (a
template's tokens and labels, text runs, special-token ids), and the tiny models' cache.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import fsutil
from finetune.data.schema import Message, Part
from finetune.errors import ConfigError
from finetune.families.base import IGNORE_INDEX, processor_settings
from finetune.paths import cache_root

# the special tokens of the Qwen-style chat format and media placeholders
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_BOS, VISION_EOS = "<|vision_bos|>", "<|vision_eos|>"
AUDIO_BOS, AUDIO_EOS = "<|audio_bos|>", "<|audio_eos|>"
IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_TOKEN = "<|IMAGE|>", "<|VIDEO|>", "<|AUDIO|>"
# Qwen3-Omni's names for the media markers and placeholders
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
IMAGE_PAD, VIDEO_PAD, AUDIO_PAD = "<|image_pad|>", "<|video_pad|>", "<|audio_pad|>"

#: the files a Qwen-style loader needs beside the weights; copied from the base into exports
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
    "processor_config.json", "video_preprocessor_config.json", "generation_config.json",
)


def _feat_to_tokens(n_frames: int) -> int:
    """Audio tokens the thinker's audio tower yields for `n_frames` mel frames."""
    n = (n_frames - 1) // 2 + 1
    return (n - 2) // 2 + 1


def audio_output_lengths(frames: torch.Tensor) -> torch.Tensor:
    """Rows the thinker's audio tower gives per clip of `frames` mel frames: transformers' own
    arithmetic (Qwen2_5OmniAudioEncoder), so a prompt that disagrees with it is found early."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder

    return Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths(None, frames)[1]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule: sides divisible by `factor`, area within [min, max] pixels."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds 200")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


@dataclass
class OmniProcessor:
    """Tokenizer + image/audio/video preprocessing for one Qwen2.5-Omni checkpoint (subclasses:
    the other Qwen-style omni models, with their own special tokens and defaults)."""

    #: the prompt format's special tokens by what they mark (the families' encoders use the keys)
    TOKENS = {"im_start": IM_START, "im_end": IM_END, "vision_bos": VISION_BOS, "vision_eos": VISION_EOS,
              "audio_bos": AUDIO_BOS, "audio_eos": AUDIO_EOS, "image": IMAGE_TOKEN, "video": VIDEO_TOKEN,
              "audio": AUDIO_TOKEN}
    MODEL = "Qwen2.5-Omni"

    tokenizer: Any
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)
    sampling_rate: int = 16000
    feature_size: int = 128
    hop_length: int = 160
    n_fft: int = 400
    video_fps: float = 2.0
    video_max_frames: int = 16
    #: the Whisper feature extractor's n_samples (chunk_length x rate): the released processor pads every
    #: clip to it and cuts what is longer (Qwen2.5-Omni: 300 s)
    n_samples: int = 300 * 16000
    #: a video read with its sound: position ids per second and seconds per interleaved chunk (the
    #: processor's own settings; the model's get_rope_index reads the same from its config)
    position_id_per_seconds: float = 25
    seconds_per_chunk: float = 2.0
    system_prompt: str | None = None  # the one rendered for samples without a system turn (None: none)
    long_audio: str = "error"  # data.long_audio (Family.clip_spans)
    use_audio_in_video: bool = False  # model.use_audio_in_video (a video part's own key overrides it)
    token_ids: dict = field(default_factory=dict)
    _fe: Any = None
    _image_proc: Any = None  # (settings, transformers' image processor), made on first use
    _text_cache: dict = field(default_factory=dict)

    @classmethod
    def from_folder(cls, folder: Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    video_fps: float = 2.0, video_max_frames: int = 16, system_prompt: str | None = None,
                    long_audio: str = "error", use_audio_in_video: bool = False):
        """Read the tokenizer and preprocessing settings saved in a model folder."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        cfg = processor_settings(folder)
        proc = cls(
            tokenizer=tok,
            patch_size=int(cfg.get("patch_size", cls.patch_size)),
            merge_size=int(cfg.get("merge_size", cls.merge_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", cls.temporal_patch_size)),
            min_pixels=int(min_pixels or cfg.get("min_pixels", cls.min_pixels)),
            max_pixels=int(max_pixels or cfg.get("max_pixels", cls.max_pixels)),
            image_mean=tuple(cfg.get("image_mean", cls.image_mean)),
            image_std=tuple(cfg.get("image_std", cls.image_std)),
            sampling_rate=int(cfg.get("sampling_rate", cls.sampling_rate)),
            feature_size=int(cfg.get("feature_size", cls.feature_size)),
            hop_length=int(cfg.get("hop_length", cls.hop_length)),
            n_fft=int(cfg.get("n_fft", cls.n_fft)),
            n_samples=int(cfg.get("n_samples") or int(cfg.get("chunk_length", 300)) * int(cfg.get("sampling_rate", 16000))),
            position_id_per_seconds=cfg.get("position_id_per_seconds", cls.position_id_per_seconds),
            seconds_per_chunk=float(cfg.get("seconds_per_chunk", cls.seconds_per_chunk)),
            video_fps=video_fps,
            video_max_frames=video_max_frames,
            system_prompt=cls.effective_system_prompt(tok, system_prompt),
            long_audio=long_audio,
            use_audio_in_video=use_audio_in_video,
            **cls.extra_settings(cfg),
        )
        proc.register_special_tokens(list(cls.TOKENS.values()), folder, cls.MODEL)
        return proc

    def ids(self) -> dict[str, int]:
        """TOKENS' ids by their keys."""
        return {k: self.token_ids[v] for k, v in self.TOKENS.items()}

    @classmethod
    def extra_settings(cls, cfg: dict) -> dict:
        """A subclass's own fields, read from the folder's processor configs."""
        return {}

    #: how the family's chat template opens and closes a system turn
    SYSTEM_TURN = ("<|im_start|>system\n", "<|im_end|>")

    @classmethod
    def effective_system_prompt(cls, tokenizer, given: str | None) -> str | None:
        """The system prompt training renders for samples without one: the recipe's (`""`: none),
        else what the model folder's own chat template adds at inference, so that the prompt at
        training equals the prompt the model sees when used (Qwen2.5-Omni's template adds
        "You are a helpful assistant."; Baichuan-Omni-1.5's released code adds none)."""
        if given is not None:
            return given or None
        return cls.template_system_prompt(tokenizer)

    @classmethod
    def template_system_prompt(cls, tokenizer) -> str | None:
        """The system text the tokenizer's chat template adds to a conversation that has none."""
        if not getattr(tokenizer, "chat_template", None):
            return None
        try:
            text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}], tokenize=False)
        except Exception:  # a template this format cannot render: no default to copy
            return None
        start, end = cls.SYSTEM_TURN
        if not text.startswith(start) or end not in text[len(start):]:
            return None
        return text[len(start):text.index(end, len(start))] or None

    def register_special_tokens(self, names, folder, model: str) -> None:
        """Look up the prompt format's special tokens; a tokenizer without one is the wrong folder."""
        for s in names:
            tid = self.tokenizer.convert_tokens_to_ids(s)
            if tid is None or tid == self.tokenizer.unk_token_id:
                raise ConfigError(f"{folder}: tokenizer has no special token {s}; is this a {model} folder?")
            self.token_ids[s] = int(tid)

    # ---- text ------------------------------------------------------------------------
    def text_ids(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens added), cached: prompts repeat a lot."""
        ids = self._text_cache.get(text)
        if ids is None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(self._text_cache) < 100_000:
                self._text_cache[text] = ids
        return list(ids)

    @property
    def pad_id(self) -> int:
        pid = self.tokenizer.pad_token_id
        return int(pid if pid is not None else self.token_ids[self.TOKENS["im_end"]])

    @property
    def eos_id(self) -> int:
        return self.token_ids[self.TOKENS["im_end"]]

    def settings(self) -> dict:
        """What token counts depend on besides the data (keys the length cache)."""
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "video_fps": self.video_fps,
                "video_max_frames": self.video_max_frames, "system_prompt": self.system_prompt,
                "vocab": len(self.tokenizer), "n_samples": self.n_samples, "long_audio": self.long_audio,
                "use_audio_in_video": self.use_audio_in_video,
                "position_id_per_seconds": self.position_id_per_seconds, "seconds_per_chunk": self.seconds_per_chunk}

    # ---- images: transformers' Qwen2-VL image processor -----------------------------
    @property
    def image_processor(self):
        """transformers' Qwen2-VL image processor with this processor's settings: its PIL backend
        (the default one is torchvision's, which is not installed beside a CPU torch)."""
        key = (self.patch_size, self.merge_size, self.temporal_patch_size, self.min_pixels, self.max_pixels,
               tuple(self.image_mean), tuple(self.image_std))
        if self._image_proc is None or self._image_proc[0] != key:  # a dataclasses.replace copy may change them
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self._image_proc = (key, Qwen2VLImageProcessorPil(
                patch_size=self.patch_size, merge_size=self.merge_size, temporal_patch_size=self.temporal_patch_size,
                min_pixels=self.min_pixels, max_pixels=self.max_pixels, image_mean=list(self.image_mean),
                image_std=list(self.image_std)))
        return self._image_proc[1]

    def image_grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of an image of this size, without decoding it: the image processor's
        own resize rule."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as processor_resize

        h, w = processor_resize(height, width, self.patch_size * self.merge_size, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def process_image(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """An image -> (pixel_values [n_patches, dim], grid_thw [3]), by the image processor."""
        out = self.image_processor(images=[img], return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"][0]

    # ---- video frames: our own patchifier --------------------------------------------
    # transformers' Qwen2-VL video processor runs on torchvision (not installed beside a CPU torch),
    # and its image processor repeats one image over a temporal patch instead of pairing two frames,
    # so a video's frames are resized, normalised and patchified here (as that video processor lays
    # them out). Frames keep Qwen2-VL's earlier resize rule (`smart_resize`: a side is never rounded
    # below one patch), which Baichuan-Omni-1.5's released processor also uses for its images.
    def frame_grid(self, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) patch grid of one video frame of this size, without decoding it."""
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(height, width, factor, self.min_pixels, self.max_pixels)
        return 1, h // self.patch_size, w // self.patch_size

    def _normalise(self, img) -> tuple[np.ndarray, int, int]:
        from PIL import Image

        img = img.convert("RGB")
        factor = self.patch_size * self.merge_size
        h, w = smart_resize(img.height, img.width, factor, self.min_pixels, self.max_pixels)
        if (img.width, img.height) != (w, h):
            img = img.resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return arr.transpose(2, 0, 1), h, w  # C, H, W

    def _patchify(self, frames: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int]]:
        """frames [T, C, H, W] -> flat patches [t*h*w, C*tp*p*p] in the vision tower's order."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if frames.shape[0] % tp:
            pad = tp - frames.shape[0] % tp
            frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t, c, h, w = frames.shape
        gt, gh, gw = t // tp, h // p, w // p
        x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)

    def process_frame(self, img) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame as an image of its own -> (pixel_values [n_patches, dim], grid_thw [3])."""
        arr, _, _ = self._normalise(img)
        patches, grid = self._patchify(arr[None])
        return torch.from_numpy(patches), torch.tensor(grid, dtype=torch.long)

    def process_video(self, frames: list) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Frames -> (pixel_values_videos, grid_thw, seconds per temporal grid)."""
        first, h, w = self._normalise(frames[0])
        arrs = [first]
        for f in frames[1:]:
            a, fh, fw = self._normalise(f.resize((frames[0].width, frames[0].height)))
            arrs.append(a)
        patches, grid = self._patchify(np.stack(arrs))
        return torch.from_numpy(patches), torch.tensor(grid, dtype=torch.long), self.temporal_patch_size / self.video_fps

    def video_grid(self, n_frames: int, width: int, height: int) -> tuple[int, int, int]:
        """(t, h, w) grid of a video from frame count and size, without decoding."""
        _, gh, gw = self.frame_grid(width, height)
        return math.ceil(n_frames / self.temporal_patch_size), gh, gw

    # ---- audio -----------------------------------------------------------------------
    @property
    def feature_extractor(self):
        if self._fe is None:
            from transformers import WhisperFeatureExtractor

            self._fe = WhisperFeatureExtractor(
                feature_size=self.feature_size, sampling_rate=self.sampling_rate,
                hop_length=self.hop_length, n_fft=self.n_fft,
            )
        return self._fe

    def audio_frames(self, n_samples: int) -> int:
        """Mel frames the model sees for `n_samples` samples (the feature attention mask's sum)."""
        return max(1, math.ceil(n_samples / self.hop_length))

    def process_audio(self, wave: np.ndarray) -> torch.Tensor:
        """A mono waveform -> log-mel features [n_mels, frames].

        The reference processor zero-pads every clip to `n_samples` (300 s) before the STFT and
        masks the padding; zero-padding by a few hops gives the same values for the valid frames at
        a fraction of the cost. A clip within a few hops of `n_samples` is padded to exactly it, as
        the reference is: its last frames then see the clip's own end (reflected), not zeros. A clip
        longer than `n_samples` never gets here (Family.clip_spans).
        """
        n_valid = self.audio_frames(len(wave))
        target = min((n_valid + 3) * self.hop_length, max(self.n_samples, len(wave)))
        feats = self.feature_extractor(
            wave.astype(np.float32), sampling_rate=self.sampling_rate, padding="max_length",
            max_length=target, return_attention_mask=True, return_tensors="np",
        )
        return torch.from_numpy(feats["input_features"][0][:, :n_valid].astype(np.float32))


@dataclass
class Qwen3OmniProcessor(OmniProcessor):
    """Tokenizer + image/audio/video preprocessing of a Qwen3-Omni checkpoint."""

    TOKENS = {"im_start": IM_START, "im_end": IM_END, "vision_bos": VISION_START, "vision_eos": VISION_END,
              "audio_bos": AUDIO_START, "audio_eos": AUDIO_END, "image": IMAGE_PAD, "video": VIDEO_PAD,
              "audio": AUDIO_PAD}
    MODEL = "Qwen3-Omni"
    SYSTEM_TURN = ("<|im_start|>system\n", "<|im_end|>")

    patch_size: int = 16
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    n_window: int = 50  # half an audio chunk, in mel frames (the audio tower's and the processor's)
    position_id_per_seconds: float = 13.0  # Qwen3OmniMoeProcessor's (13 audio tokens a second)

    @classmethod
    def extra_settings(cls, cfg: dict) -> dict:
        return {"n_window": int(cfg.get("n_window", cls.n_window))}

    def settings(self) -> dict:
        return {**super().settings(), "n_window": self.n_window}

    def audio_frames(self, n_samples: int) -> int:
        """Mel frames of a clip as Qwen3-Omni's processor computes them alone (its features are
        padded to the longest clip, not to 300 s as Qwen2.5-Omni's): whole hops."""
        return max(1, n_samples // self.hop_length)

    def process_audio(self, wave: np.ndarray) -> torch.Tensor:
        """A mono waveform -> log-mel features [n_mels, frames], as the processor gives a clip alone."""
        feats = self.feature_extractor(wave.astype(np.float32), sampling_rate=self.sampling_rate, padding="longest",
                                       truncation=False, return_attention_mask=True, return_tensors="np")
        n = self.audio_frames(len(wave))
        return torch.from_numpy(feats["input_features"][0][:, :n].astype(np.float32))



class CachedTextRuns:
    """For a processor with a `tokenizer` and a `_runs` dict: the ids of a run of plain text
    between special tokens and each token's start offset, tokenised once per distinct run."""

    def run(self, text: str) -> tuple[list[int], list[int]]:
        got = self._runs.get(text)
        if got is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            got = (list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]])
            if len(self._runs) < 100_000:
                self._runs[text] = got
        return got


def special_token_ids(tokenizer, tokens, folder, title: str) -> dict[str, int]:
    """The ids of a prompt format's special tokens; an error naming the folder when one is missing."""
    got = {}
    for s in tokens:
        tid = tokenizer.convert_tokens_to_ids(s)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ConfigError(f"{folder}: tokenizer has no special token {s}; is this a {title} folder?")
        got[s] = int(tid)
    return got


class TemplateTokens:
    """Token ids and labels laid out as a chat template lays them out. Pieces of plain text between
    two special tokens are tokenised as one run (as the rendered string is), each token learned when
    the piece holding its first character is; special tokens go in by id (`proc.token_ids`)."""

    def __init__(self, proc):
        self.proc = proc
        self.ids: list[int] = []
        self.labels: list[int] = []
        self._text: list[tuple[str, bool]] = []  # the pending run: (piece, learned)

    def text(self, piece: str, learn: bool = False) -> None:
        self._text.append((piece, learn))

    def special(self, token: str, learn: bool = False, n: int = 1) -> None:
        self.flush()
        tid = self.proc.token_ids[token]
        self.ids.extend([tid] * n)
        self.labels.extend([tid if learn else IGNORE_INDEX] * n)

    def flush(self) -> None:
        if not self._text:
            return
        run = "".join(t for t, _ in self._text)
        learned = np.zeros(len(run) + 1, dtype=bool)
        o = 0
        for t, learn in self._text:
            learned[o:o + len(t)] = learn
            o += len(t)
        toks, starts = self.proc.run(run)
        self.ids.extend(toks)
        self.labels.extend(t if learned[s] else IGNORE_INDEX for t, s in zip(toks, starts))
        self._text.clear()

    def done(self) -> tuple[list[int], list[int]]:
        self.flush()
        return self.ids, self.labels


def chat_turns(sample, system_prompt: str | None, for_generation: bool) -> list:
    """The messages a sample renders: the recipe's system prompt first when the sample has
    none; for generation, without the trailing assistant turn(s)."""

    messages = list(sample.messages)
    if for_generation:
        while messages and messages[-1].role == "assistant":
            messages.pop()
    if system_prompt and (not messages or messages[0].role != "system"):
        messages = [Message(role="system", parts=[Part(type="text", text=system_prompt)])] + messages
    return messages


def text_and_media_chunks(msg):
    """A message's parts with consecutive text parts joined (as the chat template renders them):
    strings for text runs, the Part itself for media."""
    text_buf = ""
    for part in msg.parts:
        if part.type == "text":
            text_buf += part.text or ""
            continue
        if text_buf:
            yield text_buf
            text_buf = ""
        yield part
    if text_buf:
        yield text_buf


def tiny_cache_dir() -> Path:
    """Where tiny models are materialised (under the toolkit's cache folder)."""
    return cache_root() / "tiny"


def materialize(name: str, build) -> Path:
    """The tiny cache's folder `name`, built by `build(folder)` on first use (`atomic_build`)."""
    root = tiny_cache_dir() / name
    if (root / "config.json").exists():
        return root
    return atomic_build(root, build)


def atomic_build(root: Path, build) -> Path:
    """Build the folder `root` once: in a temporary folder beside it, then renamed into place;
    when another process built it meanwhile, theirs (identical) is kept."""
    tmp = fsutil.new_staging_dir(root)
    try:
        build(tmp)
        fsutil.commit_dir(tmp, root, replace=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
