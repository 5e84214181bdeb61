"""Recipe -> run folder, top to bottom.

    1. resolve the run folder, write the resolved recipe (with where each value came from)
    2. data: generate the demo set if asked, read and validate every sample before training
    3. model: family, load (4/8-bit on the LLM if asked), roles -> LoRA/full, print the table
    4. train with TRL's SFTTrainer (a transformers Trainer) and the toolkit's collator
    5. save the adapter (PEFT format) with the processor files, metrics, loss curve

Under torchrun (`make finetune GPUS=4`) every rank runs this; only rank 0 takes the run lock
and writes the run folder. Each rank trains on its own packed bins (the Trainer's distributed
sampler), and the step loss is the mean over all label tokens of the global step.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import adapters, attention, fsutil, hub, kernels
from finetune.data.schema import DataError, Sample
from finetune.deepspeed_presets import DEEPSPEED_PRESETS
from finetune.errors import ConfigError, MissingFileError
from finetune.families import family_for
from finetune.families.base import EncodedSample, Family, LoadedModel, cache_root
from finetune.recipe import Recipe, save_resolved
from finetune.recipe.load import default_recipes_dir
from finetune.runlock import is_main_process, legacy_adapter, lock_run, world_size


# ---- environment ----------------------------------------------------------------------------
def quiet_libraries() -> None:
    """Keep the console readable: our own progress bar and tables, not every library's."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", message=".*use_reentrant.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")


def native_bf16() -> bool:
    """The GPU computes in bfloat16 natively: compute capability 8.0 or more (Ampere), or a ROCm
    device that says so. `torch.cuda.is_bf16_supported()` also counts emulation, which T4, RTX 20xx,
    TITAN RTX and V100 offer: slow bf16 and no flash kernels there."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability() >= (8, 0)


def choose_precision(setting: str) -> str:
    """auto -> bf16 where the GPU has it natively, fp16 (with a loss scaler) on older GPUs, fp32 on
    the CPU. An explicit bf16 on a GPU that only emulates it is refused before anything loads."""
    if setting == "auto":
        if torch.cuda.is_available():
            return "bf16" if native_bf16() else "fp16"
        return "fp32"
    if setting == "bf16" and torch.cuda.is_available() and not native_bf16():
        name, cap = torch.cuda.get_device_name(), torch.cuda.get_device_capability()
        raise ConfigError(f"train.precision=bf16: {name} (compute capability {cap[0]}.{cap[1]}) only emulates "
                          "bfloat16 (slow, and no flash attention); use train.precision=fp16 or auto")
    return setting


def data_workers(recipe: Recipe) -> int:
    """data.num_workers with -1 (auto) resolved: 4 on CUDA, 0 on the CPU."""
    n = recipe.data.num_workers
    if n >= 0:
        return n
    return min(4, max(1, (os.cpu_count() or 2) // 2)) if torch.cuda.is_available() else 0


#: train.logging_steps `auto` on CUDA: a logged step reads the loss and the gradient norm on the host
GPU_LOGGING_STEPS = 10


def logging_steps(recipe: Recipe) -> int:
    """train.logging_steps with 0 (auto) resolved: every step off CUDA (reading a CPU tensor costs
    nothing), every GPU_LOGGING_STEPS on CUDA."""
    n = recipe.train.logging_steps
    if n:
        return n
    return GPU_LOGGING_STEPS if torch.cuda.is_available() else 1


def device_settings(recipe: Recipe) -> dict:
    """SFTConfig's device settings: the CPU or the GPU (batches copied from pinned memory without
    blocking the host), and the process state set up for DeepSpeed / FSDP on the CPU."""
    if torch.cuda.is_available():
        return {"use_cpu": False, "dataloader_pin_memory": True, "accelerator_config": {"non_blocking": True}}
    return {"use_cpu": True, "dataloader_pin_memory": False} | cpu_sharded_state(distributed_mode(recipe))


def optimizer_name(recipe: Recipe) -> str:
    """train.optim with auto resolved: fused AdamW on CUDA (one kernel launch for all parameters)."""
    if recipe.train.optim != "auto":
        return recipe.train.optim
    return "adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch"


def torch_dtype(precision: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
            "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


# ---- data -----------------------------------------------------------------------------------
def demo_folder(recipe: Recipe) -> Path | None:
    """The folder the recipe's demo dataset (data.demo) is generated into, or None.

    The demo is written only to its own path (demo_data.DEMO_FOLDERS): data.train one local file,
    that folder's train.jsonl, and data.eval its eval.jsonl or none. A recipe that points
    data.train anywhere else (a user's recipe built on a demo one, a hub source) generates nothing.
    """
    if not recipe.data.demo:
        return None
    from finetune.demo_data import DEMO_FOLDERS

    folder = DEMO_FOLDERS[recipe.data.demo]
    sources = recipe.data.sources()
    if len(sources) != 1 or sources[0].hub or not sources[0].path:
        return None
    if Path(sources[0].path).resolve() != (folder / "train.jsonl").resolve():
        return None
    if recipe.data.eval and Path(recipe.data.eval).resolve() != (folder / "eval.jsonl").resolve():
        return None
    return folder


def prepare_data(recipe: Recipe) -> None:
    """Generate the synthetic demo dataset when the recipe asks for it, at its own path
    (demo_folder), and it is missing. The generator writes only into an empty folder or one it
    made (demo_data.generate_medical)."""
    out = demo_folder(recipe)
    if out is None:
        return
    from finetune.demo_data import generate_medical

    if not (out / "train.jsonl").exists() or not (out / "eval.jsonl").exists():
        print(f"generating the synthetic medical dataset in {out}/ ...", flush=True)
    generate_medical(out, seed=0)


def read_source(src, recipe: Recipe, on_error: str | None = None) -> tuple[list[Sample], list[DataError]]:
    """All samples of one source (a path or a recipe DataSource); `raise` stops at the first bad
    one, `skip` collects them."""
    if isinstance(src, str) and not src:
        return [], []
    from finetune.data.sources import load_source

    # JSONL (ours), or Parquet / save_to_disk / hub sources read with `datasets` (finetune.data.sources)
    return load_source(src, recipe, on_error=on_error)


def read_split(spec, recipe: Recipe, on_error: str | None = None) -> tuple[list[Sample], list[DataError]]:
    """All samples of a split: a path, a source or a list of sources (concatenated, in order)."""
    samples, errors = [], []
    for src in (spec if isinstance(spec, list) else [spec]):
        got, bad = read_source(src, recipe, on_error)
        samples += got
        errors += bad
    return samples, errors


def index_dataset(n: int):
    """The Trainer sees sample indices only (TRL wants a `datasets.Dataset`); the collator encodes.

    Encoding in the collator keeps media decoding in the DataLoader's workers and lets the
    Trainer's seeded sampler (and its resume logic) own the data order.
    """
    import datasets

    return datasets.Dataset.from_dict({"index": list(range(n))})


@dataclass
class PaddedCollator:
    """Right-padded batches with an attention mask (the model computes its positions)."""

    family: Family
    processor: Any
    samples: list
    rope: Any
    towers: Any = None  # Family.tower_inputs: the media towers' boundaries, computed here
    cache_bytes: int = 0  # encoded samples kept between epochs (packing.EncodedCache)
    encoded: Any = None  # an EncodedCache already filled (by the checks before step 1), else a new one
    idle: list = field(default_factory=list)  # packing.idle_media: every tower runs on every rank

    def __post_init__(self):
        from finetune.packing import EncodedCache

        if self.encoded is None:
            self.encoded = EncodedCache(self.family, self.processor, self.samples, self.rope, self.cache_bytes)

    def encode(self, features: list[dict]) -> list[EncodedSample]:
        return [self.encoded(f["index"]) for f in features]

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        from finetune.loss import LABEL_POSITIONS, label_positions
        from finetune.packing import REAL_TOKENS, with_idle_media

        encoded = self.encode(features)
        real = sum(e.num_tokens for e in encoded)
        encoded = encoded + with_idle_media(self.family, encoded, self.idle)  # rows of their own, labels ignored
        batch = self.family.collate_padded(encoded, self.processor.pad_id)
        if self.towers is not None:
            batch.update(self.towers(batch))
        batch[REAL_TOKENS] = real  # a host int for the token count
        batch[LABEL_POSITIONS] = label_positions(batch["labels"])  # the loss's head runs there only
        return batch


def prepare_split(samples: list[Sample], family: Family, loaded: LoadedModel, recipe: Recipe,
                  skipped: list[DataError], encodings=None) -> tuple[list[Sample], list[int]]:
    """Decode, count, encode and check every sample before the first step (data/prepare.py);
    the failures go to `skipped`. Returns the usable samples and their planned token counts;
    `encodings` (a packing.EncodedCache) keeps the encodings made, for the collator."""
    from finetune.data.prepare import prepare, record_path

    if not samples:
        return [], []
    t0, stats = time.time(), {}
    good, lengths, bad = prepare(samples, family, loaded.processor, family.read_config(loaded.base_path),
                                 family.rope_index(loaded.model), max_tokens=recipe.data.max_tokens,
                                 record=record_path(samples, cache_root()), stats=stats, encodings=encodings)
    skipped.extend(bad)
    print(f"data: {samples[0].source}: {len(good)} of {len(samples)} samples ready ({stats['checked']} decoded, encoded "
          f"and checked, {stats['remembered']} unchanged since a run checked them) in {time.time() - t0:.1f} s",
          flush=True)
    return good, lengths


def mix_sources(recipe: Recipe, sources: list, ready: list, run_dir: Path | None) -> tuple[list[Sample], list[int]]:
    """One source: its samples as they are. Several: one epoch's selection of each (finetune.mixture),
    printed and written to mixture.json."""
    if len(sources) == 1:
        return ready[0]
    from finetune import mixture

    picks, shares = mixture.select(sources, [ls for _, ls in ready], recipe.train.seed)
    samples = [got[i] for (got, _), idx in zip(ready, picks) for i in idx]
    lengths = [ls[i] for (_, ls), idx in zip(ready, picks) for i in idx]
    print(mixture.format_shares(shares), flush=True)
    if run_dir is not None:
        mixture.write_shares(run_dir, shares, recipe.train.seed)
    return samples, lengths


# ---- model ----------------------------------------------------------------------------------
def load_for_training(recipe: Recipe, family: Family, precision: str) -> LoadedModel:
    """Load the model in the training dtype (fp32 on the CPU) with the recipe's quantisation."""
    from finetune.console import tell_4bit_on_cpu

    attention.configure_cuda_kernels()
    dtype = torch_dtype(precision)
    attn = None if recipe.model.attn == "auto" else recipe.model.attn
    loaded = family.load(recipe, dtype=dtype, attn=attn or "sdpa")
    if recipe.model.quantize == "4bit":
        keep_4bit_layout_for_training(loaded.model)
        if not torch.cuda.is_available():
            tell_4bit_on_cpu()
    return loaded


def keep_4bit_layout_for_training(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On a CPU with AVX-512 BF16, a Linear4bit repacks its weight into an inference-only layout the
    first time it runs in eval mode without grad, and keeps that layout: a training forward after it
    fails at the bias add ("a view of a leaf Variable that requires grad is being used in an in-place
    operation", bitsandbytes 0.50) and that path has no backward. The checks before step 1 make such
    forwards, so a model loaded for training keeps the trainable layout."""
    for mod in model.modules():
        if type(mod).__name__ == "Linear4bit":
            mod.support_avx512bf16_for_cpu = False


# ---- several processes ----------------------------------------------------------------------
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
        for folder in (default_recipes_dir() / "deepspeed", Path(__file__).resolve().parent.parent / "recipes" / "deepspeed"):
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
        return {"deepspeed": str(deepspeed_config(recipe.train.deepspeed))}
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
    accelerator device (`use_cpu` selects plain MULTI_CPU DDP), although both run on gloo: the
    process state is set up here as accelerate's launcher would, and the Trainer is told to use it.
    Returns the extra SFTConfig settings (none on CUDA or for one process)."""
    if torch.cuda.is_available() or world_size() == 1 or mode not in ("deepspeed", "fsdp"):
        return {}
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

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
    return {"use_cpu": False, "accelerator_config": {"use_configured_state": True}}


def quiet_other_ranks() -> None:
    """Under torchrun, only rank 0 prints: the console shows one run, not one per process."""
    if world_size() > 1 and not is_main_process() and not os.environ.get("FINETUNE_ALL_RANKS_PRINT"):
        sys.stdout = open(os.devnull, "w")


@dataclass
class RecordingCollator:
    """Debug hook (FINETUNE_RECORD_BATCHES=<folder>): append each batch's dataset items (packed
    bins or sample indices) to <folder>/batches-rank<R>.jsonl, then collate as usual."""

    inner: Any
    path: Path

    def __call__(self, features: list[dict]) -> dict[str, Any]:
        with open(self.path, "a") as f:
            f.write(json.dumps([f_.get("bin", f_.get("index")) for f_ in features]) + "\n")
        return self.inner(features)

    def __getattr__(self, name):
        if name == "inner":  # not set yet (unpickling in a data-loader worker)
            raise AttributeError(name)
        return getattr(self.inner, name)


def record_batches(collator):
    folder = os.environ.get("FINETUNE_RECORD_BATCHES")
    if not folder:
        return collator
    Path(folder).mkdir(parents=True, exist_ok=True)
    from finetune.runlock import rank

    return RecordingCollator(collator, Path(folder) / f"batches-rank{rank()}.jsonl")


# ---- trainer --------------------------------------------------------------------------------
#: logits (tokens x vocabulary) up to this many elements are cheaper as one cross-entropy than in
#: TRL's chunked head off CUDA, whose torch tiles recompute the logits in backward (on CUDA its
#: Triton kernel is used at every size); bench/loss_memory.py measures both
PLAIN_LOSS_MAX_LOGITS = 1 << 24



def make_trainer(recipe: Recipe, family: Family, model, processor, train_ds, collator, precision: str,
                 run_dir: Path, callbacks: list, args=None):
    """TRL's SFTTrainer with per-role learning rates and our collator."""
    from trl import SFTTrainer

    from finetune.loss import LABEL_POSITIONS, add_label_head
    from finetune.packing import REAL_TOKENS

    text_config = model.config.get_text_config()
    vocab = text_config.vocab_size
    # mixture-of-experts LLMs: the load-balancing loss is logged every step, and joins the loss with
    # its coefficient when the experts or routers train (a frozen router gets no gradient from it)
    moe = bool(family.expert_params)
    llm = recipe.roles.llm
    aux_coef = 0.0
    if moe and (llm.experts != "frozen" or llm.router != "frozen"):
        aux_coef = recipe.train.router_aux_loss_coef
        if aux_coef is None:
            aux_coef = float(getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0)

    class RoleLRTrainer(SFTTrainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                groups = adapters.role_param_groups(self.model, family, recipe, recipe.train.weight_decay)
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
                kwargs.pop("lr", None)
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # transformers reads warmup_steps >= 1 as steps and below 1 as a ratio, so a ratio of 1
            # would mean one step: the ratio is turned into steps here, where the total is known
            self.args.warmup_steps = math.ceil(recipe.train.warmup_ratio * num_training_steps)
            return super().create_scheduler(num_training_steps, optimizer)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            real = inputs.pop(REAL_TOKENS, None)
            positions = inputs.pop(LABEL_POSITIONS, None)
            if recipe.train.token_metrics:  # TRL's path: entropy and token accuracy every step
                before = self._total_train_tokens
                out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
                self._total_train_tokens = before  # TRL counts position_ids.size(1): the collator's count replaces it
            else:
                out = self.token_mean_loss(model, inputs, return_outputs, num_items_in_batch, positions)
            if real is not None and self.model.training:
                # TRL counts position_ids.size(1) tokens for a mask-free batch (one [1, L] row);
                # packed rows are [R, L] or [4, R, L] (M-RoPE) with padding segments: count the
                # samples' tokens the collator counted (a host int). Other ranks' counts are added
                # when a step is logged (log), not here: a gather per micro-batch would make the
                # host wait for the device before it could launch the backward.
                self._tokens_unlogged = getattr(self, "_tokens_unlogged", 0) + int(real)
            return out

        def log(self, logs, *args, **kwargs):
            aux = self._metrics["train"].get("aux_loss")
            if aux:  # kept as device tensors between logs: one read per logged step, not per micro-batch
                self._metrics["train"]["aux_loss"] = [float(torch.stack(aux).mean())]
            mine = getattr(self, "_tokens_unlogged", 0)
            if mine and self.model.training:
                if self.accelerator.num_processes > 1:  # every rank logs the same steps: one collective here
                    mine = int(self.accelerator.reduce(torch.tensor(mine, device=self.accelerator.device), "sum"))
                self._tokens_unlogged = 0
                self._total_train_tokens += mine
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return super().log(logs, *args, **kwargs)

        def token_mean_loss(self, model, inputs, return_outputs, num_items_in_batch, positions=None):
            """The step's loss, as TRL defines it (the sum of the label tokens' negative
            log-likelihoods over the step's label tokens, all ranks), from the label-token head
            (finetune.loss: no tokens x vocabulary logits, no host read), without TRL's per-step
            metrics; for a MoE LLM plus the load-balancing loss times train.router_aux_loss_coef
            when experts or routers train."""
            inputs["use_cache"] = False
            if moe:
                inputs["output_router_logits"] = True
            labels = inputs["labels"]
            plain = (self.accelerator.device.type != "cuda" and not (self.args.fp16 or self.args.bf16)
                     and labels.numel() * vocab <= PLAIN_LOSS_MAX_LOGITS)
            if plain or positions is None:
                # small fp32 logits off a GPU: one cross-entropy over them beats the chunked head's
                # tiles (under 16-bit precision the chunked head also casts the fp32 lm_head copy)
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
                logits = outputs.logits
                total = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                          ignore_index=-100, reduction="sum")
                n = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
                aux = getattr(outputs, "aux_loss", None)
            else:
                outputs = model(**inputs, label_positions=positions)
                total = -outputs.log_probs.sum()
                n = positions.numel() if num_items_in_batch is None else num_items_in_batch
                aux = None
                if moe:
                    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

                    # packed rows carry no attention mask: every token counts, as in TRL's fused head
                    aux = load_balancing_loss_func(outputs.router_logits, text_config.num_experts,
                                                   text_config.num_experts_per_tok, inputs.get("attention_mask"))
            loss = total / torch.as_tensor(n, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # DDP averages gradients
            if moe:
                if self.model.training:
                    self._metrics["train"].setdefault("aux_loss", []).append(aux.detach().float())
                if aux_coef:  # one micro-batch's share of the step's mean load-balancing loss
                    loss = loss + aux_coef * aux / self.args.gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss

    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from finetune.console import console_callback

    args = args or training_args(recipe, precision, run_dir)
    if moe:  # TRL's own loss path (train.token_metrics) adds the load-balancing loss with this coefficient
        args.router_aux_loss_coef = aux_coef
    trainer = RoleLRTrainer(model=model, args=args, train_dataset=train_ds, data_collator=collator,
                            processing_class=processor.tokenizer, callbacks=callbacks)
    if moe:
        # TRL switches output_router_logits on in the config when the coefficient is not 0; transformers'
        # load-balancing loss then fails in cached generation (eval, the checks before step 1). Both loss
        # paths ask for the router logits per call instead.
        text_config.output_router_logits = False
    for cb in (PrinterCallback, ProgressCallback):  # one metrics dict per step: metrics.jsonl has them
        trainer.remove_callback(cb)
    # TRL casts a quantised model's trainable weights to bf16 (the QLoRA paper's recipe); ours stay
    # fp32 master weights (DESIGN: Precision), as in every other run: a bf16 lm_head copy also broke
    # the plain forward in fp32 runs (found by the check before step 1)
    adapters.fp32_trainable(trainer.model)
    if not recipe.train.token_metrics:
        # the LM head on the label tokens only, at the collator's host positions (finetune.loss);
        # TRL's own path (token_metrics) also computes entropy and top-1 hits every step
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        add_label_head(base)
    # the console shows the LLM's rate (roles.llm.lr, else train.lr), or the largest group's without LoRA on it
    trainer.add_callback(console_callback(recipe.train.print_every, main_lr=None if llm.mode == "frozen" else
                                          (llm.lr if llm.lr is not None else recipe.train.lr)))
    return trainer


def training_args(recipe: Recipe, precision: str, run_dir: Path):
    """The SFTConfig; building it sets up torch.distributed under torchrun."""
    from trl import SFTConfig

    t = recipe.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.scheduler,
        warmup_steps=0,  # from train.warmup_ratio once the number of steps is known (create_scheduler)
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        max_grad_norm=t.max_grad_norm,
        logging_steps=logging_steps(recipe),
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        optim=optimizer_name(recipe),
        gradient_checkpointing=False,  # enabled by adapters.apply_roles, before PEFT wraps the model
        report_to=["tensorboard"],
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=data_workers(recipe),
        # workers keep their encoded samples (and their cache) from one epoch to the next
        dataloader_persistent_workers=data_workers(recipe) > 0,
        disable_tqdm=True,  # our console (finetune/console.py) replaces the Trainer's printer
        **device_settings(recipe),
        max_length=None,
        save_only_model=False,
        # the step loss is the sum over label tokens of every rank's rows / all label tokens of the
        # global step: 2 ranks x 1 row equal 1 process x 2 rows
        average_tokens_across_devices=True,
        **distributed_args(recipe),
    )


def collator_cache_bytes(recipe: Recipe, shared: bool = False) -> int:
    """data.cache_gb in bytes: all of it for what the data-loader processes share (SharedRows, the
    encodings the main process keeps), else each process's share."""
    return int(recipe.data.cache_gb * 2 ** 30 / (1 if shared else max(1, data_workers(recipe))))


def rows_folder() -> Path:
    """A folder of this process for the packed rows its data-loader workers share (packing.SharedRows),
    under the toolkit's cache; those of processes no longer running on this machine are removed first
    (a run killed with -9 leaves its own)."""
    import socket

    root = cache_root() / "rows"
    host = socket.gethostname()
    for old in root.glob(f"{host}-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    folder = root / f"{host}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def make_collator(recipe: Recipe, family: Family, processor, samples: list[Sample], lengths: list[int], rope,
                  attn: str, towers=None, encodings=None, idle: list | None = None, rows: Path | None = None):
    """(the Trainer's dataset, the collator): packed bins or sample indices. The LLM's attention
    gets the packed rows' sample boundaries from the collator whenever the chosen backend (`auto`
    resolved) takes them, so no layer recomputes them (a device sync per layer on CUDA). With
    data-loader workers and `rows` (a folder), packed rows are collated once for all of them
    (packing.SharedRows), starting with those whose samples `encodings` holds already."""
    cache = collator_cache_bytes(recipe)
    if recipe.data.packing:
        from finetune.packing import PackedCollator, SharedRows, bin_dataset, efficiency, plan_bins

        bins = plan_bins(lengths, recipe.data.max_tokens)
        print(f"packing: {len(samples)} samples in {len(bins)} rows of <= {recipe.data.max_tokens} tokens "
              f"({100 * efficiency(lengths, bins, recipe.data.max_tokens):.1f}% of the budget used; rows carry "
              "no padding between samples)", flush=True)
        shared = SharedRows(rows, collator_cache_bytes(recipe, shared=True)) \
            if rows is not None and data_workers(recipe) > 0 else None
        if shared is None and data_workers(recipe) > 0:
            encodings = None  # each worker would grow its own copy of them: each keeps its own share instead
        collator = PackedCollator(family, processor, samples, rope, with_varlen_args=attn in attention.VARLEN_ARGS,
                                  towers=towers, cache_bytes=cache, encoded=encodings, idle=idle or [], shared=shared)
        if shared is not None:
            collator.prefill(bins)  # before the workers start: the encodings of the checks are not made again
        return bin_dataset(bins), collator
    return index_dataset(len(samples)), PaddedCollator(family, processor, samples, rope, towers, cache,
                                                       encodings if data_workers(recipe) == 0 else None, idle or [])


def make_preflight_callback(family: Family, processor, samples: list[Sample], rope, mode: str, precision: str):
    """Before the first step: run evaluation's generation and the export's probe forward on one
    sample per modality mix (probes.preflight), so a broken eval/export path stops the run now."""
    from transformers import TrainerCallback

    from finetune.probes import pick_probes, preflight

    class Preflight(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            if mode in ("fsdp", "deepspeed") or not is_main_process():
                return  # sharded weights: generation needs every rank; rank 0 stands for all
            t0 = time.time()
            device = next(model.parameters()).device
            # under 16-bit training the trained weights are fp32 beside a 16-bit base: autocast, as in a step
            amp = (functools.partial(torch.autocast, device.type, dtype=torch_dtype(precision))
                   if precision in ("bf16", "fp16") else contextlib.nullcontext)
            try:
                probes = preflight(model, family, processor, samples, rope, amp=amp)
            except Exception as e:
                mixes = ", ".join(f"{s.where} ({'+'.join(sorted(s.modalities()))})" for s in pick_probes(samples))
                raise RuntimeError(f"before training: evaluation's generation or the export's probe forward fails "
                                   f"on the probe samples ({mixes}): {type(e).__name__}: {e}. Nothing was trained; "
                                   "eval and export would fail the same way after training.") from e
            print(f"checked generation and export probes on {len(probes)} modality mix(es) in "
                  f"{time.time() - t0:.1f} s", flush=True)

    return Preflight()


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


def make_shard_report_callback():
    """Sharded runs: say how much of the weights this rank holds (ZeRO-3, FSDP2), measured on the
    prepared model, so a user sees the sharding they chose at work."""
    from transformers import TrainerCallback

    class ShardReport(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            local, total, q_local, q_total = local_weight_elements(model)
            quant = f"; 4-bit weights {q_local / max(q_total, 1):.0%} of theirs" if q_total else ""
            print(f"weights held by this rank: {local:,} of {total:,} stored elements "
                  f"({local / max(total, 1):.0%}){quant}", flush=True)

    return ShardReport()


def make_metrics_callback(run_dir: Path):
    """A callback appending every log record to run_dir/metrics.jsonl."""
    from transformers import TrainerCallback

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
    from transformers import TrainerCallback

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            n = int(os.environ.get("FINETUNE_CRASH_AFTER_STEP", "0") or 0)
            if n and state.global_step >= n:
                raise KeyboardInterrupt(f"FINETUNE_CRASH_AFTER_STEP={n}: simulated interruption")
            k = int(os.environ.get("FINETUNE_KILL_AFTER_STEP", "0") or 0)
            if k and state.global_step >= k:  # kill -9: no handler, no cleanup runs
                import signal

                os.kill(os.getpid(), signal.SIGKILL)

    return CrashAfter()


def make_checkpoint_modes_callback():
    """Checkpoint files get the modes of the user's umask (safetensors writes its files 0600)."""
    from transformers import TrainerCallback

    class CheckpointModes(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    fsutil.follow_umask(folder)

    return CheckpointModes()


def truncate_metrics(run_dir: Path, step: int) -> None:
    """On resume, forget records logged after the checkpoint so the curve has no duplicates."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    fsutil.atomic_write_text(path, "".join(ln + "\n" for ln in keep))


def _complete(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is complete when it parses.

    A run killed (or out of disk) while saving leaves a folder without it, or with it cut
    short; that folder is skipped and the previous checkpoint is used.
    """
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The Trainer's checkpoint-<step> folders of the run (no other name is one of ours)."""
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return [p for p in ck.iterdir() if re.fullmatch(r"checkpoint-\d+", p.name) and p.is_dir() and not p.is_symlink()]


def last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint-N folder, or None."""
    done = [p for p in step_checkpoints(run_dir) if _complete(p)]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))


def plot_loss(run_dir: Path) -> Path | None:
    """loss_curve.png from metrics.jsonl (training loss per step)."""
    mpath = run_dir / "metrics.jsonl"
    if not mpath.exists():
        return None
    steps, losses = [], []
    for line in mpath.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (per label token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run_dir / "loss_curve.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    fsutil.atomic_write_bytes(out, buf.getvalue())
    return out


# ---- the run --------------------------------------------------------------------------------
def train(recipe: Recipe) -> Path:
    """Train the recipe; returns the run folder (adapter in run_dir/adapter). A staged recipe
    trains its stages in order (finetune/stages.py), the last one in the run folder."""
    if recipe.stages:
        from finetune.stages import run_stages

        if world_size() > 1:
            raise ConfigError("staged recipes run in one process for now (each stage's merged export is made by "
                              "one process and read by the next stage); run it without torchrun / GPUS=1")
        return run_stages(recipe, train)
    quiet_libraries()
    quiet_other_ranks()
    check_distributed(recipe)
    run_dir = recipe.run_dir
    main = is_main_process()
    # before anything is written: output.dir is new, empty or a run folder of ours, and two runs
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
    # the main process of each node first writes the shared caches (demo data, tiny model,
    # token counts); the other ranks then read them
    with args.main_process_first(local=True, desc="data and model"):
        prepare_data(recipe)
        family = family_for(recipe.model.path, recipe.model.family, recipe.model.revision)
        # every problem of the data is found before the first step: with `raise` the run then stops
        # naming the first bad sample of the file, with `skip` it drops and reports them all
        sources = recipe.data.sources()
        per_source = [read_source(src, recipe, on_error="skip") for src in sources]
        skipped = [e for _, errs in per_source for e in errs]
        # the eval split too: evaluation after training must not meet a sample it cannot read
        eval_samples, eval_skipped = read_split(recipe.data.eval, recipe, on_error="skip")
        family.resolve_path(recipe.model.path, recipe.model.tiny_seed, recipe.model.revision)  # a tiny model is built once
    if main:
        hub.write_resolved(run_dir)  # the commits of the hub ids above, before anything is trained
    # every rank loads at once: under ZeRO-3 each weight is partitioned as it is created, a
    # collective (rank 0 loading alone while the others wait at the barrier deadlocks)
    loaded = load_for_training(recipe, family, precision)
    with args.main_process_first(local=True, desc="sample checks"):
        processor = loaded.processor
        # the encodings made by the checks are kept for the collator (data.cache_gb): the first
        # epoch does not make them again (with workers: collated into rows they all read)
        from finetune.packing import EncodedCache

        # (a mixture repeats and subsamples its sources: its encodings are kept by the collator,
        # from the first epoch on)
        encodings = EncodedCache(family, processor, [], family.rope_index(loaded.model),
                                 collator_cache_bytes(recipe, shared=True)) if len(sources) == 1 else None
        ready = [prepare_split(got, family, loaded, recipe, skipped, encodings) for got, _ in per_source]
        eval_samples, _ = prepare_split(eval_samples, family, loaded, recipe, eval_skipped)
    if recipe.data.on_error == "raise" and (skipped or eval_skipped):
        raise min(skipped or eval_skipped, key=lambda e: (str(e.file), e.line or 0))
    for src, (got, _) in zip(sources, ready):
        if not got:
            raise ConfigError(f"{src.label}: no usable training samples")
    samples, lengths = mix_sources(recipe, sources, ready, run_dir if main else None)

    attn = attention.choose(recipe.model.attn, recipe.data.packing)
    attention.apply_to_llm(loaded.model, attn)
    attention.apply_to_encoders(loaded.model, family)
    # LoRA's random init comes from the seed alone, not from how much randomness loading drew
    # (ZeRO-3's partitioned construction of Baichuan's model drew differently: other lora_A)
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
        from finetune.console import system_prompt_lines

        print("\n".join(system_prompt_lines(recipe, processor.settings().get("system_prompt"), samples)), flush=True)

    rope = family.rope_index(loaded.model)
    if encodings is not None:
        encodings.samples = samples  # the usable ones, which the kept encodings are indexed by
    engine = world_size() > 1 and mode in ("fsdp", "deepspeed")  # DeepSpeed or FSDP over several ranks
    idle = None
    if engine:
        from finetune.packing import idle_media

        # sharded weights: a tower's forward is a collective, so every rank runs every tower every step
        idle = idle_media(family, processor, samples, lengths, rope)
    rows = rows_folder() if recipe.data.packing and data_workers(recipe) > 0 else None
    train_ds, collator = make_collator(recipe, family, processor, samples, lengths, rope, attn,
                                       family.tower_inputs(loaded.model), encodings, idle, rows)
    callbacks = [make_metrics_callback(run_dir), make_crash_callback(),
                 *([make_shard_report_callback()] if engine else []),
                 make_preflight_callback(family, processor, eval_samples or samples, rope, mode, precision)]
    callbacks.append(make_checkpoint_modes_callback())
    trainer = make_trainer(recipe, family, model, processor, train_ds, record_batches(collator), precision, run_dir,
                           callbacks, args=args)

    resume = None
    if recipe.train.resume == "auto":
        resume = last_checkpoint(run_dir)
    elif recipe.train.resume != "never":
        resume = recipe.train.resume
    if main:
        for stale in step_checkpoints(run_dir):
            if not _complete(stale):  # cut short by a kill or a full disk while saving
                print(f"removing incomplete checkpoint {stale}", flush=True)
                shutil.rmtree(stale, ignore_errors=True)
        if resume:
            truncate_metrics(run_dir, int(Path(resume).name.split("-")[-1]))
        elif (run_dir / "metrics.jsonl").exists():
            (run_dir / "metrics.jsonl").unlink()
    if resume:
        print(f"resuming from {resume}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=resume)
    finally:
        if rows is not None:
            shutil.rmtree(rows, ignore_errors=True)

    if mode in ("fsdp", "deepspeed"):
        save_sharded_adapter(trainer, family, loaded, run_dir / "adapter")
    elif main:
        save_adapter(model, family, loaded, run_dir / "adapter")
    if main:
        write_skipped(run_dir, skipped)
        plot_loss(run_dir)
    end_distributed()
    return run_dir


def end_distributed() -> None:
    """After training, every rank leaves the process group together. Rank 0 then evaluates and
    exports alone; the others exit. Left to interpreter shutdown, gloo's process group was torn
    down while its threads still ran, and a rank could abort ("terminate called without an
    active exception", seen once in CI) after a run that had finished."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    # evaluation and export load the model again in this process: not as ZeRO-3 partitions
    # (transformers keeps the training's DeepSpeed config in a global) and not under accelerate's
    # engine switches set for training (cpu_sharded_state)
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    for k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        os.environ.pop(k, None)


#: test hook: FINETUNE_ADAPTER_KILL=adapter_written | swapping kills the process (SIGKILL) with the new
#: adapter written beside the old one, or between moving the old one aside and the new one in
ADAPTER_KILL = "FINETUNE_ADAPTER_KILL"


def save_adapter(model, family: Family, loaded: LoadedModel, out: Path) -> None:
    """PEFT adapter folder plus the processor files, swapped in whole (fsutil.staged_dir): the
    old adapter stays until the new one is complete, and a kill at any point leaves one of them
    (lock_run recovers a cut swap)."""
    with fsutil.staged_dir(out, legacy=legacy_adapter, kill_env=ADAPTER_KILL) as tmp:
        model.save_pretrained(str(tmp))
        family.copy_processor_files(loaded.base_path, tmp)
        fsutil.atomic_write_text(tmp / "base_model.json", json.dumps({"base_path": str(loaded.base_path)}, indent=2))
        fsutil.kill_point(ADAPTER_KILL, "adapter_written")


def save_sharded_adapter(trainer, family: Family, loaded: LoadedModel, out: Path) -> None:
    """FSDP / DeepSpeed: every rank takes part in gathering the weights (Trainer.save_model) into
    a folder of a name they all know, then rank 0 adds the processor files and swaps it in as
    save_adapter does."""
    tmp = out.parent / (out.name + ".tmp-gather")
    if is_main_process():
        fsutil.recover_dir(out, legacy_adapter)  # a gather folder of ours left by a killed run goes
        fsutil.check_replaceable(out, legacy_adapter)
        fsutil.new_staging_dir(out, name=tmp.name)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if not is_main_process():
        return
    for extra in ("training_args.bin",):
        (tmp / extra).unlink(missing_ok=True)
    family.copy_processor_files(loaded.base_path, tmp)
    fsutil.atomic_write_text(tmp / "base_model.json", json.dumps({"base_path": str(loaded.base_path)}, indent=2))
    fsutil.kill_point(ADAPTER_KILL, "adapter_written")
    fsutil.commit_dir(tmp, out, legacy=legacy_adapter, kill_env=ADAPTER_KILL)


def write_skipped(run_dir: Path, skipped: list[DataError]) -> None:
    """skipped.jsonl: one record per skipped sample, and a console summary."""
    path = run_dir / "skipped.jsonl"
    if not skipped:
        if path.exists():
            path.unlink()
        return
    fsutil.atomic_write_text(path, "".join(
        json.dumps({"file": e.file, "line": e.line, "kind": e.kind, "error": str(e)}) + "\n" for e in skipped))
    print(f"skipped {len(skipped)} bad sample(s) (data.on_error: skip); list in {path}")
