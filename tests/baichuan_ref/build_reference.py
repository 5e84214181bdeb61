"""Build the PUBLIC Baichuan-Omni-1.5 reference model, shrunk and random, and record its outputs.

Runs INSIDE the separate reference venv (tests/baichuan_ref/setup_venv.sh), never in the toolkit's
venv:

    FINETUNE_BAICHUAN_REF=/path/to/Baichuan-Omni-1.5/baichuan-omni/model \
        $VENV/bin/python tests/baichuan_ref/build_reference.py --out /tmp/baichuan_ref_out --seed 0

The reference code (configuration_omni.py, modeling_omni.py, processor_omni.py, ...) is imported
at run time from the folder named by $FINETUNE_BAICHUAN_REF (or --ref); none of it lives in this
repository. Our own stand-ins for flash_attn, deepspeed and the media libraries are put first on
sys.path from tests/baichuan_ref/stubs/.

Writes to --out:
  config.json, generation_config.json, model.safetensors   (OmniForCausalLM.save_pretrained)
  cases.pt          {case: inputs fed to the reference forward, intermediate tensors, logits}
  token_ids.json    the reference processor's ids for one chat sample with an image and an audio
  media/            the random PNG images / video frames and 16 kHz WAV clips the cases use
  meta.json         versions, shrink, tokenizer provenance, sha256 of the reference files, checks

With --golden DIR (tests/data/baichuan_golden) it also writes the golden numbers that
tests/test_baichuan_golden.py compares with on every run: reduced logits, audio codes, input and
intermediate summaries, token ids, the weight recipe with its checksums, and a tokenizer trimmed
to the recorded samples (see README.md, "Golden numbers"). The weights and media come from
golden_recipe.py, which the test shares.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"
sys.path.insert(0, str(HERE))
import golden_recipe  # noqa: E402  (our own: weights, media and reductions shared with the golden test)
PKG = "baichuan_omni_ref"  # the name the reference folder is imported under (it uses relative imports)

SYSTEM = "You are a helpful assistant."
CASES = ["text", "image", "video", "audio", "image+audio"]


def log(msg: str) -> None:
    print(f"[build_reference] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Importing the reference
# ------------------------------------------------------------------------------------------------
def import_reference(ref: Path):
    """Import the reference folder as package PKG (its modules use `from .x import y`)."""
    sys.path.insert(0, str(STUBS))
    import importlib

    pkg = types.ModuleType(PKG)
    pkg.__path__ = [str(ref)]
    pkg.__file__ = str(ref / "__init__.py")
    sys.modules[PKG] = pkg
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        configuration = importlib.import_module(f"{PKG}.configuration_omni")
        modeling = importlib.import_module(f"{PKG}.modeling_omni")
        processor = importlib.import_module(f"{PKG}.processor_omni")
    # Every reference module must come from REF and every stub from STUBS.
    for name in ("flash_attn", "deepspeed", "torchaudio", "decord", "cv2", "av", "imagesize",
                 "cairosvg", "fire"):
        mod = sys.modules.get(name)
        if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(STUBS)):
            raise RuntimeError(f"{name} was imported from {mod.__file__}, not from our stubs")
    return configuration, modeling, processor


# ------------------------------------------------------------------------------------------------
# The shrunk config
# ------------------------------------------------------------------------------------------------
LLM = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 32, "max_window_layers": 2}
# hidden_size must be a multiple of 128: OmniAudioHead's CasualDepthTransformerLayer asserts
# hidden_size % 128 == 0 (it uses hidden_size // 128 heads).
VISION = {"embed_dim": 32, "depth": 2, "num_heads": 2}  # head dim 16: the 2-D rope needs head_dim % 4 == 0
AUDIO = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
         "decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64,
         "audio_head_transformer_layers": 1}
CODEBOOKS = [16, 8, 8, 8, 8, 8, 8, 8]
VOCODER = {"channels": [16, 16, 16]}
FLOW = {"prenet_d_model": 32, "prenet_attention_heads": 2, "prenet_ffn_dim": 64, "prenet_nlayers": 1,
        "channels": [32], "attention_head_dim": 16, "n_blocks": 1, "num_mid_blocks": 1, "num_heads": 2}
# Larger than the real 0.02 so that the random model's logits are O(1), not O(1e-3): the
# comparison then has something to compare. It only affects initialisation.
INIT_RANGE = 0.1
VISION_ATTN = "sdpa"  # instead of "flash_attention_2" (transformers refuses that without CUDA flash-attn)


def shrink_config(real: dict) -> dict:
    c = copy.deepcopy(real)
    c.update(LLM)
    c["initializer_range"] = INIT_RANGE
    for key in ("visual_config", "video_config"):
        v = c[key]
        v.update(VISION)
        v["hidden_size"] = LLM["hidden_size"]  # the bridge projects into the LLM width
        v["_attn_implementation"] = VISION_ATTN
    a = c["audio_config"]
    a.update(AUDIO)
    a["vq_config"] = dict(a["vq_config"], codebook_sizes=list(CODEBOOKS))
    c["vocoder_config"].update(VOCODER)
    f = c["flow_matching_config"]
    f.update(FLOW)
    f["prenet_in_dim"] = AUDIO["d_model"]  # use_hidden_states_before_dconv2: decoder width
    return c


# ------------------------------------------------------------------------------------------------
# Random weights
# ------------------------------------------------------------------------------------------------
def apply_weight_recipe(model, seed: int) -> tuple[dict, dict]:
    """Replace the reference's own random initialisation by golden_recipe's seeded one, which the
    golden test can repeat without the reference. The per-entry rules come from the model as its
    __init__ left it (see golden_recipe.weight_rule): biases, norm weights and other constants get
    noise (the reference's _init_weights would leave them at 0 or 1 and hide mistakes there), and
    embedding row 0 (padding_idx, zeroed by the reference) is random like every other row.
    Returns (rules, sha256 per entry of the reference's state dict after loading)."""
    import torch

    params = dict(model.named_parameters(remove_duplicate=False))
    rules = {k: golden_recipe.weight_rule(k, v, k in params) for k, v in model.state_dict().items()}
    made = golden_recipe.make_state_dict(rules, seed)
    with torch.no_grad():
        model.load_state_dict(made, strict=True)
    digests = {k: golden_recipe.tensor_sha256(v) for k, v in model.state_dict().items()}
    if digests != {k: golden_recipe.tensor_sha256(v) for k, v in made.items()}:
        raise SystemExit("the reference's state dict differs from the recipe's tensors after loading")
    return rules, digests


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------
TOKEN_CHECK = {"<|endoftext|>": 151643, "<B_SYS>": 151665, "<C_Q>": 151667, "<C_A>": 151668,
               "<audio_start_baichuan>": 151676, "<audio_end_baichuan>": 151677,
               "<audio_pad_baichuan>": 151678, "<img_start_baichuan>": 151679,
               "<img_end_baichuan>": 151680, "<img_pad_baichuan>": 151681,
               "<video_palce_baichuan>": 151694, "<audiogen_end_baichuan>": 151701}
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def load_tokenizer(ref: Path, tok_dir: Path | None, work: Path):
    """The reference tokenizer (Qwen2TokenizerFast with Baichuan's added tokens).

    The GitHub model folder has vocab.json and the tokenizer configs but no merges.txt, and its
    tokenizer.json may be absent (it is an LFS-sized blob). Sources, in order:
      1. --tokenizer / $FINETUNE_BAICHUAN_TOKENIZER holding tokenizer.json: loaded as is;
      2. the same holding merges.txt (any Qwen2/Qwen2.5 tokenizer: same BPE; vocab.json must match):
         REF's vocab.json + tokenizer configs + that merges.txt;
      3. REF itself if it has tokenizer.json or merges.txt (the Hugging Face release);
      4. otherwise REF's vocab.json with NO merges: byte-level only, so text is split into single
         bytes; ids are valid but are not the real tokenization (recorded in meta.json).
    Returns (tokenizer, description).
    """
    from transformers import AutoTokenizer

    def assemble(merges: Path | None, what: str):
        d = work / "tokenizer"
        d.mkdir(parents=True, exist_ok=True)
        for f in TOKENIZER_FILES:
            if (ref / f).exists():
                (d / f).write_bytes((ref / f).read_bytes())
        if merges is not None:
            (d / "merges.txt").write_bytes(merges.read_bytes())
        else:
            (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return AutoTokenizer.from_pretrained(str(d)), what

    tok = desc = None
    if tok_dir is not None:
        if (tok_dir / "tokenizer.json").exists():
            tok, desc = AutoTokenizer.from_pretrained(str(tok_dir)), f"tokenizer.json from {tok_dir}"
        elif (tok_dir / "merges.txt").exists():
            if (tok_dir / "vocab.json").exists():
                a = json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8"))
                b = json.loads((ref / "vocab.json").read_text(encoding="utf-8"))
                if a != b:
                    raise SystemExit(f"{tok_dir}/vocab.json differs from the reference vocab.json")
            tok, desc = assemble(tok_dir / "merges.txt",
                                 f"REF vocab.json + tokenizer configs + merges.txt from {tok_dir}")
        else:
            raise SystemExit(f"--tokenizer {tok_dir}: neither tokenizer.json nor merges.txt there")
    elif (ref / "tokenizer.json").exists() or (ref / "merges.txt").exists():
        tok, desc = AutoTokenizer.from_pretrained(str(ref)), f"tokenizer files in {ref}"
    else:
        tok, desc = assemble(None, "FALLBACK: REF vocab.json without merges (byte-level only; "
                                   "text ids are NOT the real tokenization)")
    for s, i in TOKEN_CHECK.items():
        got = tok.convert_tokens_to_ids(s)
        if got != i:
            raise SystemExit(f"tokenizer maps {s} to {got}, expected {i}")
    return tok, desc


# ------------------------------------------------------------------------------------------------
# Media
# ------------------------------------------------------------------------------------------------
def make_media(out: Path, seed: int) -> dict:
    """golden_recipe's seeded media in out/media, by role: {role: (path, size)}."""
    paths = golden_recipe.make_media(out / "media", seed)
    size = golden_recipe.MEDIA
    return {"image": (paths["image_56x84.png"], size["image_56x84.png"]),
            "image2": (paths["image_70x98.png"], size["image_70x98.png"]),
            "frames": [(paths[f"frame_{i}.png"], size[f"frame_{i}.png"]) for i in range(3)],
            "audio": (paths["audio_2.6s.wav"], size["audio_2.6s.wav"]),
            "audio2": (paths["audio_1.3s.wav"], size["audio_1.3s.wav"])}


def prompts(media: dict) -> dict[str, str]:
    def img(p):
        return f'<img_start_baichuan>{json.dumps({"local": str(p)})}<img_end_baichuan>'

    def aud(p):
        return f'<audio_start_baichuan>{json.dumps({"path": str(p)})}<audio_end_baichuan>'

    frames = "".join(f'<videoframe_start_omni>{json.dumps({"local": str(p)})}<videoframe_end_omni>'
                     for p, _ in media["frames"])
    vid = f"<video_start_baichuan>{frames}<video_end_baichuan>"
    head = f"<B_SYS>{SYSTEM}<C_Q>"
    return {
        "text": f"{head}Hello! What is 2+2?<C_A>2+2 equals 4.<|endoftext|>",
        "image": f"{head}{img(media['image'][0])}What is in this picture?<C_A>Random noise.<|endoftext|>",
        "video": f"{head}{vid}Describe the video.<C_A>Flickering noise.<|endoftext|>",
        "audio": f"{head}{aud(media['audio'][0])}Transcribe the audio.<C_A>Static.<|endoftext|>",
        "image+audio": (f"{head}{img(media['image2'][0])}{aud(media['audio2'][0])}"
                        f"Answer the spoken question about the image.<C_A>It is noise.<|endoftext|>"),
    }


# ------------------------------------------------------------------------------------------------
# Running the cases
# ------------------------------------------------------------------------------------------------
MEDIA_KEYS = ("audios", "encoder_length", "bridge_length", "images", "patch_nums", "images_grid",
              "videos", "videos_patch_nums", "videos_grid")


def forward_inputs(batch) -> dict:
    """The exact keyword arguments given to OmniForCausalLM.forward (processor output, collated)."""
    kw = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    for k in MEDIA_KEYS:
        v = getattr(batch, k)
        if v is not None:
            kw[k] = v
    return kw


def run_case(model, kw: dict) -> dict:
    """Forward in eval mode without grad; also record the pieces a re-implementation can compare."""
    import torch

    inner = model.model
    rec: dict = {}
    with torch.no_grad():
        if "audios" in kw:
            rec["audio_encoder_out"] = model.audio_tokenizer.audio_model(kw["audios"], kw["encoder_length"])
            # Per code (row, VQ stage): the gap between the second-best and the best Euclidean
            # distance. A re-implementation can only be expected to reproduce a code bit-exactly
            # where this gap is not tiny (float32 rounding of the distance is ~1e-6 relative).
            margins: list = []

            def margin_hook(mod, args, output):
                top2 = output[2].topk(2, dim=-1).values  # output[2] is -distance, [rows, codebook]
                margins.append(top2[:, 0] - top2[:, 1])

            hooks = [vq.codebook.register_forward_hook(margin_hook)
                     for vq in model.audio_tokenizer.audio_bridge_model.vq_list]
            try:
                rec["audio_codes"] = model.audio_tokenizer(kw["audios"], kw["encoder_length"], kw["bridge_length"])
            finally:
                for h in hooks:
                    h.remove()
            rec["vq_margins"] = torch.stack(margins, -1)  # [sum(bridge_length), 8], rows as audio_codes
            rec["audio_embeds"] = sum(inner.audio_embed_layers[i](rec["audio_codes"][..., i])
                                      for i in range(rec["audio_codes"].shape[-1]))
        for src, grid, name in (("images", "images_grid", "image_embeds"),
                                ("videos", "videos_grid", "video_embeds")):
            if src in kw:
                g = torch.tensor(kw[grid])
                vit = inner.visual_model(torch.cat(kw[src], 0), grid_thw=g)
                rec[name.replace("embeds", "vit_out")] = vit
                rec[name] = inner.visual_bridge_model(vit)
        out = model(**kw, output_hidden_states=True, return_dict=True)
        # hidden_states[0] is the input of model.layers[0]: text embeddings + scattered media.
        rec["inputs_embeds"] = out.hidden_states[0].detach().clone()
        rec["hidden_states"] = [h.detach().clone() for h in out.hidden_states]  # embeds, layer 0.., final normed
        rec["logits"] = out.logits.float()
    return rec


# ------------------------------------------------------------------------------------------------
# Golden numbers (--golden): what tests/test_baichuan_golden.py compares with on every test run
# ------------------------------------------------------------------------------------------------
GOLDEN_FORMAT = 1
GOLDEN_IDS = {"text": "text", "image": "image", "video": "video", "audio": "audio", "image+audio": "image_audio",
              "packed:text|image": "packed_text_image"}
# the media each case's prompt uses (golden_recipe.MEDIA names), in prompt order
CASE_MEDIA = {"text": {}, "image": {"images": ["image_56x84.png"]},
              "video": {"videos": [["frame_0.png", "frame_1.png", "frame_2.png"]]},
              "audio": {"audios": ["audio_2.6s.wav"]},
              "image+audio": {"images": ["image_70x98.png"], "audios": ["audio_1.3s.wav"]},
              "packed:text|image": {"images": ["image_56x84.png"]}}
# Chat samples whose token ids are recorded, as the toolkit's JSONL samples (media relative to the
# media folder). render_prompt writes them in the released prompt format for the reference processor.
TOKEN_SAMPLES = {
    "image+audio": {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "image", "path": "image_70x98.png"},
                                     {"type": "audio", "path": "audio_1.3s.wav"},
                                     {"type": "text", "text": "Answer the spoken question about the image."}]},
        {"role": "assistant", "content": "It is noise."}]},
    # text where the byte-level BPE and its pre-tokenizer matter: digits, spaces, tabs, newlines,
    # accents, punctuation runs and CJK, over two turns
    "text": {"messages": [
        {"role": "system", "content": "You answer briefly.\nUse plain text."},
        {"role": "user", "content": "Hello,  world!\tWhat's 12345 + 678?\n\n(Answer in   one line.)"},
        {"role": "assistant", "content": " 13023 -- café, naïve; déjà vu..."},
        {"role": "user", "content": "你好，世界！再说一遍？ 2024年"},
        {"role": "assistant", "content": "OK:\n  13023\n"}]},
}
ROLE_TOKENS = {"system": "<B_SYS>", "user": "<C_Q>", "assistant": "<C_A>"}


def render_prompt(messages: list, media_dir: Path) -> str:
    """A sample in the released prompt format: <B_SYS>system<C_Q>user<C_A>answer<|endoftext|>...,
    media as the reference processor's tags (absolute paths)."""
    out = []
    for m in messages:
        out.append(ROLE_TOKENS[m["role"]])
        parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
        for part in parts:
            if part["type"] == "text":
                out.append(part["text"])
            elif part["type"] == "image":
                out.append(f'<img_start_baichuan>{json.dumps({"local": str(media_dir / part["path"])})}'
                           f'<img_end_baichuan>')
            elif part["type"] == "audio":
                out.append(f'<audio_start_baichuan>{json.dumps({"path": str(media_dir / part["path"])})}'
                           f'<audio_end_baichuan>')
            else:
                raise ValueError(f"no rendering for a {part['type']} part")
        if m["role"] == "assistant":
            out.append("<|endoftext|>")
    return "".join(out)


def sample_texts(messages: list) -> list[str]:
    return [p["text"] if isinstance(p, dict) else p for m in messages
            for p in (m["content"] if isinstance(m["content"], list) else [m["content"]])
            if not isinstance(p, dict) or p["type"] == "text"]


def trim_tokenizer(tokenizer, ref: Path, texts: list[str], dest: Path) -> dict:
    """The tokenizer restricted to `texts`, written to dest: every byte-level base token, every merge
    whose result occurs in one of the texts (byte-level form) and its result token, and the added
    tokens, all with their real ids; the tokenizer configs as released (less the chat template).

    This is exact for those texts: BPE only ever forms tokens that are substrings of the word it
    works on, so a merge left out can never fire on them, and the merges kept keep their order.
    """
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = bpe["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    b2u = bytes_to_unicode()
    forms = ["".join(b2u[b] for b in t.encode("utf-8")) for t in texts]
    kept = [(a, b) for a, b in merges if any(a + b in f for f in forms)]
    small = {c: vocab[c] for c in b2u.values()}
    small.update({a + b: vocab[a + b] for a, b in kept})
    # the added tokens go in the vocab with their ids too: a tokenizer gives an added token that
    # is not in its vocab the next free id, which is only right when the vocab is complete
    small.update(json.loads((ref / "added_tokens.json").read_text(encoding="utf-8")))
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(dict(sorted(small.items(), key=lambda kv: kv[1])),
                                                ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in kept), encoding="utf-8")
    for f in ("added_tokens.json", "special_tokens_map.json"):
        (dest / f).write_bytes((ref / f).read_bytes())
    cfg = json.loads((ref / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)  # a ChatML template the released model does not use (and text we need not carry)
    (dest / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"vocab_entries": len(small), "merges": len(kept), "of_merges": len(merges), "of_vocab": len(vocab)}


def export_golden(dest: Path, *, out: Path, ref: Path, model, cases: dict, tokenizer, tok_desc: str,
                  tok_sources: dict, weight_rules: dict, weight_digests: dict, seed: int, meta: dict) -> None:
    """Write the golden numbers into dest (see README.md, "Golden numbers")."""
    from safetensors.torch import save_file

    dest.mkdir(parents=True, exist_ok=True)
    mdir = dest / "model"
    mdir.mkdir(exist_ok=True)
    (mdir / "config.json").write_bytes((out / "config.json").read_bytes())
    media_dir = out / "media"

    vocab_size = int(model.config.vocab_size)
    columns = golden_recipe.logit_columns(vocab_size, sorted(TOKEN_CHECK.values()), seed)
    sketch = golden_recipe.sketch_matrix(vocab_size, seed)
    tensors: dict = {}
    case_meta: dict = {}
    for name, c in cases.items():
        cid = GOLDEN_IDS[name]
        fi = c["forward_inputs"]
        ids = fi["input_ids"]
        meta_c = {"input_ids": ids[0].tolist(), **CASE_MEDIA[name]}
        for k in ("images_grid", "videos_grid"):
            if k in fi:
                meta_c[k] = [list(map(int, g)) for g in fi[k]]
        for k in ("encoder_length", "bridge_length"):
            if k in fi:
                meta_c[k] = [int(x) for x in fi[k]]
        if "seqlens" in fi:
            meta_c["packed_lengths"] = [int(fi["seqlens"][0, 0]), ids.shape[1] - int(fi["seqlens"][0, 0])]
        case_meta[cid] = meta_c
        for key, value in golden_recipe.reduce_logits(c["logits"][0], columns, sketch).items():
            tensors[f"{cid}.logits.{key}"] = value
        tensors[f"{cid}.inputs_embeds.stats"] = golden_recipe.row_stats(c["inputs_embeds"][0])
        tensors[f"{cid}.hidden.stats"] = golden_recipe.row_stats(c["hidden_states"][-1][0])
        for k in ("images", "videos"):
            for i, x in enumerate(fi.get(k, [])):
                tensors[f"{cid}.{k}.{i}.stats"] = golden_recipe.row_stats(x)
        if "audios" in fi:
            if fi["audios"].shape[0] != 1:
                raise SystemExit(f"case {name}: the golden cases hold single-segment clips (mel frames = T)")
            tensors[f"{cid}.audios.0.stats"] = golden_recipe.row_stats(fi["audios"][0])
            tensors[f"{cid}.audio_codes"] = c["audio_codes"].long().contiguous()
            tensors[f"{cid}.vq_margins"] = c["vq_margins"].float().contiguous()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(dest / "golden.safetensors"), metadata={"format": "pt"})

    # token ids: the reference processor with the full tokenizer, and the same with the trimmed one
    texts = [t for s in TOKEN_SAMPLES.values() for t in sample_texts(s["messages"])]
    trim = trim_tokenizer(tokenizer, ref, texts, mdir)
    from transformers import AutoTokenizer

    small_tok = AutoTokenizer.from_pretrained(str(mdir), trust_remote_code=False)
    proc_full = model.bind_processor(tokenizer, training=False)
    proc_small = model.bind_processor(small_tok, training=False)
    token_ids = {}
    for name, sample in TOKEN_SAMPLES.items():
        prompt = render_prompt(sample["messages"], media_dir)
        ids = list(map(int, proc_full.process_one(prompt).input_ids))
        again = list(map(int, proc_small.process_one(prompt).input_ids))
        if again != ids:
            raise SystemExit(f"the trimmed tokenizer gives other ids than the full one for sample {name}")
        token_ids[name] = {"messages": sample["messages"],
                           "prompt": render_prompt(sample["messages"], Path(".")),
                           "input_ids": ids, "tokens": tokenizer.convert_ids_to_tokens(ids)}
    log(f"golden: trimmed tokenizer {trim} reproduces the full one on {len(TOKEN_SAMPLES)} samples")

    golden = {
        "format": GOLDEN_FORMAT,
        "what": "outputs of the released Baichuan-Omni-1.5 reference code (OmniForCausalLM, shrunk, seeded "
                "weights) recorded by tests/baichuan_ref/build_reference.py --golden; see tests/baichuan_ref/README.md",
        "seed": seed,
        "reference_sha256": meta["reference_sha256"],
        "versions": meta["versions"],
        "weights": {"file": "weights.json", "state_dict_sha256": golden_recipe.state_sha256(weight_digests),
                    "entries": len(weight_rules)},
        "media": {n: golden_recipe.media_sha256(media_dir / n) for n in golden_recipe.MEDIA},
        "logits": {"columns": columns, "sketch_dim": golden_recipe.SKETCH_DIM, "vocab_size": vocab_size},
        "cases": case_meta,
        "token_ids": {"tokenizer": tok_desc.replace(str(ref), "<REF>"), "sources": tok_sources, "trimmed": trim,
                      "samples": token_ids},
    }
    # weights.json: one line per state-dict entry, [rule, first 16 hex digits of its sha256]
    lines = [f"{json.dumps(k)}: {json.dumps([weight_rules[k], weight_digests[k][:16]])}" for k in sorted(weight_rules)]
    (dest / "weights.json").write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")
    (dest / "golden.json").write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    log(f"golden: wrote {dest} ({size / 1024:.0f} KiB)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", type=Path, default=os.environ.get("FINETUNE_BAICHUAN_REF"),
                    help="the reference baichuan-omni/model folder (default $FINETUNE_BAICHUAN_REF)")
    ap.add_argument("--tokenizer", type=Path, default=os.environ.get("FINETUNE_BAICHUAN_TOKENIZER") or None,
                    help="folder with tokenizer.json, or with a Qwen2 merges.txt (default "
                         "$FINETUNE_BAICHUAN_TOKENIZER); see load_tokenizer")
    ap.add_argument("--golden", type=Path, default=None,
                    help="also write the golden numbers here (tests/data/baichuan_golden); see README.md")
    args = ap.parse_args()
    if args.ref is None:
        ap.error("set FINETUNE_BAICHUAN_REF (or --ref) to the reference baichuan-omni/model folder")
    ref = args.ref.resolve()
    if not (ref / "modeling_omni.py").exists() or not (ref / "config.json").exists():
        ap.error(f"{ref} has no modeling_omni.py / config.json")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    configuration, modeling, _processor_module = import_reference(ref)
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(max(1, os.cpu_count() or 1))  # processor_omni sets 1 at import
    log(f"reference imported from {ref} (torch {torch.__version__}, transformers {transformers.__version__})")

    real = json.loads((ref / "config.json").read_text(encoding="utf-8"))
    shrunk = shrink_config(real)
    config = configuration.OmniConfig(**shrunk)

    torch.manual_seed(args.seed)
    torch.set_default_dtype(torch.float32)
    model = modeling.OmniForCausalLM(config).float()
    weight_rules, weight_digests = apply_weight_recipe(model, args.seed)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"built OmniForCausalLM: {n_params:,} parameters, vision attention "
        f"{model.model.visual_model.blocks[0].attn.__class__.__name__} ({time.time() - t0:.1f}s)")

    model.save_pretrained(str(out), safe_serialization=True)
    sd = model.state_dict()
    prefixes: dict[str, int] = {}
    for k in sd:
        parts = k.split(".")
        p = ".".join(parts[:2]) if parts[0] in ("model", "audio_tokenizer") else parts[0]
        prefixes[p] = prefixes.get(p, 0) + 1
    log(f"saved config.json + model.safetensors ({len(sd)} state-dict entries)")

    with tempfile.TemporaryDirectory() as work:
        tokenizer, tok_desc = load_tokenizer(ref, args.tokenizer, Path(work))
    log(f"tokenizer: {tok_desc}")
    tok_sources = {f"{where}/{f}": hashlib.sha256((d / f).read_bytes()).hexdigest()
                   for where, d in (("tokenizer", args.tokenizer), ("REF", ref)) if d is not None
                   for f in ("tokenizer.json", "merges.txt", "vocab.json") if (d / f).exists()}
    proc = model.bind_processor(tokenizer, training=False)
    media = make_media(out, args.seed)
    texts = prompts(media)

    cases: dict = {}
    for name in CASES:
        batch = proc([texts[name]])
        kw = forward_inputs(batch)
        rec = run_case(model, kw)
        ids = kw["input_ids"]
        finite = bool(torch.isfinite(rec["logits"]).all())
        case = {"prompt": texts[name], "forward_inputs": kw, "finite": finite,
                "position_ids": torch.arange(ids.shape[1]).unsqueeze(0),  # forward's default, stated
                **rec}
        cases[name] = case
        counts = {t: int((ids == i).sum()) for t, i in (("audio_pad", 151678), ("img_pad", 151681),
                                                         ("video_place", 151694))}
        extra = f" codes {tuple(rec['audio_codes'].shape)}, min VQ margin {float(rec['vq_margins'].min()):.1e}" \
            if "audio_codes" in rec else ""
        log(f"case {name:12s} L={ids.shape[1]:4d} {counts} finite={finite} "
            f"logits std={rec['logits'].std():.3f}{extra}")
        if not finite:
            raise SystemExit(f"non-finite logits in case {name}")

    # Packed (varlen) path: text + image in one row with seqlens -> flash_attn_varlen_func (our
    # stand-in), causal, block-diagonal; positions are NOT reset. Segment 2 must match "image".
    a, b = cases["text"]["forward_inputs"], cases["image"]["forward_inputs"]
    la = a["input_ids"].shape[1]
    ids = torch.cat([a["input_ids"], b["input_ids"]], 1)
    # 2-D seqlens must be [B, L] (same width as input_ids): OmniModel.forward takes seqlens.size(1) as
    # the row length. Each row lists the offsets where new sub-sequences start, 0-padded.
    seqlens = torch.zeros_like(ids, dtype=torch.int32)
    seqlens[0, 0] = la
    kw = {"input_ids": ids, "seqlens": seqlens}
    for k in ("images", "patch_nums", "images_grid"):
        kw[k] = b[k]
    rec = run_case(model, kw)
    packed_vs = {
        "text": float((rec["logits"][:, :la] - cases["text"]["logits"]).abs().max()),
        "image": float((rec["logits"][:, la:] - cases["image"]["logits"]).abs().max()),
    }
    cases["packed:text|image"] = {"prompt": texts["text"] + texts["image"], "forward_inputs": kw,
                                  "finite": bool(torch.isfinite(rec["logits"]).all()),
                                  "position_ids": torch.arange(kw["input_ids"].shape[1]).unsqueeze(0),
                                  **rec}
    log(f"case packed:text|image max|diff| vs separate runs: {packed_vs}")

    torch.save({"cases": cases, "seed": args.seed,
                "notes": {
                    "forward": "model.eval(), torch.no_grad(), OmniForCausalLM.forward(**forward_inputs); "
                               "attention_mask given and no seqlens -> the SDPA + 4-D causal mask path",
                    "forward_inputs": "processor output as collated by OmniMMProcessor.__call__([prompt]): "
                                      "images/videos are lists of [N,1176] float32, *_grid lists of (t,h,w), "
                                      "audios [n_seg,128,T] float32 mel with encoder_length/bridge_length",
                    "audio_codes": "audio_tokenizer(audios, encoder_length, bridge_length): [sum(bridge_length), 8]",
                    "vq_margins": "per code: 2nd-best minus best Euclidean distance (tiny = near tie)",
                    "audio_encoder_out": "audio_tokenizer.audio_model(audios, encoder_length): [n_seg, T2, d_model], "
                                         "padded frames 0",
                    "image_vit_out/video_vit_out": "visual_model output before the bridge: [patches, embed_dim]",
                    "image_embeds/video_embeds": "visual_bridge_model(visual_model(cat(images), grid)), computed "
                                                 "separately from the forward (same maths: attention is per image)",
                    "inputs_embeds": "input of model.layers[0] inside the forward (text + scattered media)",
                    "hidden_states": "output_hidden_states: embeddings, each layer's output, last one after model.norm",
                    "packed:text|image": "one row, seqlens [1,L] = [len(text), 0, ...] -> cu_seqlens [0, len(text), L] "
                                         "-> flash_attn_varlen_func path (our SDPA stand-in), no attention_mask, "
                                         "positions 0..L-1 not reset",
                }}, out / "cases.pt")
    log("saved cases.pt")

    # token_ids.json: one chat sample with an image and an audio clip, via the reference processor.
    one = proc.process_one(texts["image+audio"])
    ids = list(map(int, one.input_ids))
    token_ids = {
        "prompt": texts["image+audio"],
        "prompt_relative": texts["image+audio"].replace(str(out) + "/", ""),
        "media": {"image": str(media["image2"][0].relative_to(out)),
                  "audio": str(media["audio2"][0].relative_to(out))},
        "input_ids": ids,
        "tokens": tokenizer.convert_ids_to_tokens(ids),
        "n_img_pad": ids.count(151681), "n_audio_pad": ids.count(151678),
        "patch_nums": [int(x) for x in one.patch_nums], "images_grid": [list(map(int, g)) for g in one.images_grid],
        "encoder_length": [int(x) for x in one.encoder_length], "bridge_length": [int(x) for x in one.bridge_length],
        "tokenizer": tok_desc,
    }
    (out / "token_ids.json").write_text(json.dumps(token_ids, indent=1, ensure_ascii=False), encoding="utf-8")
    log(f"saved token_ids.json ({len(ids)} ids)")

    # Reload check: the saved files alone reproduce the logits.
    reloaded = modeling.OmniForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    reload_diff = {}
    for name in CASES:
        with torch.no_grad():
            lg = reloaded(**cases[name]["forward_inputs"]).logits
        reload_diff[name] = float((lg - cases[name]["logits"]).abs().max())
    log(f"reload from {out}: max|diff| per case {reload_diff}")
    if max(reload_diff.values()) > 1e-5:
        raise SystemExit("reloaded model does not reproduce the logits")

    def sha(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    import diffusers
    import huggingface_hub
    meta = {
        "seed": args.seed,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": transformers.__version__, "diffusers": diffusers.__version__,
                     "huggingface_hub": huggingface_hub.__version__, "numpy": np.__version__},
        "reference_dir": str(ref),
        "reference_sha256": {p.name: sha(p) for p in sorted(ref.glob("*.py")) + [ref / "config.json"]},
        "shrink": {"llm": LLM, "vision": VISION, "vision_attn_implementation": VISION_ATTN, "audio": AUDIO,
                   "codebook_sizes": CODEBOOKS, "vocoder": VOCODER, "flow_matching": FLOW,
                   "initializer_range": INIT_RANGE},
        "weights": {"recipe": "tests/baichuan_ref/golden_recipe.py", "seed": args.seed,
                    "kinds": {k: sum(r["kind"] == k for r in weight_rules.values())
                              for k in sorted({r["kind"] for r in weight_rules.values()})},
                    "state_dict_sha256": golden_recipe.state_sha256(weight_digests)},
        "tokenizer": tok_desc,
        "n_parameters": n_params,
        "state_dict_entries": len(sd),
        "state_dict_prefixes": prefixes,
        "cases": {n: {"seq_len": int(c["forward_inputs"]["input_ids"].shape[1]), "finite": c["finite"]}
                  for n, c in cases.items()},
        "packed_vs_separate_max_abs_diff": packed_vs,
        "reload_max_abs_diff": reload_diff,
        "seconds": round(time.time() - t0, 1),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    if args.golden is not None:
        public_desc = tok_desc.replace(str(args.tokenizer), "<tokenizer folder>") if args.tokenizer else tok_desc
        export_golden(args.golden.resolve(), out=out, ref=ref, model=model, cases=cases, tokenizer=tokenizer,
                      tok_desc=public_desc, tok_sources=tok_sources, weight_rules=weight_rules,
                      weight_digests=weight_digests, seed=args.seed, meta=meta)
    for k, v in prefixes.items():
        log(f"  {k:50s} {v}")
    log(f"done in {meta['seconds']}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
