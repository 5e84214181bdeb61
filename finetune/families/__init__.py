"""Model families. `family_for(path)` picks one from `tiny:<name>` or the (local or hub) folder's config.json."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ConfigError, MissingFileError
from finetune.families.base import Family


def _registry() -> dict[str, type[Family]]:
    from finetune.families.baichuan_omni import BaichuanOmniFamily
    from finetune.families.gemma3n import Gemma3nFamily
    from finetune.families.gemma4 import Gemma4Family
    from finetune.families.nemotron_omni import NemotronOmniFamily
    from finetune.families.qwen2_5_omni import Qwen25OmniFamily
    from finetune.families.qwen3_omni_moe import Qwen3OmniMoeFamily

    return {"qwen2_5_omni": Qwen25OmniFamily, "baichuan_omni": BaichuanOmniFamily,
            "qwen3_omni_moe": Qwen3OmniMoeFamily, "gemma3n": Gemma3nFamily, "gemma4": Gemma4Family,
            "nemotron_omni": NemotronOmniFamily}


def registry() -> dict[str, type[Family]]:
    """Every family: name -> class (its module imported on first use)."""
    return _registry()


def model_types() -> dict[str, str]:
    """config.json `model_type` -> family name, from each family's own list."""
    return {mt: name for name, cls in _registry().items() for mt in cls.model_types}


def names() -> list[str]:
    """The families' names (what model.family may give besides auto), sorted."""
    return sorted(_registry())


def get_family(name: str) -> Family:
    """A family by name, with the list of known names on a miss."""
    reg = _registry()
    if name not in reg:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]()


def family_for(path: str, family: str = "auto", revision: str = "") -> Family:
    """The family of `model.path` (`tiny:<family>`, a local folder, or a hub id whose snapshot at
    `revision` is resolved through the HF cache) unless named explicitly."""
    if family != "auto":
        return get_family(family)
    if path.startswith("tiny:"):
        return get_family(path.split(":", 1)[1].split("-", 1)[0])  # tiny:<family>[-variant]
    folder = Path(path).expanduser()
    if not folder.is_dir():
        from finetune.hub import is_hub_id, resolve_model

        if is_hub_id(path):
            folder = resolve_model(path, revision)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise MissingFileError(f"model.path {path!r}: no config.json there; point it at a local model folder "
                                "or use tiny:<family>")
    mt = json.loads(cfg_path.read_text()).get("model_type")
    known = model_types()
    if mt not in known:
        raise ConfigError(f"{cfg_path}: model_type {mt!r} is not supported; supported: {', '.join(sorted(known))}")
    return get_family(known[mt])
