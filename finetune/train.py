"""Recipe -> run folder, top to bottom (layer 6).

    1. the run folder: ours, locked, the resolved recipe written (with where each value came from)
    2. data: the demo set generated if the recipe asks, every sample of every split read,
       decoded, encoded and checked before the first step
    3. model: family, load (4/8-bit on the LLM if asked), attention, roles -> LoRA/full
    4. train with the Trainer (finetune.trainer) and the collator (finetune.collate), resuming
       from the last complete checkpoint
    5. the adapter (PEFT format) swapped in with the processor files, metrics, loss curve

Under torchrun (`make finetune GPUS=4`) every rank runs this; only rank 0 takes the run lock
and writes the run folder. Each rank trains on its own packed bins (the Trainer's distributed
sampler), and the step loss is the mean over all label tokens of the global step. A staged
recipe's stages are trained one by one by the CLI (finetune.cli.run_stages), each through here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from finetune import adapters, attention, fsutil, hub, kernels
from finetune.callbacks import (
    make_checkpoint_modes_callback,
    make_crash_callback,
    make_metrics_callback,
    make_preflight_callback,
    make_shard_report_callback,
)
from finetune.collate import collator_cache_bytes, make_collator, record_batches, rows_folder
from finetune.console import system_prompt_lines
from finetune.data.reading import (
    check_method,
    mix_sources,
    prepare_data,
    prepare_pairs,
    prepare_split,
    read_source,
    read_split,
)
from finetune.distributed import check_distributed, distributed_mode, end_distributed, quiet_other_ranks
from finetune.errors import ConfigError
from finetune.models import family_of, model_folder
from finetune.packing import EncodedCache, idle_media
from finetune.recipe import Recipe, save_resolved
from finetune.runfolder import (
    complete,
    last_checkpoint,
    legacy_adapter,
    lock_run,
    save_adapter,
    save_sharded_adapter,
    step_checkpoints,
    truncate_metrics,
    write_loss_curve,
    write_skipped,
)
from finetune.runtime import choose_precision, data_workers, is_main_process, quiet_libraries, torch_dtype, world_size
from finetune.trainer import load_for_training, make_trainer, training_args


def train(recipe: Recipe) -> Path:
    """Train one recipe (one stage of a staged one); returns the run folder (adapter in
    run_dir/adapter)."""
    if recipe.stages:
        raise ConfigError("a staged recipe trains stage by stage: run it with `python -m finetune train` (or "
                          "finetune.cli.run_stages), which trains each stage through here")
    quiet_libraries()
    quiet_other_ranks()
    check_distributed(recipe)
    run_dir = recipe.run_dir
    main = is_main_process()
    # 1. before anything is written: output.dir is new, empty or a run folder of ours, and two runs
    # never share it (rank 0 only); the adapter this run will replace must be ours too
    lock_run(run_dir)
    if main:
        fsutil.check_replaceable(run_dir / "adapter", legacy_adapter)
        save_resolved(recipe, run_dir / "recipe.yaml")
    hub.clear_resolved()  # this run's hub snapshots only, in resolved_sources.json below
    torch.manual_seed(recipe.train.seed)
    precision = choose_precision(recipe.train.precision)
    args = training_args(recipe, precision, run_dir)  # under torchrun: joins the process group
    mode = distributed_mode(recipe)
    if world_size() > 1 or mode != "single":
        t = recipe.train
        print(f"distributed: {mode} over {world_size()} processes; global batch = {t.batch_size} row(s) per "
              f"device x {world_size()} x {t.grad_accum} accumulation = {t.batch_size * world_size() * t.grad_accum}",
              flush=True)

    # 2. data: the main process of each node first writes the shared caches (demo data, tiny model,
    # token counts), the other ranks then read them. Every problem of the data is found before the
    # first step: with `raise` the run then stops naming the first bad sample of the file, with
    # `skip` it drops and reports them all; the eval split too (evaluation must not meet a sample
    # it cannot read)
    with args.main_process_first(local=True, desc="data and model"):
        prepare_data(recipe)
        family = family_of(recipe)
        sources = recipe.data.sources()
        per_source = [read_source(src, recipe, on_error="skip") for src in sources]
        skipped = [e for _, errs in per_source for e in errs]
        eval_samples, eval_skipped = read_split(recipe.data.eval, recipe, on_error="skip")
        model_folder(recipe, family)  # a tiny model is built once
    method = recipe.train.method
    for src, (got, _) in zip(sources, per_source):
        check_method(got, method, src.label)
    check_method(eval_samples, method, f"data.eval ({recipe.data.eval})")
    if method == "dpo" and len(sources) > 1:
        raise ConfigError("train.method dpo reads one source (data.train: a path or one source); a mixture of "
                          "several would pick chosen and rejected answers apart")
    if main:
        hub.write_resolved(run_dir)  # the commits of the hub ids above, before anything is trained
    # every rank loads at once: under ZeRO-3 each weight is partitioned as it is created, a
    # collective (rank 0 loading alone while the others wait at the barrier deadlocks)
    loaded = load_for_training(recipe, family, precision)
    processor, rope = loaded.processor, family.rope_index(loaded.model)
    with args.main_process_first(local=True, desc="sample checks"):
        # the encodings made by the checks are kept for the collator (data.cache_gb), so the first
        # epoch does not make them again (with workers: collated into rows they all read); a
        # mixture repeats and subsamples its sources, so the collator keeps its own from epoch 1
        encodings = EncodedCache(family, processor, [], rope, collator_cache_bytes(recipe, shared=True)) \
            if len(sources) == 1 else None
        # dpo: each pair as its chosen and its rejected conversation, adjacent ([c0, r0, c1, r1, ...])
        prep = prepare_pairs if method == "dpo" else prepare_split
        ready = [prep(got, family, loaded, recipe, skipped, encodings) for got, _ in per_source]
        eval_samples, _ = prep(eval_samples, family, loaded, recipe, eval_skipped)
    if recipe.data.on_error == "raise" and (skipped or eval_skipped):
        raise min(skipped or eval_skipped, key=lambda e: (str(e.file), e.line or 0))
    for src, (got, _) in zip(sources, ready):
        if not got:
            raise ConfigError(f"{src.label}: no usable training samples")
    samples, lengths = mix_sources(recipe, sources, ready, run_dir if main else None)
    if encodings is not None:
        encodings.samples = samples  # the usable ones, which the kept encodings are indexed by

    # 3. model: the LLM's attention and the towers', then the roles. LoRA's random init comes from
    # the seed alone, not from how much randomness loading drew (ZeRO-3's partitioned construction
    # of Baichuan's model drew differently: other lora_A)
    attn = attention.choose(recipe.model.attn, recipe.data.packing)
    attention.apply_to_llm(loaded.model, attn)
    attention.apply_to_encoders(loaded.model, family)
    torch.manual_seed(recipe.train.seed)
    model, plan = adapters.apply_roles(loaded.model, family, recipe,
                                       gradient_checkpointing=recipe.train.gradient_checkpointing)
    adapters.fp32_trainable(model)
    print(f"model {loaded.base_path} ({family.name}), precision {precision}, "
          f"quantize {recipe.model.quantize}, attention {attn}")
    print(adapters.format_role_table(adapters.role_table(model, family, plan)), flush=True)
    if attn == attention.VARLEN and torch.cuda.is_available():  # decided here once, said once
        kernel, why = kernels.select(torch.device("cuda", torch.cuda.current_device()), torch_dtype(precision))
        print(f"packed attention kernel: {kernel} ({why})", flush=True)
    if main:  # the prompt rendered on samples without their own system turn, and where it came from
        print("\n".join(system_prompt_lines(recipe, processor.settings().get("system_prompt"), samples)), flush=True)

    # 4. the Trainer. Sharded weights (DeepSpeed, FSDP over several ranks) make a tower's forward a
    # collective, so every rank runs every tower every step (idle media)
    engine = world_size() > 1 and mode in ("fsdp", "deepspeed")
    idle = idle_media(family, processor, samples, lengths, rope) if engine else None
    rows = rows_folder() if recipe.data.packing and data_workers(recipe.data.num_workers) > 0 else None
    train_ds, collator = make_collator(recipe, family, processor, samples, lengths, rope, attn,
                                       family.tower_inputs(loaded.model), encodings, idle, rows)
    callbacks = [make_metrics_callback(run_dir), make_crash_callback(),
                 *([make_shard_report_callback()] if engine else []),
                 make_preflight_callback(family, processor, eval_samples or samples, rope, mode, precision),
                 make_checkpoint_modes_callback()]
    trainer = make_trainer(recipe, family, model, processor, train_ds, record_batches(collator), precision, run_dir,
                           callbacks, args=args)
    resume = {"auto": last_checkpoint(run_dir), "never": None}.get(recipe.train.resume, recipe.train.resume)
    if main:
        for stale in step_checkpoints(run_dir):
            if not complete(stale):  # cut short by a kill or a full disk while saving
                print(f"removing incomplete checkpoint {stale}", flush=True)
                shutil.rmtree(stale, ignore_errors=True)
        if resume:
            truncate_metrics(run_dir, int(Path(resume).name.split("-")[-1]))
        else:
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if resume:
        print(f"resuming from {resume}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if rows is not None:
            shutil.rmtree(rows, ignore_errors=True)

    # 5. what the run leaves: the adapter (gathered by every rank under an engine), the skipped
    # samples, the loss curve
    if mode in ("fsdp", "deepspeed"):
        save_sharded_adapter(trainer, family, loaded, run_dir / "adapter")
    elif main:
        save_adapter(model, family, loaded, run_dir / "adapter")
    if main:
        write_skipped(run_dir, skipped)
        write_loss_curve(run_dir)
    end_distributed()
    return run_dir
