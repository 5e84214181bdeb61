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
import wave
from pathlib import Path

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"
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
def randomize_constants(model, gen) -> list[str]:
    """Make every parameter informative: the reference's _init_weights leaves biases at 0 and
    LayerNorm / RMSNorm / GroupNorm weights at 1 (and embedding row padding_idx=0 at 0), which would
    hide bias / norm-weight mistakes. Constant tensors get noise: ones -> 1 + 0.1 N, zeros -> 0.05 N.
    Row 0 of embed_tokens (zeroed because config.pad_token_id=0) gets a random row too, as in the
    real checkpoint."""
    import torch

    touched = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            if flat.numel() and bool((flat == flat[0]).all()):
                base = float(flat[0])
                std = 0.1 if base != 0.0 else 0.05
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
                touched.append(name)
        emb = model.model.embed_tokens.weight
        emb[0] = torch.randn(emb.shape[1], generator=gen, dtype=emb.dtype) * INIT_RANGE
    return touched


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
def write_png(path: Path, rng, h: int, w: int) -> None:
    import numpy as np
    from PIL import Image

    # Smooth-ish random image (noise on a random gradient), so resizing does something.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(yy * rng.uniform(1, 4) + xx * rng.uniform(1, 4)) % 256 for _ in range(3)], -1)
    img = np.clip(base + rng.normal(0, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(img, "RGB").save(path)


def write_wav(path: Path, rng, seconds: float, sr: int = 16000) -> None:
    import numpy as np

    n = round(seconds * sr)
    t = np.arange(n) / sr
    x = 0.05 * rng.standard_normal(n)
    for _ in range(3):
        x += rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t + rng.uniform(0, 6.3))
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def make_media(out: Path, seed: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    m = out / "media"
    m.mkdir(parents=True, exist_ok=True)
    media = {
        # 56x84 -> smart_resize keeps 56x84 -> grid (1,4,6) -> 6 tokens
        "image": (m / "image_56x84.png", (56, 84)),
        # 70x98 -> round-half-even gives 56x112 (a real resize) -> grid (1,4,8) -> 8 tokens
        "image2": (m / "image_70x98.png", (70, 98)),
        # video frames 60x90 -> resized to 56x84 -> 6 tokens per frame
        "frames": [(m / f"frame_{i}.png", (60, 90)) for i in range(3)],
        "audio": (m / "audio_2.6s.wav", 2.6),   # 41600 samples -> 261 mel frames -> 32 tokens
        "audio2": (m / "audio_1.3s.wav", 1.3),  # 20800 samples -> 131 mel frames -> 16 tokens
    }
    write_png(media["image"][0], rng, *media["image"][1])
    write_png(media["image2"][0], rng, *media["image2"][1])
    for p, (h, w) in media["frames"]:
        write_png(p, rng, h, w)
    write_wav(media["audio"][0], rng, media["audio"][1])
    write_wav(media["audio2"][0], rng, media["audio2"][1])
    return media


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref", type=Path, default=os.environ.get("FINETUNE_BAICHUAN_REF"),
                    help="the reference baichuan-omni/model folder (default $FINETUNE_BAICHUAN_REF)")
    ap.add_argument("--tokenizer", type=Path, default=os.environ.get("FINETUNE_BAICHUAN_TOKENIZER") or None,
                    help="folder with tokenizer.json, or with a Qwen2 merges.txt (default "
                         "$FINETUNE_BAICHUAN_TOKENIZER); see load_tokenizer")
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
    gen = torch.Generator().manual_seed(args.seed + 1)
    torch.set_default_dtype(torch.float32)
    model = modeling.OmniForCausalLM(config).float()
    randomized = randomize_constants(model, gen)
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
        "randomized_constant_params": len(randomized),
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
    for k, v in prefixes.items():
        log(f"  {k:50s} {v}")
    log(f"done in {meta['seconds']}s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
