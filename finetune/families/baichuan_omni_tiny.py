"""The tiny Baichuan-Omni-1.5 (`tiny:baichuan_omni`): our model with the released structure at small
widths, random weights, stand-in speech-output tensors in the same file (export copies them), the
released config.json layout, and a byte-level BPE tokenizer trained in code with Baichuan's special
tokens. Built once into the tiny cache.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from finetune.families.baichuan_model import BaichuanOmniConfig, BaichuanOmniForCausalLM
from finetune.families.baichuan_processor import (
    AUDIO_END,
    AUDIO_PAD,
    AUDIO_START,
    CHAT_TEMPLATE,
    EOT,
    IMG_END,
    IMG_PAD,
    IMG_START,
    SPECIAL_TOKENS,
    VIDEO_END,
    VIDEO_PAD,
    VIDEO_START,
)
from finetune.families.shared import materialize
from finetune.families.tiny import build_bpe_tokenizer

VERSION = 4  # 2: torch_dtype float32 in config.json; 3: library init (vision rope buffers); 4: chat template,
# and the vision tower initialised with the model's std 0.1 (it had the library's 0.02: a faint image signal)


def materialize_tiny(seed: int = 0) -> Path:
    """`tiny:baichuan_omni`: the tiny model's folder, built on first use."""
    return materialize(f"baichuan_omni-s{seed}-v{VERSION}", lambda d: build_tiny(d, seed))


def tiny_config(tok) -> dict:
    """config.json of a tiny Baichuan-Omni-1.5: the released structure with small widths."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = int(math.ceil(len(tok) / 64) * 64)
    return {
        "architectures": ["OmniForCausalLM"], "model_type": "omni", "vocab_size": vocab, "hidden_size": 64,
        "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "attention_qkv_bias": True, "tie_word_embeddings": False, "initializer_range": 0.1,
        "bos_token_id": ids[EOT], "eos_token_id": ids[EOT], "pad_token_id": ids[EOT], "use_cache": True,
        "torch_dtype": "float32",
        "visual_config": {"enable": True, "depth": 2, "embed_dim": 64, "num_heads": 4, "mlp_ratio": 2,
                          "hidden_act": "quick_gelu", "patch_size": 14, "merge_size": 2, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "in_channels": 3, "min_pixels": 3136, "max_pixels": 12544,
                          "image_start_token_id": ids[IMG_START], "image_end_token_id": ids[IMG_END],
                          "image_pad_token_id": ids[IMG_PAD],
                          "image_mean": [0.48145466, 0.4578275, 0.40821073],
                          "image_std": [0.26862954, 0.26130258, 0.27577711]},
        "video_config": {"max_frame_num": 8, "max_pixels": 12544, "video_place_token_id": ids[VIDEO_PAD],
                         "video_start_token_id": ids[VIDEO_START], "video_end_token_id": ids[VIDEO_END]},
        "audio_config": {"enable": True, "num_mel_bins": 128, "d_model": 32, "encoder_layers": 2,
                         "encoder_attention_heads": 4, "encoder_ffn_dim": 64, "avg_pooler": 4,
                         "max_source_positions": 1500, "audio_start_token_id": ids[AUDIO_START],
                         "audio_end_token_id": ids[AUDIO_END], "audio_pad_token_id": ids[AUDIO_PAD],
                         "vq_config": {"enable": True, "codebook_sizes": [64, 32, 32, 16, 16, 16, 16, 16]}},
    }


# tensors standing in for the speech-output parts of a released checkpoint (export copies them)
_TINY_SPEECH = {"audio_head.headnorm.weight": (64,), "audio_head.heads.0.weight": (65, 64),
                "audio_tokenizer.audio_decoder.dconv1.conv.weight": (32, 32, 3),
                "audio_tokenizer.audio_flow_matching_decoder.prenet.out_proj.weight": (80, 32)}


def build_tiny(folder: Path, seed: int = 0) -> None:
    """Write a random tiny Baichuan-Omni-1.5 checkpoint with its tokenizer files to `folder`."""
    from safetensors.torch import load_file, save_file
    from transformers import GenerationConfig, Qwen2Tokenizer

    tok = Qwen2Tokenizer(tokenizer_object=build_bpe_tokenizer(SPECIAL_TOKENS), eos_token=EOT, pad_token=EOT,
                         unk_token=None, chat_template=CHAT_TEMPLATE)
    cfg_dict = tiny_config(tok)
    torch.manual_seed(seed)
    model = BaichuanOmniForCausalLM(BaichuanOmniConfig(**cfg_dict)).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    # the released layout: config.json as shipped, speech-output tensors in the same file
    weights = Path(folder) / "model.safetensors"
    state = load_file(str(weights))
    g = torch.Generator().manual_seed(seed + 1)
    for k, shape in _TINY_SPEECH.items():
        state[k] = torch.randn(shape, generator=g)
    save_file(state, str(weights), metadata={"format": "pt"})
    (Path(folder) / "config.json").write_text(json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
    tok.save_pretrained(str(folder))
    GenerationConfig(eos_token_id=tok.convert_tokens_to_ids(EOT), pad_token_id=tok.convert_tokens_to_ids(EOT),
                     do_sample=False).save_pretrained(str(folder))
