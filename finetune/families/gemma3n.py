"""The Gemma 3n family (E2B, E4B): `Gemma3nForConditionalGeneration`, text + image + audio in, text out.

The model: a MobileNetV5 vision tower (timm, see `gemma3n_timm` for running it without
torchvision), a USM-style conformer audio tower, one multimodal embedder per tower, and a
decoder with AltUp (several parallel hidden-state streams), LAuReL (low-rank residual branches),
per-layer token embeddings, KV sharing across the last layers, and sliding-window layers
interleaved with global ones. 1-D RoPE (no M-RoPE), logits soft-capped at 30. The processor and
the prompt format's special tokens are in `gemma3n_processor`, the tiny model in `gemma3n_tiny`.

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
from pathlib import Path
from typing import Any

import torch

from finetune.data import media as M
from finetune.errors import ConfigError
from finetune.families import gemma3n_tiny as tiny
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family, LoadedModel, LoadSpec, Stack, TowerShapes
from finetune.families.gemma3n_processor import (
    AUDIO_TOKEN,
    BOA,
    BOI,
    BOS,
    END_TURN,
    EOA,
    EOI,
    IMAGE_TOKEN,
    START_TURN,
    Gemma3nOmniProcessor,
)
from finetune.families.gemma3n_timm import transformers_class as _hf
from finetune.families.shared import TemplateTokens, chat_turns

PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
    "generation_config.json",
)


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
        out = TemplateTokens(proc)
        out.special(BOS)

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
            out.special(START_TURN)
            out.text(("model" if msg.role == "assistant" else msg.role) + "\n" + (prefix if i == 0 else ""))
            for part in msg.parts:
                if part.type == "text":
                    out.text((part.text or "").strip(), learn)
                elif part.type == "image":
                    for _ in range(on_image(part)):
                        out.text("\n\n")
                        out.special(BOI)
                        out.special(IMAGE_TOKEN, n=proc.image_seq_length)
                        out.special(EOI)
                        out.text("\n\n")
                elif part.type == "audio":
                    for _ in range(on_audio(part)):  # each clip its own block, as the processor gives clips in turn
                        out.text("\n\n")
                        out.special(BOA)
                        out.special(AUDIO_TOKEN, n=proc.audio_seq_length)
                        out.special(EOA)
                        out.text("\n\n")
                else:
                    raise ConfigError(f"{getattr(sample, 'where', '')}: Gemma 3n takes text, image and audio "
                                      f"parts, not {part.type}")
            out.special(END_TURN, learn)
            out.text("\n")
        if for_generation:
            out.special(START_TURN)
            out.text("model\n")
        return out.done()

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

    def tower_shapes(self, config) -> TowerShapes:
        t, a, v = config.text_config, config.audio_config, config.vision_config
        ffn = t.intermediate_size if isinstance(t.intermediate_size, int) else max(t.intermediate_size)
        return TowerShapes(llm=Stack(t.hidden_size, t.num_hidden_layers, ffn, t.num_attention_heads, True),
                           # MobileNetV5 is a CNN, not a transformer stack: counted coarsely as one wide layer
                           # over its output grid (it is frozen in the recipes; only transient bytes count)
                           vision=Stack(v.hidden_size, 1, 4 * v.hidden_size, 8, False),
                           audio=Stack(a.hidden_size, a.conf_num_hidden_layers, 4 * a.hidden_size,
                                       a.conf_num_attention_heads, False),
                           vocab=t.vocab_size, patches_per_token=1,
                           frames_per_audio_token=a.conf_reduction_factor)  # conformer frames per soft token

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

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_tiny}

    # ---- export: transformers' tensor names (the tied output matrix once, as the base holds it), base
    # tensors the model does not hold copied as they are, the config transformers writes for it
    def prepare_merged(self, model, loaded: LoadedModel) -> None:
        super().prepare_merged(model, loaded)
        # load() may have switched AltUp's training-time clip off; the export keeps the base's
        model.config.get_text_config().altup_coef_clip = \
            _hf(self.hf_config).from_pretrained(str(loaded.base_path)).text_config.altup_coef_clip

    def export_class(self) -> type:
        return _hf(self.hf_model)


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


