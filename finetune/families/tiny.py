"""Tiny random models and tokenizers built in code, for tests, the CPU demo and benchmarks.

Nothing here is downloaded. A tiny model has the real architecture of its family (the same
module names, so roles, LoRA targeting, packing and export are exercised for real) with
small widths. The tokenizer is a byte-level BPE trained in code on a fixed corpus, so any
text encodes, and the demo's phrases compress to a few tokens each.
"""

from __future__ import annotations

import functools

# The corpus decides the BPE merges. It is fixed text (never read from the dataset) so that a
# tiny tokenizer is the same on every machine and in every process.
_CORPUS = """
You are a radiology assistant. You are a helpful assistant.
Is there a lesion? Is there a lesion in this image? Do you see a lesion?
Yes. No. Chest X-ray. Fundus photograph. What kind of scan is this?
Listen to the note and answer: is there a lesion?
A bright round lesion in the upper left of the lung field.
A dark spot in the lower right of the fundus. A small lesion near the centre.
A large lesion in the upper right. A lesion in the lower left.
No lesion is visible. The image looks normal. There is no sign of a lesion.
The scan is clear. Nothing abnormal is seen. No focal abnormality.
What does MRI stand for? Magnetic resonance imaging. What does CT stand for?
Computed tomography. What does X-ray show? Bones and lungs.
findings impression report compare prior current study patient nodule
the a an of in on at to and or with without is are was were be this that these those
left right upper lower middle centre center small large round bright dark spot mass
heart lung lungs field fields eye retina optic disc vessel vessels normal abnormal
0 1 2 3 4 5 6 7 8 9 10 mm cm
"""

SPECIAL_TOKENS_QWEN = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
    "<|vision_bos|>", "<|vision_eos|>", "<|vision_pad|>",
    "<|IMAGE|>", "<|VIDEO|>",
]

BPE_VOCAB = 640


@functools.lru_cache(maxsize=4)
def _bpe_tokenizer_json(special_tokens: tuple[str, ...], vocab_size: int) -> str:
    """Train the byte-level BPE once per process and return it serialised (callers rebuild)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    # Repeat so that multi-word merges of the demo phrases win over rare pairs.
    tok.train_from_iterator(lines * 3, trainer=trainer)
    tok.add_special_tokens(list(special_tokens))
    return tok.to_str()


def build_bpe_tokenizer(special_tokens: list[str], vocab_size: int = BPE_VOCAB):
    """A `tokenizers.Tokenizer` (byte-level BPE) whose special tokens follow the BPE vocab."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_bpe_tokenizer_json(tuple(special_tokens), vocab_size))
