"""Answer chat samples with an exported model using transformers alone (no omni-finetune import).

    python examples/generate_with_transformers.py MODEL_DIR DATA.jsonl [--max-new-tokens N] [--out preds.jsonl]

MODEL_DIR is what `make export` wrote (`runs/<recipe>/merged`) of a model transformers has a class
for: a Qwen2.5-Omni or Qwen3-Omni thinker or full checkpoint, or Gemma 3n. (Baichuan-Omni-1.5's
classes live in its own repository, not in transformers: answer it with `python -m finetune chat`.) DATA.jsonl holds chat samples in the toolkit's format (messages
whose content is text or a list of text/image/audio parts with paths relative to the file).
Each sample's conversation up to its last answer is rendered with the model's own chat
template and processor, answered greedily, and scored by exact match against the sample's
`answer` (else the first sentence of its last assistant turn), normalised as the toolkit's
eval does. Prints the accuracy; `--out` writes one JSON line per sample.

Qwen inputs are built from transformers' image processor, feature extractor and tokenizer (see
`QwenInputs`); Gemma 3n's with transformers' Gemma3nProcessor. Samples with video are skipped and
counted (Qwen's video processor needs torchvision; Gemma 3n takes no video).

Gemma 3n's vision tower is a timm model, and timm imports torchvision: where torchvision is not
installed (the toolkit's CPU setup) this script imports the toolkit's stand-in for it,
`finetune.families.gemma3n_timm`, as the export's model card says (with the modules that import loads);
nothing else of the toolkit.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image


QWEN = {"qwen2_5_omni": ("Qwen2_5OmniForConditionalGeneration", "Qwen2_5OmniThinkerForConditionalGeneration"),
        "qwen3_omni_moe": ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")}


def family_of(config: dict) -> str:
    """qwen2_5_omni, qwen3_omni_moe or gemma3n, from config.json's model_type."""
    model_type = config.get("model_type", "")
    for name in (*QWEN, "gemma3n"):
        if model_type in (name, f"{name}_thinker"):
            return name
    sys.exit(f"model_type {model_type!r}: transformers has no class for it that this script knows (it answers "
             f"Qwen2.5-Omni, Qwen3-Omni and Gemma 3n exports; use `python -m finetune chat MODEL_DIR` for others)")


def load_model(folder: str):
    import transformers

    cfg = json.loads((Path(folder) / "config.json").read_text())
    family = family_of(cfg)
    if family == "gemma3n":
        _timm_for_gemma3n()
        return transformers.Gemma3nForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    full, thinker = (getattr(transformers, name) for name in QWEN[family])
    if cfg["model_type"] == family:  # full checkpoint: answer with its thinker
        return full.from_pretrained(folder, dtype="auto").thinker.eval()
    return thinker.from_pretrained(folder, dtype="auto").eval()


def _timm_for_gemma3n() -> None:
    """Gemma 3n's vision tower needs timm, which imports torchvision: without torchvision, the
    toolkit's stand-in (the one toolkit module this script may import, as the model card says)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        before = set(sys.modules)
        from finetune.families.gemma3n_timm import ensure_timm

        ensure_timm()
        STAND_IN.update(m for m in set(sys.modules) - before if _is_toolkit(m))


#: the toolkit modules that importing the torchvision stand-in brought in (its package's own imports)
STAND_IN: set[str] = set()


def _is_toolkit(module: str) -> bool:
    return module == "finetune" or module.startswith("finetune.")


class QwenInputs:
    """Qwen2.5-Omni's and Qwen3-Omni's input rules from transformers' own parts: the PIL image
    processor, the Whisper feature extractor and the tokenizer with the model's chat template.
    (transformers' Qwen2_5OmniProcessor and Qwen3OmniMoeProcessor would do the same but cannot be
    built without torchvision, which their video processors need.) Each image/audio placeholder
    becomes as many tokens as the encoder yields: grid t*h*w / merge^2 for an image; for audio,
    Qwen2.5-Omni's ((frames-1)//2+1-2)//2+1 of features padded to 30 s, Qwen3-Omni's own count
    (transformers' _get_feat_extract_output_lengths) of features padded to the longest clip."""

    def __init__(self, folder: str, config: dict):
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, WhisperFeatureExtractor

        self.family = family_of(config)
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.images = Qwen2VLImageProcessorPil.from_pretrained(folder)
        self.audio = WhisperFeatureExtractor.from_pretrained(folder)
        self.sampling_rate = self.audio.sampling_rate
        self.template = self.tokenizer.chat_template
        if (Path(folder) / "chat_template.json").exists():
            self.template = json.loads((Path(folder) / "chat_template.json").read_text())["chat_template"]
        th = config.get("thinker_config", config)
        ids = self.tokenizer.convert_ids_to_tokens
        # Qwen2.5-Omni's config names them *_token_index, Qwen3-Omni's *_token_id
        self.image_token = ids(th.get("image_token_index", th.get("image_token_id")))
        self.audio_token = ids(th.get("audio_token_index", th.get("audio_token_id")))
        self.n_window = int(th.get("audio_config", {}).get("n_window", 50))
        self.eos = [self.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def __call__(self, messages, images, audios) -> dict:
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, add_generation_prompt=True,
                                                  tokenize=False)
        out: dict = {}
        if images:
            im = self.images(images=images, return_tensors="pt")
            out.update(pixel_values=im["pixel_values"], image_grid_thw=im["image_grid_thw"])
            merge = self.images.merge_size ** 2
            text = _expand(text, self.image_token, [int(g.prod()) // merge for g in im["image_grid_thw"]])
        if audios:
            if self.family == "qwen3_omni_moe":
                from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
                    _get_feat_extract_output_lengths)

                fe = self.audio(audios, sampling_rate=self.sampling_rate, return_attention_mask=True,
                                padding="longest", truncation=False, return_tensors="pt")
                counts = [int(n) for n in _get_feat_extract_output_lengths(fe["attention_mask"].sum(-1), self.n_window)]
            else:
                fe = self.audio(audios, sampling_rate=self.sampling_rate, return_attention_mask=True,
                                padding="max_length", return_tensors="pt")
                counts = [int(((n - 1) // 2 + 1 - 2) // 2 + 1) for n in fe["attention_mask"].sum(-1)]
            out.update(input_features=fe["input_features"], feature_attention_mask=fe["attention_mask"])
            text = _expand(text, self.audio_token, counts)
        enc = self.tokenizer([text], return_tensors="pt")
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out


class Gemma3nInputs:
    """Gemma 3n's inputs from transformers' Gemma3nProcessor (its PIL image processor: no
    torchvision), the chat template in the folder."""

    def __init__(self, folder: str, config: dict):
        from transformers import Gemma3nProcessor

        self.processor = Gemma3nProcessor.from_pretrained(folder, backend="pil")
        self.tokenizer = self.processor.tokenizer
        self.sampling_rate = self.processor.feature_extractor.sampling_rate
        self.eos = [self.tokenizer.convert_tokens_to_ids("<end_of_turn>")]

    def __call__(self, messages, images, audios) -> dict:
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        enc = self.processor(text=[text], images=[images] if images else None, audio=audios or None,
                             return_tensors="pt")
        return dict(enc)


def _expand(text: str, token: str, counts: list[int]) -> str:
    pieces = text.split(token)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"{len(pieces) - 1} {token} placeholders for {len(counts)} media items")
    return pieces[0] + "".join(token * n + rest for n, rest in zip(counts, pieces[1:]))


def recipe_setting(folder: str, section: str, key: str, default=None):
    """A value of the recipe the model was trained with (the export's recipe.yaml), if any."""
    p = Path(folder) / "recipe.yaml"
    if not p.exists():
        return default
    import yaml

    doc = yaml.safe_load(p.read_text()) or {}
    doc = doc.get("recipe", doc)
    value = (doc.get(section) or {}).get(key)
    return default if value in (None, "") else value


def read_audio(path: Path, rate: int) -> np.ndarray:
    wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    wave = wave.mean(axis=1)
    if sr != rate:
        from math import gcd

        from scipy.signal import resample_poly

        g = gcd(sr, rate)
        wave = resample_poly(wave, rate // g, sr // g).astype(np.float32)
    return wave


def conversation(sample: dict, root: Path, system: str | None, rate: int):
    """Messages for the chat template (the last answer removed), images, audios; None if video."""
    msgs = list(sample["messages"])
    while msgs and msgs[-1]["role"] == "assistant":
        msgs.pop()
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    out, images, audios = [], [], []
    for m in msgs:
        if isinstance(m["content"], str):
            out.append({"role": m["role"], "content": m["content"]})
            continue
        parts = []
        for part in m["content"]:
            kind = part["type"]
            if kind == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image":
                images.append(Image.open(root / part["path"]).convert("RGB"))
                parts.append({"type": "image"})
            elif kind == "audio":
                audios.append(read_audio(root / part["path"], rate))
                parts.append({"type": "audio"})
            else:
                return None
        out.append({"role": m["role"], "content": parts})
    return out, images, audios


def reference_of(sample: dict) -> str:
    if sample.get("answer"):
        return sample["answer"]
    last = [m for m in sample["messages"] if m["role"] == "assistant"][-1]["content"]
    if not isinstance(last, str):
        last = " ".join(p.get("text", "") for p in last)
    return first_sentence(last)


def first_sentence(text: str) -> str:
    m = re.search(r"[.!?](\s|$)", text)
    return text[: m.start()] if m else text


def normalise(text: str) -> str:
    t = re.sub(r"[^\w\s-]", " ", text.lower().strip())
    t = re.sub(r"(?<!\w)-|-(?!\w)", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"^(the|a|an)\s+", "", t)


def is_match(prediction: str, reference: str) -> bool:
    ref = normalise(reference)
    return ref != "" and (normalise(first_sentence(prediction)) == ref or normalise(prediction) == ref)


@torch.no_grad()
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("data")
    ap.add_argument("--max-new-tokens", type=int, help="default: the recipe's eval.max_new_tokens, else 32")
    ap.add_argument("--limit", type=int, default=0, help="only the first N samples")
    ap.add_argument("--out", help="write predictions here (JSON lines)")
    args = ap.parse_args(argv)

    model = load_model(args.model_dir)
    config = json.loads((Path(args.model_dir) / "config.json").read_text())
    processor = (Gemma3nInputs if family_of(config) == "gemma3n" else QwenInputs)(args.model_dir, config)
    tok = processor.tokenizer
    rate = processor.sampling_rate
    system = recipe_setting(args.model_dir, "data", "system_prompt")  # training's default system prompt
    max_new = args.max_new_tokens or int(recipe_setting(args.model_dir, "eval", "max_new_tokens", 32))
    eos = processor.eos
    root = Path(args.data).parent
    lines = [json.loads(x) for x in Path(args.data).read_text().splitlines() if x.strip()]
    if args.limit:
        lines = lines[: args.limit]
    rows, hits, skipped = [], 0, 0
    for sample in lines:
        conv = conversation(sample, root, system, rate)
        if conv is None:
            skipped += 1
            continue
        msgs, images, audios = conv
        inputs = processor(msgs, images, audios)
        inputs = {k: (v.to(model.dtype) if torch.is_floating_point(v) else v) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)
        pred = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        ok = is_match(pred, reference_of(sample))
        hits += ok
        rows.append({"id": sample.get("id"), "prediction": pred, "reference": reference_of(sample), "match": ok})
    n = len(rows)
    print(f"{n} samples answered ({skipped} with video skipped): exact-match accuracy {hits / max(n, 1):.3f}")
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    others = sorted(m for m in sys.modules if _is_toolkit(m) and m not in STAND_IN)
    assert not others, f"this script must run on transformers alone (the torchvision stand-in aside): {others}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
