"""Training-step benchmark on real architectures with random weights: memory, speed, MFU, plan.

    python bench/gpu_step.py                       # on a CUDA machine: both families, LoRA bf16 and QLoRA 4-bit
    python bench/gpu_step.py --family qwen2_5_omni --mode qlora --max-tokens 4096 --steps 4
    python bench/gpu_step.py --tiny --device cpu   # smoke run of the same code on the tiny configs

For each family (Qwen2.5-Omni-7B thinker, Baichuan-Omni-1.5; configs shipped in finetune/configs)
and each mode, it writes a random checkpoint of the real shape to a temporary folder, loads it
through the family's own loader (so QLoRA quantises exactly as training does), applies the
roles of the matching recipe (medical / medical-qlora / medical-baichuan / medical-baichuan-qlora,
gradient checkpointing on), and runs packed training steps of image+audio+text samples built
directly in token space (random text ids, the model's own media placeholder ids, random pixels
and mel features) up to `--max-tokens`. It prints, per run: peak GPU memory, real tokens per
second, model FLOPs utilisation (step_flops below: 6N per LLM token with checkpointing, plus the
towers' forward; against --peak-tflops) and the planner's predicted peak beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune import adapters, attention  # noqa: E402
from finetune.families import get_family  # noqa: E402
from finetune.families.base import IGNORE_INDEX, EncodedSample  # noqa: E402
from finetune.packing import pack_encoded  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.train import quiet_libraries  # noqa: E402
from finetune.verify import to_model  # noqa: E402

RECIPES = {("qwen2_5_omni", "lora"): "medical", ("qwen2_5_omni", "qlora"): "medical-qlora",
           ("baichuan_omni", "lora"): "medical-baichuan", ("baichuan_omni", "qlora"): "medical-baichuan-qlora"}
CONFIGS = {"qwen2_5_omni": "qwen2_5_omni_7b.json", "baichuan_omni": "baichuan_omni_1_5.json"}


def random_checkpoint(family, tiny: bool, dtype, folder: Path) -> Path:
    """A random model of the real (or tiny) shape saved like a released folder."""
    tiny_dir = family.resolve_path(f"tiny:{family.name}")
    if tiny:
        shutil.copytree(tiny_dir, folder, dirs_exist_ok=True)
        return folder
    cfg_path = Path(__file__).resolve().parent.parent / "finetune" / "configs" / CONFIGS[family.name]
    cfg = json.loads(cfg_path.read_text())
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    # built on the GPU when there is one: random init of 8B parameters on the CPU takes minutes
    where = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        with where:
            if family.name == "qwen2_5_omni":
                from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

                model = Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(**cfg))
            else:
                from finetune.families.baichuan_model import BaichuanOmniConfig, BaichuanOmniForCausalLM

                model = BaichuanOmniForCausalLM(BaichuanOmniConfig(**cfg))
    finally:
        torch.set_default_dtype(default)
    model.to(dtype).save_pretrained(str(folder), max_shard_size="5GB")
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if family.name == "baichuan_omni":
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for p in tiny_dir.iterdir():  # tokenizer and processor files (the batches bypass them)
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "config.json":
            shutil.copyfile(p, folder / p.name)
    return folder


def synthetic_row(family, model, max_tokens: int, seed: int) -> list[EncodedSample]:
    """Samples of ~600 tokens (an image of 16x16 merged patches, 8 s of audio, text) filling a row."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    out, used = [], 0
    while True:
        n_text = 200
        if family.name == "qwen2_5_omni":
            img_id, aud_id, vocab = cfg.image_token_index, cfg.audio_token_index, cfg.get_text_config().vocab_size
            n_img, n_aud, mel_frames = 256, 200, 800
        else:
            img_id = cfg.visual_config["image_pad_token_id"]
            aud_id = cfg.audio_config["audio_pad_token_id"]
            vocab, n_img, n_aud, mel_frames = cfg.vocab_size, 256, 100, 801
        n = n_text + n_img + n_aud
        if used + n > max_tokens:
            break
        hi = min(vocab, 151643, img_id, aud_id) - 32  # ordinary text ids, below every special token
        ids = torch.cat([torch.randint(0, hi, (n_text // 2,), generator=g),
                         torch.full((n_img,), img_id), torch.full((n_aud,), aud_id),
                         torch.randint(0, hi, (n_text - n_text // 2,), generator=g)])
        labels = ids.clone()
        labels[: n_text // 2 + n_img + n_aud] = IGNORE_INDEX
        grid = torch.tensor([1, 32, 32])
        media = {"pixel_values": torch.randn(32 * 32, 3 * 2 * 14 * 14, generator=g), "image_grid_thw": grid[None]}
        mel = torch.randn(128, mel_frames, generator=g) * 0.5
        if family.name == "qwen2_5_omni":
            media["input_features"] = [mel]
            media["audio_feature_lengths"] = torch.tensor([mel_frames])
            pos = family.rope_index(model)(ids, media)
        else:
            media["audio_features"] = [mel]
            pos = torch.arange(n)
        out.append(EncodedSample(input_ids=ids, labels=labels, position_ids=pos, media=media, sample_id=str(seed)))
        used += n
        seed += 1
    return out


def step_flops(family, model, row: list[EncodedSample], *, checkpointing: bool) -> float:
    """Model FLOPs of one training step on `row` (the MFU numerator, defined here):

    * LLM (decoder and lm_head, N parameters): 2N per token forward, 2N backward for the inputs'
      gradients (LoRA: the frozen weights get none; the adapters' own are negligible), and with
      gradient checkpointing 2N more for the recomputed forward: 6N per token (4N without);
    * media towers (frozen): their forward, 2 x their parameters per position they process
      (vision patches, audio frames after the first convolution);
    * attention's score and value products are not counted (the usual convention; at 4096 tokens
      they add a few percent)."""
    def params(role_names):
        return sum(adapters.param_count(p) for n, p in model.named_parameters() if family.role_of(n) in role_names)

    n_llm = params(("llm", "lm_head"))
    tokens = sum(e.num_tokens for e in row)
    flops = (6 if checkpointing else 4) * n_llm * tokens
    patches = sum(int(e.media[k].prod(-1).sum()) for e in row for k in ("image_grid_thw", "video_grid_thw")
                  if k in e.media)
    frames = sum(f.shape[-1] // 2 for e in row for f in e.media.get("input_features", e.media.get("audio_features", [])))
    flops += 2 * params(("vision_encoder", "vision_projector")) * patches
    flops += 2 * params(("audio_encoder", "audio_projector")) * frames
    return float(flops)


def run_one(family_name: str, mode: str, args) -> dict:
    from finetune.plan import plan as make_plan

    family = get_family(family_name)
    recipe = load_recipe(RECIPES[(family_name, mode)], [f"data.max_tokens={args.max_tokens}",
                                                         "train.gradient_checkpointing=true"])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="gpu-step-"))
    try:
        folder = random_checkpoint(family, args.tiny, dtype, tmp / "model")
        recipe.model.path = str(folder)
        predicted = make_plan(recipe, gpu_gb=args.gpu_gb).peak / 2 ** 30 if not args.tiny else float("nan")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        loaded = family.load(recipe, dtype=dtype, attn="sdpa")
        attention.configure_cuda_kernels()
        attn = attention.choose(recipe.model.attn, packing=True)
        attention.apply_to_llm(loaded.model, attn)
        attention.apply_to_encoders(loaded.model, family)  # as training does
        model, _ = adapters.apply_roles(loaded.model, family, recipe, gradient_checkpointing=True)
        adapters.fp32_trainable(model)
        if recipe.model.quantize == "none":
            model.to(args.device)
        model.train()
        # the training loss: TRL's chunked LM head (its Triton kernel on CUDA), log-probabilities only
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=args.device.startswith("cuda"))  # train.optim: adamw_torch_fused
        towers = family.tower_inputs(loaded.model)
        rows = [synthetic_row(family, loaded.model, args.max_tokens, seed=100 * k) for k in range(args.steps + 1)]
        batches = [to_model(pack_encoded(family, [r], loaded.processor.pad_id,
                                         with_varlen_args=attn in attention.VARLEN_ARGS, towers=towers), model,
                             family)
                   for r in rows]
        tokens = [sum(e.num_tokens for e in r) for r in rows]
        flops = [step_flops(family, loaded.model, r, checkpointing=True) for r in rows]

        def step(b):
            b = dict(b)
            labels = b.pop("labels")
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                out = model(**b, labels=labels, fused_lm_head=True)
                loss = -out.log_probs.sum() / out.label_mask.sum().clamp(min=1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step(batches[0])  # warm-up
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for b in batches[1:]:
            step(b)
        sync()
        dt = time.perf_counter() - t0
        tps = sum(tokens[1:]) / dt
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if args.device.startswith("cuda") else float("nan")
        mfu = sum(flops[1:]) / dt / (args.peak_tflops * 1e12) if args.device.startswith("cuda") else float("nan")
        return {"family": family_name, "mode": mode, "attn": attn, "tokens/step": sum(tokens[1:]) // args.steps,
                "tok/s": tps, "peak GB": peak, "planned GB": predicted, "MFU": mfu}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="both", choices=["both", "qwen2_5_omni", "baichuan_omni"])
    ap.add_argument("--mode", default="both", choices=["both", "lora", "qlora"])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs (a smoke run of this script)")
    ap.add_argument("--gpu-gb", type=float, default=24.0)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    args = ap.parse_args(argv)
    quiet_libraries()
    fams = ["qwen2_5_omni", "baichuan_omni"] if args.family == "both" else [args.family]
    modes = ["lora", "qlora"] if args.mode == "both" else [args.mode]
    rows = [run_one(f, m, args) for f in fams for m in modes]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\ngpu_step: {'tiny' if args.tiny else 'real'} shapes, random weights, {dev}, packed rows of "
          f"<= {args.max_tokens} tokens (image+audio+text samples), gradient checkpointing, {args.steps} timed steps")
    hdr = f"{'family':<15}{'mode':<7}{'attn':<9}{'tokens/step':>12}{'tok/s':>10}{'peak GB':>9}{'planned GB':>12}{'MFU':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['family']:<15}{r['mode']:<7}{r['attn']:<9}{r['tokens/step']:>12}{r['tok/s']:>10.0f}"
              f"{r['peak GB']:>9.2f}{r['planned GB']:>12.2f}{100 * r['MFU']:>6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
