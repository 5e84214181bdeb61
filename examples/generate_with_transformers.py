"""Answer chat samples with an exported model using transformers alone (no omni-finetune import).

    python examples/generate_with_transformers.py MODEL_DIR DATA.jsonl [--max-new-tokens N] [--out preds.jsonl]

MODEL_DIR is what `make export` wrote (`runs/<recipe>/merged`) of a model transformers has a class
for: a Qwen2.5-Omni or Qwen3-Omni thinker or full checkpoint, Gemma 3n, Gemma 4
(Gemma4ForConditionalGeneration) or Nemotron-3-Nano-Omni (NemotronH_Omni_Reasoning_V3).
(Baichuan-Omni-1.5's classes live in its own repository, not in transformers: answer it with
`python -m finetune chat`.) DATA.jsonl holds chat samples in the toolkit's format (messages whose
content is text or a list of text/image/audio/video parts with paths relative to the file; a
video is a file, a folder of frames or a list of frame files). Each sample's conversation up to
its last answer is rendered with the model's own chat template, its media prepared as the
toolkit prepares them, answered greedily, and scored by exact match against the sample's
`answer` (else the first sentence of its last assistant turn), normalised as the toolkit's eval
does. Prints the accuracy; `--out` writes one JSON line per sample.

Inputs are built from transformers' own parts: Qwen's from its image processor, feature extractor
and tokenizer (`QwenInputs`), Gemma 3n's with Gemma3nProcessor, Gemma 4's from its PIL image
processor, audio feature extractor and tokenizer (`Gemma4Inputs`), Nemotron-3-Nano-Omni's from its
tokenizer and Parakeet feature extractor with its image arithmetic written out (`NemotronInputs`).
Video frames are picked as the toolkit picks them (the recipe's model.video_fps and
video_max_frames, from the export's recipe.yaml: `read_video`), decoded with PyAV.

Qwen's video frames are resized, normalised and cut into patches (temporal_patch_size frames each)
here with PIL and numpy, by the toolkit's rule (`QwenInputs.video`: transformers' Qwen video
processors need torchvision), with video_second_per_grid (temporal_patch_size / video_fps) for the
rope's time axis.

What is answered: text, images and audio for every family above; video for Qwen2.5-Omni, Qwen3-Omni
and Gemma 4. Samples with video are skipped and counted, with the reason, for the others:
- Qwen2.5-Omni and Qwen3-Omni: only a video file read with its own sound (a part's
  "use_audio_in_video", else the recipe's model.use_audio_in_video, and a file with a sound track):
  the sound's tokens interleaved with the video's by time are not built here;
- Gemma 3n: it takes no video;
- Nemotron-3-Nano-Omni: the toolkit answers no video for it (its family reads images and audio), so
  there is no eval answer to match, and transformers' video processor for it needs torchvision.
A Nemotron-3-Nano-Omni sample with several audio clips is run by transformers as one padded batch
of clips, where the toolkit runs the audio tower clip by clip: its answer may differ from eval's.

Gemma 3n's vision tower is a timm model, and timm imports torchvision: where torchvision is not
installed (the toolkit's CPU setup) this script imports the toolkit's stand-in for it,
`finetune.families.gemma3n_timm`, as the export's model card says (with the modules that import loads);
nothing else of the toolkit.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image


QWEN = {"qwen2_5_omni": ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration"),
        "qwen3_omni_moe": ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")}


#: config.json model_type -> family, for the families that are not Qwen
OTHERS = {"gemma3n": "gemma3n", "gemma4": "gemma4", "nemotron_h_omni": "nemotron_omni"}


def family_of(config: dict) -> str:
    """qwen2_5_omni, qwen3_omni_moe, gemma3n, gemma4 or nemotron_omni, from config.json's model_type."""
    model_type = config.get("model_type", "")
    for name in QWEN:
        if model_type in (name, f"{name}_thinker"):
            return name
    if model_type in OTHERS:
        return OTHERS[model_type]
    sys.exit(f"model_type {model_type!r}: transformers has no class for it that this script knows (it answers "
             f"Qwen2.5-Omni, Qwen3-Omni, Gemma 3n, Gemma 4 and Nemotron-3-Nano-Omni exports; use "
             f"`python -m finetune chat MODEL_DIR` for others)")


def load_model(folder: str):
    import transformers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    family = family_of(cfg)
    if family == "gemma3n":
        _timm_for_gemma3n()
        return transformers.Gemma3nForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    if family == "gemma4":
        return transformers.Gemma4ForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    if family == "nemotron_omni":
        return transformers.NemotronH_Omni_Reasoning_V3.from_pretrained(folder, dtype="auto").eval()
    full, thinker = (getattr(transformers, name) for name in QWEN[family])
    if cfg["model_type"] == family:  # full checkpoint: answer with its thinker
        return full.from_pretrained(folder, dtype="auto").thinker.eval()
    return thinker.from_pretrained(folder, dtype="auto").eval()


def _timm_for_gemma3n() -> None:
    """Gemma 3n's vision tower needs timm, which imports torchvision: without torchvision, the
    toolkit's stand-in (the one toolkit module this script may import, as the model card says)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        before = set(sys.modules)
        from finetune.families.gemma3n_timm import ensure_timm

        ensure_timm()
        STAND_IN.update(m for m in set(sys.modules) - before if _is_toolkit(m))


#: the toolkit modules that importing the torchvision stand-in brought in (its package's own imports)
STAND_IN: set[str] = set()


def _is_toolkit(module: str) -> bool:
    return module == "finetune" or module.startswith("finetune.")


class QwenInputs:
    """Qwen2.5-Omni's and Qwen3-Omni's input rules from transformers' own parts: the PIL image
    processor, the Whisper feature extractor and the tokenizer with the model's chat template, and
    video frames patched here (`video`). (transformers' Qwen2_5OmniProcessor and
    Qwen3OmniMoeProcessor cannot be built without torchvision, which their video processors need.)
    Each image/video/audio placeholder becomes as many tokens as the encoder yields: grid
    t*h*w / merge^2 for an image or a video; for audio,
    Qwen2.5-Omni's ((frames-1)//2+1-2)//2+1 of features padded to 30 s, Qwen3-Omni's own count
    (transformers' _get_feat_extract_output_lengths) of features padded to the longest clip."""

    def __init__(self, folder: str, config: dict):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, WhisperFeatureExtractor

        self.family = family_of(config)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.images = Qwen2VLImageProcessorPil.from_pretrained(folder)
        self.audio = WhisperFeatureExtractor.from_pretrained(folder)
        self.sampling_rate = self.audio.sampling_rate
        self.template = self.tokenizer.chat_template
        if (Path(folder) / "chat_template.json").exists():
            self.template = json.loads((Path(folder) / "chat_template.json").read_text())["chat_template"]
        th = config.get("thinker_config", config)
        ids = self.tokenizer.convert_ids_to_tokens
        # Qwen2.5-Omni's config names them *_token_index, Qwen3-Omni's *_token_id
        self.image_token = ids(th.get("image_token_index", th.get("image_token_id")))
        self.audio_token = ids(th.get("audio_token_index", th.get("audio_token_id")))
        self.n_window = int(th.get("audio_config", {}).get("n_window", 50))
        self.eos = [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        self.video_token = ids(th.get("video_token_index", th.get("video_token_id")))
        self.fps = float(recipe_setting(folder, "model", "video_fps", 2.0))
        self.with_sound = bool(recipe_setting(folder, "model", "use_audio_in_video", False))

    #: samples with video are answered (but for a video read with its sound: `skips_video`)
    no_video = None

    def skips_video(self, parts: list, root: Path) -> str | None:
        """Why a sample's videos are not answered here, or None: a video file read with its own sound
        (the part's "use_audio_in_video", else the recipe's model.use_audio_in_video) is not built."""
        for part in parts:
            path = root / part["path"] if part.get("path") else None
            if part.get("use_audio_in_video", self.with_sound) and path is not None and path.is_file():
                import av

                with av.open(str(path)) as container:
                    if container.streams.audio:
                        return ("a Qwen video read with its sound (use_audio_in_video) is not built here: its "
                                "sound's tokens interleave with the video's by time")
        return None

    def video(self, frames: list) -> tuple[torch.Tensor, list[int]]:
        """A video's frames -> (pixel_values_videos [t*h*w, 3*tp*p*p], grid [t, h, w]) as the toolkit
        makes them: every frame resized to the first one's size (PIL's default filter), then to the
        resize rule's size (bicubic), scaled to [0, 1] and normalised in float32; the last frame
        repeated to fill the last temporal patch; patches laid out as the vision tower reads them."""
        ip = self.images
        p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        mean = np.asarray(ip.image_mean, np.float32)
        std = np.asarray(ip.image_std, np.float32)
        w0, h0 = frames[0].width, frames[0].height
        h, w = _qwen_frame_size(h0, w0, p * m, ip.size["shortest_edge"], ip.size["longest_edge"])
        arrs = []
        for i, frame in enumerate(frames):
            if i:
                frame = frame.resize((w0, h0))
            frame = frame.convert("RGB")
            if (frame.width, frame.height) != (w, h):
                frame = frame.resize((w, h), Image.BICUBIC)
            a = np.asarray(frame, dtype=np.float32) / 255.0
            arrs.append(((a - mean) / std).transpose(2, 0, 1))
        x = np.stack(arrs)
        if len(x) % tp:
            x = np.concatenate([x, np.repeat(x[-1:], tp - len(x) % tp, axis=0)])
        gt, gh, gw = len(x) // tp, h // p, w // p
        x = x.reshape(gt, tp, 3, gh // m, m, p, gw // m, m, p).transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return torch.from_numpy(np.ascontiguousarray(x.reshape(gt * gh * gw, 3 * tp * p * p))), [gt, gh, gw]

    def __call__(self, messages, images, audios, videos=()) -> dict:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, add_generation_prompt=True,
                                                  tokenize=False)
        out: dict = {}
        if images:
            im = self.images(images=images, return_tensors="pt")
            out.update(pixel_values=im["pixel_values"], image_grid_thw=im["image_grid_thw"])
            merge = self.images.merge_size ** 2
            text = _expand(text, self.image_token, [int(g.prod()) // merge for g in im["image_grid_thw"]])
        if videos:
            made = [self.video(clip) for clip, _ in videos]
            grids = torch.tensor([g for _, g in made], dtype=torch.long)
            # seconds per temporal patch (the rope's time axis): temporal_patch_size frames at the recipe's fps
            out.update(pixel_values_videos=torch.cat([x for x, _ in made]), video_grid_thw=grids,
                       video_second_per_grid=torch.full((len(made),), self.images.temporal_patch_size / self.fps,
                                                        dtype=torch.float32))
            merge = self.images.merge_size ** 2
            text = _expand(text, self.video_token, [int(g.prod()) // merge for g in grids])
        if audios:
            if self.family == "qwen3_omni_moe":
                from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
                    _get_feat_extract_output_lengths)

                fe = self.audio(audios, sampling_rate=self.sampling_rate, return_attention_mask=True,
                                padding="longest", truncation=False, return_tensors="pt")
                counts = [int(n) for n in _get_feat_extract_output_lengths(fe["attention_mask"].sum(-1), self.n_window)]
            else:
                fe = self.audio(audios, sampling_rate=self.sampling_rate, return_attention_mask=True,
                                padding="max_length", return_tensors="pt")
                counts = [int(((n - 1) // 2 + 1 - 2) // 2 + 1) for n in fe["attention_mask"].sum(-1)]
            out.update(input_features=fe["input_features"], feature_attention_mask=fe["attention_mask"])
            text = _expand(text, self.audio_token, counts)
        enc = self.tokenizer([text], return_tensors="pt")
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out


class Gemma3nInputs:
    """Gemma 3n's inputs from transformers' Gemma3nProcessor (its PIL image processor: no
    torchvision), the chat template in the folder."""

    def __init__(self, folder: str, config: dict):
        from transformers import Gemma3nProcessor

        self.processor = Gemma3nProcessor.from_pretrained(folder, backend="pil")
        self.tokenizer = self.processor.tokenizer
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.eos = [self.tokenizer.convert_tokens_to_ids("<end_of_turn>")]

    no_video = "Gemma 3n takes no video"

    def __call__(self, messages, images, audios, videos=()) -> dict:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.processor(text=[text], images=[images] if images else None, audio=audios or None,
                             return_tensors="pt")
        return dict(enc)


class Gemma4Inputs:
    """Gemma 4's inputs from transformers' own parts: the tokenizer with the folder's chat template,
    Gemma4ImageProcessorPil, Gemma4AudioFeatureExtractor. (Gemma4Processor cannot be built without
    torchvision, which its video processor needs, even for a text-and-image prompt.) Placeholders
    expand as Gemma4Processor expands them: an image to <|image> + n x <|image|> + <image|>, an audio
    clip to <|audio> + n x <|audio|> + <audio|> (n = the clip's mel frames the two stride-2
    convolutions keep), a video to "mm:ss <|image> + n x <|video|> + <image|>" per frame, joined by
    spaces. Video frames are resized as Gemma4VideoProcessor does on the CPU (a bicubic antialiased
    resize of the uint8 frames to the largest size of at most its soft-token budget, then /255) and
    cut into patches with the image processor's helpers."""

    def __init__(self, folder: str, config: dict):
        from transformers import AutoTokenizer, Gemma4AudioFeatureExtractor
        from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.images = Gemma4ImageProcessorPil.from_pretrained(folder)
        self.audio = Gemma4AudioFeatureExtractor.from_pretrained(folder)
        self.sampling_rate = self.audio.sampling_rate
        settings = json.loads((Path(folder) / "processor_config.json").read_text())
        self.max_audio = int(settings.get("feature_extractor", {}).get("max_length", 480_000))  # 30 s
        video = settings.get("video_processor") or {}
        if not video and (Path(folder) / "video_preprocessor_config.json").exists():
            video = json.loads((Path(folder) / "video_preprocessor_config.json").read_text())
        self.video_patch = int(video.get("patch_size", 16))
        self.video_budget = int(video.get("max_soft_tokens", 70))
        self.video_pool = int(video.get("pooling_kernel_size", 3))
        self.eos = [self.tokenizer.convert_tokens_to_ids("<turn|>")]

    #: samples with video are answered
    no_video = None

    def __call__(self, messages, images, audios, videos=()) -> dict:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out: dict = {}
        if images:
            im = self.images(images=images, return_tensors="pt")
            out.update(pixel_values=im["pixel_values"], image_position_ids=im["image_position_ids"])
            text = _expand(text, "<|image|>", ["<|image>" + "<|image|>" * int(n) + "<image|>"
                                               for n in im["num_soft_tokens_per_image"]])
        if audios:
            feats, masks = [], []
            for wave in audios:  # each clip alone, then padded at the end (the padding masked)
                fe = self.audio([wave], sampling_rate=self.sampling_rate, max_length=self.max_audio, truncation=True,
                                return_tensors="np")
                feats.append(torch.from_numpy(np.asarray(fe["input_features"][0], dtype=np.float32)))
                masks.append(torch.from_numpy(np.asarray(fe["input_features_mask"][0], dtype=bool)))
            out.update(_padded_clips(feats, masks))
            text = _expand(text, "<|audio|>", ["<|audio>" + "<|audio|>" * int(fm[::2][::2].sum()) + "<audio|>"
                                               for fm in masks])
        if videos:
            pix, pos, frames, blocks = [], [], [], []
            for clip, times in videos:
                x, p, n = self.video_patches(clip)
                pix.append(x)
                pos.append(p)
                frames.append(len(clip))
                blocks.append(" ".join(f"{int(t // 60):02d}:{int(t % 60):02d} <|image>" + "<|video|>" * n + "<image|>"
                                       for t in times))
            out.update(pixel_values_videos=torch.cat(pix), video_position_ids=torch.cat(pos),
                       num_frames_per_video=torch.tensor(frames))
            text = _expand(text, "<|video|>", blocks)
        enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)  # the template writes <bos>
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out

    def video_patches(self, clip: list) -> tuple[torch.Tensor, torch.Tensor, int]:
        """A video's frames -> (patches [T, max_patches, p*p*3], (x, y) positions, soft tokens per frame)."""
        from transformers.models.gemma4.image_processing_pil_gemma4 import (
            convert_image_to_patches, get_aspect_ratio_preserving_size, pad_along_first_dim)

        size = clip[0].size  # every frame at the first one's size
        arrs = [np.asarray(f if f.size == size else f.resize(size, Image.Resampling.BICUBIC)) for f in clip]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()  # [T, 3, H, W] uint8
        p, k = self.video_patch, self.video_pool
        h, w = get_aspect_ratio_preserving_size(height=x.shape[2], width=x.shape[3], patch_size=p,
                                                max_patches=self.video_budget * k * k, pooling_kernel_size=k)
        if (h, w) != tuple(x.shape[2:]):
            x = torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = (x.to(torch.float32) / 255.0).numpy()
        gx, gy = np.meshgrid(np.arange(w // p), np.arange(h // p), indexing="xy")
        grid = np.stack([gx, gy], axis=-1).reshape(-1, 2)
        patches, positions = zip(*(pad_along_first_dim(convert_image_to_patches(frame, p), grid,
                                                        self.video_budget * k * k) for frame in x))
        return (torch.from_numpy(np.stack(patches)), torch.from_numpy(np.stack(positions)).long(),
                (h // p) * (w // p) // k ** 2)


class NemotronInputs:
    """Nemotron-3-Nano-Omni's inputs from transformers' own parts: the tokenizer with the folder's
    chat template and ParakeetFeatureExtractor; images cut as transformers' image processor for it
    cuts them (that processor imports torchvision, so its arithmetic is written out here): a patch
    grid near the image's own, scaled into the patch budget with both sides multiples of the
    pixel-shuffle factor; a float32 bicubic antialiased resize to it; CLIP mean and std (the 1/255
    rescale folded in); channel-major 16 x 16 patches in row-major order. Each image is its own call
    (budget: the context in patches, clamped to [min, max] patches). An image expands to <img> +
    n x <image> + </img> (n = grid / merge^2), an audio clip to <so_start> + n x <so_embedding> +
    <so_end> (n = 1 + samples // hop mel frames, halved by each stride-2 convolution)."""

    def __init__(self, folder: str, config: dict):
        from transformers import AutoTokenizer, ParakeetFeatureExtractor

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.audio = ParakeetFeatureExtractor.from_pretrained(folder)
        settings = json.loads((Path(folder) / "processor_config.json").read_text())
        im = settings.get("image_processor", {})
        self.patch = int(im.get("patch_size", 16))
        self.merge = round(1 / float(im.get("downsample_ratio", 0.5)))
        self.min_patches = int(im.get("min_num_patches", 1024))
        self.max_patches = int(im.get("max_num_patches", 13312))
        self.max_model_len = int(im.get("max_model_len", 16384))
        scale = 1.0 / float(im.get("rescale_factor", 1 / 255))
        self.mean = torch.tensor(im.get("image_mean", [0.48145466, 0.4578275, 0.40821073])) * scale
        self.std = torch.tensor(im.get("image_std", [0.26862954, 0.26130258, 0.27577711])) * scale
        self.sampling_rate = int(settings.get("audio_sampling_rate", self.audio.sampling_rate))
        self.hop = int(settings.get("audio_hop_length", 160))
        self.subsampling = int(settings.get("audio_subsampling_factor", 8))
        self.eos = [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    no_video = ("the toolkit answers no video for Nemotron-3-Nano-Omni (its family reads images and audio), so there "
                "is no eval answer to match, and transformers' video processor for it needs torchvision")

    def grid(self, height: int, width: int) -> tuple[int, int]:
        budget = max((self.max_model_len - 4) * self.merge ** 2, self.min_patches)
        budget = max(min(budget, self.max_patches) if self.max_patches else budget, self.min_patches)
        gh, gw = round(height / self.patch + 0.5), round(width / self.patch + 0.5)  # Python's round, as there
        shrink = min(math.sqrt(budget / (gh * gw)), 1.0)
        gh, gw = math.floor(shrink * gh), math.floor(shrink * gw)
        if budget > self.min_patches and gh * gw < self.min_patches:
            grow = math.sqrt(self.min_patches / (gh * gw))
            gh, gw = math.ceil(grow * gh), math.ceil(grow * gw)
        m = self.merge
        if gh % m:
            gh = gh + m - gh % m if (gh + m - gh % m) * gw <= budget else max(m, gh - gh % m)
        if gw % m:
            gw = gw + m - gw % m if gh * (gw + m - gw % m) <= budget else max(m, gw - gw % m)
        return gh, gw

    def image(self, img: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        gh, gw = self.grid(img.height, img.width)
        p = self.patch
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32)
        if tuple(x.shape[1:]) != (gh * p, gw * p):
            x = torch.nn.functional.interpolate(x[None], size=(gh * p, gw * p), mode="bicubic", align_corners=False,
                                                antialias=True)[0]
        x = (x - self.mean[:, None, None]) / self.std[:, None, None]
        return x.reshape(3, gh, p, gw, p).permute(1, 3, 0, 2, 4).reshape(gh * gw, 3 * p * p), (gh, gw)

    def audio_tokens(self, n_samples: int) -> int:
        n = 1 + n_samples // self.hop
        for _ in range(int(math.log2(self.subsampling))):
            n = (n - 1) // 2 + 1
        return max(1, n)

    def __call__(self, messages, images, audios, videos=()) -> dict:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out: dict = {}
        if images:
            pix, grids = zip(*(self.image(im) for im in images))
            out.update(pixel_values=torch.cat(pix), image_grid_hw=torch.tensor(grids, dtype=torch.long))
            text = _expand(text, "<image>", ["<img>" + "<image>" * (gh * gw // self.merge ** 2) + "</img>"
                                             for gh, gw in grids])
        if audios:
            fes = [self.audio([w], sampling_rate=self.sampling_rate, return_tensors="pt") for w in audios]
            out.update(_padded_clips([fe["input_features"][0].float() for fe in fes],
                                     [fe["attention_mask"][0].bool() for fe in fes]))
            text = _expand(text, "<so_embedding>", ["<so_start>" + "<so_embedding>" * self.audio_tokens(len(w)) +
                                                    "<so_end>" for w in audios])
        enc = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out


def _padded_clips(feats: list, masks: list) -> dict:
    """Clips' features (each extracted alone, [frames, mels]) padded at the end to the longest, with
    their valid-frame masks, as the toolkit batches them."""
    x = torch.zeros(len(feats), max(len(f) for f in feats), feats[0].shape[1])
    m = torch.zeros(x.shape[:2], dtype=torch.bool)
    for i, (f, fm) in enumerate(zip(feats, masks)):
        x[i, : len(f)], m[i, : len(fm)] = f, fm
    return {"input_features": x, "input_features_mask": m}


def _qwen_frame_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) a Qwen video frame is resized to, by the toolkit's rule (Qwen2-VL's earlier
    one: sides rounded to a multiple of `factor`, never below it; the area brought within
    [min_pixels, max_pixels] keeping the aspect ratio)."""
    h, w = max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def _expand(text: str, token: str, items: list) -> str:
    """Each `token` placeholder in turn replaced: by the item's text, or by `token` repeated (a count)."""
    pieces = text.split(token)
    if len(pieces) - 1 != len(items):
        raise ValueError(f"{len(pieces) - 1} {token} placeholders for {len(items)} media items")
    return pieces[0] + "".join((token * n if isinstance(n, int) else n) + rest for n, rest in zip(items, pieces[1:]))


def recipe_setting(folder: str, section: str, key: str, default=None):
    """A value of the recipe the model was trained with (the export's recipe.yaml), if any."""
    p = Path(folder) / "recipe.yaml"
    if not p.exists():
        return default
    import yaml

    doc = yaml.safe_load(p.read_text()) or {}
    doc = doc.get("recipe", doc)
    value = (doc.get(section) or {}).get(key)
    return default if value in (None, "") else value


def read_audio(path: Path, rate: int) -> np.ndarray:
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, rate)
        wave = resample_poly(wave, rate // g, sr // g).astype(np.float32)
    return wave


def conversation(sample: dict, root: Path, system: str | None, rate: int):
    """Messages for the chat template (the last answer removed), images, audios and video parts."""
    msgs = list(sample["messages"])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    out, images, audios, videos = [], [], [], []
    for m in msgs:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.append(open_image(root / part["path"]))
                parts.append({"type": "image"})
            elif kind == "audio":
                audios.append(read_audio(root / part["path"], rate))
                parts.append({"type": "audio"})
            elif kind == "video":
                videos.append(part)
                parts.append({"type": "video"})
            else:
                raise ValueError(f"sample {sample.get('id')}: a {kind!r} part; this script reads text, image, audio "
                                 "and video parts")
        out.append({"role": m["role"], "content": parts})
    return out, images, audios, videos


def open_image(path: Path) -> Image.Image:
    """An image as RGB, its EXIF orientation applied (as the toolkit reads it)."""
    from PIL import ImageOps

    with Image.open(path) as im:
        return ImageOps.exif_transpose(im).convert("RGB")


FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_video(part: dict, root: Path, fps: float, max_frames: int) -> tuple[list, list[float]]:
    """(frames, each one's time in seconds) of a video part, picked as the toolkit picks them: of a
    video file (PyAV), a folder of frames (natural name order) or a list of frame files, keep every
    (source rate / fps)-th frame where the source's rate is known and above `fps` (a file's own rate;
    a part's "fps" for frames), then at most `max_frames` of those, evenly spread (first and last
    kept). A frame's time is its index in the source over the source's rate (24 where unknown, as
    transformers' Gemma 4 processor assumes)."""
    src = part.get("fps")
    if part.get("frames"):
        files = [root / f for f in part["frames"]]
    elif (root / part["path"]).is_dir():
        def natural(f: Path):
            return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", f.name)]

        files = sorted((f for f in (root / part["path"]).iterdir()
                        if f.suffix.lower() in FRAME_SUFFIXES and f.is_file()), key=natural)
    else:
        return _video_file(root / part["path"], fps, max_frames)
    picked = _pick(len(files), src, fps, max_frames)
    return [open_image(files[i]) for i in picked], [i / (src or 24) for i in picked]


def _pick(n: int, src: float | None, fps: float, max_frames: int) -> list[int]:
    kept = list(range(n))
    if fps and src and fps < src:
        step = src / fps
        kept = sorted({int(i * step) for i in range(int(n / step) + 1) if int(i * step) < n})
    if len(kept) > max_frames:
        kept = [kept[int(round(x))] for x in np.linspace(0, len(kept) - 1, max_frames)]
    return kept


def _video_file(path: Path, fps: float, max_frames: int) -> tuple[list, list[float]]:
    """A video file's picked frames (read_video): its packets counted, then one decoding pass; where
    fewer frames decode than packets were counted, the last decoded frame stands in for the rest."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        src = float(stream.average_rate) if stream.average_rate else None
        n = sum(1 for packet in container.demux(stream) if packet.size)
    picked = _pick(n, src, fps, max_frames)
    frames: dict[int, Image.Image] = {}
    last = None
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i >= n or len(frames) == len(set(picked)):
                break
            if i in picked:
                frames[i] = frame.to_image().convert("RGB")
            last = frame
    if last is not None:
        frames.update({i: last.to_image().convert("RGB") for i in picked if i not in frames})
    return [frames[i] for i in picked], [i / (src or 24) for i in picked]


def reference_of(sample: dict) -> str:
    if sample.get("answer"):
        return sample["answer"]
    last = [m for m in sample["messages"] if m["role"] == "assistant"][-1]["content"]
    if not isinstance(last, str):
        last = " ".join(p.get("text", "") for p in last)
    return first_sentence(last)


def first_sentence(text: str) -> str:
    m = re.search(r"[.!?](\s|$)", text)
    return text[: m.start()] if m else text


def normalise(text: str) -> str:
    t = re.sub(r"[^\w\s-]", " ", text.lower().strip())
    t = re.sub(r"(?<!\w)-|-(?!\w)", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"^(the|a|an)\s+", "", t)


def is_match(prediction: str, reference: str) -> bool:
    ref = normalise(reference)
    return ref != "" and (normalise(first_sentence(prediction)) == ref or normalise(prediction) == ref)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("--max-new-tokens", type=int, help="default: the recipe's eval.max_new_tokens, else 32")
    ap.add_argument("--limit", type=int, default=0, help="only the first N samples")
    ap.add_argument("--out", help="write predictions here (JSON lines)")
    args = ap.parse_args(argv)

    model = load_model(args.model_dir)
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    family = family_of(config)
    inputs_of = {"gemma3n": Gemma3nInputs, "gemma4": Gemma4Inputs,
                 "nemotron_omni": NemotronInputs}.get(family, QwenInputs)
    processor = inputs_of(args.model_dir, config)
    tok = processor.tokenizer
    rate = processor.sampling_rate
    system = recipe_setting(args.model_dir, "data", "system_prompt")  # training's default system prompt
    max_new = args.max_new_tokens or int(recipe_setting(args.model_dir, "eval", "max_new_tokens", 32))
    fps = float(recipe_setting(args.model_dir, "model", "video_fps", 2.0))  # training's frame sampling
    max_frames = int(recipe_setting(args.model_dir, "model", "video_max_frames", 16))
    eos = processor.eos
    root = Path(args.data).parent
    lines = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
    if args.limit:
        lines = lines[: args.limit]
    rows, hits, skipped, reasons = [], 0, 0, []
    for sample in lines:
        msgs, images, audios, videos = conversation(sample, root, system, rate)
        reason = (processor.no_video or (processor.skips_video(videos, root) if hasattr(processor, "skips_video")
                                         else None)) if videos else None
        if reason:
            skipped += 1
            reasons += [reason] if reason not in reasons else []
            continue
        clips = [read_video(v, root, fps, max_frames) for v in videos]
        inputs = processor(msgs, images, audios, clips)
        inputs = {k: (v.to(model.dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        pred = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        ok = is_match(pred, reference_of(sample))
        hits += ok
        rows.append({"id": sample.get("id"), "prediction": pred, "reference": reference_of(sample), "match": ok})
    n = len(rows)
    why = f" ({skipped} with video skipped: {'; '.join(reasons)})" if skipped else ""
    print(f"{n} samples answered{why}: exact-match accuracy {hits / max(n, 1):.3f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    others = sorted(m for m in sys.modules if _is_toolkit(m) and m not in STAND_IN)
    assert not others, f"this script must run on transformers alone (the torchvision stand-in aside): {others}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
