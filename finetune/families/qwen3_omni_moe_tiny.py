"""The tiny Qwen3-Omni (`tiny:qwen3_omni_moe`, `tiny:qwen3_omni_moe-full`): a random MoE thinker with
the real architecture at small widths, a byte-level BPE tokenizer trained in code with the released
special tokens, and the processor files of a released folder; the full variant adds a random talker
and code2wav. Each is built once into the tiny cache.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from finetune.families.shared import (
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    IM_END,
    IM_START,
    IMAGE_PAD,
    PROCESSOR_FILES,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    materialize,
)
from finetune.families.tiny import build_bpe_tokenizer

NAME = "qwen3_omni_moe"
VERSION = 1

CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "qwen3_omni_moe.chat_template.jinja").read_text()


def materialize_thinker(seed: int = 0) -> Path:
    """`tiny:qwen3_omni_moe`: the tiny thinker's folder, built on first use."""
    return materialize(f"{NAME}-thinker-s{seed}-v{VERSION}", lambda d: build_tiny_thinker(d, seed))


def materialize_full(seed: int = 0) -> Path:
    """`tiny:qwen3_omni_moe-full`: the tiny thinker with the speech output (talker and code2wav) beside it."""
    return materialize(f"{NAME}-full-s{seed}-v{VERSION}", lambda d: build_tiny_full(d, materialize_thinker(seed), seed))


SPECIAL_TOKENS = ["<|endoftext|>", IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD, VIDEO_PAD,
                  AUDIO_START, AUDIO_END, "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", AUDIO_PAD]


def build_tiny_tokenizer():
    """The tiny Qwen3-Omni-style tokenizer (byte-level BPE trained in code, the released special tokens)."""
    from transformers import Qwen2Tokenizer


    return Qwen2Tokenizer(
        tokenizer_object=build_bpe_tokenizer(SPECIAL_TOKENS), eos_token=IM_END, pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens={"image_token": IMAGE_PAD, "audio_token": AUDIO_PAD, "video_token": VIDEO_PAD,
                              "vision_bos_token": VISION_START, "vision_eos_token": VISION_END,
                              "audio_bos_token": AUDIO_START, "audio_eos_token": AUDIO_END},
        chat_template=CHAT_TEMPLATE,
    )


def tiny_thinker_config(vocab_size: int, ids: dict):
    """A small Qwen3-Omni thinker: the real architecture (MoE LLM with 8 experts, 2 per token;
    DeepStack vision; chunked audio) with small widths, initialised with std 0.1 as the tiny
    Qwen2.5-Omni is (see its tiny_thinker_config)."""
    from transformers import Qwen3OmniMoeThinkerConfig

    hidden, init = 64, 0.1
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    return Qwen3OmniMoeThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, output_dim=hidden, n_window=50, n_window_infer=800,
                          downsample_hidden_size=16, max_source_positions=1500, initializer_range=init),
        vision_config=dict(depth=3, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1], initializer_range=init),
        text_config=dict(hidden_size=hidden, intermediate_size=64, moe_intermediate_size=48, num_experts=8,
                         num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, vocab_size=vocab_size, max_position_embeddings=4096, rope_parameters=rope,
                         rms_norm_eps=1e-6, initializer_range=init, router_aux_loss_coef=0.001),
        initializer_range=init, audio_token_id=ids[AUDIO_PAD], image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], audio_start_token_id=ids[AUDIO_START], audio_end_token_id=ids[AUDIO_END],
        vision_start_token_id=ids[VISION_START], vision_end_token_id=ids[VISION_END], position_id_per_seconds=13,
        seconds_per_chunk=2, user_token_id=0, tie_word_embeddings=False,
    )


def build_tiny_thinker(folder: Path, seed: int = 0) -> None:
    """Write a random tiny thinker checkpoint with tokenizer and processor files to `folder`."""
    from transformers import GenerationConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = tiny_thinker_config(int(math.ceil(len(tok) / 64) * 64), ids)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    write_processor_config(folder, min_pixels=64 * 64, max_pixels=32 * 32 * 1280)
    (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    GenerationConfig(eos_token_id=[ids[IM_END], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
                     do_sample=False).save_pretrained(str(folder))


def build_tiny_full(folder: Path, thinker_dir: Path, seed: int = 0) -> None:
    """A random tiny Qwen3-Omni with talker (MoE, code predictor) and code2wav; its thinker is the tiny thinker."""
    from transformers import (
        Qwen3OmniMoeConfig,
        Qwen3OmniMoeForConditionalGeneration,
        Qwen3OmniMoeThinkerForConditionalGeneration,
    )

    thinker = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(str(thinker_dir), dtype=torch.float32)
    th = thinker.config
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    talker = dict(
        thinker_hidden_size=th.text_config.hidden_size, accept_hidden_layer=1, num_code_groups=4,
        text_config=dict(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.1,
                         rope_parameters={**rope, "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        code_predictor_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_code_groups=4,
                                   rope_parameters=rope, initializer_range=0.1),
        codec_pad_id=248, codec_bos_id=249, codec_eos_token_id=250, codec_nothink_id=251, codec_think_bos_id=252,
        codec_think_eos_id=253, speaker_id={"ethan": 240}, spatial_merge_size=2, position_id_per_seconds=13,
        audio_token_id=th.audio_token_id, image_token_id=th.image_token_id, video_token_id=th.video_token_id,
        vision_start_token_id=th.vision_start_token_id, audio_start_token_id=th.audio_start_token_id)
    code2wav = dict(codebook_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                    num_hidden_layers=1, num_quantizers=4, upsample_rates=[2, 2], upsampling_ratios=[2], decoder_dim=32,
                    sliding_window=8, rope_parameters=rope)
    tok = build_tiny_tokenizer()
    tid = tok.convert_tokens_to_ids
    cfg = Qwen3OmniMoeConfig(thinker_config=th.to_dict(), talker_config=talker, code2wav_config=code2wav,
                             im_start_token_id=tid(IM_START), im_end_token_id=tid(IM_END),
                             tts_pad_token_id=tid("<tts_pad>"), tts_bos_token_id=tid("<tts_text_bos>"),
                             tts_eos_token_id=tid("<tts_text_eod>"), system_token_id=0, user_token_id=0,
                             assistant_token_id=0)
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(cfg).eval()
    model.thinker.load_state_dict(thinker.state_dict())
    model.save_pretrained(str(folder), safe_serialization=True)
    for name in PROCESSOR_FILES:
        if (Path(thinker_dir) / name).exists() and not (Path(folder) / name).exists():
            shutil.copyfile(Path(thinker_dir) / name, Path(folder) / name)


def write_processor_config(folder: Path, *, min_pixels: int, max_pixels: int) -> None:
    """preprocessor_config.json in the flat layout the released Qwen3-Omni checkpoint ships."""
    cfg = {
        "processor_class": "Qwen3OmniMoeProcessor",
        "image_processor_type": "Qwen2VLImageProcessor",
        "feature_extractor_type": "WhisperFeatureExtractor",
        "patch_size": 16, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True,
        "do_convert_rgb": True, "resample": 3,
        "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
        "chunk_length": 300, "n_samples": 4800000, "nb_max_frames": 30000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
