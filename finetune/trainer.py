"""The Trainer (layer 5): TRL's SFTTrainer with a learning rate per role, the token-mean loss on
the label tokens only (finetune.loss), a mixture-of-experts LLM's load-balancing loss through its
family, token counts from the collator, and the settings a device calls for. With
`train.method: dpo` the loss is DPO's on packed preference pairs (preference_loss), the reference
being the same model with its LoRA adapters disabled.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import SFTConfig, SFTTrainer

from finetune import adapters, attention, engines
from finetune.collate import PLANS, PROMPTS
from finetune.console import console_callback
from finetune.distributed import cpu_sharded_state, distributed_args, distributed_mode
from finetune.dpo import NUM_PAIRS, PAIR_SEGMENTS, PairScores, pair_scores, segment_sums
from finetune.families.base import Family, LoadedModel
from finetune.grpo import (
    COMPLETION_SEGMENTS,
    NUM_COMPLETIONS,
    CompletionScores,
    completion_scores,
)
from finetune.loss import LABEL_POSITIONS, add_label_head, shifted_cross_entropy
from finetune.models import load_spec
from finetune.packing import REAL_TOKENS
from finetune.recipe import Recipe
from finetune.rollout import completion_seeds, roll_out
from finetune.runtime import data_workers, tell_4bit_on_cpu, torch_dtype

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


# ---- model ----------------------------------------------------------------------------------
def load_for_training(recipe: Recipe, family: Family, precision: str) -> LoadedModel:
    """Load the model in the training dtype (fp32 on the CPU) with the recipe's quantisation."""
    attention.configure_cuda_kernels()
    dtype = torch_dtype(precision)
    attn = None if recipe.model.attn == "auto" else recipe.model.attn
    loaded = family.load(load_spec(recipe, dtype=dtype, attn=attn or "sdpa"))
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


# ---- trainer --------------------------------------------------------------------------------
def preference_loss(model, inputs: dict, beta: float, loss_type: str) -> tuple[torch.Tensor, PairScores]:
    """(the sum of the pair losses, the pair scores) of a packed preference batch
    (packing.PairPackedCollator). The policy and the reference run the same packed rows through the
    label-token head; the reference is the policy with its LoRA adapters disabled (PEFT's
    disable_adapter: no second copy of the base), without gradients."""
    positions, segments, n = inputs[LABEL_POSITIONS], inputs[PAIR_SEGMENTS], 2 * int(inputs[NUM_PAIRS])
    forward = {k: v for k, v in inputs.items() if k not in (REAL_TOKENS, NUM_PAIRS, PAIR_SEGMENTS, LABEL_POSITIONS)}
    forward["use_cache"] = False
    logps = segment_sums(model(**forward, label_positions=positions).log_probs, segments, n)
    with torch.no_grad(), unwrap_peft(model).disable_adapter():
        ref = segment_sums(model(**forward, label_positions=positions).log_probs, segments, n)
    counts = torch.bincount(segments, minlength=n)
    scores = pair_scores(logps, ref, counts, beta, loss_type)
    return scores.losses.sum(), scores


def unwrap_peft(model):
    """The PEFT model under DDP's or DeepSpeed's wrapper (what has disable_adapter)."""
    while not hasattr(model, "disable_adapter") and hasattr(model, "module"):
        model = model.module
    return model


def completion_loss(model, inputs: dict, rewards: torch.Tensor, group: int, *, beta: float,
                    epsilon: float) -> tuple[torch.Tensor, CompletionScores]:
    """(the sum of the completions' GRPO losses, their scores) of a packed batch of completions
    (packing.pack_completions) with their rewards (grouped: a prompt's G completions consecutive).
    The policy runs the packed rows through the label-token head; the sampling policy is the policy
    itself (one step per rollout); the reference is the policy with its LoRA adapters disabled,
    without gradients (skipped when beta is 0: the KL is then logged as 0)."""
    positions, segments = inputs[LABEL_POSITIONS], inputs[COMPLETION_SEGMENTS]
    forward = {k: v for k, v in inputs.items()
               if k not in (REAL_TOKENS, NUM_COMPLETIONS, COMPLETION_SEGMENTS, LABEL_POSITIONS)}
    forward["use_cache"] = False
    logps = model(**forward, label_positions=positions).log_probs
    if beta:
        with torch.no_grad(), unwrap_peft(model).disable_adapter():
            ref = model(**forward, label_positions=positions).log_probs
    else:
        ref = logps.detach()
    scores = completion_scores(logps, logps.detach(), ref, segments, rewards, group, beta=beta, epsilon=epsilon)
    return scores.losses.sum(), scores


#: logits (tokens x vocabulary) up to this many elements are cheaper as one cross-entropy than in
#: TRL's chunked head off CUDA, whose torch tiles recompute the logits in backward (on CUDA its
#: Triton kernel is used at every size); bench/loss_memory.py measures both
PLAIN_LOSS_MAX_LOGITS = 1 << 24


def make_trainer(recipe: Recipe, family: Family, model, processor, train_ds, collator, precision: str,
                 run_dir: Path, callbacks: list, args=None):
    """TRL's SFTTrainer with per-role learning rates and our collator."""
    text_config = model.config.get_text_config()
    vocab = text_config.vocab_size
    # mixture-of-experts LLMs: the load-balancing loss is logged every step, and joins the loss with
    # its coefficient when the experts or routers train (a frozen router gets no gradient from it)
    moe = family.is_moe
    llm = recipe.roles.llm
    aux_coef = 0.0
    if moe and (llm.experts != "frozen" or llm.router != "frozen"):
        aux_coef = recipe.train.router_aux_loss_coef
        if aux_coef is None:
            aux_coef = family.aux_loss_coef(model)

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

        def _get_num_items_in_batch(self, batch_samples, device):
            key = next((k for k in (NUM_PAIRS, NUM_COMPLETIONS) if batch_samples and k in batch_samples[0]), None)
            if key is None:
                return super()._get_num_items_in_batch(batch_samples, device)
            # DPO, GRPO: the step's loss is the mean over the step's pairs or completions (all
            # micro-batches, all ranks)
            n = torch.tensor(sum(int(b[key]) for b in batch_samples), device=device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n).sum()
            return n

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if PAIR_SEGMENTS in inputs:
                return self.dpo_loss(model, inputs, return_outputs, num_items_in_batch)
            if PROMPTS in inputs:
                return self.grpo_loss(model, inputs, return_outputs, num_items_in_batch)
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

        def dpo_loss(self, model, inputs, return_outputs, num_items_in_batch):
            """The mean DPO loss over the step's pairs (preference_loss); the rewards, margins and
            accuracy summed as device tensors until the step is logged."""
            real, pairs = int(inputs[REAL_TOKENS]), int(inputs[NUM_PAIRS])
            total, scores = preference_loss(model, inputs, recipe.train.dpo_beta, recipe.train.dpo_loss)
            n = pairs if num_items_in_batch is None else num_items_in_batch
            loss = self.step_mean(total, n, num_items_in_batch)
            if self.model.training:
                self.keep_sums(scores.metrics(), pairs, real)
            return (loss, scores) if return_outputs else loss

        def step_mean(self, total, n, num_items_in_batch):
            """A micro-batch's summed loss as its share of the step's mean: divided by the step's
            count of tokens, pairs or completions (all micro-batches, all ranks; `n`, this batch's
            own, without one) and multiplied back by the ranks, whose gradients DDP averages."""
            loss = total / torch.as_tensor(n, device=total.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            return loss

        def keep_sums(self, sums: dict, count: int, real: int) -> None:
            """Add a micro-batch's summed figures (device tensors) and its pair or completion count
            until the step is logged, where they become means (log)."""
            kept = getattr(self, "_pref_sums", None) or {}
            for key, value in sums.items():
                kept[key] = kept.get(key, 0) + value
            self._pref_sums, self._pref_pairs = kept, getattr(self, "_pref_pairs", 0) + count
            self._tokens_unlogged = getattr(self, "_tokens_unlogged", 0) + real

        def grpo_loss(self, model, inputs, return_outputs, num_items_in_batch):
            """GRPO: sample train.grpo_group answers to each prompt with the model itself, reward
            them, pack them as isolated samples and return the mean loss over the step's
            completions (completion_loss); reward, KL, clipping and answer length kept as sums until
            the step is logged."""
            t, col = recipe.train, self.data_collator
            prompts, plans = inputs[PROMPTS], inputs[PLANS]
            out = roll_out(self.accelerator.unwrap_model(model), family, processor, prompts, plans, col.rope,
                           group=t.grpo_group, temperature=t.grpo_temperature, max_new_tokens=t.grpo_max_new_tokens,
                           format_reward=t.grpo_format_reward, amp=self.autocast_smart_context_manager,
                           seeds=completion_seeds(prompts, t.grpo_group, t.seed, self.state.global_step),
                           idle=col.idle_prompts_for(prompts))
            batch = self._prepare_inputs(col.pack(out.samples))
            real = int(batch[REAL_TOKENS])
            total, scores = completion_loss(model, batch, out.rewards, t.grpo_group, beta=t.grpo_beta,
                                            epsilon=t.grpo_epsilon)
            n = len(out.samples) if num_items_in_batch is None else num_items_in_batch
            loss = self.step_mean(total, n, num_items_in_batch)
            if self.model.training:
                self.keep_sums(scores.metrics(t.grpo_group), len(out.samples), real)
            return (loss, scores) if return_outputs else loss

        def log(self, logs, *args, **kwargs):
            sums = getattr(self, "_pref_sums", None)
            if sums and self.model.training:  # one read per logged step, not per micro-batch
                values = torch.stack([sums[k] for k in sums] + [torch.tensor(float(self._pref_pairs),
                                                                             device=next(iter(sums.values())).device)])
                if self.accelerator.num_processes > 1:
                    values = self.accelerator.reduce(values, "sum")
                for key, value in zip(sums, values[:-1].tolist()):
                    self._metrics["train"][key] = [value / max(values[-1].item(), 1)]
                self._pref_sums, self._pref_pairs = {}, 0
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
                total = shifted_cross_entropy(logits, labels)
                n = (labels[:, 1:] != -100).sum() if num_items_in_batch is None else num_items_in_batch
            else:
                outputs = model(**inputs, label_positions=positions)
                total = -outputs.log_probs.sum()
                n = positions.numel() if num_items_in_batch is None else num_items_in_batch
            loss = self.step_mean(total, n, num_items_in_batch)
            if moe:
                aux = family.aux_loss(outputs, inputs, text_config)
                if self.model.training:
                    self._metrics["train"].setdefault("aux_loss", []).append(aux.detach().float())
                if aux_coef:  # one micro-batch's share of the step's mean load-balancing loss
                    loss = loss + aux_coef * aux / self.args.gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss

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
    if not recipe.train.token_metrics or recipe.train.method in ("dpo", "grpo"):
        # the LM head on the label tokens only, at the collator's host positions (finetune.loss);
        # TRL's own path (token_metrics) also computes entropy and top-1 hits every step
        base = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        add_label_head(base, family.label_head_parts)
    # the console shows the LLM's rate (roles.llm.lr, else train.lr), or the largest group's without LoRA on it
    trainer.add_callback(console_callback(recipe.train.print_every, main_lr=None if llm.mode == "frozen" else
                                          (llm.lr if llm.lr is not None else recipe.train.lr)))
    engines.fsdp_forward(trainer)  # FSDP2: autocast, and the LM head gathered for the loss head
    return trainer


def training_args(recipe: Recipe, precision: str, run_dir: Path):
    """The SFTConfig; building it sets up torch.distributed under torchrun."""
    t = recipe.train
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "tensorboard")
    args = SFTConfig(
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
        dataloader_num_workers=data_workers(recipe.data.num_workers),
        # workers keep their encoded samples (and their cache) from one epoch to the next
        dataloader_persistent_workers=data_workers(recipe.data.num_workers) > 0,
        disable_tqdm=True,  # our console (finetune/console.py) replaces the Trainer's printer
        **device_settings(recipe),
        max_length=None,
        save_only_model=False,
        # the step loss is the sum over label tokens of every rank's rows / all label tokens of the
        # global step: 2 ranks x 1 row equal 1 process x 2 rows
        average_tokens_across_devices=True,
        **distributed_args(recipe),
    )
    engines.keep_precision(args, precision)  # 16-bit base, fp32 trained weights under DeepSpeed and FSDP2
    return args


