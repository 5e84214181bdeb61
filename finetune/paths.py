"""Where the toolkit's own files are: its cache, the shipped configs and recipes (layer 1).

Nothing of the package is imported here."""

from __future__ import annotations

import os
from pathlib import Path

#: the package folder, and the project folder that holds it (recipes/, data_templates/)
PACKAGE = Path(__file__).resolve().parent
PROJECT = PACKAGE.parent
#: configs of released models and their chat templates (finetune/configs)
CONFIGS = PACKAGE / "configs"


def cache_root() -> Path:
    """The toolkit's cache folder (OMNI_FINETUNE_CACHE, else ~/.cache/omni-finetune): tiny models,
    the record of checked samples, embedded media, the rows data-loader workers share."""
    return Path(os.environ.get("OMNI_FINETUNE_CACHE", Path.home() / ".cache" / "omni-finetune"))


def recipes_dir() -> Path:
    """The recipes folder: `./recipes` when the current folder has one (a project of the user's),
    else the project's own."""
    local = Path.cwd() / "recipes"
    return local if local.is_dir() else PROJECT / "recipes"


def config_text(name: str) -> str:
    """A shipped file of finetune/configs (a chat template, say), as text."""
    return (CONFIGS / name).read_text()
