"""The tiny random Nemotron-3-Nano-Omni built in code (tests, the CPU demo): the real architecture
(RADIO vision tower with its pixel-shuffle projector, Parakeet conformer with its projector, a
NemotronH LLM mixing Mamba-2, attention and MoE layers) at small widths, with a byte-level BPE
tokenizer carrying the released model's special tokens and the processor files its folder needs.

`tiny:nemotron_omni`, built once into the tiny cache.

The hybrid has every layer kind twice over five layers (Mamba, MoE, attention, Mamba, MoE) and a
Mamba chunk of 16 tokens, so a packed row of demo samples puts sample boundaries inside chunks
and on chunk edges. Weights start with std 0.1 (about 1/sqrt(width)), as in the other tiny
families; the library's 0.02 suits widths in the thousands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from finetune.families.nemotron_omni_processor import (AUDIO, AUDIO_END, AUDIO_START, IM_END, IM_START, IMAGE,
                                                       IMG_END, IMG_START, PAD, THINK, THINK_END, VIDEO)
from finetune.families.shared import materialize
from finetune.families.tiny import build_bpe_tokenizer

CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "nemotron_omni.chat_template.jinja").read_text()

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", PAD, IM_START, IM_END, THINK, THINK_END, IMAGE, IMG_START, IMG_END, VIDEO,
                  AUDIO, AUDIO_START, AUDIO_END]

#: the tiny processor's image budget: at most 64 patches of 16 pixels (16 image tokens after the
#: 2x2 pixel shuffle), at least 16; the tiny model's context for the processor's budget arithmetic
TINY_MIN_PATCHES, TINY_MAX_PATCHES, TINY_MAX_MODEL_LEN = 16, 64, 4096
TINY_VERSION = 1


def materialize_tiny(seed: int = 0) -> Path:
    """`tiny:nemotron_omni`: the tiny model's folder, built on first use."""
    return materialize(f"nemotron_omni-s{seed}-v{TINY_VERSION}", lambda d: build(d, seed))


def build_tokenizer():
    """Byte-level BPE (trained in code) with Nemotron-3-Nano-Omni's chat and media special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_bpe_tokenizer(SPECIAL_TOKENS), bos_token="<s>", eos_token=IM_END, pad_token=PAD,
        unk_token="<unk>", chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO, "audio_token": AUDIO,
                              "image_start_token": IMG_START, "image_end_token": IMG_END})


def tiny_config(tok):
    """A small NemotronH_Omni_Reasoning_V3_Config (module docstring)."""
    from transformers import NemotronH_Omni_Reasoning_V3_Config

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    init = 0.1
    text = dict(vocab_size=int(math.ceil(len(tok) / 64) * 64), hidden_size=64,
                layers_block_type=["linear_attention", "moe", "full_attention", "linear_attention", "moe"],
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
                mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=16,
                n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                moe_shared_expert_intermediate_size=64, routed_scaling_factor=2.5, max_position_embeddings=4096,
                pad_token_id=ids[PAD], bos_token_id=ids["<s>"], eos_token_id=ids[IM_END], initializer_range=init)
    vision = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2.0, patch_size=16,
                  image_size=128, max_img_size=256, num_cls_tokens=2, num_registers=2, video_temporal_patch_size=2,
                  initializer_range=init)
    audio = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_mel_bins=128,
                 subsampling_conv_channels=8, conv_kernel_size=9, projection_hidden_size=64, projection_bias=False,
                 dropout=0.0, dropout_positions=0.0, layerdrop=0.0, activation_dropout=0.0, attention_dropout=0.0,
                 initializer_range=init)
    return NemotronH_Omni_Reasoning_V3_Config(
        vision_config=vision, text_config=text, audio_config=audio, force_image_size=128, downsample_ratio=0.5,
        vision_hidden_size=64, projector_hidden_size=128, image_token_id=ids[IMAGE], video_token_id=ids[VIDEO],
        audio_token_id=ids[AUDIO], tie_word_embeddings=False)


def processor_config(*, min_patches: int, max_patches: int, max_model_len: int) -> dict:
    """processor_config.json as transformers 5 writes a NemotronH_Omni_Reasoning_V3Processor: the
    image processor's and the Parakeet feature extractor's settings nested, the audio arithmetic flat."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    return {
        "processor_class": "NemotronH_Omni_Reasoning_V3Processor",
        "audio_sampling_rate": 16000, "audio_subsampling_factor": 8, "audio_hop_length": 160,
        "video_temporal_patch_dim": 2,
        "image_processor": {
            "image_processor_type": "NemotronH_Omni_Reasoning_V3ImageProcessor", "patch_size": 16,
            "downsample_ratio": 0.5, "min_num_patches": min_patches, "max_num_patches": max_patches,
            "max_model_len": max_model_len, "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD),
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "resample": 3},
        "feature_extractor": {
            "feature_extractor_type": "ParakeetFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
            "hop_length": 160, "n_fft": 512, "win_length": 400, "preemphasis": 0.97, "padding_value": 0.0,
            "padding_side": "right", "return_attention_mask": True},
    }


def build(folder: Path, seed: int = 0) -> None:
    """Write a random tiny Nemotron-3-Nano-Omni checkpoint with tokenizer and processor files."""
    from transformers import GenerationConfig, NemotronH_Omni_Reasoning_V3

    tok = build_tokenizer()
    cfg = tiny_config(tok)
    torch.manual_seed(seed)
    model = NemotronH_Omni_Reasoning_V3(cfg).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    (Path(folder) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (Path(folder) / "processor_config.json").write_text(json.dumps(
        processor_config(min_patches=TINY_MIN_PATCHES, max_patches=TINY_MAX_PATCHES, max_model_len=TINY_MAX_MODEL_LEN),
        indent=2, sort_keys=True))
    end, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(PAD)
    GenerationConfig(eos_token_id=[end], pad_token_id=pad, bos_token_id=tok.convert_tokens_to_ids("<s>"),
                     do_sample=False).save_pretrained(str(folder))
