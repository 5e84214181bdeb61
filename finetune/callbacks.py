"""The Trainer's callbacks (layer 5): the checks before step 1, metrics.jsonl, test hooks that
interrupt a run, the sharding report, checkpoint files' modes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from finetune import fsutil
from finetune.data.schema import Sample
from finetune.distributed import local_weight_elements
from finetune.families.base import Family
from finetune.probes import pick_probes, preflight
from finetune.runtime import rank, torch_dtype, world_size


def make_preflight_callback(family: Family, processor, samples: list[Sample], rope, mode: str, precision: str):
    """Before the first step: run evaluation's generation and the export's probe forward on one
    sample per modality mix (probes.preflight), so a broken eval/export path stops the run now.
    Under DDP every rank checks its own copy of the model and the ranks share the outcome: a
    failure on any rank stops every rank here, with that rank's error (a rank that went on alone
    would wait in its first collective until the timeout)."""

    class Preflight(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if mode in ("fsdp", "deepspeed"):
                return  # sharded weights: generation needs every rank in step; not checked here
            t0 = time.time()
            device = next(model.parameters()).device
            # under 16-bit training the trained weights are fp32 beside a 16-bit base: autocast, as in a step
            amp = (functools.partial(torch.autocast, device.type, dtype=torch_dtype(precision))
                   if precision in ("bf16", "fp16") else contextlib.nullcontext)
            error, probes = None, []
            try:
                probes = preflight(model, family, processor, samples, rope, amp=amp)
            except Exception as e:  # noqa: BLE001 - reported below, on every rank
                error = e
            failures = preflight_failures(error)
            if failures:
                where, what = next(((r, m) for r, m in failures if r == rank()), failures[0])
                mixes = ", ".join(f"{s.where} ({'+'.join(sorted(s.modalities()))})" for s in pick_probes(samples))
                on_rank = f" on rank {where} of {world_size()}" if world_size() > 1 else ""
                raise RuntimeError(f"before training: evaluation's generation or the export's probe forward fails"
                                   f"{on_rank} on the probe samples ({mixes}): {what}. Nothing was trained; "
                                   "eval and export would fail the same way after training.") from error
            print(f"checked generation and export probes on {len(probes)} modality mix(es) in "
                  f"{time.time() - t0:.1f} s", flush=True)

    return Preflight()


def preflight_failures(error: Exception | None) -> list[tuple[int, str]]:
    """(rank, "Type: message") of every rank whose check before step 1 failed: this process's
    alone, or every rank's under torch.distributed (a collective: all ranks call it)."""

    mine = None if error is None else f"{type(error).__name__}: {error}"
    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        every: list = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
    else:
        every = [mine]
    return [(r, m) for r, m in enumerate(every) if m is not None]


def make_shard_report_callback():
    """Sharded runs: say how much of the weights this rank holds (ZeRO-3, FSDP2), measured on the
    prepared model, so a user sees the sharding they chose at work."""

    class ShardReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            local, total, q_local, q_total = local_weight_elements(model)
            quant = f"; 4-bit weights {q_local / max(q_total, 1):.0%} of theirs" if q_total else ""
            print(f"weights held by this rank: {local:,} of {total:,} stored elements "
                  f"({local / max(total, 1):.0%}){quant}", flush=True)

    return ShardReport()


def make_metrics_callback(run_dir: Path):
    """A callback appending every log record to run_dir/metrics.jsonl."""
    class MetricsJsonl(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")

    return MetricsJsonl()


def make_crash_callback():
    """Test hooks: FINETUNE_CRASH_AFTER_STEP=N raises after optimizer step N (an interrupted run);
    FINETUNE_KILL_AFTER_STEP=N sends the process SIGKILL there (kill -9)."""

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            n = int(os.environ.get("FINETUNE_CRASH_AFTER_STEP", "0") or 0)
            if n and state.global_step >= n:
                raise KeyboardInterrupt(f"FINETUNE_CRASH_AFTER_STEP={n}: simulated interruption")
            k = int(os.environ.get("FINETUNE_KILL_AFTER_STEP", "0") or 0)
            if k and state.global_step >= k:  # kill -9: no handler, no cleanup runs

                os.kill(os.getpid(), signal.SIGKILL)

    return CrashAfter()


def make_checkpoint_modes_callback():
    """Checkpoint files get the modes of the user's umask (safetensors writes its files 0600)."""
    class CheckpointModes(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    fsutil.follow_umask(folder)

    return CheckpointModes()


