"""The tiny random Gemma 4 built in code (`tiny:gemma4`): tests and the CPU demo.

The real architecture at small widths: a 2-layer ViT (8-pixel patches, 2x2 pooling, a 70-token
budget: the smallest the released image processor takes), a 2-layer conformer on 32 mel bins, and
a 4-layer decoder with per-layer embeddings, sliding (window 32) and global layers of different
head widths, the last two layers KV-shared with a double-wide MLP (as in E2B), logits soft-capped
at 30. The processor files are the released processor's layout with the tiny sizes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.families.gemma4_processor import (
    AUDIO_TOKEN,
    BOA,
    BOI,
    BOS,
    CHANNEL_CLOSE,
    CHANNEL_OPEN,
    END_TURN,
    EOA,
    EOI,
    IMAGE_TOKEN,
    START_TURN,
    VIDEO_TOKEN,
    hf,
    write_processor_config,
)
from finetune.families.shared import materialize
from finetune.families.tiny import build_bpe_tokenizer

CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "gemma4.chat_template.jinja").read_text()

TINY_VERSION = 2  # 2: 32 mel bins (was 128)
TEXT_SPECIALS = ["<pad>", "<eos>", BOS, "<unk>", "<mask>", START_TURN, END_TURN, BOI, EOI, IMAGE_TOKEN, BOA, EOA,
                 AUDIO_TOKEN, VIDEO_TOKEN, CHANNEL_OPEN, CHANNEL_CLOSE, "<|think|>"]
#: the tiny processor: 8-pixel patches pooled 2x2, at most 70 soft tokens per image or frame (the
#: released image processor's smallest budget: about 134x134 pixels for a square image)
TINY_PATCH, TINY_POOL, TINY_BUDGET = 8, 2, 70
#: the tiny feature extractor's mel bins (the released 128 made the frozen tiny audio tower's first
#: convolution, 1 -> 128 channels over every frame and bin, a third of a training step)
TINY_MEL_BINS = 32
INIT = 0.1  # as the other tiny models: the library's 0.02 is tuned for widths in the thousands


def materialize_tiny(seed: int = 0) -> Path:
    """`tiny:gemma4`: the tiny model's folder, built on first use."""
    return materialize(f"gemma4-s{seed}-v{TINY_VERSION}", lambda d: build_tiny(d, seed))


def build_tiny_tokenizer():
    """Byte-level BPE (trained in code) with Gemma 4's special tokens, named as its tokenizer names
    them (what Gemma4Processor reads: image_token, boi_token, ...)."""
    from transformers import PreTrainedTokenizerFast

    tok = build_bpe_tokenizer(TEXT_SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI,
                              "audio_token": AUDIO_TOKEN, "boa_token": BOA, "eoa_token": EOA,
                              "video_token": VIDEO_TOKEN, "sot_token": START_TURN, "eot_token": END_TURN},
        chat_template=CHAT_TEMPLATE,
    )


def tiny_config(tok):
    """A small Gemma 4 config (module docstring), its special token ids from the tokenizer."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOI, EOI, IMAGE_TOKEN, BOA, EOA, AUDIO_TOKEN, VIDEO_TOKEN,
                                                     "<pad>", "<eos>", BOS)}
    vocab = len(tok)
    text = dict(vocab_size=vocab, vocab_size_per_layer_input=vocab, hidden_size=64, hidden_size_per_layer_input=16,
                intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                global_head_dim=64, layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=32,
                num_kv_shared_layers=2, use_double_wide_mlp=True, final_logit_softcapping=30.0,
                max_position_embeddings=4096, pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"],
                bos_token_id=ids[BOS], initializer_range=INIT)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=32, patch_size=TINY_PATCH, pooling_kernel_size=TINY_POOL,
                  # the longest side a 70-token budget allows is 70 x 2 patches
                  position_embedding_size=TINY_BUDGET * TINY_POOL + 16, use_clipped_linears=True,
                  initializer_range=INIT)
    # the projection after the subsampling convolutions reads subsampling_conv_channels[0] / 4 x
    # channels[1] features per frame: the mel bins / 4 x channels[1], so channels[0] is the mel count
    audio = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 subsampling_conv_channels=[TINY_MEL_BINS, 4],
                 attention_chunk_size=4, attention_context_left=5, output_proj_dims=32, use_clipped_linears=True,
                 initializer_range=INIT)
    return hf("Gemma4Config")(
        text_config=text, vision_config=vision, audio_config=audio, image_token_id=ids[IMAGE_TOKEN],
        video_token_id=ids[VIDEO_TOKEN], audio_token_id=ids[AUDIO_TOKEN], boi_token_id=ids[BOI],
        eoi_token_id=ids[EOI], boa_token_id=ids[BOA], eoa_token_index=ids[EOA], initializer_range=INIT,
        tie_word_embeddings=True)


def build_tiny(folder: Path, seed: int = 0) -> None:
    """Write a random tiny Gemma 4 checkpoint with tokenizer and processor files to `folder`."""
    from transformers import GenerationConfig

    tok = build_tiny_tokenizer()
    cfg = tiny_config(tok)
    torch.manual_seed(seed)
    model = hf("Gemma4ForConditionalGeneration")(cfg).eval()
    with torch.no_grad():
        # Gemma 4's attention has no 1/sqrt(head_dim): its q/k norms' scales carry the temperature,
        # which a released model has learned. At 1 the attention logits of a random model have std
        # sqrt(head_dim) and its softmax starts saturated; head_dim^-1/4 on both gives std 1
        for attn in [layer.self_attn for layer in model.model.language_model.layers] + \
                [layer.self_attn for layer in model.model.vision_tower.encoder.layers]:
            for name in ("q_norm", "k_norm"):  # a KV-shared layer has no k_norm (it reads its keys)
                if hasattr(attn, name):
                    getattr(attn, name).weight.fill_(attn.head_dim ** -0.25)
        # transformers starts the 2-D position table at ones (every patch the same): a released
        # model's is trained; a random one makes the tiny tower's positions matter from the start
        model.model.vision_tower.patch_embedder.position_embedding_table.normal_(0.0, 0.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    assert (cfg.vision_config.patch_size, cfg.vision_config.pooling_kernel_size) == (TINY_PATCH, TINY_POOL)
    write_processor_config(folder, image=(TINY_PATCH, TINY_BUDGET, TINY_POOL), video=(TINY_PATCH, TINY_BUDGET, TINY_POOL),
                           mel_bins=TINY_MEL_BINS)
    (Path(folder) / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    gen = GenerationConfig(bos_token_id=tok.convert_tokens_to_ids(BOS), pad_token_id=tok.convert_tokens_to_ids("<pad>"),
                           eos_token_id=[tok.convert_tokens_to_ids("<eos>"), tok.convert_tokens_to_ids(END_TURN)],
                           do_sample=False)
    gen.save_pretrained(str(folder))


