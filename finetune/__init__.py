"""omni-finetune: LoRA/QLoRA fine-tuning of omni-modal models on packed omni-modal chat data.

Layers (imports point down; tests/test_layers.py reads every import, function-local ones too,
and fails on a cycle or an upward import):

    7  cli __main__
    6  train evaluate export verify plan chat serve
    5  engines distributed console runfolder callbacks rollout trainer stages inference
    4  recipe models data.hf data.sources data.convert data.samples data.prepare data.check
       data.reading packing collate adapters mixture metrics report probes
    3  families
    2  data data.bounds data.schema data.medical data.media demo_data kernels attention loss dpo grpo
    1  errors paths runtime fsutil hub checkpoint deepspeed_presets

    7  the commands; a staged recipe's stages run in order by the CLI
    6  entry points: a script each; none imports another's helpers
    5  the Trainer subclass and its loss, several processes and their engines, the run folder
       (marker, lock, checkpoints, adapter, metrics), callbacks, the console, stages, GRPO's
       rollouts (sampled answers and their rewards), a model
       to talk to (inference: chat and serve answer with it)
    4  typed recipes and a recipe's model (models), reading and checking data, packing and
       collating, roles -> LoRA/full, scores and pages, the probe passes
    3  the Family contract (families/base.py), one file per family, tiny builders apart;
       nothing above it is imported there
    2  what reading a file may cost (bounds), samples, media readers, the synthetic demo data,
       attention kernels, the label-token loss, the DPO loss on packed pairs, the GRPO loss on
       packed completions
    1  errors, where files are, the process (ranks, precision, dtypes), the one atomic writer
       and lock, hub ids, safetensors files

A module imports from lower layers, or from its own layer without a cycle; imports inside
functions are for optional or heavy dependencies only (the CLI's commands, the families' model
classes), never to dodge a cycle.
"""

__version__ = "0.1.0"

from finetune.runtime import hold_library_notices as _hold  # noqa: E402  (before bitsandbytes is imported)

_hold()
