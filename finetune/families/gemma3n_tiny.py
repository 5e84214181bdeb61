"""The tiny Gemma 3n (`tiny:gemma3n`): the real architecture (AltUp, LAuReL, per-layer inputs, KV
sharing, MobileNetV5 with the MSFA, the conformer) at small widths, random weights adjusted where a
random model would not learn in a demo's time (see `build_tiny`), a byte-level BPE tokenizer trained
in code in Gemma's vocabulary layout, and the processor files of a released folder. Built once into
the tiny cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from finetune.demo_data import KINDS, make_image
from finetune.families.gemma3n_processor import AUDIO_TOKEN, BOA, BOI, BOS, END_TURN, EOA, EOI, IMAGE_TOKEN, START_TURN
from finetune.families.gemma3n_timm import TINY_ARCH
from finetune.families.gemma3n_timm import transformers_class as _hf
from finetune.families.shared import materialize
from finetune.families.tiny import build_bpe_tokenizer

CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "configs" / "gemma3n.chat_template.jinja").read_text()

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


def materialize_tiny(seed: int = 0) -> Path:
    """`tiny:gemma3n`: the tiny model's folder, built on first use."""
    return materialize(f"gemma3n-s{seed}-v{TINY_VERSION}", lambda d: build_tiny(d, seed))


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
