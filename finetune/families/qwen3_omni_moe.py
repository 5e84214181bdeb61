"""The Qwen3-Omni family (Qwen3-Omni-30B-A3B): a MoE thinker is trained; talker and code2wav kept.

Qwen3-Omni keeps Qwen2.5-Omni's layout (a thinker with `model.visual`, `model.audio_tower`,
`model.language_model` and `lm_head`; a full checkpoint adds the speech output under `talker.`
and `code2wav.`), so this family extends that one and changes what differs (its processor is
`shared.Qwen3OmniProcessor`, its tiny model in `qwen3_omni_moe_tiny`):

- the LLM is a mixture of experts: 128 experts, 8 active per token, stored fused as
  `mlp.experts.gate_up_proj` [experts, 2*moe_ffn, hidden] and `mlp.experts.down_proj`
  [experts, hidden, moe_ffn] parameters, with a router `mlp.gate` per layer. LoRA on the
  experts is PEFT's `target_parameters` (`roles.llm.experts: lora`); the router is frozen
  unless `roles.llm.router: full`; the load-balancing loss is reported every step and added
  with `train.router_aux_loss_coef` when either trains (`Family.expert_params`, `router_modules`);
- the vision tower has DeepStack mergers (`model.visual.merger_list`, features added to the
  first LLM layers): they are part of `vision_projector` with the final merger;
- the audio tower downsamples with three stride-2 convolutions over 100-frame chunks (13 tokens
  per second) and projects with `proj1`/`proj2` (`audio_projector`);
- the special tokens: `<|vision_start|><|image_pad|>...<|vision_end|>`, `<|audio_start|>
  <|audio_pad|>...<|audio_end|>`; 16-pixel patches normalised with mean = std = 0.5;
- the processor reads a clip of any length whole (no 300 s cut), and a video read with its sound
  interleaves the sound's tokens with the video's token by token by time (13 positions a second),
  not in 2 s chunks.

Packing exactness of the audio tower: transformers pads every chunk of a batch to its longest
chunk and (unlike Qwen2.5-Omni) does not mask the padding between its convolutions. A clip of
1 s or more is padded to the full chunk (100 mel frames) alone too, so it encodes the same in any
batch; a clip shorter than one chunk is not padded at all alone, but beside a longer clip its
chunk is, and its last rows move (logits by ~5e-2 on the tiny model). `load` therefore masks
those clips' padding between the convolutions (`mask_short_clip_padding`), which gives every
clip in a batch what it gets alone; the collator pads every chunk to the full chunk and passes
the short clips' lengths, so the towers read nothing from the device.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from finetune.families import qwen3_omni_moe_tiny as tiny
from finetune.families.base import Family, Stack, TowerShapes
from finetune.families.qwen2_5_omni import Qwen25OmniFamily, _video_token_times
from finetune.families.shared import PROCESSOR_FILES, Qwen3OmniProcessor


def audio_tokens(frames, n_window: int = 50):
    """Audio tokens (tower output rows) of clips of `frames` mel frames: transformers' arithmetic
    (100-frame chunks give 13 each; the last, shorter one its three stride-2 convolutions' length)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(frames, n_window)


class _TowerInputs:
    """The inputs Qwen3-Omni's towers derive from the grids and clip lengths (vision: boundaries,
    rotary positions, position-embedding interpolation; audio: padded chunks, the valid rows
    after the convolutions, attention windows), computed on the host in the collator by
    transformers' helpers, with every audio chunk padded to the full chunk (module docstring)."""

    def __init__(self, config):
        v, a = config.vision_config, config.audio_config
        self.merge, self.side = v.spatial_merge_size, int(v.num_position_embeddings ** 0.5)
        self.n_window, self.n_window_infer = a.n_window, a.n_window_infer

    def __call__(self, batch: dict) -> dict:
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_interpolation_indices_and_weights,
            get_vision_position_ids,
        )

        out: dict[str, Any] = {}
        for kind, key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
            grid = batch.get(key)
            if grid is None:
                continue
            cu = get_vision_cu_seqlens(grid)
            idx, w = get_vision_interpolation_indices_and_weights(grid, num_grid_per_side=self.side, mode="bilinear",
                                                                  align_corners=True, spatial_merge_size=self.merge)
            out.update({f"{kind}_cu_seqlens": cu, f"{kind}_max_seqlen": int((cu[1:] - cu[:-1]).max()),
                        f"{kind}_position_ids": get_vision_position_ids(grid, self.merge),
                        f"{kind}_interp_indices": idx, f"{kind}_interp_weights": w})
        if batch.get("input_features") is not None:
            out.update(self.audio(batch["input_features"], batch["feature_attention_mask"]))
        return out

    def audio(self, features: torch.Tensor, mask: torch.Tensor) -> dict:
        chunk = 2 * self.n_window
        lens = mask.sum(-1)
        flat = features.permute(0, 2, 1)[mask.bool()]  # [frames of all clips, mel], as the thinker gathers them
        sizes: list[int] = []
        for n in lens.tolist():
            sizes += [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
        chunk_lengths = torch.tensor(sizes, dtype=torch.long)
        padded = flat.new_zeros(len(sizes), flat.shape[1], chunk)
        for i, part in enumerate(flat.split(sizes)):
            padded[i, :, : part.shape[0]] = part.T
        rows = int(audio_tokens(torch.tensor(chunk), self.n_window))  # rows of a full chunk after the convolutions
        valid = (torch.arange(rows) < audio_tokens(chunk_lengths, self.n_window)[:, None]).flatten().nonzero().squeeze(-1)
        window = rows * (self.n_window_infer // chunk)  # attention windows: whole chunks of each clip
        bounds = [0]
        for n in audio_tokens(lens, self.n_window).tolist():
            bounds += [window] * (n // window) + ([n % window] if n % window else [])
        cu = torch.tensor(bounds, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return {"audio_padded_feature": padded, "audio_chunk_lengths": chunk_lengths, "audio_valid_indices": valid,
                "audio_cu_seqlens": cu, "audio_max_seqlen": int((cu[1:] - cu[:-1]).max()),
                SHORT_CHUNKS: short_chunk_lengths(lens.tolist(), chunk)}


#: the tower input (a host tuple) with each chunk's mel frames if its clip is shorter than one chunk, else 0
SHORT_CHUNKS = "audio_short_chunk_frames"


def short_chunk_lengths(clip_frames: list[int], chunk: int) -> tuple[int, ...]:
    """Per chunk of the batch: the clip's frames if the clip is shorter than one chunk, else 0."""
    out: list[int] = []
    for n in clip_frames:
        out += [n] if n < chunk else [0] * math.ceil(n / chunk)
    return tuple(out)


def _conv_out(n: int) -> int:
    return (n - 1) // 2 + 1  # a stride-2 convolution with kernel 3 and padding 1


def mask_short_clip_padding(model) -> None:
    """Zero the padding of chunks from clips shorter than one chunk before the audio tower's 2nd and
    3rd convolutions, as their own zero padding is when the clip is alone (module docstring).
    Hooks only: module names and weights are unchanged. Idempotent."""
    tower = Family.submodule(model, "model.audio_tower")
    if tower is None or getattr(tower, "_short_clip_masks", False):
        return
    state: dict = {}
    chunk = 2 * tower.n_window

    def before_tower(mod, args, kwargs):
        short = kwargs.pop(SHORT_CHUNKS.removeprefix("audio_"), None)
        if short is None:  # not from our collator: the clip lengths from the call (a device read)
            lens = kwargs.get("feature_lens", args[1] if len(args) > 1 else None)
            short = short_chunk_lengths([int(n) for n in lens.tolist()], chunk)
        state.update(short=short, seen={2: 0, 3: 0})
        return args, kwargs

    def before_conv(stage):
        def hook(mod, args):
            x = args[0]
            first = state["seen"][stage]
            state["seen"][stage] += x.shape[0]
            frames = state["short"][first:first + x.shape[0]]
            if not any(frames):
                return None
            # valid columns of this conv's input: the earlier convolutions' output length of the clip
            keep = [x.shape[-1] if not n else _conv_out(n) if stage == 2 else _conv_out(_conv_out(n)) for n in frames]
            mask = torch.arange(x.shape[-1], device=x.device) < torch.tensor(keep, device=x.device)[:, None]
            return (x * mask[:, None, None, :].to(x.dtype),)
        return hook

    tower.register_forward_pre_hook(before_tower, with_kwargs=True)
    tower.conv2d2.register_forward_pre_hook(before_conv(2))
    tower.conv2d3.register_forward_pre_hook(before_conv(3))
    tower._short_clip_masks = True


class Qwen3OmniMoeFamily(Qwen25OmniFamily):
    """Qwen3-Omni (30B-A3B): the MoE thinker is trained, talker/code2wav kept for export."""

    name = "qwen3_omni_moe"
    model_types = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
    title = "Qwen3-Omni"
    modalities = frozenset({"image", "audio", "video"})
    hf_thinker, hf_full = "Qwen3OmniMoeThinkerForConditionalGeneration", "Qwen3OmniMoeForConditionalGeneration"
    hf_thinker_config, hf_full_config = "Qwen3OmniMoeThinkerConfig", "Qwen3OmniMoeConfig"
    hf_processor = "Qwen3OmniMoeProcessor"
    placeholder_keys = {"image": "image_token_id", "video": "video_token_id", "audio": "audio_token_id"}
    shipped_configs = ("qwen3_omni_moe_30b_a3b.json",)
    role_prefixes = {
        "llm": ("model.language_model",),
        "embeddings": ("model.language_model.embed_tokens",),
        "lm_head": ("lm_head",),
        "vision_encoder": ("model.visual",),
        "vision_projector": ("model.visual.merger", "model.visual.merger_list"),
        "audio_encoder": ("model.audio_tower",),
        "audio_projector": ("model.audio_tower.proj1", "model.audio_tower.proj2"),
    }
    expert_params = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
    router_modules = ("mlp.gate",)
    processor_files = PROCESSOR_FILES
    processor_class = Qwen3OmniProcessor
    folder_hint = ("Real weights are read from a local folder (download it once, e.g. with "
                   "`huggingface-cli download Qwen/Qwen3-Omni-30B-A3B-Instruct --local-dir DIR`)")
    quant_skip = ["lm_head", "model.visual", "model.audio_tower"]

    def aux_loss(self, outputs, inputs: dict, text_config) -> torch.Tensor:
        """The model's own load-balancing loss, or (the label head returns the router logits only)
        transformers' Mixtral-style one computed over every token (packed rows carry no mask), as the
        thinker computes it."""
        if getattr(outputs, "aux_loss", None) is not None:
            return outputs.aux_loss
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

        return load_balancing_loss_func(outputs.router_logits, text_config.num_experts,
                                        text_config.num_experts_per_tok, inputs.get("attention_mask"))

    def patch_loaded(self, model):
        model = super().patch_loaded(model)
        mask_short_clip_padding(model)
        return model

    def rope_class(self):
        from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as m

        return m.Qwen3OmniMoePreTrainedModelForConditionalGeneration

    def rope_index(self, model_or_config):
        return _IntegralRope(super().rope_index(model_or_config))

    def audio_tokens(self, frames: int, processor) -> int:
        return int(audio_tokens(torch.tensor(frames), processor.n_window))

    def max_audio_samples(self, processor) -> int | None:
        """None: the processor pads clips to the longest and never truncates (`truncation: False`)."""
        return None

    def video_sound_tokens(self, grid, seconds_per_grid: float, n_audio: int, processor) -> list[int]:
        """The placeholders of a video read with its sound, as Qwen3-Omni's processor lays them out:
        token by token by time (a video token at t x seconds_per_grid x position_id_per_seconds before
        the sound's tokens at or after it; the sound's tokens one position apart)."""
        tid = processor.ids()
        video_at = _video_token_times(grid, seconds_per_grid, processor)
        out, v, a = [], 0, 0
        while v < len(video_at) and a < n_audio:
            if video_at[v] <= a:
                out.append(tid["video"])
                v += 1
            else:
                out.append(tid["audio"])
                a += 1
        return out + [tid["video"]] * (len(video_at) - v) + [tid["audio"]] * (n_audio - a)

    def audio_rows(self, lengths: torch.Tensor, config: dict) -> int:
        return int(audio_tokens(lengths, int(config.get("audio_config", {}).get("n_window", 50))).sum())

    def tower_inputs(self, model_or_config):
        return _TowerInputs(getattr(model_or_config, "config", model_or_config))

    def tower_shapes(self, config) -> TowerShapes:
        t, v, a = config.text_config, config.vision_config, config.audio_config
        # the MLP a token runs: its top-k experts (SwiGLU each), as one MLP k times as wide
        return TowerShapes(llm=Stack(t.hidden_size, t.num_hidden_layers, t.moe_intermediate_size * t.num_experts_per_tok,
                                     t.num_attention_heads, True),
                           vision=Stack(v.hidden_size, v.depth, v.intermediate_size, v.num_heads, False),
                           audio=Stack(a.d_model, a.encoder_layers, a.encoder_ffn_dim, a.encoder_attention_heads, False),
                           vocab=t.vocab_size, patches_per_token=v.spatial_merge_size ** 2,
                           frames_per_audio_token=8)  # 100 mel frames -> 13 tokens after three stride-2 convolutions

    def merged_layout(self, full: bool, kept: list[str]) -> str:
        return "qwen3_omni_moe (thinker + talker + code2wav)" if full else "qwen3_omni_moe_thinker"

    def tiny_models(self) -> dict:
        return {self.name: tiny.materialize_thinker, f"{self.name}-full": tiny.materialize_full}


class _IntegralRope:
    """Qwen3-Omni's index code returns float positions: integral ones are kept as integers (the
    packed rows' dtype), fractional ones (video at fps where seconds per grid x 13 is not whole)
    as they are."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_ids: torch.Tensor, media: dict) -> torch.Tensor:
        pos = self.inner(input_ids, media)
        return pos.long() if torch.equal(pos, pos.round()) else pos
