"""Baichuan-Omni-1.5 for text-output fine-tuning: our own implementation, weight-compatible.

Parameter names and shapes follow the released checkpoint (`model_type: omni`), so its
safetensors load without trust_remote_code and without missing or unexpected keys for the
parts built here:

    model.embed_tokens, model.layers.N.{self_attn.W_pack, self_attn.o_proj, mlp.*, *_layernorm},
    model.norm, lm_head                           the LLM (Qwen2.5-7B geometry, q|k|v packed in W_pack)
    model.visual_model                            Qwen2-VL NaViT vision transformer (no merger)
    model.visual_bridge_model                     LayerNorm, 2x2 merge, MLP into the LLM width
    model.audio_embed_layers.K                    one embedding per codebook, summed
    audio_tokenizer.audio_model / .audio_bridge_model   Whisper-style encoder + residual VQ (frozen)

The speech-output parts (`audio_head`, `audio_tokenizer.audio_decoder`,
`audio_tokenizer.audio_flow_matching_decoder`) are not built: text answers never use them,
and export copies their tensors unchanged from the base checkpoint.

Differences from the released code, on purpose: positions are 1-D and may restart per packed
sample (RoPE is relative, so a sample's logits are the same); the attention goes through
transformers' attention interface (eager, sdpa, flash-attention, our `varlen`), which builds
block-diagonal masks for packed rows; the loss is computed here (the reference's forward
ignores `labels`); and `embed_tokens` has no padding_idx (the reference's config says pad id 0,
the ordinary token "!", whose embedding would then never learn).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import eager_attention_forward

from finetune.families.baichuan_audio import AudioEncoder, AudioTokenizer, _sinusoids

# transformers 5.24 renamed the mask builder's `past_key_values` argument to `cache`
_MASK_CACHE_ARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"

IMAGE_PAD = "<img_pad_baichuan>"
VIDEO_PAD = "<video_palce_baichuan>"  # sic: the released tokenizer spells it so
AUDIO_PAD = "<audio_pad_baichuan>"


class BaichuanOmniConfig(PreTrainedConfig):
    """The released config.json (model_type `omni`); unknown keys are kept as they are."""

    model_type = "omni"

    def __init__(self, vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, head_dim=128, hidden_act="silu",
                 max_position_embeddings=8192, rms_norm_eps=1e-6, rope_theta=1e6, attention_qkv_bias=True,
                 tie_word_embeddings=False, visual_config=None, audio_config=None, video_config=None,
                 use_cache=True, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.attention_qkv_bias = attention_qkv_bias
        self.visual_config = dict(visual_config or {})
        self.audio_config = dict(audio_config or {})
        self.video_config = dict(video_config or {})
        self.use_cache = use_cache
        self.sliding_window = None
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    # transformers' mask and generation utilities read these
    def get_text_config(self, *args, **kwargs):
        return self


# ---- the LLM ----------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RotaryEmbedding(nn.Module):
    """1-D RoPE over the whole head dimension (rotate-half form), angles in float32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


class Attention(nn.Module):
    """Grouped-query attention whose q, k and v come from one packed projection (q | k | v)."""

    def __init__(self, config: BaichuanOmniConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.num_key_value_groups = self.n_heads // self.n_kv
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.attention_dropout = 0.0
        self.W_pack = nn.Linear(config.hidden_size, (self.n_heads + 2 * self.n_kv) * self.head_dim,
                                bias=config.attention_qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None, **kwargs):
        B, L, _ = hidden_states.shape
        q, k, v = self.W_pack(hidden_states).split(
            [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        impl = self.config._attn_implementation
        fn = eager_attention_forward if impl in (None, "eager") else ALL_ATTENTION_FUNCTIONS[impl]
        out, _ = fn(self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(out.reshape(B, L, -1).contiguous())


class MLP(nn.Module):
    def __init__(self, config: BaichuanOmniConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def _decoder_layer_cls():
    from transformers.modeling_layers import GradientCheckpointingLayer

    class DecoderLayer(GradientCheckpointingLayer):
        def __init__(self, config: BaichuanOmniConfig, layer_idx: int):
            super().__init__()
            self.self_attn = Attention(config, layer_idx)
            self.mlp = MLP(config)
            self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

        def forward(self, hidden_states, attention_mask=None, position_embeddings=None, past_key_values=None,
                    **kwargs):
            h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), position_embeddings,
                                               attention_mask, past_key_values, **kwargs)
            return h + self.mlp(self.post_attention_layernorm(h))

    return DecoderLayer


# ---- vision -----------------------------------------------------------------------------------
def vision_config(cfg: BaichuanOmniConfig):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    v = cfg.visual_config
    return Qwen2VLVisionConfig(
        depth=v.get("depth", 32), embed_dim=v.get("embed_dim", 1280), hidden_size=cfg.hidden_size,
        hidden_act=v.get("hidden_act", "quick_gelu"), mlp_ratio=v.get("mlp_ratio", 4),
        num_heads=v.get("num_heads", 16), in_channels=v.get("in_channels", v.get("in_chans", 3)),
        patch_size=v.get("patch_size", 14), spatial_merge_size=v.get("spatial_merge_size", v.get("merge_size", 2)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        # the model's own init scale (a checkpoint overwrites it; the tiny random model uses 0.1 throughout)
        initializer_range=getattr(cfg, "initializer_range", 0.02))


def build_visual_model(cfg: BaichuanOmniConfig) -> nn.Module:
    """Qwen2-VL's vision transformer without its own merger (the bridge is a separate module)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    vcfg = vision_config(cfg)
    vcfg._attn_implementation = "sdpa"
    model = Qwen2VisionTransformerPretrainedModel(vcfg)
    model.merger = nn.Identity()  # no parameters: the checkpoint has none there
    return model


def build_visual_bridge(cfg: BaichuanOmniConfig) -> nn.Module:
    """LayerNorm per patch, 2x2 patches concatenated, Linear-GELU-Linear into the LLM width."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    v = cfg.visual_config
    return PatchMerger(dim=cfg.hidden_size, context_dim=v.get("embed_dim", 1280),
                       spatial_merge_size=v.get("spatial_merge_size", v.get("merge_size", 2)))


# ---- the model --------------------------------------------------------------------------------
class BaichuanOmniPreTrainedModel(PreTrainedModel):
    config_class = BaichuanOmniConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["DecoderLayer", "Qwen2VLVisionBlock"]
    # speech-output parts of the released checkpoint are not part of this model (export copies them)
    _keys_to_ignore_on_load_unexpected = [r"^audio_head\.", r"^audio_tokenizer\.audio_decoder\.",
                                          r"^audio_tokenizer\.audio_flow_matching_decoder\."]

    def _init_weights(self, module):
        """The library's initialisation, plus the buffers only we know how to compute.

        transformers builds models on the meta device and fills what the checkpoint lacks from
        here, non-persistent buffers included: without this the LLM's RoPE frequencies (and the
        audio encoder's sinusoids, if a checkpoint omits them) would be uninitialised memory.
        """
        from transformers import initialization as init


        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, AudioEncoder):
            pe = module.positional_embedding
            init.copy_(pe, _sinusoids(pe.shape[0], pe.shape[1]).to(pe.dtype))
        else:
            super()._init_weights(module)


class BaichuanOmniModel(BaichuanOmniPreTrainedModel):
    def __init__(self, config: BaichuanOmniConfig):
        super().__init__(config)
        layer_cls = _decoder_layer_cls()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([layer_cls(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta)
        if config.visual_config.get("enable", True):
            self.visual_model = build_visual_model(config)
            self.visual_bridge_model = build_visual_bridge(config)
        sizes = config.audio_config.get("vq_config", {}).get("codebook_sizes", [])
        if config.audio_config.get("enable", True) and sizes:
            self.audio_embed_layers = nn.ModuleList([nn.Embedding(s + 1, config.hidden_size) for s in sizes])
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def audio_tokenizer(self):
        """The (frozen) audio tokenizer; it lives at the top of the released checkpoint
        (`audio_tokenizer.*`), so it is held by the causal-LM wrapper and only referenced here."""
        tok = self.__dict__.get("_audio_tokenizer")
        if tok is None:
            raise ValueError("audio input needs the audio tokenizer: use BaichuanOmniForCausalLM")
        return tok

    # ---- multimodal inputs -> embeddings -------------------------------------------------
    def _token_id(self, name: str) -> int:
        ids = {IMAGE_PAD: ("visual_config", "image_pad_token_id"),
               VIDEO_PAD: ("video_config", "video_place_token_id"),
               AUDIO_PAD: ("audio_config", "audio_pad_token_id")}
        section, key = ids[name]
        return int(getattr(self.config, section)[key])

    def _scatter(self, embeds, input_ids, token_id, features):
        mask = input_ids == token_id
        # checked on the device without waiting for it (data check and the pre-pass check it early)
        torch._assert_async(mask.sum() == features.shape[0],
                            f"the placeholder tokens (id {token_id}) are not {features.shape[0]}, the feature rows")
        return embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
              video_grid_thw=None, audio_features=None, audio_codes=None, decoding: bool = False,
              vision_inputs: dict | None = None):
        """Token embeddings with the media features scattered onto their placeholder tokens.

        `decoding` (a cache that already holds tokens): media belong to the prompt that carries
        their placeholders. A decoding step's new tokens have none, so whatever media inputs a
        generation loop hands over again are ignored; new input that does carry placeholders
        (a continued conversation) gets its media as usual. Training never decodes, so its
        placeholder checks stay strict (and cost no extra device sync).
        """
        embeds = self.embed_tokens(input_ids)
        if decoding:
            def carries(name):
                return bool((input_ids == self._token_id(name)).any())

            if not carries(AUDIO_PAD):
                audio_features = audio_codes = None
            if not carries(IMAGE_PAD):
                pixel_values = image_grid_thw = None
            if not carries(VIDEO_PAD):
                pixel_values_videos = video_grid_thw = None
        if audio_codes is None and audio_features:
            audio_codes = self.audio_tokenizer().encode(audio_features)  # frozen: codes only
        if audio_codes is not None and audio_codes.numel():
            a = sum(layer(audio_codes[:, i]) for i, layer in enumerate(self.audio_embed_layers))
            embeds = self._scatter(embeds, input_ids, self._token_id(AUDIO_PAD), a)
        pix = [p for p in (pixel_values, pixel_values_videos) if p is not None and p.numel()]
        if pix:
            grids = torch.cat([g for g, p in ((image_grid_thw, pixel_values), (video_grid_thw, pixel_values_videos))
                               if p is not None and p.numel()])
            # the tower's positions and boundaries, and the image rows' count, from the collator
            # (host values, BaichuanOmniFamily.tower_inputs) when it gives them
            vi = dict(vision_inputs or {})
            n_img = vi.pop("image_rows", None)
            patches = self.visual_model(torch.cat(pix), grid_thw=grids, **vi).last_hidden_state
            feats = self.visual_bridge_model(patches)
            if pixel_values is not None and pixel_values.numel():
                if n_img is None:
                    n_img = int(image_grid_thw.prod(-1).sum()) // self.visual_model.spatial_merge_size ** 2
                embeds = self._scatter(embeds, input_ids, self._token_id(IMAGE_PAD), feats[:n_img])
            if pixel_values_videos is not None and pixel_values_videos.numel():
                embeds = self._scatter(embeds, input_ids, self._token_id(VIDEO_PAD), feats[n_img:])
        return embeds

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, cache_position=None, pixel_values=None, image_grid_thw=None,
                pixel_values_videos=None, video_grid_thw=None, audio_features=None, audio_codes=None, cache=None,
                vision_inputs=None, **kwargs):
        """The LLM on text with the media scattered in (also what TRL's fused LM head calls).

        The KV cache arrives as `past_key_values` (transformers <= 5.23) or `cache` (5.24+)."""
        past_key_values = past_key_values if past_key_values is not None else cache
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                       audio_features, audio_codes, decoding=past > 0, vision_inputs=vision_inputs)
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if position_ids is None:
            if cache_position is None:
                cache_position = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = cache_position.unsqueeze(0)
        if kwargs.get("cu_seq_lens_q") is not None and attention_mask is None:
            # a packed row with its sample boundaries given, for a backend that takes them (varlen,
            # flash-attention): no mask to build, and no reading of the positions to find the
            # samples (create_causal_mask's packed-row detection waits for the device)
            mask = None
        else:
            mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=position_ids, **{_MASK_CACHE_ARG: past_key_values})
        h = inputs_embeds
        pos_emb = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask, position_embeddings=pos_emb, past_key_values=past_key_values,
                      position_ids=position_ids, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), past_key_values=past_key_values)


class BaichuanOmniForCausalLM(BaichuanOmniPreTrainedModel, GenerationMixin):
    """The trainable part of Baichuan-Omni-1.5: LLM, vision, audio code embeddings, audio tokenizer."""

    _tied_weights_keys: dict = {}

    def __init__(self, config: BaichuanOmniConfig):
        super().__init__(config)

        self.model = BaichuanOmniModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if hasattr(self.model, "audio_embed_layers"):
            self.audio_tokenizer = AudioTokenizer.from_config(config.audio_config)
            self.model.__dict__["_audio_tokenizer"] = self.audio_tokenizer  # a reference, not a submodule
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, cache_position=None, logits_to_keep=0,
                pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                audio_features=None, audio_codes=None, cache=None, vision_inputs=None, **kwargs: Any):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values if past_key_values is not None else cache,
                         inputs_embeds=inputs_embeds, use_cache=use_cache,
                         cache_position=cache_position, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                         pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                         audio_features=audio_features, audio_codes=audio_codes, vision_inputs=vision_inputs, **kwargs)
        h = out.last_hidden_state
        sl = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(h[:, sl])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
