"""Where a training step's time goes: data wait, encoders, LLM forward, backward, optimizer.

    python bench/step_split.py                         # the CPU peer setup (bench/cpu_peer.py), both modes
    python bench/step_split.py --recipe medical-tiny   # a recipe as it is (e.g. the CPU demo)
    python bench/step_split.py --recipe medical-tiny model.path=/models/Qwen2.5-Omni-7B   # anything, on a GPU

The run is built with train.py's own pieces (the recipe's model, roles, attention backends, the
collator, TRL's trainer and its optimizer), then steps are taken by hand so each phase can be
timed: the wait for the next batch from the trainer's data loader (the collator: decoding,
encoding, packing), the forward of the media towers (hooks on them), the rest of the forward
(the LLM and the loss), the backward, and the optimizer step with zeroing. On CUDA every phase
ends with a synchronize, so the figures are GPU time. Medians over `--steps` steps from the second
epoch on (in the first epoch packed rows are collated once; its data wait is shown on its own line;
as in training, the encodings the checks before step 1 made are kept for the collator). A second
table puts the collator's rate (one worker: the main process) beside the trainer's step rate:
with data.num_workers workers the collator's rate multiplies, and the step never waits where it
stays above the trainer's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from cpu_peer import MODES, overrides  # noqa: E402

PHASES = ("data wait", "encoders", "LLM forward + loss", "backward", "optimizer", "other")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def split(recipe, steps: int, warmup: int) -> dict:
    from finetune import adapters, attention
    from finetune import collate
    from finetune.data import reading
    from finetune import runtime
    from finetune import trainer
    from finetune.families import family_for

    runtime.quiet_libraries()
    family = family_for(recipe.model.path, recipe.model.family)
    reading.prepare_data(recipe)
    precision = runtime.choose_precision(recipe.train.precision)
    run_dir = Path(tempfile.mkdtemp())
    args = trainer.training_args(recipe, precision, run_dir)
    samples, skipped = reading.read_split(recipe.data.train, recipe, on_error="skip")
    loaded = trainer.load_for_training(recipe, family, precision)
    from finetune.packing import EncodedCache

    # as train.py does: the checks' encodings kept for the collator (no workers on the CPU)
    encodings = EncodedCache(family, loaded.processor, [], family.rope_index(loaded.model),
                             collate.collator_cache_bytes(recipe)) if runtime.data_workers(recipe) == 0 else None
    samples, lengths = reading.prepare_split(samples, family, loaded, recipe, skipped, encodings)
    if encodings is not None:
        encodings.samples = samples
    attn = attention.choose(recipe.model.attn, recipe.data.packing)
    attention.apply_to_llm(loaded.model, attn)
    attention.apply_to_encoders(loaded.model, family)
    model, _ = adapters.apply_roles(loaded.model, family, recipe, gradient_checkpointing=recipe.train.gradient_checkpointing)
    adapters.fp32_trainable(model)
    rope = family.rope_index(loaded.model)
    train_ds, collator = collate.make_collator(recipe, family, loaded.processor, samples, lengths, rope, attn,
                                         family.tower_inputs(loaded.model), encodings)
    trainer = trainer.make_trainer(recipe, family, model, loaded.processor, train_ds, collator, precision, run_dir, [],
                             args=args)
    trainer.create_optimizer()
    opt = trainer.optimizer
    model = trainer.model
    model.to(args.device)
    model.train()
    device = next(model.parameters()).device
    towers = [m for m in (family.submodule(model, p) for p in ("model.visual", "model.audio_tower",
                                                               "model.visual_model", "audio_tokenizer")) if m]
    t_enc = [0.0]

    def pre(*_):
        sync(device)
        t_enc.append(time.perf_counter())

    def post(*_):
        sync(device)
        t_enc[0] += time.perf_counter() - t_enc.pop()

    for m in towers:
        m.register_forward_pre_hook(pre)
        m.register_forward_hook(post)
    loader = trainer.get_train_dataloader()
    per_epoch = len(loader)
    rows = []
    it = iter(loader)
    for i in range(per_epoch + warmup + steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = trainer._prepare_inputs(batch)
        sync(device)
        t1 = time.perf_counter()
        t_enc[0] = 0.0
        n_items = (batch["labels"][..., 1:] != -100).sum()
        loss = trainer.compute_loss(model, batch, num_items_in_batch=n_items)
        sync(device)
        t2 = time.perf_counter()
        trainer.accelerator.backward(loss)
        sync(device)
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        t4 = time.perf_counter()
        rows.append({"data wait": t1 - t0, "encoders": t_enc[0], "LLM forward + loss": t2 - t1 - t_enc[0],
                     "backward": t3 - t2, "optimizer": t4 - t3, "total": t4 - t0})
    later = rows[per_epoch + warmup:]  # from the second epoch on: encoded samples are kept (data.cache_gb)
    out = {k: statistics.median(r[k] for r in later) for k in later[0]}
    first = rows[warmup:per_epoch] or rows[:per_epoch]
    out["data wait, first epoch"] = statistics.median(r["data wait"] for r in first)
    return out


def main(argv=None) -> int:
    from finetune.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", help="time this recipe as it is instead of the peer setup")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of --recipe")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.recipe:
            runs[args.recipe] = load_recipe(args.recipe, [f"output.dir={tmp}/r", *args.overrides])
        else:
            from finetune.demo_data import generate_medical

            data = Path(tmp) / "data"
            generate_medical(data, n_train=200, n_eval=0, seed=0)
            for mode, extra in MODES.items():
                runs[mode] = load_recipe("medical-tiny", [*overrides(data, Path(tmp) / "r"), *extra])
        res = {name: split(r, args.steps, args.warmup) for name, r in runs.items()}
    print("| phase | " + " | ".join(f"{n}: ms/step | share" for n in res) + " |")
    print("|---|" + "---|---|" * len(res))
    for ph in PHASES[:-1]:
        cells = []
        for r in res.values():
            cells += [f"{1000 * r[ph]:.1f}", f"{100 * r[ph] / r['total']:.0f}%"]
        print(f"| {ph} | " + " | ".join(cells) + " |")
    cells = []
    for r in res.values():
        cells += [f"{1000 * r['total']:.1f}", "100%"]
    print("| step | " + " | ".join(cells) + " |")
    print("| data wait in the first epoch (the checks' encodings kept; packed rows collated) | " +
          " | ".join(f"{1000 * r['data wait, first epoch']:.1f} | " for r in res.values()) + " |")
    print()
    print("| setup | collator, one worker: batches/s first epoch | batches/s later (kept encodings) | "
          "trainer: steps/s without the data wait |")
    print("|---|---|---|---|")
    for name, r in res.items():
        compute = r["total"] - r["data wait"]
        print(f"| {name} | {1 / r['data wait, first epoch']:.1f} | {1 / max(r['data wait'], 1e-9):.1f} | "
              f"{1 / compute:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
