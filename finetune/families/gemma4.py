"""The Gemma 4 family (E2B, E4B): `Gemma4ForConditionalGeneration`, text + image + audio + video in, text out.

The model: a ViT vision tower (16-pixel patches, learned 2-D position embeddings plus axial 2-D
RoPE, a k x k average pool to soft tokens), a USM-style conformer audio tower (two stride-2
convolutions, then chunked local attention: causal, 12 frames of context, 40 ms per soft token),
one multimodal embedder per tower, and a decoder with per-layer token embeddings (PLE), sliding
window layers (512) interleaved with global ones (different head widths, proportional RoPE),
KV sharing across the last layers, and logits soft-capped at 30. 1-D RoPE (no M-RoPE). The prompt
format and the processor are in `gemma4_processor`, the tiny model in `gemma4_tiny`.

Roles, by module path:

- `vision_encoder` = `model.vision_tower`; `vision_projector` = `model.embed_vision`;
  `audio_encoder` = `model.audio_tower`; `audio_projector` = `model.embed_audio`;
- `llm` = `model.language_model`: the decoder layers and what runs beside them. The KV-shared
  layers (the last 18 of E4B, 20 of E2B) are decoder layers without k/v projections (they read
  the keys and values of the last unshared layer of their kind): they are `llm` like the others,
  and LoRA on the LLM adapts their q/o projections and MLPs. The per-layer input path that mixes
  the hidden state into each layer's PLE vector (`per_layer_model_projection`,
  `per_layer_projection_norm`, each layer's `per_layer_input_gate` / `per_layer_projection` and
  their norm) is `llm` too: it is made of the decoder's own linear layers, which QLoRA quantises
  and `all-linear` LoRA targets;
- `embeddings` = `model.language_model.embed_tokens_per_layer`: the per-layer token table
  (vocabulary x layers x 256: 2.8B parameters in E4B, 2.3B in E2B), an input embedding nothing
  else shares. It is a lookup table, not a linear layer: LoRA does not apply; it is frozen or full;
- `lm_head` = `lm_head` and `model.language_model.embed_tokens`: Gemma ties the output layer to
  the input embedding, so they are one matrix and one role. Training `lm_head` trains that matrix
  for both uses (PEFT's `ensure_weight_tying`); LoRA on it is refused (adapters.apply_roles).

Packing: every sample's positions restart at 0 and the sliding-window layers measure their
window from them (the varlen kernel takes the window: `finetune.kernels.varlen`); the KV-shared
layers attend with the same per-sample mask to keys computed per token, and the PLE vectors are
per token, so a packed row is exact on every LLM backend. Each image (or video frame) is its own
row of the vision tower's batch, padded to the same patch count with padding masked out, so its
2-D positions and attention never meet another image's; each audio clip is its own row of the
audio tower's batch, the padding masked (the subsampling convolutions zero it; the conformer's
attention and convolution are causal), so its chunking is the same alone or beside others.

The shipped configs (`finetune/configs/gemma4_e2b.json`, `gemma4_e4b.json`, for `plan` and the
benchmarks) are transformers' `Gemma4Config` written with the released models' values, as public
copies of their config.json give them: E2B 35 decoder layers of width 1536 (MLP 6144, double width
in the 20 KV-shared layers, one KV head, 4 sliding : 1 global), E4B 42 layers of width 2560 (MLP
10240, 18 KV-shared, two KV heads, 5 : 1); both head width 256 (512 global), window 512, per-layer
inputs of 256, a 262144-token vocabulary, soft-cap 30; the same 16-layer ViT (768 wide, 16-pixel
patches, 3 x 3 pooling) and 12-layer conformer (1024 wide, 1536 out); everything else transformers'
defaults for Gemma 4.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from finetune.data import media as M
from finetune.errors import ConfigError
from finetune.families import gemma4_tiny as tiny
from finetune.families.base import IGNORE_INDEX, EncodedSample, Family, LoadSpec, Stack, TowerShapes
from finetune.families.gemma4_processor import (
    AUDIO_TOKEN,
    BOA,
    BOI,
    BOS,
    END_TURN,
    EOA,
    EOI,
    IMAGE_TOKEN,
    PROCESSOR_FILES,
    RELEASED,
    START_TURN,
    VIDEO_TOKEN,
    Gemma4OmniProcessor,
    audio_rows,
    hf,
    read_video,
    strip_thinking,
    timestamp,
    write_processor_config,
)
from finetune.families.shared import TemplateTokens, chat_turns


class Gemma4Family(Family):
    """Gemma 4 (E2B, E4B): `Gemma4ForConditionalGeneration` is trained and exported as a whole."""

    name = "gemma4"
    model_types = ("gemma4",)
    title = "Gemma 4"
    hf_model, hf_config = "Gemma4ForConditionalGeneration", "Gemma4Config"
    mrope = False
    media_keys = {"image": "pixel_values", "audio": "input_features", "video": "pixel_values_videos"}
    modalities = frozenset({"image", "audio", "video"})  # its processor reads no sound from a video
    float_media = ("pixel_values", "input_features", "pixel_values_videos")
    shipped_configs = ("gemma4_e4b.json", "gemma4_e2b.json")  # E4B first: bench/gpu_step.py builds the first
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
    processor_class = Gemma4OmniProcessor
    folder_hint = ("Real weights are read from a local folder (download it once, e.g. with "
                   "`huggingface-cli download google/gemma-4-E4B-it --local-dir DIR`)")
    # QLoRA quantises the LLM's linear layers only: the towers, embedders and the tied output stay
    quant_skip = ["lm_head", "model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio"]

    # ---- loading -----------------------------------------------------------------------
    def load_model(self, folder: Path, kwargs: dict, spec: LoadSpec) -> torch.nn.Module:
        if spec.attn:
            kwargs["attn_implementation"] = tower_attention(spec.attn)
        return self.patch_loaded(hf(self.hf_model).from_pretrained(str(folder), **kwargs))

    def patch_loaded(self, model: torch.nn.Module) -> torch.nn.Module:
        """The KV-shared layers keep every position under a 2-D padding mask (the varlen backend's
        generation and probes before step 1; see full_length_under_padding_masks)."""
        full_length_under_padding_masks(model)
        return model

    def rope_index(self, model_or_config) -> None:
        return None  # 1-D RoPE: a sample's positions are 0..n-1

    def max_audio_samples(self, processor: Gemma4OmniProcessor) -> int | None:
        """The audio feature extractor's max_length (480000: 30 s), where the released processor cuts
        every longer clip (`truncation=True`; its 750-token cap is the same 30 s)."""
        return processor.max_audio_samples

    # ---- encoding ----------------------------------------------------------------------
    def _render(self, sample, proc: Gemma4OmniProcessor, for_generation: bool, on_image, on_audio, on_video):
        """The sample's token ids and labels in the chat template's layout, the media expanded as the
        processor expands them. `on_image(part)` gives the soft tokens of each image a part holds,
        `on_audio(part)` of each clip it is read as (one; or the consecutive clips of a split long
        one), `on_video(part)` (each frame's time in seconds, soft tokens per frame); each may
        process the media."""
        out = TemplateTokens(proc)
        out.special(BOS)

        def block(open_: str, token: str, n: int, close: str):
            out.special(open_)
            out.special(token, n=n)
            out.special(close)

        messages = chat_turns(sample, proc.system_prompt, for_generation)
        if messages and messages[0].role == "system":
            out.special(START_TURN)
            out.text("system\n" + messages[0].text().strip())
            out.special(END_TURN)
            out.text("\n")
            messages = messages[1:]
        for msg in messages:
            if msg.role not in ("user", "assistant"):
                raise ConfigError(f"{getattr(sample, 'where', '')}: Gemma 4 takes a system turn first, then user "
                                  f"and assistant turns, not a {msg.role!r} turn there")
            model_turn = msg.role == "assistant"
            learn = model_turn and msg.loss and not for_generation
            out.special(START_TURN)
            out.text(("model" if model_turn else msg.role) + "\n")
            for part in msg.parts:
                if part.type == "text":
                    t = part.text or ""
                    out.text(strip_thinking(t) if model_turn else t.strip(), learn)
                elif part.type == "image":
                    for n in on_image(part):
                        block(BOI, IMAGE_TOKEN, n, EOI)
                elif part.type == "audio":
                    for n in on_audio(part):  # each clip its own block, as the processor gives clips in turn
                        block(BOA, AUDIO_TOKEN, n, EOA)
                elif part.type == "video":
                    times, n = on_video(part)
                    for j, t in enumerate(times):
                        out.text(("" if j == 0 else " ") + timestamp(t) + " ")
                        block(BOI, VIDEO_TOKEN, n, EOI)
                else:
                    raise ConfigError(f"{getattr(sample, 'where', '')}: Gemma 4 takes text, image, audio and video "
                                      f"parts, not {part.type}")
            out.special(END_TURN, learn)
            out.text("\n")
        if for_generation:
            out.special(START_TURN)
            out.text("model\n")
        return out.done()

    def encode(self, sample, processor: Gemma4OmniProcessor, *, for_generation: bool = False,
               rope: Any = None) -> EncodedSample:
        pix: list[torch.Tensor] = []
        ppos: list[torch.Tensor] = []
        vpix: list[torch.Tensor] = []
        vpos: list[torch.Tensor] = []
        nframes: list[int] = []
        feats: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []

        def on_image(part) -> list[int]:
            counts = []
            for im in M.load_images(part):  # a NIfTI part may give several slices
                x, pos, n = processor.process_image(im)
                pix.append(x)
                ppos.append(pos)
                counts.append(n)
            return counts

        def on_audio(part) -> list[int]:
            wave = M.load_audio(part.path, processor.sampling_rate)
            counts = []
            for a, b in self.clip_spans(sample, part, processor, len(wave)):
                f, m = processor.process_audio(wave[a:b])
                feats.append(f)
                masks.append(m)
                counts.append(audio_rows(m))
            return counts

        def on_video(part) -> tuple[list[float], int]:
            frames, times = read_video(part, processor.video_max_frames, processor.video_fps)
            x, pos, n = processor.process_video(frames)
            vpix.append(x)
            vpos.append(pos)
            nframes.append(len(frames))
            return times, n

        ids, labels = self._render(sample, processor, for_generation, on_image, on_audio, on_video)
        media: dict[str, Any] = {}
        if pix:
            media["pixel_values"] = torch.stack(pix)
            media["image_position_ids"] = torch.stack(ppos)
        if vpix:
            media["pixel_values_videos"] = torch.cat(vpix)
            media["video_position_ids"] = torch.cat(vpos)
            media["num_frames_per_video"] = torch.tensor(nframes, dtype=torch.long)
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

    def count_tokens(self, sample, processor: Gemma4OmniProcessor) -> int:
        """From text, image sizes (headers), clip lengths (headers) and the videos' frames: every media
        item's token count follows from its size or length."""
        def images(part) -> list[int]:
            return [processor.image_tokens(w, h) for w, h in M.image_sizes(part)]

        def clips(part) -> list[int]:
            n = M.audio_samples(part.path, processor.sampling_rate)
            return [processor.audio_tokens(b - a) for a, b in self.clip_spans(sample, part, processor, n)]

        def video(part) -> tuple[list[float], int]:
            frames, times = read_video(part, processor.video_max_frames, processor.video_fps)
            return times, processor.frame_tokens(*frames[0].size)

        ids, _ = self._render(sample, processor, False, images, clips, video)
        return len(ids)

    def collate_media(self, batch: list[EncodedSample]) -> dict[str, Any]:
        return collate_media(batch)

    def media_placeholders(self, enc: EncodedSample, config: dict) -> list[tuple[str, int, int]]:
        k2 = int(config.get("vision_config", {}).get("pooling_kernel_size", 3)) ** 2
        out = []
        if "pixel_values" in enc.media:
            valid = (enc.media["image_position_ids"] != -1).all(-1).sum(-1)
            out.append(("image", int(config["image_token_id"]), int((valid // k2).sum())))
        if "pixel_values_videos" in enc.media:
            valid = (enc.media["video_position_ids"] != -1).all(-1).sum(-1)
            out.append(("video", int(config["video_token_id"]), int((valid // k2).sum())))
        if "input_features" in enc.media:
            out.append(("audio", int(config["audio_token_id"]),
                        sum(audio_rows(m) for m in enc.media["input_features_mask"])))
        return out

    def meta_model(self, config_path: Path):
        cfg = hf(self.hf_config).from_pretrained(str(config_path))
        with torch.device("meta"):
            return hf(self.hf_model)._from_config(cfg, dtype=torch.bfloat16), cfg

    def tower_shapes(self, config) -> TowerShapes:
        t, a, v = config.text_config, config.audio_config, config.vision_config
        ffn = t.intermediate_size * (2 if t.use_double_wide_mlp else 1)  # the KV-shared layers' MLP at most
        return TowerShapes(llm=Stack(t.hidden_size, t.num_hidden_layers, ffn, t.num_attention_heads, True),
                           vision=Stack(v.hidden_size, v.num_hidden_layers, v.intermediate_size,
                                        v.num_attention_heads, True),
                           audio=Stack(a.hidden_size, a.num_hidden_layers, 4 * a.hidden_size,
                                       a.num_attention_heads, False),
                           vocab=t.vocab_size, patches_per_token=v.pooling_kernel_size ** 2,
                           frames_per_audio_token=4)  # two stride-2 convolutions: 40 ms of 10 ms frames per token

    def usage(self, full_layout: bool) -> list[str]:
        return ["```python",
                f"from transformers import {self.hf_model}, Gemma4Processor",
                f"model = {self.hf_model}.from_pretrained(\"path/to/merged\", dtype=\"auto\")",
                "processor = Gemma4Processor.from_pretrained(\"path/to/merged\")",
                f"# the adapter instead: PeftModel.from_pretrained({self.hf_model}.from_pretrained(BASE), "
                "\"path/to/adapter_export\")",
                "```", "",
                "transformers' Gemma 4 video processor needs torchvision; images and audio do not."]

    def random_checkpoint(self, config_path: Path, folder: Path, dtype: torch.dtype,
                          llm_layers: int | None = None) -> None:
        """The random checkpoint of the real shapes (Family), with the released processor's settings
        beside it: its 16-pixel patches pooled 3 x 3 and 128 mel bins are what those shapes take."""
        super().random_checkpoint(config_path, folder, dtype, llm_layers)
        write_processor_config(folder, image=(RELEASED["patch_size"], RELEASED["max_soft_tokens"],
                                              RELEASED["pooling_kernel_size"]),
                               video=(RELEASED["video_patch_size"], RELEASED["video_max_soft_tokens"],
                                      RELEASED["video_pooling_kernel_size"]))

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_tiny}

    # ---- export: transformers' tensor names (the tied output matrix once, as the base holds it), base
    # tensors the model does not hold copied as they are, the config transformers writes for it
    def export_class(self) -> type:
        return hf(self.hf_model)


def full_length_under_padding_masks(model) -> None:
    """Let the KV-shared layers run on every position when a batch comes with a 2-D padding mask.

    Before its KV-shared layers the decoder keeps only the positions whose logits are asked for
    (`logits_to_keep`: the last one while generating), slicing each layer kind's mask as a 4-D one.
    The varlen backend, which training switches the LLM to, hands its mask function's 2-D padding
    mask through instead (a left-padded batch: the generation and probe checks before step 1), and
    the slice fails. With such a mask the cut is skipped: the shared layers compute all positions,
    the kept ones as before (they attend to the same keys), so the answers do not change."""
    text = model.model.language_model
    if getattr(text, "_full_length_under_padding_masks", False):
        return
    sliced = text._maybe_slice_kv_shared_inputs

    def maybe_slice(hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping, logits_to_keep,
                    cache, **kwargs):
        if any(isinstance(m, torch.Tensor) and m.dim() != 4 for m in causal_mask_mapping.values()):
            return hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping
        return sliced(hidden_states, per_layer_inputs, position_embeddings, causal_mask_mapping, logits_to_keep,
                      cache=cache, **kwargs)

    text._maybe_slice_kv_shared_inputs = maybe_slice
    text._full_length_under_padding_masks = True


def tower_attention(attn: str) -> dict:
    """The attention implementation per sub-model: the LLM's as asked; the vision tower SDPA (or
    eager with eager); the audio tower eager, its only implementation (chunked local attention)."""
    plain = "eager" if attn == "eager" else "sdpa"
    return {"": plain, "text_config": attn, "vision_config": plain, "audio_config": "eager"}


def collate_media(batch: list[EncodedSample]) -> dict[str, Any]:
    """Images and video frames stacked in sample order (each padded to its processor's patch count,
    with its 2-D positions), the videos' frame counts, and audio clips padded at the end to the
    longest with their valid-frame masks (the tower masks the padding: a clip's outputs do not change)."""
    out: dict[str, Any] = {}
    for key in ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                "num_frames_per_video"):
        parts = [e.media[key] for e in batch if key in e.media]
        if parts:
            out[key] = torch.cat(parts)
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
