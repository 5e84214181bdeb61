"""The Gemma 3n family (E2B, E4B): `Gemma3nForConditionalGeneration`, text + image + audio in, text out.

The model: a MobileNetV5 vision tower (timm, see `gemma3n_timm` for running it without
torchvision), a USM-style conformer audio tower, one multimodal embedder per tower, and a
decoder with AltUp (several parallel hidden-state streams), LAuReL (low-rank residual branches),
per-layer token embeddings, KV sharing across the last layers, and sliding-window layers
interleaved with global ones. 1-D RoPE (no M-RoPE), logits soft-capped at 30.

Roles, by module path:

- `vision_encoder` = `model.vision_tower`; `vision_projector` = `model.embed_vision`;
  `audio_encoder` = `model.audio_tower`; `audio_projector` = `model.embed_audio`;
- `llm` = `model.language_model`: the decoder layers and everything that runs beside them,
  AltUp (`altup_projections`, `altup_unembed_projections`, each layer's `altup`), LAuReL, the
  per-layer input path (`per_layer_model_projection`, `per_layer_projection_norm`, each layer's
  `per_layer_input_gate` / `per_layer_projection`): all linear layers QLoRA quantises and
  `all-linear` LoRA targets are the decoder's own;
- `embeddings` = `model.language_model.embed_tokens_per_layer`: Gemma 3n's second token table
  (vocabulary x layers x 256; 2.3B parameters in E4B), an input embedding that nothing else shares;
- `lm_head` = `lm_head` and `model.language_model.embed_tokens`: Gemma ties the output layer to
  the input embedding, so they are one matrix and one role. Training `lm_head` trains that matrix
  for both uses (PEFT's `ensure_weight_tying` keeps the trained copies tied, and the export
  writes the one tensor the checkpoint holds).

Prompt format (the released chat template): `<bos><start_of_turn>user\\n{system}\\n\\n{content}
<end_of_turn>\\n<start_of_turn>model\\n{answer}<end_of_turn>\\n`; each image is
`\\n\\n<start_of_image>` + 256 x `<image_soft_token>` + `<end_of_image>\\n\\n` and each audio clip
`\\n\\n<start_of_audio>` + 188 x `<audio_soft_token>` + `<end_of_audio>\\n\\n` (fixed counts), the
text around them tokenised as one run, as `Gemma3nProcessor` does. Images are resized to the
processor's fixed size (768x768, no aspect kept) with PIL (`SiglipImageProcessorPil`) and scaled
to [0, 1]; audio is `Gemma3nAudioFeatureExtractor`'s log-mel features, at most 30 s (the processor cuts
the rest): a longer clip is named, or with `data.long_audio` split into consecutive clips of one block
each, or truncated to its first 30 s.

Packing: the audio tower's outputs for a clip do not depend on clips padded beside it (it masks
the padding; the embedder pads every clip to the fixed count with one embedding), MobileNetV5
normalises each image on its own (RMS norms, no batch statistics) and the trainable model runs it
one image per call (`images_one_by_one`: convolution kernels round differently by batch size), and
the sliding-window layers measure their window from the per-sample positions, so packed rows are
exact; with the varlen backend the window goes to the kernel (`finetune.kernels.varlen`, `window`).
AltUp's training-time clip of its coefficient matrices is switched off unless the LLM trains in
full (it writes the weights in place, which 4/8-bit weights cannot take; see `load`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.checkpoint import assemble, copy_extras
from finetune.data import media as M
from finetune.demo_data import KINDS, make_image
from finetune.errors import ConfigError
from finetune.families.base import (
    IGNORE_INDEX,
    EncodedSample,
    Family,
    LoadedModel,
    LoadSpec,
    processor_settings,
    quantization_config,
)
from finetune.families.gemma3n_timm import TINY_ARCH, ensure_timm
from finetune.families.shared import atomic_build, chat_turns, tiny_cache_dir
from finetune.families.tiny import build_bpe_tokenizer

BOS, START_TURN, END_TURN = "<bos>", "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
BOA, EOA, AUDIO_TOKEN = "<start_of_audio>", "<end_of_audio>", "<audio_soft_token>"

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)

CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "gemma3n.chat_template.jinja").read_text()
#: the released model's preprocessing (its preprocessor_config.json / processor_config.json)
IMAGE_SIZE, IMAGE_SEQ, AUDIO_SEQ, MAX_AUDIO_SAMPLES = 768, 256, 188, 480_000


def _hf(name: str):
    """A transformers class by name, with timm made importable first (the vision tower needs it)."""

    ensure_timm()
    import transformers

    return getattr(transformers, name)


@dataclass
class Gemma3nOmniProcessor:
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
        for s in cls.TOKENS:
            tid = tok.convert_tokens_to_ids(s)
            if tid is None or tid == tok.unk_token_id:
                raise ConfigError(f"{folder}: tokenizer has no special token {s}; is this a Gemma 3n folder?")
            proc.token_ids[s] = int(tid)
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

    # ---- text ------------------------------------------------------------------------------
    def run(self, text: str) -> tuple[list[int], list[int]]:
        """(ids, start offsets) of a run of plain text between special tokens, cached."""
        got = self._runs.get(text)
        if got is None:
            enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
            got = (list(enc["input_ids"]), [int(s) for s, _ in enc["offset_mapping"]])
            if len(self._runs) < 100_000:
                self._runs[text] = got
        return got

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


class Gemma3nFamily(Family):
    """Gemma 3n (E2B, E4B): `Gemma3nForConditionalGeneration` is trained and exported as a whole."""

    name = "gemma3n"
    model_types = ("gemma3n",)
    title = "Gemma 3n"
    hf_model, hf_config = "Gemma3nForConditionalGeneration", "Gemma3nConfig"
    mrope = False
    media_keys = {"image": "pixel_values", "audio": "input_features"}
    modalities = frozenset({"image", "audio"})  # Gemma 3n's processor takes no video
    float_media = ("pixel_values", "input_features")
    shipped_configs = ("gemma3n_e4b.json",)
    role_prefixes = {
        "llm": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens_per_layer",),
        "lm_head": ("lm_head", "model.language_model.embed_tokens"),  # one tied matrix (module docstring)
        "vision_encoder": ("model.vision_tower",),
        "vision_projector": ("model.embed_vision",),
        "audio_encoder": ("model.audio_tower",),
        "audio_projector": ("model.embed_audio",),
    }
    processor_files = PROCESSOR_FILES
    processor_class = Gemma3nOmniProcessor
    folder_hint = ("Real weights are read from a local folder (download it once, e.g. with "
                   "`huggingface-cli download google/gemma-3n-E4B-it --local-dir DIR`)")
    # QLoRA quantises the LLM's linear layers only: the towers, embedders and the tied output stay
    quant_skip = ["lm_head", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"]

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        model = _hf(self.hf_model).from_pretrained(str(folder), **kwargs)
        # AltUp clips its coefficient matrices in training mode by writing their weights in place
        # (prediction) or reading them around the module (correction): meant for training those
        # matrices, it would scramble 4/8-bit packed weights and bypass LoRA on them. Unless the
        # LLM trains in full, they only change through LoRA, so the clip goes off (the released
        # weights lie inside it); the export writes the base's value back (save_merged).
        if not spec.llm_full:
            object.__setattr__(model.config.get_text_config(), "altup_coef_clip", None)  # typed float; None: no clip
        images_one_by_one(model)
        return model

    def rope_index(self, model_or_config) -> None:
        return None  # 1-D RoPE: a sample's positions are 0..n-1

    def tower_inputs(self, model_or_config):
        """The images' digests for the frozen vision path's cache (images_one_by_one), computed by the
        collator on the host: the cache then works on pixels already moved to a GPU."""
        inner = getattr(model_or_config, "model", None)
        return image_digests if getattr(inner, "_frozen_image_cache", None) is not None else None

    def max_audio_samples(self, processor: Gemma3nOmniProcessor) -> int | None:
        """The audio feature extractor's max_length (480000: 30 s; the tiny folder's 4 s), where the
        processor cuts every longer clip (`truncation=True`)."""
        return processor.max_audio_samples

    # ---- encoding ----------------------------------------------------------------------
    def _render(self, sample, proc: Gemma3nOmniProcessor, for_generation: bool, on_image, on_audio):
        """The sample's token ids and labels in the chat template's layout. `on_image(part)` gives
        the number of images a part holds (and may process them), `on_audio(part)` the number of
        clips an audio part is read as (one; or the consecutive clips of a split long one)."""
        tid = proc.token_ids
        ids: list[int] = [tid[BOS]]
        labels: list[int] = [IGNORE_INDEX]
        text: list[tuple[str, bool]] = []  # the pending run of plain text: (piece, learned)

        def flush():
            if not text:
                return
            run = "".join(t for t, _ in text)
            learned = np.zeros(len(run) + 1, dtype=bool)
            o = 0
            for t, learn in text:
                learned[o:o + len(t)] = learn
                o += len(t)
            toks, starts = proc.run(run)
            ids.extend(toks)
            labels.extend(t if learned[s] else IGNORE_INDEX for t, s in zip(toks, starts))
            text.clear()

        def special(token: str, learn: bool, n: int = 1):
            flush()
            ids.extend([tid[token]] * n)
            labels.extend([tid[token] if learn else IGNORE_INDEX] * n)

        messages = chat_turns(sample, proc.system_prompt, for_generation)
        prefix = ""
        if messages and messages[0].role == "system":
            first = next((p.text or "" for p in messages[0].parts if p.type == "text"), "")
            prefix = first + "\n\n"
            messages = messages[1:]
        for i, msg in enumerate(messages):
            if (msg.role == "user") != (i % 2 == 0) or msg.role not in ("user", "assistant"):
                raise ConfigError(f"{getattr(sample, 'where', '')}: Gemma 3n's chat format needs the turns to "
                                  "alternate user/assistant/user/..., after at most one leading system turn")
            learn = msg.role == "assistant" and msg.loss and not for_generation
            special(START_TURN, False)
            text.append((("model" if msg.role == "assistant" else msg.role) + "\n" + (prefix if i == 0 else ""), False))
            for part in msg.parts:
                if part.type == "text":
                    text.append(((part.text or "").strip(), learn))
                elif part.type == "image":
                    for _ in range(on_image(part)):
                        text.append(("\n\n", False))
                        special(BOI, False)
                        special(IMAGE_TOKEN, False, proc.image_seq_length)
                        special(EOI, False)
                        text.append(("\n\n", False))
                elif part.type == "audio":
                    for _ in range(on_audio(part)):  # each clip its own block, as the processor gives clips in turn
                        text.append(("\n\n", False))
                        special(BOA, False)
                        special(AUDIO_TOKEN, False, proc.audio_seq_length)
                        special(EOA, False)
                        text.append(("\n\n", False))
                else:
                    raise ConfigError(f"{getattr(sample, 'where', '')}: Gemma 3n takes text, image and audio "
                                      f"parts, not {part.type}")
            special(END_TURN, learn)
            text.append(("\n", False))
        if for_generation:
            special(START_TURN, False)
            text.append(("model\n", False))
        flush()
        return ids, labels

    def encode(self, sample, processor: Gemma3nOmniProcessor, *, for_generation: bool = False,
               rope: Any = None) -> EncodedSample:

        pix: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []

        def on_image(part) -> int:
            imgs = M.load_images(part)  # a NIfTI part may give several slices
            pix.extend(processor.process_image(im) for im in imgs)
            return len(imgs)

        def on_audio(part) -> int:
            wave = M.load_audio(part.path, processor.sampling_rate)
            spans = self.clip_spans(sample, part, processor, len(wave))
            for a, b in spans:
                f, m = processor.process_audio(wave[a:b])
                feats.append(f)
                masks.append(m)
            return len(spans)

        ids, labels = self._render(sample, processor, for_generation, on_image, on_audio)
        media: dict[str, Any] = {}
        if pix:
            media["pixel_values"] = torch.stack(pix)
        if feats:
            media["input_features"] = feats  # [frames, mels] each; the collator pads them at the end
            media["input_features_mask"] = masks
        input_ids = torch.tensor(ids, dtype=torch.long)
        lab = torch.tensor(labels, dtype=torch.long)
        lab[0] = IGNORE_INDEX  # a sample never learns its first token (packing contract)
        if for_generation:
            lab[:] = IGNORE_INDEX
        return EncodedSample(input_ids=input_ids, labels=lab, position_ids=torch.arange(len(ids)), media=media,
                             sample_id=sample.id or "", where=getattr(sample, "where", ""))

    def count_tokens(self, sample, processor: Gemma3nOmniProcessor) -> int:
        """From text, image counts and clip lengths (headers) alone: every image and clip has a fixed
        token count."""

        def clips(part) -> int:
            return len(self.clip_spans(sample, part, processor, M.audio_samples(part.path, processor.sampling_rate)))

        ids, _ = self._render(sample, processor, False, lambda part: len(M.image_sizes(part)), clips)
        return len(ids)

    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        return collate_media(batch)

    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        out = []
        if "pixel_values" in enc.media:
            out.append(("image", int(config["image_token_id"]),
                        int(enc.media["pixel_values"].shape[0]) * int(config["vision_soft_tokens_per_image"])))
        if "input_features" in enc.media:
            out.append(("audio", int(config["audio_token_id"]),
                        len(enc.media["input_features"]) * int(config["audio_soft_tokens_per_image"])))
        return out

    def meta_model(self, config_path: Path):
        cfg = _hf(self.hf_config).from_pretrained(str(config_path))
        with torch.device("meta"):
            return _hf(self.hf_model)._from_config(cfg, dtype=torch.bfloat16), cfg

    def tower_shapes(self, config) -> dict:
        t, a, v = config.text_config, config.audio_config, config.vision_config
        ffn = t.intermediate_size if isinstance(t.intermediate_size, int) else max(t.intermediate_size)
        return {"llm": (t.hidden_size, t.num_hidden_layers, ffn, t.num_attention_heads, True),
                # MobileNetV5 is a CNN, not a transformer stack: counted coarsely as one wide layer
                # over its output grid (it is frozen in the recipes; only transient bytes count)
                "vision": (v.hidden_size, 1, 4 * v.hidden_size, 8, False),
                "audio": (a.hidden_size, a.conf_num_hidden_layers, 4 * a.hidden_size, a.conf_num_attention_heads,
                          False),
                "vocab": t.vocab_size,
                "patches_per_token": 1,
                "frames_per_audio_token": a.conf_reduction_factor}  # conformer frames per soft token

    def usage(self, full_layout: bool) -> list[str]:
        return ["```python",
                f"from transformers import {self.hf_model}, Gemma3nProcessor",
                f"model = {self.hf_model}.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                "processor = Gemma3nProcessor.from_pretrained(\"path/to/merged\")",
                f"# the adapter instead: PeftModel.from_pretrained({self.hf_model}.from_pretrained(BASE), "
                "\"path/to/adapter_export\")",
                "```", "",
                "The vision tower needs timm. Without torchvision, import `finetune.families.gemma3n_timm` and call "
                "`ensure_timm()` first, and load the image processor with `backend=\"pil\"`."]

    # ---- tiny --------------------------------------------------------------------------
    def materialize_tiny(self, seed: int = 0) -> Path:
        root = tiny_cache_dir() / f"gemma3n-s{seed}-v{TINY_VERSION}"
        if (root / "config.json").exists():
            return root
        return atomic_build(root, lambda d: build_tiny(d, seed))

    # ---- export ------------------------------------------------------------------------
    def save_merged(self, model, loaded: LoadedModel, out_dir: Path, *, dtype: torch.dtype,
                    max_shard_size: str) -> dict:
        """The merged model in the base's layout: transformers' tensor names (the tied output
        matrix once, as the base holds it), base tensors the model does not hold copied as they are."""

        out_dir = Path(out_dir)
        model = model.to(dtype)
        model.config.use_cache = True
        text = model.config.get_text_config()
        text.use_cache = True
        # load() may have switched AltUp's training-time clip off; the export keeps the base's
        text.altup_coef_clip = _hf(self.hf_config).from_pretrained(str(loaded.base_path)).text_config.altup_coef_clip
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=out_dir))
        try:
            model.save_pretrained(str(stage), safe_serialization=True, max_shard_size="1000GB")
            info = assemble(stage, loaded.base_path, out_dir, prefix="", max_shard_size=max_shard_size)
            shutil.copyfile(stage / "config.json", out_dir / "config.json")
            if not (loaded.base_path / "generation_config.json").exists() and (stage / "generation_config.json").exists():
                shutil.copyfile(stage / "generation_config.json", out_dir / "generation_config.json")
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        info["copied"] = copy_extras(loaded.base_path, out_dir, skip=("config.json",))
        info["layout"] = self.model_types[0]
        return info

    def load_merged_for_check(self, folder: Path, dtype: torch.dtype):
        return _hf(self.hf_model).from_pretrained(str(folder), dtype=dtype)

    def save_quantized(self, merged_dir: Path, out_dir: Path, *, quantize: str, dtype: torch.dtype) -> str:
        cfg = quantization_config(quantize, dtype, self.quant_skip)
        model = _hf(self.hf_model).from_pretrained(str(merged_dir), dtype=dtype, quantization_config=cfg)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        self.copy_processor_files(merged_dir, out_dir)
        return ("bitsandbytes NF4 with double quantisation" if quantize == "4bit" else "bitsandbytes int8") + \
            f" on the LLM's linear layers, compute dtype {str(dtype).replace('torch.', '')}"

    def load_quantized_for_check(self, folder: Path):
        return _hf(self.hf_model).from_pretrained(str(folder))


def images_one_by_one(model: torch.nn.Module) -> None:
    """Encode one image per vision-tower call (the trainable model only; checkpoints unchanged),
    and reuse a frozen vision path's features for an image it has encoded before.

    Convolution kernels pick their algorithm by batch size, so MobileNetV5 on a stack of images
    gives each image's features a rounding different from the same image alone (about 1e-6
    relative in fp32, on the CPU and with cuDNN alike), which the decoder carries into the logits:
    a packed row's images would encode unlike each sample's alone. One call per image makes an
    image's features independent of what it is packed with, at the cost of one tower call per
    image (each image is already a large convolutional workload: 768x768 pixels).

    While no parameter of the tower or the embedder trains, an image's features are a fixed
    function of its pixels, and every epoch asks for the same images again: they are kept (see
    `FrozenImageCache`) and the tower runs once per distinct image instead of once per use. On the
    tiny demo the tower was a third of a step; bench/frozen_image_cache.py measures the gain.

    The loop wraps `Gemma3nModel.get_image_features` of this instance, which looks the tower up
    at each call: PEFT replaces a trained tower by a wrapper of its copy, which must be the one
    that runs (a wrapper bound to the tower itself would keep running the frozen original)."""
    inner = model.model
    if getattr(inner, "_one_image_per_call", False):
        return
    batched = inner.get_image_features
    cache = FrozenImageCache(inner)

    def one(x: torch.Tensor, state, args, kwargs, digest=None):
        if state is None:
            return batched(x, *args, **kwargs)
        key = cache.key(x, state, args, kwargs, digest)
        hit = cache.get(key)
        if hit is None:
            with torch.no_grad():
                hit = batched(x, *args, **kwargs)
            cache.put(key, hit)
        return _copy_output(hit)

    def get_image_features(pixel_values: torch.Tensor, *args, **kwargs):
        if pixel_values.shape[0] == 0:
            return batched(pixel_values, *args, **kwargs)
        digests = cache.digests if cache.digests is not None and len(cache.digests) == pixel_values.shape[0] else None
        state = cache.path_state(pixel_values, keyed=digests is not None)  # once per call, not per image
        outs = [one(pixel_values[i:i + 1], state, args, kwargs, digests and digests[i])
                for i in range(pixel_values.shape[0])]
        if len(outs) == 1:
            return outs[0]
        if isinstance(outs[0], torch.Tensor):
            return torch.cat(outs)
        first = outs[0]
        for key in ("last_hidden_state", "pooler_output"):
            if getattr(first, key, None) is not None:
                first[key] = torch.cat([getattr(o, key) for o in outs])
        if getattr(first, "hidden_states", None) is not None:
            first["hidden_states"] = tuple(torch.cat(h) for h in zip(*(o.hidden_states for o in outs)))
        return first

    forward = inner.forward

    def forward_with_digests(*args, **kwargs):
        # the collator's digests (IMAGE_DIGESTS) are for this call's images; the backbone never sees them
        cache.digests = kwargs.pop(IMAGE_DIGESTS, None)
        try:
            return forward(*args, **kwargs)
        finally:
            cache.digests = None

    inner.get_image_features = get_image_features
    inner.forward = forward_with_digests
    inner._one_image_per_call = True
    inner._frozen_image_cache = cache


#: batch key of the images' pixel digests, computed by the collator on the host (Family.tower_inputs):
#: on a GPU the pixels reach the model on the device, where hashing them would make the host wait
IMAGE_DIGESTS = "image_digests"


def pixel_digest(x: torch.Tensor) -> str:
    """A host tensor's content digest (one image's pixels)."""
    # the raw bytes (numpy has no bfloat16: a bf16 run's pixels hashed as bytes, as every dtype is)
    return hashlib.blake2b(x.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes(),
                           digest_size=16).hexdigest()


def image_digests(batch: dict) -> dict:
    """The collator's part of the frozen-image cache: each image's digest, in batch order."""
    pix = batch.get("pixel_values")
    if pix is None or pix.shape[0] == 0:
        return {}
    return {IMAGE_DIGESTS: [pixel_digest(pix[i:i + 1]) for i in range(pix.shape[0])]}


class FrozenImageCache:
    """Image features of a frozen vision path (tower and embedder), by pixel content.

    Images are kept only while nothing in the path trains, its modules are in eval-equivalent form
    (no dropout or drop-path with a nonzero rate) and the pixels live on the CPU (hashing device
    memory would make every step wait for the device). The key holds the pixels' digest and each
    path parameter's in-place version counter, so weights loaded or changed in place since are
    never served stale. At most `capacity` images are kept (16 tokens x hidden floats each)."""

    def __init__(self, inner, capacity: int = 8192):
        self.inner, self.capacity, self.store, self.hits, self.misses = inner, capacity, {}, 0, 0
        self.digests: list[str] | None = None  # the current forward's images' digests, from the collator

    def _path(self):
        return [self.inner.vision_tower, self.inner.embed_vision]

    def path_state(self, pixels: torch.Tensor, keyed: bool = False):
        """The path parameters' version counters while caching is safe for these pixels, else None.
        `keyed`: the collator gave the images' digests (IMAGE_DIGESTS), so the pixels may be on any
        device; otherwise they must be on the host to be hashed here."""
        if (pixels.device.type != "cpu" and not keyed) or torch.is_grad_enabled() and pixels.requires_grad:
            return None
        params = [p for m in self._path() for p in m.parameters()]
        if any(p.requires_grad for p in params):
            return None
        for m in self._path():
            for sub in m.modules():
                if sub.training and (getattr(sub, "drop_prob", None) or isinstance(sub, torch.nn.Dropout) and sub.p):
                    return None
        return tuple(p._version for p in params)

    @staticmethod
    def key(x: torch.Tensor, state: tuple, args, kwargs, digest: str | None = None):
        digest = digest or pixel_digest(x)
        return digest, tuple(x.shape), x.dtype, state, repr(args), repr(sorted(kwargs.items()))

    def get(self, key):
        hit = self.store.get(key)
        if hit is None:
            self.misses += 1
        else:
            self.hits += 1
        return hit

    def put(self, key, value) -> None:
        if len(self.store) < self.capacity:
            self.store[key] = value


def _copy_output(out):
    """A cached result as a fresh object (callers set fields on what they get)."""
    if isinstance(out, torch.Tensor):
        return out
    return type(out)(**{k: v for k, v in out.items()})


def collate_media(batch: list[EncodedSample]) -> dict[str, Any]:
    """Images stacked in sample order; audio clips padded at the end to the longest, with their
    valid-frame masks (the tower masks the padding: a clip's outputs do not change)."""
    out: dict[str, Any] = {}
    pix = [e.media["pixel_values"] for e in batch if "pixel_values" in e.media]
    if pix:
        out["pixel_values"] = torch.cat(pix)
    feats = [f for e in batch for f in e.media.get("input_features", [])]
    masks = [m for e in batch for m in e.media.get("input_features_mask", [])]
    if feats:
        T = max(f.shape[0] for f in feats)
        x = torch.zeros(len(feats), T, feats[0].shape[1])
        m = torch.zeros(len(feats), T, dtype=torch.bool)
        for i, (f, fm) in enumerate(zip(feats, masks)):
            x[i, : f.shape[0]] = f
            m[i, : f.shape[0]] = fm
        out["input_features"] = x
        out["input_features_mask"] = m
    return out


# ---- the tiny model ------------------------------------------------------------------------
TINY_VERSION = 5  # 2: 128x128 images, 16 tokens, no layer scale; 3: AltUp's output scale not zero;
#                   4: sliding window 32 (was 8), q/k norm scales head_dim^-1/4,
#                   a random stem bias, the image embedder centred; 5: the vision tower 2-3x wider,
#                   192 px images (was 128)
#: reserved ids per tower block of the vocabulary (the real model has 128 each)
TINY_TOWER_VOCAB = 8
# the MSFA fuses the stride-16 and stride-32 features (12x12 at 192 px) and pools them to 4x4
# tokens: the demo's small lesions need that grid (at 64 px and 2x2 tokens the tiny model learned
# which scan it sees but never where a lesion is). 192 px rather than 128 costs no tokens, only tower
# time, which a frozen tower spends once per image (FrozenImageCache); the held-out lesion probe
# of gemma3n_timm.TINY_BLOCKS reads 0.93-0.97 over 4 init seeds at 192 px, 0.90-0.95 at 128, and
# the demo's held-out lesion accuracy went from 0.900-0.938 to 0.925-0.975 over three train seeds
TINY_IMAGE_SIZE, TINY_IMAGE_TOKENS, TINY_IMAGE_GRID = 192, 16, 4
TINY_MAX_AUDIO_SAMPLES = 4 * 16000  # 4 s: the tiny audio tower then gives at most 25 rows
TEXT_SPECIALS = ["<pad>", "<eos>", BOS, "<unk>", "<mask>", START_TURN, END_TURN, BOI, BOA]


def build_tiny_tokenizer():
    """Byte-level BPE (trained in code) with Gemma 3n's special tokens in Gemma's vocabulary layout:
    text | vision block (`<end_of_image>` at its offset, `<image_soft_token>` next, then reserved
    ids) | audio block (likewise). The model routes ids by these ranges."""
    from transformers import PreTrainedTokenizerFast


    vision = [EOI, IMAGE_TOKEN] + [f"<vision_reserved_{i}>" for i in range(TINY_TOWER_VOCAB - 2)]
    audio = [EOA, AUDIO_TOKEN] + [f"<audio_reserved_{i}>" for i in range(TINY_TOWER_VOCAB - 2)]
    tok = build_bpe_tokenizer(TEXT_SPECIALS + vision + audio)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI,
                              "audio_token": AUDIO_TOKEN, "boa_token": BOA, "eoa_token": EOA},
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tok):
    """A small Gemma 3n: the real architecture (AltUp, LAuReL, per-layer inputs, KV sharing, sliding
    and global layers, activation sparsity in the first layer, MobileNetV5 with attention blocks
    and the MSFA, the conformer) at small widths, initialised with std 0.1 as the other tiny
    models are (the library's 0.02 is tuned for widths in the thousands)."""

    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOI, EOI, IMAGE_TOKEN, BOA, EOA, AUDIO_TOKEN, "<pad>", "<eos>", BOS)}
    vocab = len(tok)
    v_off, a_off = ids[EOI], ids[EOA]
    assert ids[IMAGE_TOKEN] == v_off + 1 and ids[AUDIO_TOKEN] == a_off + 1
    assert a_off == v_off + TINY_TOWER_VOCAB and vocab == a_off + TINY_TOWER_VOCAB
    init = 0.1
    text = dict(vocab_size=vocab, vocab_size_per_layer_input=v_off, hidden_size=64, hidden_size_per_layer_input=16,
                intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=32, num_kv_shared_layers=2,
                laurel_rank=8, altup_num_inputs=2, activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0],
                max_position_embeddings=4096, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                bos_token_id=ids[BOS], initializer_range=init)
    audio = dict(vocab_size=TINY_TOWER_VOCAB, vocab_offset=a_off, input_feat_size=128, hidden_size=32,
                 conf_num_attention_heads=2, conf_num_hidden_layers=2, conf_attention_chunk_size=4,
                 conf_attention_context_left=5, conf_attention_context_right=0, sscp_conv_channel_size=[8, 4],
                 conf_reduction_factor=4, initializer_range=init)
    vision = dict(architecture=TINY_ARCH, vocab_size=TINY_TOWER_VOCAB, vocab_offset=v_off, hidden_size=2048,
                  model_args={"msfa_output_resolution": TINY_IMAGE_GRID}, initializer_range=init)
    return _hf("Gemma3nConfig")(
        text_config=text, vision_config=vision, audio_config=audio, vision_soft_tokens_per_image=TINY_IMAGE_TOKENS,
        audio_soft_tokens_per_image=tiny_audio_rows(audio), boi_token_id=ids[BOI], eoi_token_id=v_off,
        image_token_id=ids[IMAGE_TOKEN], boa_token_id=ids[BOA], eoa_token_id=a_off, audio_token_id=ids[AUDIO_TOKEN],
        initializer_range=init, tie_word_embeddings=True)


def tiny_audio_rows(audio: dict) -> int:
    """Rows the tiny audio tower gives for the longest clip the tiny processor lets through."""
    fe = _hf("Gemma3nAudioFeatureExtractor")()
    frames = fe(np.zeros(TINY_MAX_AUDIO_SAMPLES, np.float32), sampling_rate=16000, max_length=TINY_MAX_AUDIO_SAMPLES,
                truncation=True, return_tensors="np")["input_features"].shape[1]
    n = frames
    for _ in range(2):  # the subsampling convolutions: stride 2 each, padded to keep ceil(n / 2)
        n = -(-n // 2)
    return -(-n // audio["conf_reduction_factor"])


def build_tiny(folder: Path, seed: int = 0) -> None:
    """Write a random tiny Gemma 3n checkpoint with tokenizer and processor files to `folder`."""
    from transformers import GenerationConfig

    tok = build_tiny_tokenizer()
    cfg = tiny_config(tok)
    torch.manual_seed(seed)
    model = _hf("Gemma3nForConditionalGeneration")(cfg).eval()
    with torch.no_grad():
        # AltUp scales each layer's corrected output (the per-layer-input path's input) by a vector
        # that starts at zero: a random model would never use that path, and LoRA on it would learn
        # nothing; a released model has it trained
        for layer in model.model.language_model.layers:
            layer.altup.correct_output_scale.normal_(1.0, 0.1)
            # Gemma 3n's attention has no 1/sqrt(head_dim): its q/k norms' scales carry the
            # temperature, which a released model has learned. At 1 the tiny model's attention
            # logits have std sqrt(32) and its softmax starts saturated; head_dim^-1/4 on both
            # gives the usual std 1 (the demo's loss after 800 steps: 0.19 instead of 0.26)
            for name in ("q_norm", "k_norm"):  # a KV-shared layer has no k_norm (it reads its keys)
                if hasattr(layer.self_attn, name):
                    getattr(layer.self_attn, name).weight.fill_(cfg.text_config.head_dim ** -0.25)
        # transformers' init zeroes the stem convolution's bias. Gemma 3n's pixels are 0..1 and an
        # RMS norm over channels follows the stem, so without a bias every flat region gives the
        # same normalised vector whatever its brightness: a dark lesion on a bright fundus was
        # invisible to the tiny tower (a linear probe on its features: 0.52 held-out, on 16x16
        # pixels 0.93). A released model's stem has a trained bias; with a random one of std 0.5
        # the same probe reads 0.93 on the tower's output
        model.model.vision_tower.timm_model.conv_stem.conv.bias.normal_(0.0, 0.5)
        centre_image_embedder(model, seed)
    _check_audio_rows(model, cfg)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    fe = _hf("Gemma3nAudioFeatureExtractor")()
    pre = {**fe.to_dict(), "image_processor_type": "SiglipImageProcessor", "processor_class": "Gemma3nProcessor",
           "size": {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}, "resample": 2, "do_resize": True,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False, "do_convert_rgb": True,
           "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "image_seq_length": TINY_IMAGE_TOKENS,
           "max_length": TINY_MAX_AUDIO_SAMPLES}
    pre.pop("mel_filters", None)
    pre.pop("window", None)
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True, default=_plain))
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        {"audio_seq_length": cfg.audio_soft_tokens_per_image, "image_seq_length": TINY_IMAGE_TOKENS,
         "processor_class": "Gemma3nProcessor"}, indent=2))
    (Path(folder) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    gen = GenerationConfig(bos_token_id=tok.convert_tokens_to_ids(BOS), pad_token_id=tok.convert_tokens_to_ids("<pad>"),
                           eos_token_id=[tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids(END_TURN)],
                           do_sample=False)
    gen.save_pretrained(str(folder))


def centre_image_embedder(model, seed: int) -> None:
    """Remove from the image embedder's projection what every image's features share.

    A random MobileNetV5 gives every image nearly the same features: per soft token a mean that
    no image changes, and on top of it a part that does (about 9% of the embeddings' size after the
    embedder's norms, measured before the stem bias; about 30% for the other tiny families). A small
    random LLM does not learn to read so small a difference in a demo's time, and training the
    tower or the embedder makes it smaller still (their updates grow the shared part). A released
    model's embedder is trained to give images distinct embeddings; the tiny one is given that
    property by construction: the per-token mean features of 32 synthetic scans (the demo's own
    generator, both kinds, with and without a lesion) are projected out of the projection's input
    space, after which images differ by about 90% of the embeddings' size."""
    from PIL import Image


    rng = np.random.default_rng(seed)
    inner = model.model
    feats = []
    for kind in KINDS:
        for lesion in (False, True):
            for _ in range(8):
                img = Image.fromarray(make_image(kind, lesion, rng)[0]).convert("RGB")
                img = img.resize((TINY_IMAGE_SIZE, TINY_IMAGE_SIZE), Image.Resampling.BILINEAR)
                x = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]  # as the processor
                h = inner.vision_tower(pixel_values=x, do_pooling=False, return_dict=True).last_hidden_state
                h = h.reshape(1, h.shape[1], -1).permute(0, 2, 1) * model.config.vision_config.hidden_size ** 0.5
                feats.append(inner.embed_vision.soft_embedding_norm(h))
    q, _ = torch.linalg.qr(torch.cat(feats).mean(0).T)  # an orthonormal basis of the per-token means
    w = inner.embed_vision.embedding_projection.weight
    w.sub_((w @ q) @ q.T)


def _plain(x):
    return x.tolist() if hasattr(x, "tolist") else str(x)


def _check_audio_rows(model, cfg) -> None:
    """The longest clip fills exactly the fixed audio token count (the arithmetic above is the tower's)."""
    frames = _hf("Gemma3nAudioFeatureExtractor")()(
        np.zeros(TINY_MAX_AUDIO_SAMPLES, np.float32), sampling_rate=16000, max_length=TINY_MAX_AUDIO_SAMPLES,
        truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_audio_features(frames["input_features"].float(), ~frames["input_features_mask"].bool(),
                                             return_dict=True)
    rows = out.pooler_output.shape[1]
    if rows != cfg.audio_soft_tokens_per_image:
        raise RuntimeError(f"tiny Gemma 3n: the audio tower gives {rows} rows for the longest clip, the config "
                           f"says {cfg.audio_soft_tokens_per_image}")
