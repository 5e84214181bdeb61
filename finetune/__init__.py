"""omni-finetune: LoRA/QLoRA fine-tuning of omni-modal models on packed omni-modal chat data."""

__version__ = "0.1.0"
