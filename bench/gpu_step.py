"""Training-step benchmark on real architectures with random weights: memory, speed, MFU, plan.

    python bench/gpu_step.py                       # on a CUDA machine: every family, LoRA bf16 and QLoRA 4-bit
    python bench/gpu_step.py --family qwen2_5_omni --mode qlora --max-tokens 4096 --steps 4
    python bench/gpu_step.py --tiny --device cpu   # smoke run of the same code on the tiny configs

For each family (Qwen2.5-Omni-7B thinker, Baichuan-Omni-1.5, Qwen3-Omni-30B-A3B thinker, Nemotron-3-Nano-Omni; each
family's first shipped config in finetune/configs) and each mode, it writes a random checkpoint of
the real shape to a temporary folder (Family.random_checkpoint), loads it
through the family's own loader (so QLoRA quantises exactly as training does), applies the
roles of the matching recipe (RECIPES; gradient checkpointing on, one process), and runs packed
training steps of image+audio+text samples encoded by the family's own encoder (a 448x448 noise
image, 4 s of noise, 100 random words; synthetic_row) up to `--max-tokens`. It prints, per run: peak GPU memory, real tokens per
second, model FLOPs utilisation (step_flops below: 6N per LLM token with checkpointing, plus the
towers' forward; against --peak-tflops) and the planner's predicted peak beside the measured one.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.models import load_spec
from finetune import adapters, attention  # noqa: E402
from finetune.families import get_family  # noqa: E402
from finetune.families.base import IGNORE_INDEX, EncodedSample  # noqa: E402
from finetune.packing import pack_encoded  # noqa: E402
from finetune.plan import CONFIG_DIR  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.runtime import quiet_libraries
from finetune.verify import to_model  # noqa: E402

#: which recipes each family's rows run (data, not code: everything else comes from the Family contract)
RECIPES = {("qwen2_5_omni", "lora"): "medical", ("qwen2_5_omni", "qlora"): "medical-qlora",
           ("baichuan_omni", "lora"): "medical-baichuan", ("baichuan_omni", "qlora"): "medical-baichuan-qlora",
           ("qwen3_omni_moe", "lora"): "medical-qwen3-omni", ("qwen3_omni_moe", "qlora"): "medical-qwen3-omni-qlora",
           # a recipe and its overrides
           ("gemma4", "lora"): "medical-gemma4 model.quantize=none", ("gemma4", "qlora"): "medical-gemma4",
           ("nemotron_omni", "lora"): "medical-nemotron-omni",
           ("nemotron_omni", "qlora"): "medical-nemotron-omni model.quantize=4bit"}
FAMILIES = sorted({f for f, _ in RECIPES})
WORDS = ("the a lesion lung left right upper lower small large round bright dark spot mass heart eye retina "
         "normal abnormal nodule report findings impression compare prior current study patient").split()


def llm_layers_within(family, max_gb: float) -> tuple[int | None, int]:
    """(decoder layers to build, the real count): all of them unless the bf16 weights exceed
    `max_gb` (Qwen3-Omni-30B-A3B's 59 GB: a random checkpoint that size is neither built nor
    written in a benchmark's minutes), then as many as fit; per-token speed and MFU scale per layer."""
    from finetune.plan import count_model

    _, count = count_model(family.name, CONFIG_DIR / family.shipped_configs[0])
    layers, total = count.llm.layers, sum(count.roles.values()) * 2 / 2 ** 30
    if total <= max_gb:
        return None, layers
    per_layer = count.roles["llm"] * 2 / 2 ** 30 / layers
    return max(1, int((max_gb - (total - per_layer * layers)) / per_layer)), layers


def random_checkpoint(family, tiny: bool, dtype, folder: Path, llm_layers: int | None = None) -> Path:
    """A random model of the real (or tiny) shape saved like a released folder, with the tiny
    model's tokenizer and processor files (the samples are encoded with them)."""
    tiny_dir = family.resolve_path(f"tiny:{family.name}")
    if tiny:
        shutil.copytree(tiny_dir, folder, dirs_exist_ok=True)
        return folder
    family.random_checkpoint(CONFIG_DIR / family.shipped_configs[0], folder, dtype, llm_layers)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for p in tiny_dir.iterdir():  # what the family wrote beside the weights (its processor settings) stays
        if p.is_file() and not p.name.endswith(".safetensors") and not (folder / p.name).exists():
            shutil.copyfile(p, folder / p.name)
    return folder


def token_ids(cfg) -> dict[tuple, int]:
    """Every `*token_id` / `*token_index` of a config (nested), by its key path."""
    out = {}

    def walk(d, path):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, path + (k,))
            elif isinstance(v, int) and not isinstance(v, bool) and "token" in k and k.endswith(("_id", "_index")):
                out[path + (k,)] = v
    walk(cfg, ())
    return out


def synthetic_row(family, processor, model, tiny_cfg: dict, media: Path, max_tokens: int, seed: int):
    """Samples (a 448x448 image, 4 s of audio and 100 words, a short answer) filling a row, encoded
    by the family's own encoder with the tiny tokenizer, their special-token ids then moved to the
    model config's (the same keys in both configs) and their positions recomputed for the model."""
    from finetune.data.schema import parse_sample

    remap = {}
    real = token_ids(json.loads((Path(model.name_or_path) / "config.json").read_text()))
    for key, tid in token_ids(tiny_cfg).items():
        if key in real:
            remap[tid] = real[key]
    rope = family.rope_index(model)
    rng = random.Random(seed)
    out, used = [], 0
    while True:
        text = " ".join(rng.choice(WORDS) for _ in range(100))
        msgs = [{"role": "user", "content": [{"type": "image", "path": "x.png"}, {"type": "audio", "path": "x.wav"},
                                             {"type": "text", "text": text}]},
                {"role": "assistant", "content": "Yes. A small round lesion in the upper left of the lung field."}]
        e = family.encode(parse_sample({"messages": msgs}, source="bench", line=seed, base_dir=media), processor)
        if used + e.num_tokens > max_tokens:
            if not out:
                raise SystemExit(f"one sample has {e.num_tokens} tokens, more than --max-tokens {max_tokens}")
            break
        e.input_ids = torch.tensor([remap.get(int(t), int(t)) for t in e.input_ids])
        e.labels = torch.where(e.labels == IGNORE_INDEX, e.labels, e.input_ids)
        if rope is not None:
            e.position_ids = rope(e.input_ids, e.media)
        out.append(e)
        used += e.num_tokens
        seed += 1
    return out


def step_flops(family, model, row: list[EncodedSample], *, checkpointing: bool) -> float:
    """Model FLOPs of one training step on `row` (the MFU numerator, defined here):

    * LLM (decoder and lm_head, N parameters; a mixture of experts: the parameters a token runs,
      attention and its top-k experts): 2N per token forward, 2N backward for the inputs'
      gradients (LoRA: the frozen weights get none; the adapters' own are negligible), and with
      gradient checkpointing 2N more for the recomputed forward: 6N per token (4N without);
    * media towers (frozen): their forward, 2 x their parameters per position they process
      (vision patches, audio frames), from the feature rows each sample's media give and the
      family's tower positions per row (Family.tower_shapes);
    * attention's score and value products are not counted (the usual convention; at 4096 tokens
      they add a few percent)."""
    def params(role_names):
        return sum(adapters.param_count(p) for n, p in model.named_parameters() if family.role_of(n) in role_names)

    cfg = json.loads((Path(model.name_or_path) / "config.json").read_text())
    shapes = family.tower_shapes(model.config)
    n_llm = params(("llm", "lm_head"))
    fused = [p for n, p in model.named_parameters() if family.expert_params
             and n.endswith(tuple("." + e for e in family.expert_params))]
    experts = sum(p.numel() for p in fused)
    if experts:  # a token runs its top-k experts only (of the fused tensors' [experts, out, in])
        text = model.config.get_text_config()
        n_llm -= experts * (1 - text.num_experts_per_tok / fused[0].shape[0])
    tokens = sum(e.num_tokens for e in row)
    flops = (6 if checkpointing else 4) * n_llm * tokens
    rows = {"image": 0, "video": 0, "audio": 0}
    for e in row:
        for kind, _, n in family.media_placeholders(e, cfg):
            rows[kind] += n
    flops += 2 * params(("vision_encoder", "vision_projector")) * shapes.patches_per_token * (rows["image"] + rows["video"])
    flops += 2 * params(("audio_encoder", "audio_projector")) * shapes.frames_per_audio_token * rows["audio"]
    return float(flops)


def write_media(folder: Path) -> Path:
    """The benchmark's image and audio clip (noise), written once."""
    import numpy as np
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((448, 448, 3)) * 255).astype("uint8")).save(folder / "x.png")
    sf.write(folder / "x.wav", (rng.standard_normal(4 * 16000) * 0.1).astype(np.float32), 16000)
    return folder


def run_one(family_name: str, mode: str, args) -> dict:
    from finetune.plan import plan as make_plan

    family = get_family(family_name)
    # one process on one GPU: the recipe's multi-GPU strategy (Qwen3-Omni's) is not what is measured
    name, *overrides = RECIPES[(family_name, mode)].split()
    recipe = load_recipe(name, [*overrides, f"data.max_tokens={args.max_tokens}", "train.gradient_checkpointing=true",
                                "train.distributed=auto"])
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    tmp = Path(tempfile.mkdtemp(prefix="gpu-step-"))
    try:
        layers, real_layers = (None, 0) if args.tiny else llm_layers_within(family, args.max_weights_gb)
        folder = random_checkpoint(family, args.tiny, dtype, tmp / "model", layers)
        recipe.model.path = str(folder)
        predicted = make_plan(recipe, gpu_gb=args.gpu_gb).peak / 2 ** 30 if not args.tiny else float("nan")
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        loaded = family.load(load_spec(recipe, dtype=dtype, attn="sdpa"))
        attention.configure_cuda_kernels()
        attn = attention.choose(recipe.model.attn, packing=True)
        attention.apply_to_llm(loaded.model, attn)
        attention.apply_to_encoders(loaded.model, family)  # as training does
        model, _ = adapters.apply_roles(loaded.model, family, recipe, gradient_checkpointing=True)
        adapters.fp32_trainable(model)
        if recipe.model.quantize == "none":
            model.to(args.device)
        model.train()
        # the training loss: training's label-token head (TRL's chunked log-probabilities, its Triton kernel on
        # CUDA, on the label tokens only), through the family's backbone and lm_head
        from finetune.loss import add_label_head, label_positions

        add_label_head(model.get_base_model(), family.label_head_parts)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5,
                                fused=args.device.startswith("cuda"))  # train.optim: adamw_torch_fused
        towers = family.tower_inputs(loaded.model)
        tiny_cfg = json.loads((family.resolve_path(f"tiny:{family.name}") / "config.json").read_text())
        media = write_media(tmp / "media")
        rows = [synthetic_row(family, loaded.processor, loaded.model, tiny_cfg, media, args.max_tokens, seed=100 * k)
                for k in range(args.steps + 1)]
        batches = [to_model(pack_encoded(family, [r], loaded.processor.pad_id,
                                         with_varlen_args=attn in attention.VARLEN_ARGS, towers=towers), model,
                             family)
                   for r in rows]
        tokens = [sum(e.num_tokens for e in r) for r in rows]
        flops = [step_flops(family, loaded.model, r, checkpointing=True) for r in rows]

        def step(b):
            b = dict(b)
            labels = b.pop("labels")
            positions = label_positions(labels.cpu()).to(labels.device)
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
                out = model(**b, labels=labels, label_positions=positions)
                loss = -out.log_probs.sum() / max(1, positions.numel())
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
                "layers": f"{layers}/{real_layers}" if layers else "all",
                "tok/s": tps, "peak GB": peak, "planned GB": predicted, "MFU": mfu}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="all", choices=["all", *FAMILIES])
    ap.add_argument("--mode", default="both", choices=["both", "lora", "qlora"])
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the tiny configs (a smoke run of this script)")
    ap.add_argument("--gpu-gb", type=float, default=24.0)
    ap.add_argument("--max-weights-gb", type=float, default=24.0,
                    help="build fewer decoder layers when a model's bf16 weights exceed this (planned GB: those layers)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100 SXM: 989)")
    args = ap.parse_args(argv)
    quiet_libraries()
    fams = FAMILIES if args.family == "all" else [args.family]
    modes = ["lora", "qlora"] if args.mode == "both" else [args.mode]
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\ngpu_step: {'tiny' if args.tiny else 'real'} shapes, random weights, {dev}, packed rows of "
          f"<= {args.max_tokens} tokens (image+audio+text samples), gradient checkpointing, {args.steps} timed steps")
    hdr = (f"{'family':<15}{'mode':<7}{'attn':<9}{'layers':>7}{'tokens/step':>12}{'tok/s':>10}{'peak GB':>9}"
           f"{'planned GB':>12}{'MFU':>7}")
    print(hdr)
    print("-" * len(hdr), flush=True)
    failed = 0
    # each row is printed as soon as it is measured (make gpu-check saves it then, so a run stopped at
    # its time limit keeps the rows before); a row that fails is printed as such and the others still run
    for f in fams:
        for m in modes:
            try:
                r = run_one(f, m, args)
            except Exception as e:  # noqa: BLE001  (an OOM or a bug in one family: the next rows still run)
                failed += 1
                traceback.print_exc()
                print(f"{f:<15}{m:<7}FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                      flush=True)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
            print(f"{r['family']:<15}{r['mode']:<7}{r['attn']:<9}{r['layers']:>7}{r['tokens/step']:>12}"
                  f"{r['tok/s']:>10.0f}{r['peak GB']:>9.2f}{r['planned GB']:>12.2f}{100 * r['MFU']:>6.1f}%", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
