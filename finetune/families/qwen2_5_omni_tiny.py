"""The tiny Qwen2.5-Omni (`tiny:qwen2_5_omni`, `tiny:qwen2_5_omni-full`): a random thinker with the
real architecture at small widths, a byte-level BPE tokenizer trained in code and the processor
files of a released folder; the full variant adds a random talker and token2wav. Each is built
once into the tiny cache and then read like any local checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from finetune.families.shared import (
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    IM_END,
    IMAGE_TOKEN,
    PROCESSOR_FILES,
    VIDEO_TOKEN,
    VISION_BOS,
    VISION_EOS,
    OmniProcessor,
    materialize,
)
from finetune.families.tiny import SPECIAL_TOKENS_QWEN, build_bpe_tokenizer

NAME = "qwen2_5_omni"
VERSION = 3  # 2: initializer_range 0.1 (was the library default 0.02); 3: the released chat template

# The prompt format's chat template (our rendering of the released one's behaviour), shipped with the
# package: the tiny model carries it, and tests/test_chat_format.py holds the encoder to it.
CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "qwen2_5_omni.chat_template.jinja").read_text()


def materialize_thinker(seed: int = 0) -> Path:
    """`tiny:qwen2_5_omni`: the tiny thinker's folder, built on first use."""
    return materialize(f"{NAME}-thinker-s{seed}-v{VERSION}", lambda d: build_tiny_thinker(d, seed))


def materialize_full(seed: int = 0) -> Path:
    """`tiny:qwen2_5_omni-full`: the tiny thinker with the speech output (talker and vocoder) beside it."""
    return materialize(f"{NAME}-full-s{seed}-v{VERSION}", lambda d: build_tiny_full(d, materialize_thinker(seed), seed))



def tiny_thinker_config(vocab_size: int, token_ids: dict):
    """A small Qwen2.5-Omni thinker config: the real architecture with small widths.

    Weights are initialised with std 0.1 (about 1/sqrt(hidden)) instead of the library's 0.02,
    which is tuned for widths in the thousands: at width 64, std 0.02 shrinks every linear
    layer's output about 6x, so image features barely reach the answer token of the random
    model, and the CPU demo took 700-800 steps (and a lucky seed) to learn the lesion question.
    """
    from transformers import Qwen2_5OmniThinkerConfig

    hidden = 64
    init = 0.1
    return Qwen2_5OmniThinkerConfig(
        audio_config=dict(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                          num_mel_bins=128, output_dim=hidden, n_window=50, max_source_positions=1500,
                          initializer_range=init),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[1], in_channels=3, initializer_range=init),
        text_config=dict(hidden_size=hidden, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=init),
        initializer_range=init,
        audio_token_index=token_ids[AUDIO_TOKEN], image_token_index=token_ids[IMAGE_TOKEN],
        video_token_index=token_ids[VIDEO_TOKEN], audio_start_token_id=token_ids[AUDIO_BOS],
        audio_end_token_id=token_ids[AUDIO_EOS], vision_start_token_id=token_ids[VISION_BOS],
        vision_end_token_id=token_ids[VISION_EOS], user_token_id=token_ids.get("user", 0),
        position_id_per_seconds=25, seconds_per_chunk=2, tie_word_embeddings=False,
    )


def build_tiny_tokenizer():
    """The tiny Qwen-style tokenizer (byte-level BPE trained in code)."""
    from transformers import Qwen2Tokenizer


    tok = build_bpe_tokenizer(SPECIAL_TOKENS_QWEN)
    return Qwen2Tokenizer(
        tokenizer_object=tok, eos_token=IM_END, pad_token="<|endoftext|>", unk_token=None,
        extra_special_tokens={
            "image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN, "video_token": VIDEO_TOKEN,
            "vision_bos_token": VISION_BOS, "vision_eos_token": VISION_EOS,
            "audio_bos_token": AUDIO_BOS, "audio_eos_token": AUDIO_EOS,
        },
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_thinker(folder: Path, seed: int = 0) -> None:
    """Write a random tiny thinker checkpoint with tokenizer and processor files to `folder`."""
    from transformers import GenerationConfig, Qwen2_5OmniThinkerForConditionalGeneration

    tok = build_tiny_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, IMAGE_TOKEN, VIDEO_TOKEN, AUDIO_BOS,
                                                     AUDIO_EOS, VISION_BOS, VISION_EOS)}
    vocab = int(math.ceil(len(tok) / 64) * 64)
    cfg = tiny_thinker_config(vocab, ids)
    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    write_processor_config(folder, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    (Path(folder) / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    gen = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids("<|endoftext|>")],
                           pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), do_sample=False)
    gen.save_pretrained(str(folder))


def build_tiny_full(folder: Path, thinker_dir: Path, seed: int = 0) -> None:
    """A random tiny Qwen2.5-Omni with talker and token2wav; its thinker is the tiny thinker."""
    from transformers import (
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniThinkerForConditionalGeneration,
    )

    thinker = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(str(thinker_dir), dtype=torch.float32)
    th = thinker.config
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    talker = dict(
        vocab_size=512, embedding_size=th.text_config.hidden_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rope_parameters={**rope, "mrope_section": [2, 3, 3]}, initializer_range=0.1,
        tts_codec_start_token_id=500, tts_codec_end_token_id=501, tts_codec_pad_token_id=502,
        tts_codec_mask_token_id=503, tts_text_start_token_id=1, tts_text_end_token_id=2, tts_text_pad_token_id=3,
        audio_token_index=th.audio_token_index, image_token_index=th.image_token_index,
        video_token_index=th.video_token_index, vision_start_token_id=th.vision_start_token_id,
        vision_end_token_id=th.vision_end_token_id, audio_start_token_id=th.audio_start_token_id,
        audio_end_token_id=th.audio_end_token_id)
    token2wav = dict(
        dit_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, head_dim=16, emb_dim=32,
                        num_embeds=512, mel_dim=80, enc_emb_dim=32, enc_dim=32, enc_channels=[32, 32, 32, 32, 96],
                        enc_attention_channels=16, enc_se_channels=16, look_ahead_layers=[1],
                        look_backward_layers=[0, 1], block_size=24, ff_mult=2, rope_parameters=rope),
        bigvgan_config=dict(mel_dim=80, upsample_initial_channel=64, resblock_kernel_sizes=[3],
                            resblock_dilation_sizes=[[1, 3, 5]], upsample_rates=[5, 3, 2, 2, 2, 2],
                            upsample_kernel_sizes=[11, 7, 4, 4, 4, 4]))
    cfg = Qwen2_5OmniConfig(thinker_config=th.to_dict(), talker_config=talker, token2wav_config=token2wav)
    torch.manual_seed(seed)
    model = Qwen2_5OmniForConditionalGeneration(cfg).eval()
    model.thinker.load_state_dict(thinker.state_dict())
    model.save_pretrained(str(folder), safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    torch.save({"Chelsie": {"cond": torch.randn(1, 32, generator=g), "ref_mel": torch.randn(1, 30, 80, generator=g),
                            "bos_token": 1}}, Path(folder) / "spk_dict.pt")
    for name in PROCESSOR_FILES:
        if (Path(thinker_dir) / name).exists() and not (Path(folder) / name).exists():
            shutil.copyfile(Path(thinker_dir) / name, Path(folder) / name)


def write_processor_config(folder: Path, *, min_pixels: int, max_pixels: int) -> None:
    """preprocessor_config.json in the flat layout Qwen2.5-Omni checkpoints ship."""
    cfg = {
        "processor_class": "Qwen2_5OmniProcessor",
        "image_processor_type": "Qwen2VLImageProcessor",
        "feature_extractor_type": "WhisperFeatureExtractor",
        "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "image_mean": list(OmniProcessor.image_mean), "image_std": list(OmniProcessor.image_std),
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_resize": True,
        "do_convert_rgb": True, "resample": 3,
        "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400,
        "chunk_length": 300, "n_samples": 4800000, "nb_max_frames": 30000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0,
    }
    (Path(folder) / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
