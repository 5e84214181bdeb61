"""A recipe's model: its family, its folder, its processor and how to load it (layer 4).

The one way the rest of the package goes from a recipe to the Family contract: `family_of`,
`model_folder` (a tiny model is built once, a hub id resolved at its revision), `processor_of`
and `load_spec` (what `Family.load` takes instead of the recipe).
"""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.families import family_for
from finetune.families.base import Family, LoadSpec, Processor
from finetune.recipe import Recipe, shards_weights


def family_of(recipe: Recipe) -> Family:
    """The family of recipe.model.path (or model.family when named)."""
    return family_for(recipe.model.path, recipe.model.family, recipe.model.revision)


def model_folder(recipe: Recipe, family: Family | None = None) -> Path:
    """The model's folder: a local folder as it is, a tiny model built (once) into the cache, a hub
    id's snapshot at model.revision."""
    family = family or family_of(recipe)
    return family.resolve_path(recipe.model.path, recipe.model.tiny_seed, recipe.model.revision)


def processor_settings(recipe: Recipe) -> dict:
    """The recipe's settings of the processor (Processor.from_folder)."""
    m = recipe.model
    out = dict(min_pixels=m.min_pixels, max_pixels=m.max_pixels, video_fps=m.video_fps,
               video_max_frames=m.video_max_frames, system_prompt=recipe.data.system_prompt,
               long_audio=recipe.data.long_audio)
    if m.use_audio_in_video:
        out["use_audio_in_video"] = True
    return out


def processor_of(recipe: Recipe, family: Family | None = None, folder: Path | None = None) -> Processor:
    """The model folder's processor with the recipe's settings."""
    family = family or family_of(recipe)
    return family.processor(folder or model_folder(recipe, family), processor_settings(recipe))


def load_spec(recipe: Recipe, *, quantize: str | None = None, dtype: torch.dtype = torch.float32,
              attn: str | None = None) -> LoadSpec:
    """What Family.load takes: the recipe's model, its quantisation (unless given), the dtype and
    attention to load with, whether the engine shards weights, the processor's settings."""
    m = recipe.model
    return LoadSpec(path=m.path, revision=m.revision, tiny_seed=m.tiny_seed,
                    quantize=m.quantize if quantize is None else quantize, dtype=dtype, attn=attn,
                    sharded=shards_weights(recipe), llm_full=recipe.roles.llm.mode == "full",
                    processor=processor_settings(recipe))
