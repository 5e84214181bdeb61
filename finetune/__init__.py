"""omni-finetune: LoRA/QLoRA fine-tuning of omni-modal models on packed omni-modal chat data."""

__version__ = "0.1.0"

from finetune.console import hold_library_notices as _hold  # noqa: E402  (before bitsandbytes is imported)

_hold()
