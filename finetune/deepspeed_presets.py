"""DeepSpeed settings as a recipe gives them (train.deepspeed): a preset's name or a JSON config.

The presets are files in recipes/deepspeed/<name>.json. These helpers read only the ZeRO section
(stage, offloads), with no DeepSpeed import, so that the recipe's checks, the planner and the
distributed setup can ask which stage a setting means on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

#: train.deepspeed presets (recipes/deepspeed/<name>.json)
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero2-offload", "zero3-offload")


def deepspeed_zero(setting: str) -> dict:
    """The zero_optimization section of a train.deepspeed JSON path ({} for a preset name, or
    when the file cannot be read here; the run's own check reports that)."""
    setting = setting.strip()
    if setting in DEEPSPEED_PRESETS:
        return {}
    try:
        zero = json.loads(Path(setting).read_text()).get("zero_optimization", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return zero if isinstance(zero, dict) else {}


def deepspeed_stage(setting: str) -> int:
    """The ZeRO stage of train.deepspeed: a preset's name, or a JSON config's zero_optimization.stage."""
    setting = setting.strip()
    if setting in DEEPSPEED_PRESETS:
        return int(setting[4])
    return int(deepspeed_zero(setting).get("stage", 0) or 0)
