"""Several processes (layer 5): the strategy (DDP, DeepSpeed, FSDP2) and its Trainer settings,
the process state DeepSpeed and FSDP2 need on the CPU (gloo), and leaving the process group.

Under torchrun every rank runs the training script; only rank 0 writes the run folder
(finetune.runfolder). The engines' precision (fp32 trained weights beside a 16-bit base) is
finetune.engines'.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from finetune import engines
from finetune.deepspeed_presets import DEEPSPEED_PRESETS
from finetune.errors import ConfigError, MissingFileError
from finetune.paths import PROJECT, recipes_dir
from finetune.recipe import Recipe
from finetune.runtime import is_main_process, world_size

DEEPSPEED_INSTALL = 'pip install -e ".[deepspeed]"'


def distributed_mode(recipe: Recipe) -> str:
    """single | ddp | fsdp | deepspeed: train.distributed with `auto` resolved by the launch."""
    mode = recipe.train.distributed
    if mode == "auto":
        return "ddp" if world_size() > 1 else "single"
    return mode


def deepspeed_config(setting: str) -> Path:
    """A preset name (recipes/deepspeed/<name>.json) or a path to a DeepSpeed JSON config."""
    if setting in DEEPSPEED_PRESETS:
        for folder in (recipes_dir() / "deepspeed", PROJECT / "recipes" / "deepspeed"):
            if (folder / f"{setting}.json").is_file():
                return (folder / f"{setting}.json").resolve()
        raise MissingFileError(f"DeepSpeed preset {setting}.json not found in recipes/deepspeed/")
    path = Path(setting)
    if not path.is_file():
        raise MissingFileError(f"train.deepspeed: {path} does not exist")
    return path.resolve()


def check_distributed(recipe: Recipe) -> None:
    """Fail before anything is loaded when the chosen strategy cannot run here."""
    if recipe.train.distributed == "deepspeed":
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"train.distributed=deepspeed needs DeepSpeed, which is not installed: {DEEPSPEED_INSTALL}")
        deepspeed_config(recipe.train.deepspeed)


def distributed_args(recipe: Recipe) -> dict:
    """SFTConfig settings of the strategy (DDP needs none beyond torchrun's environment)."""
    mode = distributed_mode(recipe)
    if mode == "deepspeed":
        path = deepspeed_config(recipe.train.deepspeed)
        engines.check_deepspeed_config(path)
        return {"deepspeed": str(path)}
    if mode == "fsdp":
        # FSDP2 shards per parameter, so frozen base weights and trainable LoRA/full roles can share
        # a wrapped block; blocks are the model's own layer classes (_no_split_modules).
        return {"fsdp": "full_shard auto_wrap",
                "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                "state_dict_type": "FULL_STATE_DICT", "reshard_after_forward": True}}
    if mode == "ddp" and world_size() > 1:
        # a packed row without images leaves the (trained) vision roles without gradients on that rank
        return {"ddp_find_unused_parameters": True}
    return {}


def cpu_sharded_state(mode: str) -> dict:
    """DeepSpeed and FSDP2 on the CPU (gloo). accelerate enables either engine only on an
    accelerator device (its own CPU state is plain MULTI_CPU DDP), although both run on gloo: the
    process state is set up here as accelerate's launcher would, and the Trainer is told to use it
    (`use_cpu` stays on: with a configured state it selects nothing, and transformers refuses bf16
    off a GPU without it). Returns the extra SFTConfig settings (none on CUDA or for one process)."""
    if torch.cuda.is_available() or world_size() == 1 or mode not in ("deepspeed", "fsdp"):
        return {}

    state = PartialState(cpu=True)  # gloo process group, ranks from torchrun's environment
    if mode == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps the group above
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        state.distributed_type = DistributedType.DEEPSPEED
    else:
        # AcceleratorState turns a multi-device state into FSDP (with the FSDP plugin) when
        # ACCELERATE_USE_FSDP is set; the device stays the CPU set up above
        os.environ["ACCELERATE_USE_FSDP"] = "true"
        state.distributed_type = DistributedType.MULTI_GPU
    return {"accelerator_config": {"use_configured_state": True}}


def quiet_other_ranks() -> None:
    """Under torchrun, only rank 0 prints: the console shows one run, not one per process."""
    if world_size() > 1 and not is_main_process() and not os.environ.get("FINETUNE_ALL_RANKS_PRINT"):
        sys.stdout = open(os.devnull, "w")


def local_weight_elements(model) -> tuple[int, int, int, int]:
    """(local, total) stored elements of all weights and of the 4-bit ones (packed) on this rank:
    ZeRO-3 keeps a partition (`ds_tensor`) of each, FSDP2 a shard (a DTensor's local part)."""
    local = total = q_local = q_total = 0
    four_bit = {id(m.weight) for m in model.modules() if type(m).__name__ == "Linear4bit"}
    for p in model.parameters():
        full = int(getattr(p, "ds_numel", p.numel()))
        if hasattr(p, "ds_tensor"):
            mine = p.ds_tensor.numel()
        elif hasattr(p, "to_local"):
            mine = p.to_local().numel()
        else:
            mine = p.numel()
        local, total = local + mine, total + full
        if id(p) in four_bit:
            q_local, q_total = q_local + mine, q_total + full
    return local, total, q_local, q_total


def end_distributed() -> None:
    """After training, every rank leaves the process group together. Rank 0 then evaluates and
    exports alone; the others exit. Left to interpreter shutdown, gloo's process group was torn
    down while its threads still ran, and a rank could abort ("terminate called without an
    active exception", seen once in CI) after a run that had finished."""

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # evaluation and export load the model again in this process: not as ZeRO-3 partitions
    # (transformers keeps the training's DeepSpeed config in a global) and not under accelerate's
    # engine switches set for training (cpu_sharded_state)

    unset_hf_deepspeed_config()
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(k, None)


