"""DeepSpeed and FSDP2 settings that keep the precision contract (DESIGN: Precision).

Under 16-bit training the frozen base stays 16-bit, every trained weight (LoRA and the `full`
roles) is an fp32 master, and autocast runs the matmuls: one process gets that from the model as
loaded (adapters.fp32_trainable) and accelerate's autocast. Left to their own mixed precision,
the engines undo it (DeepSpeed 0.19.8, accelerate 1.15, torch 2.13):

- DeepSpeed's `bf16` / `fp16` modes cast every parameter of a ZeRO-1/2 model to 16-bit, the fp32
  copies of the trained weights included (the masters then live in the optimizer only, and trained
  norms and embeddings compute in 16-bit), and nothing autocasts; under ZeRO-3 the trained weights
  stay fp32 but the LoRA and `full` layers then compute in fp32.
- accelerate's FSDP2 path applies no autocast (prepare_model's wrapper is skipped) and casts every
  weight to 16-bit for compute and every gradient for the reduction (MixedPrecisionPolicy).

So every engine runs the forward one process runs, and sums gradients in fp32 as one process does:

- DeepSpeed runs its `torch_autocast` mode (the engine wraps its forward in torch.autocast) with
  no module on the lower-precision communication list, so that each weight is gathered (ZeRO-3) and
  its gradient reduced in its own dtype: the frozen base in 16-bit, the trained weights in fp32.
  `bf16.enabled` is on for ZeRO-3 only: it is the dtype zero.Init partitions the loaded weights in,
  and the engine casts no parameter of a model built under zero.Init (under ZeRO-1/2 it would cast
  them all). `fp16.enabled` stays off (DeepSpeed's fp16 mode scales the loss itself, beside the
  GradScaler of its autocast), so ZeRO-3 in fp16 keeps its base partitions in fp32.
- FSDP2 gathers each weight in its own dtype (a group of mixed dtypes is all-gathered as bytes)
  and reduces gradients in fp32; the model's forward is wrapped in autocast as accelerate wraps it
  under every other strategy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from types import MethodType

import torch

from finetune.errors import ConfigError

#: the DeepSpeed config sections the toolkit writes from train.precision
PRECISION_SECTIONS = ("bf16", "fp16", "torch_autocast")
AUTOCAST_DTYPE = {"bf16": "bfloat16", "fp16": "float16"}


def check_deepspeed_config(path: Path) -> None:
    """Refuse a DeepSpeed config that sets the engine's precision itself (the toolkit writes it from
    train.precision, keep_precision): a `bf16` or `fp16` mode would cast the trained weights of a
    ZeRO-1/2 model to 16-bit. `"enabled": "auto"` is accepted (the usual Hugging Face configs)."""
    text = path.read_text()
    try:
        config = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"train.deepspeed {path}: not valid JSON ({e}); fix the file") from e
    for key in PRECISION_SECTIONS:
        section = config.get(key)
        auto = isinstance(section, dict) and section.get("enabled", "auto") == "auto" and key != "torch_autocast"
        if section is None or auto:
            continue
        line = next((i for i, ln in enumerate(text.splitlines(), 1) if f'"{key}"' in ln), 1)
        raise ConfigError(
            f"{path}:{line}: the \"{key}\" section sets DeepSpeed's precision, which the toolkit sets from "
            "train.precision (16-bit frozen base, fp32 trained weights, autocast for the matmuls); remove the "
            "section")


def keep_precision(args, precision: str) -> None:
    """Set the engine's precision in the SFTConfig `args` from train.precision (see the module
    docstring). Called once the SFTConfig is built: transformers requires a DeepSpeed config's
    `bf16.enabled` to equal the Trainer's bf16 flag, which stays on (the run is 16-bit) where
    DeepSpeed's own bf16 mode must be off."""
    half = precision in AUTOCAST_DTYPE
    hf = getattr(args, "hf_deepspeed_config", None)
    if hf is not None:
        # transformers and accelerate hold this one dict: zero.Init reads it when the model is loaded,
        # the engine when the Trainer prepares it
        config = hf.config
        stage = int(config.get("zero_optimization", {}).get("stage", 0) or 0)
        for key in ("bf16", "fp16"):
            section = config.get(key) if isinstance(config.get(key), dict) else {}
            section["enabled"] = precision == "bf16" and key == "bf16" and stage == 3
            config[key] = section
        config["torch_autocast"] = ({"enabled": True, "dtype": AUTOCAST_DTYPE[precision],
                                     "lower_precision_safe_modules": []} if half else {"enabled": False})
        if half:
            # transformers casts the model's float inputs (pixels, audio features) to the dtype it read
            # from `bf16.enabled`; under autocast the model takes them as one process does
            hf._dtype = torch.float32
    if getattr(args, "fsdp_plugin_args", None) is not None and half:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # accelerate keeps a policy it is given (its own casts every weight and gradient to 16-bit)
        args.fsdp_plugin_args["mixed_precision_policy"] = MixedPrecisionPolicy(
            param_dtype=None, reduce_dtype=torch.float32, output_dtype=None, cast_forward_inputs=False)


def fsdp_forward(trainer) -> None:
    """Under FSDP2, give the Trainer's model the forward one process has:

    - autocast around it, wrapped as accelerate's prepare_model wraps it under every other strategy
      (its FSDP2 path skips that step), outputs in fp32;
    - the LM head gathered by FSDP before TRL's fused loss head reads its weight. accelerate shards
      the output embeddings as a unit of their own, whose forward the fused head never calls: it
      finds the weight still sharded and gathers it itself (DTensor.full_tensor), whose backward
      hands each rank its own rows' gradient of its shard, never summed across ranks. Gathered
      through FSDP, the gradient is reduce-scattered with every other (at the end of the backward,
      for a unit whose forward did not run)."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return
    from accelerate.utils import convert_outputs_to_fp32
    from accelerate.utils.modeling import get_mixed_precision_context_manager
    from torch.distributed.fsdp import FSDPModule

    model = trainer.model
    acc = trainer.accelerator
    if acc.native_amp and "_original_forward" not in model.__dict__:
        # as accelerate wraps it (and as its unwrap_model(keep_fp32_wrapper=False) undoes it)
        model._original_forward = model.forward
        autocast = get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)
        model.forward = MethodType(autocast(model.forward.__func__), model)
        model.forward = MethodType(convert_outputs_to_fp32(model.forward.__func__), model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fused = base.forward

    @functools.wraps(fused)
    def forward(*args, **kwargs):
        if kwargs.get("fused_lm_head") or kwargs.get("label_positions") is not None:  # TRL's head, or ours
            head = base.get_output_embeddings()
            if isinstance(head, FSDPModule):
                head.unshard()
        return fused(*args, **kwargs)

    base.forward = forward
