"""Packing benchmark: padding efficiency and training throughput, packed rows vs padded batches.

    python bench/packing.py [--max-tokens 2048] [--repeats 7]      (or: make bench-packing)
    python bench/packing.py --roles medical-tiny       # also train the vision encoder, as the CPU demo does
    python bench/packing.py --size 7b                  # on a GPU: bf16, the 7B thinker's shape
    python bench/packing.py --size 7b --profile prof/  # and where a packed / padded epoch's time goes

Two mixtures: the demo data (synthetic scans, some audio, a few text-only samples) and a
long-tail one (many short text samples, some long image+audio ones). For each:
  * efficiency = real tokens / token slots, for padded batches (samples in random order, padded
    to the longest of the batch) and for packed rows (BFD, rows of max_tokens);
  * rows (or batches) per epoch;
  * training throughput in real tokens per second on the tiny model (forward, backward and
    optimizer step; roles of the recipe named by --roles: medical, the default, freezes the
    encoders, medical-tiny trains the vision tower in full), packed vs padded measured as whole
    epochs (the same samples either way), interleaved in one run,
    median of the repeats. The padded batch holds as many
    samples as a packed row on average, so both process the same data per step.
Absolute times are only meaningful on the same machine; the ratio is the figure.

Packed efficiency is given two ways: "packed" counts the token slots the model computes (a
packed row is as long as its samples; micro-batches of rows would pad to the longest row), and
"fill" counts rows as max_tokens slots each, i.e. how full BFD packs the budget; its ceiling is
real / (ceil(real / max_tokens) * max_tokens), printed as "best fill".

Packing removes padding from the LLM's tokens only; the media encoders see each image and clip
alone either way, so their time is the same packed or padded. The bench times the encoders'
forward inside the packed steps and prints their share and the speed-up it leaves possible
("Amdahl", with the padded efficiency; measured can exceed it where padded rows cost more per
slot), so a small gain on an encoder-heavy model is told apart from a slow packed path.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.models import load_spec
from finetune import adapters, attention  # noqa: E402
from finetune.data.schema import load_samples  # noqa: E402
from finetune.families import get_family  # noqa: E402
from finetune.packing import pack_encoded, plan_bins  # noqa: E402
from finetune.recipe import load_recipe  # noqa: E402
from finetune.runtime import quiet_libraries
from finetune.verify import to_model  # noqa: E402


def long_tail_dataset(folder: Path, n_short: int = 300, n_long: int = 30, seed: int = 0) -> Path:
    """Many short text samples and a few long image+audio ones."""
    import json

    rng = np.random.default_rng(seed)
    (folder / "m").mkdir(parents=True, exist_ok=True)
    words = "the lesion is small and round in the upper left lung field with no other finding".split()
    lines = []
    for i in range(n_short):
        q = " ".join(rng.choice(words, size=int(rng.integers(3, 12))))
        a = " ".join(rng.choice(words, size=int(rng.integers(2, 10))))
        lines.append({"messages": [{"role": "user", "content": q + "?"}, {"role": "assistant", "content": a + "."}]})
    for i in range(n_long):
        side = int(rng.integers(300, 448))
        Image.fromarray((rng.random((side, side)) * 255).astype("uint8")).save(folder / "m" / f"{i}.png")
        sf.write(folder / "m" / f"{i}.wav", (rng.standard_normal(int(16000 * rng.uniform(4, 10))) * 0.1)
                 .astype(np.float32), 16000)
        lines.append({"messages": [
            {"role": "user", "content": [{"type": "image", "path": f"m/{i}.png"}, {"type": "audio", "path": f"m/{i}.wav"},
                                         {"type": "text", "text": "Describe the scan and the dictated note."}]},
            {"role": "assistant", "content": " ".join(rng.choice(words, size=30)) + "."}]})
    rng2 = random.Random(seed)
    rng2.shuffle(lines)
    path = folder / "long_tail.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


# (text hidden, ffn, layers, heads, kv heads, mrope), (vision hidden, ffn, depth, heads, full-attention
# blocks), (audio d_model, ffn, layers, heads): "7b" is the Qwen2.5-Omni-7B thinker's shape.
SIZES = {
    "small": ((1024, 2816, 12, 16, 4, [8, 12, 12]), (512, 1408, 8, 8, [3, 7]), (512, 2048, 8, 8)),
    "7b": ((3584, 18944, 28, 28, 4, [16, 24, 24]), (1280, 3420, 32, 16, [7, 15, 23, 31]), (1280, 5120, 32, 20)),
}


def sized_model(tiny_cfg, size: str, dtype, device):
    """A random thinker of the given shape (the tiny one's vocabulary and special tokens)."""
    import copy

    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    (th, tf, tl, tn, tk, mr), (vh, vf, vd, vn, vfull), (ah, af, al, an) = SIZES[size]
    cfg = copy.deepcopy(tiny_cfg)
    t = cfg.text_config
    t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads = \
        th, tf, tl, tn, tk
    t.rope_parameters["mrope_section"] = mr  # halves of the head dimension
    t.layer_types = ["full_attention"] * tl
    v = cfg.vision_config
    v.hidden_size, v.intermediate_size, v.depth, v.num_heads, v.out_hidden_size = vh, vf, vd, vn, th
    v.fullatt_block_indexes = vfull
    a = cfg.audio_config
    a.d_model, a.encoder_ffn_dim, a.encoder_layers, a.encoder_attention_heads, a.output_dim = ah, af, al, an, th
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the training dtype, directly on the device
    try:
        with torch.device(device):
            return Qwen2_5OmniThinkerForConditionalGeneration._from_config(cfg, dtype=dtype).to(dtype)
    finally:
        torch.set_default_dtype(default)


def padded_batches(n: int, batch: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch] for i in range(0, n, batch)]


def efficiency_padded(lengths, batches) -> float:
    real = sum(lengths[i] for b in batches for i in b)
    slots = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return real / slots


def profile_epochs(folder: Path, mixture: str, epoch, device: str) -> None:
    """One profiled epoch per kind: where the time of a packed vs a padded epoch goes."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    for kind in ("packed", "padded"):
        with profile(activities=activities, record_shapes=True) as prof:
            epoch(kind)
        ka = prof.key_averages()
        by = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
        text = (f"{mixture} {kind}: one epoch\n\nby {by}\n{ka.table(sort_by=by, row_limit=40)}\n\n"
                f"by call count\n{ka.table(sort_by='count', row_limit=25)}\n")
        (folder / f"{mixture}-{kind}.txt").write_text(text)
    print(f"profiles of the {mixture} epochs in {folder}/")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=7, help="timed epochs of each kind, interleaved")
    ap.add_argument("--roles", default="medical", choices=["medical", "medical-tiny"],
                    help="which recipe's roles to train: medical (the default; LoRA LLM, full projectors, frozen "
                         "encoders, as users train a real model) or medical-tiny (also the whole vision encoder, "
                         "which the random demo model needs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default float32 on the CPU, bfloat16 on CUDA")
    ap.add_argument("--size", default="tiny", choices=["tiny", "small", "7b"],
                    help="small (0.2B) or 7b (the 7B thinker's shape): random weights, for GPUs")
    ap.add_argument("--samples", type=int, default=400,
                    help="training samples of the demo mixture (the long-tail one scales with it: 3/4 short, 3/40 "
                         "long); fewer for a quick run of this script (make gpu-check DRY=1)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="after the warm-up, profile one epoch of each kind (torch.profiler) and write "
                         "<dir>/<mixture>-<kind>.txt (ops by device or host time, and by call count)")
    args = ap.parse_args(argv)
    quiet_libraries()
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    attention.configure_cuda_kernels()

    recipe = load_recipe("medical-tiny")
    if args.roles == "medical":
        roles = load_recipe("medical").roles
        recipe.roles = roles
    fam = get_family("qwen2_5_omni")
    loaded = fam.load(load_spec(recipe, dtype=dtype, attn="sdpa"))
    if args.size != "tiny":
        loaded.model = sized_model(loaded.model.config, args.size, dtype, args.device)
    attn = attention.choose("auto", packing=True)
    attention.apply_to_llm(loaded.model, attn)
    varlen_args = attn in ("varlen", "flash_attention_2")  # as the training collator does
    model, _ = adapters.apply_roles(loaded.model, fam, recipe, gradient_checkpointing=args.size == "7b")
    model.to(args.device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    proc, rope = loaded.processor, fam.rope_index(loaded.model)

    from finetune.demo_data import generate_medical

    tmp = Path(tempfile.mkdtemp(prefix="bench-packing-"))
    demo = generate_medical(tmp / "demo", n_train=args.samples, seed=0)["train"]
    mixtures = {"demo": demo, "long-tail": long_tail_dataset(tmp / "lt", n_short=max(1, args.samples * 3 // 4),
                                                             n_long=max(1, args.samples * 3 // 40))}

    # forward time of the media encoders inside the timed packed steps (on CUDA each encoder call
    # is synchronised, which costs a little overlap; on the CPU it is exact)
    enc_time, shares = [0.0], []
    for mod_name, mod in model.named_modules():
        if mod_name.endswith((".visual", ".audio_tower")):
            def pre(*_):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                enc_time.append(time.perf_counter())

            def post(*_):
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                enc_time[0] += time.perf_counter() - enc_time.pop()
            mod.register_forward_pre_hook(pre)
            mod.register_forward_hook(post)

    rows_out = []
    for name, path in mixtures.items():
        samples, _ = load_samples(path)
        lengths = [fam.count_tokens(s, proc) for s in samples]
        bins = plan_bins(lengths, args.max_tokens)
        per_row = max(1, round(len(samples) / len(bins)))
        batches = padded_batches(len(samples), per_row, seed=0)
        eff_fill = sum(lengths) / (len(bins) * args.max_tokens)
        best_fill = sum(lengths) / (-(-sum(lengths) // args.max_tokens) * args.max_tokens)
        eff_packed = 1.0  # batch of one row: no slot is computed that is not a real token
        eff_padded = efficiency_padded(lengths, batches)
        enc = [fam.encode(s, proc, rope=rope) for s in samples]

        def step(batch):
            out = model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # every timed unit is a whole epoch, so packed and padded process exactly the same samples
        # (BFD puts the biggest samples, e.g. the videos, in the first rows: a few rows or batches
        # would compare different media loads)
        made = {"packed": [to_model(pack_encoded(fam, [[enc[i] for i in g]], proc.pad_id,
                                                 with_varlen_args=varlen_args), model, fam) for g in bins],
                "padded": [to_model(fam.collate_padded([enc[i] for i in g], proc.pad_id), model, fam) for g in batches]}
        tokens = sum(lengths)

        def epoch(kind):
            """One epoch of training steps; returns real tokens / second (and notes the encoders' share)."""
            enc_time[0] = 0.0
            t0 = time.perf_counter()
            for b in made[kind]:
                step(b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            took = time.perf_counter() - t0
            if kind == "packed":
                shares.append(enc_time[0] / took)
            return tokens / took

        # warm-up: one epoch each, so every shape has been seen once, as in any epoch after the
        # first (kernels and allocator caches are per shape on CUDA)
        epoch("packed"), epoch("padded")
        if args.profile:
            profile_epochs(args.profile, name, epoch, args.device)
        tps = {"packed": [], "padded": []}
        shares.clear()
        for k in range(args.repeats):
            for kind in (("packed", "padded") if k % 2 == 0 else ("padded", "packed")):
                tps[kind].append(epoch(kind))
        med = {k: statistics.median(v) for k, v in tps.items()}
        # the speed-up of each interleaved pair of epochs (run back to back, so sharing the
        # machine's state); the median of those is the figure, min and max show the spread
        ratios = [p / q for p, q in zip(tps["packed"], tps["padded"])]
        share = statistics.median(shares)
        # Amdahl: the encoders cost the same packed or padded; only the LLM part scales with slots
        amdahl = share + (1 - share) / eff_padded
        rows_out.append((name, len(samples), eff_padded, eff_packed, eff_fill, best_fill, len(batches), len(bins),
                         med["padded"], med["packed"], ratios, share, amdahl))

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\npacking benchmark: {args.size} Qwen2.5-Omni thinker ({n_params:.1f}M parameters"
          f"{', gradient checkpointing' if args.size == '7b' else ''}), roles of "
          f"{args.roles}, {str(dtype).replace('torch.', '')} on {dev}, max_tokens {args.max_tokens}, "
          f"{args.repeats} interleaved epochs of each, medians; llm attention "
          f"{loaded.model.config.get_text_config()._attn_implementation}")
    hdr = (f"{'mixture':<10}{'samples':>8}{'eff padded':>12}{'eff packed':>12}{'fill':>8}{'best fill':>11}"
           f"{'batches':>9}{'rows':>6}{'tok/s padded':>14}{'tok/s packed':>14}{'speed-up (min-max)':>20}{'encoders':>10}"
           f"{'Amdahl':>9}")
    print(hdr)
    print("-" * len(hdr))
    for name, n, ep, ek, ef, bf, nb, nr, tp, tk, ra, sh, ce in rows_out:
        spread = f"{statistics.median(ra):.2f}x ({min(ra):.2f}-{max(ra):.2f})"
        print(f"{name:<10}{n:>8}{100 * ep:>11.1f}%{100 * ek:>11.1f}%{100 * ef:>7.1f}%{100 * bf:>10.1f}%"
              f"{nb:>9}{nr:>6}{tp:>14.0f}{tk:>14.0f}{spread:>20}{100 * sh:>9.0f}%{ce:>8.2f}x")
    print("encoders: forward time of the vision and audio encoders in a packed step (their backward, when "
          "trained, is not counted);\nAmdahl: the speed-up expected if only the LLM part shrank with the padding "
          "removed, encoders + (1 - encoders) / eff padded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
